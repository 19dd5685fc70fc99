"""Corruption processes q(x~ | x) for denoising autoencoders.

Three processes, one per ``noise`` of a params.yaml layer: ``MaskingNoise`` (the 2008 paper's),
``SaltPepperNoise`` and ``GaussianNoise`` (the JMLR 2010 paper's later noises). Each is called as
``noise(x, generator)`` for the corrupted batch, and ``noise.corrupt_with_mask(x, generator)``
also returns which components it corrupted (a bool tensor of x's shape): the emphasised loss
(sda/dae.py's ``Emphasis``) weighs exactly that set. For the same generator state both calls
return the same corrupted batch; the plain call skips building the mask (the fused engine's path).
"""

import torch

from sda.kernels import built_kernels, fits

NOISE_KINDS = ("masking", "gaussian", "salt_pepper")
MASKING_MODES = ("fixed", "bernoulli")


def _check_fraction(nu: float) -> float:
    if not 0.0 <= nu < 1.0:
        raise ValueError(f"corruption nu must be in [0, 1), got {nu!r}")
    return float(nu)


def uniform_subsets(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row b: k distinct components of example b (int64, batch x k), a uniform subset drawn afresh per row.

    On the CPU a partial Fisher-Yates shuffle per row, from the same draws with or without the C
    kernels, so a seed gives the same subsets on every CPU machine. On a GPU the k smallest of
    i.i.d. uniform scores, also a uniform k-subset of each row.
    """
    batch, d = x.shape
    if x.device.type == "cpu":
        draws = uniform_int32(batch * k, generator).view(batch, k)
        kernels = built_kernels()
        return random_subsets(draws, d) if kernels is None else kernels.random_subsets(draws, d)
    scores = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.topk(scores, k, dim=1, largest=False, sorted=False).indices


def _mask_of(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A bool tensor of x's shape, True at row b's ``positions[b]``."""
    return torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(1, positions, True)


def _nothing_corrupted(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=torch.bool, device=x.device)


class MaskingNoise:
    """Masking noise: set a fraction ``nu`` of each example's components to 0.

    ``fixed`` is the paper's process: exactly round(nu * d) components of every example, chosen
    uniformly without replacement, drawn afresh per example and per call. ``bernoulli`` is the
    Theano tutorial's: each component is zeroed independently with probability nu, so the count
    only matches in expectation. Kept components are never rescaled: this is not dropout.
    The mask of ``corrupt_with_mask`` is the chosen set, including components that were 0 already.
    """

    def __init__(self, nu: float, mode: str = "fixed"):
        self.nu = _check_fraction(nu)
        if mode not in MASKING_MODES:
            raise ValueError(f"masking mode must be one of {MASKING_MODES}, got {mode!r}")
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
        positions = uniform_subsets(x, k, generator)
        kernels = built_kernels() if fits(x, torch.float32) else None
        if kernels is not None:  # one pass of sda/kernels.c: the copy and the zeros
            return kernels.masked_copy(x, positions)
        return x.scatter(1, positions, 0.0)

    def corrupt_with_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x, generator), the masked components)``: the same draws, so the same corrupted batch."""
        if self.nu == 0.0:
            return x, _nothing_corrupted(x)
        if self.mode == "bernoulli":
            masked = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < self.nu
            return x * ~masked, masked
        k = self.masked_count(x.shape[1])
        if k == 0:
            return x, _nothing_corrupted(x)
        positions = uniform_subsets(x, k, generator)
        return x.scatter(1, positions, 0.0), _mask_of(x, positions)


class SaltPepperNoise:
    """Salt-and-pepper noise (JMLR 2010): a fraction ``nu`` of each example's components set to 0 or 1 at random.

    The components are chosen as fixed masking chooses them, exactly round(nu * d) per example,
    uniformly without replacement (``uniform_subsets``); each is then set to 0 or to 1 with
    probability 1/2, independently. The mask of ``corrupt_with_mask`` is the chosen set, so a
    component that was 0 and drew 0 still counts as corrupted: the loss emphasis weighs what the
    process chose, not what happened to change.
    """

    def __init__(self, nu: float):
        self.nu = _check_fraction(nu)

    def __repr__(self) -> str:
        return f"SaltPepperNoise(nu={self.nu})"

    def corrupted_count(self, d: int) -> int:
        return int(round(self.nu * d))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.corrupt_with_mask(x, generator)[0]

    def corrupt_with_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.corrupted_count(x.shape[1])
        if k == 0:
            return x, _nothing_corrupted(x)
        positions = uniform_subsets(x, k, generator)
        salt_or_pepper = torch.randint(0, 2, positions.shape, generator=generator, device=x.device).to(x.dtype)
        return x.scatter(1, positions, salt_or_pepper), _mask_of(x, positions)


class GaussianNoise:
    """Additive isotropic Gaussian noise (JMLR 2010): x~ = x + sigma * n, n ~ N(0, I), drawn afresh per call.

    Not clipped: corrupted values leave [0, 1]. They only feed the encoder; the loss compares the
    reconstruction with the clean input, so nothing needs them in [0, 1], and clipping would
    change the noise (a biased, no longer Gaussian perturbation near 0 and 1). Every component is
    corrupted, so the mask of ``corrupt_with_mask`` is all True (all False when sigma is 0).
    """

    def __init__(self, sigma: float):
        if not 0.0 <= sigma < float("inf"):
            raise ValueError(f"gaussian noise sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.sigma == 0.0:
            return x
        return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def corrupt_with_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, generator), torch.full(x.shape, self.sigma > 0.0, dtype=torch.bool, device=x.device)


Noise = MaskingNoise | SaltPepperNoise | GaussianNoise


def make_noise(kind: str, nu: float | None = None, masking: str = "fixed", sigma: float | None = None) -> Noise:
    """The corruption a params.yaml layer names: ``kind`` in NOISE_KINDS, with its level (nu or sigma)."""
    if kind == "masking":
        return MaskingNoise(nu, masking)
    if kind == "salt_pepper":
        return SaltPepperNoise(nu)
    if kind == "gaussian":
        return GaussianNoise(sigma)
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")


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
