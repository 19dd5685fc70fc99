"""What computed a stage's outputs: engine, device, CPU, threads, products library, denormals, C kernels,
versions.

Each stage that computes numbers writes this record to metrics/computed_by/<stage>.json, and the
track stage logs it as tags of the MLflow run: the same params and seed on two machines can give
other metrics (another BLAS, another summation order), and this is what tells the runs apart.
"""

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy
import torch

from sda.artifacts import save_json
from sda.device import cpu_matmul, denormals_flushed
from sda.kernels import kernels_record

RECORD_DIR = Path("metrics/computed_by")


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux; what the platform module knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def computed_by(device: torch.device, engine: str | None) -> dict[str, str]:
    """The record of what computes on ``device`` in this process; ``engine`` None for a stage that does
    not train (its record then has no engine and no C kernels)."""
    on_cpu = device.type == "cpu"
    record = {
        "engine": engine,
        "device": str(device) if on_cpu else f"{device} ({torch.cuda.get_device_name(device)})",
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "products": {"onednn": "oneDNN", "blas": "torch's BLAS"}[cpu_matmul()] if on_cpu else "cuBLAS",
        "denormals": ("flushed to zero" if denormals_flushed() else "kept") if on_cpu else None,
        # The fused engine's CPU steps and the CPU masking call them; masks are the same without.
        "c_kernels": (kernels_record() if on_cpu else "not used on a GPU") if engine else None,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "dvc_version": package_version("dvc"),
        "mlflow_version": package_version("mlflow"),
        "os": platform.platform(),
    }
    return {key: value for key, value in record.items() if value is not None}


def save_computed_by(stage: str, device: torch.device, engine: str | None) -> dict[str, str]:
    record = computed_by(device, engine)
    save_json(RECORD_DIR / f"{stage}.json", record)
    return record
