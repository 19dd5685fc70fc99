"""Training speed against the hardware limit and against a naive reference, from one run.

Prints, for the default params' layer sizes and batch sizes on MNIST:
  - float32 GEMM FLOP/s, measured in turn with the epochs of each row, with the pipeline's threads,
    through each library torch can use here for float32 products (on the CPU: its default BLAS, and
    oneDNN where sda.device.choose_cpu_matmul finds it float32-exact); the faster sets the bound;
  - examples/s of one pretraining epoch per layer and of one fine-tuning epoch, and the ratio to
    the GEMM-bound rate (FLOPs per example / the faster library's measured FLOP/s); the FLOPs are
    the dense products', also where ours skip the zeros of MNIST's pixels (the first layer);
  - the same epochs written the common way (a torch DataLoader over a per-item Dataset, lower
    layers recomputed at every step, torch's default settings), and "ours / naive"; on the CPU
    also the naive epochs on oneDNN, so the ratio's two sources (the library, the code) separate;
  - peak resident memory.

Usage: python bench/bench_speed.py [--examples N] [--repeats 3] [--batch-sizes 32,64] [--device auto]
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# A progress bar per timed epoch would bury the table; tqdm reads this when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.dae import DenoisingAutoencoder  # noqa: E402
from sda.data import load_mnist  # noqa: E402
from sda.device import choose_cpu_matmul, resolve_device, set_cpu_matmul, set_cpu_threads, with_cpu_matmul as on  # noqa: E402
from sda.finetune import EarlyStopping, finetune  # noqa: E402
from sda.noise import MaskingNoise  # noqa: E402
from sda.pretrain import encode, pretrain_layer  # noqa: E402
from sda.stacked import StackedClassifier, negative_log_likelihood  # noqa: E402
from stages.params import load_params  # noqa: E402


def gemm_product(device: torch.device):
    """A float32 matmul big enough to reach the device's peak, and its FLOPs."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(5):
        a @ b

    def ten_products():
        for _ in range(10):
            a @ b

    return ten_products, 10 * 2 * n**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds of one call each, in turn.

    This VM's speed drifts by up to 30% within minutes; taking the GEMM rate, our epoch and the
    naive epoch round by round lets all three columns of a row see the same machine.
    """
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(s) for name, s in seconds.items()}


class PerItemDataset(torch.utils.data.Dataset):
    """The common way: one example per __getitem__ call."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def naive_pretrain_epoch(lower: list[DenoisingAutoencoder], dae, x, y, noise: MaskingNoise, lr, batch_size):
    """A per-item DataLoader, and the frozen lower layers recomputed for every minibatch.

    The corruption is the same MaskingNoise as ours (vectorised over the batch), so both sides do
    the same work and the ratio measures how it is organised, not which noise is cheaper.
    """
    loader = torch.utils.data.DataLoader(PerItemDataset(x, y), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(dae.parameters(), lr=lr)
    for xb, _ in loader:
        h = xb
        for below in lower:
            h = below.encode(h).detach()
        loss = dae.loss(noise(h), h)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def naive_finetune_epoch(model, x, y, lr, batch_size):
    loader = torch.utils.data.DataLoader(PerItemDataset(x, y), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for xb, yb in loader:
        loss = negative_log_likelihood(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50_000, help="training examples per epoch (default: all 50,000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per row, each timing the GEMM, our epoch and the naive epoch in turn; medians are printed (default: 3)")
    parser.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",")], default=None, metavar="B1,B2",
                        help="pretraining batch sizes to time, one row each (default: each layer's batch_size in the params)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    threads = set_cpu_threads()
    device = resolve_device(args.device)
    # Ours runs on what the stages choose; the naive code on torch's defaults, and on oneDNN too.
    ours_library = choose_cpu_matmul() if device.type == "cpu" else None
    libraries = ["blas", "onednn"] if ours_library == "onednn" else [ours_library]
    params = load_params(args.params)
    splits = load_mnist()
    x = torch.from_numpy(splits["train"][0][: args.examples]).to(device)
    y = torch.from_numpy(splits["train"][1][: args.examples]).to(device)
    n = x.shape[0]

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
          f"{threads} torch threads, device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    if device.type == "cpu":
        print(f"float32 products: ours on {ours_library}; GEMM GFLOP/s per library {' / '.join(libraries)}; "
              "naive on torch's default (blas)" + (", then on onednn" if len(libraries) > 1 else ""))
    gemm_header = "GEMM GFLOP/s" if len(libraries) == 1 else "GEMM " + "/".join(libraries)
    extra_header = f"{'naive onednn':>13}{'ours/it':>8}" if len(libraries) > 1 else ""
    print(f"{'epoch':<22}{'batch':>6}{gemm_header:>18}{'ours ex/s':>11}{'GEMM-bound':>12}{'ours/bound':>11}"
          f"{'naive ex/s':>12}{'ours/naive':>11}{extra_header}")

    generator = torch.Generator(device=device).manual_seed(0)
    gemm, gemm_flop_count = gemm_product(device)

    def measure(name: str, batch: int, flops: int, ours, naive) -> None:
        fns = {f"gemm {lib}": on(lib, gemm) for lib in libraries}
        fns["ours"] = on(ours_library, ours)
        fns.update({f"naive {lib}": on(lib, naive) for lib in libraries})
        median = interleaved(fns, device, args.repeats)
        rates = [gemm_flop_count / median[f"gemm {lib}"] for lib in libraries]
        bound = max(rates) / flops
        ours_rate, naive_rates = n / median["ours"], [n / median[f"naive {lib}"] for lib in libraries]
        extra = f"{naive_rates[1]:>13.0f}{ours_rate / naive_rates[1]:>8.2f}" if len(libraries) > 1 else ""
        print(f"{name:<22}{batch:>6}{'/'.join(f'{r / 1e9:.0f}' for r in rates):>18}{ours_rate:>11.0f}{bound:>12.0f}"
              f"{ours_rate / bound:>11.2f}{naive_rates[0]:>12.0f}{ours_rate / naive_rates[0]:>11.2f}{extra}", flush=True)

    codes, lower = x, []
    for layer in params.layers:
        # FLOPs actually needed per example: 2 forward GEMMs, 3 backward (the input needs no grad).
        flops = 5 * 2 * codes.shape[1] * layer.units
        noise = MaskingNoise(layer.corruption, layer.masking)
        for batch in args.batch_sizes or [layer.batch_size]:
            dae = DenoisingAutoencoder(codes.shape[1], layer.units).to(device)
            naive_dae = DenoisingAutoencoder(codes.shape[1], layer.units).to(device)
            # Warm-up (allocator, kernels' first calls) on a slice, so the timed epochs are steady state.
            for lib in libraries:
                on(lib, lambda: pretrain_layer(DenoisingAutoencoder(codes.shape[1], layer.units).to(device), codes[:2000],
                                               noise, 1, layer.lr, batch, generator))()
                on(lib, lambda: naive_pretrain_epoch(lower, DenoisingAutoencoder(codes.shape[1], layer.units).to(device),
                                                     x[:2000], y[:2000], noise, layer.lr, batch))()
            measure(f"pretrain {layer.name}", batch, flops,
                    lambda: pretrain_layer(dae, codes, noise, 1, layer.lr, batch, generator, name=layer.name),
                    lambda: naive_pretrain_epoch(lower, naive_dae, x, y, noise, layer.lr, batch))
        if ours_library is not None:
            set_cpu_matmul(ours_library)
        codes, lower = encode(dae, codes), lower + [dae]

    ft = params.finetune
    model = StackedClassifier.from_autoencoders(lower, 10).to(device)
    sizes = [x.shape[1]] + [l.units for l in params.layers] + [10]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    flops = 2 * macs * 3 - 2 * sizes[0] * sizes[1]  # forward + two backward GEMMs, none for the input's grad
    valid = (x[:1000], y[:1000])
    measure("finetune (one epoch)", ft.batch_size, flops,
            lambda: finetune(model, (x, y), valid, ft.lr, ft.batch_size, 1, EarlyStopping(), generator),
            lambda: naive_finetune_epoch(model, x, y, ft.lr, ft.batch_size))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {rss:.0f} MiB" + (f"; peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
