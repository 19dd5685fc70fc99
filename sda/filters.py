"""Images of first-layer filters (ICML 2008 Fig. 3)."""

import math

import numpy as np
import torch
from PIL import Image


def filter_grid(weight: torch.Tensor, count: int = 100, scale: int = 2) -> np.ndarray:
    """uint8 image of the first ``count`` rows of ``weight`` as square tiles, each min-max scaled.

    Unit i is tile i, so grids of dAs trained from the same initialisation line up unit by unit.
    """
    side = math.isqrt(weight.shape[1])
    if side * side != weight.shape[1]:
        raise ValueError(f"filters of {weight.shape[1]} inputs are not square images")
    w = weight[:count].detach().float().cpu()
    low, high = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    tiles = ((w - low) / (high - low).clamp_min(1e-12)).reshape(-1, side, side).numpy()
    grid = tile(tiles, per_row=math.ceil(math.sqrt(w.shape[0])), padding=1, pad_value=1.0)
    pixels = (grid * 255).round().astype(np.uint8)
    return np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))


def tile(images: np.ndarray, per_row: int, padding: int, pad_value: float) -> np.ndarray:
    """``images`` (n x h x w) in rows of ``per_row``, left to right then top to bottom, each framed
    by ``padding`` pixels of ``pad_value``: as torchvision's ``make_grid`` lays out two or more images."""
    count, height, width = images.shape
    columns = min(per_row, count)
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value, dtype=images.dtype)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(pixels: np.ndarray, path) -> None:
    from sda.artifacts import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
