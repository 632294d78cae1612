"""`retrieval train` / `transfer` / `demo` end to end, on real and generated data, and their
one-line errors for bad input."""
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from disentangle import checkpoint
from disentangle.data import open_dataset
from disentangle.data.shapes import RENDERING
from retrieval.cli import main

SHARED = Path(os.environ.get("RETRIEVAL_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
FAST = ["--preset", "tiny", "--batch-size", "4", "--figure-every", "2"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def fails(*args, match: str):
    result = run(*args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and match in lines[0], result.output
    return lines[0]


def _train_and_resume(data, out, *extra):
    ok("train", data, "--out", out, "--steps", 2, *FAST, *extra)
    ckpt = checkpoint.load(Path(out) / "checkpoint.pt")
    assert ckpt["step"] == 2
    ok("train", data, "--out", out, "--steps", 4, "--resume", *extra)
    assert checkpoint.load(Path(out) / "checkpoint.pt")["step"] == 4
    rows = (Path(out) / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"]  # logged every 10 steps and at the end
    assert Image.open(Path(out) / "transfer.png").size[0] > 0
    return ckpt


def test_train_on_shapes(tmp_path):
    ckpt = _train_and_resume("shapes:200", tmp_path / "run", "--critic-lr-scale", 2)
    assert ckpt["data"] == {"spec": "shapes:200", "format": "shapes", "rendering": RENDERING}
    assert ckpt["train_config"]["critic_lr_scale"] == 2


def test_train_on_the_real_sprites(tmp_path):
    ckpt = _train_and_resume(SHARED / "sprites", tmp_path / "run")
    assert ckpt["data"]["format"] == "sprites"


def test_train_on_the_real_mnist(tmp_path):
    ckpt = _train_and_resume(SHARED / "mnist", tmp_path / "run")
    assert ckpt["data"]["format"] == "mnist"


def _celeba(root: Path, n: int = 12) -> Path:
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(
            root / "img_align_celeba" / name)
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\nMale Smiling \n" + "".join(f"{name}  {1 if i % 2 else -1} -1 \n" for i, name in enumerate(names)))
    (root / "list_eval_partition.txt").write_text("".join(f"{name} {i % 3}\n" for i, name in enumerate(names)))
    return root


def test_train_on_a_celeba_layout_folder(tmp_path):
    data = _celeba(tmp_path / "celeba")
    ckpt = _train_and_resume(data, tmp_path / "run")
    assert ckpt["data"]["format"] == "celeba"


def test_transfer_renders_one_panel_per_chunk(tmp_path):
    ok("train", "shapes:200", "--out", tmp_path / "run", "--steps", 1, *FAST)
    ok("transfer", tmp_path / "run" / "checkpoint.pt", "shapes:200", "--out", tmp_path / "all.png", "-n", 3)
    ok("transfer", tmp_path / "run" / "checkpoint.pt", "shapes:200", "--out", tmp_path / "one.png",
       "-n", 3, "--chunks", "2")
    full, one = Image.open(tmp_path / "all.png"), Image.open(tmp_path / "one.png")
    assert full.size[0] > 3 * one.size[0] and full.size[1] > one.size[1]  # 4 x 2 panels vs 1
    fails("transfer", tmp_path / "run" / "checkpoint.pt", "shapes:200", "--out", tmp_path / "x.png",
          "--chunks", "9", match="0..7")


def test_demo_trains_then_reuses(tmp_path):
    out = tmp_path / "demo"
    first = ok("demo", "--out", out, "--images", 200, "--steps", 2, "--no-serve")
    assert (out / "run" / "transfer.png").exists() and (out / "index" / "manifest.json").exists()
    assert "average best-chunk mAP" in first.output and "chunk 7:" in first.output
    assert "factors one chunk holds alone" in first.output
    # the printed reconstruction error, against numpy in float64 over the same val images
    model, cfg, _ = checkpoint.load_model(out / "run" / "checkpoint.pt")
    ds = open_dataset("shapes:200", size=cfg.image_size)
    val = [i for i, r in enumerate(ds.records) if r.split == "val"]
    x = torch.stack([ds[i] for i in val])
    with torch.no_grad():
        y = model.decode(model.encode(x))
    expected = np.mean((y.numpy().astype(np.float64) - x.numpy().astype(np.float64)) ** 2)
    assert f"reconstruction error on the {len(val)} val images: {expected:.4f}" in first.output
    second = ok("demo", "--out", out, "--images", 200, "--steps", 2, "--no-serve")
    assert "reusing" in second.output and "reusing" not in first.output
    # a run left by an older demo setting is retrained, not reused under the new name
    ckpt = torch.load(out / "run" / "checkpoint.pt", weights_only=True)
    ckpt["model_config"]["lambda_g"] = 1.0 - ckpt["model_config"]["lambda_g"] / 2
    torch.save(ckpt, out / "run" / "checkpoint.pt")
    third = ok("demo", "--out", out, "--images", 200, "--steps", 2, "--no-serve")
    assert "older demo setting" in third.output and "reusing" not in third.output
    assert torch.load(out / "run" / "checkpoint.pt", weights_only=True)["model_config"]["lambda_g"] != \
        ckpt["model_config"]["lambda_g"]
    # so is a model of shapes drawn by an older rendering (same factors, other pixels)
    ckpt = torch.load(out / "run" / "checkpoint.pt", weights_only=True)
    ckpt["data"]["rendering"] -= 1
    torch.save(ckpt, out / "run" / "checkpoint.pt")
    fourth = ok("demo", "--out", out, "--images", 200, "--steps", 2, "--no-serve")
    assert "older demo setting" in fourth.output and "reusing" not in fourth.output
    assert torch.load(out / "run" / "checkpoint.pt", weights_only=True)["data"]["rendering"] == \
        ckpt["data"]["rendering"] + 1


def test_missing_folder(tmp_path):
    fails("train", tmp_path / "nope", "--out", tmp_path / "run", match="does not exist")


def test_unrecognised_layout(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    fails("train", tmp_path / "data", "--out", tmp_path / "run", match="looked for")


def test_truncated_image_is_named_and_skippable(tmp_path):
    data = _celeba(tmp_path / "celeba")
    bad = data / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:500])
    fails("train", data, "--out", tmp_path / "run", *FAST, match="000003.jpg")
    result = ok("train", data, "--out", tmp_path / "run", "--steps", 1, *FAST, "--skip-bad")
    assert "skipped 1" in result.output


def test_label_rows_without_images(tmp_path):
    data = _celeba(tmp_path / "celeba")
    (data / "img_align_celeba" / "000005.jpg").unlink()
    fails("train", data, "--out", tmp_path / "run", *FAST, match="000005.jpg")


@pytest.mark.parametrize("option,value,match", [
    ("--preset", "huge", "unknown preset"), ("--variant", "mix+x", "unknown variant"),
    ("--format", "tiff", "unknown format"), ("--steps", "-1", "--steps")])
def test_bad_options(tmp_path, option, value, match):
    args = ["train", "shapes:50", "--out", tmp_path / "run", *FAST, option, value]
    fails(*args, match=match)


def test_resume_without_a_run(tmp_path):
    fails("train", "shapes:50", "--out", tmp_path / "run", "--resume", match="no checkpoint")


def _small_sprites(root: Path) -> Path:
    """Two train characters and one val character in the sheet layout."""
    from tests.test_data_sprites import character, write_labels_and_splits, write_sheet

    for i in range(3):
        write_sheet(root / "sheets" / f"sprite_{i:03d}.png", character(i), palette=True)
    write_labels_and_splits(root)
    return root


def test_sprites_on_a_cpu_trains_the_cpu_recipe(tmp_path, monkeypatch):
    from disentangle.config import RECIPES

    monkeypatch.setattr("retrieval.cli.torch_cuda_available", lambda: False)
    data = _small_sprites(tmp_path / "sprites")
    result = ok("train", data, "--out", tmp_path / "run", "--steps", 1, "--batch-size", 4)
    assert "no GPU: training the CPU recipe --preset sprites-cpu" in result.output
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["model_config"]["name"] == "sprites-cpu" and ckpt["model_config"]["image_size"] == 32
    recipe = RECIPES["sprites-cpu"]  # the options not given come from the preset's recipe
    assert (ckpt["train_config"]["lr"], ckpt["train_config"]["mask"]) == (recipe["lr"], recipe["mask"])
    assert (ckpt["train_config"]["steps"], ckpt["train_config"]["batch_size"]) == (1, 4)
    assert ckpt["train_config"]["minutes"] == 0  # --steps alone replaces the recipe's time budget


def test_the_cpu_recipe_stops_at_its_time_budget(tmp_path, monkeypatch):
    from disentangle.config import RECIPES

    monkeypatch.setattr("retrieval.cli.torch_cuda_available", lambda: False)
    # the recipe's budget, shrunk to a second, with a step cap far out of reach
    monkeypatch.setitem(RECIPES, "sprites-cpu", {**RECIPES["sprites-cpu"], "minutes": 1 / 60, "steps": 10**7})
    data = _small_sprites(tmp_path / "sprites")
    result = ok("train", data, "--out", tmp_path / "run", "--batch-size", 4)
    assert "0.0166667 minutes or 10,000,000 steps" in result.output
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["train_config"]["minutes"] == 1 / 60
    assert 1 <= ckpt["step"] < 10**7 and ckpt["train_seconds"] >= 1.0


def test_a_gpu_preset_on_a_cpu_needs_explicit_steps(tmp_path, monkeypatch):
    monkeypatch.setattr("retrieval.cli.torch_cuda_available", lambda: False)
    data = _small_sprites(tmp_path / "sprites")
    message = fails("train", data, "--preset", "sprites", "--out", tmp_path / "run", match="GPU network")
    assert "--preset sprites-cpu" in message and "--steps" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_with_a_gpu_sprites_keeps_the_papers_preset(monkeypatch):
    from retrieval.cli import _default_preset

    assert _default_preset("sprites", on_gpu=True) == "sprites"
    assert _default_preset("sprites", on_gpu=False) == "sprites-cpu"
    assert _default_preset("mnist", on_gpu=False) == "mnist"


def test_serve_threads_default_is_the_servers():
    """`retrieval serve --threads` defaults to api.serve.THREADS (the CLI avoids importing Flask)."""
    from api.serve import THREADS, serve
    from retrieval.cli import serve as serve_command

    option = next(p for p in serve_command.params if p.name == "threads")
    assert option.default == THREADS == inspect.signature(serve).parameters["threads"].default
