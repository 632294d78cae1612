"""The training loop of paper §3.1 (Eq. 4): min over Enc, Dec, Cls and max over Dsc of
λ_M L_M + λ_G L_G + λ_C L_C, one autoencoder step then one discriminator step per iteration.

Every random draw of step s (the pairs, the mask) is a pure function of (seed, rank, s), so
`resume=True` continues with exactly the weights an uninterrupted run would have. Runs under
torchrun as DDP (gloo on CPU, NCCL on GPU); rank 0 writes the run folder.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from . import checkpoint, figures, losses
from .config import ModelConfig, TrainConfig
from .errors import RetrievalError
from .model import Discriminator, MixingAutoencoder

log = logging.getLogger(__name__)

METRICS = ["step", "loss_total", "loss_mix", "loss_rec", "loss_c", "loss_g", "loss_d", "began_k",
           "lr", "pairs_per_s", "elapsed_s"]
FIGURE_IMAGES = 6  # bases and donors per transfer panel


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


def draw_mask(tc: TrainConfig, n_chunks: int, rank: int, step: int) -> torch.Tensor:
    """m ∈ {0,1}^n uniformly: one per batch (n_chunks,) or one per pair (B, n_chunks)."""
    shape = (n_chunks,) if tc.mask == "per-batch" else (tc.batch_size, n_chunks)
    return torch.randint(0, 2, shape, generator=step_generator(tc.seed, rank, step, 1)).bool()


class Critic(nn.Module):
    """The discriminator scoring real and mixed images in one call (one DDP forward per step)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dsc = Discriminator(cfg)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dsc(real), self.dsc(fake)


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


def _ddp(module: nn.Module) -> DDP:
    """DDP without buffer broadcasts: the networks run several times per step, so batch-norm
    statistics stay rank-local (parameters are still averaged every step)."""
    with warnings.catch_warnings():  # torch >= 2.14 renames the option; the old one still works
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(module, broadcast_buffers=False)


