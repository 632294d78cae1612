"""The `retrieval` command. This module only parses options and dispatches to library functions;
expected failures (RetrievalError) become one-line messages and a non-zero exit."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from disentangle.errors import RetrievalError

# about 11 minutes on 2 CPU cores; the warp of the `shapes` decoder draws under 0.01 from here
# on, not at 4,000 steps (docs/results.md, "A warp whose numbers are chunks")
DEMO_STEPS = 6000
# the demo's training options (docs/results.md, "the demo's setting"): per-sample masks and a
# higher learning rate than the paper's 2e-4 let the small shapes networks train in minutes; with
# the critic at 4x: the setting verified on a fresh clone (3 factors apart); over six seeds 1x did
# as well or better (docs/results.md), so 1x is the candidate for the next demo setting
DEMO_TRAINING = {"batch_size": 32, "mask": "per-sample", "lr": 5e-4, "critic_lr_scale": 4.0}
# the preset a dataset format trains with unless --preset says otherwise
DEFAULT_PRESET = {"sprites": "sprites", "mnist": "mnist", "celeba": "celeba-dcgan",
                  "folder": "celeba-dcgan", "shapes": "shapes"}


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrievalError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Search an image collection by one visual attribute at a time."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU probe


def parse_chunks(text: str | None, n_chunks: int) -> list[int] | None:
    """'2,4' -> [2, 4]; None stays None (all chunks)."""
    if text is None:
        return None
    try:
        chunks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RetrievalError(f"--chunks {text!r}: give chunk numbers separated by commas, e.g. 2,4") from None
    if not chunks or any(not 0 <= c < n_chunks for c in chunks):
        raise RetrievalError(f"--chunks {text!r}: chunks are numbered 0..{n_chunks - 1}")
    return chunks


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _on_gpu(device: str) -> bool:
    """Whether --device makes the run train on CUDA."""
    return device == "cuda" or (device == "auto" and torch_cuda_available())


def _default_preset(fmt: str, on_gpu: bool) -> str:
    """The format's preset; without a GPU, its CPU recipe where it has one (said on the terminal)."""
    from disentangle.config import CPU_STAND_IN, RECIPES

    name = DEFAULT_PRESET[fmt]
    if on_gpu or name not in CPU_STAND_IN:
        return name
    cpu = CPU_STAND_IN[name]
    recipe = RECIPES[cpu]
    click.echo(f"no GPU: training the CPU recipe --preset {cpu} ({recipe['minutes']:g} minutes of training or "
               f"{recipe['steps']:,} steps, whichever comes first); --preset {name} trains the paper's "
               "networks on a GPU", err=True)
    return cpu


def _rendering(fmt: str) -> dict:
    """What a checkpoint records of how built-in shapes were drawn, so a stale model shows."""
    from disentangle.data.shapes import RENDERING

    return {"rendering": RENDERING} if fmt == "shapes" else {}


def _open_data(data: str, size: int, fmt: str | None, skip_bad: bool, split: str | None = None):
    from disentangle.data import open_dataset

    ds = open_dataset(data, size=size, format=fmt, split=split, skip_bad=skip_bad, progress=True)
    if ds.skipped:
        click.echo(f"skipped {ds.skipped} unreadable image(s) (--skip-bad)", err=True)
    return ds


@main.command()
@click.argument("data")
@click.option("--preset", help="Network preset (default: by data format; sprites, mnist, "
                               "celeba-dcgan, celeba-began, shapes, tiny).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--steps", type=int, help="Total steps to reach (default: the preset's recipe, else 100,000).")
@click.option("--batch-size", type=int, help="Pairs per step and process (default: the preset's recipe, else 64).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--variant", default="mix+c+g", show_default=True,
              help="Table 2 row: ae, ae+c+g, mix, mix+c, mix+g, mix+c+g, c+g.")
@click.option("--mask", type=click.Choice(["per-batch", "per-sample"]),
              help="One mask per batch or per pair (default: the preset's recipe, else per-batch).")
