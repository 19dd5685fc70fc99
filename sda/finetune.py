"""Supervised fine-tuning of the whole stack with early stopping on the validation error."""

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sda.cuda_graphs import replay_as_cuda_graph
from sda.kernels import sparse_input_layout
from sda.stacked import StackedClassifier, negative_log_likelihood
from sda.training import check_engine, check_epoch_loss, shuffled_batches


@dataclass
class EarlyStopping:
    """The Theano tutorial's patience rule, counted in epochs instead of minibatches.

    Training may run until epoch ``patience``. A validation error below ``improvement_threshold``
    times the best so far extends the horizon to ``patience_increase`` times the current epoch.
    The best-validation model is kept whatever the size of its improvement.
    """

    patience: int = 10
    patience_increase: float = 2.0
    improvement_threshold: float = 0.995
    best_error: float = math.inf
    best_epoch: int = 0

    def update(self, epoch: int, valid_error: float) -> bool:
        """Record one epoch; True when this epoch is the new best."""
        if valid_error < self.best_error * self.improvement_threshold:
            self.patience = max(self.patience, math.ceil(epoch * self.patience_increase))
        if valid_error < self.best_error:
            self.best_error, self.best_epoch = valid_error, epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch >= self.patience


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    train_error: float
    valid_error: float


@dataclass
class FinetuneResult:
    best_epoch: int
    best_valid_error: float
    history: list[EpochRecord] = field(default_factory=list)


def finetune_step(
    model: StackedClassifier, momentum: float, engine: str
) -> Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]:
    """``step(x, y, lr)``: one SGD step (with ``momentum``) on the batch-mean NLL; returns the loss and
    the number of misclassified examples, both before the step."""
    if check_engine(engine) == "fused":
        velocity = model.momentum_buffers() if momentum else None
        return lambda x, y, lr: model.sgd_step(x, y, lr, momentum, velocity)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = negative_log_likelihood(logits, y)
        loss.backward()
        optimizer.step()
        return loss.detach(), (logits.detach().argmax(dim=1) != y).sum()

    return step


def finetune(
    model: StackedClassifier,
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    batch_size: int,
    max_epochs: int,
    stopping: EarlyStopping,
    generator: torch.Generator,
    momentum: float = 0.0,
    lr_decay: float = 1.0,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    cuda_graph: bool = True,
    engine: str = "fused",
) -> FinetuneResult:
    """Minibatch SGD on the negative log-likelihood; leaves ``model`` at its best-validation state.

    The learning rate is multiplied by ``lr_decay`` after every epoch. The test set is never seen.
    Raises DivergenceError as soon as an epoch's loss has diverged (sda/training.py's check_epoch_loss).
    ``engine`` runs the steps (sda/training.py): ``fused`` or ``autograd``. On CUDA, full batches
    replay the fused step as a CUDA graph, recorded again for each epoch's rate, unless
    ``cuda_graph`` is False (sda/cuda_graphs.py).
    """
    x_train, y_train = train
    train_step = finetune_step(model, momentum, engine)
    fused = engine == "fused"
    # Accumulated on the device: a .item() per step would stall a GPU every batch.
    total_loss = torch.zeros((), device=x_train.device, dtype=x_train.dtype)
    mistakes = torch.zeros((), device=x_train.device, dtype=torch.long)
    with torch.no_grad():
        initial_loss = negative_log_likelihood(model(x_train[:batch_size]), y_train[:batch_size]).item()
    use_graph = fused and cuda_graph and x_train.device.type == "cuda" and x_train.shape[0] >= batch_size
    # Mostly-zero inputs (MNIST's pixels): the fused steps' first-layer products from the nonzeros only.
    with sparse_input_layout(model.encoders[0].weight, x_train) if fused else nullcontext():
        best_state = copy.deepcopy(model.state_dict())
        result = FinetuneResult(best_epoch=0, best_valid_error=math.inf)
        progress = tqdm(range(1, max_epochs + 1), desc="finetune", unit="epoch")
        for epoch in progress:
            epoch_lr = lr * lr_decay ** (epoch - 1)
            model.train()
            total_loss.zero_()
            mistakes.zero_()

            def step(x: torch.Tensor, y: torch.Tensor) -> None:
                loss, batch_mistakes = train_step(x, y, epoch_lr)
                total_loss.add_(loss, alpha=x.shape[0])
                mistakes.add_(batch_mistakes)

            full_batch_step = step
            if use_graph:
                spare = copy.deepcopy(model)
                spare_velocity = spare.momentum_buffers() if momentum else None
                example = (x_train[:batch_size], y_train[:batch_size])
                full_batch_step = replay_as_cuda_graph(
                    step,
                    (example[0].clone(), example[1].clone()),
                    warm_up=lambda: spare.sgd_step(*example, epoch_lr, momentum, spare_velocity),
                )
            for x, y in shuffled_batches((x_train, y_train), batch_size, generator):
                (full_batch_step if x.shape[0] == batch_size else step)(x, y)
            train_loss = total_loss.item() / x_train.shape[0]
            check_epoch_loss("finetune", epoch, train_loss, initial_loss, epoch_lr)
            model.eval()
            record = EpochRecord(
                epoch=epoch,
                lr=epoch_lr,
                train_loss=train_loss,
                train_error=mistakes.item() / x_train.shape[0],
                valid_error=model.error_rate(*valid),
            )
            result.history.append(record)
            if stopping.update(epoch, record.valid_error):
                best_state = copy.deepcopy(model.state_dict())
            progress.set_postfix(valid=f"{record.valid_error:.4f}", best=f"{stopping.best_error:.4f}@{stopping.best_epoch}")
            if on_epoch is not None:
                on_epoch(record)
            if stopping.should_stop(epoch):
                break
        model.load_state_dict(best_state)
    result.best_epoch, result.best_valid_error = stopping.best_epoch, stopping.best_error
    return result

