"""The C kernels (sda/kernels.c) against plain Python and torch, and the pure-torch fallback without them."""

import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from sda.dae import DenoisingAutoencoder, reconstruction_cross_entropy
from sda.kernels import built_kernels, cpu_kernels, is_visible_major, visible_major
from sda.noise import MaskingNoise, uniform_int32
from sda.stacked import StackedClassifier, negative_log_likelihood
from tests.conftest import ROOT, on_one_thread_and_on_two

KERNELS = built_kernels()
# CI and this machine have a compiler; a checkout without one runs the fallback test below only.
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="sda/kernels.c did not build here (see the warning)")


def python_fisher_yates(draws: list[int], d: int) -> list[int]:
    """The first k places of a Durstenfeld shuffle of range(d), partners from 32-bit draws."""
    order = list(range(d))
    for i, u in enumerate(draws):
        j = i + ((u & 0xFFFFFFFF) * (d - i) >> 32)
        order[i], order[j] = order[j], order[i]
    return order[: len(draws)]


@needs_kernels
@pytest.mark.parametrize("d, k", [(784, 78), (1000, 300), (7, 7), (1, 1), (5, 0)])
def test_random_subsets_are_the_python_fisher_yates_on_the_same_draws(d, k):
    draws = uniform_int32(40 * k, torch.Generator().manual_seed(d)).view(40, k)
    positions = KERNELS.random_subsets(draws, d)
    assert positions.tolist() == [python_fisher_yates(row, d) for row in draws.tolist()]
    assert all(len(set(row)) == k for row in positions.tolist())


@needs_kernels
def test_random_subsets_hit_every_subset_equally_often():
    # All C(5, 2) = 10 subsets over 50,000 rows: chi-square with 9 degrees of freedom; 27.9 is its
    # 0.999 quantile. A shuffle with a wrong partner range (e.g. i + u mod (d - i - 1)) fails by
    # thousands, since it never leaves a position in place.
    rows = 50_000
    positions = KERNELS.random_subsets(uniform_int32(rows * 2, torch.Generator().manual_seed(0)).view(rows, 2), 5)
    counts = Counter(frozenset(row) for row in positions.tolist())
    assert len(counts) == 10
    chi_square = sum((c - rows / 10) ** 2 / (rows / 10) for c in counts.values())
    assert chi_square < 27.9


@needs_kernels
def test_masked_copy_zeroes_exactly_the_positions_and_refuses_others():
    x = torch.rand(3, 6) + 0.5
    positions = torch.tensor([[0, 5], [2, 3], [4, 1]])
    out = KERNELS.masked_copy(x, positions)
    expected = x.scatter(1, positions, 0.0)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="position 6 is outside 0..5"):
        KERNELS.masked_copy(x, torch.tensor([[0, 5], [2, 6], [4, 1]]))
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        KERNELS.masked_copy(x.double(), positions)


@needs_kernels
def test_cross_entropy_kernel_matches_float64_torch_even_saturated():
    g = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.randn(6, 50, generator=g) * 8, torch.tensor([[1e4, -1e4, 0.0] * 16 + [30.0, -30.0]])])
    target = torch.rand(7, 50, generator=g)
    expected_loss = reconstruction_cross_entropy(logits.double(), target.double()).item() * 7
    expected_grad = torch.sigmoid(logits.double()) - target.double()
    grad = logits.clone()
    loss, column_sums = KERNELS.cross_entropy_and_output_grad(grad, target)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6, rtol=0)
    assert torch.allclose(column_sums.double(), expected_grad.sum(dim=0), atol=1e-5, rtol=0)


@needs_kernels
def test_cross_entropy_kernel_lets_a_diverged_logit_show():
    # No -ffast-math: a NaN or infinite logit must reach the loss, where pretrain_layer stops on it.
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(2, 4)
        logits[1, 2] = bad
        loss, _ = KERNELS.cross_entropy_and_output_grad(logits, torch.full((2, 4), 0.5))
        assert loss != loss or loss == float("inf")


