import math

import numpy as np
import torch

from sda.dae import DenoisingAutoencoder, reconstruction_cross_entropy
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


def test_tie_survives_device_and_dtype_moves_and_state_dict_round_trip():
    dae = DenoisingAutoencoder(6, 4, torch.Generator().manual_seed(0))
    moved = dae.to("cuda" if torch.cuda.is_available() else "cpu").double()
    assert len(list(moved.parameters())) == 3
    with torch.no_grad():
        moved.weight.zero_()
    assert torch.count_nonzero(moved.decode_logits(torch.ones(1, 4, dtype=torch.float64))) == 0

    clone = DenoisingAutoencoder(6, 4)
    clone.load_state_dict(dae.state_dict())
    assert set(clone.state_dict()) == {"weight", "hidden_bias", "visible_bias"}
    y = torch.rand(2, 4)
    assert torch.equal(clone.decode_logits(y), torch.nn.functional.linear(y, dae.weight.detach().t().float(), None))


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
