import math

import numpy as np
import pytest
import torch

from sda.dae import (
    DenoisingAutoencoder,
    Emphasis,
    cross_entropy_value_and_reconstruction,
    reconstruction_cross_entropy,
    reconstruction_loss_from_logits,
)
from sda.data import load_digits
from sda.noise import GaussianNoise, MaskingNoise, SaltPepperNoise
from sda.pretrain import pretrain_layer, reconstruction_loss


def test_tied_weight_is_one_parameter_used_by_encoder_and_decoder():
    dae = DenoisingAutoencoder(6, 4, torch.Generator().manual_seed(0))
    assert [name for name, _ in dae.named_parameters()] == ["weight", "hidden_bias", "visible_bias"]
    # Changing W changes the decoder: it reads the same tensor, transposed.
    y = torch.rand(3, 4)
    before = dae.decode_logits(y)
    with torch.no_grad():
        dae.weight.add_(1.0)
    assert torch.allclose(dae.decode_logits(y) - before, y.sum(dim=1, keepdim=True).expand(3, 6))


def test_gradient_of_the_tie_sums_encoder_and_decoder_contributions():
    dae = DenoisingAutoencoder(5, 3, torch.Generator().manual_seed(0)).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    dae.loss(x, x).backward()
    w = dae.weight.detach().clone().requires_grad_(True)
    h = torch.sigmoid(x @ w.t() + dae.hidden_bias.detach())
    z_logits = h @ w + dae.visible_bias.detach()
    reconstruction_cross_entropy(z_logits, x).backward()
    assert torch.allclose(dae.weight.grad, w.grad)


def test_fast_loss_value_matches_the_reference_even_saturated():
    g = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.randn(6, 50, generator=g) * 8, torch.tensor([[1e4, -1e4, 0.0] * 16 + [30.0, -30.0]])])
    target = torch.rand(7, 50, generator=g)
    expected = reconstruction_cross_entropy(logits.double(), target.double()) * 7
    got, reconstruction = cross_entropy_value_and_reconstruction(logits.clone(), target)
    assert torch.isfinite(got)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    assert torch.equal(reconstruction, torch.sigmoid(logits))


def test_sgd_step_is_the_autograd_sgd_step():
    # Same start, same corrupted batch: the hand-written step and autograd + torch.optim.SGD must
    # land on the same parameters and report the same loss.
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(7, 9, generator=g, dtype=torch.float64)
    corrupted = MaskingNoise(0.3)(clean, g)
    reference = DenoisingAutoencoder(9, 5, torch.Generator().manual_seed(0)).double()
    ours = DenoisingAutoencoder(9, 5, torch.Generator().manual_seed(0)).double()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.7)
    for _ in range(3):
        expected = reference.loss(corrupted, clean)
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        got = ours.sgd_step(corrupted, clean, lr=0.7)
        assert torch.allclose(got, expected.detach(), rtol=1e-12, atol=0)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
        assert not torch.equal(a, DenoisingAutoencoder(9, 5, torch.Generator().manual_seed(0)).double().get_parameter(name))


def test_tie_survives_device_and_dtype_moves_and_state_dict_round_trip():
    dae = DenoisingAutoencoder(6, 4, torch.Generator().manual_seed(0))
    moved = dae.to("cuda" if torch.cuda.is_available() else "cpu").double()
    assert len(list(moved.parameters())) == 3
    with torch.no_grad():
        moved.weight.zero_()
    assert torch.count_nonzero(moved.decode_logits(torch.ones(1, 4, dtype=torch.float64, device=moved.weight.device))) == 0

    clone = DenoisingAutoencoder(6, 4)
    clone.load_state_dict(dae.state_dict())
    assert set(clone.state_dict()) == {"weight", "hidden_bias", "visible_bias"}
    y = torch.rand(2, 4)
    assert torch.equal(clone.decode_logits(y), torch.nn.functional.linear(y, dae.weight.detach().cpu().t().float(), None))


def test_init_range_is_four_times_glorot():
    dae = DenoisingAutoencoder(784, 1000, torch.Generator().manual_seed(0))
    bound = 4 * math.sqrt(6 / 1784)
    assert dae.weight.abs().max().item() <= bound
    assert dae.weight.abs().max().item() > 0.99 * bound
    assert torch.count_nonzero(dae.hidden_bias) == 0 and torch.count_nonzero(dae.visible_bias) == 0


