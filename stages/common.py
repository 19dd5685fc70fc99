"""What every stage shares: argument parsing, error reporting, seeds, loading splits."""

import argparse
import os
import signal
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from sda.artifacts import load_split
from sda.data import DataSourceError
from sda.device import choose_cpu_matmul, cpu_matmul, flush_denormals, make_generator, resolve_device, set_cpu_threads
from sda.training import DivergenceError
from stages.params import ParamsError

SPLITS = ("train", "valid", "test")


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--device",
        default=os.environ.get("SDA_DEVICE", "auto"),
        help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ... "
        "(default: $SDA_DEVICE or auto)",
    )
    return parser


def setup_torch(device_name: str) -> torch.device:
    flush_denormals()  # first: the threads started later inherit it
    set_cpu_threads()
    choose_cpu_matmul()
    return resolve_device(device_name)


def describe_device(device: torch.device, *more: str) -> str:
    """Where the stage computes, for its log: ``cpu (2 threads, float32 products by oneDNN, ...)``.

    ``more`` adds CPU details (empty ones are left out).
    """
    if device.type != "cpu":
        return str(device)
    library = {"onednn": "oneDNN", "blas": "torch's BLAS"}[cpu_matmul()]
    threads = torch.get_num_threads()
    details = [f"{threads} thread{'s' * (threads != 1)}", f"float32 products by {library}", *filter(None, more)]
    return f"cpu ({', '.join(details)})"


def stage_generator(seed: int, stage: str, device: torch.device) -> torch.Generator:
    """A random stream per stage, so changing one layer leaves the others' draws untouched."""
    return make_generator(seed * 1_000_003 + zlib.crc32(stage.encode()), device)


def load_splits(directory: str | Path, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """All three splits of a directory of .npz files, as tensors already on ``device``."""
    splits = {}
    for name in SPLITS:
        x, y = load_split(Path(directory) / f"{name}.npz")
        splits[name] = (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    return splits


def _exit_on_interrupt(then: str) -> None:
    # Exit at once instead of raising KeyboardInterrupt wherever the main thread happens to be: an
    # exception raised inside tqdm's write lock can deadlock the exit. Nothing is lost by not
    # unwinding: every output is written to a temporary file and renamed, so none is half-written.
    print(f"\ninterrupted: {' '.join(sys.argv)} stopped; {then}", file=sys.stderr, flush=True)
    os._exit(130)


def run(main: Callable[[], None], known_errors: tuple[type[Exception], ...] = (),
        interrupted: str = "its outputs are incomplete and `dvc repro` will run it again") -> None:
    """Run a stage or a tool; known failures (and ``known_errors``) become one clear line on stderr and a non-zero exit.
    Ctrl-C exits at once, saying what was stopped and then ``interrupted``."""
    signal.signal(signal.SIGINT, lambda signum, frame: _exit_on_interrupt(interrupted))
    try:
        main()
    except (ParamsError, DataSourceError, DivergenceError, FileNotFoundError, ValueError, *known_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ParamsError) else 1)
