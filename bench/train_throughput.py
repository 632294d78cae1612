"""Training throughput (pairs/s) of each preset: our step next to a plain fp32 eager reference.

The reference is written here from the paper alone (two encoder calls, two decoder calls, the
classifier and a DCGAN/BEGAN discriminator step, plain Adam) over the same networks, so the
ratio shows what the trainer's own choices buy on this device. Medians over repeats, one run.

    python bench/train_throughput.py [--device cpu|cuda] [--batch-size 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from disentangle.config import PRESETS, TrainConfig
from disentangle.model import ChunkClassifier, Decoder, Discriminator, Encoder
from disentangle.step import MixingTrainer


class ReferenceStep:
    """The paper's full objective (MIX+C+G), written plainly: fp32, eager, no fusion."""

    def __init__(self, cfg, device):
        torch.manual_seed(0)
        self.cfg = cfg
        self.enc, self.dec = Encoder(cfg).to(device), Decoder(cfg).to(device)
        self.cls, self.dsc = ChunkClassifier(cfg).to(device), Discriminator(cfg).to(device)
        gen_params = [*self.enc.parameters(), *self.dec.parameters(), *self.cls.parameters()]
        self.opt_g = torch.optim.Adam(gen_params, lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.dsc.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def __call__(self, x1, x2, m):
        f1, f2 = self.enc(x1), self.enc(x2)
        mm = m.float()[None, :, None]
        x3 = self.dec(mm * f1 + (1 - mm) * f2)
        f3 = self.enc(x3)
        x4 = self.dec(mm * f3 + (1 - mm) * f1)
        loss_m = ((x4 - x1) ** 2).mean()
        logits = self.cls(x1, x2, x3)
        loss_c = F.binary_cross_entropy_with_logits(logits, m.float().expand_as(logits))
        d_fake = self.dsc(x3)
        if self.cfg.gan == "began":
            loss_g = (x3 - d_fake).abs().mean()
        else:
            loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        loss = self.cfg.lambda_m * loss_m + self.cfg.lambda_g * loss_g + self.cfg.lambda_c * loss_c
        rec = None
        if self.cfg.lambda_rec:  # the presets that also reconstruct x1 and x2 directly
            x = torch.cat([x1, x2])
            rec = self.dec(torch.cat([f1, f2]))
            loss = loss + self.cfg.lambda_rec * ((rec - x) ** 2).mean()
        real = x1
        if self.cfg.critic_real == "reconstruction":  # the critic's real side: Dec(Enc(x1))
            real = (rec[: len(x1)] if rec is not None else self.dec(f1)).detach()
        if self.cfg.lambda_feat:  # the latent cycle on the mixed image
            f = torch.cat([f1, f2]).flatten(1)
            cycle = ((f3 - (mm * f1 + (1 - mm) * f2)) ** 2).mean() / f.var(0).mean()
            loss = loss + self.cfg.lambda_feat * cycle
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()
        x3 = x3.detach()
        d_real, d_fake = self.dsc(real), self.dsc(x3)
        if self.cfg.gan == "began":
            k = 0.0  # BEGAN's k_0; its value does not change the cost of the step
            loss_d = (real - d_real).abs().mean() - k * (x3 - d_fake).abs().mean()
        else:
            loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        return loss_d.item()  # one sync per step, as a training loop that logs would do


def _timed(step, batch, mask, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step(*batch, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def compare(ref, ours, batch, n_chunks, device, repeats):
    """Median pairs/s of both steps, timed alternately so machine noise hits both alike."""
    mask = (torch.arange(n_chunks, device=device) % 2 == 0)  # half the chunks from each image
    for step in (ref, ours, ref, ours):  # warm-up: allocator, kernels, Adam state
        step(*batch, mask)
    times = {"ref": [], "ours": []}
    for _ in range(repeats):
        times["ref"].append(_timed(ref, batch, mask, device))
        times["ours"].append(_timed(ours, batch, mask, device))
    return {k: len(batch[0]) / statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default="tiny,shapes,mnist,sprites,celeba-dcgan,celeba-began")
    ap.add_argument("--bf16", action="store_true", help="our step with bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true", help="our step with NHWC activations")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    ours = "+".join(["fp32" if not args.bf16 else "bf16"] + (["channels-last"] if args.channels_last else [])
                    + (["fused Adam"] if device.type == "cuda" else []))
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size} pairs; "
          f"median of {args.repeats} steps; ours = {ours}\n")
    print("| preset | image | reference fp32 eager (pairs/s) | ours (pairs/s) | ratio |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        cfg = PRESETS[preset]
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(2 * args.batch_size, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1).to(device)
        batch = tuple(x.chunk(2))
        trainer = MixingTrainer(cfg, TrainConfig(batch_size=args.batch_size, bf16=args.bf16,
                                                 channels_last=args.channels_last), device)
        r = compare(ReferenceStep(cfg, device), trainer.step, batch, cfg.n_chunks, device, args.repeats)
        size = cfg.image_size
        print(f"| {preset} | {size}x{size} | {r['ref']:.1f} | {r['ours']:.1f} | {r['ours'] / r['ref']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
