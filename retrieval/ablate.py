"""The paper's ablation (Table 2): train each variant with one budget and seed, index the
evaluation split, evaluate, and tabulate. OUT/<variant>/ holds run/, index/ and report.json;
a rerun reuses every variant whose checkpoint and report already match the request.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from disentangle import checkpoint
from disentangle.config import VARIANTS, TrainConfig, preset
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


def run_variant(data: str, preset_name: str, variant: str, steps: int, out: Path, *,
                batch_size: int, seed: int, eval_split: str | None, fmt: str | None,
                device: str, progress: bool) -> dict:
    """Train (or resume) one variant to `steps`, index `eval_split`, evaluate; the report dict."""
    run, index_dir, report_path = out / "run", out / "index", out / "report.json"
    ckpt_path = run / "checkpoint.pt"
    step = None
    if ckpt_path.exists():
        ckpt = checkpoint.load(ckpt_path)
        step, tc = ckpt["step"], ckpt["train_config"]
        asked = {"variant": variant, "seed": seed, "batch_size": batch_size}
        name = ckpt["model_config"]["name"]
        if step > steps or any(tc[k] != v for k, v in asked.items()) or name != preset_name:
            raise RetrievalError(f"{run} holds a {name} {tc['variant']} run (seed "
                                 f"{tc['seed']}, batch {tc['batch_size']}, step {step}), not this request; "
                                 "choose another --out")
    if step == steps and report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == step and report.get("split") == eval_split:
            log.info("%s: reusing %s (step %d)", variant, report_path, step)
            return report
    if step is None or step < steps:
        cfg = preset(preset_name)
        ds = open_dataset(data, size=cfg.image_size, format=fmt)
        tc = TrainConfig(steps=steps, batch_size=batch_size, variant=variant, seed=seed,
                         checkpoint_every=max(steps // 4, 1), figure_every=max(steps, 1))
        log.info("%s: training %s to step %d", variant, preset_name, steps)
        train(ds, cfg, tc, run, device=device, resume=step is not None, progress=progress,
              data_info={"spec": str(data), "format": ds.format})
    # a checkpoint that moved on since the index was built invalidates the index
    build_index(data, ckpt_path, index_dir, fmt=fmt, split=eval_split, rebuild=step != steps,
                device=device, progress=progress)
    report = evaluate_index(Index(index_dir), eval_split)
    report["steps"] = checkpoint.load(ckpt_path)["step"]
    write_report(report, out)
    return report


def ablate(data: str, preset_name: str, variants: Sequence[str], steps: int, out: str | Path, *,
           batch_size: int = 64, seed: int = 0, eval_split: str | None = "val",
           fmt: str | None = None, device: str = "auto", progress: bool = False) -> dict:
    """Every variant's best-chunk mAP per attribute, the Random row, and the averages;
    written to OUT/ablation.json and OUT/ablation.md."""
    out = Path(out)
    reports = {v: run_variant(data, preset_name, v, steps, out / v, batch_size=batch_size, seed=seed,
                              eval_split=eval_split, fmt=fmt, device=device, progress=progress)
               for v in variants}
    first = next(iter(reports.values()))
    attrs = first["attributes"]
    result = {
        "data": str(data), "preset": preset_name, "steps": steps, "batch_size": batch_size,
        "seed": seed, "eval_split": eval_split, "attributes": attrs,
        "random": {a: first["table2"][a]["random"] for a in attrs},
        "random_average": first["average"]["random"],
        "variants": {v: {"best": {a: r["best"][a]["map"] for a in attrs},
                         "best_chunk": {a: r["best"][a]["chunk"] for a in attrs},
                         "average": r["average"]["best"], "whole_feature": r["whole_feature"]}
                     for v, r in reports.items()},
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(ablation_markdown(result) + "\n")
    return result
