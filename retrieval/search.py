"""Exact L2 search over any subset of an index's feature chunks (DESIGN.md, "The index").

distance(x) = Σ_{c∈S} w_c ‖q_c − x_c‖² over the stored float32 features, ties broken by
ascending id. Each chunk's vectors are stored contiguously, so a query reads only the chosen
chunks: one GEMM per chunk, all queries at once, on the expansion w_c(‖x_c‖² − 2 x_c·q_c)
in float32, a cheap selection of the k-th score, then every item whose float32 score lies within a rigorous
rounding-error bound of the k-th is re-ranked in float64 from its raw vectors, so results equal
a float64 brute force. Several queries at once go through a C scan instead where it was built
(retrieval/scan.py): the same float32 scores, compared with each query's running k-th in
registers instead of written out and selected. The torch backend runs the same steps with
torch.matmul and torch.topk on the store's device (CUDA, or the CPU for tests).

Filters act inside the search, so k results come back whenever k items pass them: `allowed` is
a boolean mask over the store's items or an array of ids; `exclude_ids` is one list of ids for
every query, or a (Q, m) array with a row per query. Ids the store lacks are ignored by both.
Results are ids and float64 distances of shape (Q, k'), k' the most any query found; a query
with fewer (only possible with per-query exclusions) is padded with id -1 and distance inf.
"""
from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from disentangle.errors import RetrievalError

from . import scan
from .blas import gemm_add

_U = 2.0**-24  # float32 unit roundoff
_TINY = 2.0**-126  # absolute error of one float32 op that underflows (flush-to-zero included)
_SAFE = 1e36  # float32 scores bounded by this cannot overflow (float32 max is 3.4e38)
_BLOCK = 1 << 16  # rows per block of float64 work: keeps its temporaries to a few MB
_SCORES = 1 << 24  # float32 scores per query group: bounds the (N, Q) score matrix to 64 MB
_SPARSE = 8  # an allowed set of at most N / _SPARSE items is gathered instead of masked
# The scan asks for kk + m rows per query with m excluded, and re-ranks all of them: at 200K with
# 1,000 excluded it took about 3 times as long as the GEMM path, which masks the excluded rows instead.
_FUSED_MAX_EXCLUDED = 64
_GROUPS = 256  # selection groups per wanted item: more groups, fewer candidates to scan
_SCRATCH = threading.local()  # score buffers kept per thread: at most 2 x _SCORES + N floats
# Weights are relative importances. Within this range each weighted float32 term stays a normal
# number for features of ordinary size (the error bound's relative roundings hold) and the float64
# re-rank keeps the smallest weighted term at >= 1e-12 of the largest, well inside its 16 digits;
# subnormal weights (1e-320) quantise the re-rank's distances and reorder results.
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6


@dataclass
class SearchResult:
    """Ids (Q, k') int64 and float64 distances, best first; a query with fewer results pads -1 / inf."""

    ids: np.ndarray
    distances: np.ndarray


