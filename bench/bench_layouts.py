"""GFLOP/s of each matrix product of the training steps, for every memory layout of its operands.

The steps' products are a weight W (units_out x units_in) times a batch of activations, or a rank-B
update of W. Which operand is stored row- or column-major (for activations: batch-major or
units-major) changes the speed of the same product by up to 1.8x on the CPU. This prints, for the
shapes of a pretraining step (batch 32) and a fine-tuning step (batch 20), the rate of each of the
eight layouts of C = A B, so the layouts chosen in sda/dae.py and sda/stacked.py can be checked on
any machine:

  forward   C (out x B) = W (out x in) h (in x B)       encoder; fine-tuning's forward
  transpose C (in x B)  = W^T (in x out) y (out x B)    decoder; fine-tuning's gradient for below
  update    W (out x in) += G (out x B) h (B x in)      both weight updates

Letters give the storage of A, B, C in turn: R row-major, C column-major (a transposed view of a
row-major tensor). For the activations: B "C" or output "C" is batch-major. Every product runs on
the library the stages choose (sda.device.choose_cpu_matmul); --library forces one.
Usage: python bench/bench_layouts.py [--library blas|onednn] [--rounds 5]
"""

import argparse
import itertools
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.device import choose_cpu_matmul, set_cpu_matmul, set_cpu_threads  # noqa: E402


def stored(rows: int, cols: int, order: str, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix stored row-major ("R") or column-major ("C")."""
    if order == "R":
        return torch.rand(rows, cols, generator=generator)
    return torch.rand(cols, rows, generator=generator).t()


def product(m: int, k: int, n: int, layout: str, accumulate: bool, generator: torch.Generator):
    """A call computing C = A B (or C += A B) with A, B, C stored as ``layout`` says."""
    a, b, c = (stored(r, s, order, generator) for (r, s), order in zip(((m, k), (k, n), (m, n)), layout))
    if layout[2] == "C":  # a column-major C is a row-major C^T = B^T A^T
        a, b, c = b.t(), a.t(), c.t()
    if accumulate:
        return lambda: c.addmm_(a, b, alpha=-1e-9)
    return lambda: torch.mm(a, b)


def rates(m: int, k: int, n: int, accumulate: bool, rounds: int, calls: int) -> dict[str, float]:
    """GFLOP/s of each layout, the median over ``rounds`` interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    layouts = ["".join(p) for p in itertools.product("RC", repeat=3)]
    calls_by_layout = {layout: product(m, k, n, layout, accumulate, generator) for layout in layouts}
    seconds = {layout: [] for layout in layouts}
    for call in calls_by_layout.values():
        call()
    for _ in range(rounds):
        for layout, call in calls_by_layout.items():
            started = time.perf_counter()
            for _ in range(calls):
                call()
            seconds[layout].append((time.perf_counter() - started) / calls)
    return {layout: 2 * m * k * n / statistics.median(s) / 1e9 for layout, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=["blas", "onednn"], help="float32 product library (default: the stages' choice)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median is printed (default: 5)")
    parser.add_argument("--calls", type=int, default=200, help="calls per layout per round (default: 200)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    threads = set_cpu_threads()
    if args.library:
        set_cpu_matmul(args.library)
    library = args.library or choose_cpu_matmul()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {threads} torch threads, float32 products by {library}; "
          f"GFLOP/s, median of {args.rounds} interleaved rounds")
    layouts = ["".join(p) for p in itertools.product("RC", repeat=3)]
    print(f"{'product':<34}" + "".join(f"{layout:>6}" for layout in layouts))
    for batch in (32, 20):
        for n_in, n_out in ((784, 1000), (1000, 1000)):
            for name, (m, k, n, accumulate) in {
                "forward": (n_out, n_in, batch, False),
                "transpose": (n_in, n_out, batch, False),
                "update": (n_out, batch, n_in, True),
            }.items():
                measured = rates(m, k, n, accumulate, args.rounds, args.calls)
                label = f"{name} {n_in}->{n_out}, batch {batch}"
                print(f"{label:<34}" + "".join(f"{measured[layout]:>6.0f}" for layout in layouts), flush=True)


if __name__ == "__main__":
    main()
