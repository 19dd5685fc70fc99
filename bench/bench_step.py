"""Before/after of each change to the training step, timed in one run.

One pretraining step of a dA layer (784 -> 1000 and 1000 -> 1000 at batch 32) and one fine-tuning
step of the default 784-1000-1000-1000-10 network (batch 20), written each way the code has been:

  pretraining
    autograd + torch.optim.SGD        the step before the change (loss.backward(), optimizer.step())
    written out, batch-major          analytic tied-weight gradient accumulated straight into W
    + vectorised loss value           exp/log of the logits instead of binary_cross_entropy_with_logits
    + feature-major                   activations units x batch
    + oneDNN products                 the same, float32 products by oneDNN instead of torch's BLAS
                                      (sda.device.choose_cpu_matmul; CPU only, where exact)
    + decoder output batch-major ...  the decoder's output batch-major, the loss from one log of
                                      max(z, 1 - z), the sigmoid derivative by one kernel (on oneDNN
                                      where the rows above are)
    + loss in one C kernel            loss, output gradient and its sums in one pass of
                                      sda/kernels.c (where it builds); ours at 1000 -> 1000
    + encoder from the nonzeros       ours at 784 -> 1000 (MNIST, mostly zeros): W stored
      (ours)                          visible-major, the encoder's product and its share of the
                                      update from the input's nonzeros in C (sda.kernels)
    fixed masking, torch.topk         k smallest of fresh float scores by torch.topk
    fixed masking, numpy partition    the same float scores, the k-th smallest found by numpy
    fixed masking, int32 scores       int32 scores, numpy partition
    fixed masking (ours)              MaskingNoise(nu, "fixed"): k 32-bit draws per row, a partial
                                      Fisher-Yates shuffle in C (where it builds)
  fine-tuning
    autograd + torch.optim.SGD
    written out, feature-major        the gradient written out, activations units x batch
    + oneDNN products                 the same on oneDNN
    + batch-major                     activations batch x units
    + softmax layer in one C kernel   the softmax layer's loss, mistakes and gradient in one C call
    + first layer from the nonzeros   the first layer's product and update from the input's
                                      nonzeros (MNIST)
    + backward products in one C      StackedClassifier.sgd_step: each layer's gradient for the
      pass (ours)                     layer below and its update in one C pass over W
    (the C rows where the kernels build, on the CPU; elsewhere ours is the batch-major step)

Variants are interleaved over --rounds rounds and the median ms/step is printed, so drift of the
machine's speed hits every variant alike. The rows above the oneDNN ones run on torch's BLAS, ours on the
library the stages choose. The 784-input steps train on the first MNIST training images (19% of
their pixels nonzero), the 1000-input step on uniform codes.
Usage: python bench/bench_step.py [--rounds 7] [--device auto]
"""

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda.dae import DenoisingAutoencoder, cross_entropy_value_and_reconstruction, reconstruction_cross_entropy  # noqa: E402
from sda.data import load_mnist  # noqa: E402
from sda.device import choose_cpu_matmul, resolve_device, set_cpu_threads, with_cpu_matmul as on  # noqa: E402
from sda.kernels import built_kernels, visible_major  # noqa: E402
from sda.noise import MaskingNoise, uniform_int32  # noqa: E402
from sda.stacked import StackedClassifier, negative_log_likelihood, softmax_nll_and_grad  # noqa: E402


