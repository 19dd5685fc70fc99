"""The C kernels of sda/kernels.c, built with the system's C compiler and called through ctypes.

They fuse the elementwise parts of the CPU training steps, compute the products of a layer whose
input is mostly zeros from its nonzeros only, and fine-tuning's backward products in one pass over
each weight (bench/README.md). kernels.c is plain C99 without torch's headers.

A build takes 2.4 s of CPU with -O3 and -march=native (2-core Intel Xeon), which every stage
would pay, so the library is kept in ``$SDA_CACHE_DIR/kernels/`` under a hash of everything the
build depends on: the source, the compiler's command and ``--version``, the flag sets tried, and
the CPU (``-march=native`` code must not run on another CPU sharing the cache directory). A change
of any of these builds anew; parallel stages each build into their own directory and the first
to finish is kept. A compiler without ``--version`` or a cache that cannot be written: a build
per process, as without the cache.

Where no compiler builds it, ``cpu_kernels`` returns None after one warning that says why, and
the callers keep to their torch code: the same quantities and the same masks for a seed, a
pretraining epoch about 2x slower (layer 1 of MNIST at nu 0.1: 11.8k against 24.7k examples/s on
a 2-core Intel Xeon, 2026-12-07).
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch

from sda.artifacts import cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
# -fno-math-errno lets expf/logf vectorise. Without -fopenmp the products in C run on one thread,
# without -march=native on the baseline vector width; each is dropped where the compiler lacks it.
_COMMON = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
FLAG_SETS = (
    ["-march=native", "-fopenmp", *_COMMON],
    ["-march=native", *_COMMON],
    _COMMON,
)
# Below this fraction of nonzero inputs a layer's encoder runs on the nonzeros only (``sparse_input_layout``).
SPARSE_INPUT_DENSITY = 0.3

_P, _I = ctypes.c_void_p, ctypes.c_int64


class ColumnNonzeros(NamedTuple):
    """The nonzeros of a batch (batch x d) by column: column k's are ``rows``/``values`` [start[k]:start[k + 1]]."""

    batch: int
    start: torch.Tensor  # int64, d + 1
    rows: torch.Tensor  # int32, ascending within a column
    values: torch.Tensor  # float32


