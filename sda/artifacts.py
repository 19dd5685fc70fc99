"""Atomic writes and safe reads of the files stages exchange, and where files kept per machine go.

Every writer goes to a temporary file in the target's directory and renames it into place, so an
interrupted process leaves either the old file or the new one, never half of one.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def cache_dir() -> Path:
    """Where files computed once per machine are kept: the MNIST source, the built C kernels."""
    return Path(os.environ.get("SDA_CACHE_DIR", Path.home() / ".cache" / "sda-pipeline"))


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_split(path, x: np.ndarray, y: np.ndarray) -> None:
    """Write one split as ``x`` (float32 [N, d]) and ``y`` (int64 [N]) in an .npz file."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: x must be [N, d] and y [N], got {x.shape} and {y.shape}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x.astype(np.float32, copy=False), y=y.astype(np.int64, copy=False))


def load_split(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one split written by ``save_split``; refuses pickled object arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found (run the stage that writes it)")
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (ValueError, KeyError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable split file with arrays x and y ({err})") from err
    if x.dtype != np.float32 or x.ndim != 2 or y.dtype != np.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: expected x float32 [N, d] and y int64 [N], got {x.dtype}{x.shape}, {y.dtype}{y.shape}")
    return x, y


def save_state(path, state: dict) -> None:
    # Through a file object: given a path, torch.save names the archive's folder after the (random)
    # temporary file, so the same weights got different bytes and DVC a new hash on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_state(path, device: torch.device | str = "cpu") -> dict:
    """Load tensors saved by ``save_state``; weights_only refuses arbitrary pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (run the stage that writes it)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot load weights ({type(err).__name__}: {err})") from err


def save_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
