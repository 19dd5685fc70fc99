"""Device choice and reproducible random streams."""

import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def set_cpu_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: $SDA_THREADS, else every core we may use)."""
    if threads is None:
        threads = int(os.environ.get("SDA_THREADS", "0")) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` so random draws never cross the host-device boundary."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
