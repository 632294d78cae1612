"""Checkpoints: written atomically, carrying the config so the model rebuilds from the file alone."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import RetrievalError
from .grouping import regroup
from .model import MixingAutoencoder

FORMAT_VERSION = 1


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict, or a RetrievalError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"no checkpoint at {path}; train one with `retrieval train`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        raise RetrievalError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                             "retrain or restore it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise RetrievalError(f"{path} is not a checkpoint of this tool (format {FORMAT_VERSION})")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu", grouped: bool = True
               ) -> tuple[MixingAutoencoder, ModelConfig, dict]:
    """Rebuild the encoder/decoder from a checkpoint alone, in eval mode on `device`; when the
    checkpoint names groups of dependent chunks (disentangle/grouping.py), the model and config
    are the grouped ones, one chunk per group, as search reads them (grouped=False: the learned ones)."""
    ckpt = load(path, device)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = MixingAutoencoder(cfg, tuple(ckpt["train_config"]["losses"]))
    model.load_state_dict(ckpt["models"]["autoencoder"])
    groups = ckpt.get("chunk_groups")
    if grouped and groups and any(len(g) > 1 for g in groups):
        model, cfg = regroup(model, cfg, [list(g) for g in groups])
    return model.to(device).eval(), cfg, ckpt
