"""The fast-path options (channels-last, fused Adam and bf16 on CUDA) and the CUDA search path.

Every test runs on the CPU; on a machine with CUDA the same tests also run there (the device is a
parameter, so nothing is skipped on a CPU-only machine: the CUDA cases simply do not exist there).
"""
import numpy as np
import pytest
import torch

from disentangle.config import PRESETS, TrainConfig
from disentangle.step import MixingTrainer
from retrieval.search import ChunkStore, search

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = PRESETS["tiny"]


def _batch(device, n=8, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * n, 3, size, size, generator=g) * 2 - 1
    return [t.to(device) for t in x.chunk(2)]


def _steps(tc, device, n=3):
    trainer = MixingTrainer(TINY, tc, torch.device(device))
    x1, x2 = _batch(device)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool, device=device)
    losses = [trainer.step(x1, x2, mask) for _ in range(n)]
    return trainer, losses


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_changes_layout_not_results(device):
    plain, a = _steps(TrainConfig(), device)
    nhwc, b = _steps(TrainConfig(channels_last=True), device)
    conv = next(m for m in nhwc.ae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for la, lb in zip(a, b):
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_stays_close_to_fp32(device):
    _, fp32 = _steps(TrainConfig(), device)
    _, bf16 = _steps(TrainConfig(bf16=True), device)  # autocast applies on CUDA only
    for la, lb in zip(fp32, bf16):
        assert torch.isfinite(lb["loss_total"])
        torch.testing.assert_close(la["loss_total"], lb["loss_total"], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adam_only_on_cuda(device):
    trainer, _ = _steps(TrainConfig(), device, n=1)
    assert trainer.opt_ae.defaults["fused"] == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_search_equals_numpy_search(device):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, 5000, 16)).astype(np.float32)
    ids = rng.permutation(5000).astype(np.int64) + 10
    q = rng.standard_normal((4, 8, 16)).astype(np.float32)
    for chunks in ([3], [0, 5], list(range(8))):
        a = search(ChunkStore(feats, ids), q, chunks, 20)
        b = search(ChunkStore(feats, ids, backend="torch", device=device), q, chunks, 20)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-9)