class ChunkStore:
    """Per-chunk contiguous float32 vectors with squared norms and int64 ids, searchable by any subset."""

    def __init__(
        self,
        chunks: Sequence[np.ndarray] | np.ndarray,
        ids: np.ndarray | None = None,
        *,
        backend: str | None = None,
        device: str = "cpu",
    ):
        """Wrap n_chunks (N, d) arrays, or one (n_chunks, N, d) array; contiguous float32 is not copied."""
        if isinstance(chunks, np.ndarray) and chunks.ndim != 3:
            raise RetrievalError(f"a feature array must be (n_chunks, N, chunk_dim); got shape {chunks.shape}")
        arrays = [np.asarray(a) for a in chunks]
        shapes = sorted({a.shape for a in arrays})
        real = all(a.dtype.kind in "fiu" for a in arrays)
        if len(shapes) != 1 or len(shapes[0]) != 2 or not shapes[0][0] or not real:
            raise RetrievalError(f"give real (N, chunk_dim) arrays of one shape, N >= 1; got shapes {shapes}")
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        self.n_chunks, (n, self.chunk_dim) = len(arrays), arrays[0].shape
        self.ids = np.array(np.arange(n) if ids is None else ids)
        if self.ids.shape != (n,) or self.ids.dtype.kind not in "iu" or self.ids.min() < 0:
            raise RetrievalError(f"ids must be {n} non-negative integers (-1 marks padding in results)")
        self.ids = self.ids.astype(np.int64)
        self.ids.setflags(write=False)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        if np.any(self._sorted[1:] == self._sorted[:-1]):
            raise RetrievalError("ids must be unique")
        norms = [_squared_norms(a) for a in arrays]
        if not all(np.all(m <= np.finfo(np.float32).max) for m in norms):  # NaN fails too
            raise RetrievalError("features must be finite with squared chunk norms below 3e38")
        self._max_norm = np.sqrt([m.max() for m in norms])  # per chunk, for the error bound
        norms = [m.astype(np.float32) for m in norms]

        self.backend = backend or ("numpy" if device == "cpu" else "torch")
        if self.backend == "numpy" and device != "cpu":
            raise RetrievalError(f"the numpy backend runs on the CPU; use backend='torch' for {device!r}")
        if self.backend == "numpy":
            self._x, self._norms = arrays, norms
        elif self.backend == "torch":
            import torch

            try:
                dev = torch.device(device)
            except RuntimeError:
                raise RetrievalError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise RetrievalError("CUDA is not available here; use device='cpu'")
            self._x = [torch.as_tensor(a, device=dev) for a in arrays]  # shares memory on the CPU
            self._norms = [torch.as_tensor(m, device=dev) for m in norms]
        else:
            raise RetrievalError(f"backend must be 'numpy' or 'torch'; got {backend!r}")

    def __len__(self) -> int:
        """Number of stored items."""
        return len(self.ids)

    def vector(self, id: int) -> np.ndarray:
        """The stored (n_chunks, chunk_dim) float32 feature of an id."""
        pos, found = self._positions(np.array([_integer("id", id, 0)]))
        if not found[0]:
            raise RetrievalError(f"id {id} is not in the store")
        return np.concatenate([self._rows(c, pos) for c in range(self.n_chunks)])

    def nbytes(self) -> int:
        """Bytes held: vectors, norms, ids and the id lookup."""
        arrays = self._x + self._norms
        held = sum(a.nbytes if isinstance(a, np.ndarray) else a.element_size() * a.nelement() for a in arrays)
        return held + self.ids.nbytes + self._order.nbytes + self._sorted.nbytes

    def _positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store positions of ids, and whether each id is stored at all."""
        i = np.minimum(np.searchsorted(self._sorted, ids), len(self) - 1)
        return self._order[i], self._sorted[i] == ids

    def _rows(self, c: int, pos: np.ndarray) -> np.ndarray:
        """Chunk c of the items at positions pos, as a float32 numpy array."""
        if self.backend == "numpy":
            return self._x[c][pos]
        import torch

        return self._x[c][torch.from_numpy(pos).to(self._x[c].device)].cpu().numpy()


def search(
    store: ChunkStore,
    queries: np.ndarray,
    chunks: Sequence[int],
    k: int = 10,
    *,
    weights: Sequence[float] | None = None,
    offset: int = 0,
    exclude_ids: Sequence[int] | np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> SearchResult:
    """Per query ((n_chunks, d) or (Q, n_chunks, d)), the k nearest allowed items after `offset`."""
    q = _queries(store, queries)
    sel = _chunks(store, chunks)
    w = _weights(weights, len(sel))
    k, offset = _integer("k", k, 1), _integer("offset", offset, 0)
    valid = _allowed(store, allowed)
    excl = _exclusions(store, exclude_ids, len(q), valid)
    n_valid = len(store) if valid is None else int(valid.sum())
    # A small allowed set is cheaper to gather than to scan; otherwise scan all and mask.
    rows = np.flatnonzero(valid) if valid is not None and n_valid * _SPARSE <= len(store) else None
    mask = valid if rows is None else None
    local_excl = excl if rows is None else [np.searchsorted(rows, p) for p in excl]
    kk = np.minimum(k + offset, n_valid - np.array([len(p) for p in excl]))  # scores to select
    e = 2 * _error_bound(store, q, sel, w)

    windows = _windows_torch if store.backend == "torch" else _windows_numpy
    # The C scan keeps no score matrix, so all queries go to it at once; the GEMM path (and the
    # scan's fallback) takes groups whose (n, Q) scores stay within _SCORES floats.
    fused = None
    if _scan_fits(store, q, kk, excl):
        fused = _windows_fused(store, q, sel, w, rows, mask, local_excl, kk, e)
    n_scanned = len(store) if rows is None else max(len(rows), 1)
    group = len(q) if fused is not None else max(1, _SCORES // n_scanned)
    found_ids, found_dist = [], []
    for s in range(0, len(q), group):
        g = slice(s, s + group)
        if fused is not None:
            wins = fused
        elif kk[g].max() > 0:
            wins = windows(store, q[g], sel, w, rows, mask, local_excl[g], kk[g], e[g])
        else:
            wins = [np.empty(0, np.intp)] * len(q[g])
        for r_ids, r_dist in _ranked(store, q[g], sel, w, [win if rows is None else rows[win] for win in wins],
                                     k, offset):
            found_ids.append(r_ids)
            found_dist.append(r_dist)
    width = max(len(r) for r in found_ids)
    ids = np.full((len(q), width), -1, np.int64)
    dist = np.full((len(q), width), np.inf)
    for i, (r, d) in enumerate(zip(found_ids, found_dist)):
        ids[i, :len(r)], dist[i, :len(d)] = r, d
    return SearchResult(ids, dist)


def _error_bound(store: ChunkStore, q: np.ndarray, sel: list[int], w: np.ndarray) -> np.ndarray:
    """Per query, a bound E on |float32 score − exact score| over every stored item.

    A score sums, per chosen chunk, fl(x_c · (−2 w_c q_c)) and fl(w_c · fl(‖x_c‖²)). With
    B_c = w_c (M_c + ‖q_c‖)², M_c the largest stored norm, every term and partial sum is at most
    Σ B_c in magnitude. Per chunk the dot product errs by γ_d B_c (any summation order, FMA or
    not), the float32 roundings of −2w_c, of its product with q_c, of w_c, of the norm and of
    w_c·norm by 5u B_c; the sum of the 2|S| terms by γ_{2|S|} Σ B_c: in all under
    γ_{d+2|S|+5} Σ B_c. Reduced-precision torch matmuls (TF32, bf16) round their inputs, adding
    2u_in per product. The factor 2 is slack for the dropped (1 + O(u)) factors and the float64
    re-rank's own rounding, both far below it. Then the true kk-th score is at most the float32
    kk-th + E, and every true top-kk item scores at most the float32 kk-th + 2E in float32:
    that window is re-ranked exactly.
    """
    qs = q[:, sel].astype(np.float64)
    qn = np.sqrt((qs * qs).sum(-1))  # (Q, |S|)
    b = np.square(store._max_norm[sel] + qn) @ w  # (Q,) Σ_c B_c
    if not b.max() < _SAFE:  # NaN fails too
        raise RetrievalError("features, queries or weights too large for float32 scores; rescale them")
    m = store.chunk_dim + 2 * len(sel) + 5
    u_in = _torch_input_roundoff() if store.backend == "torch" else 0.0
    ops = len(sel) * (2 * store.chunk_dim + 4)
    return 2 * (m * _U / (1 - m * _U) + 2 * u_in) * b + 2 * ops * _TINY


def _torch_input_roundoff() -> float:
    """Rounding of fp32 matmul inputs that torch's precision setting allows (TF32 2^-11, bf16 2^-8)."""
    import torch

    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through torch's per-backend API, which it won't summarise: assume bf16
        precision = "medium"
    return {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}[precision]


