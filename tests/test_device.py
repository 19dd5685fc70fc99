import subprocess
import sys

import pytest
import torch

from sda.dae import DenoisingAutoencoder
from sda.device import (
    choose_cpu_matmul,
    cpu_matmul,
    float32_products_are_exact,
    float32_relative_error,
    set_cpu_matmul,
    with_cpu_matmul,
)
from tests.conftest import ROOT


@pytest.fixture
def restore_cpu_matmul():
    before = torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision = before


def split_into_two_bfloat16(t: torch.Tensor) -> torch.Tensor:
    high = t.bfloat16().float()
    return high + (t - high).bfloat16().float()


def test_the_exactness_check_refuses_products_narrower_than_float32():
    assert float32_products_are_exact(lambda a, b: (a.double() @ b.double()).float())
    assert not float32_products_are_exact(lambda a, b: (a.bfloat16() @ b.bfloat16()).float())
    # torch's "high" precision: each float32 as the sum of two bfloat16, ~16 bits of mantissa.
    assert not float32_products_are_exact(lambda a, b: split_into_two_bfloat16(a) @ split_into_two_bfloat16(b))


@pytest.mark.parametrize("choice", ["auto", "blas"])
def test_after_the_choice_products_of_the_training_shapes_are_float32_exact(choice, restore_cpu_matmul):
    library = choose_cpu_matmul(choice)
    assert library in ("onednn", "blas") and (choice == "auto" or library == "blas")
    assert (torch.backends.mkldnn.matmul.fp32_precision == "bf16") == (library == "onednn")
    g = torch.Generator().manual_seed(7)
    weight, batch_t = torch.randn(1000, 784, generator=g), torch.rand(784, 32, generator=g)
    grad_t = torch.randn(784, 32, generator=g)
    for a, b in ((weight, batch_t), (weight, grad_t), (weight.t(), torch.randn(1000, 20, generator=g))):
        assert float32_relative_error(a @ b, a, b) < 1e-7
    # The rank-32 update accumulated into W in place, as sgd_step does.
    code_t = torch.rand(1000, 32, generator=g)
    updated = weight.clone().addmm_(code_t, grad_t.t(), alpha=-0.1)
    exact = weight.double() - 0.1 * code_t.double() @ grad_t.t().double()
    scale = weight.double().abs() + 0.1 * code_t.double() @ grad_t.t().double().abs()
    assert ((updated.double() - exact).abs() / scale).mean().item() < 1e-7


def test_a_training_run_is_the_same_float32_computation_under_either_library(restore_cpu_matmul):
    """Both libraries compute in float32: 50 steps differ by float32 rounding only, and each repeats exactly."""
    x = torch.rand(64, 196, generator=torch.Generator().manual_seed(0))
    library = None

    def train(choice: str) -> torch.Tensor:
        nonlocal library
        library = choose_cpu_matmul(choice)
        dae = DenoisingAutoencoder(196, 100, torch.Generator().manual_seed(1))
        for step in range(50):
            batch = x[(step % 2) * 32 :][:32]
            dae.sgd_step(batch, batch, 0.1)
        return dae.weight.detach().clone()

    auto = train("auto")
    if library == "onednn":
        # Another library, another order of summation: not the same bits, the same float32 result.
        blas = train("blas")
        assert not torch.equal(auto, blas)
        assert torch.allclose(auto, blas, rtol=0, atol=1e-5)
    assert torch.equal(auto, train("auto"))


def test_an_unknown_choice_names_the_variable(restore_cpu_matmul):
    with pytest.raises(ValueError, match="SDA_CPU_MATMUL must be one of .*'mkl'"):
        choose_cpu_matmul("mkl")


def test_with_cpu_matmul_sets_its_library_at_every_call_and_passes_the_result_through(restore_cpu_matmul):
    seen = []

    def product(a, b, scale=1.0):
        seen.append(cpu_matmul())
        return scale * a @ b

    on_blas, on_onednn = with_cpu_matmul("blas", product), with_cpu_matmul("onednn", product)
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    assert torch.equal(on_onednn(a, b, scale=2.0), torch.full((2, 2), 6.0))
    assert torch.equal(on_blas(a, b), torch.full((2, 2), 3.0))
    set_cpu_matmul("onednn")
    on_blas(a, b)
    assert seen == ["onednn", "blas", "blas"]
    assert with_cpu_matmul(None, product) is product


def test_a_stage_with_a_bad_choice_stops_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "layer1"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SDA_CPU_MATMUL": "fast"},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: SDA_CPU_MATMUL must be one of ('auto', 'blas'), got 'fast'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


FLUSHED_IN_THREADS = """
import threading
from stages.common import setup_torch
from sda.device import denormals_flushed
print(denormals_flushed())
setup_torch("cpu")
seen = []
thread = threading.Thread(target=lambda: seen.append(denormals_flushed()))
thread.start(); thread.join()
print(denormals_flushed(), seen[0])
"""


def test_a_stage_flushes_denormals_in_its_own_thread_and_those_it_starts():
    done = subprocess.run([sys.executable, "-c", FLUSHED_IN_THREADS], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
