"""Encoding throughput for `retrieval index`: images/s from JPEG files on disk to a written index,
CelebA-sized (178x218 JPEGs, the celeba-dcgan encoder), and where the time goes.

Three numbers from one run, each a median over repeats where cheap:
  decode  - the data pipeline alone (read + decode + crop + resize, DataLoader workers)
  encode  - the encoder alone on in-memory batches (the device's compute)
  index   - the whole `build_index` (decode -> encode -> FAISS + SQLite writes)
The smaller of decode and encode bounds the whole; index shows what the writes add.

    python bench/encode_bench.py [--n 2000] [--device cpu|cuda] [--workers 2] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from disentangle import checkpoint
from disentangle.config import PRESETS, TrainConfig
from disentangle.data import open_dataset
from disentangle.step import MixingTrainer
from indexer.build import build_index


def _write_jpegs(args: tuple[Path, int, int]) -> None:
    from PIL import Image

    folder, start, stop = args
    rng = np.random.default_rng(start)
    base = rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)
    for i in range(start, stop):  # smooth-ish content so JPEG sizes are realistic (~10 KB)
        img = np.roll(base, i % 97, axis=1) // 2 + (i % 128)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i + 1:06d}.jpg", quality=90)


def make_celeba(root: Path, n: int) -> None:
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    step = max(1, n // (4 * (os.cpu_count() or 1)))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpegs, [(folder, s, min(s + step, n)) for s in range(0, n, step)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = PRESETS["celeba-dcgan"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_celeba(tmp / "celeba", args.n)
        print(f"wrote {args.n} JPEGs (178x218) in {time.perf_counter() - t:.1f} s")
        trainer = MixingTrainer(cfg, TrainConfig(steps=0), torch.device("cpu"))
        ckpt = {"format": checkpoint.FORMAT_VERSION, "step": 0, "model_config": cfg.to_dict(),
                "train_config": trainer.tc.to_dict(), **trainer.state_dict()}
        checkpoint.save_atomic(ckpt, tmp / "model.pt")

        ds = open_dataset(tmp / "celeba", size=cfg.image_size)
        t = time.perf_counter()
        for _ in DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers):
            pass
        decode = len(ds) / (time.perf_counter() - t)

        model = trainer.ae.to(dev).eval()
        x = torch.rand(args.batch_size, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and dev.type == "cuda")
        times = []
        with torch.no_grad(), autocast:
            for r in range(6):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.encode(x).float().cpu()
                times.append(time.perf_counter() - t)
        encode = args.batch_size / statistics.median(times[1:])

        t = time.perf_counter()
        report = build_index(str(tmp / "celeba"), tmp / "model.pt", tmp / "idx", device=args.device,
                             bf16=args.bf16, workers=args.workers, batch_size=args.batch_size)
        whole = report.added / (time.perf_counter() - t)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndevice: {name}; {args.n} JPEGs; workers {args.workers}; batch {args.batch_size}\n")
    print("| stage | images/s |")
    print("|---|---|")
    print(f"| decode + crop + resize (DataLoader, {args.workers} workers) | {decode:.0f} |")
    print(f"| encoder alone ({'bf16' if args.bf16 else 'fp32'}) | {encode:.0f} |")
    print(f"| `build_index` end to end | {whole:.0f} |")
    print(f"\nbottleneck: {'decoding' if decode < encode else 'the encoder'}")


if __name__ == "__main__":
    main()