def test_loss_matches_the_formula_on_a_hand_computed_case():
    # z = sigmoid(0) = 0.5 everywhere: each component costs log 2 whatever x is.
    logits = torch.zeros(2, 3)
    x = torch.tensor([[0.0, 1.0, 0.25], [1.0, 1.0, 1.0]])
    assert math.isclose(reconstruction_cross_entropy(logits, x).item(), 3 * math.log(2), rel_tol=1e-6)
    # One component, z = sigmoid(2): -(0.75 log z + 0.25 log(1 - z)); mean over a batch of two.
    z = 1 / (1 + math.exp(-2))
    expected = -(0.75 * math.log(z) + 0.25 * math.log(1 - z))
    got = reconstruction_cross_entropy(torch.full((2, 1), 2.0), torch.full((2, 1), 0.75))
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_loss_is_finite_for_saturated_units():
    logits = torch.tensor([[1e4, -1e4]])
    assert torch.isfinite(reconstruction_cross_entropy(logits, torch.tensor([[0.0, 1.0]])))


def test_one_layer_on_digits_lowers_its_reconstruction_loss():
    x = torch.from_numpy(load_digits(seed=0)["train"][0])
    g = torch.Generator().manual_seed(0)
    dae = DenoisingAutoencoder(64, 32, g)
    before = reconstruction_loss(dae, x)
    losses = pretrain_layer(dae, x, MaskingNoise(0.25, "fixed"), epochs=10, lr=0.1, batch_size=20, generator=g)
    after = reconstruction_loss(dae, x)
    assert after < 0.8 * before
    assert losses[-1] < losses[0]
    assert np.all(np.isfinite(losses))


# --- the losses the autograd engine offers: squared error, and the emphasised (weighted) loss -------

# One example, four components. z = s(logits) = 1/2, 1/2, 3/4, 1/4 against x = 1, 0, 1, 0: the
# cross-entropy terms are log 2, log 2, log 4/3, log 4/3; the squared errors 1/4, 1/4, 1/16, 1/16.
# Components 0 and 2 were corrupted.
LOGITS = torch.tensor([[0.0, 0.0, math.log(3), -math.log(3)]], dtype=torch.float64)
CLEAN = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
CORRUPTED = torch.tensor([[True, False, True, False]])


@pytest.mark.parametrize("alpha, beta, cross_entropy, squared_error", [
    (1.0, 1.0, 2 * math.log(2) + 2 * math.log(4 / 3), 0.625),
    (1.0, 0.5, 1.5 * math.log(2) + 1.5 * math.log(4 / 3), 0.25 + 0.125 + 0.0625 + 0.03125),
    (1.0, 0.0, math.log(2) + math.log(4 / 3), 0.3125),
    (2.0, 0.0, 2 * math.log(2) + 2 * math.log(4 / 3), 0.625),
    (0.0, 1.0, math.log(2) + math.log(4 / 3), 0.3125),
], ids=["plain", "1-0.5", "1-0", "2-0", "0-1"])
def test_emphasis_weighs_the_corrupted_components_alpha_and_the_others_beta(alpha, beta, cross_entropy, squared_error):
    weights = Emphasis(alpha, beta).weights(CORRUPTED, torch.float64)
    for kind, expected in (("cross_entropy", cross_entropy), ("squared_error", squared_error)):
        got = reconstruction_loss_from_logits(LOGITS, CLEAN, kind, weights)
        assert math.isclose(got.item(), expected, rel_tol=1e-12), kind


def test_an_uncorrupted_component_with_beta_0_has_no_gradient_and_no_say_in_the_loss():
    weights = Emphasis(1.0, 0.0).weights(CORRUPTED, torch.float64)
    for kind in ("cross_entropy", "squared_error"):
        logits = LOGITS.clone().requires_grad_(True)
        loss = reconstruction_loss_from_logits(logits, CLEAN, kind, weights)
        loss.backward()
        assert torch.all(logits.grad[~CORRUPTED] == 0) and torch.all(logits.grad[CORRUPTED] != 0), kind
        other_target = torch.where(CORRUPTED, CLEAN, 0.5)  # change only the uncorrupted targets
        assert reconstruction_loss_from_logits(LOGITS, other_target, kind, weights).item() == loss.item(), kind


def test_the_losses_are_averaged_over_the_batch():
    logits, clean, corrupted = (t.repeat(3, 1) for t in (LOGITS, CLEAN, CORRUPTED))
    weights = Emphasis(1.0, 0.5).weights(corrupted, torch.float64)
    for kind in ("cross_entropy", "squared_error"):
        one = reconstruction_loss_from_logits(LOGITS, CLEAN, kind, weights[:1])
        assert math.isclose(reconstruction_loss_from_logits(logits, clean, kind, weights).item(), one.item(), rel_tol=1e-12)


