"""The denoising autoencoder: sigmoid encoder and decoder with truly tied weights."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L(x, z) = -sum_k [x_k log z_k + (1 - x_k) log(1 - z_k)] with z = sigmoid(logits).

    Summed over components, averaged over the minibatch. Computed from the logits so that
    saturated units give finite losses and gradients.
    """
    per_component = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_component.sum(dim=1).mean()


class DenoisingAutoencoder(nn.Module):
    """y = s(W x~ + b), z = s(W^T y + b').

    The decoder reuses the encoder's ``weight`` Parameter (transposed), so there is exactly one
    weight tensor: the tie cannot come apart on ``.to(device)``, dtype casts or state_dict loads.
    """

    def __init__(self, n_visible: int, n_hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        if n_visible <= 0 or n_hidden <= 0:
            raise ValueError(f"layer sizes must be positive, got {n_visible} -> {n_hidden}")
        self.n_visible, self.n_hidden = n_visible, n_hidden
        # Glorot-uniform range times 4, the Theano tutorial's choice for sigmoid units.
        bound = 4.0 * math.sqrt(6.0 / (n_visible + n_hidden))
        weight = torch.empty(n_hidden, n_visible).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)
        self.hidden_bias = nn.Parameter(torch.zeros(n_hidden))
        self.visible_bias = nn.Parameter(torch.zeros(n_visible))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight, self.hidden_bias))

    def decode_logits(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(y, self.weight.t(), self.visible_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction z in [0, 1] of ``x``."""
        return torch.sigmoid(self.decode_logits(self.encode(x)))

    def loss(self, corrupted: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the reconstruction of ``corrupted`` against ``clean``."""
        return reconstruction_cross_entropy(self.decode_logits(self.encode(corrupted)), clean)
