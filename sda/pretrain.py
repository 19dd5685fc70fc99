"""Greedy layer-wise pretraining of one denoising autoencoder on a tensor of clean codes."""

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from sda.cuda_graphs import replay_as_cuda_graph
from sda.dae import PLAIN, DenoisingAutoencoder, Emphasis
from sda.kernels import sparse_input_layout
from sda.noise import MaskingNoise, Noise
from sda.training import check_engine, check_epoch_loss, shuffled_batches


def fused_engine_runs(noise: Noise, loss: str = "cross_entropy", emphasis: Emphasis = PLAIN) -> bool:
    """Whether the fused engine's hand-written step (``sgd_step``) implements this setting: masking noise, plain cross-entropy."""
    return isinstance(noise, MaskingNoise) and loss == "cross_entropy" and emphasis.is_plain


def pretrain_step(
    dae: DenoisingAutoencoder, lr: float, engine: str, loss: str = "cross_entropy"
) -> Callable[..., torch.Tensor]:
    """``step(corrupted, clean, weights=None)``: one SGD step on ``dae.loss(corrupted, clean, weights, loss)``;
    returns that loss, taken before the step. The fused step takes no weights and the cross-entropy only."""
    if check_engine(engine) == "fused":
        if loss != "cross_entropy":
            raise ValueError(f"the fused engine's step computes the cross-entropy only, got loss {loss!r}; use engine autograd")

        def fused_step(corrupted: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
            if weights is not None:
                raise ValueError("the fused engine's step takes no loss weights (emphasis); use engine autograd")
            return dae.sgd_step(corrupted, clean, lr)

        return fused_step
    optimizer = torch.optim.SGD(dae.parameters(), lr=lr)

    def step(corrupted: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss_value = dae.loss(corrupted, clean, weights, kind=loss)
        loss_value.backward()
        optimizer.step()
        return loss_value.detach()

    return step


def pretrain_layer(
    dae: DenoisingAutoencoder,
    codes: torch.Tensor,
    noise: Noise,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    name: str = "layer",
    cuda_graph: bool = True,
    engine: str = "fused",
    loss: str = "cross_entropy",
    emphasis: Emphasis = PLAIN,
) -> list[float]:
    """Train ``dae`` by plain minibatch SGD to reconstruct clean ``codes`` from corrupted ones.

    Returns the mean training reconstruction loss of each epoch (the ``loss`` kind, weighted by
    ``emphasis``, against the clean input, on the corrupted input the step saw). Raises
    DivergenceError naming ``name`` and the epoch as soon as an epoch's loss has diverged
    (sda/training.py's check_epoch_loss), before anything is returned for saving. ``engine`` runs
    the steps (sda/training.py): ``fused`` (hand-written, C kernels, CUDA graphs; masking noise and
    the plain cross-entropy only, anything else is refused with a ValueError before training) or
    ``autograd`` (``dae.loss`` through autograd and torch.optim.SGD: every noise, loss and
    emphasis). On CUDA, full batches replay the fused step as a CUDA graph unless ``cuda_graph``
    is False (sda/cuda_graphs.py).
    """
    if check_engine(engine) == "fused" and not fused_engine_runs(noise, loss, emphasis):
        raise ValueError(f"{name}: the fused engine runs masking noise with the plain cross-entropy only, got {noise}, "
                         f"{loss}, {emphasis}; use engine autograd")
    # Accumulated on the device: a .item() per step would stall a GPU every batch.
    total = torch.zeros((), device=codes.device, dtype=codes.dtype)
    train_step = pretrain_step(dae, lr, engine, loss)

    def step(clean: torch.Tensor) -> None:
        if emphasis.is_plain:  # no mask needed: the noise's own fast path
            corrupted, weights = noise(clean, generator), None
        else:
            corrupted, corrupted_mask = noise.corrupt_with_mask(clean, generator)
            weights = emphasis.weights(corrupted_mask, clean.dtype)
        total.add_(train_step(corrupted, clean, weights), alpha=clean.shape[0])

    fused = engine == "fused"
    full_batch_step = step
    if fused and cuda_graph and codes.device.type == "cuda" and epochs > 0 and codes.shape[0] >= batch_size:
        spare, spare_generator, example = copy.deepcopy(dae), torch.Generator(codes.device), codes[:batch_size]
        full_batch_step = replay_as_cuda_graph(
            step,
            (example.clone(),),
            warm_up=lambda: spare.sgd_step(noise(example, spare_generator), example, lr),
            generator=generator,
        )
    # The divergence rule's reference: the untrained model's plain loss times the larger emphasis
    # weight, as an emphasised loss is at most that times the plain one. (Drawing a corrupted batch
    # for it instead would shift the random stream, and so every mask a seed gives.)
    initial_loss = reconstruction_loss(dae, codes[:batch_size], kind=loss) * max(emphasis.alpha, emphasis.beta)
    losses: list[float] = []
    # Mostly-zero inputs (MNIST's pixels): the fused steps' products from the nonzeros only.
    with sparse_input_layout(dae.weight, codes) if fused else nullcontext():
        for epoch in tqdm(range(1, epochs + 1), desc=f"pretrain {name}", unit="epoch"):
            total.zero_()
            for (clean,) in shuffled_batches((codes,), batch_size, generator):
                (full_batch_step if clean.shape[0] == batch_size else step)(clean)
            epoch_loss = total.item() / codes.shape[0]
            check_epoch_loss(name, epoch, epoch_loss, initial_loss, lr)
            losses.append(epoch_loss)
            if on_epoch is not None:
                on_epoch(epoch, epoch_loss)
    return losses


@torch.no_grad()
def encode(dae: DenoisingAutoencoder, x: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
    """Clean codes of ``x`` for the next layer, computed once."""
    return torch.cat([dae.encode(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def reconstruction_loss(dae: DenoisingAutoencoder, x: torch.Tensor, batch_size: int = 10_000, kind: str = "cross_entropy") -> float:
    """Mean reconstruction loss ``kind`` (unweighted) of uncorrupted ``x``."""
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        clean = x[i : i + batch_size]
        total += dae.loss(clean, clean, kind=kind).item() * clean.shape[0]
    return total / x.shape[0]
