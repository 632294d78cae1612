"""`retrieval evaluate / ablate / chunks --accept-suggestions`: AP, the random row and the linear
probe against brute-force references, on hand-made rankings, random data and built indexes."""
import itertools
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disentangle import checkpoint
from disentangle.errors import RetrievalError
from disentangle.config import PRESETS, TrainConfig
from indexer import faiss_files
from indexer.build import build_index
from retrieval.evaluate import (hinge_bias, map_table, probe, query_ap, random_ap, separated_factors,
                                 suggest_names)
from retrieval.index import Index
from tests.test_cli import fails, ok
from tests.test_train import Squares


def _ap(relevance) -> float:
    """AP of one ranked list: the precision at each relevant position, averaged."""
    rel = np.asarray(relevance, bool)
    hits = np.cumsum(rel)
    return float(np.mean(hits[rel] / (np.flatnonzero(rel) + 1))) if rel.any() else np.nan


def _slow_query_ap(x, labels):
    """One query at a time: float32-rounded L2, ties by position, self left out."""
    x = np.asarray(x, np.float64)
    out = np.full(labels.shape, np.nan)
    for q in range(len(x)):
        d = ((x - x[q]) ** 2).sum(1).astype(np.float32)
        order = [i for i in np.lexsort((np.arange(len(x)), d)) if i != q]
        for a in range(labels.shape[1]):
            out[q, a] = _ap(labels[order, a] == labels[q, a])
    return out


def _brute_bias(s, pos):
    """Hinge loss at every kink; the midpoint of the minimising kinks."""
    c = np.where(pos, 1.0, -1.0)
    kinks = np.unique(np.concatenate([1 - s[pos], -1 - s[~pos]]))
    loss = np.maximum(0, 1 - c[None] * (s[None] + kinks[:, None])).sum(1)
    best = kinks[np.isclose(loss, loss.min(), rtol=0, atol=1e-9)]
    return (best.min() + best.max()) / 2, len(best)


def _probe_reference(fit, fit_pos, test, test_pos):
    fit, test = fit.astype(np.float64), test.astype(np.float64)
    mean, std = fit.mean(0), fit.std(0)
    f, t = (fit - mean) / std, (test - mean) / std
    w = f[fit_pos].mean(0) - f[~fit_pos].mean(0)
    b, _ = _brute_bias(f @ w, fit_pos)
    pred = t @ w + b >= 0
    majority = test_pos if fit_pos.sum() * 2 >= len(fit_pos) else ~test_pos
    return {"accuracy": np.mean(pred == test_pos), "majority": np.mean(majority),
            "balanced": (np.mean(pred[test_pos]) + np.mean(~pred[~test_pos])) / 2}


# -- the protocols on arrays -------------------------------------------------------------------