def _up(r: np.ndarray | float) -> np.ndarray:
    """The float32 just above r, so `score <= _up(r)` keeps every float32 score <= r."""
    return np.nextafter(np.float32(r), np.float32(np.inf))


def _windows_numpy(store, q, sel, w, rows, mask, excl, kk, e) -> list[np.ndarray]:
    """Per query, local indices including every float32 score within e of the kk-th smallest."""
    n = len(store) if rows is None else len(rows)
    # Scores as (n, Q): X (n, d) @ q.T (d, Q) streams the stored rows once for all queries, where
    # q @ X.T makes OpenBLAS pack all of X first (2 queries cost 4.5 times one, 16 three times
    # this at 200K x 64; docs/benchmarks.md). They start at Σ_c w_c‖x_c‖² and each chunk's GEMM
    # adds into them in place (retrieval/blas.py, the GIL released); without that GEMM, numpy
    # multiplies and adds, a pass over the scores per chunk more.
    acc = _scratch("acc", (n, len(q)))
    norms = [store._norms[c] if rows is None else store._norms[c][rows] for c in sel]
    if len(sel) == 1 and w[0] == 1:
        total = norms[0]
    else:
        total = np.multiply(norms[0], np.float32(w[0]), out=_scratch("norm", (n,)))
        for nrm, wc in zip(norms[1:], w[1:]):
            total += nrm if wc == 1 else nrm * np.float32(wc)
    add_in_place = gemm_add is not None and len(q) > 1  # one query: numpy's GEMV, and n floats to add
    if add_in_place:
        np.copyto(acc, total[:, None])
    for j, (c, wc) in enumerate(zip(sel, w)):
        x = store._x[c] if rows is None else store._x[c][rows]
        qc = np.float32(-2.0 * wc) * q[:, c]  # (Q, d)
        if add_in_place:
            gemm_add(x, qc, acc)
            continue
        out = acc if j == 0 else _scratch("part", acc.shape)
        np.matmul(x, qc.T, out=out)
        if j:
            acc += out
    if not add_in_place:
        acc += total[:, None]
    if mask is not None:
        np.copyto(acc, np.inf, where=~mask[:, None])
    for i, p in enumerate(excl):
        if len(p):
            acc[p, i] = np.inf
    return _select(acc, kk, e)