@click.option("--resume", is_flag=True, help="Continue the run in --out up to --steps.")
@click.option("--format", "fmt", help="Dataset format, when detection is not wanted.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images instead of stopping.")
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--channels-last", is_flag=True, help="NHWC activations (faster convolutions on GPUs).")
@click.option("--minutes", type=float, help="Stop after this many minutes of training (default: the preset's "
                                           "recipe, else no limit).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, help="Adam's learning rate (default: the preset's recipe, else 2e-4).")
@click.option("--critic-lr-scale", type=float, default=1.0, show_default=True,
              help="The critic's learning rate as a multiple of --lr.")
@click.option("--group-ratio", type=float,
              help="After training, search chunks whose dependence is at least this multiple of the median "
                   "as one chunk; 0 turns it off (default: the preset's).")
@click.option("--workers", type=int, default=None, help="Data loader processes (default: 2 for files on disk).")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True)
@click.option("--figure-every", type=int, default=1000, show_default=True)
def train(data, preset, out, steps, batch_size, device, variant, mask, resume, fmt, skip_bad, bf16,
          channels_last, minutes, seed, lr, critic_lr_scale, group_ratio, workers, checkpoint_every, figure_every):
    """Train the mixing autoencoder on DATA (a folder, or shapes[:N])."""
    from dataclasses import replace

    from disentangle import checkpoint
    from disentangle.config import CPU_STAND_IN, GPU_PRESETS, RECIPES, TrainConfig, preset as get_preset
    from disentangle.data import detect_format
    from disentangle.train import train as run_training

    if resume and preset is None:
        preset = checkpoint.load(Path(out) / "checkpoint.pt")["model_config"]["name"]
    if fmt is None:
        fmt = "shapes" if data.split(":")[0] == "shapes" else detect_format(data)
    on_gpu = _on_gpu(device)
    cfg = get_preset(preset or _default_preset(fmt, on_gpu))
    if group_ratio is not None:
        cfg = replace(cfg, group_ratio=group_ratio)
    # the recipe's time budget stands in for a step count: explicit --steps alone drops it
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "mask": mask,
             "minutes": 0.0 if steps is not None and minutes is None else minutes}
    if not on_gpu and cfg.name in GPU_PRESETS and steps is None and not minutes:
        raise RetrievalError(f"preset {cfg.name} is the paper's GPU network: its 100,000 steps would take "
                             "weeks on this CPU; train on a GPU, use the CPU recipe "
                             f"({', '.join(f'--preset {c}' for c in CPU_STAND_IN.values())}), "
                             "or pass --steps N or --minutes M to run it here anyway")
    tc = TrainConfig(**{**RECIPES.get(cfg.name, {}), **{k: v for k, v in given.items() if v is not None}},
                     variant=variant, seed=seed, bf16=bf16, channels_last=channels_last,
                     critic_lr_scale=critic_lr_scale, checkpoint_every=checkpoint_every,
                     figure_every=figure_every)
    ds = _open_data(data, cfg.image_size, fmt, skip_bad)
    if workers is None:
        workers = 2 if fmt in ("celeba", "folder") else 0
    budget = f"{tc.minutes:g} minutes or {tc.steps:,} steps" if tc.minutes else f"{tc.steps:,} steps"
    click.echo(f"training {cfg.name} ({tc.variant}; {budget} x {tc.batch_size} pairs, lr {tc.lr:g}, "
               f"{tc.mask} masks) on {len(ds)} {fmt} images -> {out}", err=True)
    run_training(ds, cfg, tc, out, device=device, resume=resume, workers=workers, progress=True,
                 data_info={"spec": str(data), "format": fmt, **_rendering(fmt)})
    click.echo(f"checkpoint: {Path(out) / 'checkpoint.pt'}")


@main.command()
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--ratio", type=float, help="Join chunks whose dependence is at least this multiple of the "
                                          "median between any two (default: the preset's, else 2.5); 0 "
                                          "removes the groups.")
