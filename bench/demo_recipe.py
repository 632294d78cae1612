"""The seed table behind the demo's setting (docs/results.md, "The demo's setting"): train the
demo's model on the built-in shapes the way `retrieval demo` does, with JSON overrides of the
`shapes` preset and of the demo's training options, once per seed; index, evaluate on `val` and
print, per seed, each factor's best and runner-up chunk mAP, which factors one chunk holds alone
(the demo's rule), the average best-chunk mAP and the reconstruction error of the `val` images.

    OMP_NUM_THREADS=1 python bench/demo_recipe.py --name base --seeds 0 1 2 --steps 4000

One JSON line per seed goes to OUT/NAME/seeds.jsonl; every seed's run and index stay under
OUT/NAME/seed<S>/.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from disentangle import checkpoint
from disentangle.config import TrainConfig, preset
from disentangle.data import open_dataset
from disentangle.train import train
from indexer.build import build_index
from retrieval.cli import DEMO_TRAINING, _rendering
from retrieval.evaluate import default_split, evaluate_index, reconstruction_error
from retrieval.index import Index


def one_seed(ds, spec: str, cfg, tc: TrainConfig, out: Path) -> dict:
    ckpt = out / "run" / "checkpoint.pt"
    if not (ckpt.exists() and checkpoint.load(ckpt)["step"] >= tc.steps):  # else evaluate again
        train(ds, cfg, tc, out / "run", device="cpu", resume=ckpt.exists(),
              data_info={"spec": spec, "format": "shapes", **_rendering("shapes")})
    minutes = checkpoint.load(ckpt)["train_seconds"] / 60  # the trainer's clock, resumes included
    build_index(spec, ckpt, out / "index")
    idx = Index(out / "index")
    report = evaluate_index(idx, default_split(idx), probe_chunks=False)
    table, apart = report["table2"], report["separated"]
    row = {"seed": tc.seed, "minutes": round(minutes, 2), "average": report["average"]["best"],
           "random": report["average"]["random"], "mse": round(reconstruction_error(idx.model, ds)[0], 5),
           "apart": {a: v["chunk"] for a, v in apart.items()},
           "chunks_apart": len({v["chunk"] for v in apart.values()}),
           "best_next": {a: sorted(r["map"], reverse=True)[:2] for a, r in table.items()}}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="Setting name: OUT/NAME holds its runs.")
    ap.add_argument("--cfg", default="{}", help="JSON overrides of the shapes preset.")
    ap.add_argument("--tc", default="{}", help="JSON overrides of the demo's training options.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--out", default="runs/demo-recipe")
    a = ap.parse_args()
    cfg = replace(preset("shapes"), **json.loads(a.cfg))
    spec = f"shapes:{a.images}"
    ds = open_dataset(spec, size=cfg.image_size)
    root = Path(a.out) / a.name
    root.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        tc = TrainConfig(**{**DEMO_TRAINING, "steps": a.steps, "checkpoint_every": a.steps,
                            "figure_every": a.steps, **json.loads(a.tc), "seed": seed})
        row = one_seed(ds, spec, cfg, tc, root / f"seed{seed}")
        with (root / "seeds.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(a.name, f"seed {seed}: {len(row['apart'])} apart in {row['chunks_apart']} chunks "
              f"({', '.join(f'{k}:{v}' for k, v in row['apart'].items())}), average {row['average']:.3f}, "
              f"mse {row['mse']:.4f}, {row['minutes']} min;",
              " ".join(f"{k} {b:.3f}/{n:.3f}" for k, (b, n) in row["best_next"].items()), flush=True)
    rows = [json.loads(line) for line in (root / "seeds.jsonl").open()]
    print(a.name, f"over {len(rows)} seeds: apart {[len(r['apart']) for r in rows]}, "
          f"average {np.mean([r['average'] for r in rows]):.3f}, mse {np.mean([r['mse'] for r in rows]):.4f}")


if __name__ == "__main__":
    main()
