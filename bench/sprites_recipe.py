"""The recipe search behind the `sprites-cpu` preset (docs/results.md, "Sprites on the CPU"):
train one variant of a preset on the Sprites train split for a wall-time budget and print
Table 2's best-chunk mAP on every other frame of `val` (6,408 images, a quarter of the full
protocol's cost) every few minutes, with the reconstruction error and the losses.

Overrides of the preset's ModelConfig and of the training options are JSON, so that any
setting can be tried without a preset of its own; the trainer is the project's MixingTrainer.
The evaluation minutes are not counted as training minutes. One JSON line per evaluation goes
to OUT/NAME/log.jsonl, the final weights to OUT/NAME/model.pt (with `--ema`, their moving
average beside them, evaluated at each evaluation too). When the preset groups dependent chunks
(group_ratio), each evaluation also reads the grouped model, as `retrieval train` would serve it.

    OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name e2 --preset shapes \\
        --cfg '{"lambda_m": 10, "lambda_rec": 10}' --tc '{"batch_size": 64}' --minutes 12
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from disentangle import grouping
from disentangle.config import RECIPES, TrainConfig, preset
from disentangle.data import open_dataset
from disentangle.step import MixingTrainer
from disentangle.train import sample_mask
from retrieval.evaluate import EXCLUDED, encode, map_table


def load(root: str, split: str, size: int, cache: Path) -> tuple[np.ndarray, dict]:
    """(N, size, size, 3) uint8 frames of one split and its label codes, decoded once."""
    path = cache / f"{split}_{size}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        return z["pixels"], z["labels"].item()
    ds = open_dataset(root, size=size, split=split)
    labels = {a: encode([r.attributes[a] for r in ds.records])
              for a in ds.attribute_names if a not in EXCLUDED["sprites"]}
    cache.mkdir(parents=True, exist_ok=True)
    # renamed once whole: a killed run leaves no torn cache; the pid keeps two runs' writes apart
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, pixels=ds.pixels, labels=np.array(labels, dtype=object))
    tmp.replace(path)
    return ds.pixels, labels


def as_batch(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


def evaluate(model, pixels: np.ndarray, labels: dict, every: int = 2, queries: int | None = None) -> dict:
    """Best-chunk mAP per attribute on every `every`-th frame, and the reconstruction MSE.

    Every other frame keeps 89 of the 178 poses, so pose reads higher than in the full protocol
    (docs/results.md); the character attributes agree with it. queries: Table 2 from that many
    drawn query frames (retrieval.evaluate.map_table), for a quick look; default all."""
    model.eval()
    keep = np.arange(0, len(pixels), every)
    with torch.no_grad():
        feats = torch.cat([model.encode(as_batch(pixels[keep[i:i + 512]]))
                           for i in range(0, len(keep), 512)]).numpy()   # (n, chunks, dim)
        x = as_batch(pixels[keep[:2048]])
        mse = float(((model.decode(model.encode(x)) - x) ** 2).mean())
    model.train()
    table = map_table(feats, {a: v[keep] for a, v in labels.items()}, queries=queries)
    best = {a: max(r["map"]) for a, r in table.items()}
    return {"best": best, "chunk": {a: int(np.argmax(r["map"])) for a, r in table.items()},
            "random": {a: r["random"] for a, r in table.items()},
            "per_chunk": {a: r["map"] for a, r in table.items()},
            "avg": float(np.mean(list(best.values()))), "mse": mse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="Run name: OUT/NAME holds its log and weights.")
    ap.add_argument("--data", default="../shared/data/sprites")
    ap.add_argument("--preset", default="sprites-cpu", help="The ModelConfig to start from.")
    ap.add_argument("--cfg", default="{}", help="JSON overrides of the ModelConfig.")
    ap.add_argument("--tc", default="{}", help="JSON overrides of the training options.")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--eval-every", type=float, default=5, help="Minutes between evaluations.")
    ap.add_argument("--anneal", type=float, default=0.0,
                    help="Fraction of the budget at its end over which lr falls linearly to 0.")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="Also evaluate an exponential moving average of the weights with this decay.")
    ap.add_argument("--eval-queries", type=int, help="Query frames drawn per evaluation (default: all of them).")
    ap.add_argument("--out", default="runs/recipe")
    a = ap.parse_args()
    cfg = replace(preset(a.preset), **json.loads(a.cfg))
    # the sprites-cpu recipe's batch, lr and masks, no decay inside a budget of minutes
    recipe = {k: v for k, v in RECIPES["sprites-cpu"].items() if k not in ("minutes", "steps")}
    tc = TrainConfig(**{**recipe, "lr_decay_every": 1 << 40, **json.loads(a.tc)})
    cache = Path(a.out) / "cache"
    pixels = torch.from_numpy(load(a.data, "train", cfg.image_size, cache)[0])
    val_pixels, val_labels = load(a.data, "val", cfg.image_size, cache)
    trainer = MixingTrainer(cfg, tc, torch.device("cpu"))
    ema = (torch.optim.swa_utils.AveragedModel(trainer.ae, use_buffers=True,
                                               multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(a.ema))
           if a.ema else None)
    g = torch.Generator().manual_seed(tc.seed)
    run = Path(a.out) / a.name
    run.mkdir(parents=True, exist_ok=True)
    step, trained, losses = 0, 0.0, {}
    with (run / "log.jsonl").open("w") as log:
        while trained < a.minutes * 60:
            t0 = time.perf_counter()
            next_eval = min(trained + a.eval_every * 60, a.minutes * 60)
            while (now := trained + time.perf_counter() - t0) < next_eval:
                if a.anneal:  # linear to 0 over the budget's last fraction
                    left = (a.minutes * 60 - now) / (a.anneal * a.minutes * 60)
                    trainer.set_lr(tc.lr * min(1.0, max(left, 0.0)))
                x1, x2 = as_batch(pixels[torch.randint(len(pixels), (2 * tc.batch_size,), generator=g)]).chunk(2)
                mask = sample_mask(tc, cfg.n_chunks, g)
                values = trainer.warmup_step(x1, x2) if step < tc.warmup_steps else trainer.step(x1, x2, mask)
                step += 1
                if ema is not None:
                    ema.update_parameters(trainer.ae)
            trained += time.perf_counter() - t0
            losses = {k: round(float(v), 4) for k, v in values.items()}
            result = {**evaluate(trainer.ae, val_pixels, val_labels, queries=a.eval_queries), "step": step,
                      "minutes": round(trained / 60, 2), "pairs_per_s": round(step * tc.batch_size / trained, 1),
                      "losses": losses}
            if ema is not None:
                result["ema"] = evaluate(ema.module, val_pixels, val_labels, queries=a.eval_queries)
            if cfg.group_ratio:  # the same weights as `retrieval train` serves them: dependent chunks as one
                drawn = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(tc.seed))
                groups = grouping.groups_on(trainer.ae, as_batch(pixels[drawn[:grouping.SAMPLE]]),
                                            cfg.group_ratio, tc.seed)
                grouped, _ = grouping.regroup(trainer.ae, cfg, groups)
                result["grouped"] = {**evaluate(grouped, val_pixels, val_labels, queries=a.eval_queries),
                                     "groups": groups}
            log.write(json.dumps(result) + "\n")
            log.flush()
            print(a.name, f"step {step} ({result['minutes']} min, {result['pairs_per_s']} pairs/s): "
                  f"average {result['avg']:.3f}, mse {result['mse']:.4f};",
                  " ".join(f"{k} {v:.3f}" for k, v in result["best"].items()),
                  f"| ema average {result['ema']['avg']:.3f}, mse {result['ema']['mse']:.4f}" if ema else "",
                  f"| grouped ({len(result['grouped']['groups'])} chunks) average {result['grouped']['avg']:.3f}; "
                  + " ".join(f"{k} {v:.3f}" for k, v in result["grouped"]["best"].items()) if cfg.group_ratio else "",
                  flush=True)
    torch.save({"model_config": cfg.to_dict(), "autoencoder": trainer.ae.state_dict(),
                **({"autoencoder_ema": ema.module.state_dict()} if ema else {})}, run / "model.pt")


if __name__ == "__main__":
    main()