@click.option("--format", "fmt", help="Dataset format, when detection is not wanted.")
def group(checkpoint_path, data, ratio, fmt):
    """Find which chunks of a trained CHECKPOINT depend on each other on DATA's training images, and
    write them into it: index and search then read each group as one chunk."""
    from disentangle import checkpoint, grouping
    from disentangle.train import training_subset

    model, cfg, ckpt = checkpoint.load_model(checkpoint_path, grouped=False)
    ratio = (cfg.group_ratio or 2.5) if ratio is None else ratio
    if ratio < 0:
        raise RetrievalError(f"--ratio {ratio}: give a ratio > 0, or 0 to remove the groups")
    ckpt["model_config"] = {**ckpt["model_config"], "group_ratio": ratio}
    if ratio == 0:
        ckpt.pop("chunk_groups", None)
        checkpoint.save_atomic(ckpt, checkpoint_path)
        click.echo(f"{checkpoint_path}: groups removed; each of the {cfg.n_chunks} chunks is searched alone")
        return
    ds = _open_data(data, cfg.image_size, fmt, skip_bad=True)
    ckpt["chunk_groups"] = grouping.groups_on(model, training_subset(ds), ratio, ckpt["train_config"]["seed"])
    checkpoint.save_atomic(ckpt, checkpoint_path)
    joined = [g for g in ckpt["chunk_groups"] if len(g) > 1]
    click.echo(f"{checkpoint_path}: {cfg.n_chunks} learned chunks, {len(ckpt['chunk_groups'])} search chunks; "
               f"searched together: {', '.join('+'.join(map(str, g)) for g in joined) or 'none'}")
    click.echo("an index built from it before this is stale: rebuild it with `retrieval index ... --rebuild`")


@main.command()
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--chunks", help="Only these chunks' panels, e.g. 2,4 (default: all).")
@click.option("--split", help="Take the images from this split (default: val if present).")
@click.option("-n", "count", type=int, default=6, show_default=True, help="Images per row and column.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images to show.")
@click.option("--format", "fmt", help="Dataset format, when detection is not wanted.")
def transfer(checkpoint_path, data, out, chunks, split, count, seed, fmt):
    """Render the paper's Figure 5 grids: each chunk moved from the top row into the left column."""
    import torch

    from disentangle import checkpoint, figures

    model, cfg, _ = checkpoint.load_model(checkpoint_path)
    ds = _open_data(data, cfg.image_size, fmt, skip_bad=True)
    pool = list(range(len(ds)))
    wanted = split or ("val" if any(r.split == "val" for r in ds.records) else None)
    if wanted:
        pool = [i for i, r in enumerate(ds.records) if r.split == wanted]
    if len(pool) < 2 * count:
        raise RetrievalError(f"{data} has {len(pool)} images in that split; need {2 * count} (lower -n)")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:2 * count]
    images = torch.stack([ds[pool[int(i)]] for i in pick])
    sheet = figures.transfer_figure(model, images[:count], images[count:],
                                    parse_chunks(chunks, cfg.n_chunks))
    figures.save_png(sheet, out)
    click.echo(out)


