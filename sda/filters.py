"""Images of first-layer filters (ICML 2008 Fig. 3)."""

import math

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def filter_grid(weight: torch.Tensor, count: int = 100, scale: int = 2) -> np.ndarray:
    """uint8 image of the first ``count`` rows of ``weight`` as square tiles, each min-max scaled.

    Unit i is tile i, so grids of dAs trained from the same initialisation line up unit by unit.
    """
    side = math.isqrt(weight.shape[1])
    if side * side != weight.shape[1]:
        raise ValueError(f"filters of {weight.shape[1]} inputs are not square images")
    w = weight[:count].detach().float().cpu()
    low, high = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    tiles = ((w - low) / (high - low).clamp_min(1e-12)).reshape(-1, 1, side, side)
    grid = make_grid(tiles, nrow=math.ceil(math.sqrt(w.shape[0])), padding=1, pad_value=1.0)[0]
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    return np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))


def save_png(pixels: np.ndarray, path) -> None:
    from sda.artifacts import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