@needs_kernels
def test_softmax_kernel_matches_torch_and_counts_mistakes_like_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 10, generator=g) * 5
    logits[0] = 0.0  # a tie everywhere: argmax takes the first class
    logits[1, :] = -200.0
    logits[1, 3] = 200.0  # label 0 has probability exp(-400), no log(0)
    labels = torch.randint(0, 10, (9,), generator=g)
    labels[0], labels[1] = 0, 0
    expected_loss = F.cross_entropy(logits.double(), labels, reduction="sum").item()
    expected_grad = torch.softmax(logits.double(), dim=1) - F.one_hot(labels, 10).double()
    grad = logits.clone()
    loss, mistakes = KERNELS.softmax_nll_and_grad(grad, labels)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert mistakes == (logits.argmax(dim=1) != labels).sum().item()
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6, rtol=0)


@needs_kernels
def test_softmax_kernel_refuses_a_label_out_of_range_and_writes_nothing():
    logits = torch.randn(3, 4)
    before = logits.clone()
    with pytest.raises(ValueError, match="label 4 of batch row 2 is outside 0..3"):
        KERNELS.softmax_nll_and_grad(logits, torch.tensor([0, 3, 4]))
    assert torch.equal(logits, before)


# "visible-major": the weight stored for mostly-zero inputs, whose products then come from the
# input's nonzeros (sda/kernels.py, sparse_input_layout); the same SGD step either way.
LAYOUTS = ["usual", "visible-major"]


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_dae_step_through_the_kernels_is_the_autograd_step(layout):
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(16, 30, generator=g)
    corrupted = MaskingNoise(0.3)(clean, g)
    reference = DenoisingAutoencoder(30, 20, torch.Generator().manual_seed(0)).double()
    ours = DenoisingAutoencoder(30, 20, torch.Generator().manual_seed(0))
    if layout == "visible-major":
        ours.weight.data = visible_major(ours.weight.data)
    assert cpu_kernels(clean, corrupted) is not None
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(3):
        expected = reference.loss(corrupted.double(), clean.double())
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        got = ours.sgd_step(corrupted, clean, lr=0.5)
        assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert is_visible_major(ours.weight) == (layout == "visible-major")
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.allclose(a.float(), b, atol=1e-5, rtol=1e-5), name


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_float32_finetune_step_through_the_kernel_is_the_autograd_step(momentum, layout):
    daes = [DenoisingAutoencoder(12, 8, torch.Generator().manual_seed(0)), DenoisingAutoencoder(8, 6, torch.Generator().manual_seed(1))]
    reference = StackedClassifier.from_autoencoders(daes, 4).double()
    ours = StackedClassifier.from_autoencoders(daes, 4)
    if layout == "visible-major":
        ours.encoders[0].weight.data = visible_major(ours.encoders[0].weight.data)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=momentum)
    velocity = ours.momentum_buffers()
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        x, y = torch.rand(5, 12, generator=g), torch.randint(0, 4, (5,), generator=g)
        x[torch.rand(5, 12, generator=g) < 0.6] = 0.0  # mostly zeros, as MNIST's pixels
        logits = reference(x.double())
        expected = negative_log_likelihood(logits, y)
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        loss, mistakes = ours.sgd_step(x, y, 0.3, momentum, velocity)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert mistakes.item() == (logits.argmax(dim=1) != y).sum().item()
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.allclose(a.float(), b, atol=1e-5, rtol=1e-5), name


FALLBACK = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from sda.dae import DenoisingAutoencoder
    from sda.noise import MaskingNoise
    x = torch.rand(8, 40) + 0.01
    g = torch.Generator().manual_seed(0)
    out = MaskingNoise(0.25)(x, g)
    loss = DenoisingAutoencoder(40, 10).sgd_step(out, x, 0.1)
    out2 = MaskingNoise(0.25)(x, g)
print(sorted(set((out == 0).sum(dim=1).tolist())), torch.isfinite(loss).item())
for w in caught:
    print("WARNING", w.message)
