"""Dependent chunks searched as one (disentangle/grouping.py): the dependence measure against a
float64 reference, the grouping rule on planted structure, and the regrouped networks against the
learned ones, through training, the checkpoint, the index and `retrieval group`."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from disentangle import checkpoint, grouping
from disentangle.config import PRESETS, TrainConfig
from disentangle.data import open_dataset
from disentangle.errors import RetrievalError
from disentangle.model import MixingAutoencoder, mix
from disentangle.train import train
from retrieval.index import Index
from tests.test_cli import fails, ok
from tests.test_train import Squares


def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kernel CKA by its definition: tr(HKH HLH) / (|HKH| |HLH|), H = I - 11'/n, in float64."""
    def kernel(z):
        d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / np.median(d2[d2 > 0]))
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ kernel(x) @ h, h @ kernel(y) @ h
    return float(np.trace(k @ l) / (np.linalg.norm(k) * np.linalg.norm(l)))


def _planted(n: int = 400, seed: int = 0) -> np.ndarray:
    """Chunks 0, 2 and 5 read one latent (nonlinearly), 1 and 4 another, 3 and 6 are independent
    noise, 7 is constant: (n, 8, 3)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    f = rng.normal(size=(n, 8, 3)) * 0.05
    f[:, 0, :2] += a
    f[:, 2, :2] += np.tanh(a[:, ::-1] * 2)
    f[:, 5, :2] += a ** 2
    f[:, 1, :2] += b
    f[:, 4, :2] += np.sin(b)
    f[:, 3] = rng.normal(size=(n, 3))
    f[:, 6] = rng.normal(size=(n, 3))
    f[:, 7] = 0.5
    return f


def test_dependence_is_kernel_cka_and_zero_for_a_constant_chunk():
    f = _planted(n=120)
    dep = grouping.dependence(f)
    assert np.allclose(dep, dep.T) and np.allclose(np.diag(dep), 1.0)
    for i in range(7):
        for j in range(7):
            if i != j:
                assert dep[i, j] == pytest.approx(_cka_reference(f[:, i], f[:, j]), abs=1e-4)  # kernels kept in float32
    assert (dep[7, :7] == 0).all()
    assert dep[0, 2] > 0.3 and dep[1, 4] > 0.3 and dep[0, 1] < 0.1 and dep[3, 6] < 0.1


def test_groups_gather_the_chunks_that_share_a_latent():
    groups = grouping.find_groups(grouping.dependence(_planted()), ratio=2.5)
    assert groups == [[0, 2, 5], [1, 4], [3], [6], [7]]
    assert grouping.find_groups(np.eye(2), 2.5) == [[0], [1]]


def test_a_high_ratio_keeps_every_chunk_alone():
    assert grouping.find_groups(grouping.dependence(_planted()), ratio=1e6) == [[c] for c in range(8)]


# a decoder that opens with a spatial broadcast: its first convolution also reads two coordinates
BROADCAST = replace(PRESETS["tiny"], name="tiny-broadcast", decoder="b4-c8k3-d8k4s2-d3k2s2")
# ... and with template channels, a dense layer of the feature laid out as a map
TEMPLATES = replace(PRESETS["tiny"], name="tiny-templates", decoder="b4t3-c8k3-d8k4s2-d3k2s2")
# ... and with the warp, whose head reads the feature too
WARP = replace(PRESETS["tiny"], name="tiny-warp", decoder="d16k4-w-d8k4s2-d3k2s2-w")
# ... and with the warp whose four heads read chunks 0 to 3, wherever grouping moves them
CHUNK_WARP = replace(PRESETS["tiny"], name="tiny-chunk-warp", decoder="d16k4-wc-d8k4s2-d3k2s2")


def _random_model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {c.name: c for c in (BROADCAST, TEMPLATES, WARP, CHUNK_WARP)}.get(preset) or PRESETS[preset]
    model = MixingAutoencoder(cfg).eval()
    # a new head maps every feature to the identity: give it weights that read it
    warp = model.decoder.warp
    for head in [] if warp is None else getattr(warp, "heads", None) or [warp.head]:
        torch.nn.init.normal_(head[2].weight, std=0.1)
    return model, cfg


@pytest.mark.parametrize("preset", ["tiny", "sprites-cpu", BROADCAST.name, TEMPLATES.name, WARP.name,
                                    CHUNK_WARP.name])
def test_regrouped_networks_compute_the_same_images(preset):
    model, cfg = _random_model(preset)
    n = cfg.n_chunks
    groups = sorted([[0, n - 1, 2], [1, 3]] + [[c] for c in range(4, n - 1)], key=lambda g: g[0])
    grouped, gcfg = grouping.regroup(model, cfg, groups)
    widest = 3 * cfg.chunk_dim
    assert (gcfg.n_chunks, gcfg.chunk_dim, gcfg.chunk_groups) == (len(groups), widest, tuple(map(tuple, groups)))
    x = torch.rand(5, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        f, g = model.encode(x), grouped.encode(x)
        for k, members in enumerate(groups):                    # each group: its members in order, then 0
            used = len(members) * cfg.chunk_dim
            torch.testing.assert_close(g[:, k, :used], f[:, members].flatten(1), rtol=0, atol=0)
            assert (g[:, k, used:] == 0).all()
        # float32 sums in another order (a broadcast decoder's first convolution reads more zeros)
        torch.testing.assert_close(grouped.decode(g), model.decode(f), rtol=0, atol=1e-5)
        # swapping a search chunk swaps its whole group of learned chunks
        other_f, other_g = f.roll(1, 0), g.roll(1, 0)
        learned = torch.zeros(n, dtype=torch.bool)
        learned[groups[0]] = True
        searched = torch.zeros(len(groups), dtype=torch.bool)
        searched[0] = True
        torch.testing.assert_close(grouped.decode(mix(g, other_g, searched)),
                                   model.decode(mix(f, other_f, learned)), rtol=0, atol=1e-5)


def test_groups_must_cover_each_chunk_once():
    model, cfg = _random_model("tiny")
    for bad in ([[0, 1], [1, 2, 3, 4, 5, 6, 7]], [[0, 1, 2]]):
        with pytest.raises(RetrievalError, match="each of the 8 chunks once"):
            grouping.regroup(model, cfg, bad)


def test_training_writes_groups_that_the_checkpoint_serves(tmp_path):
    cfg = replace(PRESETS["tiny"], group_ratio=1e-9)   # any dependence joins: one group of all
    tc = TrainConfig(steps=4, batch_size=4, log_every=1, figure_every=1000)
    train(Squares(64), cfg, tc, tmp_path)
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    assert ckpt["chunk_groups"] == [list(range(8))]
    model, served, _ = checkpoint.load_model(tmp_path / "checkpoint.pt")
    assert (served.n_chunks, served.chunk_dim, served.chunk_groups) == (1, 32, (tuple(range(8)),))
    learned = MixingAutoencoder(cfg, tc.losses)
    learned.load_state_dict(ckpt["models"]["autoencoder"])
    x = Squares(6).x
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[:, 0], learned.eval().encode(x).flatten(1), rtol=0, atol=0)
    # off (the default): no groups written, the learned chunks are served
    train(Squares(64), PRESETS["tiny"], tc, tmp_path / "plain")
    assert "chunk_groups" not in checkpoint.load(tmp_path / "plain" / "checkpoint.pt")
    assert checkpoint.load_model(tmp_path / "plain" / "checkpoint.pt")[1] == PRESETS["tiny"]


def test_group_command_writes_removes_and_the_index_follows(tmp_path):
    run = tmp_path / "run" / "checkpoint.pt"
    ok("train", "shapes:200", "--out", tmp_path / "run", "--steps", 2, "--preset", "tiny", "--batch-size", 4)
    ok("index", "shapes:200", "--model", run, "--out", tmp_path / "idx")
    out = ok("group", run, "shapes:200", "--ratio", 1e-9).output
    assert "8 learned chunks, 1 search chunks; searched together: 0+1+2+3+4+5+6+7" in out
    assert checkpoint.load(run)["chunk_groups"] == [list(range(8))]
    fails("index", "shapes:200", "--model", run, "--out", tmp_path / "idx", match="--rebuild")
    ok("index", "shapes:200", "--model", run, "--out", tmp_path / "idx", "--rebuild")
    idx = Index(tmp_path / "idx")
    assert (idx.n_chunks, idx.chunk_dim) == (1, 32)
    ok("search", tmp_path / "idx", "--image", int(idx.ids[0]), "--chunks", "0")
    # an outside query image goes through the index's own copy of the model: grouped too
    ds = open_dataset("shapes:200", size=16)
    query = idx.query_for_pixels(ds.image(5).copy())
    assert query.vector.shape == (1, 32)
    stored = idx.features()[np.searchsorted(idx.ids, idx.resolve(ds.records[5].key))]
    np.testing.assert_allclose(query.vector, stored, atol=1e-5)
    fails("search", tmp_path / "idx", "--image", int(idx.ids[0]), "--chunks", "1", match="0..0")
    ok("group", run, "shapes:200", "--ratio", 0)
    assert "chunk_groups" not in checkpoint.load(run)
    assert checkpoint.load_model(run)[1].n_chunks == 8
    fails("group", run, "shapes:200", "--ratio", -1, match="--ratio -1")


def test_an_index_whose_model_copy_lost_its_groups_asks_for_a_rebuild(tmp_path):
    run = tmp_path / "run" / "checkpoint.pt"
    ok("train", "shapes:200", "--out", tmp_path / "run", "--steps", 2, "--preset", "tiny", "--batch-size", 4)
    ok("group", run, "shapes:200", "--ratio", 1e-9)
    ok("index", "shapes:200", "--model", run, "--out", tmp_path / "idx")
    served = checkpoint.load(tmp_path / "idx" / "model.pt")
    served.pop("chunk_groups")                       # as an index built before they were carried
    checkpoint.save_atomic(served, tmp_path / "idx" / "model.pt")
    pixels = open_dataset("shapes:200", size=16).image(5).copy()
    with pytest.raises(RetrievalError, match="8 chunks x 4, but the index stores 1 x 32; rebuild"):
        Index(tmp_path / "idx").query_for_pixels(pixels)
