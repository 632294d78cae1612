"""`retrieval index / search / chunks / export`: the index round-trips, grows incrementally,
survives kill -9, and answers exactly like a float64 brute force over the exported features;
every test runs with the metadata in SQLite and again in PostgreSQL (a throwaway server)."""
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disentangle.config import PRESETS, TrainConfig
from disentangle.data import open_dataset
from indexer import faiss_files
from indexer.build import DATABASE, build_index
from indexer.schema import Base, connect
from disentangle.errors import RetrievalError
from retrieval.index import Index
from tests.test_cli import SHARED, fails, ok
from tests.test_train import Squares

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    """The session's tiny checkpoint (tests/conftest.py)."""
    return tiny_model


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture()
def db(backend, request) -> str | None:
    """What `--db` a test's own index gets: None (SQLite in the index) or a new PostgreSQL database."""
    return request.getfixturevalue("postgres").database() if backend == "postgresql" else None


@pytest.fixture(scope="module")
def index(tmp_path_factory, model, backend, request) -> Path:
    out = tmp_path_factory.mktemp("idx") / "shapes"
    build_index("shapes:600", model, out, db=request.getfixturevalue("postgres").database()
                if backend == "postgresql" else None)
    return out


def _engine(index: Path):
    """An engine on the index's metadata, wherever it lives."""
    return connect(json.loads((index / "manifest.json").read_text()).get("database") or index / DATABASE)


def _count(index: Path) -> int:
    """Images committed to the index's metadata, or -1 while it cannot be read."""
    from sqlalchemy import text
    from sqlalchemy.exc import DatabaseError

    engine = _engine(index)
    try:
        with engine.connect() as conn:
            return conn.scalar(text("select count(*) from images"))
    except DatabaseError:
        return -1
    finally:
        engine.dispose()


def _copy(index: Path, to: Path, db: str | None) -> Path:
    """A copy of the index that a test may write to: its folder, and its tables into db."""
    import shutil

    from sqlalchemy import insert, select

    shutil.copytree(index, to)
    if db is not None:
        source, target = _engine(index), connect(db, create=True)
        with source.connect() as read, target.begin() as write:
            for table in Base.metadata.sorted_tables:
                rows = [dict(r._mapping) for r in read.execute(select(table))]
                if rows:
                    write.execute(insert(table), rows)
        manifest = json.loads((to / "manifest.json").read_text())
        (to / "manifest.json").write_text(json.dumps({**manifest, "database": db}))
    return to


def _brute(features, ids, q, chunks, weights, allowed=None, exclude=None):
    """float64 reference: Σ w_c ‖q_c − x_c‖², ascending, ties by id."""
    f, q = features.astype(np.float64), q.astype(np.float64)
    d = sum(w * ((f[:, c] - q[c]) ** 2).sum(1) for c, w in zip(chunks, weights))
    keep = np.ones(len(ids), bool) if allowed is None else allowed.copy()
    if exclude is not None:
        keep &= ids != exclude
    order = np.lexsort((ids[keep], d[keep]))
    return ids[keep][order], d[keep][order]


def _folder_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_index_files_agree(index):
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["count"] == 600 and manifest["n_chunks"] == 8 and manifest["chunk_dim"] == 4
    assert manifest["preset"] == "tiny" and manifest["dataset_format"] == "shapes"
    from sqlalchemy import text

    with _engine(index).connect() as conn:
        assert tuple(conn.execute(text("select count(*), count(distinct key) from images")).one()) == (600, 600)
    assert (index / DATABASE).exists() == ("database" not in manifest)
    for c in range(8):
        assert faiss_files.read(faiss_files.chunk_path(index, c)).ntotal == 600
    assert (index / "model.pt").exists()


