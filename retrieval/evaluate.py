"""The paper's quantitative protocols on an index (§4): Table 2's nearest-neighbour mAP per chunk
and attribute, with the exact mAP of a random ranking, and Table 3's linear probe (Eq. 5).

Conventions, fixed here once:
- A query never retrieves itself; the ranking is by ascending L2 distance computed in float64
  (GEMM expansion) and rounded to float32 (the features' own precision), ties in that rounded
  distance broken by ascending id, as in search.
- AP = (1/R) Σ_k rel_k · hits_k / k over the ranking of the N−1 other images, R = the number of
  them sharing the query's value. A query with R = 0 (a value seen once) has no AP and is
  skipped; the report counts them. mAP is the mean over the remaining queries.
- An attribute is evaluated on the images that carry a label for it; one with fewer than two
  values in the split, or with no value held by two images, is left out, and so is Sprites'
  weapon, as in the paper.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from tqdm import tqdm

from disentangle import checkpoint
from disentangle.errors import RetrievalError
from indexer.build import MODEL
from indexer.schema import Image

from .index import Index

log = logging.getLogger(__name__)

EXCLUDED = {"sprites": ("weapon",)}  # "only visible in a small subset of poses" (§4, Sprites)
MARGIN = 0.10      # a chunk is named after an attribute whose lift beats its runner-up by this
MIN_LIFT = 0.10    # ... and is at least this far from random (see lift())
_BLOCK = 1 << 22   # distance entries per block of queries: ~32 MB of float64


def query_ap(features: np.ndarray, labels: np.ndarray, block: int = _BLOCK,
             workers: int | None = None, queries: np.ndarray | None = None) -> np.ndarray:
    """(N, A) AP of each row of `features` (N, d) querying all other rows by L2, relevant = same
    value in each column of `labels` (N, A) non-negative ints; NaN where no other row shares it.
    queries: row numbers to query with (default every row); the result then has one row for each,
    and every row of `features` is still a candidate.

    Per block of queries: one GEMM for the distances, one argsort per row on the unique int64 key
    (float32 distance bits, column), then each image's rank; per attribute value, the ranks of the
    images holding it, sorted, give AP = (1/R) Σ_j j / rank_j with no pass over the other images.
    Blocks run on `workers` threads (default: torch's thread count); numpy's sorts release the GIL.
    """
    x = np.asarray(features, np.float64)
    codes = np.asarray(labels)
    n, n_attr = x.shape[0], codes.shape[1]
    asked = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    out = np.full((len(asked), n_attr), np.nan)
    if n < 2:
        return out
    norms = np.einsum("nd,nd->n", x, x)[:, None]
    ones = np.ones_like(norms)
    # one GEMM gives ||q||² − 2 q·x + ||x||² whole: no extra passes over the (b, N) block
    rows, items = np.hstack([-2.0 * x, norms, ones]), np.hstack([x, ones, norms])
    columns = np.arange(n, dtype=np.int64)
    members = [[np.flatnonzero(codes[:, a] == v) for v in range(codes[:, a].max() + 1)]
               for a in range(n_attr)]

    def run(s: int, e: int) -> None:
        me = asked[s:e]
        d = rows[me] @ items.T                                        # (b, N)
        np.maximum(d, 0.0, out=d)  # rounding can dip below 0; non-negative float bits sort as ints
        d[np.arange(e - s), me] = -1.0                                # self first
        key = d.astype(np.float32).view(np.int32).astype(np.int64)  # self's -1.0 sorts first too
        key <<= 32
        key |= columns                                                # unique: ties go by id
        order = np.argsort(key, axis=1)
        rank = np.empty((e - s, n), np.int32)                         # 0 = self, then 1..N-1
        rank[np.arange(e - s)[:, None], order] = np.arange(n, dtype=np.int32)
        for a in range(n_attr):
            query_codes = codes[me, a]
            for v in np.unique(query_codes):
                q = np.flatnonzero(query_codes == v)
                same = members[a][v]
                if len(same) < 2:
                    continue
                ranks = np.sort(rank[q[:, None], same], axis=1)[:, 1:]   # (q, R), self dropped
                out[s + q, a] = (np.arange(1, len(same)) / ranks).mean(1)

    per_block = max(1, block // n)
    spans = [(s, min(s + per_block, len(asked))) for s in range(0, len(asked), per_block)]
    with ThreadPoolExecutor(max(1, workers or torch.get_num_threads())) as pool:
        for done in [pool.submit(run, s, e) for s, e in spans]:
            done.result()  # each block writes its own rows of `out`; re-raises a worker's error
    return out


def random_ap(relevant: np.ndarray, candidates: int) -> np.ndarray:
    """Exact E[AP] of a uniformly random ranking of `candidates` items, `relevant` of them relevant.

    E[AP] = (1/R) Σ_k (1/k) E[rel_k · hits_k] = (R−1)/(M−1) + H_M (M−R) / (M(M−1)), M = candidates,
    since P(rel_k) = R/M and P(rel_j, rel_k) = R(R−1)/(M(M−1)) for j ≠ k. NaN where R = 0.
    """
    r = np.asarray(relevant, np.float64)
    m = candidates
    if m == 1:
        return np.where(r == 1, 1.0, np.nan)
    h = np.sum(1.0 / np.arange(1, m + 1))
    return np.where(r > 0, (r - 1) / (m - 1) + h * (m - r) / (m * (m - 1)), np.nan)


def encode(values: Sequence) -> np.ndarray:
    """Labels as int codes in order of first appearance; None (unlabelled) is -1."""
    seen: dict = {}
    return np.array([-1 if v is None else seen.setdefault(v, len(seen)) for v in values], np.int64)


def map_table(features: np.ndarray, labels: dict[str, np.ndarray], progress: bool = False,
              queries: int | None = None, seed: int = 0) -> dict:
    """Table 2 on features (N, C, d) and label codes per attribute (-1 = unlabelled):
    mAP per chunk and attribute, random mAP, and query counts; progress: a bar over the chunks.

    queries: estimate each mAP from this many labelled images drawn at random (the same draw, from
    `seed`, for every chunk), each still ranking all the others; the cost falls from N² to queries·N.
    """
    n_chunks = features.shape[1]
    rng = np.random.default_rng(seed)
    groups: dict[bytes, list[str]] = {}  # attributes labelled on the same images share each sort
    for name, code in labels.items():
        groups.setdefault(np.packbits(code >= 0).tobytes(), []).append(name)
    table = {a: {} for a in labels}
    bar = tqdm(total=n_chunks * len(groups), desc="Table 2", unit="chunk", disable=not progress)
    for names in groups.values():
        keep = labels[names[0]] >= 0
        codes = np.stack([labels[a][keep] for a in names], axis=1)
        asked = np.arange(len(codes))
        if queries is not None and queries < len(codes):
            asked = np.sort(rng.choice(len(codes), queries, replace=False))
        sizes = [np.bincount(codes[:, j])[codes[asked, j]] - 1 for j in range(len(names))]
        per_chunk = []
        for c in range(n_chunks):
            per_chunk.append(query_ap(features[keep, c], codes, queries=asked))
            bar.update()
        for j, a in enumerate(names):
            counted = sizes[j] > 0
            table[a] = {"map": [float(ap[counted, j].mean()) if counted.any() else float("nan")
                                for ap in per_chunk],
                        "random": float(random_ap(sizes[j][counted], len(codes) - 1).mean())
                        if counted.any() else float("nan"),
                        "queries": int(counted.sum()), "skipped": int((~counted).sum())}
    bar.close()
    return table


def lift(map_value: float, random_value: float) -> float:
    """How far an mAP is from random towards 1: (mAP − random) / (1 − random)."""
    return (map_value - random_value) / max(1.0 - random_value, 1e-12)


def separated_factors(table: dict, n_chunks: int, margin: float = MARGIN, min_lift: float = MIN_LIFT
                      ) -> dict[str, dict]:
    """attribute -> {chunk, map, runner_up (chunk), runner_up_map, random} for every attribute
    that one chunk has to itself: that chunk's lift is >= min_lift and beats the lift of every
    other chunk on the same attribute by >= margin (the demo's "which factors came apart")."""
    out = {}
    for a, row in table.items():
        maps = np.asarray(row["map"], np.float64)
        if n_chunks < 2 or np.isnan(maps).any():
            continue
        first, second = np.argsort(-maps, kind="stable")[:2]
        top, next_ = (lift(maps[c], row["random"]) for c in (first, second))
        if top >= min_lift and top - next_ >= margin:
            out[a] = {"chunk": int(first), "map": float(maps[first]), "runner_up": int(second),
                      "runner_up_map": float(maps[second]), "random": row["random"]}
    return out


def suggest_names(table: dict, n_chunks: int, margin: float = MARGIN, min_lift: float = MIN_LIFT
                  ) -> dict[int, str]:
    """chunk -> attribute it retrieves best, when that attribute's lift is >= min_lift and beats
    the chunk's runner-up attribute by >= margin; each attribute goes to at most one chunk.
    A chunk that holds several attributes alone (separated_factors), such as x and y of one
    position, is named after all of them: 'x and y'."""
    names = list(table)
    if not names:
        return {}
    held: dict[int, list[str]] = {}
    for a, where in separated_factors(table, n_chunks, margin, min_lift).items():
        held.setdefault(where["chunk"], []).append(a)
    joint = {c: " and ".join(attrs) for c, attrs in held.items() if len(attrs) > 1}
    taken = {a for c in joint for a in held[c]}
    lifts = np.array([[lift(table[a]["map"][c], table[a]["random"]) for a in names]
                      for c in range(n_chunks)])                     # (C, A)
    best = {}
    for c in range(n_chunks):
        if c in joint:
            continue
        ranked = np.sort(lifts[c])[::-1]
        runner_up = ranked[1] if len(ranked) > 1 else 0.0
        a = int(np.argmax(lifts[c]))
        if ranked[0] >= min_lift and ranked[0] - runner_up >= margin and names[a] not in taken:
            if names[a] not in best or lifts[c, a] > lifts[best[names[a]], a]:
                best[names[a]] = c
    return dict(sorted({**{c: a for a, c in best.items()}, **joint}.items()))


def hinge_bias(scores: np.ndarray, positive: np.ndarray) -> float:
    """The b minimising Σ max(0, 1 − c_i (s_i + b)), c = ±1; the midpoint of the minimising interval.

    The loss is convex and piecewise linear with kinks at u_i = 1 − s_i (positives) and
    v_j = −1 − s_j (negatives); its slope right of b is #{v ≤ b} − #{u > b}, an integer, so the
    first kink with slope >= 0 is found exactly; slope 0 there means a flat piece up to the next kink.
    """
    u = np.sort(1.0 - scores[positive])
    v = np.sort(-1.0 - scores[~positive])
    kinks = np.unique(np.concatenate([u, v]))
    slope = np.searchsorted(v, kinks, "right") - (len(u) - np.searchsorted(u, kinks, "right"))
    k = int(np.argmax(slope >= 0))
    return float(kinks[k]) if slope[k] > 0 else float((kinks[k] + kinks[k + 1]) / 2)


def standardise(fit: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets with the fit set's per-coordinate mean removed and variance scaled to one."""
    mean, std = fit.mean(0, dtype=np.float64), fit.std(0, dtype=np.float64)
    std[std == 0] = 1.0  # a constant coordinate stays 0 and does not vote
    mean, std = mean.astype(fit.dtype), std.astype(fit.dtype)  # no float64 copy of a float32 set
    return (fit - mean) / std, (test - mean) / std


def linear_probe(f: np.ndarray, fit_pos: np.ndarray, t: np.ndarray, test_pos: np.ndarray) -> dict:
    """sign(w·f + b) with w by Eq. 5 and b by hinge loss, on standardised features; accuracy,
    balanced accuracy and the majority-class accuracy (majority of the fit set) on the test rows."""
    w = (f[fit_pos].mean(0, dtype=np.float64) - f[~fit_pos].mean(0, dtype=np.float64)).astype(f.dtype)
    b = hinge_bias((f @ w).astype(np.float64), fit_pos)                    # Eq. 5
    predicted = t @ w + b >= 0
    tpr = predicted[test_pos].mean() if test_pos.any() else np.nan
    tnr = (~predicted[~test_pos]).mean() if (~test_pos).any() else np.nan
    majority = test_pos if fit_pos.mean() >= 0.5 else ~test_pos
    return {"accuracy": float((predicted == test_pos).mean()), "balanced": float(np.nanmean([tpr, tnr])),
            "majority": float(majority.mean())}


def probe(fit: np.ndarray, fit_pos: np.ndarray, test: np.ndarray, test_pos: np.ndarray) -> dict:
    """Table 3's classifier on raw features: standardise on the fit set, then linear_probe."""
    f, t = standardise(fit, test)
    return linear_probe(f, fit_pos, t, test_pos)


def _labels(idx: Index) -> tuple[np.ndarray, list[str | None], list[dict]]:
    """ids, splits and attribute dicts of every image, in id order (one query, no IN list)."""
    with Session(idx.engine) as s:
        rows = s.execute(select(Image.id, Image.split, Image.attributes).order_by(Image.id)).all()
    return (np.array([r[0] for r in rows], np.int64), [r[1] for r in rows],
            [r[2] or {} for r in rows])


def reconstruction_error(model, dataset, split: str | None = "val", batch: int = 500) -> tuple[float, int]:
    """The mean squared error of Dec(Enc(x)) against x over a split's images (every value, on the
    decoder's [-1, 1] scale), and how many images that is; split=None takes every image."""
    import torch

    rows = [i for i, r in enumerate(dataset.records) if split is None or r.split == split]
    if not rows:
        raise RetrievalError(f"no {split} images to measure the reconstruction error on")
    total, values = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(rows), batch):
                x = torch.stack([dataset[i] for i in rows[s:s + batch]])
                total += float(((model.decode(model.encode(x)) - x).double() ** 2).sum())
                values += x.numel()
    finally:
        model.train(was_training)
    return total / values, len(rows)


def default_split(idx: Index) -> str | None:
    """'val' when the index holds validation images, else None (every image)."""
    return "val" if idx.allowed({"split": "val"}).any() else None


def trained_variant(idx: Index) -> str | None:
    """The Table 2 variant the index's model was trained as (from its checkpoint)."""
    return checkpoint.load(idx.path / MODEL)["train_config"].get("variant")


def evaluate_index(idx: Index, split: str | None = None, *, whole: bool | None = None,
                   exclude: Sequence[str] | None = None, probe_chunks: bool = True,
                   progress: bool = False, queries: int | None = None) -> dict:
    """Table 2 and Table 3 on one split of an index, as a JSON-ready report.

    whole=None evaluates the full feature as one chunk when the model is the vanilla `ae`
    (as the paper does); exclude=None leaves out the format's EXCLUDED attributes; progress:
    a bar over Table 2's chunks (minutes on a 2-core machine for Sprites `val`); queries: Table 2
    from that many randomly drawn query images per attribute group instead of all (see map_table).
    """
    if queries is not None and queries < 1:
        raise RetrievalError(f"--queries {queries}: give at least 1 query image, or leave it out for all")
    t0 = time.perf_counter()
    ids, splits, attrs = _labels(idx)
    if not np.array_equal(ids, idx.ids):
        raise RetrievalError(f"{idx.path} changed while being read; run evaluate again")
    variant = trained_variant(idx)
    whole = variant == "ae" if whole is None else whole
    exclude = EXCLUDED.get(idx.manifest["dataset_format"], ()) if exclude is None else tuple(exclude)
    rows = np.array([split is None or s == split for s in splits])
    if rows.sum() < 2:
        found = sorted({s for s in splits if s}) or ["none"]
        raise RetrievalError(f"{idx.path} holds {rows.sum()} image(s) of split {split!r} (splits: "
                             f"{', '.join(found)}); pass --split with one of those")
    features = idx.features()
    if whole:
        features = features.reshape(len(features), 1, -1)            # (N, 1, C*d)
    names = [k for k in dict.fromkeys(k for i in np.flatnonzero(rows) for k in attrs[i]) if k not in exclude]
    codes = {a: encode([attrs[i].get(a) for i in np.flatnonzero(rows)]) for a in names}
    # no ranking to judge: a single value, or no value held by two images
    dropped = [a for a in names if len(np.unique(codes[a][codes[a] >= 0])) < 2
               or np.bincount(codes[a][codes[a] >= 0]).max() < 2]
    codes = {a: c for a, c in codes.items() if a not in dropped}
    if not codes:
        raise RetrievalError(f"no attribute with two or more values is labelled in split {split!r} "
                             f"of {idx.path}; evaluation needs labelled images")
    log.info("Table 2 on %d images x %d chunk(s) x %d attributes", rows.sum(), features.shape[1], len(codes))
    if queries is not None and queries >= rows.sum():
        queries = None  # as many as there are images: every image queries, and the report says so
    table = map_table(features[rows], codes, progress=progress, queries=queries)
    n_chunks = features.shape[1]
    best = {a: int(np.argmax(v["map"])) for a, v in table.items()}
    report = {
        "index": str(idx.path), "split": split, "images": int(rows.sum()), "variant": variant,
        "whole_feature": whole, "n_chunks": n_chunks, "sampled_queries": queries,
        "chunk_names": {} if whole else {c: n for c, n in idx.chunk_names().items() if n},
        # search chunks that join several learned ones (disentangle/grouping.py): which they join
        "chunk_groups": {} if whole else {c: g for c, g in enumerate(
            checkpoint.load(idx.path / MODEL).get("chunk_groups") or []) if len(g) > 1},
        "attributes": list(table), "excluded": sorted(set(exclude) | set(dropped)),
        "table2": table, "best": {a: {"chunk": c, "map": table[a]["map"][c]} for a, c in best.items()},
        "average": {"best": float(np.mean([table[a]["map"][c] for a, c in best.items()])),
                    "random": float(np.mean([v["random"] for v in table.values()]))},
        "suggestions": {} if whole else suggest_names(table, n_chunks),
        "separated": {} if whole else separated_factors(table, n_chunks),
        "suggestion_rule": {"margin": MARGIN, "min_lift": MIN_LIFT},
    }
    report["table3"] = _probe_report(features, splits, attrs, rows, split, table, best, probe_chunks)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _probe_report(features, splits, attrs, rows, split, table, best, probe_chunks) -> dict:
    """Table 3 for the binary attributes: fit on 'train' when the index holds it, else on the split."""
    fit_rows = np.array([s == "train" for s in splits])
    fit_split = "train" if split not in (None, "train") and fit_rows.sum() >= 2 else split
    fit_rows, test_rows = np.flatnonzero(fit_rows if fit_split == "train" else rows), np.flatnonzero(rows)
    binary = {}
    for a in table:
        values = sorted({attrs[i].get(a) for i in np.concatenate([fit_rows, test_rows])} - {None},
                        key=lambda v: (isinstance(v, str), v))
        labels = [np.array([attrs[i].get(a) for i in r], object) for r in (fit_rows, test_rows)]
        if len(values) == 2 and len({*labels[0]} - {None}) == 2:
            binary[a] = values[1], labels
    if not binary:
        return {"fit_split": fit_split, "attributes": {}, "average": {}}
    f, t = standardise(features[fit_rows].reshape(len(fit_rows), -1),
                       features[test_rows].reshape(len(test_rows), -1))
    d = features.shape[2]
    out = {}
    for a, (positive, (fit_v, test_v)) in binary.items():
        fk, tk = fit_v != None, test_v != None  # noqa: E711 (elementwise on an object array)
        fp, tp = fit_v[fk] == positive, test_v[tk] == positive
        out[a] = {"positive": positive, **linear_probe(f[fk], fp, t[tk], tp)}
        if probe_chunks and features.shape[1] > 1:  # standardising is per coordinate: slice columns
            cols = slice(best[a] * d, (best[a] + 1) * d)
            out[a]["best_chunk"] = best[a]
            out[a]["best_chunk_accuracy"] = linear_probe(f[fk][:, cols], fp, t[tk][:, cols], tp)["accuracy"]
    mean = {k: float(np.mean([v[k] for v in out.values()])) for k in ("accuracy", "balanced", "majority")}
    return {"fit_split": fit_split, "attributes": out, "average": mean}


def accept_suggestions(idx: Index, split: str | None = None) -> dict[int, str]:
    """Evaluate per chunk (default split) and store each suggested name on its chunk."""
    report = evaluate_index(idx, split or default_split(idx), whole=False, probe_chunks=False)
    for c, name in report["suggestions"].items():
        idx.name_chunk(c, name)
    return report["suggestions"]
