"""The fused engine trains what the autograd engine trains, and masks do not depend on the C kernels.

``autograd`` is the readable definition (the models' loss, autograd, torch.optim.SGD); ``fused`` is
checked against it over whole epochs, for every configuration the params allow it to run (masking
noise with the plain cross-entropy; other noises, losses and emphasis need ``autograd``): fixed and
bernoulli masking, dense and mostly-zero inputs (the sparse first-layer path), fine-tuning with and
without momentum and with a decaying rate. Float32 rounding differs between the two, so parameters
are compared within a tolerance that two hundred steps of rounding stay far inside, and that a
wrong gradient term (a missing factor, a dropped bias update) exceeds by orders of magnitude.
"""

import hashlib
import subprocess
import sys

import pytest
import torch

from sda.dae import DenoisingAutoencoder
from sda.data import load_digits
from sda.finetune import EarlyStopping, finetune
from sda.kernels import built_kernels
from sda.noise import MaskingNoise, random_subsets, uniform_int32
from sda.pretrain import pretrain_layer
from sda.stacked import StackedClassifier
from tests.conftest import ROOT

KERNELS = built_kernels()


@pytest.fixture(scope="module")
def digits():
    return {name: (torch.from_numpy(x), torch.from_numpy(y)) for name, (x, y) in load_digits(0).items()}


def mostly_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with about 80% of its components zeroed, like MNIST's pixels (the fused engine's sparse path)."""
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.2
    return torch.where(keep, x, torch.zeros(()))


def assert_same_parameters(fused: torch.nn.Module, autograd: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(fused.state_dict().items(), autograd.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=2e-5), f"{name}: max difference {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("masking", ["fixed", "bernoulli"])
@pytest.mark.parametrize("inputs", ["dense", "mostly-zero"])
def test_pretraining_engines_agree_over_whole_epochs(digits, masking, inputs):
    x = digits["train"][0] if inputs == "dense" else mostly_zero(digits["train"][0])
    trained, losses = {}, {}
    for engine in ("fused", "autograd"):
        dae = DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(0))
        losses[engine] = pretrain_layer(dae, x, MaskingNoise(0.25, masking), epochs=4, lr=0.1, batch_size=20,
                                        generator=torch.Generator().manual_seed(1), engine=engine)
        trained[engine] = dae
    assert losses["fused"] == pytest.approx(losses["autograd"], rel=1e-5)
    assert_same_parameters(trained["fused"], trained["autograd"])
    untrained = DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(0))
    assert not torch.allclose(untrained.weight, trained["fused"].weight, rtol=1e-4, atol=2e-5)  # it did train


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("inputs", ["dense", "mostly-zero"])
def test_finetuning_engines_agree_over_whole_epochs(digits, momentum, inputs):
    x_train, y_train = digits["train"]
    if inputs == "mostly-zero":
        x_train = mostly_zero(x_train)
    trained, results = {}, {}
    for engine in ("fused", "autograd"):
        encoders = [DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(0)),
                    DenoisingAutoencoder(40, 30, torch.Generator().manual_seed(1))]
        model = StackedClassifier.from_autoencoders(encoders, n_classes=10)
        results[engine] = finetune(model, (x_train, y_train), digits["valid"], lr=0.5, batch_size=20, max_epochs=4,
                                   stopping=EarlyStopping(patience=4), generator=torch.Generator().manual_seed(2),
                                   momentum=momentum, lr_decay=0.9, engine=engine)
        trained[engine] = model
    fused, autograd = ([(r.train_loss, r.train_error, r.valid_error) for r in results[e].history] for e in ("fused", "autograd"))
    assert [f[1:] for f in fused] == [a[1:] for a in autograd]
    assert [f[0] for f in fused] == pytest.approx([a[0] for a in autograd], rel=1e-5)
    assert_same_parameters(trained["fused"], trained["autograd"])


def test_an_unknown_engine_is_refused(digits):
    dae = DenoisingAutoencoder(64, 40)
    with pytest.raises(ValueError, match=r"engine must be one of \('fused', 'autograd'\), got 'jax'"):
        pretrain_layer(dae, digits["train"][0], MaskingNoise(0.1), 1, 0.1, 20, torch.Generator(), engine="jax")


@pytest.mark.skipif(KERNELS is None, reason="sda/kernels.c did not build here (see the warning)")
@pytest.mark.parametrize("batch, k, d", [(32, 78, 784), (20, 300, 1000), (5, 5, 5), (3, 1, 1), (7, 40, 41)])
def test_the_torch_fisher_yates_is_the_c_one(batch, k, d):
    draws = uniform_int32(batch * k, torch.Generator().manual_seed(batch + k + d)).view(batch, k)
    assert torch.equal(random_subsets(draws, d), KERNELS.random_subsets(draws, d))


MASKS = """
import hashlib, torch
from sda.kernels import built_kernels
from sda.noise import MaskingNoise
x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0)) + 0.5
g = torch.Generator().manual_seed(7)
masks = torch.cat([MaskingNoise(nu)(x, g) == 0 for nu in (0.1, 0.25, 0.4) for _ in range(3)])
print(built_kernels() is not None, hashlib.sha256(masks.numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif(KERNELS is None, reason="sda/kernels.c did not build here (see the warning)")
def test_a_seed_draws_the_same_masks_with_the_c_kernels_and_without():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    with_kernels = subprocess.run([sys.executable, "-c", MASKS], capture_output=True, text=True, env=env, timeout=120)
    without = subprocess.run([sys.executable, "-c", MASKS], capture_output=True, text=True, env={**env, "CC": "false"},
                             timeout=120)
    assert with_kernels.returncode == 0 and without.returncode == 0, with_kernels.stderr + without.stderr
    built, digest = with_kernels.stdout.split()
    not_built, same_digest = without.stdout.split()
    assert (built, not_built) == ("True", "False")
    assert digest == same_digest
    assert digest != hashlib.sha256(b"").hexdigest()