def test_stored_features_are_the_encoder_output(index, model):
    import torch

    from disentangle.checkpoint import load_model

    enc, cfg, _ = load_model(model)
    ds = open_dataset("shapes:600", size=cfg.image_size)
    idx = Index(index)
    with torch.no_grad():
        expect = enc.encode(ds[123][None])[0].numpy()
    np.testing.assert_allclose(idx.store.vector(idx.resolve("shape_000123")), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_search_equals_brute_force_on_the_export(index, tmp_path, seed):
    ok("export", index, "--out", tmp_path / "f.npz")
    data = np.load(tmp_path / "f.npz")
    ids, keys, feats = data["ids"], data["keys"], data["features"]
    assert feats.shape == (600, 8, 4) and feats.dtype == np.float32
    rng = np.random.default_rng(seed)
    chunks = sorted(rng.choice(8, rng.integers(1, 9), replace=False).tolist())
    weights = rng.uniform(0.2, 3, len(chunks)).round(2).tolist()
    q = int(rng.integers(600))
    args = ["search", index, "--image", keys[q], "--chunks", ",".join(map(str, chunks)), "-k", 15,
            "--weights", ",".join(map(str, weights)), "--json"]
    if seed % 2:
        args += ["--where", "shape=1"]
    result = json.loads(ok(*args).output)
    allowed = None
    if seed % 2:
        idx = Index(index)
        allowed = np.array([r["attributes"].get("shape") == 1 for r in idx.records(ids)])
    ref_ids, ref_d = _brute(feats, ids, feats[q], chunks, weights, allowed, exclude=ids[q])
    assert [r["id"] for r in result["results"]] == ref_ids[:15].tolist()
    np.testing.assert_allclose([r["distance"] for r in result["results"]], ref_d[:15], rtol=1e-6)
    assert result["query"] == {"id": int(ids[q]), "key": str(keys[q])}
    assert result["chunks"] == chunks and result["k"] == 15
    assert set(result["results"][0]) == {"id", "key", "distance", "attributes"}
    if seed % 2:
        assert all(r["attributes"]["shape"] == 1 for r in result["results"])


def test_filters_return_k_results_when_k_exist(index):
    idx = Index(index)
    n_val = sum(r["split"] == "val" for r in idx.records(idx.ids))
    res = idx.search(idx.query_for("shape_000001"), [0, 1], k=n_val + 5, where={"split": "val"})
    assert len(res["results"]) == n_val  # every val image, none from other splits
    assert {r["split"] for r in idx.records([h["id"] for h in res["results"]])} == {"val"}
    both = idx.search(idx.query_for("shape_000001"), [2], k=1000, where={"split": "val", "shape": 2})
    expect = [r["id"] for r in idx.records(idx.ids) if r["split"] == "val" and r["attributes"]["shape"] == 2]
    assert sorted(h["id"] for h in both["results"]) == expect


def test_query_by_id_key_and_file_agree(index, tmp_path, model):
    from disentangle.checkpoint import load_model

    idx = Index(index)
    cfg = load_model(model)[1]
    pixels = open_dataset("shapes:600", size=cfg.image_size).image(42)
    Image.fromarray(pixels).save(tmp_path / "q.png")
    by_key = json.loads(ok("search", index, "--image", "shape_000042", "--chunks", "0,3", "--json").output)
    by_id = json.loads(ok("search", index, "--image", idx.resolve("shape_000042"),
                          "--chunks", "0,3", "--json").output)
    by_file = json.loads(ok("search", index, "--file", tmp_path / "q.png", "--chunks", "0,3", "--json").output)
    assert by_key["results"] == by_id["results"]
    # the file is the same picture: it finds itself first, then the same neighbours
    assert by_file["results"][0]["key"] == "shape_000042"
    assert by_file["results"][0]["distance"] < 1e-8
    assert [r["key"] for r in by_file["results"][1:]] == [r["key"] for r in by_key["results"][:9]]


def test_chunk_names(index, tmp_path, db):
    copy = _copy(index, tmp_path / "idx", db)
    ok("chunks", copy, "--name", "3", "Hair colour")
    assert "3  Hair colour" in ok("chunks", copy).output
    a = json.loads(ok("search", copy, "--image", "shape_000001", "--chunks", "HAIR_COLOUR,2", "--json").output)
    b = json.loads(ok("search", copy, "--image", "shape_000001", "--chunks", "3,2", "--json").output)
    assert a["results"] == b["results"] and a["chunks"] == [3, 2]
    fails("chunks", copy, "--name", "4", "hair  colour", match="already named")
    fails("chunks", copy, "--name", "4", "12", match="cannot be a number")
    fails("chunks", copy, "--name", "9", "pose", match="out of range")


@pytest.mark.parametrize("args,match", [
    (["--image", "no_such_key", "--chunks", "1"], "no indexed image"),
    (["--image", "shape_000001", "--chunks", "8"], "out of range"),
    (["--image", "shape_000001", "--chunks", "beard"], "unknown chunk"),
    (["--image", "shape_000001", "--chunks", ","], "empty chunk list"),
    (["--image", "shape_000001", "--chunks", "1,1"], "twice"),
    (["--image", "shape_000001", "--chunks", "1", "-k", "0"], "k"),
    (["--image", "shape_000001", "--chunks", "1", "--where", "Male"], "ATTRIBUTE=VALUE"),
    (["--image", "shape_000001", "--chunks", "1", "--where", "Male=1"], "no image has attribute"),
    (["--image", "shape_000001", "--chunks", "1,2", "--weights", "1"], "weight"),
    (["--file", "/nonexistent.png", "--chunks", "1"], "no such file"),
    (["--chunks", "1"], "exactly one of"),
])
def test_bad_search_input_is_one_line_and_changes_nothing(index, args, match):
    before = _folder_hash(index)
    fails("search", index, *args, match=match)
    assert _folder_hash(index) == before


def test_unreadable_query_file(index, tmp_path):
    (tmp_path / "q.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fails("search", index, "--file", tmp_path / "q.jpg", "--chunks", "1", match="cannot use")


def test_missing_or_corrupted_index_file(index, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(index, broken)  # the metadata is only read
    (broken / "chunk_5.faiss").write_bytes(b"garbage" * 10)
    fails("search", broken, "--image", "shape_000001", "--chunks", "1", match="chunk_5.faiss")
    (broken / "chunk_5.faiss").unlink()
    fails("search", broken, "--image", "shape_000001", "--chunks", "1", match="missing")
    fails("search", tmp_path / "nothing", "--image", "x", "--chunks", "1", match="not an index")


def test_incremental_and_checkpoint_mismatch(tmp_path, model, db):
    out = tmp_path / "idx"
    assert build_index("shapes:300", model, out, db=db).added == 300
    again = build_index("shapes:500", model, out)
    assert (again.added, again.already_indexed, again.total) == (200, 300, 500)
    assert build_index("shapes:500", model, out).added == 0
    other = tmp_path / "other.pt"
    other.write_bytes(model.read_bytes())  # same bytes: same fingerprint, accepted
    assert build_index("shapes:500", other, out).added == 0
    from disentangle.train import train

    run2 = tmp_path / "run2"
    train(Squares(), PRESETS["tiny"], TrainConfig(steps=1, batch_size=4, seed=1, figure_every=1000), run2)
    before = _folder_hash(out)
    fails("index", "shapes:500", "--model", run2 / "checkpoint.pt", "--out", out, match="--rebuild")
    assert _folder_hash(out) == before
    ok("index", "shapes:500", "--model", run2 / "checkpoint.pt", "--out", out, "--rebuild")
    assert Index(out).manifest["count"] == 500 and _count(out) == 500
    assert Index(out).manifest.get("database") == db  # a rebuild keeps the index's database


def test_out_folder_that_is_not_an_index_is_left_alone(tmp_path, model, db):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fails("index", "shapes:50", "--model", model, "--out", tmp_path / "mine", *(["--db", db] if db else []),
          match="not an index")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_kill_9_then_rerun_ends_consistent(tmp_path, model, db):
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "retrieval", "index", "shapes:6000", "--model", str(model),
           "--out", str(out), "--commit-every", "200", "--batch-size", "50", *(["--db", db] if db else [])]

    def committed() -> int:
        return _count(out) if (out / "manifest.json").exists() else -1

    seen = []
    # the first kill lands as the folder is being created, before its manifest; the others land
    # at growing offsets after a commit, i.e. while chunk files or SQLite are being written
    for delay in (None, 0.0, 0.03, 0.07, 0.12):
        before = committed()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() if delay is None else committed() <= before):
            time.sleep(0.002)
        time.sleep(delay or 0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append(committed())
    assert max(seen) > 0 and max(seen) < 6000, seen  # the kills did land mid-build
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _count(out) == 6000 and len(set(Index(out).keys())) == 6000
    ids = Index(out).ids
    for c in range(8):
        np.testing.assert_array_equal(faiss_files.ids_of(faiss_files.read(faiss_files.chunk_path(out, c))), ids)
    assert json.loads((out / "manifest.json").read_text())["count"] == 6000


def test_sprites_val_split_indexes(tmp_path, model):
    out = tmp_path / "sprites"
    ok("index", SHARED / "sprites", "--model", model, "--out", out, "--split", "val")
    idx = Index(out)
    assert len(idx) == 72 * 178 and {r["split"] for r in idx.records(idx.ids)} == {"val"}
    res = idx.search(idx.query_for(idx.keys()[0]), [0], k=3, where={"pose": 0})
    assert all(r["attributes"]["pose"] == 0 for r in res["results"])


def test_where_values_and_refs_that_are_not_plain_integers(index):
    from retrieval.index import parse_where

    assert parse_where(["a=1", "b=-3", "c=²", "d=" + "9" * 25, "e=val"]) == {
        "a": 1, "b": -3, "c": "²", "d": "9" * 25, "e": "val"}
    idx = Index(index)
    assert idx.search(idx.query_for("shape_000001"), [0], where={"shape": "9" * 25})["results"] == []
    for ref in ("²", "9" * 5000, "-1"):
        with pytest.raises(RetrievalError, match="no indexed image"):
            idx.resolve(ref)
    with pytest.raises(RetrievalError, match="unknown chunk"):
        idx.resolve_chunks("²")
