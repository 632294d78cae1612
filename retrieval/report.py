"""Evaluation reports as people read them: Table 2/3 style markdown and a chunk x attribute heat map."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .evaluate import lift

PAPER_TABLE2 = {  # Sprites, paper Table 2: for reference next to our tables
    "attributes": ["body", "skin", "vest", "hair", "arm", "leg", "pose"],
    "rows": {"Random": [0.5, 0.25, 0.33, 0.17, 0.5, 0.5, 0.006, 0.32],
             "C+G": [0.53, 0.31, 0.41, 0.24, 0.51, 0.52, 0.06, 0.37],
             "AE": [0.56, 0.37, 0.40, 0.31, 0.54, 0.56, 0.46, 0.46],
             "AE+C+G": [0.59, 0.50, 0.53, 0.46, 0.56, 0.54, 0.44, 0.52],
             "MIX": [0.57, 0.61, 0.51, 0.62, 0.54, 0.94, 0.53, 0.62],
             "MIX+C": [0.57, 0.65, 0.43, 0.63, 0.55, 0.58, 0.51, 0.56],
             "MIX+G": [0.59, 0.31, 0.44, 0.24, 0.54, 0.96, 0.47, 0.51],
             "MIX+C+G": [0.58, 0.80, 0.94, 0.49, 0.58, 0.96, 0.52, 0.70]},
}


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats with 3 decimals."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _chunk_label(report: dict, c: int) -> str:
    if report["whole_feature"]:
        return "all (one chunk)"
    name = report["chunk_names"].get(c, report["chunk_names"].get(str(c)))
    joined = report.get("chunk_groups", {})
    members = joined.get(c, joined.get(str(c)))          # JSON keys are strings
    label = f"chunk {c} = {'+'.join(map(str, members))}" if members else f"chunk {c}"
    return f"{label} ({name})" if name else label


def table2_markdown(report: dict) -> str:
    """Chunks x attributes mAP, the best per attribute marked *, then the best and Random rows."""
    attrs, t = report["attributes"], report["table2"]
    rows = []
    for c in range(report["n_chunks"]):
        marks = [f"{t[a]['map'][c]:.3f}" + ("*" if report["best"][a]["chunk"] == c else "") for a in attrs]
        rows.append([_chunk_label(report, c), *marks, ""])
    rows.append(["best chunk", *[report["best"][a]["map"] for a in attrs], report["average"]["best"]])
    rows.append(["Random", *[t[a]["random"] for a in attrs], report["average"]["random"]])
    return markdown_table(["", *attrs, "average"], rows)


def table3_markdown(report: dict) -> str:
    probe = report["table3"]
    if not probe["attributes"]:
        return "No binary attribute: the linear probe (Table 3) does not apply."
    keys = [("accuracy", "probe"), ("balanced", "balanced"), ("majority", "majority")]
    with_chunk = any("best_chunk" in v for v in probe["attributes"].values())
    rows = [[a, *[v[k] for k, _ in keys]] + ([f"{v['best_chunk_accuracy']:.3f} (chunk {v['best_chunk']})"]
                                              if with_chunk else [])
            for a, v in probe["attributes"].items()]
    rows.append(["average", *[probe["average"][k] for k, _ in keys]] + ([""] if with_chunk else []))
    return markdown_table(["attribute", *[h for _, h in keys]] + (["best chunk alone"] if with_chunk else []),
                          rows)


def separated_lines(report: dict, bullet: str = "  ") -> list[str]:
    """A heading, then one line per factor that a single chunk holds clearly ahead of the others."""
    rule = report["suggestion_rule"]
    sep = report.get("separated", {})
    head = (f"factors one chunk holds alone ({len(sep)} of {len(report['attributes'])}; its lift over "
            f"random >= {rule['min_lift']} and >= {rule['margin']} above every other chunk's):")
    return [head] + [f"{bullet}{a}: chunk {v['chunk']} mAP {v['map']:.3f}, next chunk {v['runner_up']} "
                     f"{v['runner_up_map']:.3f}, random {v['random']:.3f}" for a, v in sep.items()]


def report_markdown(report: dict) -> str:
    """The whole evaluation as a markdown document."""
    split = report["split"] or "all images"
    rule = report["suggestion_rule"]
    lines = [f"# Evaluation of {report['index']}", "",
             f"{report['images']} images of split {split}; model variant {report['variant']}; "
             f"{'full feature as one chunk' if report['whole_feature'] else str(report['n_chunks']) + ' chunks'}; "
             f"{report['seconds']} s.", "",
             "## Nearest-neighbour mAP (paper Table 2 protocol)", "",
             (f"{report['sampled_queries']} images drawn at random each query" if report.get("sampled_queries")
              else "Each image queries") + " all other images of the split by one chunk (L2); relevant = "
             "same attribute value. `*` marks the best chunk per attribute; Random is the exact expected "
             "mAP of a random ranking.", "", table2_markdown(report), ""]
    if report["excluded"]:
        lines += [f"Left out: {', '.join(report['excluded'])}.", ""]
    if not report["whole_feature"]:
        lines += [*separated_lines(report, bullet="- "), ""]
    lines += ["## Linear probe (paper Table 3 protocol)", "",
              f"Eq. 5 weights on standardised features, bias by hinge loss, fit on split "
              f"{report['table3']['fit_split'] or 'all images'}, accuracy on {split}.", "",
              table3_markdown(report), ""]
    if not report["whole_feature"]:
        sug = report["suggestions"]
        lines += ["## Suggested chunk names", "",
                  f"A chunk is named after the attribute it retrieves best when that attribute's lift "
                  f"(mAP − random) / (1 − random) is at least {rule['min_lift']} and beats the chunk's "
                  f"next attribute by at least {rule['margin']}; each attribute names one chunk at most.", ""]
        lines += [f"- chunk {c}: {a}" for c, a in sug.items()] or ["- none"]
        lines += ["", "Store them with `retrieval chunks INDEX --accept-suggestions`.", ""]
    return "\n".join(lines)


def heatmap(report: dict, cell: tuple[int, int] = (64, 26)) -> Image.Image:
    """Chunks (rows) x attributes (columns), shaded by lift over random, labelled with the mAP."""
    attrs, t = report["attributes"], report["table2"]
    font = ImageFont.load_default()
    cw, ch = cell
    left = 8 + max(int(font.getlength(_chunk_label(report, c))) for c in range(report["n_chunks"]))
    top = ch + 4
    caption = "numbers: mAP; shade: (mAP - random) / (1 - random); box: best chunk per attribute"
    width = max(left + cw * len(attrs), int(font.getlength(caption)) + 8) + 8
    img = Image.new("RGB", (width, top + ch * report["n_chunks"] + 8 + ch), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, top + ch * report["n_chunks"] + 8 + ch / 2), caption, fill="black", font=font, anchor="lm")
    for j, a in enumerate(attrs):
        draw.text((left + j * cw + cw / 2, top / 2), a[:10], fill="black", font=font, anchor="mm")
    for c in range(report["n_chunks"]):
        y = top + c * ch
        draw.text((left - 6, y + ch / 2), _chunk_label(report, c), fill="black", font=font, anchor="rm")
        for j, a in enumerate(attrs):
            s = float(np.clip(lift(t[a]["map"][c], t[a]["random"]), 0, 1))
            colour = tuple(int(255 - s * (255 - v)) for v in (30, 70, 160))   # white -> dark blue
            box = (left + j * cw, y, left + (j + 1) * cw - 1, y + ch - 1)
            draw.rectangle(box, fill=colour,
                           outline="black" if report["best"][a]["chunk"] == c else colour)
            draw.text((box[0] + cw / 2, y + ch / 2), f"{t[a]['map'][c]:.2f}",
                      fill="white" if s > 0.5 else "black", font=font, anchor="mm")
    return img


def write_report(report: dict, out: str | Path) -> list[Path]:
    """report.json, report.md and heatmap.png in the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "heatmap.png"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(report_markdown(report))
    heatmap(report).save(paths[2])
    return paths


def ablation_markdown(result: dict) -> str:
    """Table 2 style: one row per variant (best chunk per attribute, the steps it trained) and
    the Random row."""
    attrs = result["attributes"]
    rows = [["Random", *[result["random"][a] for a in attrs], result["random_average"], ""]]
    rows += [[v.upper(), *[r["best"][a] for a in attrs], r["average"], r.get("steps", "")]
             for v, r in result["variants"].items()]
    return markdown_table(["method", *attrs, "average", "steps"], rows)