@main.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False))
@click.option("--images", type=int, default=20_000, show_default=True, help="Built-in shapes to generate.")
@click.option("--steps", type=int, default=DEMO_STEPS, show_default=True, help="Training steps (batch 32).")
@click.option("--fresh", is_flag=True, help="Start over instead of reusing what --out holds.")
@click.option("--no-serve", is_flag=True, help="Stop after the evaluation instead of serving the page.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
def demo(out, images, steps, fresh, no_serve, host, port):
    """The whole path on built-in data, CPU only: generate, train, index, evaluate, name, serve."""
    import shutil

    from disentangle import checkpoint
    from disentangle.config import TrainConfig, preset as get_preset
    from disentangle.train import train as run_training
    from indexer.build import build_index, read_manifest, sha256_file

    from .evaluate import default_split, evaluate_index, reconstruction_error
    from .index import Index
    from .report import separated_lines, table2_markdown

    out = Path(out)
    run, index_dir, spec = out / "run", out / "index", f"shapes:{images}"
    if fresh and out.exists():
        shutil.rmtree(out)
    cfg = get_preset("shapes")
    click.echo(f"[1/5] generating {images} shapes (shape, colour, background, scale, rotation, x, y)", err=True)
    ds = _open_data(spec, cfg.image_size, "shapes", skip_bad=False)
    saved = checkpoint.load(run / "checkpoint.pt") if (run / "checkpoint.pt").exists() else None
    data_info = {"spec": spec, "format": "shapes", **_rendering("shapes")}
    if saved is not None and (saved["model_config"] != cfg.to_dict()
                              or saved.get("data", {}).get("rendering") != data_info["rendering"]
                              or any(saved["train_config"].get(k) != v for k, v in DEMO_TRAINING.items())):
        click.echo(f"      {run} holds a model of an older demo setting; training a new one", err=True)
        shutil.rmtree(run)
        saved = None
    done = saved["step"] if saved else None
    if done is not None and done >= steps:
        click.echo(f"[2/5] reusing the model in {run} (step {done}; --fresh retrains)", err=True)
    else:
        click.echo(f"[2/5] training the mixing autoencoder (mix+c+g, shapes preset) for {steps} steps", err=True)
        run_training(ds, cfg, TrainConfig(steps=steps, checkpoint_every=500, figure_every=500,
                                          **DEMO_TRAINING), run, device="auto", resume=done is not None,
                     progress=True, data_info=data_info)
    click.echo(f"[3/5] indexing {len(ds)} images into {index_dir}", err=True)
    built = read_manifest(index_dir) if index_dir.exists() else None  # stale if the model changed
    rebuild = built is not None and built["checkpoint_sha256"] != sha256_file(run / "checkpoint.pt")
    report = build_index(spec, run / "checkpoint.pt", index_dir, progress=True, rebuild=rebuild)
    click.echo(f"      {report.added} added, {report.already_indexed} already there", err=True)
    idx = Index(index_dir)
    click.echo("[4/5] evaluating: mAP of same-attribute retrieval by each chunk (Table 2 protocol)", err=True)
    result = evaluate_index(idx, default_split(idx), probe_chunks=False, progress=True)
    click.echo(table2_markdown(result))
    click.echo(f"average best-chunk mAP {result['average']['best']:.3f} vs random {result['average']['random']:.3f}")
    click.echo("\n".join(separated_lines(result)))
    mse, n = reconstruction_error(idx.model, ds, result["split"])
    click.echo(f"reconstruction error on the {n} {result['split'] or 'indexed'} images: {mse:.4f} "
               "(mean squared, pixels on the [-1, 1] scale)")
    click.echo("[5/5] naming chunks after the factor each one retrieves best", err=True)
    for c, name in result["suggestions"].items():
        idx.name_chunk(c, name)
    for c, name in idx.chunk_names().items():
        click.echo(f"  chunk {c}: {name or '(no single factor)'}")
    click.echo(f"attribute transfer, one panel per chunk: {run / 'transfer.png'}")
    if no_serve:
        click.echo(f"to browse: retrieval serve {index_dir}")
        return
    from api.serve import serve as run_server

    click.echo(f"serving the web page on http://{host}:{port}/  (Ctrl-C stops)")
    run_server(index_dir, host=host, port=port)


@main.command()
@click.argument("data")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="A checkpoint from `retrieval train` (RUN/checkpoint.pt).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.option("--split", help="Index only this split (train, val, test).")
@click.option("--format", "fmt", help="Dataset format, when detection is not wanted.")
@click.option("--rebuild", is_flag=True, help="Drop the index in --out and re-encode everything.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 autocast while encoding (CUDA only).")
@click.option("--workers", type=int, default=None, help="Data loader processes (default: 2 for files on disk).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images instead of stopping.")
@click.option("--commit-every", type=int, default=4096, show_default=True,
              help="Images encoded between commits; a crash loses at most this many.")
@click.option("--db", envvar="RETRIEVAL_DB", metavar="URL",
              help="Keep the metadata in this PostgreSQL database (postgresql://USER@HOST:PORT/NAME; "
                   "password from PGPASSWORD) instead of INDEX/meta.sqlite.  [env: RETRIEVAL_DB]")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Encode on this Ray cluster with Ray Data (auto: a Ray of this machine alone, on loopback).")
@click.option("--shards", type=click.IntRange(1), help="Then split the index into N shards for `serve --ray`.")
def index(data, model_path, out, split, fmt, rebuild, batch_size, device, bf16, workers, skip_bad,
          commit_every, db, ray_address, shards):
    """Encode DATA into per-chunk FAISS indexes with metadata in SQLite or PostgreSQL (adds only new images)."""
    from indexer.build import build_index

    report = build_index(data, model_path, out, fmt=fmt, split=split, rebuild=rebuild,
                         batch_size=batch_size, device=device, bf16=bf16, workers=workers,
                         skip_bad=skip_bad, progress=True, commit_every=commit_every, db=db, ray=ray_address)
    click.echo(f"{out}: {report.added} images added, {report.already_indexed} already indexed, "
               f"{report.total} in all ({report.seconds:.1f} s)")
    if shards:
        from indexer.shards import write_shards

        layout = write_shards(out, shards)
        click.echo(f"{out}: split into {shards} shards of {', '.join(map(str, layout['counts']))} images")


@main.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
def export(index_path, out):
    """Write ids, keys and features (N, n_chunks, chunk_dim) float32 to an .npz file."""
    import numpy as np

    from .index import Index

    idx = Index(index_path)
    np.savez(out, ids=idx.ids, keys=np.array(idx.keys()), features=idx.features())
    click.echo(f"{out}: {len(idx)} images x {idx.n_chunks} chunks x {idx.chunk_dim}")


@main.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(file_okay=False))
@click.option("--image", "image_ref", help="Key or id of an indexed image to query with.")
@click.option("--file", "file_path", type=click.Path(dir_okay=False), help="An image file to query with.")
@click.option("--chunks", required=True, help="Chunk numbers or names, e.g. 2,4 or hair_colour.")
@click.option("-k", type=int, default=10, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@click.option("--weights", help="One weight per chosen chunk, e.g. 1,0.5.")
@click.option("--where", multiple=True, help="Keep only ATTRIBUTE=VALUE (or split=val); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def search(index_path, image_ref, file_path, chunks, k, offset, weights, where, as_json):
    """Nearest images by the chosen chunks (exact L2, ties by id)."""
    import json

    from .index import Index, parse_where

    if (image_ref is None) == (file_path is None):
        raise RetrievalError("give exactly one of --image KEY and --file PATH")
    idx = Index(index_path)
    query = idx.query_for(image_ref) if image_ref is not None else idx.query_for_file(file_path)
    chosen = idx.resolve_chunks(chunks)
    w = _floats(weights, "--weights") if weights else None
    result = idx.search(query, chosen, k, offset=offset, weights=w, where=parse_where(where))
    if as_json:
        click.echo(json.dumps(result))
        return
    names = idx.chunk_names()
    label = ", ".join(f"{c} ({names[c]})" if names[c] else str(c) for c in chosen)
    click.echo(f"query {query.key or query.file}; chunks {label}")
    click.echo(f"{'rank':>4}  {'id':>8}  {'distance':>12}  key / attributes")
    for rank, hit in enumerate(result["results"], start=offset + 1):
        attrs = " ".join(f"{a}={v}" for a, v in hit["attributes"].items())
        click.echo(f"{rank:>4}  {hit['id']:>8}  {hit['distance']:>12.4f}  {hit['key']}  {attrs}")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise RetrievalError(f"{option} {text!r}: give numbers separated by commas, e.g. 1,0.5") from None


@main.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(file_okay=False))
@click.option("--name", nargs=2, metavar="CHUNK NAME", help='Name a chunk, e.g. --name 3 "hair colour".')
@click.option("--accept-suggestions", is_flag=True,
              help="Name chunks after the attribute each retrieves best (see `retrieval evaluate`).")
def chunks(index_path, name, accept_suggestions):
    """List the chunks with their names, or name one."""
    from .index import Index

    idx = Index(index_path)
    if name:
        idx.name_chunk(name[0], name[1])
    if accept_suggestions:
        from .evaluate import accept_suggestions as accept

        click.echo(f"named {len(accept(idx))} chunk(s) after the attributes they retrieve best", err=True)
    for c, n in idx.chunk_names().items():
        click.echo(f"{c}  {n or '-'}")


@main.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(file_okay=False))
@click.option("--split", help="Evaluate this split (default: val if indexed, else every image).")
@click.option("--whole/--per-chunk", default=None,
              help="Evaluate the full feature as one chunk (default: only for an `ae` model, as the paper).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", type=click.Path(file_okay=False), help="Write report.md, report.json, heatmap.png here.")
