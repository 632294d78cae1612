"""Searches that arrive together answered together: while one request thread runs the search core
for some options, requests with equal options queue, and the next of them runs one call for all
that queued. A search over few chunks is bound by memory bandwidth (it reads every stored vector of
its chunks), so Q queries in one pass cost little more than one; a lone request takes the lock,
finds no one ahead of it and searches at once, as it would without this.

Results are the core's exact results, whatever the batch: each query is answered as if alone.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class _Waiter:
    """One request's query, and what it gets back: its result, an error, or the turn to lead."""

    __slots__ = ("query", "result", "error", "lead", "done")

    def __init__(self, query: Any):
        self.query, self.result, self.error, self.lead = query, None, None, False
        self.done = threading.Event()


class Coalescer:
    """Runs `search(queries, options)` (answers in the order given) once for every group of
    concurrent calls with equal options; different options run side by side."""

    def __init__(self, search: Callable[[list, dict], list]):
        self._search = search
        self._lock = threading.Lock()
        self._queued: dict[Hashable, list[_Waiter]] = {}  # key -> waiters not yet searched
        self._running: set[Hashable] = set()              # keys whose search is in progress

    def __call__(self, query: Any, options: dict, key: Hashable) -> Any:
        """query's answer; key must be equal exactly when the options are."""
        me = _Waiter(query)
        with self._lock:
            self._queued.setdefault(key, []).append(me)
            me.lead = key not in self._running
            self._running.add(key)
        if not me.lead:
            me.done.wait()  # answered by a leader, or chosen to lead the next batch
        if me.lead:
            self._lead(key, options)
        if me.error is not None:
            raise me.error
        return me.result

    def _lead(self, key: Hashable, options: dict) -> None:
        """Search for everyone queued under key, then hand the lead to whoever queued meanwhile."""
        with self._lock:
            batch = self._queued.pop(key)
        try:
            self._answer(batch, options)
        finally:  # whatever happened, no waiter is left waiting and the key does not stay running
            with self._lock:
                waiting = self._queued.get(key)
                if waiting:  # the first of them leads the next batch; the key stays running
                    waiting[0].lead = True
                    waiting[0].done.set()
                else:
                    self._running.discard(key)
            for w in batch:
                if w.result is None and w.error is None:  # the leader was interrupted
                    w.error = RuntimeError("the search was interrupted; try again")
                w.lead = False
                w.done.set()

    def _answer(self, batch: list[_Waiter], options: dict) -> None:
        """Each waiter's result or error. When the shared search fails, each query is searched
        alone: one bad query (an upload whose feature is not finite) fails its own request only,
        and each caller raises an exception of its own."""
        try:
            results = self._search([w.query for w in batch], options)
            for w, result in zip(batch, results, strict=True):
                w.result = result
            return
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
                return
        for w in batch:
            try:
                w.result = self._search([w.query], options)[0]
            except Exception as e:
                w.error = e
