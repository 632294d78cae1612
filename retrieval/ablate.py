"""The paper's ablation (Table 2): train each variant with one budget (steps, or minutes of
training each) and seed and the preset's recipe, index the evaluation split, evaluate, and
tabulate. OUT/<variant>/ holds run/, index/ and report.json; a rerun reuses every variant whose
checkpoint and report already match the request.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from disentangle import checkpoint
from disentangle.config import RECIPES, VARIANTS, TrainConfig, preset
from disentangle.data import open_dataset
from disentangle.errors import RetrievalError
from disentangle.train import train
from indexer.build import build_index

from .evaluate import evaluate_index
from .index import Index
from .report import ablation_markdown, write_report

log = logging.getLogger(__name__)


def parse_variants(text: str) -> list[str]:
    """'ae,mix+c+g' -> ['ae', 'mix+c+g'], each a Table 2 variant, none twice."""
    variants = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        raise RetrievalError(f"--variants {text!r}: choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise RetrievalError(f"--variants {text!r} lists a variant twice")
    return variants


def training_config(preset_name: str, variant: str, steps: int | None, minutes: float, *,
                    batch_size: int | None, seed: int) -> TrainConfig:
    """One variant's options: the preset's recipe, with the ablation's budget, batch and seed."""
    recipe = {**RECIPES.get(preset_name, {}), **({"batch_size": batch_size} if batch_size else {})}
    if steps is not None:  # a budget given replaces the recipe's (its steps and its minutes)
        recipe.update(steps=steps, minutes=minutes)
    elif minutes:  # the time budget alone decides where each variant stops
        recipe.update(steps=1 << 40, minutes=minutes)
    every = max(recipe.get("steps", TrainConfig.steps) // 4, 1) if not recipe.get("minutes") else 1000
    return TrainConfig(**recipe, variant=variant, seed=seed,
                       checkpoint_every=every, figure_every=every)


def _finished(ckpt: dict, tc: TrainConfig) -> bool:
    """Whether the run in `ckpt` has spent the budget asked for now (steps or minutes)."""
    return ckpt["step"] >= tc.steps or (tc.minutes > 0 and ckpt.get("train_seconds", 0.0) >= tc.minutes * 60)


def run_variant(data: str, preset_name: str, tc: TrainConfig, out: Path, *, eval_split: str | None,
                fmt: str | None, device: str, progress: bool) -> dict:
    """Train (or resume) one variant to its budget, index `eval_split`, evaluate; the report dict."""
    run, index_dir, report_path = out / "run", out / "index", out / "report.json"
    ckpt_path = run / "checkpoint.pt"
    ckpt = checkpoint.load(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None:
        step, saved = ckpt["step"], ckpt["train_config"]
        asked = {"variant": tc.variant, "seed": tc.seed, "batch_size": tc.batch_size, "lr": tc.lr,
                 "mask": tc.mask, "minutes": tc.minutes}
        name = ckpt["model_config"]["name"]
        if step > tc.steps or any(saved.get(k) != v for k, v in asked.items()) or name != preset_name:
            raise RetrievalError(f"{run} holds a {name} {saved['variant']} run (seed {saved['seed']}, "
                                 f"batch {saved['batch_size']}, lr {saved['lr']}, {saved['mask']} masks, "
                                 f"{saved.get('minutes', 0)} minutes, step {step}), not this request; "
                                 "choose another --out")
    done = ckpt is not None and _finished(ckpt, tc)
    if done and report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == ckpt["step"] and report.get("split") == eval_split:
            log.info("%s: reusing %s (step %d)", tc.variant, report_path, ckpt["step"])
            return report
    if not done:
        cfg = preset(preset_name)
        ds = open_dataset(data, size=cfg.image_size, format=fmt)
        log.info("%s: training %s (%s)", tc.variant, preset_name,
                 f"{tc.minutes:g} minutes" if tc.minutes else f"{tc.steps} steps")
        train(ds, cfg, tc, run, device=device, resume=ckpt is not None, progress=progress,
              data_info={"spec": str(data), "format": ds.format})
    # a checkpoint that moved on since the index was built invalidates the index
    build_index(data, ckpt_path, index_dir, fmt=fmt, split=eval_split, rebuild=not done,
                device=device, progress=progress)
    report = evaluate_index(Index(index_dir), eval_split, progress=progress)
    report["steps"] = checkpoint.load(ckpt_path)["step"]
    write_report(report, out)
    return report


def ablate(data: str, preset_name: str, variants: Sequence[str], steps: int | None, out: str | Path, *,
           minutes: float = 0.0, batch_size: int | None = None, seed: int = 0,
           eval_split: str | None = "val", fmt: str | None = None, device: str = "auto",
           progress: bool = False) -> dict:
    """Every variant's best-chunk mAP per attribute, the Random row, and the averages;
    written to OUT/ablation.json and OUT/ablation.md."""
    if steps is None and not minutes:
        raise RetrievalError("give the budget of each variant: --steps N, --minutes M, or both")
    out = Path(out)
    configs = {v: training_config(preset_name, v, steps, minutes, batch_size=batch_size, seed=seed)
               for v in variants}
    reports = {v: run_variant(data, preset_name, tc, out / v, eval_split=eval_split, fmt=fmt,
                              device=device, progress=progress)
               for v, tc in configs.items()}
    first = next(iter(reports.values()))
    attrs = first["attributes"]
    tc = next(iter(configs.values()))
    result = {
        "data": str(data), "preset": preset_name, "steps": steps, "minutes": minutes,
        "batch_size": tc.batch_size, "lr": tc.lr, "mask": tc.mask,
        "seed": seed, "eval_split": eval_split, "attributes": attrs,
        "random": {a: first["table2"][a]["random"] for a in attrs},
        "random_average": first["average"]["random"],
        "variants": {v: {"steps": r["steps"], "best": {a: r["best"][a]["map"] for a in attrs},
                         "best_chunk": {a: r["best"][a]["chunk"] for a in attrs},
                         "average": r["average"]["best"], "whole_feature": r["whole_feature"]}
                     for v, r in reports.items()},
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(ablation_markdown(result) + "\n")
    return result
