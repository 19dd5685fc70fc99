"""Corruption processes q(x~ | x) for denoising autoencoders."""

import numpy as np
import torch

MASKING_MODES = ("fixed", "bernoulli")


class MaskingNoise:
    """Masking noise: set a fraction ``nu`` of each example's components to 0.

    ``fixed`` is the paper's process: exactly round(nu * d) components of every example, chosen
    uniformly without replacement, drawn afresh per example and per call. ``bernoulli`` is the
    Theano tutorial's: each component is zeroed independently with probability nu, so the count
    only matches in expectation. Kept components are never rescaled: this is not dropout.
    """

    def __init__(self, nu: float, mode: str = "fixed"):
        if not 0.0 <= nu < 1.0:
            raise ValueError(f"corruption nu must be in [0, 1), got {nu!r}")
        if mode not in MASKING_MODES:
            raise ValueError(f"masking mode must be one of {MASKING_MODES}, got {mode!r}")
        self.nu = float(nu)
        self.mode = mode

    def __repr__(self) -> str:
        return f"MaskingNoise(nu={self.nu}, mode={self.mode!r})"

    def masked_count(self, d: int) -> int:
        return int(round(self.nu * d))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.nu == 0.0:
            return x
        if self.mode == "bernoulli":
            return x * (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= self.nu)
        k = self.masked_count(x.shape[1])
        if k == 0:
            return x
        # The k smallest of i.i.d. uniform scores are a uniform k-subset of each row. Every
        # selection below masks exactly k positions, also when two scores collide.
        if x.device.type == "cpu":
            return _mask_k_smallest_on_cpu(x, random_int32_scores(x.shape, generator), k)
        scores = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        masked = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        return x.scatter(1, masked, 0.0)


def random_int32_scores(shape: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random int32 scores of ``shape``, on the CPU: the two halves of full-range int64 draws.

    Each 64-bit draw of torch's CPU generator gives two scores, and numpy selects among int32 faster
    than among float32: scores plus selection cost 50 us per 32 x 784 batch against 78 us with
    float scores (bench/README.md). Ties are rarer than among float32 uniforms (32 bits, not 24).
    """
    rows, cols = shape
    draws = torch.empty(rows, (cols + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return draws.view(torch.int32)[:, :cols]


def _mask_k_smallest_on_cpu(x: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """x with each row's k smallest-scored components set to 0, selected by numpy (bench/README.md).

    numpy's introselect, on the scores shared with it, not copied, finds each row's k-th smallest
    score 2-3x faster than torch.topk finds the positions; the scores above it are kept by one
    multiplication (10 us cheaper per batch than masked_fill; a masked component is 0, -0 where x is
    negative, NaN where x is not finite, and such an x is also the clean target, whose loss is then
    not finite either). Only if two scores tie at a row's k-th place (about once in 5 million rows
    with int32 scores) would that keep fewer than d - k, and then the positions are taken by
    argpartition instead.
    """
    u = scores.numpy()
    keep = u > np.partition(u, k - 1, axis=1)[:, k - 1 : k]
    if np.count_nonzero(keep) == keep.size - k * keep.shape[0]:
        return x * torch.from_numpy(keep.astype(np.float32)).to(x.dtype)
    return x.scatter(1, torch.from_numpy(np.argpartition(u, k - 1, axis=1)[:, :k]), 0.0)
