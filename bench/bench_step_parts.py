"""Where a CPU fine-tuning step spends its time, part by part, at each thread count, from one run.

Runs fine-tuning steps of the default network (784-1000-1000-1000-10, batch 20, the first weight
stored visible-major as ``sda.kernels.sparse_input_layout`` stores it for MNIST) over the first
``--examples`` MNIST training examples, the thread counts taking turns round by round, and prints
each part's median time per step, the time between steps (batch gathering) and examples/s. The
step is ``StackedClassifier.sgd_step``'s momentum-free C path with a clock read between its parts;
before timing, one step of it is checked to leave the model bitwise where ``sgd_step`` leaves it.

Run it twice, on a quiet host and in a busy phase, to see which parts a busy host slows
(bench/README.md). CPU only: the parts are the C kernels' and oneDNN's.

Usage: python bench/bench_step_parts.py [--examples 20000] [--rounds 3] [--threads 1,2]
"""

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.data import load_mnist  # noqa: E402
from sda.device import choose_cpu_matmul, set_cpu_threads  # noqa: E402
from sda.kernels import built_kernels, sparse_input_layout  # noqa: E402
from sda.stacked import StackedClassifier  # noqa: E402
from sda.training import shuffled_batches  # noqa: E402

PARTS = (
    "nonzeros of the batch (one thread)",
    "layer 1 from the nonzeros",
    "layers 2-3 forward (oneDNN)",
    "output layer and softmax",
    "backward: output layer",
    "backward: W3 (C, one pass)",
    "backward: W2 (C, one pass)",
    "update of W1 from the nonzeros",
)


@torch.no_grad()
def timed_step(model: StackedClassifier, kernels, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[float]:
    """``model.sgd_step(x, y, lr)`` on its C path, returning the clock before and after each of PARTS."""
    clock = [time.perf_counter()]
    first, step = model.encoders[0], lr * (1.0 / x.shape[0])  # rounded as sgd_step rounds it
    nonzeros = kernels.nonzeros_by_column(x)
    clock.append(time.perf_counter())
    codes = [x, kernels.sparse_times(nonzeros, first.weight, first.bias).sigmoid_()]
    clock.append(time.perf_counter())
    for linear in model.encoders[1:]:
        codes.append(torch.addmm(linear.bias, codes[-1], linear.weight.t()).sigmoid_())
    clock.append(time.perf_counter())
    grad = torch.addmm(model.output.bias, codes[-1], model.output.weight.t())
    kernels.softmax_nll_and_grad(grad, y)  # grad now holds B dL/dlogits
    clock.append(time.perf_counter())
    layers = [*model.encoders, model.output]
    for depth in range(len(layers) - 1, -1, -1):
        linear = layers[depth]
        linear.bias.sub_(grad.sum(dim=0), alpha=step)
        if depth:
            grad = kernels.backward_and_update(linear.weight, grad, codes[depth], -step, through_sigmoid=True)
        else:
            kernels.sparse_rank_update(linear.weight, nonzeros, grad, -step)
        clock.append(time.perf_counter())
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000, help="MNIST training examples per round (default: 20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per thread count, taking turns (default: 3)")
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, comma-separated (default: 1,2)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    kernels = built_kernels()
    if kernels is None:
        sys.exit("bench_step_parts: the C kernels did not build here (see the warning); there are no C parts to time")
    set_cpu_threads()
    library = choose_cpu_matmul()
    x_train, y_train = (torch.from_numpy(a) for a in load_mnist()["train"])
    x_train, y_train = x_train[: args.examples].contiguous(), y_train[: args.examples].long().contiguous()
    lr, batch = 0.1, 20
    model = StackedClassifier([x_train.shape[1], 1000, 1000, 1000], 10)
    with sparse_input_layout(model.encoders[0].weight, x_train):
        if len(PARTS) + 1 != len(timed_step(copy.deepcopy(model), kernels, x_train[:batch], y_train[:batch], lr)):
            sys.exit("bench_step_parts: PARTS does not name every timed part")
        reference, timed = copy.deepcopy(model), copy.deepcopy(model)
        reference.sgd_step(x_train[:batch], y_train[:batch], lr)
        timed_step(timed, kernels, x_train[:batch], y_train[:batch], lr)
        if not all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), timed.state_dict().values())):
            sys.exit("bench_step_parts: the timed step no longer equals StackedClassifier.sgd_step; update timed_step")

        parts, between, rates = defaultdict(list), defaultdict(list), defaultdict(list)
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.rounds):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                started, in_steps, steps = time.perf_counter(), 0.0, 0
                for x, y in shuffled_batches((x_train, y_train), batch, generator):
                    clock = timed_step(model, kernels, x, y, lr)
                    for name, a, b in zip(PARTS, clock, clock[1:]):
                        parts[name, threads].append(b - a)
                    in_steps, steps = in_steps + clock[-1] - clock[0], steps + 1
                elapsed = time.perf_counter() - started
                between[threads].append((elapsed - in_steps) / steps)
                rates[threads].append(x_train.shape[0] / elapsed)

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; fine-tuning step 784-1000-1000-1000-10, batch {batch}, "
          f"products on {library}; medians in us over {args.rounds} rounds of {x_train.shape[0]} examples")

    def row(label: str, cells) -> None:
        print(f"{label:40s}" + "".join(f"{cell:>16}" for cell in cells))

    row("part of the step", (f"{t} thread" + ("s" if t > 1 else "") for t in thread_counts))
    for name in PARTS:
        row(name, (f"{1e6 * statistics.median(parts[name, t]):.1f}" for t in thread_counts))
    whole = {t: sum(statistics.median(parts[name, t]) for name in PARTS) for t in thread_counts}
    row("whole step (sum of the parts)", (f"{1e6 * whole[t]:.1f}" for t in thread_counts))
    row("between steps (gathering the batch)", (f"{1e6 * statistics.median(between[t]):.1f}" for t in thread_counts))
    row("examples/s, min-max of the rounds", (f"{min(rates[t]):,.0f}-{max(rates[t]):,.0f}" for t in thread_counts))


if __name__ == "__main__":
    main()
