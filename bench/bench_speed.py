"""Training speed against the hardware limit and against a naive reference, from one run.

Prints, for the default params' layer sizes and batch sizes on MNIST:
  - float32 GEMM FLOP/s measured now, with the threads the pipeline uses;
  - examples/s of one pretraining epoch per layer and of one fine-tuning epoch, and the ratio to
    the GEMM-bound rate (FLOPs per example / measured FLOP/s);
  - the same epochs written the common way (a torch DataLoader over a per-item Dataset, lower
    layers recomputed at every step), and "ours / naive";
  - peak resident memory.

Usage: python bench/bench_speed.py [--examples N] [--device auto]
"""

import argparse
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.dae import DenoisingAutoencoder  # noqa: E402
from sda.data import load_mnist  # noqa: E402
from sda.device import resolve_device, set_cpu_threads  # noqa: E402
from sda.finetune import EarlyStopping, finetune  # noqa: E402
from sda.noise import MaskingNoise  # noqa: E402
from sda.pretrain import encode, pretrain_layer  # noqa: E402
from sda.stacked import StackedClassifier, negative_log_likelihood  # noqa: E402
from stages.params import load_params  # noqa: E402


def gemm_flops(device: torch.device, repeats: int = 40) -> float:
    """float32 matmul FLOP/s now (a GPU needs a larger product than the CPU to reach its peak)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(5):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls: this VM's speed wanders by up to 30% between runs."""
    seconds = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


class PerItemDataset(torch.utils.data.Dataset):
    """The common way: one example per __getitem__ call."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def naive_pretrain_epoch(lower: list[DenoisingAutoencoder], dae, x, y, nu, lr, batch_size):
    """A per-item DataLoader, and the frozen lower layers recomputed for every minibatch."""
    loader = torch.utils.data.DataLoader(PerItemDataset(x, y), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(dae.parameters(), lr=lr)
    noise = MaskingNoise(nu, "bernoulli")
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
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per row; the median is printed (default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    threads = set_cpu_threads()
    device = resolve_device(args.device)
    params = load_params(args.params)
    splits = load_mnist()
    x = torch.from_numpy(splits["train"][0][: args.examples]).to(device)
    y = torch.from_numpy(splits["train"][1][: args.examples]).to(device)
    n = x.shape[0]

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
          f"{threads} torch threads, device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    # The float32 GEMM rate is measured again just before each row: this VM's speed drifts.
    print(f"{'epoch':<24}{'batch':>6}{'GEMM GFLOP/s':>14}{'ours ex/s':>11}{'GEMM-bound':>12}{'ours/bound':>11}{'naive ex/s':>12}{'ours/naive':>11}")

    def row(name: str, batch: int, peak: float, flops: int, ours: float, naive: float) -> None:
        bound = peak / flops
        print(f"{name:<24}{batch:>6}{peak / 1e9:>14.0f}{ours:>11.0f}{bound:>12.0f}{ours / bound:>11.2f}{naive:>12.0f}{ours / naive:>11.2f}", flush=True)

    generator = torch.Generator(device=device).manual_seed(0)
    codes, lower = x, []
    for layer in params.layers:
        dae = DenoisingAutoencoder(codes.shape[1], layer.units).to(device)
        # FLOPs actually needed per example: 2 forward GEMMs, 3 backward (the input needs no grad).
        flops = 5 * 2 * codes.shape[1] * layer.units
        # Warm-up (allocator, kernels' first calls) on a slice, so the timed epochs are steady state.
        pretrain_layer(DenoisingAutoencoder(codes.shape[1], layer.units).to(device), codes[:2000],
                       MaskingNoise(layer.corruption, layer.masking), 1, layer.lr, layer.batch_size, generator)
        naive_pretrain_epoch(lower, DenoisingAutoencoder(codes.shape[1], layer.units).to(device), x[:2000], y[:2000],
                             layer.corruption, layer.lr, layer.batch_size)
        peak = gemm_flops(device)
        ours = n / timed(lambda: pretrain_layer(dae, codes, MaskingNoise(layer.corruption, layer.masking), 1, layer.lr,
                                                layer.batch_size, generator, name=layer.name), device, args.repeats)
        naive_dae = DenoisingAutoencoder(codes.shape[1], layer.units).to(device)
        naive = n / timed(lambda: naive_pretrain_epoch(lower, naive_dae, x, y, layer.corruption, layer.lr, layer.batch_size), device, args.repeats)
        row(f"pretrain {layer.name}", layer.batch_size, peak, flops, ours, naive)
        codes, lower = encode(dae, codes), lower + [dae]

    ft = params.finetune
    model = StackedClassifier.from_autoencoders(lower, 10).to(device)
    sizes = [x.shape[1]] + [l.units for l in params.layers] + [10]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    flops = 2 * macs * 3 - 2 * sizes[0] * sizes[1]  # forward + two backward GEMMs, none for the input's grad
    valid = (x[:1000], y[:1000])
    peak = gemm_flops(device)
    ours = n / timed(lambda: finetune(model, (x, y), valid, ft.lr, ft.batch_size, 1, EarlyStopping(), generator), device, args.repeats)
    naive = n / timed(lambda: naive_finetune_epoch(model, x, y, ft.lr, ft.batch_size), device, args.repeats)
    row("finetune (one epoch)", ft.batch_size, peak, flops, ours, naive)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {rss:.0f} MiB" + (f"; peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
