"""A diverged training run stops with an error naming the layer and the epoch, even while its loss is finite."""

import math

import pytest
import torch

from sda.dae import DenoisingAutoencoder
from sda.data import load_digits
from sda.finetune import EarlyStopping, finetune
from sda.noise import MaskingNoise
from sda.pretrain import pretrain_layer, reconstruction_loss
from sda.stacked import StackedClassifier
from sda.training import DIVERGENCE_FACTOR, DivergenceError, check_epoch_loss


@pytest.fixture(scope="module")
def digits():
    return {name: (torch.from_numpy(x), torch.from_numpy(y)) for name, (x, y) in load_digits(0).items()}


def test_the_rule_flags_non_finite_and_absurd_losses_only():
    check_epoch_loss("layer1", 3, DIVERGENCE_FACTOR * 40.0, 40.0, 0.1)  # at the limit: not diverged
    with pytest.raises(DivergenceError, match=r"^layer1: training loss 401 at epoch 3 is over 10 times the untrained model's 40"):
        check_epoch_loss("layer1", 3, DIVERGENCE_FACTOR * 40.0 + 1, 40.0, 0.1)
    for loss in (math.nan, math.inf):
        with pytest.raises(DivergenceError, match=f"^finetune: training loss became {loss} at epoch 2"):
            check_epoch_loss("finetune", 2, loss, 2.3, 0.1)
    # a decayed rate reads as the number it is, not its float64 expansion
    with pytest.raises(DivergenceError, match=r"\(lr=3\.095\); lower the learning rate$"):
        check_epoch_loss("finetune", 4, 1000.0, 2.3, 4.0 * 0.95**5)


def test_pretraining_at_an_absurd_rate_stops_at_its_first_epoch(digits):
    x = digits["train"][0]
    dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    untrained = reconstruction_loss(dae, x[:20])
    with pytest.raises(DivergenceError, match=r"^pretrain\.layer2: training loss .* at epoch 1 is over 10 times") as caught:
        pretrain_layer(dae, x, MaskingNoise(0.25), epochs=5, lr=1e30, batch_size=20,
                       generator=torch.Generator().manual_seed(1), name="pretrain.layer2")
    assert f"untrained model's {untrained:.4g}" in str(caught.value)


def test_pretraining_at_a_sane_rate_is_not_flagged(digits):
    dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    losses = pretrain_layer(dae, digits["train"][0], MaskingNoise(0.25), epochs=3, lr=0.1, batch_size=20,
                            generator=torch.Generator().manual_seed(1))
    assert losses[-1] < losses[0]


def test_finetuning_at_an_absurd_rate_stops_at_its_first_epoch(digits):
    dae = DenoisingAutoencoder(64, 32, torch.Generator().manual_seed(0))
    model = StackedClassifier.from_autoencoders([dae], n_classes=10)
    # lr 1e4 keeps the loss finite (about 9,000 against ln 10 = 2.3 untrained): only the factor catches it.
    with pytest.raises(DivergenceError, match=r"^finetune: training loss .* at epoch 1 is over 10 times the untrained model's 2\.303"):
        finetune(model, digits["train"], digits["valid"], lr=1e4, batch_size=20, max_epochs=5,
                 stopping=EarlyStopping(), generator=torch.Generator().manual_seed(1))