def test_ap_of_hand_made_rankings():
    x = np.array([[0.0], [1.0], [3.0], [1.0], [6.0]])
    labels = np.array([[0, 5], [0, 6], [1, 5], [0, 6], [1, 7]])
    for block in (1, 5, 100):
        ap = query_ap(x, labels, block=block)
        # query 0 ranks 1, 3 (tied at 1: by id), 2, 4
        assert ap[0, 0] == pytest.approx((1 / 1 + 2 / 2) / 2)      # relevant: 1, 3
        assert ap[0, 1] == pytest.approx(1 / 3)                    # relevant: 2
        # query 2 ranks 1, 3 (tied at distance 2: by id), then 0 and 4 (tied at 3: by id)
        assert ap[2, 0] == pytest.approx(1 / 4)                    # relevant: 4
        assert ap[2, 1] == pytest.approx(1 / 3)                    # relevant: 0
        # query 3 ranks 1 (distance 0), 0, 2, 4
        assert ap[3, 1] == pytest.approx(1 / 1)                    # relevant: 1
        assert np.isnan(ap[4, 1])                                  # value 7 appears once


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
def test_vectorised_ap_equals_one_query_at_a_time(seed, integer, workers):
    rng = np.random.default_rng(seed)
    n = 157
    x = rng.integers(0, 3, (n, 2)).astype(np.float32) if integer else rng.normal(size=(n, 3))
    labels = np.stack([rng.integers(0, k, n) for k in (2, 5, 40)], axis=1)
    labels[7, 2] = 99  # a value seen once: that query has no AP
    # 27 blocks of 6 queries, on one thread or three side by side
    np.testing.assert_allclose(query_ap(x, labels, block=n * 6, workers=workers), _slow_query_ap(x, labels),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_chosen_queries_rank_every_row_as_when_all_query(workers):
    rng = np.random.default_rng(4)
    n = 120
    x = rng.normal(size=(n, 4))
    labels = np.stack([rng.integers(0, k, n) for k in (3, 30)], axis=1)
    asked = np.array([0, 5, 6, 59, 119])                            # first, last, neighbours
    np.testing.assert_allclose(query_ap(x, labels, block=n * 2, workers=workers, queries=asked),
                               _slow_query_ap(x, labels)[asked], rtol=1e-12, atol=0)


def test_map_table_from_drawn_queries():
    rng = np.random.default_rng(5)
    n = 200
    x = rng.normal(size=(n, 2, 3))
    labels = {"a": rng.integers(0, 4, n), "b": rng.integers(0, 3, n)}
    labels["b"][:50] = -1                                           # a second group: b's own draw
    table = map_table(x, labels, queries=40, seed=7)
    draw = np.random.default_rng(7)                                 # the documented draw, group by group
    for name, code in labels.items():
        keep = code >= 0
        asked = np.sort(draw.choice(keep.sum(), 40, replace=False))
        for c in range(2):
            ref = _slow_query_ap(x[keep, c], code[keep, None])[asked, 0]   # every labelled row a candidate
            assert table[name]["map"][c] == pytest.approx(np.nanmean(ref), abs=1e-12)
        counts = np.bincount(code[keep])[code[keep][asked]] - 1
        assert table[name]["random"] == pytest.approx(random_ap(counts, keep.sum() - 1).mean())
        assert table[name]["queries"] + table[name]["skipped"] == 40
    assert map_table(x, labels, queries=n) == map_table(x, labels)  # as many as there are: all


@pytest.mark.parametrize("m", range(1, 8))
def test_random_ap_is_the_mean_over_every_ranking(m):
    for r in range(1, m + 1):
        # every set of relevant positions is equally likely under a uniform permutation
        brute = np.mean([_ap(np.isin(np.arange(m), pos)) for pos in itertools.combinations(range(m), r)])
        assert random_ap(np.array([r]), m)[0] == pytest.approx(brute, abs=1e-12)
    harmonic = np.sum(1 / np.arange(1, m + 1))
    np.testing.assert_allclose(random_ap(np.array([1, m]), m), [harmonic / m, 1.0])
    assert np.isnan(random_ap(np.array([0]), m)[0])


def test_random_ap_matches_monte_carlo():
    rng = np.random.default_rng(0)
    m, r = 60, 9
    rel = np.argsort(rng.random((20000, m)), axis=1) < r           # (trials, m), r relevant each
    hits = np.cumsum(rel, axis=1)
    aps = (hits * rel / np.arange(1, m + 1)).sum(1) / r
    assert abs(aps.mean() - random_ap(np.array([r]), m)[0]) < 4 * aps.std() / np.sqrt(len(aps))


def test_map_table_on_labelled_subsets():
    rng = np.random.default_rng(3)
    n = 90
    x = rng.normal(size=(n, 3, 2))
    labels = {"a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n)}
    labels["b"][:30] = -1                                           # unlabelled: left out of b
    table = map_table(x, labels)
    for name, code in labels.items():
        keep = code >= 0
        for c in range(3):
            ref = _slow_query_ap(x[keep, c], code[keep, None])[:, 0]
            assert table[name]["map"][c] == pytest.approx(np.nanmean(ref), abs=1e-12)
        counts = np.bincount(code[keep])[code[keep]] - 1
        assert table[name]["random"] == pytest.approx(random_ap(counts, keep.sum() - 1).mean())
        assert table[name]["queries"] == keep.sum()


def test_suggested_names_need_a_margin_and_go_to_the_best_chunk():
    table = {"shape": {"map": [0.9, 0.6, 0.30, 0.5], "random": 0.25},
             "colour": {"map": [0.2, 0.55, 0.25, 0.2], "random": 0.2}}
    # lifts: chunk 0 shape .87 / colour 0 -> shape; chunk 1 .47 / .44 -> too close;
    # chunk 2 .07 / .06 -> too weak; chunk 3 shape .33 / 0 but chunk 0 holds shape
    assert suggest_names(table, 4) == {0: "shape"}


def test_a_chunk_holding_several_factors_alone_is_named_after_all_of_them():
    table = {"colour": {"map": [0.9, 0.3, 0.3, 0.25], "random": 0.2},
             "x": {"map": [0.3, 0.7, 0.3, 0.45], "random": 0.25},   # chunk 1 alone (lift .60 vs .27)
             "y": {"map": [0.3, 0.72, 0.3, 0.3], "random": 0.25},   # chunk 1 alone
             "scale": {"map": [0.3, 0.3, 0.3, 0.3], "random": 0.25}}
    # chunk 3 retrieves x best by the single-attribute rule (lift .27 vs .07), but x belongs to
    # chunk 1, which holds x and y alone and so is named after both
    assert suggest_names(table, 4) == {0: "colour", 1: "x and y"}
    with_one = {a: table[a] for a in ("colour", "x", "scale")}
    assert suggest_names(with_one, 4) == {0: "colour", 1: "x"}


def test_separated_factors_need_one_chunk_clearly_ahead_of_the_others():
    table = {"shape": {"map": [0.9, 0.6, 0.30, 0.5], "random": 0.25},    # lifts .87 vs .47: apart
             "colour": {"map": [0.2, 0.55, 0.50, 0.2], "random": 0.2},   # .44 vs .38: two chunks
             "x": {"map": [0.2, 0.2, 0.21, 0.26], "random": 0.2},        # .075: too close to random
             "y": {"map": [0.2, 0.2, 0.21, 0.40], "random": 0.2}}        # .25 vs .0125: apart
    got = separated_factors(table, 4)
    assert list(got) == ["shape", "y"]
    assert got["shape"] == {"chunk": 0, "map": 0.9, "runner_up": 1, "runner_up_map": 0.6, "random": 0.25}
    assert got["y"]["chunk"] == 3 and got["y"]["runner_up"] == 2
    assert separated_factors(table, 1) == {}  # one chunk: nothing to be ahead of


@pytest.mark.parametrize("seed", range(40))
def test_hinge_bias_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 4 + seed % 9
    s = rng.normal(size=n).round(1)  # rounding makes flat minima and repeated kinks common
    pos = rng.random(n) < 0.6
    pos[0], pos[1] = True, False
    assert hinge_bias(s, pos) == pytest.approx(_brute_bias(s, pos)[0], abs=1e-12)


def test_hinge_bias_takes_the_middle_of_a_flat_minimum():
    s, pos = np.array([0.0, 1.0]), np.array([True, False])
    # loss: kinks at u = 1 and v = -2; flat (= 3) between them
    assert _brute_bias(s, pos) == (-0.5, 2)
    assert hinge_bias(s, pos) == -0.5


@pytest.mark.parametrize("seed", range(5))
def test_probe_equals_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    d = 6
    shift = 3 * rng.normal(size=d)  # a clear signal, so the probe must beat the majority guess
    fit_pos, test_pos = rng.random(300) < 0.3, rng.random(120) < 0.3
    fit = rng.normal(size=(300, d)) * rng.uniform(0.5, 3, d) + np.outer(fit_pos, shift)
    test = rng.normal(size=(120, d)) * rng.uniform(0.5, 3, d) + np.outer(test_pos, shift)
    got, ref = probe(fit, fit_pos, test, test_pos), _probe_reference(fit, fit_pos, test, test_pos)
    assert got == pytest.approx(ref, abs=1e-12)
    assert got["accuracy"] > got["majority"]


# -- on built indexes ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    """The session's tiny checkpoint (tests/conftest.py)."""
    return tiny_model


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, model) -> Path:
    """A shapes index whose chunk 0 is one-hot shape, chunk 1 one-hot background, the rest
    noise; plus a binary attribute 'big' (scale >= 2) for the probe and a unique 'uid'."""
    out = tmp_path_factory.mktemp("idx") / "shapes"
    build_index("shapes:600", model, out)
    db = sqlite3.connect(out / "meta.sqlite")
    with db:
        db.execute("update images set attributes = json_set(attributes, '$.big', "
                   "json_extract(attributes, '$.scale') >= 2, '$.uid', id)")
    rows = db.execute("select id, attributes from images order by id").fetchall()
    db.close()
    attrs = [json.loads(a) for _, a in rows]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(rows), 8, 4)).astype(np.float32)
    feats[:, 0] = np.eye(4)[[a["shape"] for a in attrs]]
    feats[:, 1] = np.eye(4)[[a["background"] for a in attrs]]
    ids = np.array([i for i, _ in rows], np.int64)
    for c in range(8):
        index = faiss_files.new_index(4)
        index.add_with_ids(np.ascontiguousarray(feats[:, c]), ids)
        faiss_files.write_atomic(index, faiss_files.chunk_path(out, c))
    return out


