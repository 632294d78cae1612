"""Mixing/unmixing semantics (paper §3.1 steps 1-6) and the losses."""
import math

import pytest
import torch

from disentangle import losses
from disentangle.config import PRESETS
from disentangle.model import MixingAutoencoder, mix


def test_mix_takes_chunks_by_mask():
    f1 = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    f2 = -f1
    m = torch.tensor([1, 0, 0, 1]).bool()
    out = mix(f1, f2, m)
    for c in range(4):
        assert torch.equal(out[:, c], f1[:, c] if m[c] else f2[:, c])


def test_per_sample_mask():
    f1, f2 = torch.ones(2, 3, 2), torch.zeros(2, 3, 2)
    m = torch.tensor([[1, 0, 1], [0, 1, 0]]).bool()
    assert torch.equal(mix(f1, f2, m)[..., 0], m.float())


def test_all_ones_mask_is_a_double_reconstruction():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = MixingAutoencoder(cfg).eval()
    x1, x2 = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    ones = torch.ones(cfg.n_chunks, dtype=torch.bool)
    with torch.no_grad():
        out = model(x1, x2, ones)
        rec = model.decode(model.encode(x1))
        twice = model.decode(model.encode(rec))
    torch.testing.assert_close(out["x3"], rec)
    torch.testing.assert_close(out["x4"], twice)


def test_all_zeros_mask_decodes_the_second_image_then_returns_the_first():
    torch.manual_seed(1)
    model = MixingAutoencoder(PRESETS["tiny"]).eval()
    x1, x2 = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    zeros = torch.zeros(8, dtype=torch.bool)
    with torch.no_grad():
        out = model(x1, x2, zeros)
        torch.testing.assert_close(out["x3"], model.decode(model.encode(x2)))
        # unmixing with m = 0 takes every chunk from f1
        torch.testing.assert_close(out["x4"], model.decode(model.encode(x1)))


def test_variants_build_only_what_they_train():
    cfg = PRESETS["tiny"]
    assert MixingAutoencoder(cfg, ("mix",)).classifier is None
    out = MixingAutoencoder(cfg, ("rec",))(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16),
                                            torch.ones(8).bool())
    assert set(out) == {"rec"}


def test_classifier_loss_matches_fixed_eq3():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    m = torch.tensor([1, 0, 1]).bool()
    y = torch.sigmoid(logits)[0]
    expected = -sum(math.log(y[i]) if m[i] else math.log(1 - y[i]) for i in range(3)) / 3
    assert losses.classifier_loss(logits, m).item() == pytest.approx(expected, rel=1e-6)


def test_began_k_is_clipped():
    assert losses.began_k_update(0.0, 0.1, 1.0, 0.5) == 0.0
    assert losses.began_k_update(1.0, 10.0, 0.0, 0.5) == 1.0
    assert losses.began_k_update(0.5, 1.0, 0.2, 0.5) == pytest.approx(0.5 + 1e-3 * 0.3)
