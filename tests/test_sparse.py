"""A layer's products from its input's nonzeros (sda/kernels.c, sda/kernels.py) against float64 torch.

The training steps through them are checked against autograd in tests/test_kernels.py (layout "visible-major").
"""

import copy

import pytest
import torch

import sda.kernels
from sda.dae import DenoisingAutoencoder
from sda.kernels import built_kernels, is_visible_major, sparse_input_layout, visible_major
from sda.noise import MaskingNoise
from sda.pretrain import pretrain_layer
from sda.stacked import StackedClassifier
from tests.conftest import on_one_thread_and_on_two

KERNELS = built_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="sda/kernels.c did not build here (see the warning)")


def sparse_batch(batch: int, d: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, d, generator=g)
    return torch.where(torch.rand(batch, d, generator=g) < density, x, torch.zeros(()))


@needs_kernels
@pytest.mark.parametrize("batch, d", [(32, 784), (3, 37), (1, 1), (4, 16)])
def test_nonzeros_are_listed_by_column_rows_ascending(batch, d):
    x = sparse_batch(batch, d, 0.3, seed=d)
    x[0, -1] = float("nan")  # not zero: it must reach the products, as in the dense path
    listed = KERNELS.nonzeros_by_column(x)
    expected_rows, expected_values, expected_start = [], [], [0]
    for k in range(d):
        rows = [b for b in range(batch) if x[b, k] != 0]
        expected_rows += rows
        expected_values += [x[b, k] for b in rows]
        expected_start.append(len(expected_rows))
    count = expected_start[-1]
    assert listed.batch == batch and listed.start.tolist() == expected_start
    assert listed.rows[:count].tolist() == expected_rows
    expected = torch.stack(expected_values) if expected_values else torch.empty(0)
    assert torch.allclose(listed.values[:count], expected, rtol=0, atol=0, equal_nan=True)
    assert listed.values[:count].isnan().sum().item() == 1


@needs_kernels
@pytest.mark.parametrize("batch, d, n", [(32, 784, 1000), (5, 37, 1), (3, 20, 130), (4, 16, 16), (6, 9, 300), (2, 5, 1024)])
def test_sparse_product_and_update_match_float64(batch, d, n):
    x = sparse_batch(batch, d, 0.2, seed=n)
    g = torch.Generator().manual_seed(1)
    weight = visible_major(torch.randn(n, d, generator=g))
    bias, grad = torch.randn(n, generator=g), torch.randn(batch, n, generator=g)
    assert is_visible_major(weight) and weight.stride(1) % 16 == 0 and weight.stride(1) % 1024 != 0
    listed = KERNELS.nonzeros_by_column(x)

    out = KERNELS.sparse_times(listed, weight, bias)
    expected = bias.double() + x.double() @ weight.double().t()
    assert out.shape == (batch, n) and torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)

    padded = torch.as_strided(weight, (d, weight.stride(1)), (weight.stride(1), 1))
    padding_before = padded[:, n:].clone()
    expected_weight = weight.double() - 0.3 * grad.double().t() @ x.double()
    KERNELS.sparse_rank_update(weight, listed, grad, -0.3)
    assert torch.allclose(weight.double(), expected_weight, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded[:, n:], padding_before)  # the padding is never written


@needs_kernels
def test_sparse_products_give_the_same_bits_on_one_thread_and_on_two():
    x = sparse_batch(32, 784, 0.17, seed=0)
    g = torch.Generator().manual_seed(2)
    weight = visible_major(torch.randn(1000, 784, generator=g))
    bias, grad = torch.randn(1000, generator=g), torch.randn(32, 1000, generator=g)
    listed = KERNELS.nonzeros_by_column(x)

    def products():
        updated = visible_major(weight)
        KERNELS.sparse_rank_update(updated, listed, grad, -0.1)
        return KERNELS.sparse_times(listed, weight, bias), updated

    (one_times, one_updated), (two_times, two_updated) = on_one_thread_and_on_two(products)
    assert torch.equal(one_times, two_times) and torch.equal(one_updated, two_updated)


@needs_kernels
def test_sparse_products_refuse_a_weight_in_the_usual_layout_and_mismatched_shapes():
    x = KERNELS.nonzeros_by_column(sparse_batch(4, 10, 0.5, seed=3))
    with pytest.raises(ValueError, match="stored by visible_major"):
        KERNELS.sparse_times(x, torch.randn(6, 10), torch.zeros(6))
    with pytest.raises(ValueError, match=r"weight \(6, 11\) does not take inputs of 10 components"):
        KERNELS.sparse_times(x, visible_major(torch.randn(6, 11)), torch.zeros(6))
    with pytest.raises(ValueError, match=r"grad \(3, 6\) does not match batch 4"):
        KERNELS.sparse_rank_update(visible_major(torch.randn(6, 10)), x, torch.zeros(3, 6), 0.1)


@needs_kernels
def test_sparse_input_layout_applies_to_mostly_zero_inputs_only_and_restores_the_weight():
    weight = torch.nn.Parameter(torch.randn(8, 50))
    values = weight.detach().clone()
    with sparse_input_layout(weight, sparse_batch(10, 50, 0.5, seed=8)):
        assert weight.is_contiguous()  # half the inputs nonzero: the dense products are faster
    with sparse_input_layout(weight, sparse_batch(10, 50, 0.1, seed=8)):
        assert is_visible_major(weight) and torch.equal(weight, values)
        with torch.no_grad():
            weight[0, 0] = 5.0
    assert weight.is_contiguous() and weight[0, 0].item() == 5.0


@needs_kernels
def test_pretraining_on_mostly_zero_inputs_is_deterministic_and_agrees_with_the_dense_path(monkeypatch):
    codes = sparse_batch(200, 64, 0.2, seed=9)

    def train() -> tuple[list[float], torch.Tensor]:
        dae = DenoisingAutoencoder(64, 48, torch.Generator().manual_seed(0))
        losses = pretrain_layer(dae, codes, MaskingNoise(0.25), epochs=3, lr=0.1, batch_size=20,
                                generator=torch.Generator().manual_seed(1), name="test")
        assert dae.weight.is_contiguous()
        return losses, dae.weight.detach().clone()

    sparse_losses, sparse_weight = train()
    assert train()[0] == sparse_losses and torch.equal(train()[1], sparse_weight)
    monkeypatch.setattr(sda.kernels, "SPARSE_INPUT_DENSITY", 0.0)  # every input dense enough: torch's products
    dense_losses, dense_weight = train()
    assert dense_losses == pytest.approx(sparse_losses, rel=1e-5)
    assert torch.allclose(dense_weight, sparse_weight, atol=1e-5)
    assert not torch.equal(dense_weight, sparse_weight)  # the two paths really differ in rounding


def test_a_deep_copy_of_a_model_in_the_sparse_layout_keeps_it():
    # finetune deep-copies the state for its best epoch; the copy must load back into the layout.
    model = StackedClassifier([20, 8, 4], 3)
    model.encoders[0].weight.data = visible_major(model.encoders[0].weight.data)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.encoders[0].weight.add_(1.0)
    model.load_state_dict(state)
    assert is_visible_major(model.encoders[0].weight)
    assert torch.equal(model.encoders[0].weight, state["encoders.0.weight"])