def _copy(index: Path, tmp_path: Path) -> Path:
    shutil.copytree(index, tmp_path / "idx")
    return tmp_path / "idx"


def test_evaluate_an_index(crafted, tmp_path):
    report = json.loads(ok("evaluate", crafted, "--json", "--out", tmp_path / "rep").stdout)
    assert report["split"] == "val" and report["images"] == 60 and not report["whole_feature"]
    assert report["attributes"] == ["shape", "colour", "background", "scale", "rotation", "x", "y", "big"]
    assert report["excluded"] == ["uid"]                            # no value held by two images
    t = report["table2"]
    assert t["shape"]["map"][0] == 1.0 and t["background"]["map"][1] == 1.0
    assert report["best"]["shape"] == {"chunk": 0, "map": 1.0}
    assert report["suggestions"] == {"0": "shape", "1": "background"}

    idx = Index(crafted)
    val = idx.allowed({"split": "val"})
    feats = idx.features()[val]
    attrs = [r["attributes"] for r in idx.records(idx.ids[val])]
    for name in report["attributes"]:
        codes = np.unique([a[name] for a in attrs], return_inverse=True)[1][:, None]
        for c in range(8):
            assert t[name]["map"][c] == pytest.approx(np.nanmean(_slow_query_ap(feats[:, c], codes)), abs=1e-12)
        counts = np.bincount(codes[:, 0])[codes[:, 0]] - 1
        assert t[name]["random"] == pytest.approx(random_ap(counts[counts > 0], 59).mean())

    # Table 3: the binary 'big' only, fit on train, tested on val
    assert report["table3"]["fit_split"] == "train" and list(report["table3"]["attributes"]) == ["big"]
    train = idx.allowed({"split": "train"})
    big = lambda rows: np.array([r["attributes"]["big"] == 1 for r in idx.records(idx.ids[rows])])  # noqa: E731
    flat = idx.features().reshape(len(idx), -1)
    ref = _probe_reference(flat[train], big(train), flat[val], big(val))
    got = report["table3"]["attributes"]["big"]
    assert {k: got[k] for k in ref} == pytest.approx(ref, abs=1e-12)

    written = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert written["table2"] == report["table2"]
    assert "Nearest-neighbour mAP" in (tmp_path / "rep" / "report.md").read_text()
    with Image.open(tmp_path / "rep" / "heatmap.png") as im:
        assert im.size[0] > 8 * 40 and im.size[1] > 8 * 20

    text = ok("evaluate", crafted, "--split", "train").output
    assert "| chunk 0 | 1.000* |" in text and "Random" in text and "suggested names: 0=shape, 1=background" in text
    assert json.loads(ok("evaluate", crafted, "--whole", "--json").stdout)["n_chunks"] == 1
    drawn = json.loads(ok("evaluate", crafted, "--queries", "50", "--json").stdout)
    assert drawn["sampled_queries"] == 50 and all(t["queries"] + t["skipped"] == 50 for t in drawn["table2"].values())
    every = json.loads(ok("evaluate", crafted, "--queries", "100000", "--json").stdout)   # more than there are
    assert every["sampled_queries"] is None and every["table2"] == report["table2"]


