"""The stacked network: the pretrained encoders with a softmax layer on the top code."""

import torch
import torch.nn.functional as F
from torch import nn

from sda.dae import DenoisingAutoencoder


class StackedClassifier(nn.Module):
    """x -> s(W1 x + b1) -> ... -> s(Wk h + bk) -> softmax(V h + c).

    Decoders are dropped; each encoder starts from its pretrained dA. The softmax layer starts at
    zero, as in the Theano tutorial.
    """

    def __init__(self, sizes: list[int], n_classes: int):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(sizes[-1], n_classes)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @classmethod
    def from_autoencoders(cls, daes: list[DenoisingAutoencoder], n_classes: int) -> "StackedClassifier":
        sizes = [daes[0].n_visible] + [dae.n_hidden for dae in daes]
        for below, above in zip(daes[:-1], daes[1:]):
            if below.n_hidden != above.n_visible:
                raise ValueError(f"layer sizes do not chain: {below.n_hidden} units feed {above.n_visible} inputs")
        model = cls(sizes, n_classes)
        with torch.no_grad():
            for linear, dae in zip(model.encoders, daes):
                linear.weight.copy_(dae.weight)
                linear.bias.copy_(dae.hidden_bias)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        for linear in self.encoders:
            x = torch.sigmoid(linear(x))
        return self.output(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
        return torch.cat([self(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])

    def error_rate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.predict(x) != y).float().mean().item()


def negative_log_likelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)