"""


def test_without_a_compiler_the_steps_fall_back_to_torch_and_say_why():
    # A real build attempt with a compiler that fails (false exits 1): one warning, then torch ops.
    env = {"PATH": "/usr/bin:/bin", "CC": "false", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[10] True"
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "C kernels are unavailable" in warnings[0] and "'false' failed to build kernels.c" in warnings[0]


@needs_kernels
def test_the_built_library_is_kept_per_machine_a_damaged_one_is_built_again_and_no_cache_is_no_error(tmp_path):
    # The compiler is a script that logs its calls, so a build that did not happen shows.
    calls = tmp_path / "calls"
    compiler = tmp_path / "logging-cc"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {KERNELS.build.split()[0]} "$@"\n')
    compiler.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "CC": str(compiler), "PYTHONPATH": str(ROOT), "SDA_CACHE_DIR": str(tmp_path / "cache")}
    use = ("import torch; from sda.kernels import built_kernels; k = built_kernels(); print(k.build); "
           "assert sorted(k.random_subsets(torch.zeros(1, 3, dtype=torch.int32), 3)[0].tolist()) == [0, 1, 2]")

    def builds_in_a_new_process() -> int:
        calls.write_text("")
        done = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
        assert done.stdout.startswith(f"{compiler} ")
        return sum("kernels.c" in line for line in calls.read_text().splitlines())

    assert builds_in_a_new_process() == 1
    (entry,) = (tmp_path / "cache" / "kernels").iterdir()  # no build directory left beside it
    assert builds_in_a_new_process() == 0
    (entry / "kernels.so").write_bytes(b"not a library")
    assert builds_in_a_new_process() == 1
    assert (entry / "kernels.so").read_bytes()[:4] == b"\x7fELF"
    env["SDA_CACHE_DIR"] = str(calls)  # a file: no cache can be made there, so a build for the process
    assert builds_in_a_new_process() == 1


@needs_kernels
@pytest.mark.parametrize("batch, n, k", [(20, 1000, 1000), (20, 10, 1000), (23, 5, 17), (1, 1, 1), (7, 13, 48), (32, 9, 33)])
def test_backward_and_update_is_the_gradient_below_then_the_sgd_update(batch, n, k):
    # Batches over 10 and 20 rows and widths off 16 and 32 columns exercise every partial tile.
    g = torch.Generator().manual_seed(batch + n + k)
    weight, grad = torch.randn(n, k, generator=g), torch.randn(batch, n, generator=g)
    below = torch.rand(batch, k + 3, generator=g)[:, :k]  # padded rows, as sparse_times gives
    for through_sigmoid in (True, False):
        updated = weight.clone()
        grad_below = KERNELS.backward_and_update(updated, grad, below, -0.3, through_sigmoid)
        expected = grad.double() @ weight.double()
        if through_sigmoid:
            expected = expected * below.double() * (1 - below.double())
        assert torch.allclose(grad_below.double(), expected, atol=1e-4, rtol=1e-5)
        assert torch.allclose(updated.double(), weight.double() - 0.3 * grad.double().t() @ below.double(), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_backward_and_update_gives_the_same_bits_on_one_thread_and_on_two_and_checks_shapes():
    g = torch.Generator().manual_seed(5)
    weight, grad = torch.randn(1000, 1000, generator=g), torch.randn(20, 1000, generator=g)
    below = torch.rand(20, 1000, generator=g)

    def backward_and_update():
        updated = weight.clone()
        return KERNELS.backward_and_update(updated, grad, below, -0.1, True), updated

    (one_below, one_weight), (two_below, two_weight) = on_one_thread_and_on_two(backward_and_update)
    assert torch.equal(one_below, two_below) and torch.equal(one_weight, two_weight)
    with pytest.raises(ValueError, match=r"grad \(20, 1000\), weight \(1000, 999\) and below \(20, 1000\) do not chain"):
        KERNELS.backward_and_update(torch.zeros(1000, 999), grad, below, 0.1, True)
    with pytest.raises(ValueError, match="weight must be a contiguous CPU torch.float32"):
        KERNELS.backward_and_update(weight.t(), grad, below, 0.1, True)
