"""Device choice, the CPU's matrix-product library and denormals, and reproducible random streams."""

import os
from collections.abc import Callable

import torch

CPU_MATMUL_CHOICES = ("auto", "blas")
# torch's switch for where float32 CPU products go: "ieee" keeps its BLAS; "bf16" sends them to
# oneDNN, allowing (not forcing) bfloat16 inside them (see choose_cpu_matmul).
_FP32_PRECISION = {"blas": "ieee", "onednn": "bf16"}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux; every core where that is unknown, as on macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_cpu_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: $SDA_THREADS, else every core we may use)."""
    if threads is None:
        threads = int(os.environ.get("SDA_THREADS", "0")) or usable_cores()
    torch.set_num_threads(threads)
    return threads


def flush_denormals() -> bool:
    """Make this thread, and the threads it starts from now on, treat float32 numbers below 1.2e-38
    (denormals) as zero, read or written; returns whether denormals are now flushed.

    A saturated sigmoid writes such numbers (1 / (1 + e^x) for x from about 87 to 103), and x86
    CPUs compute with them on a slow path: pretraining on codes of which 0.5% were denormal
    (mnist-bg-img's layer 1 at pretraining rate 0.3) took 3.19 s per epoch of 3,000 examples,
    against 0.29 s flushed, with the same losses to four decimals (2-core Intel Xeon, 2026-12-07).
    Call it before anything starts threads (the stages: first in ``setup_torch``).
    """
    torch.set_flush_denormal(True)
    return denormals_flushed()


def denormals_flushed() -> bool:
    """Whether this thread's float32 arithmetic flushes denormals to zero (1e-30 * 1e-9 gives 0)."""
    return (torch.tensor([1e-30], dtype=torch.float32) * 1e-9).item() == 0.0


def set_cpu_matmul(library: str) -> None:
    """Send float32 CPU products to ``library``, "blas" or "onednn", unchecked (choose_cpu_matmul checks)."""
    torch.backends.mkldnn.matmul.fp32_precision = _FP32_PRECISION[library]


def with_cpu_matmul(library: str | None, fn: Callable) -> Callable:
    """``fn`` calling ``set_cpu_matmul(library)`` first (``fn`` itself for None): for benchmarks that interleave the libraries."""
    if library is None:
        return fn

    def call(*args, **kwargs):
        set_cpu_matmul(library)
        return fn(*args, **kwargs)

    return call


def cpu_matmul() -> str:
    """The library float32 CPU products go to now: "blas" or "onednn"."""
    return "onednn" if torch.backends.mkldnn.matmul.fp32_precision == _FP32_PRECISION["onednn"] else "blas"


def float32_relative_error(product: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the entries of |product - A B| / (|A| |B|), A B computed in float64."""
    exact = a.double() @ b.double()
    return ((product.double() - exact).abs() / (a.double().abs() @ b.double().abs())).mean().item()


def float32_products_are_exact(matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mm) -> bool:
    """Whether ``matmul`` of float32 matrices computes in float32, not in a narrower format.

    Compared with float64 on the shapes of the training steps (a weight times a batch, its
    transpose times a batch, a rank-32 update), each with every row-/column-major layout of its two
    operands, since the library picks its kernel by layout. On average over the entries, float32
    errs by 2e-8 of |A| |B|, a float32 split into two bfloat16 by 3e-7, bfloat16 by 3e-4: the 1e-7
    threshold passes only the first.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 192, generator=generator)
    batch_t = torch.randn(192, 32, generator=generator)
    grad = torch.randn(256, 32, generator=generator)
    pairs = ((weight, batch_t), (weight.t(), grad), (grad, batch_t.t()))

    def layouts(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return m.contiguous(), m.t().contiguous().t()

    return all(
        float32_relative_error(matmul(a, b), a, b) <= 1e-7 for pair in pairs for a in layouts(pair[0]) for b in layouts(pair[1])
    )


def choose_cpu_matmul(choice: str | None = None) -> str:
    """Send float32 CPU matrix products to oneDNN when it computes them exactly; returns the library.

    torch gives them to its BLAS (MKL on x86), which on AMD processors runs its AVX2 code: on this
    project's 2-core AMD EPYC 193-221 GFLOP/s, against 398-489 for oneDNN's AVX-512 kernels on the
    same float32 products, and a 1.7x faster training step (bench/README.md). torch routes
    float32 products to oneDNN only under its reduced-precision switch, which *allows* bfloat16
    inside the product; where oneDNN has no bfloat16 kernel for them (CPUs without AMX, such as
    this one) it computes in float32. So the switch is kept only if the products then still
    pass ``float32_products_are_exact``; otherwise (or with ``choice`` "blas") torch's default stays.
    ``choice`` defaults to $SDA_CPU_MATMUL, else "auto".
    """
    choice = choice or os.environ.get("SDA_CPU_MATMUL", "auto")
    if choice not in CPU_MATMUL_CHOICES:
        raise ValueError(f"SDA_CPU_MATMUL must be one of {CPU_MATMUL_CHOICES}, got {choice!r}")
    set_cpu_matmul("blas")
    if choice == "blas" or not torch.backends.mkldnn.is_available():
        return "blas"
    set_cpu_matmul("onednn")
    if not float32_products_are_exact():
        set_cpu_matmul("blas")
    return cpu_matmul()


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` so random draws never cross the host-device boundary."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
