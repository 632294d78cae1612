"""Fixtures shared across test modules: a tiny trained checkpoint and a shapes index, built once."""
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny checkpoint, trained a few steps so its features are not all alike."""
    from disentangle.config import PRESETS, TrainConfig
    from disentangle.train import train
    from tests.test_train import Squares

    run = tmp_path_factory.mktemp("api-run")
    train(Squares(), PRESETS["tiny"], TrainConfig(steps=3, batch_size=8, figure_every=1000), run)
    return run / "checkpoint.pt"


@pytest.fixture(scope="session")
def api_index(tmp_path_factory, tiny_model) -> Path:
    """shapes:600 indexed with the tiny model (16 x 16 images, 8 chunks of 4)."""
    from indexer.build import build_index

    out = tmp_path_factory.mktemp("api-idx") / "shapes"
    build_index("shapes:600", tiny_model, out)
    return out


@pytest.fixture(scope="module")
def app(api_index):
    from tests.test_api import _app

    return _app(api_index)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def own_index(api_index, tmp_path) -> Path:
    """A copy of the shapes index that a test may rename chunks in."""
    shutil.copytree(api_index, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on a loopback port for the whole session (tests/postgres.py)."""
    from tests.postgres import Server

    server = Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on loopback for the whole session (tests/ray_cluster.py)."""
    from tests.ray_cluster import TwoNodes

    cluster = TwoNodes().start()
    yield cluster
    cluster.stop()