@click.option("--queries", type=click.IntRange(min=1),
              help="Table 2 from N query images drawn at random (seed 0), each ranking every image: "
                   "N/split-size of the time, for a quick look at a large split (default: every image).")
def evaluate(index_path, split, whole, as_json, out, queries):
    """The paper's Table 2 (nearest-neighbour mAP per chunk) and Table 3 (linear probe) protocols."""
    import json

    from .evaluate import default_split, evaluate_index
    from .index import Index
    from .report import separated_lines, table2_markdown, table3_markdown, write_report

    idx = Index(index_path)
    report = evaluate_index(idx, split or default_split(idx), whole=whole, progress=True, queries=queries)
    if out:
        for path in write_report(report, out):
            click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(report))
        return
    sampled = f", {report['sampled_queries']} of them drawn as queries" if report["sampled_queries"] else ""
    click.echo(f"{report['images']} images of split {report['split'] or 'all'}{sampled} ({report['seconds']} s); "
               "mAP by chunk, * = best per attribute")
    click.echo(table2_markdown(report))
    if not report["whole_feature"]:
        click.echo("\n".join(separated_lines(report)))
    click.echo("\nlinear probe (Table 3):")
    click.echo(table3_markdown(report))
    if report["suggestions"]:
        click.echo("\nsuggested names: " + ", ".join(f"{c}={a}" for c, a in report["suggestions"].items())
                   + " (store with `retrieval chunks INDEX --accept-suggestions`)")


