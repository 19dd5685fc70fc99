import pytest
import torch

from sda.dae import DenoisingAutoencoder
from sda.stacked import StackedClassifier, negative_log_likelihood


def pretrained_like(seed: int) -> StackedClassifier:
    g = torch.Generator().manual_seed(seed)
    daes = [DenoisingAutoencoder(12, 9, g), DenoisingAutoencoder(9, 7, g)]
    model = StackedClassifier.from_autoencoders(daes, 4).double()
    with torch.no_grad():  # a non-zero softmax layer, so every gradient path is exercised
        model.output.weight.uniform_(-1, 1, generator=g)
    return model


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_is_torch_sgd_on_the_autograd_gradient(momentum):
    reference, ours = pretrained_like(0), pretrained_like(0)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=momentum)
    velocity = ours.momentum_buffers()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.rand(5, 12, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (5,), generator=g)
        logits = reference(x)
        expected = negative_log_likelihood(logits, y)
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        loss, mistakes = ours.sgd_step(x, y, 0.3, momentum, velocity)
        assert torch.allclose(loss, expected.detach(), rtol=1e-12)
        assert mistakes.item() == (logits.argmax(dim=1) != y).sum().item()
    untouched = pretrained_like(0)
    for (name, a), b, start in zip(reference.named_parameters(), ours.parameters(), untouched.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
        assert not torch.allclose(a, start), name
