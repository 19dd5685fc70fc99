"""Before/after of each change to the training step, timed in one run.

One pretraining step of a dA layer (784 -> 1000 and 1000 -> 1000 at batch 32) and one fine-tuning
step of the default 784-1000-1000-1000-10 network (batch 20), written each way the code has been:

  pretraining
    autograd + torch.optim.SGD        the step before the change (loss.backward(), optimizer.step())
    written out, batch-major          analytic tied-weight gradient accumulated straight into W
    + vectorised loss value           cross_entropy_value instead of binary_cross_entropy_with_logits
    + feature-major                   DenoisingAutoencoder.sgd_step: activations units x batch
    + oneDNN products (ours)          the same, float32 products by oneDNN instead of torch's BLAS
                                      (sda.device.choose_cpu_matmul; CPU only, where exact)
    fixed masking, torch.topk         the masking before: k smallest of fresh scores by torch.topk
    fixed masking (ours)              MaskingNoise(nu, "fixed"): numpy partition on the CPU
  fine-tuning
    autograd + torch.optim.SGD
    written out, feature-major        StackedClassifier.sgd_step
    + oneDNN products (ours)

Variants are interleaved over --rounds rounds and the median ms/step is printed, so drift of the
machine's speed hits every variant alike. Every row but the oneDNN ones runs on torch's BLAS.
Usage: python bench/bench_step.py [--rounds 7] [--device auto]
"""

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.dae import DenoisingAutoencoder, cross_entropy_value, reconstruction_cross_entropy  # noqa: E402
from sda.device import choose_cpu_matmul, resolve_device, set_cpu_matmul, set_cpu_threads  # noqa: E402
from sda.noise import MaskingNoise  # noqa: E402
from sda.stacked import StackedClassifier, negative_log_likelihood  # noqa: E402


def autograd_pretrain_step(dae, optimizer):
    def step(corrupted, clean, lr):
        loss = dae.loss(corrupted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@torch.no_grad()
def batch_major_step(dae, corrupted, clean, lr, fast_loss):
    batch = clean.shape[0]
    weight, hidden_bias, visible_bias = dae.weight, dae.hidden_bias, dae.visible_bias
    code = torch.addmm(hidden_bias, corrupted, weight.t()).sigmoid_()
    logits = torch.addmm(visible_bias, code, weight)
    loss = cross_entropy_value(logits, clean) / batch if fast_loss else reconstruction_cross_entropy(logits, clean)
    grad_logits = logits.sigmoid_().sub_(clean).div_(batch)
    grad_pre = torch.mm(grad_logits, weight.t()).mul_(code * (1.0 - code))
    visible_bias.sub_(grad_logits.sum(dim=0), alpha=lr)
    hidden_bias.sub_(grad_pre.sum(dim=0), alpha=lr)
    weight.addmm_(code.t(), grad_logits, alpha=-lr)
    weight.addmm_(grad_pre.t(), corrupted, alpha=-lr)
    return loss


def topk_masking(nu, generator):
    """MaskingNoise(nu, "fixed") as it was before numpy's argpartition took over on the CPU."""

    def mask(x):
        scores = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        k = MaskingNoise(nu, "fixed").masked_count(x.shape[1])
        return x.scatter(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, 0.0)

    return mask


def autograd_finetune_step(model, optimizer):
    def step(x, y, lr):
        loss = negative_log_likelihood(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def on(library: str, fn):
    """``fn`` with float32 CPU products sent to ``library`` ("blas" or "onednn") while it runs."""
    def call(*args):
        set_cpu_matmul(library)
        return fn(*args)

    return call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(variants: dict, batches: list, device, rounds: int) -> dict[str, float]:
    """Median ms per call of each variant over ``rounds`` interleaved passes over ``batches``."""
    times = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up
        for args in batches[:20]:
            fn(*args)
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            started = time.perf_counter()
            for args in batches:
                fn(*args)
            sync(device)
            times[name].append((time.perf_counter() - started) / len(batches) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    first = next(iter(medians.values()))
    print(f"{title}")
    for name, ms in medians.items():
        # Masking rows are costs to compare with each other, not variants of the step.
        if name.startswith("fixed masking"):
            speedup = f"{masking_before / ms:>8.2f}x" if "ours" in name else ""
            masking_before = ms
        else:
            speedup = f"{first / ms:>8.2f}x"
        print(f"  {name:<36}{ms:>8.3f} ms/step{speedup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; the median is printed (default: 7)")
    parser.add_argument("--steps", type=int, default=200, help="steps per variant per round (default: 200)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    threads = set_cpu_threads()
    device = resolve_device(args.device)
    onednn = device.type == "cpu" and choose_cpu_matmul() == "onednn"
    g = torch.Generator(device=device).manual_seed(0)
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {threads} torch threads, device {device}; "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps; last column: speed-up over the first row (ours masking: over torch.topk)")

    for n_in, nu in ((784, 0.1), (1000, 0.3)):
        batch, lr = 32, 0.1
        codes = torch.rand(args.steps * batch, n_in, generator=g, device=device)
        noise = MaskingNoise(nu, "fixed")
        batches = [(noise(c, g), c, lr) for c in codes.split(batch)]
        daes = [DenoisingAutoencoder(n_in, 1000, torch.Generator().manual_seed(1)).to(device) for _ in range(5)]
        variants = {
            "autograd + torch.optim.SGD": autograd_pretrain_step(daes[0], torch.optim.SGD(daes[0].parameters(), lr=lr)),
            "written out, batch-major": lambda c, x, lr: batch_major_step(daes[1], c, x, lr, fast_loss=False),
            "+ vectorised loss value": lambda c, x, lr: batch_major_step(daes[2], c, x, lr, fast_loss=True),
            "+ feature-major" + ("" if onednn else " (ours)"): daes[3].sgd_step,
            **({"+ oneDNN products (ours)": on("onednn", daes[4].sgd_step)} if onednn else {}),
            f"fixed masking, nu={nu}, torch.topk": lambda c, x, lr, before=topk_masking(nu, g): before(x),
            f"fixed masking, nu={nu} (ours)": lambda c, x, lr: noise(x, g),
        }
        variants = {name: fn if "oneDNN" in name else on("blas", fn) for name, fn in variants.items()}
        report(f"pretraining step {n_in} -> 1000, batch {batch}", compare(variants, batches, device, args.rounds))

    batch, lr = 20, 2.0
    x = torch.rand(args.steps * batch, 784, generator=g, device=device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g, device=device)
    batches = [(xb, yb, lr) for xb, yb in zip(x.split(batch), y.split(batch))]
    daes = [DenoisingAutoencoder(a, 1000, torch.Generator().manual_seed(1)) for a in (784, 1000, 1000)]
    reference = StackedClassifier.from_autoencoders(daes, 10).to(device)
    written_out, ours = (StackedClassifier.from_autoencoders(daes, 10).to(device) for _ in range(2))
    variants = {
        "autograd + torch.optim.SGD": autograd_finetune_step(reference, torch.optim.SGD(reference.parameters(), lr=lr)),
        "written out, feature-major" + ("" if onednn else " (ours)"): lambda x, y, lr: written_out.sgd_step(x, y, lr),
        **({"+ oneDNN products (ours)": on("onednn", lambda x, y, lr: ours.sgd_step(x, y, lr))} if onednn else {}),
    }
    variants = {name: fn if "oneDNN" in name else on("blas", fn) for name, fn in variants.items()}
    report(f"fine-tuning step 784-1000-1000-1000-10, batch {batch}", compare(variants, batches, device, args.rounds))


if __name__ == "__main__":
    main()