def _scan_fits(store: ChunkStore, q: np.ndarray, kk: np.ndarray, excl: list[np.ndarray]) -> bool:
    """Whether the C scan takes these queries: built, numpy backend, small kk, few exclusions. A
    single query too: its own kernel runs 1.3 to 1.5 times as fast as numpy's GEMV."""
    m = max(len(p) for p in excl)
    return (scan.windows is not None and store.backend == "numpy"
            and kk.max() > 0 and m <= _FUSED_MAX_EXCLUDED and kk.max() + m <= scan.MAX_KK)


def _windows_fused(store, q, sel, w, rows, mask, excl, kk, e) -> list[np.ndarray] | None:
    """_windows_numpy by the C scan (retrieval/scan.py), all queries at once; None where it gave up."""
    xs = [store._x[c] if rows is None else store._x[c][rows] for c in sel]
    norms = [store._norms[c] if rows is None else store._norms[c][rows] for c in sel]
    qs = [np.float32(-2.0 * wc) * q[:, c] for c, wc in zip(sel, w)]
    # Excluded rows are scanned like any other: the (kk + m)-th score over all rows is at least
    # the kk-th over the rest, so the window around it still holds every row needed; then the
    # excluded rows are dropped. kk + m never exceeds the allowed rows (search() caps kk so).
    m = np.array([len(p) for p in excl])
    wins = scan.windows(xs, norms, w, qs, mask, np.where(kk > 0, kk + m, 0), e)
    if wins is None:
        return None
    return [_without(win, p) for win, p in zip(wins, excl)]


