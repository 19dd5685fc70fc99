"""Greedy layer-wise pretraining of one denoising autoencoder on a tensor of clean codes."""

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from sda.cuda_graphs import replay_as_cuda_graph
from sda.dae import DenoisingAutoencoder
from sda.kernels import sparse_input_layout
from sda.noise import MaskingNoise
from sda.training import check_engine, check_epoch_loss, shuffled_batches


def pretrain_step(dae: DenoisingAutoencoder, lr: float, engine: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(corrupted, clean)``: one SGD step on ``dae.loss(corrupted, clean)``; returns that loss, taken before the step."""
    if check_engine(engine) == "fused":
        return lambda corrupted, clean: dae.sgd_step(corrupted, clean, lr)
    optimizer = torch.optim.SGD(dae.parameters(), lr=lr)

    def step(corrupted: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = dae.loss(corrupted, clean)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def pretrain_layer(
    dae: DenoisingAutoencoder,
    codes: torch.Tensor,
    noise: MaskingNoise,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    name: str = "layer",
    cuda_graph: bool = True,
    engine: str = "fused",
) -> list[float]:
    """Train ``dae`` by plain minibatch SGD to reconstruct clean ``codes`` from corrupted ones.

    Returns the mean training reconstruction loss of each epoch (against the clean input, on the
    corrupted input the step saw). Raises DivergenceError naming ``name`` and the epoch as soon as
    an epoch's loss has diverged (sda/training.py's check_epoch_loss), before anything is returned
    for saving. ``engine`` runs the steps (sda/training.py): ``fused`` (hand-written, C kernels,
    CUDA graphs) or ``autograd`` (``dae.loss`` through autograd and torch.optim.SGD). On CUDA,
    full batches replay the fused step as a CUDA graph unless ``cuda_graph`` is False
    (sda/cuda_graphs.py).
    """
    # Accumulated on the device: a .item() per step would stall a GPU every batch.
    total = torch.zeros((), device=codes.device, dtype=codes.dtype)
    train_step = pretrain_step(dae, lr, engine)

    def step(clean: torch.Tensor) -> None:
        total.add_(train_step(noise(clean, generator), clean), alpha=clean.shape[0])

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
    initial_loss = reconstruction_loss(dae, codes[:batch_size])
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
def reconstruction_loss(dae: DenoisingAutoencoder, x: torch.Tensor, batch_size: int = 10_000) -> float:
    """Mean reconstruction cross-entropy of uncorrupted ``x``."""
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        clean = x[i : i + batch_size]
        total += dae.loss(clean, clean).item() * clean.shape[0]
    return total / x.shape[0]
