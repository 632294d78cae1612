"""Table 1 strings: strict parsing, the format inverse, and every preset's sizes."""
from dataclasses import replace

import pytest
import torch

from disentangle import architecture as arch
from disentangle.config import PRESETS
from disentangle.model import ChunkClassifier, Decoder, Discriminator, Encoder

ALL_STRINGS = sorted({s for cfg in PRESETS.values()
                      for s in (cfg.encoder, cfg.decoder, cfg.discriminator, cfg.classifier) if s})


@pytest.mark.parametrize("text", ALL_STRINGS)
def test_parse_format_round_trip(text):
    specs = arch.parse(text)
    assert arch.format(specs) == text
    assert arch.parse(arch.format(specs)) == specs


def test_parse_reads_each_field():
    assert arch.parse("c64k3s2-d3k2s2-c512-f4096-f-p-u-r(8,8,64)-b8") == (
        arch.Conv(64, 3, 2), arch.Deconv(3, 2, 2), arch.Conv(512, 1, 1), arch.Dense(4096),
        arch.Dense(None), arch.Pool(), arch.Upsample(), arch.Reshape(8, 8, 64), arch.Broadcast(8))
    assert arch.format(arch.parse("b8-c64-d3k2s2")) == "b8-c64-d3k2s2"
    assert arch.parse("xy-c16k3s2-f") == (arch.Coords(), arch.Conv(16, 3, 2), arch.Dense(None))
    assert arch.format(arch.parse("xy-c16k3s2-f")) == "xy-c16k3s2-f"
    assert arch.parse("c8-g-f") == (arch.Conv(8), arch.GlobalPool(), arch.Dense(None))
    assert arch.format(arch.parse("c8-g-f")) == "c8-g-f"
    assert arch.parse("b8-c8-w-d3k2s2") == (arch.Broadcast(8), arch.Conv(8), arch.Warp(), arch.Deconv(3, 2, 2))
    assert arch.format(arch.parse("b8-c8-w-d3k2s2")) == "b8-c8-w-d3k2s2"
    assert arch.parse("b8-c8-wc-d3k2s2")[2] == arch.Warp(per_chunk=True)
    assert arch.format(arch.parse("b8-c8-wc-d3k2s2")) == "b8-c8-wc-d3k2s2"


def test_broadcast_tiles_the_vector_and_appends_coordinates():
    layer = arch.SpatialBroadcast(5)
    f = torch.randn(3, 7)
    out = layer(f)
    assert out.shape == (3, 9, 5, 5)
    for i in range(5):          # row
        for j in range(5):      # column
            assert torch.equal(out[:, :7, i, j], f)
            assert out[0, 7, i, j].item() == pytest.approx(-1 + 2 * j / 4)  # column coordinate
            assert out[2, 8, i, j].item() == pytest.approx(-1 + 2 * i / 4)  # row coordinate


def test_broadcast_with_templates_appends_a_dense_map_per_position():
    assert arch.parse("b8t64") == (arch.Broadcast(8, 64),)
    assert arch.format(arch.parse("b8t64-c64")) == "b8t64-c64"
    layer = arch.SpatialBroadcast(5, 7, templates=3)
    f = torch.randn(2, 7)
    out = layer(f)
    assert out.shape == (2, 12, 5, 5)
    assert torch.equal(out[:, :9], arch.SpatialBroadcast(5)(f))  # the plain broadcast first
    # then channel t at row i, column j is the dense layer's output t * 25 + i * 5 + j (float64 check)
    w, b = layer.dense.weight.double(), layer.dense.bias.double()
    expected = (f.double() @ w.T + b).view(2, 3, 5, 5)
    assert torch.allclose(out[:, 9:].double(), expected, atol=1e-6)
    net, shape = arch.build(arch.parse("b4t2-c3"), (6,), 3, norm="none", activation="relu",
                            final_activation="none")
    assert shape == (3, 4, 4) and net[0].dense.in_features == 6


