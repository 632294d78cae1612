"""A two-node Ray cluster on this machine for the tests (ray.cluster_utils.Cluster): loopback only,
its files in a temporary folder, no dashboard. `ray start` on loopback does not make two nodes;
Cluster does, with object_store_memory set (its default is 150 MiB a node)."""
from __future__ import annotations

import os
import shutil
import tempfile

# without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray rewrote 127.0.0.1 to the machine's network
# address and listened on every interface; Ray reads it once, when it is first imported
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(ENV)
# 4 logical CPUs a node: room for two services' shard actors (a CPU each) beside Ray Data's encoders
NODE = {"num_cpus": 4, "object_store_memory": 200 * 2**20, "node_ip_address": "127.0.0.1"}


class TwoNodes:
    """start() a head and a second node and connect this process as the driver; stop() it all."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="retrieval-ray-")
        self.cluster = None
        self._saved = {}

    def start(self) -> "TwoNodes":
        # Ray's session files and anything it writes to HOME stay in the temporary folder
        for name, value in {"RAY_TMPDIR": self.folder, "HOME": self.folder}.items():
            self._saved[name] = os.environ.get(name)
            os.environ[name] = value
        import ray
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before tests/ray_cluster.py: it would leave loopback")
        self.cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        self.cluster.add_node(**NODE)
        ray.init(address=self.cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 log_to_driver=False)
        return self

    @property
    def address(self) -> str:
        return self.cluster.address

    def stop(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(self.folder, ignore_errors=True)
