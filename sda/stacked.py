"""The stacked network: the pretrained encoders with a softmax layer on the top code."""

import torch
import torch.nn.functional as F
from torch import nn

from sda.dae import DenoisingAutoencoder
from sda.kernels import cpu_kernels, fits, is_visible_major


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

    def momentum_buffers(self) -> list[torch.Tensor]:
        """Zeroed velocities for ``sgd_step``, one per parameter, in ``parameters()`` order."""
        return [torch.zeros_like(p) for p in self.parameters()]

    @torch.no_grad()
    def sgd_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, momentum: float = 0.0, velocity: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of torch.optim.SGD's rule on the batch-mean NLL, gradient written out.

        Returns the batch's loss and its number of misclassified examples, both before the step.
        With momentum, ``velocity`` (from ``momentum_buffers``) carries v <- m v + g, p <- p - lr v;
        zero-initialised buffers give exactly the optimizer's first step v = g. Without momentum the
        gradient is accumulated straight into each weight. Autograd is bypassed: at batch 20 its
        bookkeeping costs more than the matrix products. Activations are batch-major, the layout in
        which oneDNN runs this step's products fastest at batch 20 (bench/README.md); the gradient
        is carried as B times dL/dlogits and 1/B folded into the step size; on the CPU in float32
        the softmax layer's loss and gradient are one C kernel (sda/kernels.py), without momentum
        each higher layer's gradient for the layer below and update are one C pass over its weight,
        and a first weight stored ``visible_major`` has its product and update computed from the
        input's nonzeros. tests/test_stacked.py and tests/test_kernels.py check it against autograd
        and the optimizer, in both layouts.
        """
        batch = x.shape[0]
        codes = [x]  # h_0, h_1, ..., h_L, batch-major
        first, sparse = self.encoders[0], cpu_kernels(x)
        # A first weight stored visible_major (sda/kernels.py, for mostly-zero inputs): its product
        # and update from the input's nonzeros only.
        nonzeros = sparse.nonzeros_by_column(x) if sparse is not None and is_visible_major(first.weight) else None
        for linear in self.encoders:
            if nonzeros is not None and linear is first:
                codes.append(sparse.sparse_times(nonzeros, first.weight, first.bias).sigmoid_())
            else:
                codes.append(torch.addmm(linear.bias, codes[-1], linear.weight.t()).sigmoid_())
        logits = torch.addmm(self.output.bias, codes[-1], self.output.weight.t())
        kernels = cpu_kernels(logits, int64=(y,))
        if kernels is not None:  # one C call (sda/kernels.c) instead of ten small torch ops
            total, wrong = kernels.softmax_nll_and_grad(logits, y)
            loss, mistakes, grad = torch.tensor(total / batch, dtype=x.dtype), torch.tensor(wrong), logits
        else:
            loss, mistakes, grad = softmax_nll_and_grad(logits, y)

        inverse_batch = 1.0 / batch
        layers = [*self.encoders, self.output]
        buffers = iter(reversed(velocity)) if momentum else None
        for depth in range(len(layers) - 1, -1, -1):
            linear, below = layers[depth], codes[depth]
            if not momentum:
                linear.bias.sub_(grad.sum(dim=0), alpha=lr * inverse_batch)
            if depth and not momentum and kernels is not None and fits(linear.weight, torch.float32):
                # One C pass over W: the gradient for the layer below (with W as it was), then the update.
                grad = kernels.backward_and_update(linear.weight, grad, below, -lr * inverse_batch, through_sigmoid=True)
                continue
            # The gradient for the layer below needs this layer's weight before it is updated.
            grad_below = torch.ops.aten.sigmoid_backward(torch.mm(grad, linear.weight), below) if depth else None
            if momentum:
                bias_velocity, weight_velocity = next(buffers), next(buffers)
                weight_velocity.mul_(momentum).addmm_(grad.t(), below, alpha=inverse_batch)
                bias_velocity.mul_(momentum).add_(grad.sum(dim=0), alpha=inverse_batch)
                linear.weight.sub_(weight_velocity, alpha=lr)
                linear.bias.sub_(bias_velocity, alpha=lr)
            elif nonzeros is not None and depth == 0:
                sparse.sparse_rank_update(linear.weight, nonzeros, grad, -lr * inverse_batch)
            else:
                linear.weight.addmm_(grad.t(), below, alpha=-lr * inverse_batch)
            grad = grad_below
        return loss, mistakes

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
        return torch.cat([self(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])

    def error_rate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.predict(x) != y).float().mean().item()


def softmax_nll_and_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax layer by torch ops: batch-mean NLL, misclassified count, and B dL/dlogits (softmax - onehot)."""
    log_probs = torch.log_softmax(logits, dim=1)
    picked = log_probs.gather(1, y.unsqueeze(1))
    mistakes = (logits.argmax(dim=1) != y).sum()
    grad = log_probs.exp_().scatter_add_(1, y.unsqueeze(1), torch.full_like(picked, -1.0))
    return -picked.sum() / logits.shape[0], mistakes, grad


def negative_log_likelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)
