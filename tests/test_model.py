"""Mixing/unmixing semantics (paper §3.1 steps 1-6) and the losses."""
import math
from dataclasses import replace

import pytest
import torch

from disentangle import architecture, losses
from disentangle.config import PRESETS
from disentangle.model import ChunkWarp, MixingAutoencoder, mix


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


def test_pair_reconstruction_adds_lambda_rec_times_both_errors():
    """λ_rec > 0 on a mixing variant: the total gains λ_rec · mean(‖Dec(Enc(x))−x‖²) over x1 and x2,
    checked against a float64 recomputation from the encoder and decoder."""
    from disentangle.config import TrainConfig
    from disentangle.step import MixingTrainer

    torch.manual_seed(2)
    cfg = replace(PRESETS["tiny"], lambda_rec=3.0, lambda_m=0.5)
    trainer = MixingTrainer(cfg, TrainConfig(variant="mix"), torch.device("cpu"))
    x1, x2 = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]).bool()
    values, _ = trainer._generator_losses(x1, x2, mask)
    ae = trainer.ae.double()
    with torch.no_grad():
        x = torch.cat([x1, x2]).double()
        rec = ((ae.decode(ae.encode(x)) - x) ** 2).mean().item()
        f1, f2 = ae.encode(x1.double()), ae.encode(x2.double())
        f3 = ae.encode(ae.decode(mix(f1, f2, mask)))
        mixing = ((ae.decode(mix(f3, f1, mask)) - x1.double()) ** 2).mean().item()
    assert values["loss_rec"].item() == pytest.approx(rec, rel=1e-4)
    assert values["loss_total"].item() == pytest.approx(0.5 * mixing + 3.0 * rec, rel=1e-4)
    # λ_rec = 0 (the paper's Eq. 4) computes no direct reconstruction at all
    plain = MixingTrainer(PRESETS["tiny"], TrainConfig(variant="mix"), torch.device("cpu"))
    assert "loss_rec" not in plain._generator_losses(x1, x2, mask)[0]


def test_latent_cycle_adds_lambda_feat_times_the_normalised_feature_error():
    """λ_feat > 0: the total gains λ_feat · mean‖Enc(x3) − mix(f1, f2)‖² / mean var(f), checked
    against a float64 recomputation; the paper's presets compute no such term."""
    from disentangle.config import TrainConfig
    from disentangle.step import MixingTrainer

    torch.manual_seed(4)
    cfg = replace(PRESETS["tiny"], lambda_feat=2.0, lambda_m=0.5)
    trainer = MixingTrainer(cfg, TrainConfig(variant="mix"), torch.device("cpu"))
    x1, x2 = torch.rand(6, 3, 16, 16) * 2 - 1, torch.rand(6, 3, 16, 16) * 2 - 1
    mask = torch.randint(0, 2, (6, 8)).bool()
    values, _ = trainer._generator_losses(x1, x2, mask)
    ae = trainer.ae.double()
    with torch.no_grad():
        f1, f2 = ae.encode(x1.double()), ae.encode(x2.double())
        target = mix(f1, f2, mask)
        f3 = ae.encode(ae.decode(target))
        mixing = ((ae.decode(mix(f3, f1, mask)) - x1.double()) ** 2).mean().item()
        f = torch.cat([f1, f2]).flatten(1).numpy()
        feat = ((f3 - target) ** 2).mean().item() / f.var(0, ddof=1).mean()
    assert values["loss_feat"].item() == pytest.approx(feat, rel=1e-4)
    assert values["loss_total"].item() == pytest.approx(0.5 * mixing + 2.0 * feat, rel=1e-4)
    plain = MixingTrainer(PRESETS["tiny"], TrainConfig(variant="mix"), torch.device("cpu"))
    assert "loss_feat" not in plain._generator_losses(x1, x2, mask)[0]


def _cross_chunk_correlation_reference(f: torch.Tensor) -> float:
    """The mean squared float64 corrcoef between columns of different chunks of f (B, chunks, dim)."""
    import numpy as np

    corr = np.corrcoef(f.double().flatten(1).numpy(), rowvar=False)
    chunk = np.repeat(np.arange(f.shape[1]), f.shape[2])
    return (corr[chunk[:, None] != chunk[None, :]] ** 2).mean()