def test_the_plain_loss_without_weights_is_computed_as_before():
    g = torch.Generator().manual_seed(4)
    logits, target = torch.randn(5, 30, generator=g), torch.rand(5, 30, generator=g)
    assert torch.equal(reconstruction_loss_from_logits(logits, target), reconstruction_cross_entropy(logits, target))
    dae = DenoisingAutoencoder(30, 8, torch.Generator().manual_seed(0))
    assert torch.equal(dae.loss(target, target), reconstruction_cross_entropy(dae.decode_logits(dae.encode(target)), target))
    assert Emphasis().weights(torch.ones(2, 3, dtype=torch.bool), torch.float32) is None


@pytest.mark.parametrize("alpha, beta", [(-1.0, 1.0), (1.0, -0.5), (0.0, 0.0), (float("inf"), 1.0), (float("nan"), 1.0)])
def test_invalid_emphasis_is_refused(alpha, beta):
    with pytest.raises(ValueError):
        Emphasis(alpha, beta)


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        reconstruction_loss_from_logits(LOGITS, CLEAN, "hinge")


# --- pretraining with the other noises, losses and emphasis (autograd engine) -----------------------


@pytest.fixture(scope="module")
def digits_x():
    return torch.from_numpy(load_digits(seed=0)["train"][0])[:400]


SETTINGS = {
    "masking-emphasis": (MaskingNoise(0.25), "cross_entropy", Emphasis(1.0, 0.5)),
    "salt_pepper": (SaltPepperNoise(0.25), "cross_entropy", Emphasis()),
    "salt_pepper-emphasis": (SaltPepperNoise(0.25), "cross_entropy", Emphasis(1.0, 0.0)),
    "gaussian": (GaussianNoise(0.3), "cross_entropy", Emphasis()),
    "gaussian-squared_error": (GaussianNoise(0.3), "squared_error", Emphasis()),
    "salt_pepper-squared_error-emphasis": (SaltPepperNoise(0.25), "squared_error", Emphasis(1.0, 0.5)),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_autograd_engine_trains_every_noise_loss_and_emphasis(digits_x, setting):
    noise, loss, emphasis = SETTINGS[setting]
    dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    before = reconstruction_loss(dae, digits_x, kind=loss)
    losses = pretrain_layer(dae, digits_x, noise, epochs=4, lr=0.1, batch_size=20, generator=torch.Generator().manual_seed(1),
                            engine="autograd", loss=loss, emphasis=emphasis)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert reconstruction_loss(dae, digits_x, kind=loss) < before


def test_the_emphasis_weights_are_those_of_the_components_the_noise_corrupted(digits_x):
    seen = []

    class RecordingNoise(SaltPepperNoise):
        def corrupt_with_mask(self, x, generator=None):
            corrupted, mask = super().corrupt_with_mask(x, generator)
            seen.append(mask)
            return corrupted, mask

    class RecordingAutoencoder(DenoisingAutoencoder):
        def loss(self, corrupted, clean, weights=None, kind="cross_entropy"):
            if corrupted is not clean:  # a training step, not the untrained model's clean loss
                weights_used.append(weights)
            return super().loss(corrupted, clean, weights, kind)

    dae = RecordingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    weights_used = []
    pretrain_layer(dae, digits_x[:60], RecordingNoise(0.25), epochs=1, lr=0.1, batch_size=20, generator=torch.Generator().manual_seed(1),
                   engine="autograd", emphasis=Emphasis(2.0, 0.5))
    assert len(seen) == len(weights_used) == 3
    for mask, weights in zip(seen, weights_used):
        assert torch.equal(weights, torch.where(mask, 2.0, 0.5))


def test_plain_emphasis_trains_exactly_as_without_it(digits_x):
    results = []
    for kwargs in ({}, {"emphasis": Emphasis(1.0, 1.0), "loss": "cross_entropy"}):
        dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
        losses = pretrain_layer(dae, digits_x, MaskingNoise(0.25), epochs=2, lr=0.1, batch_size=20,
                                generator=torch.Generator().manual_seed(1), engine="autograd", **kwargs)
        results.append((losses, dae.weight.detach().clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_fused_engine_refuses_what_it_does_not_implement_before_training(digits_x, setting):
    noise, loss, emphasis = SETTINGS[setting]
    dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    untrained = dae.weight.detach().clone()
    with pytest.raises(ValueError, match="the fused engine runs masking noise with the plain cross-entropy only"):
        pretrain_layer(dae, digits_x, noise, epochs=1, lr=0.1, batch_size=20, generator=torch.Generator().manual_seed(1),
                       engine="fused", loss=loss, emphasis=emphasis)
    assert torch.equal(dae.weight, untrained)
