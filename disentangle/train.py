"""The training loop of paper §3.1 (Eq. 4): min over Enc, Dec, Cls and max over Dsc of
λ_M L_M + λ_G L_G + λ_C L_C, one autoencoder step then one discriminator step per iteration.

Every random draw of step s (the pairs, the mask) is a pure function of (seed, rank, s), so
`resume=True` continues with exactly the weights an uninterrupted run would have. Runs under
torchrun as DDP (gloo on CPU, NCCL on GPU); rank 0 writes the run folder.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from . import checkpoint, figures, grouping
from .config import ModelConfig, TrainConfig
from .data.base import ArrayDataset
from .errors import RetrievalError
from .model import MixingAutoencoder
from .step import MixingTrainer

log = logging.getLogger(__name__)

METRICS = ["step", "loss_total", "loss_mix", "loss_rec", "loss_c", "loss_g", "loss_d", "began_k",
           "lr", "pairs_per_s", "elapsed_s"]
FIGURE_IMAGES = 6


def step_generator(seed: int, rank: int, step: int, stream: int) -> torch.Generator:
    """A generator owned by one (seed, rank, step, stream): no state to carry across a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 10_000_019 + step) * 4 + stream)


class PairBatches(Sampler):
    """Index batches of 2B images, x1 = first half, x2 = second (drawn independently, §3.1)."""

    def __init__(self, n: int, pairs: int, seed: int, rank: int, start: int, stop: int):
        self.n, self.pairs, self.seed, self.rank, self.start, self.stop = n, pairs, seed, rank, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = step_generator(self.seed, self.rank, step, 0)
            yield torch.randint(self.n, (2 * self.pairs,), generator=g).tolist()

    def __len__(self) -> int:
        return self.stop - self.start


class MemoryPairs:
    """PairBatches gathered from an in-memory uint8 array with one indexing op a step, instead of
    2B __getitem__ calls: the same float values, several times faster for small networks."""

    def __init__(self, pixels: np.ndarray, sampler: PairBatches):
        self.pixels, self.sampler = torch.from_numpy(pixels), sampler  # (N, H, W, C) uint8, no copy

    def __iter__(self):
        for idx in self.sampler:
            x = self.pixels[idx]                                  # (2B, H, W, C)
            if x.shape[-1] == 1:  # grey, replicated to RGB as ArrayDataset.image does
                x = x.expand(-1, -1, -1, 3)
            yield x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1  # (2B, 3, H, W)

    def __len__(self) -> int:
        return len(self.sampler)


def _in_memory_pixels(ds: Dataset) -> np.ndarray | None:
    """The uint8 pixels behind an ArrayDataset (or a Subset of one), else None."""
    if isinstance(ds, ArrayDataset):
        return ds.pixels
    if isinstance(ds, Subset) and isinstance(ds.dataset, ArrayDataset):
        return ds.dataset.pixels[np.asarray(ds.indices)]  # the training split, copied once
    return None