def test_cross_chunk_correlation_matches_numpy_corrcoef():
    """XCov: the mean of squared correlations between dimensions of different chunks, against
    numpy's float64 corrcoef; dimensions within one chunk may correlate freely."""
    import numpy as np

    torch.manual_seed(5)
    f = torch.randn(40, 3, 4)
    f[:, 1, 2] += 0.8 * f[:, 0, 0]       # across chunks: counted
    f[:, 2, 3] += 2.0 * f[:, 2, 0]       # inside one chunk: not counted
    expected = _cross_chunk_correlation_reference(f)
    assert losses.cross_chunk_correlation(f).item() == pytest.approx(expected, rel=1e-5)
    # one chunk's dimensions copied from another's: the largest correlation there can be
    twins = torch.randn(40, 1, 4).repeat(1, 2, 1)
    copied = np.corrcoef(twins.double().flatten(1).numpy(), rowvar=False)[:4, 4:]
    assert losses.cross_chunk_correlation(twins).item() == pytest.approx((copied ** 2).mean(), rel=1e-5)


def test_xcov_adds_lambda_xcov_times_the_cross_chunk_correlation_of_both_inputs():
    """λ_xcov > 0: the total gains λ_xcov · XCov of Enc(x1) and Enc(x2) stacked, recomputed in
    float64; the paper's presets compute no such term."""
    from disentangle.config import TrainConfig
    from disentangle.step import MixingTrainer

    torch.manual_seed(6)
    cfg = replace(PRESETS["tiny"], lambda_xcov=3.0)
    trainer = MixingTrainer(cfg, TrainConfig(variant="mix"), torch.device("cpu"))
    x1, x2 = torch.rand(6, 3, 16, 16) * 2 - 1, torch.rand(6, 3, 16, 16) * 2 - 1
    mask = torch.randint(0, 2, (8,)).bool()
    values, _ = trainer._generator_losses(x1, x2, mask)
    ae = trainer.ae.double()
    with torch.no_grad():
        f = ae.encode(torch.cat([x1, x2]).double())
        f1, f2 = f.chunk(2)
        mixing = ((ae.decode(mix(ae.encode(ae.decode(mix(f1, f2, mask))), f1, mask)) - x1.double()) ** 2).mean().item()
    xcov = _cross_chunk_correlation_reference(f)
    assert values["loss_xcov"].item() == pytest.approx(xcov, rel=1e-4)
    assert values["loss_total"].item() == pytest.approx(mixing + 3.0 * xcov, rel=1e-4)
    plain = MixingTrainer(PRESETS["tiny"], TrainConfig(variant="mix"), torch.device("cpu"))
    assert "loss_xcov" not in plain._generator_losses(x1, x2, mask)[0]


