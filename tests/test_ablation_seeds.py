"""bench/ablation_seeds.py: the seed table's means and extremes against numpy, and the ordering check."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ATTRS = ["body", "pose"]


def _write(out: Path, seed: int, averages: dict[str, float]) -> None:
    variants = {v: {"steps": 10 + seed, "best": {a: avg + 0.01 * i for i, a in enumerate(ATTRS)},
                    "best_chunk": {a: 0 for a in ATTRS}, "average": avg, "whole_feature": v == "ae"}
                for v, avg in averages.items()}
    result = {"preset": "tiny", "steps": None, "minutes": 20, "seed": seed, "eval_split": "val",
              "attributes": ATTRS, "random": {a: 0.1 for a in ATTRS}, "random_average": 0.1, "variants": variants}
    (out / f"seed{seed}").mkdir(parents=True)
    (out / f"seed{seed}" / "ablation.json").write_text(json.dumps(result))


def _run(out: Path) -> str:
    return subprocess.run([sys.executable, str(REPO / "bench" / "ablation_seeds.py"), str(out)],
                          capture_output=True, text=True, check=True).stdout


def test_means_extremes_and_ordering(tmp_path):
    runs = {0: {"mix+c+g": 0.6, "mix": 0.5, "ae": 0.4}, 1: {"mix+c+g": 0.55, "mix": 0.56, "ae": 0.3}}
    for seed, averages in runs.items():
        _write(tmp_path, seed, averages)
    out = _run(tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| MIX+C+G |")).split(" | ")
    avgs = [0.6, 0.55]
    assert [float(c) for c in row[3:8]] == [0.6, 0.55, round(np.mean(avgs), 3), min(avgs), max(avgs)]
    assert float(row[1]) == round(np.mean(avgs), 3)  # body: the mean over the seeds
    assert row[8].strip(" |") == "10 / 11"
    assert "MIX+C+G > MIX > AE on 1 of 2 seeds" in out  # seed 1 has MIX above MIX+C+G


def test_runs_of_different_budgets_are_refused(tmp_path):
    _write(tmp_path, 0, {"mix": 0.5})
    _write(tmp_path, 1, {"mix": 0.5})
    path = tmp_path / "seed1" / "ablation.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "minutes": 10}))
    result = subprocess.run([sys.executable, str(REPO / "bench" / "ablation_seeds.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "like with like" in result.stderr
