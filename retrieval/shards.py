"""Sharded exact search on Ray (`retrieval serve INDEX --ray ADDRESS`, docs/scale.md).

One Ray actor per shard folder (indexer/shards.py) loads its shard from the index path in its
__init__, so a restarted actor reloads it, and answers with the search core (retrieval/search.py)
on its own store, filters and exclusions applied inside. The service keeps the metadata and
merges: every shard returns its k + offset best (float64 distances, ties by id), and the union
holds the global k + offset best, so sorting it by (distance, id) gives exactly the single-process
answer; the shards' distances are the same float64 re-rank of the same raw vectors.

A shard whose actor dies is restarted by Ray (max_restarts) and the call in flight retried
(max_task_retries); when Ray gives up, the service starts a fresh actor and retries once more.
If that fails too, or a shard does not answer in time, the request fails with ShardUnavailable
(HTTP 503 naming the shard): never a partial answer.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from disentangle.errors import RetrievalError
from indexer.ray_encode import connect
from indexer.shards import read_layout

from .index import Index, Query, answers, self_exclusions
from .search import _integer, search

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # a shard that has not answered by then is unavailable (503)


class ShardUnavailable(Exception):
    """A shard could not answer: the request was fine, the service is not (HTTP 503). Not a
    RetrievalError, which means bad input (400)."""

    def __init__(self, shard: int, n_shards: int, reason: str):
        super().__init__(f"shard {shard} of {n_shards} is unavailable ({reason}); no partial answer "
                         "is given: retry later")
        self.shard = shard


class ShardSearcher:
    """One shard in its Ray actor: the shard's store and filters, the search core."""

    def __init__(self, index_path: str, shard: int):
        self.index = Index(index_path, shard=shard)
        self.shard = shard

    def describe(self) -> dict:
        import ray

        return {"shard": self.shard, "images": len(self.index), "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def search(self, queries: np.ndarray, chunks: list[int], k: int, weights, exclude: np.ndarray,
               where: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """This shard's k best of every query: ids (Q, k') and float64 distances, -1 / inf padded."""
        result = search(self.index.store, queries, chunks, k, weights=weights, exclude_ids=exclude,
                        allowed=self.index.allowed(where))
        return result.ids, result.distances

    def vector(self, id: int) -> np.ndarray:
        return self.index.store.vector(id)


def merge(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, offset: int) -> list[list[tuple[int, float]]]:
    """Per query, the (id, distance) pairs ranked offset .. offset + k of the shards' answers
    together: by distance, then id."""
    out = []
    for q in range(len(parts[0][0])):
        ids = np.concatenate([p[0][q] for p in parts])
        dist = np.concatenate([p[1][q] for p in parts])
        keep = ids >= 0
        ids, dist = ids[keep], dist[keep]
        best = np.lexsort((ids, dist))[offset:offset + k]
        out.append([(int(i), float(d)) for i, d in zip(ids[best], dist[best])])
    return out


def _reason(error: Exception) -> str:
    """What a dead actor's error says in one line: the project's own message when its __init__
    raised one (e.g. a missing shard file), else Ray's first line."""
    lines = str(error).strip().splitlines()
    ours = [line.split("RetrievalError: ", 1)[1] for line in lines if "RetrievalError: " in line]
    return (ours[-1] if ours else lines[0])[:300]


class _Vectors:
    """What Index.query_for reads of a store, from the shard that holds the id."""

    def __init__(self, owner: "ShardedIndex"):
        self.owner = owner

    def vector(self, id: int) -> np.ndarray:
        k = int(id) % self.owner.n_shards
        return self.owner._ask(k, "vector", int(id))


class ShardedIndex(Index):
    """An index served by one Ray actor per shard; the metadata stays here (one database)."""

    def __init__(self, path, address: str, *, timeout: float = TIMEOUT_S, cpus: float = 1.0):
        """Open INDEX's metadata, start one actor per shard on the Ray cluster at address (each
        reserving `cpus` of a node's CPUs) and wait until every shard is loaded."""
        super().__init__(path, vectors=False)
        layout = read_layout(self.path)
        if layout is None:
            raise RetrievalError(f"{self.path} is not split into shards; run `retrieval index DATA --model CKPT "
                                 f"--out {self.path} --shards N` first")
        if layout["count"] != len(self.ids):
            raise RetrievalError(f"{self.path}'s shards cover {layout['count']} images, the index holds "
                                 f"{len(self.ids)}; split it again with `retrieval index ... --shards N`")
        import ray

        connect(address)
        self.n_shards, self.timeout = layout["shards"], timeout
        # SPREAD: shards on different nodes where the cluster has them
        self._actor_class = ray.remote(ShardSearcher).options(
            max_restarts=1, max_task_retries=1, num_cpus=cpus, scheduling_strategy="SPREAD")
        self._actors = [self._start(k) for k in range(self.n_shards)]
        self._actors_lock = threading.Lock()
        try:
            self.shards = self._gather(range(self.n_shards), "describe")  # waits for every load
        except ShardUnavailable as e:
            self.close()
            raise RetrievalError(f"cannot serve {self.path}: {e}") from None
        self.store = _Vectors(self)
        log.info("%d shards on Ray: %s", self.n_shards, ", ".join(f"{s['images']} images" for s in self.shards))

    def close(self) -> None:
        """End the shards' actors (they also end with this process's Ray connection)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)

    def _start(self, k: int):
        return self._actor_class.remote(str(self.path), k)

    def _ask(self, k: int, method: str, *args):
        """ray.get of one shard's call; a dead actor is replaced and asked once more."""
        return self._gather([k], method, *args)[0]

    def _gather(self, shards: Sequence[int], method: str, *args) -> list:
        """The answers of the given shards to one call, asked in parallel; every answer is read
        (also after one failed) before the first failure is raised."""
        actors = {k: self._actors[k] for k in shards}
        refs = {k: getattr(actors[k], method).remote(*args) for k in shards}
        out, failures = {}, []
        for k in shards:
            try:
                out[k] = self._get(k, actors[k], refs[k], method, args)
            except (RetrievalError, ShardUnavailable) as e:
                failures.append(e)
        if failures:
            raise failures[0]
        return [out[k] for k in shards]

    def _get(self, k: int, actor, ref, method: str, args: tuple):
        """One shard's answer from `actor`; a dead actor is replaced (once, however many requests
        found it dead) and asked once more."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        for attempt in (1, 2):
            try:
                return ray.get(ref, timeout=self.timeout)
            except RayTaskError as e:  # the call itself raised: bad input reads as it would here
                if isinstance(e.cause, RetrievalError):
                    raise e.cause from None
                raise
            except GetTimeoutError:
                raise ShardUnavailable(k, self.n_shards, f"no answer within {self.timeout:g} s") from None
            except RayActorError as e:  # died, and Ray's restarts are spent or failed
                if attempt == 2:  # the next request finds this actor dead and starts another
                    reason = _reason(e)
                    raise ShardUnavailable(k, self.n_shards, "its actor died and could not be restarted: "
                                                             f"{reason}") from None
                log.warning("shard %d: actor died (%s); retrying on a new one", k, type(e).__name__)
                with self._actors_lock:
                    if self._actors[k] is actor:
                        self._actors[k] = self._start(k)
                    actor = self._actors[k]
                ref = getattr(actor, method).remote(*args)

    def search_many(self, queries: Sequence[Query], chunks: Sequence[int], k: int = 10, *,
                    offset: int = 0, weights: Sequence[float] | None = None,
                    where: dict | None = None) -> list[dict]:
        """Index.search_many's answer, merged from every shard's k + offset best."""
        if not queries:
            return []
        k, offset = _integer("k", k, 1), _integer("offset", offset, 0)
        vectors = np.stack([q.vector for q in queries])
        parts = self._gather(range(self.n_shards), "search", vectors, list(chunks), k + offset,
                             weights, self_exclusions(queries), where)
        return answers(self, queries, chunks, k, merge(parts, k, offset))
