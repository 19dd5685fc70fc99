import pytest
import torch

from sda.noise import MaskingNoise


def batch(n=64, d=784, seed=0):
    # Strictly positive inputs, so every zero in the output is a masked component.
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) + 0.01


@pytest.mark.parametrize("nu", [0.1, 0.25, 0.5, 0.9])
def test_fixed_masks_exactly_round_nu_d_per_example(nu):
    x = batch()
    out = MaskingNoise(nu, "fixed")(x, torch.Generator().manual_seed(1))
    masked = (out == 0).sum(dim=1)
    assert torch.all(masked == round(nu * x.shape[1]))


def test_fixed_masks_differ_between_examples_and_between_calls():
    x = batch()
    noise, g = MaskingNoise(0.25, "fixed"), torch.Generator().manual_seed(1)
    first, second = noise(x, g) == 0, noise(x, g) == 0
    assert len({tuple(row.nonzero().flatten().tolist()) for row in first}) == x.shape[0]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("mode", ["fixed", "bernoulli"])
def test_kept_values_are_not_rescaled(mode):
    x = batch()
    out = MaskingNoise(0.3, mode)(x, torch.Generator().manual_seed(2))
    kept = out != 0
    assert torch.equal(out[kept], x[kept])
    assert kept.float().mean().item() < 0.8


def test_bernoulli_masks_at_rate_nu_with_varying_counts():
    x = batch(n=2000)
    out = MaskingNoise(0.3, "bernoulli")(x, torch.Generator().manual_seed(3))
    per_example = (out == 0).sum(dim=1).float()
    assert abs(per_example.mean().item() / x.shape[1] - 0.3) < 0.01
    assert per_example.std().item() > 5  # binomial spread, unlike the fixed count


def test_zero_corruption_is_the_identity():
    x = batch()
    assert torch.equal(MaskingNoise(0.0, "fixed")(x), x)


def test_same_generator_seed_gives_same_mask():
    x = batch()
    noise = MaskingNoise(0.25, "fixed")
    a = noise(x, torch.Generator().manual_seed(7))
    b = noise(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("nu, mode", [(-0.1, "fixed"), (1.0, "fixed"), (0.2, "gaussian")])
def test_invalid_settings_are_refused(nu, mode):
    with pytest.raises(ValueError):
        MaskingNoise(nu, mode)


def test_fixed_masking_hits_every_component_equally_often():
    x = batch(n=4000, d=50)
    out = MaskingNoise(0.3, "fixed")(x, torch.Generator().manual_seed(6))
    per_component = (out == 0).float().mean(dim=0)
    # Each component's rate is 15/50 = 0.3; its standard error over 4000 rows is 0.007.
    assert torch.all((per_component - 0.3).abs() < 0.035)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fixed_masking_keeps_the_input_dtype(dtype):
    x = batch(n=8, d=20).to(dtype)
    out = MaskingNoise(0.3, "fixed")(x, torch.Generator().manual_seed(8))
    assert out.dtype == dtype
    assert torch.all((out == 0).sum(dim=1) == 6)
    assert torch.equal(out[out != 0], x[out != 0])
