"""The C kernels of sda/kernels.c, built with the system's C compiler and called through ctypes.

They fuse the elementwise parts of the CPU training steps (bench/README.md). kernels.c is plain
C99 without torch's headers, so a build takes ~0.1 s (a torch C++ extension takes half a minute)
and runs in every process that first asks for it, into a temporary directory: no cache to go
stale, nothing shared between parallel stages. Where no compiler builds it, ``cpu_kernels``
returns None after one warning that says why, and the callers keep to their torch code: the same
quantities, with masks drawn another way (so other metrics for the same seed), and a pretraining
epoch 1.36x slower (30.5k against 41.5k examples/s at layer 1, bench/README.md).
"""

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -fno-math-errno lets expf/logf vectorise; -march=native is dropped for compilers without it.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"],
    ["-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"],
)

_P, _I = ctypes.c_void_p, ctypes.c_int64


class Kernels:
    """Typed calls into the built library; every tensor must be on the CPU, contiguous, of the dtype named."""

    def __init__(self, library: ctypes.CDLL):
        self._random_subsets = library.random_subsets
        self._random_subsets.argtypes = [_P, _I, _I, _I, _P, _P]
        self._random_subsets.restype = None
        self._masked_copy = library.masked_copy
        self._masked_copy.argtypes = [_P, _P, _I, _I, _I, _P]
        self._masked_copy.restype = ctypes.c_int64
        self._cross_entropy = library.cross_entropy_and_output_grad
        self._cross_entropy.argtypes = [_P, _P, _I, _I, _P]
        self._cross_entropy.restype = ctypes.c_double
        self._softmax = library.softmax_nll_and_grad
        self._softmax.argtypes = [_P, _P, _I, _I, _P, _P]
        self._softmax.restype = ctypes.c_int64

    def random_subsets(self, draws: torch.Tensor, d: int) -> torch.Tensor:
        """Row b: a uniformly random k-subset of range(d), from row b of ``draws`` (int32, batch x k)."""
        _check(draws, torch.int32, "draws")
        batch, k = draws.shape
        if not 0 <= k <= d:
            raise ValueError(f"cannot pick {k} of {d} positions")
        positions = torch.empty(batch, k, dtype=torch.int64)
        scratch = torch.empty(d, dtype=torch.int32)
        self._random_subsets(draws.data_ptr(), batch, k, d, positions.data_ptr(), scratch.data_ptr())
        return positions

    def masked_copy(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (float32) with zeros at row b's ``positions[b]`` (int64, from ``random_subsets``)."""
        _check(x, torch.float32, "x")
        _check(positions, torch.int64, "positions")
        if x.dim() != 2 or positions.dim() != 2 or positions.shape[0] != x.shape[0]:
            raise ValueError(f"positions {tuple(positions.shape)} do not match x {tuple(x.shape)}")
        out = torch.empty_like(x)
        bad = self._masked_copy(x.data_ptr(), positions.data_ptr(), *x.shape, positions.shape[1], out.data_ptr())
        if bad >= 0:
            raise ValueError(f"position {positions.view(-1)[bad].item()} is outside 0..{x.shape[1] - 1}")
        return out

    def cross_entropy_and_output_grad(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The summed reconstruction cross-entropy, and its column sums of B dL/dlogits, which replaces ``logits``."""
        _check(logits, torch.float32, "logits")
        _check(target, torch.float32, "target")
        if logits.shape != target.shape or logits.dim() != 2:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must be one matrix shape")
        column_sums = torch.empty(logits.shape[1])
        loss = self._cross_entropy(logits.data_ptr(), target.data_ptr(), *logits.shape, column_sums.data_ptr())
        return loss, column_sums

    def softmax_nll_and_grad(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """The summed NLL and the misclassified count; B dL/dlogits replaces ``logits`` (float32, batch x classes)."""
        _check(logits, torch.float32, "logits")
        _check(labels, torch.int64, "labels")
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        loss, mistakes = ctypes.c_double(), ctypes.c_int64()
        bad = self._softmax(logits.data_ptr(), labels.data_ptr(), *logits.shape, ctypes.byref(loss), ctypes.byref(mistakes))
        if bad >= 0:
            raise ValueError(f"label {labels[bad].item()} of batch row {bad} is outside 0..{logits.shape[1] - 1}")
        return loss.value, mistakes.value


def fits(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can take ``tensor`` as an array of ``dtype``: on the CPU, contiguous, that dtype."""
    return tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.is_contiguous()


def _check(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not fits(tensor, dtype):
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {tensor.dtype} on {tensor.device}")


def cpu_kernels(*float32: torch.Tensor, int64: tuple[torch.Tensor, ...] = ()) -> Kernels | None:
    """The kernels, if ``float32`` and ``int64`` all fit their dtype (``fits``) and the kernels could be built."""
    if all(fits(t, torch.float32) for t in float32) and all(fits(t, torch.int64) for t in int64):
        return built_kernels()
    return None


def describe_cpu_kernels(device: torch.device) -> str:
    """For a stage's log, and building the kernels before its progress bars: what runs the elementwise parts."""
    if device.type != "cpu":
        return ""
    return "elementwise parts in C" if built_kernels() else "elementwise parts by torch ops (no C kernels: see the warning)"


@cache
def built_kernels() -> Kernels | None:
    """sda/kernels.c built and loaded once per process, or None (with one warning) where that fails."""
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    command = shlex.split(os.environ["CC"]) if os.environ.get("CC") else [found] if found else None
    if not command:
        return _unavailable("no C compiler found (set CC, or install gcc or clang)")
    compiler = " ".join(command)
    failures = []
    with tempfile.TemporaryDirectory(prefix="sda-kernels-") as build:
        library = Path(build) / "kernels.so"
        for flags in FLAG_SETS:
            try:
                done = subprocess.run([*command, *flags, str(SOURCE), "-o", str(library), "-lm"],
                                      capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                return _unavailable(f"the C compiler {compiler!r} could not run: {error}")
            if done.returncode == 0:
                try:  # loaded before the directory goes: the mapping outlives the file
                    return Kernels(ctypes.CDLL(str(library)))
                except OSError as error:
                    failures.append(f"{' '.join(flags)}: built, but does not load: {error}")
            else:
                output = done.stderr.strip()[-300:] or "no output"
                failures.append(f"{' '.join(flags)}: exit status {done.returncode}, {output}")
    return _unavailable(f"{compiler!r} failed to build {SOURCE.name}: " + " | ".join(failures))


def _unavailable(reason: str) -> None:
    warnings.warn(f"sda's C kernels are unavailable, the CPU steps use torch ops instead (pretraining about "
                  f"1.4x slower, different masks for the same seed): {reason}", RuntimeWarning, stacklevel=3)
    return None