def autograd_pretrain_step(dae, optimizer):
    def step(corrupted, clean, lr):
        loss = dae.loss(corrupted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@torch.no_grad()
def exp_log_cross_entropy_value(logits, target):
    """The summed cross-entropy as the step computed it before: stable, six passes, exp and log."""
    return logits.clamp(min=0).sum() + logits.abs().neg_().exp_().add_(1.0).log_().sum() - (target * logits).sum()


@torch.no_grad()
def batch_major_step(dae, corrupted, clean, lr, fast_loss):
    batch = clean.shape[0]
    weight, hidden_bias, visible_bias = dae.weight, dae.hidden_bias, dae.visible_bias
    code = torch.addmm(hidden_bias, corrupted, weight.t()).sigmoid_()
    logits = torch.addmm(visible_bias, code, weight)
    loss = exp_log_cross_entropy_value(logits, clean) / batch if fast_loss else reconstruction_cross_entropy(logits, clean)
    grad_logits = logits.sigmoid_().sub_(clean).div_(batch)
    grad_pre = torch.mm(grad_logits, weight.t()).mul_(code * (1.0 - code))
    visible_bias.sub_(grad_logits.sum(dim=0), alpha=lr)
    hidden_bias.sub_(grad_pre.sum(dim=0), alpha=lr)
    weight.addmm_(code.t(), grad_logits, alpha=-lr)
    weight.addmm_(grad_pre.t(), corrupted, alpha=-lr)
    return loss


@torch.no_grad()
def feature_major_step(dae, corrupted, clean, lr):
    """DenoisingAutoencoder.sgd_step before the decoder's output went batch-major."""
    batch = clean.shape[0]
    weight, hidden_bias, visible_bias = dae.weight, dae.hidden_bias, dae.visible_bias
    corrupted_t, clean_t = corrupted.t(), clean.t()
    code_t = torch.addmm(hidden_bias.unsqueeze(1), weight, corrupted_t).sigmoid_()
    logits_t = torch.addmm(visible_bias.unsqueeze(1), weight.t(), code_t)
    loss = exp_log_cross_entropy_value(logits_t, clean_t) / batch
    grad_logits_t = logits_t.sigmoid_().sub_(clean_t).div_(batch)
    grad_pre_t = torch.mm(weight, grad_logits_t).mul_(code_t * (1.0 - code_t))
    visible_bias.sub_(grad_logits_t.sum(dim=1), alpha=lr)
    hidden_bias.sub_(grad_pre_t.sum(dim=1), alpha=lr)
    weight.addmm_(code_t, grad_logits_t.t(), alpha=-lr)
    weight.addmm_(grad_pre_t, corrupted, alpha=-lr)
    return loss


@torch.no_grad()
def torch_ops_step(dae, corrupted, clean, lr):
    """DenoisingAutoencoder.sgd_step before its loss and output gradient went into one C kernel."""
    step = lr / clean.shape[0]
    weight, hidden_bias, visible_bias = dae.weight, dae.hidden_bias, dae.visible_bias
    code_t = torch.addmm(hidden_bias.unsqueeze(1), weight, corrupted.t()).sigmoid_()
    logits = torch.addmm(visible_bias, code_t.t(), weight)
    loss, reconstruction = cross_entropy_value_and_reconstruction(logits, clean)
    grad_logits = reconstruction.sub_(clean)
    grad_pre_t = torch.ops.aten.sigmoid_backward(torch.mm(weight, grad_logits.t()), code_t)
    visible_bias.sub_(grad_logits.sum(dim=0), alpha=step)
    hidden_bias.sub_(grad_pre_t.sum(dim=1), alpha=step)
    weight.addmm_(code_t, grad_logits, alpha=-step)
    weight.addmm_(grad_pre_t, corrupted, alpha=-step)
    return loss / clean.shape[0]


def numpy_partition_mask(x, scores, k):
    """x with each row's k smallest-scored components zeroed, the k-th smallest found by numpy (no tie check)."""
    u = scores.numpy()
    keep = u > np.partition(u, k - 1, axis=1)[:, k - 1 : k]
    return x * torch.from_numpy(keep.astype(np.float32)).to(x.dtype)


def score_masking(nu, generator, scores):
    """MaskingNoise(nu, "fixed") as it was: float scores by torch.topk or numpy, or int32 scores by numpy."""

    def mask(x):
        k = MaskingNoise(nu, "fixed").masked_count(x.shape[1])
        if scores == "int32":
            return numpy_partition_mask(x, uniform_int32(x.numel(), generator).view(x.shape), k)
        uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if scores == "float, numpy":
            return numpy_partition_mask(x, uniform, k)
        return x.scatter(1, torch.topk(uniform, k, dim=1, largest=False, sorted=False).indices, 0.0)

    return mask


@torch.no_grad()
def feature_major_finetune_step(model, x, y, lr):
    """StackedClassifier.sgd_step (without momentum) before its activations went batch-major."""
    batch = x.shape[0]
    codes_t = [x.t()]
    for linear in model.encoders:
        codes_t.append(torch.addmm(linear.bias.unsqueeze(1), linear.weight, codes_t[-1]).sigmoid_())
    logits_t = torch.addmm(model.output.bias.unsqueeze(1), model.output.weight, codes_t[-1])
    log_probs_t = torch.log_softmax(logits_t, dim=0)
    picked = log_probs_t.gather(0, y.unsqueeze(0))
    loss = -picked.sum() / batch
    mistakes = (logits_t.argmax(dim=0) != y).sum()
    grad_t = log_probs_t.exp_().scatter_add_(0, y.unsqueeze(0), torch.full_like(picked, -1.0)).div_(batch)
    layers = [*model.encoders, model.output]
    for depth in range(len(layers) - 1, -1, -1):
        linear, below_t = layers[depth], codes_t[depth]
        grad_below_t = None
        if depth:
            below = below_t.t()
            grad_below_t = torch.mm(grad_t.t(), linear.weight).mul_(below * (1.0 - below)).t()
        linear.weight.addmm_(grad_t, below_t.t(), alpha=-lr)
        linear.bias.sub_(grad_t.sum(dim=1), alpha=lr)
        grad_t = grad_below_t
    return loss, mistakes


def autograd_finetune_step(model, optimizer):
    def step(x, y, lr):
        loss = negative_log_likelihood(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@torch.no_grad()
def torch_ops_finetune_step(model, x, y, lr, softmax_in_c=False, sparse_first_layer=False):
    """StackedClassifier.sgd_step (without momentum) before its softmax layer went into one C call,
    or (``softmax_in_c``) after, or (``sparse_first_layer``, on a visible-major first weight) before
    its backward products went into one C pass per layer."""
    batch = x.shape[0]
    kernels = built_kernels()
    nonzeros = kernels.nonzeros_by_column(x) if sparse_first_layer else None
    codes = [x]
    for linear in model.encoders:
        if nonzeros is not None and linear is model.encoders[0]:
            codes.append(kernels.sparse_times(nonzeros, linear.weight, linear.bias).sigmoid_())
        else:
            codes.append(torch.addmm(linear.bias, codes[-1], linear.weight.t()).sigmoid_())
    logits = torch.addmm(model.output.bias, codes[-1], model.output.weight.t())
    if softmax_in_c or sparse_first_layer:
        total, wrong = kernels.softmax_nll_and_grad(logits, y)
        loss, mistakes, grad = torch.tensor(total / batch), torch.tensor(wrong), logits
    else:
        loss, mistakes, grad = softmax_nll_and_grad(logits, y)
    layers = [*model.encoders, model.output]
    for depth in range(len(layers) - 1, -1, -1):
        linear, below = layers[depth], codes[depth]
        if depth == 0 and nonzeros is not None:
            kernels.sparse_rank_update(linear.weight, nonzeros, grad, -lr / batch)
            linear.bias.sub_(grad.sum(dim=0), alpha=lr / batch)
            break
        grad_below = torch.ops.aten.sigmoid_backward(torch.mm(grad, linear.weight), below) if depth else None
        linear.weight.addmm_(grad.t(), below, alpha=-lr / batch)
        linear.bias.sub_(grad.sum(dim=0), alpha=lr / batch)
        grad = grad_below
    return loss, mistakes


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
            if "torch.topk" in name:
                masking_topk, speedup = ms, ""
            else:
                speedup = f"{masking_topk / ms:>8.2f}x"
        else:
            speedup = f"{first / ms:>8.2f}x"
        print(f"  {name:<46}{ms:>8.3f} ms/step{speedup}")


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
          f"median of {args.rounds} interleaved rounds of {args.steps} steps; last column: speed-up over the first row (masking rows: over torch.topk)")

    mnist_x, mnist_y = (torch.from_numpy(a) for a in load_mnist()["train"])
    # The sparse products need the C kernels, on the CPU: ours is the row before where they do not run.
    sparse = device.type == "cpu" and built_kernels() is not None
    for n_in, nu in ((784, 0.1), (1000, 0.3)):
        batch, lr = 32, 0.1
        if n_in == 784:
            codes = mnist_x[: args.steps * batch].to(device)
        else:
            codes = torch.rand(args.steps * batch, n_in, generator=g, device=device)
        noise = MaskingNoise(nu, "fixed")
        batches = [(noise(c, g), c, lr) for c in codes.split(batch)]
        daes = [DenoisingAutoencoder(n_in, 1000, torch.Generator().manual_seed(1)).to(device) for _ in range(8)]
        with_sparse = sparse and n_in == 784
        if with_sparse:
            daes[7].weight.data = visible_major(daes[7].weight.data)
        variants = {
            "autograd + torch.optim.SGD": autograd_pretrain_step(daes[0], torch.optim.SGD(daes[0].parameters(), lr=lr)),
            "written out, batch-major": lambda c, x, lr: batch_major_step(daes[1], c, x, lr, fast_loss=False),
            "+ vectorised loss value": lambda c, x, lr: batch_major_step(daes[2], c, x, lr, fast_loss=True),
            "+ feature-major": lambda c, x, lr: feature_major_step(daes[3], c, x, lr),
            **({"+ oneDNN products": on("onednn", lambda c, x, lr: feature_major_step(daes[4], c, x, lr))} if onednn else {}),
            "+ decoder output batch-major, one log": on("onednn" if onednn else "blas", lambda c, x, lr: torch_ops_step(daes[5], c, x, lr)),
            "+ loss in one C kernel" + ("" if with_sparse else " (ours)"): on("onednn" if onednn else "blas", daes[6].sgd_step),
            **({"+ encoder from the nonzeros (ours)": on("onednn" if onednn else "blas", daes[7].sgd_step)}
               if with_sparse else {}),
            f"fixed masking, nu={nu}, torch.topk": lambda c, x, lr, before=score_masking(nu, g, "float, topk"): before(x),
            **({f"fixed masking, nu={nu}, numpy partition": lambda c, x, lr, before=score_masking(nu, g, "float, numpy"): before(x),
                f"fixed masking, nu={nu}, int32 scores": lambda c, x, lr, before=score_masking(nu, g, "int32"): before(x)}
               if device.type == "cpu" else {}),
            f"fixed masking, nu={nu} (ours)": lambda c, x, lr: noise(x, g),
        }
        variants = {name: fn if "oneDNN" in name or "(ours)" in name else on("blas", fn) for name, fn in variants.items()}
        report(f"pretraining step {n_in} -> 1000, batch {batch}", compare(variants, batches, device, args.rounds))

    batch, lr = 20, 2.0
    x, y = mnist_x[: args.steps * batch].to(device), mnist_y[: args.steps * batch].long().to(device)
    batches = [(xb, yb, lr) for xb, yb in zip(x.split(batch), y.split(batch))]
    daes = [DenoisingAutoencoder(a, 1000, torch.Generator().manual_seed(1)) for a in (784, 1000, 1000)]
    reference = StackedClassifier.from_autoencoders(daes, 10).to(device)
    models = [StackedClassifier.from_autoencoders(daes, 10).to(device) for _ in range(6)]
    written_out, on_onednn, torch_ops, softmax_in_c, sparse_first, ours = models
    if sparse:
        for model in (sparse_first, ours):
            model.encoders[0].weight.data = visible_major(model.encoders[0].weight.data)
    variants = {
        "autograd + torch.optim.SGD": autograd_finetune_step(reference, torch.optim.SGD(reference.parameters(), lr=lr)),
        "written out, feature-major": lambda x, y, lr: feature_major_finetune_step(written_out, x, y, lr),
        **({"+ oneDNN products": on("onednn", lambda x, y, lr: feature_major_finetune_step(on_onednn, x, y, lr))} if onednn else {}),
        "+ batch-major": on("onednn" if onednn else "blas", lambda x, y, lr: torch_ops_finetune_step(torch_ops, x, y, lr)),
        **({"+ softmax layer in one C kernel":
            on("onednn" if onednn else "blas",
               lambda x, y, lr: torch_ops_finetune_step(softmax_in_c, x, y, lr, softmax_in_c=True)),
            "+ first layer from the nonzeros":
            on("onednn" if onednn else "blas",
               lambda x, y, lr: torch_ops_finetune_step(sparse_first, x, y, lr, sparse_first_layer=True))}
           if sparse else {}),
        "+ backward products in one C pass (ours)": on("onednn" if onednn else "blas", lambda x, y, lr: ours.sgd_step(x, y, lr)),
    }
    variants = {name: fn if "oneDNN" in name or "(ours)" in name else on("blas", fn) for name, fn in variants.items()}
    report(f"fine-tuning step 784-1000-1000-1000-10, batch {batch}", compare(variants, batches, device, args.rounds))


if __name__ == "__main__":
    main()
