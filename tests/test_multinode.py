"""Multi-node training as torchrun runs it: two "nodes" (two torchrun agents, one process each) meet
through c10d rendezvous on 127.0.0.1 and train with gloo; after a few steps every rank holds the
same parameters.

torch's TCPStore (the rendezvous and the process group's store) listens on every interface and has
no option to bind one, so both nodes run in a network namespace of their own that holds only the
loopback device (`unshare -n`): nothing they open can be reached from, or reach, any other address.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_train import _assert_same

REPO = Path(__file__).resolve().parents[1]

# each rank trains 4 steps on its own pairs, saves its parameters and what it and its agent listened on
WORKER = """
import json, os, sys
import torch
sys.path.insert(0, {repo!r})
from disentangle.config import PRESETS
from disentangle.train import train
from tests.test_train import Squares, _config

torch.set_num_threads(1)
rank = os.environ["RANK"]
model = train(Squares(), PRESETS["tiny"], _config(steps=4, variant="mix+c+g"), {run!r}, device="cpu")
torch.save(dict(model.named_parameters()), f"{out}/rank{{rank}}.pt")
devices = [line.split(":")[0].strip() for line in open("/proc/self/net/dev").readlines()[2:]]
json.dump(devices, open(f"{out}/devices{{rank}}.json", "w"))  # this network namespace's devices
torch.distributed.destroy_process_group()
"""


def _namespace() -> list[str]:
    """The command prefix that runs a shell in a new network namespace with only loopback, up."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):  # as root; else as a user namespace's root
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    raise AssertionError("unshare -n is not allowed here: the test needs its own network namespace")


def test_two_torchrun_nodes_on_loopback_keep_parameters_in_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), run=str(tmp_path / "run"), out=str(tmp_path)))
    port = 29400

    def node(n: int) -> str:
        return " ".join([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "multinode-test",
            "--rdzv_conf", f"is_host={int(n == 0)},join_timeout=60", "--local_addr", "127.0.0.1",
            "--max_restarts", "0", "--monitor_interval", "0.2", str(script)])

    # both nodes in one namespace; the shell exits non-zero when either node does
    shell = (f"ip link set lo up && {{ {node(0)} & a=$!; {node(1)} & b=$!; "
             "wait $a; ra=$?; wait $b; rb=$?; exit $((ra | rb)); }")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*_namespace(), "sh", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for r in (0, 1):
        assert json.loads((tmp_path / f"devices{r}.json").read_text()) == ["lo"]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    _assert_same(w0, w1)  # each rank drew its own pairs: equal parameters mean averaged gradients
    from disentangle import checkpoint

    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4
    saved = dict(checkpoint.load_model(tmp_path / "run" / "checkpoint.pt")[0].named_parameters())
    _assert_same({k: v.detach() for k, v in saved.items()}, w0)
