"""The seed spread of `retrieval ablate` runs: reads OUT/seed*/ablation.json (one ablation per
seed, same variants, budget and recipe) and prints, per variant, each seed's average best-chunk
mAP, their mean, min and max, the mean per attribute, and the steps each run trained; then
whether the paper's ordering (MIX+C+G > MIX > AE) holds seed by seed.

    python bench/ablation_seeds.py runs/abl20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.report import markdown_table  # noqa: E402

ORDER = ("mix+c+g", "mix", "ae")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder holding one seed*/ablation.json per seed")
    args = ap.parse_args()
    runs = {}
    for path in sorted(args.out.glob("seed*/ablation.json")):
        result = json.loads(path.read_text())
        runs[result["seed"]] = result
    if not runs:
        raise SystemExit(f"no seed*/ablation.json under {args.out}")
    first = next(iter(runs.values()))
    attrs, seeds = first["attributes"], sorted(runs)
    for r in runs.values():
        if r["attributes"] != attrs or r["minutes"] != first["minutes"] or r["steps"] != first["steps"]:
            raise SystemExit("the runs differ in attributes or budget; compare like with like")
    variants = [v for v in first["variants"] if all(v in r["variants"] for r in runs.values())]
    head = ["method", *attrs, *[f"seed {s}" for s in seeds], "mean", "min", "max", "steps"]
    rows = [["Random", *[first["random"][a] for a in attrs], *[runs[s]["random_average"] for s in seeds],
             np.mean([runs[s]["random_average"] for s in seeds]), "", "", ""]]
    for v in variants:
        per_seed = [runs[s]["variants"][v] for s in seeds]
        avgs = [r["average"] for r in per_seed]
        rows.append([v.upper(), *[np.mean([r["best"][a] for r in per_seed]) for a in attrs], *avgs,
                     np.mean(avgs), min(avgs), max(avgs), " / ".join(str(r["steps"]) for r in per_seed)])
    budget = f"{first['minutes']:g} minutes" if first["minutes"] else f"{first['steps']} steps"
    print(f"{first['preset']}, {budget} per variant, seeds {', '.join(map(str, seeds))}, split "
          f"{first['eval_split']}; attribute columns are means over the seeds\n")
    print(markdown_table(head, rows))
    ranked = [v for v in ORDER if v in variants]
    if len(ranked) > 1:
        holds = [all(runs[s]["variants"][a]["average"] > runs[s]["variants"][b]["average"]
                     for a, b in zip(ranked, ranked[1:])) for s in seeds]
        print(f"\n{' > '.join(v.upper() for v in ranked)} on {sum(holds)} of {len(seeds)} seeds")


if __name__ == "__main__":
    main()