@pytest.mark.parametrize("lambda_rec", [0.0, 1.0])
def test_critic_can_be_shown_reconstructions_as_real(lambda_rec):
    """critic_real='reconstruction': the critic's real input is Dec(Enc(x1)), not x1, whether or not
    the variant reconstructs x1 for its own loss; 'data' keeps Eq. 2's x1."""
    import copy

    from disentangle.config import TrainConfig
    from disentangle.step import MixingTrainer

    x1, x2 = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    mask = torch.randint(0, 2, (4, 8)).bool()
    for critic_real in ("reconstruction", "data"):
        torch.manual_seed(5)
        cfg = replace(PRESETS["tiny"], critic_real=critic_real, lambda_rec=lambda_rec, norm="batch")
        trainer = MixingTrainer(cfg, TrainConfig(variant="mix+c+g"), torch.device("cpu"))
        before = copy.deepcopy(trainer.ae)  # the step changes the weights after the forward
        with torch.no_grad():
            f1 = before.encode(torch.cat([x1, x2]))
            rec = before.decode(f1 if lambda_rec else f1[:4])[:4]  # batch norm sees the same batch
        seen = []
        critic = trainer.critic_step
        trainer.critic_step = lambda real, fake: seen.append(real.detach().clone()) or critic(real, fake)
        trainer.step(x1, x2, mask)
        expected = rec if critic_real == "reconstruction" else x1
        torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_spectral_discriminator_weights_have_unit_spectral_norm():
    from disentangle.model import Discriminator

    torch.manual_seed(3)
    dsc = Discriminator(replace(PRESETS["tiny"], dsc_norm="spectral")).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dsc.modules())
    for _ in range(30):  # each training forward runs one power iteration
        dsc(torch.rand(4, 3, 16, 16))
    layers = [m for m in dsc.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3
    for layer in layers:
        w = layer.weight.detach().double().flatten(1)  # the normalised weight
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_unknown_discriminator_norm_is_refused():
    from disentangle.errors import RetrievalError

    with pytest.raises(RetrievalError, match="dsc_norm"):
        replace(PRESETS["tiny"], dsc_norm="layer")
    with pytest.raises(RetrievalError, match="norm must be"):
        replace(PRESETS["tiny"], norm="layer")
    with pytest.raises(RetrievalError, match="critic_real"):
        replace(PRESETS["tiny"], critic_real="mixed")
    with pytest.raises(RetrievalError, match="lambda_feat"):
        replace(PRESETS["tiny"], lambda_feat=-1.0)
    with pytest.raises(RetrievalError, match="lambda_xcov"):
        replace(PRESETS["tiny"], lambda_xcov=-1.0)


@pytest.mark.parametrize("norm, layer", [("instance", torch.nn.InstanceNorm2d),
                                         ("batch", torch.nn.BatchNorm2d), ("none", None)])
def test_encoder_and_decoder_use_the_configured_norm(norm, layer):
    model = MixingAutoencoder(replace(PRESETS["tiny"], norm=norm))
    for net in (model.encoder, model.decoder):
        found = {type(m) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
        assert found == ({layer} if layer else set())


def test_narrow_chunks_hold_zeros_past_their_width_and_the_rest_is_unchanged():
    """chunk_widths: a chunk of width w keeps its first w numbers as the plain encoder gives them
    and 0 after, for every image; () or all widths = chunk_dim is the plain encoder."""
    torch.manual_seed(7)
    widths = (4, 2, 1, 4, 3, 4, 2, 4)
    plain = MixingAutoencoder(PRESETS["tiny"]).eval()
    narrow = MixingAutoencoder(replace(PRESETS["tiny"], chunk_widths=list(widths))).eval()
    narrow.load_state_dict(plain.state_dict())  # the option adds no weight: old checkpoints load
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        f, g = plain.encode(x), narrow.encode(x)
    for c, w in enumerate(widths):
        torch.testing.assert_close(g[:, c, :w], f[:, c, :w])
        assert torch.equal(g[:, c, w:], torch.zeros_like(g[:, c, w:]))
    full = MixingAutoencoder(replace(PRESETS["tiny"], chunk_widths=(4,) * 8)).eval()
    full.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(full.encode(x), f)


def test_chunk_widths_must_fit_the_chunks():
    from disentangle.config import ModelConfig
    from disentangle.errors import RetrievalError

    for bad in [(4,) * 7, (4,) * 7 + (5,), (0,) + (4,) * 7]:
        with pytest.raises(RetrievalError, match="chunk_widths"):
            replace(PRESETS["tiny"], chunk_widths=bad)
    cfg = replace(PRESETS["tiny"], chunk_widths=[2] * 8)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint's JSON round trip


@pytest.mark.parametrize("decoder", ["d16k4-d8k4s2-d3k2s2-w", "d16k4-w-d8k4s2-d3k2s2", "d16k4-wc-d8k4s2-d3k2s2"])
def test_a_new_warp_draws_what_the_decoder_draws(decoder):
    """`w`: the head starts at the identity map, and resampling pixel centres at themselves
    returns each value, so a new decoder with the warp (of its image or of a map inside it)
    draws what the same layers draw without it; with `wc`, what they draw from the feature
    whose chunks 0 to 3 (the warp's) are 0."""
    torch.manual_seed(3)
    plain = MixingAutoencoder(PRESETS["tiny"]).decoder.eval()
    torch.manual_seed(3)
    decoder = MixingAutoencoder(replace(PRESETS["tiny"], decoder=decoder)).decoder.eval()
    layers = [m for m in decoder.net if not isinstance(m, architecture.WarpSlot)]
    for mine, theirs in zip(layers, plain.net):
        theirs.load_state_dict(mine.state_dict())
    f = torch.randn(4, 8, 4)
    layers_see = f.clone()
    if isinstance(decoder.warp, ChunkWarp):
        layers_see[:, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(decoder(f), plain(layers_see), rtol=0, atol=1e-6)


def test_warp_shifts_and_turns_by_whole_pixels():
    """The sampling against index arithmetic in numpy: a shift by two pixels repeats the border
    pixel, a quarter turn moves pixel (r, c) of the output to (c, W - 1 - r) of the input."""
    import numpy as np

    from disentangle.model import warped

    img = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    a = img.numpy()
    shift = torch.tensor([[1.0, 0.0, 2 * 2 / 6], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    cols = np.minimum(np.arange(6) + 2, 5)
    np.testing.assert_allclose(warped(img, shift).numpy(), a[:, :, :, cols], rtol=0, atol=1e-6)
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(2, 2, 3)
    r, c = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    np.testing.assert_allclose(warped(img, turn).numpy(), a[:, :, c, 5 - r], rtol=0, atol=1e-6)


def test_the_warp_head_learns_from_the_image_error():
    model = MixingAutoencoder(replace(PRESETS["tiny"], decoder="d16k4-d8k4s2-d3k2s2-w"), ("rec",))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    ((model.decoder(model.encoder(x)) - x) ** 2).mean().backward()
    assert model.decoder.warp.head[2].weight.grad.abs().sum() > 0
    assert model.decoder.warp.head[0].weight.grad is not None  # zero at the start: the last layer is 0


def test_each_number_of_a_chunk_warp_comes_from_its_own_chunk():
    """`wc`: changing chunk k (k < 4) moves only number k of (x shift, y shift, log scale, turn),
    chunks 4 to 7 move none; and the map is the similarity those numbers give, in float64 numpy."""
    import numpy as np

    torch.manual_seed(0)
    warp = MixingAutoencoder(replace(PRESETS["tiny"], decoder="d16k4-wc-d8k4s2-d3k2s2")).decoder.warp
    for head in warp.heads:
        torch.nn.init.normal_(head[2].weight, std=0.5)
    f = torch.randn(6, 8, 4)
    with torch.no_grad():
        base = warp.numbers(f)
        for k in range(8):
            g = f.clone()
            g[:, k] += torch.randn(6, 4)
            moved = (warp.numbers(g) - base).abs().amax(0) > 0
            assert moved.tolist() == [j == k for j in range(4)], k
        theta = warp(f).double().numpy()
    tx, ty, log_scale, turn = base.double().numpy().T
    s, c, n = np.exp(log_scale), np.cos(turn), np.sin(turn)
    expected = np.stack([np.stack([s * c, -s * n, tx], 1), np.stack([s * n, s * c, ty], 1)], 1)
    np.testing.assert_allclose(theta, expected, rtol=1e-6, atol=1e-6)


def test_the_chunks_of_a_chunk_warp_act_only_through_it():
    """`wc`: with the heads at 0 (the identity map), chunks 0 to 3 change nothing of the image;
    every other chunk does; a head that reads its chunk makes that chunk move the image."""
    torch.manual_seed(0)
    decoder = MixingAutoencoder(replace(PRESETS["tiny"], decoder="d16k4-wc-d8k4s2-d3k2s2")).decoder.eval()
    f = torch.randn(3, 8, 4)
    with torch.no_grad():
        base = decoder(f)
        def moved(k):
            g = f.clone()
            g[:, k] += 1
            return (decoder(g) - base).abs().max().item()
        assert [moved(k) > 0 for k in range(8)] == [False] * 4 + [True] * 4
        torch.nn.init.normal_(decoder.warp.heads[2][2].weight, std=0.5)
        base = decoder(f)
        assert [moved(k) > 0 for k in range(8)] == [False, False, True, False] + [True] * 4


def test_a_chunk_warp_needs_four_chunks_and_one_warp_per_decoder():
    with pytest.raises(ValueError, match="from 4 chunks; this model has 3"):
        MixingAutoencoder(replace(PRESETS["tiny"], n_chunks=3, decoder="d16k4-wc-d8k4s2-d3k2s2"))
    with pytest.raises(ValueError, match="w or wc, not both"):
        MixingAutoencoder(replace(PRESETS["tiny"], decoder="d16k4-wc-d8k4s2-d3k2s2-w"))


def test_only_a_decoder_can_warp():
    with pytest.raises(ValueError, match="only a decoder"):
        MixingAutoencoder(replace(PRESETS["tiny"], encoder="c8k3s2-w-c16k3s2-f"))