def test_coordinates_are_appended_to_a_map():
    net, out = arch.build(arch.parse("xy-c4"), (3, 4, 6), 4, norm="none", activation="relu",
                          final_activation="none")
    x = torch.randn(2, 3, 4, 6)
    appended = net[0](x)
    assert out == (4, 4, 6) and appended.shape == (2, 5, 4, 6)
    assert torch.equal(appended[:, :3], x)
    for i in range(4):
        for j in range(6):
            assert appended[1, 3, i, j].item() == pytest.approx(-1 + 2 * j / 5)
            assert appended[1, 4, i, j].item() == pytest.approx(-1 + 2 * i / 3)
    with pytest.raises(ValueError, match="appends coordinates to a map"):
        arch.build(arch.parse("f8-xy"), (3,), 3, norm="none", activation="relu", final_activation="none")


def test_global_pool_averages_each_channel_wherever_the_pattern_lies():
    net, out = arch.build(arch.parse("g-f"), (3, 4, 5), 2, norm="none", activation="relu",
                          final_activation="none")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    pooled = net.double()[0](x)
    assert out == (2,) and pooled.shape == (2, 3)
    assert torch.allclose(pooled, x.mean(dim=(2, 3)))  # a float64 mean over every place
    shifted = torch.roll(x, shifts=(1, 2), dims=(2, 3))  # the same values elsewhere on the map
    assert torch.allclose(net(shifted), net(x))
    with pytest.raises(ValueError, match="pools a map"):
        arch.build(arch.parse("f8-g"), (3,), 3, norm="none", activation="relu", final_activation="none")


def test_broadcast_decoder_reads_the_chunks():
    cfg = replace(PRESETS["shapes"], decoder="b8-c64-c64k3-d32k4s2-d3k2s2")
    dec = Decoder(cfg)
    assert dec(torch.randn(2, cfg.n_chunks, cfg.chunk_dim)).shape == (2, 3, 32, 32)


def test_warp_needs_a_map_and_a_decoder():
    with pytest.raises(ValueError, match="warps a map"):
        arch.build(arch.parse("f8-w-f"), (4,), 3, norm="none", activation="relu", final_activation="none",
                   warp=True)
    with pytest.raises(ValueError, match="only a decoder"):
        arch.build(arch.parse("c8-w-f"), (3, 4, 4), 3, norm="none", activation="relu", final_activation="none")
    with pytest.raises(ValueError, match="wc warps a map"):
        arch.build(arch.parse("f8-wc-f"), (4,), 3, norm="none", activation="relu", final_activation="none",
                   warp=True)


def test_broadcast_of_a_map_is_an_error():
    with pytest.raises(ValueError, match="broadcasts a vector"):
        arch.build(arch.parse("c8-b4-c3"), (3, 4, 4), 3, norm="none", activation="relu",
                   final_activation="none")


@pytest.mark.parametrize("bad", ["c64k3s2-x3", "c64K3", "c64k3s2s2", "c0", "f0", "r(8,8)", "c64-",
                                 "", "c64 k3", "pp", "c64k03", "b0", "b", "b4x", "b4t0", "b4t", "xy2", "yx", "g2", "gg", "w2", "ww"])
def test_parse_rejects_bad_tokens(bad):
    with pytest.raises(ValueError) as e:
        arch.parse(bad)
    assert "token" in str(e.value) or "empty" in str(e.value)


def test_unknown_token_is_named():
    with pytest.raises(ValueError, match="'q7'"):
        arch.parse("c64k3s2-q7-f")


def test_reshape_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="reshape"):
        arch.build(arch.parse("f100-r(8,8,64)"), (10,), 3, norm="none", activation="relu",
                   final_activation="none")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_maps_image_to_chunks_and_back(name):
    cfg = PRESETS[name]
    torch.manual_seed(0)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    enc, dec = Encoder(cfg), Decoder(cfg)
    f = enc(x)
    assert f.shape == (2, cfg.n_chunks, cfg.chunk_dim)
    y = dec(f)
    assert y.shape == x.shape
    assert y.abs().max() <= 1  # tanh output, like the [-1, 1] inputs
    assert ChunkClassifier(cfg)(x, x, y).shape == (2, cfg.n_chunks)
    d = Discriminator(cfg)(x)
    assert d.shape == ((2,) if cfg.gan == "dcgan" else x.shape)


def test_dummy_pass_leaves_batch_norm_untouched():
    disc = Discriminator(PRESETS["tiny"])
    bn = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == 0 for m in bn)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bn)