def _training_subset(ds: Dataset) -> Dataset:
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
            raise RetrievalError(f"{ckpt_path} was trained with preset {saved.name!r}, not {cfg.name!r}; "
                                 "resume with the same --preset")
        start = ckpt["step"]
        tc = replace(TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k != "losses"}),
                     steps=tc.steps, bf16=tc.bf16, checkpoint_every=tc.checkpoint_every,
                     figure_every=tc.figure_every, log_every=tc.log_every)
    elif ckpt_path.exists():
        raise RetrievalError(f"{out} already holds a checkpoint; pass --resume to continue it "
                             "or choose another --out")

    torch.manual_seed(tc.seed)  # same initial weights on every rank
    ae = MixingAutoencoder(cfg, tc.losses).to(dev)
    critic = Critic(cfg).to(dev) if "g" in tc.losses else None
    betas = (tc.beta1, 0.999)
    opt_ae = torch.optim.Adam(ae.parameters(), lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=tc.lr, betas=betas) if critic else None
    began_k = 0.0
    if ckpt is not None:
        ae.load_state_dict(ckpt["models"]["autoencoder"])
        opt_ae.load_state_dict(ckpt["optimizers"]["autoencoder"])
        if critic:
            critic.dsc.load_state_dict(ckpt["models"]["discriminator"])
            opt_d.load_state_dict(ckpt["optimizers"]["discriminator"])
        began_k = ckpt["began_k"]
    ae_step = _ddp(ae) if world > 1 else ae
    critic_step = _ddp(critic) if world > 1 and critic else critic

    train_set = _training_subset(dataset)
    if len(train_set) < 2:
        raise RetrievalError("training needs at least 2 images")
    figure_idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(tc.seed))
    figure_batch = torch.stack([train_set[int(i)] for i in figure_idx[:2 * FIGURE_IMAGES]]).to(dev)
    meta = {"data": data_info or {}, "world_size": world}

    def state(step: int) -> dict:
        return {"format": checkpoint.FORMAT_VERSION, "step": step, "model_config": cfg.to_dict(),
                "train_config": tc.to_dict(), "began_k": began_k, **meta,
                "models": {"autoencoder": ae.state_dict(),
                           "discriminator": critic.dsc.state_dict() if critic else None},
                "optimizers": {"autoencoder": opt_ae.state_dict(),
                               "discriminator": opt_d.state_dict() if opt_d else None}}

    def save_figure(step: int) -> None:
        sheet = figures.transfer_figure(ae, figure_batch[:FIGURE_IMAGES], figure_batch[FIGURE_IMAGES:])
        figures.save_png(sheet, out / "figures" / f"transfer_{step:07d}.png")
        figures.save_png(sheet, out / "transfer.png")

    is_main = rank == 0
    metrics = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            checkpoint.save_atomic(state(0), ckpt_path)  # a loadable file exists from the start
        metrics = _Metrics(out / "metrics.csv", start)

    loader = DataLoader(train_set, batch_sampler=PairBatches(len(train_set), tc.batch_size, tc.seed,
                                                             rank, start, tc.steps),
                        num_workers=workers, pin_memory=dev.type == "cuda",
                        persistent_workers=False)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tc.bf16 and dev.type == "cuda"
                else nullcontext())
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    t0 = t_last = time.perf_counter()
    last_step = start
    step = start
    try:
        for step, batch in enumerate(loader, start=start):
            x1, x2 = batch.to(dev, non_blocking=True).chunk(2)
            mask = draw_mask(tc, cfg.n_chunks, rank, step).to(dev)
            lr = tc.lr * tc.lr_decay ** (step // tc.lr_decay_every)  # staircase decay
            for opt in (opt_ae, opt_d):
                for group in (opt.param_groups if opt else ()):
                    group["lr"] = lr

            # phase 1: encoder, decoder, classifier minimise λ_M L_M + λ_G L_G + λ_C L_C
            values: dict[str, torch.Tensor] = {}
            with autocast:
                o = ae_step(x1, x2, mask)
                if "x4" in o:
                    values["loss_mix"] = losses.mixing_loss(o["x4"].float(), x1)
                if "rec" in o:
                    values["loss_rec"] = losses.mixing_loss(o["rec"].float(), x1)
                if "cls" in o:
                    values["loss_c"] = losses.classifier_loss(o["cls"].float(), mask)
                if critic:
                    critic.requires_grad_(False)  # the generator side must not step the critic
                    if cfg.gan == "began":
                        values["loss_g"] = losses.began_energy(o["x3"].float(), critic.dsc(o["x3"]).float())
                    else:
                        values["loss_g"] = losses.dcgan_generator_loss(critic.dsc(o["x3"]).float())
                    critic.requires_grad_(True)
            total = (cfg.lambda_m * (values.get("loss_mix", 0) + values.get("loss_rec", 0))
                     + cfg.lambda_g * values.get("loss_g", 0) + cfg.lambda_c * values.get("loss_c", 0))
            values["loss_total"] = total
            if not math.isfinite(total.item()):
                raise RetrievalError(f"the loss became {total.item()} at step {step}; training stopped and "
                                     f"{ckpt_path} keeps the last good weights (lower the learning rate, "
                                     "or use --variant/--preset settings that are stable)")
            opt_ae.zero_grad(set_to_none=True)
            total.backward()
            opt_ae.step()

            # phase 2: the discriminator tells real x1 from mixed x3
            if critic:
                fake = o["x3"].detach()
                with autocast:
                    real_out, fake_out = critic_step(x1, fake)
                    if cfg.gan == "began":
                        e_real = losses.began_energy(x1, real_out.float())
                        e_fake = losses.began_energy(fake, fake_out.float())
                        loss_d = losses.began_discriminator_loss(e_real, e_fake, began_k)
                    else:
                        loss_d = losses.dcgan_discriminator_loss(real_out.float(), fake_out.float())
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                values["loss_d"] = loss_d
                if cfg.gan == "began":
                    began_k = losses.began_k_update(began_k, e_real.item(), e_fake.item(), cfg.began_gamma)

            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                rate = (done - last_step) * tc.batch_size * world / max(now - t_last, 1e-9)
                t_last, last_step = now, done
                row = {k: f"{v.item():.5f}" for k, v in values.items()}
                if is_main:
                    metrics.write({**row, "step": done, "lr": f"{lr:.3g}", "began_k": f"{began_k:.4f}",
                                   "pairs_per_s": f"{rate:.1f}", "elapsed_s": f"{now - t0:.1f}"})
                bar.set_postfix({k.removeprefix("loss_"): v for k, v in row.items()} | {"pairs/s": f"{rate:.0f}"})
            if is_main and (done % tc.checkpoint_every == 0 or done == tc.steps):
                checkpoint.save_atomic(state(done), ckpt_path)
            if is_main and (done % tc.figure_every == 0 or done == tc.steps):
                save_figure(done)
        if is_main and tc.steps <= start:
            log.info("checkpoint is already at step %d >= --steps %d; nothing to do", start, tc.steps)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return ae