def test_accept_suggestions_names_the_chunks(crafted, tmp_path):
    idx = _copy(crafted, tmp_path)
    out = ok("chunks", idx, "--accept-suggestions").output
    assert "0  shape" in out and "1  background" in out
    assert Index(idx).chunk_names() == {0: "shape", 1: "background", **{c: None for c in range(2, 8)}}
    ok("search", idx, "--image", "shape_000007", "--chunks", "shape", "-k", "3")


def test_evaluate_errors(crafted, tmp_path):
    fails("evaluate", tmp_path, match="not an index")
    fails("evaluate", crafted, "--split", "nope", match="split 'nope'")


def test_an_ae_model_is_evaluated_as_one_chunk(tmp_path):
    from disentangle.train import train

    train(Squares(), PRESETS["tiny"], TrainConfig(steps=2, batch_size=4, variant="ae", figure_every=1000),
          tmp_path / "run")
    build_index("shapes:200", tmp_path / "run" / "checkpoint.pt", tmp_path / "idx")
    report = json.loads(ok("evaluate", tmp_path / "idx", "--json").stdout)
    assert report["variant"] == "ae" and report["whole_feature"] and report["n_chunks"] == 1
    assert report["suggestions"] == {}
    assert json.loads(ok("evaluate", tmp_path / "idx", "--per-chunk", "--json").stdout)["n_chunks"] == 8