def _without(rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """rows, in their order, less the excluded ones (one, for a query by an indexed image: a
    comparison costs a tenth of setdiff1d's sort-free isin)."""
    if len(excluded) == 1:
        return rows[rows != excluded[0]]
    return np.setdiff1d(rows, excluded, assume_unique=True) if len(excluded) else rows


def _select(s: np.ndarray, kk: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
    """Per column i of scores s (n, Q), indices of a superset of the scores <= (kk[i]-th smallest
    of the column) + e[i]; needs kk[i] finite scores in the column."""
    n, nq = s.shape
    # Items fall into nb >= kk strided groups (item r in group r % nb). The kk-th smallest group
    # minimum t bounds the kk-th score from above, and only groups whose minimum is <= t + e can
    # hold scores <= t + e: vectorised passes over all columns at once leave about kk candidates each.
    want = kk > 0
    nb = min(_GROUPS * int(kk.max()), n // 16)
    if not want.any() or nb < kk.max():
        return [_select_column(s[:, i], int(k), e[i]) for i, k in enumerate(kk)]
    m = n // nb
    groups = s[: m * nb].reshape(m, nb, nq)  # groups[:, j, i]: group j of column i
    mins = groups.min(0)  # (nb, Q)
    kth = np.partition(mins, np.unique(np.maximum(kk, 1) - 1), axis=0)
    t = kth[np.maximum(kk, 1) - 1, np.arange(nq)]  # (Q,) the kk-th smallest group minimum
    thr = np.where(want, _up(t + e), -np.inf).astype(np.float32)  # nothing for kk = 0
    j, i = np.nonzero(mins <= thr)  # the groups that can hold a candidate, by column
    r, h = np.nonzero(groups[:, j, i] <= thr[i])
    tail_r, tail_i = np.nonzero(s[m * nb:] <= thr)
    rows = np.concatenate([r * nb + j[h], m * nb + tail_r])
    cols = np.concatenate([i[h], tail_i])
    order = np.argsort(cols, kind="stable")
    found = np.split(rows[order], np.searchsorted(cols[order], np.arange(1, nq)))
    for q in np.flatnonzero(want & ~np.isfinite(t)):  # fewer finite group minima than kk: scan it all
        found[q] = _select_column(s[:, q], int(kk[q]), e[q])
    return found


def _select_column(col: np.ndarray, kk: int, e: float) -> np.ndarray:
    """_select for one column by a full partition."""
    if kk == 0:
        return np.empty(0, np.intp)
    return np.flatnonzero(col <= _up(np.partition(col, kk - 1)[kk - 1] + e))


def _windows_torch(store, q, sel, w, rows, mask, excl, kk, e) -> list[np.ndarray]:
    """_windows_numpy with torch.matmul and torch.topk on the store's device."""
    import torch

    dev = store._x[0].device
    qt = torch.from_numpy(q).to(dev)
    idx = None if rows is None else torch.from_numpy(rows).to(dev)
    acc = torch.zeros((len(q), len(store) if rows is None else len(rows)), dtype=torch.float32, device=dev)
    for c, wc in zip(sel, w):
        x, nrm = store._x[c], store._norms[c]
        if idx is not None:
            x, nrm = x[idx], nrm[idx]
        acc.addmm_(qt[:, c], x.T, alpha=-2.0 * wc).add_(nrm, alpha=float(wc))  # (Q, n)
    if mask is not None:
        acc.masked_fill_(~torch.from_numpy(mask).to(dev), float("inf"))
    for i, p in enumerate(excl):
        acc[i, torch.from_numpy(p).to(dev)] = float("inf")
    top = torch.topk(acc, int(kk.max()), dim=1, largest=False).values  # (Q, max kk), ascending
    kth = top.gather(1, torch.from_numpy(np.maximum(kk, 1) - 1).to(dev)[:, None])[:, 0]
    thr = _up(kth.double().cpu().numpy() + e)
    hits = (acc <= torch.from_numpy(thr).to(dev)[:, None]).nonzero().cpu().numpy()  # (M, 2) by row
    wins = np.split(hits[:, 1], np.searchsorted(hits[:, 0], np.arange(1, len(q))))
    return [win if n else win[:0] for win, n in zip(wins, kk)]


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A reusable per-thread float32 array: page faults on fresh memory cost about as much as the GEMV."""
    size = math.prod(shape)
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:size].reshape(shape)


def _ranked(store: ChunkStore, q: np.ndarray, sel: list[int], w: np.ndarray, positions: list[np.ndarray],
            k: int, offset: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query q[i], the ids and float64 distances of its candidates (store positions
    positions[i]) ranked by (distance, id), from offset on, at most k. All queries' candidates are
    re-ranked and sorted together: a dozen numpy calls per query took 1.6 ms for 16 queries over
    8 chunks of 2,000 items, these 0.75 to 1.0 ms."""
    if len(positions) == 1:  # a lone query: no query gathered per candidate, no grouping
        pos = positions[0]
        dist = _rerank(store, q[0], sel, w, pos)
        best = np.lexsort((store.ids[pos], dist))[offset:offset + k]
        return [(store.ids[pos[best]], dist[best])]
    counts = np.array([len(p) for p in positions])
    pos = np.concatenate(positions).astype(np.intp, copy=False)
    owner = np.repeat(np.arange(len(positions)), counts)
    dist = _rerank(store, q, sel, w, pos, owner)
    ids = store.ids[pos]
    order = np.lexsort((ids, dist, owner))  # by query, then distance, then id
    starts = np.cumsum(counts) - counts
    segments = (order[a:a + n][offset:offset + k] for a, n in zip(starts, counts))
    return [(ids[seg], dist[seg]) for seg in segments]


def _rerank(store: ChunkStore, q: np.ndarray, sel: list[int], w: np.ndarray, pos: np.ndarray,
            owner: np.ndarray | None = None) -> np.ndarray:
    """Float64 distances Σ_c w_c ‖q_c − x_c‖² of the items at positions pos, from the raw vectors:
    to the query q (n_chunks, d), or with owner to their queries q[owner] (q: (Q, n_chunks, d))."""
    dist = np.zeros(len(pos))
    for s in range(0, len(pos), _BLOCK):
        b = slice(s, s + _BLOCK)
        for c, wc in zip(sel, w):
            qc = q[c] if owner is None else q[owner[b], c]
            diff = np.subtract(store._rows(c, pos[b]), qc, dtype=np.float64)  # exact
            dist[b] += wc * np.square(diff).sum(1)
    return dist


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """Float64 squared row norms, a block at a time."""
    out = np.empty(len(x))
    for s in range(0, len(x), _BLOCK):
        b = x[s:s + _BLOCK].astype(np.float64)
        np.einsum("ij,ij->i", b, b, out=out[s:s + _BLOCK])
    return out


def _queries(store: ChunkStore, queries: np.ndarray) -> np.ndarray:
    """Queries as a contiguous (Q, n_chunks, d) float32 array."""
    q = np.asarray(queries)
    q = q[None] if q.ndim == 2 else q
    shape = (store.n_chunks, store.chunk_dim)
    if q.ndim != 3 or q.shape[1:] != shape or not len(q) or q.dtype.kind not in "fiu":
        raise RetrievalError(f"queries must be real arrays of shape {shape} or (Q, *{shape}), Q >= 1; "
                             f"got {q.dtype} {np.shape(queries)}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise RetrievalError("queries must be finite (no NaN or inf)")
    return q


def _chunks(store: ChunkStore, chunks: Sequence[int]) -> list[int]:
    """Validated chunk numbers."""
    allowed = f"chunks 0..{store.n_chunks - 1}"
    try:
        sel = [operator.index(c) for c in chunks]
    except TypeError:
        raise RetrievalError(f"chunks must be a list of integers from {allowed}") from None
    if not sel:
        raise RetrievalError(f"choose at least one of {allowed}")
    for c in sel:
        if not 0 <= c < store.n_chunks:
            raise RetrievalError(f"chunk {c} does not exist; this store has {allowed}")
    if len(set(sel)) != len(sel):
        raise RetrievalError(f"each chunk may be chosen once; got {sel}")
    return sel


def _weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Validated float64 weights, one per chosen chunk."""
    if weights is None:
        return np.ones(n)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        w = None
    if w is None or w.shape != (n,) or not np.all(np.isfinite(w) & (w > 0)):
        raise RetrievalError(f"weights must be {n} finite numbers > 0, one per chosen chunk; got {weights!r}")
    if not np.all((w >= MIN_WEIGHT) & (w <= MAX_WEIGHT)):
        raise RetrievalError(f"weights must lie from {MIN_WEIGHT:g} to {MAX_WEIGHT:g} (they are relative: "
                             f"1,0.5 ranks as 2,1); got {weights!r}")
    return w


def _integer(name: str, value: int, low: int) -> int:
    """value as an int >= low."""
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or v < low:
        raise RetrievalError(f"{name} must be an integer >= {low}; got {value!r}")
    return v


def _allowed(store: ChunkStore, allowed: np.ndarray | None) -> np.ndarray | None:
    """The allowed filter as a boolean mask over store positions (None: everything)."""
    if allowed is None:
        return None
    a = np.asarray(allowed)
    if a.dtype == bool and a.shape == (len(store),):
        return a
    if a.size and (a.ndim != 1 or a.dtype.kind not in "iu"):
        raise RetrievalError(f"allowed must be a boolean mask of length {len(store)} or a 1-D array of ids")
    pos, found = store._positions(a.astype(np.int64))
    mask = np.zeros(len(store), bool)
    mask[pos[found]] = True
    return mask


def _exclusions(store: ChunkStore, exclude_ids, n_queries: int, valid: np.ndarray | None) -> list[np.ndarray]:
    """Per query, the sorted store positions of its excluded ids that could otherwise be found."""
    e = None if exclude_ids is None else np.asarray(exclude_ids)
    if e is None or not e.size:
        return [np.empty(0, np.intp)] * n_queries
    if e.dtype.kind not in "iu" or e.ndim not in (1, 2) or (e.ndim == 2 and len(e) != n_queries):
        raise RetrievalError(f"exclude_ids must be ids excluded for every query, or a ({n_queries}, m) "
                             "array with one row of ids per query")
    rows = e.reshape(-1, e.shape[-1])  # a row of ids per query, or one row for all of them
    pos, found = store._positions(rows.reshape(-1).astype(np.int64))  # one lookup for every row
    if valid is not None:
        found &= valid[pos]
    pos, found = pos.reshape(rows.shape), found.reshape(rows.shape)
    # one id a row (queries by indexed images, excluding themselves) needs no np.unique
    each = [p[f] if rows.shape[1] == 1 else np.unique(p[f]) for p, f in zip(pos, found)]
    return each * n_queries if e.ndim == 1 else each
