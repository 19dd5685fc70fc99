import math

import numpy as np
import torch

from sda.dae import DenoisingAutoencoder, cross_entropy_value_and_reconstruction, reconstruction_cross_entropy
from sda.data import load_digits
from sda.noise import MaskingNoise
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
