"""The library on a CUDA device: same maths as the CPU, data and random draws kept on the device.

These run only where a CUDA GPU is present (CI has none; `bench/gpu_check.sh` runs them on one).
"""

import pytest
import torch

from sda.dae import DenoisingAutoencoder
from sda.data import load_digits
from sda.device import make_generator
from sda.finetune import EarlyStopping, finetune
from sda.noise import MaskingNoise
from sda.pretrain import encode, pretrain_layer
from sda.stacked import StackedClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CUDA = torch.device("cuda")


def digits_on(device):
    splits = load_digits(seed=0)
    return {name: (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for name, (x, y) in splits.items()}


def test_sgd_step_on_cuda_matches_the_cpu_in_float64():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(32, 64, generator=g, dtype=torch.float64)
    corrupted = MaskingNoise(0.25)(clean, g)
    cpu = DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(1)).double()
    gpu = DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(1)).double().to(CUDA)
    for _ in range(5):
        expected = cpu.sgd_step(corrupted, clean, 0.5)
        got = gpu.sgd_step(corrupted.to(CUDA), clean.to(CUDA), 0.5)
        assert torch.allclose(got.cpu(), expected, rtol=1e-10)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a, b.cpu(), rtol=1e-10, atol=1e-12)


def test_fixed_masking_on_cuda_is_exact_and_drawn_on_the_device():
    x = torch.rand(256, 1000, device=CUDA) + 0.01
    out = MaskingNoise(0.3)(x, make_generator(0, CUDA))
    assert out.device.type == "cuda"
    assert torch.all((out == 0).sum(dim=1) == 300)


def test_pretraining_and_finetuning_on_cuda_are_deterministic_and_learn():
    splits = digits_on(CUDA)

    def train():
        g = make_generator(7, CUDA)
        dae = DenoisingAutoencoder(64, 48, torch.Generator().manual_seed(7)).to(CUDA)
        losses = pretrain_layer(dae, splits["train"][0], MaskingNoise(0.2), 5, 0.1, 20, g)
        model = StackedClassifier.from_autoencoders([dae], 10).to(CUDA)
        result = finetune(model, splits["train"], splits["valid"], 0.5, 20, 8, EarlyStopping(patience=8), g)
        return losses, result, encode(dae, splits["valid"][0])

    first_losses, first, first_codes = train()
    second_losses, second, second_codes = train()
    assert first_codes.device.type == "cuda"
    assert first_losses == second_losses and first.best_valid_error == second.best_valid_error
    assert torch.equal(first_codes, second_codes)
    assert first_losses[-1] < first_losses[0]
    assert first.best_valid_error < 0.2


def test_graph_replay_computes_what_the_eager_steps_compute():
    splits = digits_on(CUDA)

    def train(cuda_graph, nu):
        g = make_generator(3, CUDA)
        dae = DenoisingAutoencoder(64, 48, torch.Generator().manual_seed(3)).to(CUDA)
        losses = pretrain_layer(dae, splits["train"][0], MaskingNoise(nu), 3, 0.1, 32, g, cuda_graph=cuda_graph)
        model = StackedClassifier.from_autoencoders([dae], 10).to(CUDA)
        result = finetune(model, splits["train"], splits["valid"], 0.5, 20, 4, EarlyStopping(patience=4), g,
                          momentum=0.5, lr_decay=0.9, cuda_graph=cuda_graph)
        return losses, [r.train_loss for r in result.history], list(model.parameters())

    for nu in (0.0, 0.25):  # without noise, then with draws from the registered generator
        eager, graphed = train(False, nu), train(True, nu)
        assert eager[0] == pytest.approx(graphed[0], rel=1e-5), nu
        assert eager[1] == pytest.approx(graphed[1], rel=1e-5), nu
        for a, b in zip(eager[2], graphed[2]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), nu


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_the_engines_agree_on_cuda(momentum):
    """tests/test_engines.py's check on the device: the fused steps (CUDA graphs) train what autograd trains."""
    splits = digits_on(CUDA)
    trained = {}
    for engine in ("fused", "autograd"):
        dae = DenoisingAutoencoder(64, 40, torch.Generator().manual_seed(0)).to(CUDA)
        losses = pretrain_layer(dae, splits["train"][0], MaskingNoise(0.25), 3, 0.1, 20, make_generator(1, CUDA),
                                engine=engine)
        model = StackedClassifier.from_autoencoders([dae], 10).to(CUDA)
        result = finetune(model, splits["train"], splits["valid"], 0.5, 20, 3, EarlyStopping(patience=3),
                          make_generator(2, CUDA), momentum=momentum, engine=engine)
        trained[engine] = (losses, [r.train_loss for r in result.history], model)
    (fused_pre, fused_ft, fused), (auto_pre, auto_ft, auto) = trained["fused"], trained["autograd"]
    assert fused_pre == pytest.approx(auto_pre, rel=1e-4) and fused_ft == pytest.approx(auto_ft, rel=1e-4)
    for (name, a), (_, b) in zip(fused.state_dict().items(), auto.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
