"""What the two training loops share: the engines, one epoch's shuffled minibatches, the rule for a diverged loss.

Two engines run a training step. ``autograd`` differentiates the models' own definitions
(``DenoisingAutoencoder.loss``; ``StackedClassifier.forward`` with ``negative_log_likelihood``) and
applies ``torch.optim.SGD``: change the model, the loss or the optimizer and it trains what you
wrote. ``fused`` is the same step with the gradients written out by hand (the models'
``sgd_step``), C kernels on the CPU and CUDA graphs on a GPU; tests/test_engines.py checks it
against ``autograd`` epoch for epoch. It implements masking noise with the plain cross-entropy
only: a layer with another noise, the squared error or an emphasised loss needs ``autograd``, and
stages/params.py refuses it for ``fused`` before training, naming its params key (``pretrain_layer``
refuses it too). Each loop builds its step with ``pretrain_step`` / ``finetune_step``.

Kept apart from sda/pretrain.py so that fine-tuning (and its DVC stage) does not depend on the
pretraining loop: a new corruption process re-runs the pretraining stages, not fine-tuning, when
their outputs come out the same.
"""

import math

import torch

ENGINES = ("fused", "autograd")

# An epoch whose mean training loss exceeds this many times the untrained model's loss has diverged.
DIVERGENCE_FACTOR = 10.0


# Ends every divergence message: the sweeps tell a diverged point from other failures by it.
DIVERGED = "lower the learning rate"


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite, or grew far above the untrained model's (check_epoch_loss)."""


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def check_epoch_loss(name: str, epoch: int, loss: float, initial_loss: float, lr: float) -> None:
    """Raise DivergenceError naming ``name`` and ``epoch`` if the epoch's mean training ``loss`` has diverged.

    Diverged: not finite, or above DIVERGENCE_FACTOR times ``initial_loss``, the loss of the untrained
    model on the first training batch. Training lowers the loss from there; a step size far too large
    sends it up by orders of magnitude while it may stay finite (lr 1e30 gives pretraining losses near 1e30),
    which would otherwise train on and save a useless model.
    """
    if not math.isfinite(loss):
        raise DivergenceError(f"{name}: training loss became {loss} at epoch {epoch} (lr={lr:.4g}); {DIVERGED}")
    if loss > DIVERGENCE_FACTOR * initial_loss:
        raise DivergenceError(
            f"{name}: training loss {loss:.4g} at epoch {epoch} is over {DIVERGENCE_FACTOR:g} times the untrained "
            f"model's {initial_loss:.4g}: training diverged (lr={lr:.4g}); {DIVERGED}"
        )


def shuffled_batches(tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator):
    """Yield the minibatches of one epoch: the tensors' rows in the order of one random permutation.

    On the CPU each batch is gathered by itself: a shuffled copy of a whole training set (157 MB for
    MNIST) is fresh memory each epoch, and faulting it in made the epoch's gather 3x slower (65
    against 21 ms). On a GPU one gather per epoch, then views, saves a kernel launch per batch.
    """
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator, device=tensors[0].device)
    if tensors[0].device.type == "cpu":
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            yield tuple(t.index_select(0, rows) for t in tensors)
        return
    shuffled = tuple(t[order] for t in tensors)
    for start in range(0, n, batch_size):
        yield tuple(t[start : start + batch_size] for t in shuffled)
