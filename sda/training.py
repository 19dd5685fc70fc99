"""What the two training loops share: one epoch's shuffled minibatches, and the error for a diverged loss.

Kept apart from sda/pretrain.py so that fine-tuning (and its DVC stage) does not depend on the
pretraining loop: a new corruption process re-runs the pretraining stages, not fine-tuning, when
their outputs come out the same.
"""

import torch


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


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