def test_ablate_end_to_end_and_resume(tmp_path):
    args = ["ablate", "shapes:300", "--preset", "tiny", "--variants", "ae,mix+c+g", "--steps", 2,
            "--batch-size", 4, "--out", tmp_path / "abl"]
    first = _table(ok(*args).stdout)
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(result["variants"]) == ["ae", "mix+c+g"] and result["steps"] == 2
    assert result["variants"]["ae"]["whole_feature"] and not result["variants"]["mix+c+g"]["whole_feature"]
    report = json.loads((tmp_path / "abl" / "mix+c+g" / "report.json").read_text())
    assert result["variants"]["mix+c+g"]["average"] == report["average"]["best"]
    assert result["random"] == {a: report["table2"][a]["random"] for a in report["attributes"]}
    assert checkpoint.load(tmp_path / "abl" / "ae" / "run" / "checkpoint.pt")["train_config"]["variant"] == "ae"
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert all(f"| {row} |" in md for row in ("Random", "AE", "MIX+C+G"))

    stamp = (tmp_path / "abl" / "ae" / "run" / "checkpoint.pt").stat().st_mtime_ns
    assert _table(ok(*args).stdout) == first                        # reused, not retrained
    assert (tmp_path / "abl" / "ae" / "run" / "checkpoint.pt").stat().st_mtime_ns == stamp
    fails(*args, "--seed", 1, match="choose another --out")
    fails("ablate", "shapes:300", "--variants", "ae,vae", "--steps", 2, "--out", tmp_path / "x",
          match="choose from")


def test_ablate_with_an_equal_time_budget(tmp_path):
    args = ["ablate", "shapes:300", "--preset", "tiny", "--variants", "ae,mix+c+g", "--minutes", 0.04,
            "--batch-size", 4, "--out", tmp_path / "abl"]
    first = _table(ok(*args).stdout)
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    for variant in ("ae", "mix+c+g"):
        ckpt = checkpoint.load(tmp_path / "abl" / variant / "run" / "checkpoint.pt")
        assert ckpt["train_seconds"] >= 2.4 and ckpt["train_config"]["minutes"] == 0.04
        assert result["variants"][variant]["steps"] == ckpt["step"] > 0
    # the plain autoencoder is cheaper per step, so the same minutes buy it more steps
    assert result["variants"]["ae"]["steps"] > result["variants"]["mix+c+g"]["steps"]
    assert "| steps |" in (tmp_path / "abl" / "ablation.md").read_text()
    assert _table(ok(*args).stdout) == first                        # reused, not retrained
    fails("ablate", "shapes:300", "--preset", "tiny", "--variants", "ae", "--out", tmp_path / "x",
          match="--minutes")


def test_reconstruction_error_against_numpy(tmp_path):
    from disentangle.data import open_dataset
    from disentangle.model import MixingAutoencoder
    from retrieval.evaluate import reconstruction_error

    model = MixingAutoencoder(PRESETS["tiny"]).train()
    ds = open_dataset("shapes:120", size=PRESETS["tiny"].image_size)
    for split in ("val", None):
        rows = [i for i, r in enumerate(ds.records) if split is None or r.split == split]
        x = np.stack([ds[i].numpy() for i in rows]).astype(np.float64)
        with torch.no_grad():
            y = model.eval().decode(model.encode(torch.from_numpy(x).float())).numpy()
        model.train()
        mse, n = reconstruction_error(model, ds, split, batch=7)  # several batches, one short
        assert n == len(rows) and mse == pytest.approx(np.mean((y - x) ** 2), rel=1e-6)
        assert model.training  # the caller's mode is given back
    with pytest.raises(RetrievalError, match="no holdout images"):
        reconstruction_error(model, ds, "holdout")


def test_an_ablation_budget_replaces_the_recipes():
    from disentangle.config import RECIPES
    from retrieval.ablate import training_config

    recipe = RECIPES["sprites-cpu"]
    assert recipe["minutes"] > 0  # the recipe's own budget is a time, which an ablation must not inherit
    by_steps = training_config("sprites-cpu", "mix", 100, 0, batch_size=None, seed=3)
    assert (by_steps.steps, by_steps.minutes, by_steps.seed) == (100, 0, 3)
    by_time = training_config("sprites-cpu", "ae", None, 20, batch_size=8, seed=0)
    assert by_time.minutes == 20 and by_time.steps >= 1 << 40 and by_time.batch_size == 8
    both = training_config("sprites-cpu", "mix+c+g", 50, 2.5, batch_size=None, seed=0)
    assert (both.steps, both.minutes) == (50, 2.5)
    assert (by_steps.lr, by_steps.mask) == (recipe["lr"], recipe["mask"])  # the rest is the recipe's


def _table(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("|")]