class Kernels:
    """Typed calls into the built library; every tensor must be on the CPU, of the dtype named, contiguous or,
    where a method says so, with contiguous but padded rows."""

    def __init__(self, library: ctypes.CDLL, build: str):
        self.build = build  # the compiler command that built it, for the record of how a run was computed
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
        self._nonzeros = library.nonzeros_by_column
        self._nonzeros.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P]
        self._nonzeros.restype = ctypes.c_int64
        self._sparse_times = library.sparse_times
        self._sparse_times.argtypes = [_P, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I]
        self._sparse_times.restype = None
        self._sparse_update = library.sparse_rank_update
        self._sparse_update.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _I, ctypes.c_float]
        self._sparse_update.restype = None
        self._backward_and_update = library.backward_and_update
        self._backward_and_update.argtypes = [_P, _I, _I, _I, _P, _I, _I, _P, _I, _I, _P, _I, ctypes.c_float]
        self._backward_and_update.restype = None

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

    def nonzeros_by_column(self, x: torch.Tensor) -> ColumnNonzeros:
        """The nonzeros of ``x`` (float32, batch x d), listed by column for ``sparse_times`` and ``sparse_rank_update``."""
        _check(x, torch.float32, "x")
        if x.dim() != 2:
            raise ValueError(f"x must be a matrix, got shape {tuple(x.shape)}")
        batch, d = x.shape
        size = batch * d + 16  # the vector loop writes 16 entries past the last nonzero
        start, rows, values = torch.empty(d + 1, dtype=torch.int64), torch.empty(size, dtype=torch.int32), torch.empty(size)
        scratch_columns, scratch_rows, scratch_values = torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(values)
        self._nonzeros(x.data_ptr(), batch, d, start.data_ptr(), rows.data_ptr(), values.data_ptr(),
                       scratch_columns.data_ptr(), scratch_rows.data_ptr(), scratch_values.data_ptr())
        return ColumnNonzeros(batch, start, rows, values)

    def sparse_times(self, x: ColumnNonzeros, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """bias + x W^T (batch x out) for ``weight`` (out x in) stored by ``visible_major``, from x's nonzeros only.

        The result's rows are padded like the weight's (a view with row stride weight.stride(1)):
        torch's products take such views as they are, and the kernels run faster on aligned rows.
        """
        ld = _visible_major_stride(weight, x)
        _check(bias, torch.float32, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
        out = torch.empty(x.batch, ld)[:, : weight.shape[0]]
        self._sparse_times(x.start.data_ptr(), x.rows.data_ptr(), x.values.data_ptr(), x.batch, weight.shape[1],
                           weight.data_ptr(), ld, weight.shape[0], bias.data_ptr(), out.data_ptr(), ld)
        return out

    def sparse_rank_update(self, weight: torch.Tensor, x: ColumnNonzeros, grad: torch.Tensor, alpha: float) -> None:
        """weight += alpha grad^T x, in place, for ``weight`` (out x in) stored by ``visible_major``.

        ``grad`` (batch x out, float32) may have padded rows, like ``sparse_times``'s result.
        """
        ld = _visible_major_stride(weight, x)
        _check_rows(grad, "grad")
        if grad.shape != (x.batch, weight.shape[0]):
            raise ValueError(f"grad {tuple(grad.shape)} does not match batch {x.batch} and weight {tuple(weight.shape)}")
        self._sparse_update(weight.data_ptr(), ld, weight.shape[0], weight.shape[1], x.start.data_ptr(),
                            x.rows.data_ptr(), x.values.data_ptr(), grad.data_ptr(), grad.stride(0), alpha)

    def backward_and_update(self, weight: torch.Tensor, grad: torch.Tensor, below: torch.Tensor, alpha: float,
                            through_sigmoid: bool) -> torch.Tensor:
        """grad W (times below (1 - below) if ``through_sigmoid``), with W as it was; then W += alpha grad^T below.

        One pass over ``weight`` (out x in, row-major) for both: the gradient for the layer below and
        the SGD update of a linear layer whose input was ``below`` (batch x in) and whose output
        gradient is ``grad`` (batch x out). The result's rows are padded like ``below``'s.
        """
        _check(weight, torch.float32, "weight")
        _check_rows(grad, "grad")
        _check_rows(below, "below")
        if grad.shape != (below.shape[0], weight.shape[0]) or below.shape[1] != weight.shape[1]:
            raise ValueError(f"grad {tuple(grad.shape)}, weight {tuple(weight.shape)} and below {tuple(below.shape)} "
                             "do not chain")
        out = torch.empty_strided(below.shape, below.stride())  # padded like below: sparse_rank_update reads it faster
        self._backward_and_update(weight.data_ptr(), *weight.shape, weight.stride(0), grad.data_ptr(), grad.shape[0],
                                  grad.stride(0), below.data_ptr(), below.stride(0), int(through_sigmoid), out.data_ptr(),
                                  out.stride(0), alpha)
        return out


def visible_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out x in) with each input's out weights contiguous, rows padded to whole 64-byte lines.

    The layout ``sparse_times`` and ``sparse_rank_update`` read: the same matrix for every torch op,
    a view of an (in x ld) array. Aligned rows took the sparse update from 47 to 37 us at 784 ->
    1000 (bench/README.md); ld is kept off multiples of 4 KiB, whose rows would all share a
    handful of L1 sets.
    """
    out, inputs = weight.shape
    ld = -(-out // 16) * 16
    if ld % 1024 == 0:
        ld += 16
    storage = weight.new_zeros(inputs, ld)
    storage[:, :out] = weight.t()
    return storage[:, :out].t()


def is_visible_major(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is stored as ``visible_major`` makes it, on the CPU in float32."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0])


def _visible_major_stride(weight: torch.Tensor, x: ColumnNonzeros) -> int:
    if not is_visible_major(weight):
        raise ValueError(f"weight must be a float32 CPU matrix stored by visible_major, got strides {weight.stride()}")
    if weight.shape[1] != x.start.shape[0] - 1:
        raise ValueError(f"weight {tuple(weight.shape)} does not take inputs of {x.start.shape[0] - 1} components")
    return weight.stride(1)


@contextmanager
def sparse_input_layout(weight: torch.nn.Parameter, inputs: torch.Tensor):
    """Store ``weight`` ``visible_major`` while inside, if ``inputs`` are mostly zeros and the kernels run here.

    The training steps then compute that layer's encoder and its share of the weight update from the
    nonzero inputs only (MNIST's pixels: 19% nonzero). On leaving, the weight is contiguous again,
    with the values it has then, so it is saved and used as before. The two paths sum in different
    orders: their weights differ by float32 rounding.
    """
    if (is_visible_major(weight) or inputs.numel() == 0 or cpu_kernels(inputs) is None or weight.dtype != torch.float32
            or torch.count_nonzero(inputs).item() >= SPARSE_INPUT_DENSITY * inputs.numel()):
        yield
        return
    weight.data = visible_major(weight.data)
    try:
        yield
    finally:
        weight.data = weight.data.contiguous()


def fits(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can take ``tensor`` as an array of ``dtype``: on the CPU, contiguous, that dtype."""
    return tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.is_contiguous()


def _check_rows(tensor: torch.Tensor, name: str) -> None:
    """A float32 CPU matrix whose rows are contiguous (they may be padded: stride(0) >= columns)."""
    if not (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.dim() == 2 and tensor.stride(1) == 1
            and tensor.stride(0) >= tensor.shape[1]):
        raise ValueError(f"{name} must be a float32 CPU matrix with contiguous rows, "
                         f"got {tensor.dtype} strides {tensor.stride()}")


def _check(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not fits(tensor, dtype):
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {tensor.dtype} on {tensor.device}")


def cpu_kernels(*float32: torch.Tensor, int64: tuple[torch.Tensor, ...] = ()) -> Kernels | None:
    """The kernels, if ``float32`` and ``int64`` all fit their dtype (``fits``) and the kernels could be built."""
    if all(fits(t, torch.float32) for t in float32) and all(fits(t, torch.int64) for t in int64):
        return built_kernels()
    return None


def describe_cpu_kernels(device: torch.device) -> str:
    """For a stage's log, and building the kernels before its progress bars: whether sda/kernels.c runs the steps' parts."""
    if device.type != "cpu":
        return ""
    return ("C kernels (sda/kernels.c) for the steps' elementwise parts and some products" if built_kernels()
            else "torch ops only (no C kernels: see the warning)")


@cache
def built_kernels() -> Kernels | None:
    """sda/kernels.c built (or found in the cache) and loaded once per process, or None (with one
    warning) where that fails."""
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    command = shlex.split(os.environ["CC"]) if os.environ.get("CC") else [found] if found else None
    if not command:
        return _unavailable("no C compiler found (set CC, or install gcc or clang)")
    key = _build_key(command)
    cached = cache_dir() / "kernels" / key if key else None
    if cached is not None and (cached / "build.txt").is_file():
        try:
            return Kernels(ctypes.CDLL(str(cached / "kernels.so")), (cached / "build.txt").read_text())
        except OSError:  # damaged: build it again below, replacing it
            shutil.rmtree(cached, ignore_errors=True)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            build = Path(tempfile.mkdtemp(prefix=".build-", dir=cached.parent))
        except OSError:  # a cache that cannot be written
            cached = None
    if cached is None:  # a build for this process only
        build = Path(tempfile.mkdtemp(prefix="sda-kernels-"))
    try:
        built = _build(command, build / "kernels.so")
        if isinstance(built, str):
            return _unavailable(built)
        if cached is not None:
            (build / "build.txt").write_text(built.build)
            try:
                build.rename(cached)  # fails where a parallel process got there first: theirs is the same
            except OSError:
                pass
        return built
    finally:  # the library stays mapped once loaded, whether or not its file goes
        shutil.rmtree(build, ignore_errors=True)


def _build_key(command: list[str]) -> str | None:
    """A hash of everything the built library depends on, or None where the compiler gives no version."""
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if version.returncode != 0 or not version.stdout.strip():
        return None
    cpu = platform.machine() + platform.processor()
    try:  # Linux: the model and the instruction sets -march=native chooses from
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        cpu += "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
    except OSError:
        pass
    parts = [SOURCE.read_bytes(), " ".join(command).encode(), version.stdout.encode(), repr(FLAG_SETS).encode(), cpu.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:32]


def _build(command: list[str], library: Path) -> "Kernels | str":
    """Compile kernels.c to ``library`` with the first flag set that builds and loads; else why not."""
    compiler = " ".join(command)
    failures = []
    for flags in FLAG_SETS:
        try:
            done = subprocess.run([*command, *flags, str(SOURCE), "-o", str(library), "-lm"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"the C compiler {compiler!r} could not run: {error}"
        if done.returncode == 0:
            try:
                return Kernels(ctypes.CDLL(str(library)), f"{compiler} {' '.join(flags)}")
            except OSError as error:
                failures.append(f"{' '.join(flags)}: built, but does not load: {error}")
        else:
            output = done.stderr.strip()[-300:] or "no output"
            failures.append(f"{' '.join(flags)}: exit status {done.returncode}, {output}")
    return f"{compiler!r} failed to build {SOURCE.name}: " + " | ".join(failures)


def kernels_record() -> str:
    """How the C kernels were built in this process ("cc -march=native ..."), or why they were not ("none: ...")."""
    kernels = built_kernels()
    return kernels.build if kernels is not None else f"none: {_build_failure}"


_build_failure = ""  # why built_kernels returned None, once it has


def _unavailable(reason: str) -> None:
    global _build_failure
    _build_failure = reason
    warnings.warn(f"sda's C kernels are unavailable, the CPU steps use torch ops instead (pretraining about "
                  f"2x slower, the same masks): {reason}", RuntimeWarning, stacklevel=3)
    return None