def sample_mask(tc: TrainConfig, n_chunks: int, generator: torch.Generator) -> torch.Tensor:
    """m ∈ {0,1}^n uniformly: one per batch (n_chunks,), one per pair (B, n_chunks), or per group
    (B, n_chunks) whose rows repeat in runs of about B / mask_groups pairs; "one-chunk" gives each
    pair a row with exactly one False (the one chunk taken from x2)."""
    if tc.mask == "per-batch":
        return torch.randint(0, 2, (n_chunks,), generator=generator).bool()
    if tc.mask == "per-sample":
        return torch.randint(0, 2, (tc.batch_size, n_chunks), generator=generator).bool()
    if tc.mask == "one-chunk":  # not in the paper: each pair takes exactly one chunk from x2
        swapped = torch.randint(0, n_chunks, (tc.batch_size,), generator=generator)
        return torch.arange(n_chunks)[None, :] != swapped[:, None]
    masks = torch.randint(0, 2, (tc.mask_groups, n_chunks), generator=generator).bool()
    return masks[torch.arange(tc.batch_size) * tc.mask_groups // tc.batch_size]


def draw_mask(tc: TrainConfig, n_chunks: int, rank: int, step: int) -> torch.Tensor:
    """The mask of one step on one rank, reproducible from (seed, rank, step)."""
    return sample_mask(tc, n_chunks, step_generator(tc.seed, rank, step, 1))


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when there is one; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RetrievalError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def _time_up(tc: TrainConfig, seconds: float, world: int, device: torch.device) -> bool:
    """Whether the --minutes budget is spent; under DDP every rank takes rank 0's answer, so all
    of them stop at the same step."""
    if not tc.minutes:
        return False
    up = torch.tensor([seconds >= tc.minutes * 60], device=device)
    if world > 1:
        dist.broadcast(up, 0)
    return bool(up.item())


def training_subset(ds: Dataset) -> Dataset:
    """Train on the 'train' split when the data has one, else on everything."""
    records = getattr(ds, "records", None)
    if records and any(r.split == "train" for r in records):
        return Subset(ds, [i for i, r in enumerate(records) if r.split == "train"])
    return ds


class _Metrics:
    """metrics.csv in the run folder; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int):
        rows = []
        if start_step > 0 and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, METRICS)
        self.writer.writeheader()
        self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in METRICS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(dataset: Dataset, cfg: ModelConfig, tc: TrainConfig, out: str | Path, *,
          device: str = "auto", resume: bool = False, workers: int = 0, progress: bool = False,
          data_info: dict | None = None) -> MixingAutoencoder:
    """Train on `dataset` (items: (3, S, S) tensors in [-1, 1]) into the run folder `out`."""
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    rank, world, dev = _distributed(device)
    start, ckpt = 0, None
    if resume:
        ckpt = checkpoint.load(ckpt_path)
        saved = ModelConfig.from_dict(ckpt["model_config"])
        if saved != cfg:
            if saved.name == cfg.name:  # the preset's definition changed since that run began
                now = cfg.to_dict()
                changed = ", ".join(k for k, v in saved.to_dict().items() if now[k] != v)
                raise RetrievalError(f"{ckpt_path} was trained with an older definition of preset "
                                     f"{cfg.name!r} (differs in {changed}); start a new run in another --out")
            raise RetrievalError(f"{ckpt_path} was trained with preset {saved.name!r}, not {cfg.name!r}; "
                                 "resume with the same --preset")
        start = ckpt["step"]
        tc = replace(TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k != "losses"}),
                     steps=tc.steps, minutes=tc.minutes, bf16=tc.bf16, channels_last=tc.channels_last,
                     checkpoint_every=tc.checkpoint_every,
                     figure_every=tc.figure_every, log_every=tc.log_every)
    elif ckpt_path.exists():
        raise RetrievalError(f"{out} already holds a checkpoint; pass --resume to continue it "
                             "or choose another --out")

    trainer = MixingTrainer(cfg, tc, dev, distributed=world > 1)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)

    train_set = training_subset(dataset)
    if len(train_set) < 2:
        raise RetrievalError("training needs at least 2 images")
    shown = min(FIGURE_IMAGES, len(train_set) // 2)  # bases and donors per transfer panel
    figure_idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(tc.seed))
    figure_batch = torch.stack([train_set[int(i)] for i in figure_idx[:2 * shown]]).to(dev)
    meta = {"data": data_info or {}, "world_size": world}

    spent = ckpt.get("train_seconds", 0.0) if ckpt is not None else 0.0  # before this process
    t0 = time.perf_counter()

    def state(step: int) -> dict:
        return {"format": checkpoint.FORMAT_VERSION, "step": step, "model_config": cfg.to_dict(),
                "train_config": tc.to_dict(), "train_seconds": spent + time.perf_counter() - t0,
                **meta, **trainer.state_dict()}

    def save_figure(step: int) -> None:
        sheet = figures.transfer_figure(trainer.ae, figure_batch[:shown], figure_batch[shown:])
        figures.save_png(sheet, out / "figures" / f"transfer_{step:07d}.png")
        figures.save_png(sheet, out / "transfer.png")

    is_main = rank == 0
    metrics = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        for torn in out.glob(f".{ckpt_path.name}.*.tmp"):  # left by a process killed mid-write
            torn.unlink()
        if ckpt is None:
            checkpoint.save_atomic(state(0), ckpt_path)  # a loadable file exists from the start
        metrics = _Metrics(out / "metrics.csv", start)

    stop = start if tc.minutes and spent >= tc.minutes * 60 else tc.steps  # a spent budget: no step
    sampler = PairBatches(len(train_set), tc.batch_size, tc.seed, rank, start, stop)
    pixels = _in_memory_pixels(train_set)
    loader = (MemoryPairs(pixels, sampler) if pixels is not None else
              DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                         pin_memory=dev.type == "cuda", persistent_workers=False))
    bar = tqdm(total=None if tc.minutes else tc.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    t_last = time.perf_counter()
    last_step = done = start
    try:
        for step, batch in enumerate(loader, start=start):
            x1, x2 = batch.to(dev, non_blocking=True).chunk(2)
            mask = draw_mask(tc, cfg.n_chunks, rank, step).to(dev)
            lr = tc.lr * tc.lr_decay ** (step // tc.lr_decay_every)  # staircase decay
            trainer.set_lr(lr)
            try:
                values = (trainer.warmup_step(x1, x2) if step < tc.warmup_steps
                          else trainer.step(x1, x2, mask))
            except RetrievalError as e:
                raise RetrievalError(f"{e} at step {step}; training stopped and {ckpt_path} keeps the "
                                     "last good weights (try a lower --lr)") from None

            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                rate = (done - last_step) * tc.batch_size * world / max(now - t_last, 1e-9)
                t_last, last_step = now, done
                row = {k: f"{v.item():.5f}" for k, v in values.items()}
                if is_main:
                    metrics.write({**row, "step": done, "lr": f"{lr:.3g}", "began_k": f"{trainer.began_k:.4f}",
                                   "pairs_per_s": f"{rate:.1f}", "elapsed_s": f"{now - t0:.1f}"})
                postfix = {k.removeprefix("loss_"): v for k, v in row.items()} | {"pairs/s": f"{rate:.0f}"}
                if tc.minutes:  # a time budget has no step total for the bar: say what is left of it
                    left = max(tc.minutes * 60 - spent - (now - t0), 0)
                    postfix["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
                bar.set_postfix(postfix)
            time_up = done % tc.log_every == 0 and _time_up(tc, spent + time.perf_counter() - t0, world, dev)
            last = done == tc.steps or time_up
            if is_main and (done % tc.checkpoint_every == 0 or last):
                checkpoint.save_atomic(state(done), ckpt_path)
            if is_main and (done % tc.figure_every == 0 or last):
                save_figure(done)
            if time_up:
                log.info("stopped at step %d: --minutes %g of training reached", done, tc.minutes)
                break
        if is_main and stop <= start:
            log.info("checkpoint is already at step %d (--steps %d, --minutes %g); nothing to do",
                     start, tc.steps, tc.minutes)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    # the search layout follows the weights: found again whenever they changed
    if is_main and cfg.group_ratio > 0 and (done > start or not (ckpt or {}).get("chunk_groups")):
        saved = checkpoint.load(ckpt_path)
        saved["chunk_groups"] = grouping.groups_on(trainer.ae, train_set, cfg.group_ratio, tc.seed)
        checkpoint.save_atomic(saved, ckpt_path)
    return trainer.ae
