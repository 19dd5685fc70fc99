"""The denoising autoencoder: sigmoid encoder and decoder with truly tied weights."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sda.kernels import cpu_kernels, is_visible_major


def reconstruction_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L(x, z) = -sum_k [x_k log z_k + (1 - x_k) log(1 - z_k)] with z = sigmoid(logits).

    Summed over components, averaged over the minibatch. Computed from the logits so that
    saturated units give finite losses and gradients.
    """
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def reconstruction_squared_error(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L(x, z) = sum_k (z_k - x_k)^2 with z = sigmoid(logits): summed over components, averaged over the minibatch.

    The JMLR paper's loss for real-valued inputs (there with an affine decoder). The decoder here
    stays a sigmoid, so z is in [0, 1]: for inputs in [0, 1] only, like every dataset of this project.
    """
    return (torch.sigmoid(logits) - target).square().sum() / logits.shape[0]


RECONSTRUCTION_LOSSES = ("cross_entropy", "squared_error")


def reconstruction_loss_from_logits(
    logits: torch.Tensor, target: torch.Tensor, kind: str = "cross_entropy", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The reconstruction loss ``kind`` of z = s(logits) against ``target``, each component weighted by ``weights``.

    Summed over components, averaged over the minibatch. ``weights`` (target's shape; from
    ``Emphasis.weights``) None is the plain loss, computed exactly as before weights existed.
    """
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")
    if weights is None:
        plain = reconstruction_cross_entropy if kind == "cross_entropy" else reconstruction_squared_error
        return plain(logits, target)
    if kind == "cross_entropy":
        per_component = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        per_component = (torch.sigmoid(logits) - target).square()
    return (weights * per_component).sum() / logits.shape[0]


@dataclass(frozen=True)
class Emphasis:
    """The JMLR paper's emphasised loss: corrupted components weigh ``alpha``, the others ``beta``.

    (1, 1) is the plain loss. (1, 0) learns only to fill in what the noise destroyed; the paper
    tried (1, 0.5) and (1, 0). Which components were corrupted is the set the noise chose
    (``corrupt_with_mask`` of sda/noise.py).
    """

    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        if not (0.0 <= self.alpha < math.inf and 0.0 <= self.beta < math.inf) or self.alpha == self.beta == 0.0:
            raise ValueError(f"emphasis weights must be finite, >= 0 and not both 0, got alpha={self.alpha}, beta={self.beta}")

    @property
    def is_plain(self) -> bool:
        return self.alpha == 1.0 and self.beta == 1.0

    def __str__(self) -> str:
        return f"emphasis alpha={self.alpha:g} beta={self.beta:g}"

    def weights(self, corrupted_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """alpha where ``corrupted_mask`` is True, beta elsewhere; None for the plain loss (no weights to apply)."""
        if self.is_plain:
            return None
        alpha, beta = (torch.tensor(w, dtype=dtype, device=corrupted_mask.device) for w in (self.alpha, self.beta))
        return torch.where(corrupted_mask, alpha, beta)


PLAIN = Emphasis()


@torch.no_grad()
def cross_entropy_value_and_reconstruction(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``reconstruction_cross_entropy`` and z = s(logits), in logits' place.

    BCE(a, x) = max(a, 0) - x a + log(1 + exp(-|a|)), and log(1 + exp(-|a|)) = -log s(|a|) =
    -log max(z, 1 - z): once z is computed for the gradient, one log per component is all the
    value costs. Where max(z, 1 - z) rounds to 1 (|a| > 17) the log reads 0 for a term below 1e-7;
    that is the whole approximation. The CPU kernels behind binary_cross_entropy_with_logits
    (log-sigmoid, log1p, softplus) are not vectorised here: softplus alone takes 267 us on a
    32 x 784 batch, this log 21 us.
    """
    linear = logits.clamp(min=0).sum() - (target * logits).sum()
    reconstruction = logits.sigmoid_()
    return linear - torch.maximum(reconstruction, 1.0 - reconstruction).log_().sum(), reconstruction


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

    def loss(
        self, corrupted: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor | None = None, kind: str = "cross_entropy"
    ) -> torch.Tensor:
        """The reconstruction loss ``kind`` of ``corrupted`` against ``clean``, components weighted by ``weights``.

        Defaults: the plain cross-entropy. ``reconstruction_loss_from_logits`` has the formulas.
        """
        return reconstruction_loss_from_logits(self.decode_logits(self.encode(corrupted)), clean, kind, weights)

    @torch.no_grad()
    def sgd_step(self, corrupted: torch.Tensor, clean: torch.Tensor, lr: float) -> torch.Tensor:
        """One plain SGD step on ``loss(corrupted, clean)``; returns that loss, taken before the step.

        The plain cross-entropy only: no weights, no squared error (sda/pretrain.py refuses those
        settings for the fused engine; the autograd engine runs them through ``loss``).

        The same update as autograd plus ``torch.optim.SGD`` (tests/test_dae.py checks it), with the
        gradient written out: at batch size 32 autograd's bookkeeping and the optimizer's separate
        passes over W cost about a third of the step. With a the decoder's logits, z = s(a), y the
        code and B the batch size:
            dL/da = (z - x) / B                          (cross-entropy through the sigmoid)
            dL/dy = dL/da W^T,  dL/dpre = dL/dy * y(1-y)  (back through the decoder, then s)
            dL/dW = y^T dL/da + (dL/dpre)^T x~            (decoder use + encoder use of the tie)
        Both terms of dL/dW are accumulated straight into W, so no gradient tensor of W's size is
        ever written: five matrix products, the fewest the step needs; 1/B is folded into the step
        size. The code is held feature-major (units x batch), the decoder's output batch-major like
        the input: with a batch of 32 that is the layout oneDNN runs fastest overall, and the loss
        and output gradient then read the clean batch contiguously (bench/README.md). On the CPU
        in float32 the loss, dL/da and its sums are one C kernel (sda/kernels.py), and a weight
        stored ``visible_major`` (mostly-zero inputs, ``sparse_input_layout``) takes
        ``_sparse_input_step``.
        """
        step = lr / clean.shape[0]
        weight, hidden_bias, visible_bias = self.weight, self.hidden_bias, self.visible_bias
        if is_visible_major(weight) and (sparse := cpu_kernels(corrupted, clean)) is not None:
            return self._sparse_input_step(sparse, corrupted, clean, step)
        code_t = torch.addmm(hidden_bias.unsqueeze(1), weight, corrupted.t()).sigmoid_()
        logits = torch.addmm(visible_bias, code_t.t(), weight)
        kernels = cpu_kernels(logits, clean)
        if kernels is not None:  # one fused pass (sda/kernels.c) instead of a dozen torch ops
            loss, visible_grad = kernels.cross_entropy_and_output_grad(logits, clean)
            loss, grad_logits = torch.tensor(loss, dtype=clean.dtype), logits  # B dL/da, in place
        else:
            loss, reconstruction = cross_entropy_value_and_reconstruction(logits, clean)
            grad_logits = reconstruction.sub_(clean)  # B dL/da
            visible_grad = grad_logits.sum(dim=0)
        grad_pre_t = torch.ops.aten.sigmoid_backward(torch.mm(weight, grad_logits.t()), code_t)
        visible_bias.sub_(visible_grad, alpha=step)
        hidden_bias.sub_(grad_pre_t.sum(dim=1), alpha=step)
        weight.addmm_(code_t, grad_logits, alpha=-step)
        weight.addmm_(grad_pre_t, corrupted, alpha=-step)
        return loss / clean.shape[0]

    def _sparse_input_step(self, kernels, corrupted: torch.Tensor, clean: torch.Tensor, step: float) -> torch.Tensor:
        """``sgd_step`` for a weight stored ``visible_major`` (sda/kernels.py): the encoder's product
        and its share of the update from the corrupted input's nonzeros only, the decoder's three
        products dense with the code batch-major. At 784 -> 1000 on MNIST (17% nonzero after
        masking) the listing and the two sparse products take 110-130 us where the dense products
        took 250-340; the decoder's products lose ~40 us to this layout (bench/README.md).
        """
        weight, hidden_bias, visible_bias = self.weight, self.hidden_bias, self.visible_bias
        nonzeros = kernels.nonzeros_by_column(corrupted)
        code = kernels.sparse_times(nonzeros, weight, hidden_bias).sigmoid_()
        logits = torch.addmm(visible_bias, code, weight)
        loss, visible_grad = kernels.cross_entropy_and_output_grad(logits, clean)
        grad_logits = logits  # B dL/da, in place
        grad_pre = torch.mm(grad_logits, weight.t(), out=torch.empty_strided(code.shape, code.stride(), dtype=code.dtype))
        torch.ops.aten.sigmoid_backward.grad_input(grad_pre, code, grad_input=grad_pre)  # rows padded like code's
        visible_bias.sub_(visible_grad, alpha=step)
        hidden_bias.sub_(grad_pre.sum(dim=0), alpha=step)
        weight.addmm_(code.t(), grad_logits, alpha=-step)
        kernels.sparse_rank_update(weight, nonzeros, grad_pre, -step)
        return torch.tensor(loss, dtype=clean.dtype) / clean.shape[0]