@main.command()
@click.argument("data")
@click.option("--preset", help="Network preset (default: by data format).")
@click.option("--variants", default="ae,mix,mix+c,mix+g,mix+c+g,ae+c+g,c+g", show_default=True,
              help="Table 2 rows to train, comma-separated.")
@click.option("--steps", type=int, help="Training steps per variant.")
@click.option("--minutes", type=float, default=0, help="Minutes of training per variant (an equal-time budget).")
@click.option("--out", default="ablation", show_default=True, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, help="Pairs per step (default: the preset's recipe, else 64).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-split", default="val", show_default=True, help="Split to index and evaluate.")
@click.option("--format", "fmt", help="Dataset format, when detection is not wanted.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def ablate(data, preset, variants, steps, minutes, out, batch_size, seed, eval_split, fmt, device):
    """Train every variant with one budget and seed, evaluate each, print one Table 2 (resumable)."""
    from disentangle.data import detect_format

    from .ablate import ablate as run_ablation, parse_variants
    from .report import ablation_markdown

    if fmt is None:
        fmt = "shapes" if data.split(":")[0] == "shapes" else detect_format(data)
    on_gpu = _on_gpu(device)
    result = run_ablation(data, preset or _default_preset(fmt, on_gpu), parse_variants(variants), steps, out,
                          minutes=minutes, batch_size=batch_size, seed=seed, eval_split=eval_split, fmt=fmt,
                          device=device, progress=True)
    click.echo(ablation_markdown(result))
    click.echo(f"wrote {Path(out) / 'ablation.md'} and {Path(out) / 'ablation.json'}", err=True)


@main.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
@click.option("--threads", type=click.IntRange(1, 64), default=16, show_default=True,  # api.serve.THREADS
              help="Worker threads: concurrent searches with equal options share a pass over the index, so "
                   "give at least as many as the clients that search at once.")
@click.option("--connection-limit", type=click.IntRange(8, 1000), default=100, show_default=True,
              help="Open connections at most; at the limit a new one closes the oldest idle one.")
@click.option("--channel-timeout", type=click.IntRange(1, 3600), default=30, show_default=True,
              help="Seconds a connection may stay silent before it is closed.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name to answer besides localhost, 127.0.0.1 and ::1 (repeatable).")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Search the index's shards with one Ray actor each on this Ray cluster (auto: a Ray of "
                   "this machine alone, on loopback); split it first with `retrieval index ... --shards N`.")
def serve(index_path, host, port, threads, connection_limit, channel_timeout, allowed_hosts, ray_address):
    """Serve the API and web page for INDEX (waitress; Ctrl-C or SIGTERM stops it)."""
    from api.serve import serve as run_server

    run_server(index_path, host=host, port=port, threads=threads, connection_limit=connection_limit,
               channel_timeout=channel_timeout, allowed_hosts=allowed_hosts, ray=ray_address)


if __name__ == "__main__":
    main()
