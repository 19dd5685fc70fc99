"""Corruption processes q(x~ | x) for denoising autoencoders."""

import torch

from sda.kernels import built_kernels, fits

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
        batch, d = x.shape
        k = self.masked_count(d)
        if k == 0:
            return x
        if x.device.type == "cpu":
            # A partial Fisher-Yates shuffle per row, from the same draws with or without the C
            # kernels, so a seed gives the same masks on every CPU machine.
            draws = uniform_int32(batch * k, generator).view(batch, k)
            kernels = built_kernels()
            if kernels is None:
                return x.scatter(1, random_subsets(draws, d), 0.0)
            positions = kernels.random_subsets(draws, d)
            return kernels.masked_copy(x, positions) if fits(x, torch.float32) else x.scatter(1, positions, 0.0)
        # On a GPU: the k smallest of i.i.d. uniform scores are also a uniform k-subset of each row.
        scores = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x.scatter(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, 0.0)


def random_subsets(draws: torch.Tensor, d: int) -> torch.Tensor:
    """Row b: the first k places of a Fisher-Yates shuffle of 0..d-1 driven by row b of ``draws`` (int32, batch x k).

    What sda/kernels.c's random_subsets computes, by torch ops: the i-th swap partner is
    i + floor(u * (d - i) / 2^32) with u the draw read as unsigned. One column of swaps at a time
    over the whole batch: k small steps, several times slower than the C loop.
    """
    batch, k = draws.shape
    places = torch.arange(k)
    partners = places + (((draws.long() & 0xFFFFFFFF) * (d - places)) >> 32)
    shuffled = torch.arange(d).repeat(batch, 1)
    rows = torch.arange(batch)
    for i in range(k):
        j = partners[:, i]
        picked = shuffled[rows, j]
        shuffled[rows, j] = shuffled[:, i].clone()
        shuffled[:, i] = picked
    return shuffled[:, :k].clone()


def uniform_int32(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` uniform random int32 on the CPU: the two halves of full-range int64 draws.

    Each 64-bit draw of torch's CPU generator gives two values, so this costs half of drawing
    ``count`` int64 (15 against 27 us for 9,600 values).
    """
    draws = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return draws.view(torch.int32)[:count]
