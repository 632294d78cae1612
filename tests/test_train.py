"""The training loop: it learns, resumes exactly, stops on NaN, survives kill -9, runs as DDP."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from disentangle import checkpoint
from disentangle.config import PRESETS, TrainConfig
from disentangle.errors import RetrievalError
from disentangle.data.base import ArrayDataset, Record
from disentangle.train import MemoryPairs, PairBatches, sample_mask, train

TINY = PRESETS["tiny"]
REPO = Path(__file__).resolve().parents[1]


class Squares(torch.utils.data.Dataset):
    """16x16 images with two factors: background grey level and the position of a bright square."""

    def __init__(self, n: int = 256, nan: bool = False):
        g = torch.Generator().manual_seed(0)
        grey = torch.randint(0, 4, (n,), generator=g).float() / 3
        pos = torch.randint(0, 10, (n, 2), generator=g)
        self.x = grey[:, None, None, None].expand(n, 3, 16, 16).clone() * 0.8 - 0.9
        for i, (r, c) in enumerate(pos.tolist()):
            self.x[i, :, r:r + 6, c:c + 6] = 0.9
        if nan:
            self.x[:] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _config(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, log_every=1, checkpoint_every=1000, figure_every=1000)
    return TrainConfig(**{**base, **kw})


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_mixing_loss(tmp_path):
    train(Squares(), TINY, _config(steps=150, batch_size=16, lr=2e-3, variant="mix"), tmp_path)
    loss = [float(r["loss_mix"]) for r in _rows(tmp_path)]
    assert len(loss) == 150
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("channels", [1, 3])
def test_in_memory_batches_equal_the_data_loader_ones(channels):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (40, 16, 16, channels), dtype=torch.uint8, generator=g).numpy()
    ds = ArrayDataset(pixels=pixels, format="test", root=None, size=16, attribute_names=[],
                      records=[Record(key=str(i), path="", split=None, attributes={}) for i in range(40)],
                      skipped=0)
    sampler = PairBatches(len(ds), 5, seed=3, rank=0, start=2, stop=6)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    batches = list(MemoryPairs(pixels, sampler))
    assert len(batches) == 4
    for fast, reference in zip(batches, loader, strict=True):
        assert fast.shape == (10, 3, 16, 16) and fast.is_contiguous()
        assert torch.equal(fast, reference)


def test_a_time_budget_stops_the_run_and_a_resume_adds_no_step(tmp_path):
    tc = _config(steps=10**6, minutes=0.01, log_every=5)
    train(Squares(), TINY, tc, tmp_path)
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    assert 0 < ckpt["step"] < 10**6 and ckpt["step"] % 5 == 0 and ckpt["train_seconds"] >= 0.6
    assert (tmp_path / "transfer.png").exists()
    train(Squares(), TINY, tc, tmp_path, resume=True)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == ckpt["step"]


def test_warmup_steps_train_the_autoencoder_alone_then_the_mixing_objective(tmp_path):
    train(Squares(), TINY, _config(steps=6, warmup_steps=4, variant="mix+c+g"), tmp_path)
    rows = _rows(tmp_path)
    assert [bool(r["loss_rec"]) for r in rows[:4]] == [True] * 4  # tiny has no λ_rec after them
    assert [bool(r["loss_mix"] and r["loss_c"] and r["loss_g"] and r["loss_d"]) for r in rows] == \
        [False] * 4 + [True] * 2


def test_a_warmup_step_is_a_plain_reconstruction_step_of_both_inputs():
    from disentangle.step import MixingTrainer

    trainer = MixingTrainer(TINY, TrainConfig(batch_size=4, lr=1e-2), torch.device("cpu"))
    x = Squares(8).x
    ae, critic = trainer.ae, trainer.critic
    with torch.no_grad():  # the float64 reference of the loss, from the weights before the step
        expected = ((ae.decode(ae.encode(x)).double() - x.double()) ** 2).mean()
    frozen = [p.detach().clone() for p in [*ae.classifier.parameters(), *critic.parameters()]]
    coder = [p.detach().clone() for p in [*ae.encoder.parameters(), *ae.decoder.parameters()]]
    values = trainer.warmup_step(x[:4], x[4:])
    assert set(values) == {"loss_rec", "loss_total"}
    assert values["loss_rec"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(frozen, [*ae.classifier.parameters(), *critic.parameters()]))
    assert all(not torch.equal(a, b) for a, b in zip(coder, [*ae.encoder.parameters(), *ae.decoder.parameters()]))


def test_the_papers_sprites_preset_still_trains():
    from disentangle.step import MixingTrainer

    trainer = MixingTrainer(PRESETS["sprites"], TrainConfig(batch_size=2), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.tensor([True, False] * 4)
    before = [p.detach().clone() for p in trainer.ae.parameters()]
    losses = [trainer.step(x[:2], x[2:], mask) for _ in range(2)]
    assert all(torch.isfinite(v).all() for step in losses for v in step.values())
    assert set(losses[0]) >= {"loss_mix", "loss_c", "loss_g", "loss_d"}
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.ae.parameters()) if a.dim() > 1)


def test_run_folder_holds_checkpoint_metrics_and_figure(tmp_path):
    train(Squares(), TINY, _config(figure_every=3), tmp_path)
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["model_config"]["name"] == "tiny"
    assert [int(r["step"]) for r in _rows(tmp_path)] == list(range(1, 7))
    assert (tmp_path / "transfer.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "transfer_0000003.png", "transfer_0000006.png"]
    model, cfg, _ = checkpoint.load_model(tmp_path / "checkpoint.pt")
    assert cfg == TINY and not model.training


def _all_state(run: Path) -> dict:
    ckpt = checkpoint.load(run / "checkpoint.pt")
    return {"models": ckpt["models"], "optimizers": ckpt["optimizers"], "step": ckpt["step"]}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("variant,mask,critic_lr_scale",
                         [("mix+c+g", "per-sample", 4.0), ("ae+c+g", "per-batch", 1.0),
                          ("mix+c+g", "per-group", 1.0), ("mix+c+g", "one-chunk", 1.0)])
def test_resume_equals_an_uninterrupted_run(tmp_path, variant, mask, critic_lr_scale):
    whole, split = tmp_path / "whole", tmp_path / "split"
    cfg = _config(variant=variant, mask=mask, critic_lr_scale=critic_lr_scale)
    train(Squares(), TINY, cfg, whole)
    train(Squares(), TINY, replace(cfg, steps=3), split)
    train(Squares(), TINY, cfg, split, resume=True)
    _assert_same(_all_state(whole), _all_state(split))
    assert [r["loss_total"] for r in _rows(whole)] == [r["loss_total"] for r in _rows(split)]


def test_critic_learning_rate_is_a_multiple_of_the_decayed_one(tmp_path):
    cfg = _config(steps=5, lr=1e-3, lr_decay=0.5, lr_decay_every=2, critic_lr_scale=4.0)
    train(Squares(), TINY, cfg, tmp_path)
    opts = checkpoint.load(tmp_path / "checkpoint.pt")["optimizers"]
    last = 1e-3 * 0.5 ** 2  # the lr of step 4, the last one run
    assert [g["lr"] for g in opts["autoencoder"]["param_groups"]] == pytest.approx([last])
    assert [g["lr"] for g in opts["discriminator"]["param_groups"]] == pytest.approx([4 * last])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(RetrievalError, match="critic-lr-scale must be > 0"):
            _config(critic_lr_scale=bad)


def test_resume_of_began_carries_k(tmp_path):
    cfg = replace(TINY, gan="began", name="tiny")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(Squares(), cfg, _config(), whole)
    train(Squares(), cfg, _config(steps=2), split)
    train(Squares(), cfg, _config(), split, resume=True)
    _assert_same(_all_state(whole), _all_state(split))
    assert checkpoint.load(whole / "checkpoint.pt")["began_k"] > 0


def test_existing_run_is_not_overwritten(tmp_path):
    train(Squares(), TINY, _config(steps=2), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RetrievalError, match="--resume"):
        train(Squares(), TINY, _config(steps=2), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_preset_is_refused(tmp_path):
    train(Squares(), TINY, _config(steps=1), tmp_path)
    with pytest.raises(RetrievalError, match="same --preset"):
        train(Squares(), replace(TINY, name="other"), _config(steps=2), tmp_path, resume=True)
    with pytest.raises(RetrievalError, match=r"older definition of preset 'tiny' \(differs in chunk_dim\)"):
        train(Squares(), replace(TINY, chunk_dim=2), _config(steps=2), tmp_path, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(Squares(), TINY, _config(steps=4, checkpoint_every=2), tmp_path)
    good = _all_state(tmp_path)
    with pytest.raises(RetrievalError, match="nan.*step 4.*last good"):
        train(Squares(nan=True), TINY, _config(steps=8, checkpoint_every=1), tmp_path, resume=True)
    _assert_same(good, _all_state(tmp_path))


def test_kill_9_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "retrieval", "train", "shapes:256", "--preset", "tiny", "--out", str(run),
           "--steps", "100000", "--batch-size", "4", "--checkpoint-every", "1", "--figure-every", "100000"]
    steps = [0]
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen(cmd + (["--resume"] if len(steps) > 1 else []), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until this process has written a newer checkpoint
            path = run / "checkpoint.pt"
            if path.exists() and checkpoint.load(path)["step"] > steps[-1]:
                break
            time.sleep(0.05)
        time.sleep(delay)  # checkpoints are written every step: the kill lands mid-write sometimes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(checkpoint.load(run / "checkpoint.pt")["step"])
    assert all(a < b for a, b in zip(steps, steps[1:])), steps
    model, cfg, _ = checkpoint.load_model(run / "checkpoint.pt")
    assert cfg.name == "tiny"
    final = steps[-1] + 2
    subprocess.run(cmd[:cmd.index("--steps")] + ["--steps", str(final), "--resume"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert checkpoint.load(run / "checkpoint.pt")["step"] == final
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # torn writes cleaned up


def _ddp_worker(rank: int, port: int, out: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # two warm-up steps (gradients averaged by hand) then two DDP steps of the mixing objective
    model = train(Squares(), TINY, _config(steps=4, warmup_steps=2, variant="mix+c+g"), out, device="cpu")
    torch.save(dict(model.named_parameters()), f"{result}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_with_two_gloo_processes_keeps_ranks_in_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # each rank saw different pairs: equal parameters mean the gradients were averaged
    # (batch-norm statistics are rank-local by design, see disentangle.train._ddp)
    _assert_same(w0, w1)
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4
    saved = dict(checkpoint.load_model(tmp_path / "run" / "checkpoint.pt")[0].named_parameters())
    _assert_same({k: v.detach() for k, v in saved.items()}, w0)


@pytest.mark.parametrize("batch,groups", [(8, 4), (10, 4), (64, 8), (6, 6), (5, 1)])
def test_group_masks_share_one_row_per_run_of_pairs(batch, groups):
    tc = TrainConfig(mask="per-group", mask_groups=groups, batch_size=batch)
    masks = torch.stack([sample_mask(tc, 6, torch.Generator().manual_seed(s)) for s in range(200)])
    assert masks.shape == (200, batch, 6)
    owner = [p * groups // batch for p in range(batch)]        # which group each pair falls in
    assert sorted(set(owner)) == list(range(groups))            # every group holds a pair
    for p in range(batch):
        for q in range(batch):
            same = torch.equal(masks[:, p], masks[:, q])
            assert same == (owner[p] == owner[q]), (p, q)       # 200 draws: distinct groups differ
    assert abs(masks.float().mean().item() - 0.5) < 0.03       # each chunk from x1 half the time


def test_one_chunk_masks_swap_exactly_one_chunk_per_pair():
    tc = TrainConfig(mask="one-chunk", batch_size=16)
    masks = torch.stack([sample_mask(tc, 8, torch.Generator().manual_seed(s)) for s in range(200)])
    assert masks.shape == (200, 16, 8) and masks.dtype == torch.bool
    assert ((~masks).sum(-1) == 1).all()                        # one chunk from x2, the rest from x1
    swapped = (~masks).float().mean((0, 1))                     # each chunk about 1/8 of the time
    assert ((swapped - 1 / 8).abs() < 0.02).all(), swapped


def test_group_masks_need_between_one_and_batch_groups():
    for groups in (0, 9):
        with pytest.raises(RetrievalError, match="--mask-groups"):
            TrainConfig(mask="per-group", mask_groups=groups, batch_size=8)
    with pytest.raises(RetrievalError, match="per-group"):
        TrainConfig(mask="per-pixel")
