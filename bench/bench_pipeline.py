"""Wall time of the default `dvc repro`, per stage, and DVC's own overhead, from one run.

Clones the committed repository into a temporary directory (your workspace is not touched), runs
`dvc repro` there on the default params, timestamps every line DVC prints, and reports:
  - each stage's time, from DVC printing its command to DVC recording its lock entry (so it
    includes hashing that stage's outputs);
  - DVC's overhead: the total minus the stages (start-up, graph, checks between stages);
  - peak resident memory of any process of the run.

Usage: python bench/bench_pipeline.py [--keep] [-- extra dvc repro args]
"""

import argparse
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fresh_clone import fresh_clone  # noqa: E402

from sda.device import usable_cores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
    parser.add_argument("repro_args", nargs="*", help="extra arguments for dvc repro")
    args = parser.parse_args()
    with fresh_clone(args.keep) as (clone, env):
        report(clone, env, args.repro_args)


def report(clone: Path, env: dict, repro_args: list[str]) -> None:
    started = time.perf_counter()
    process = subprocess.Popen(["dvc", "repro", *repro_args], cwd=clone, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, bufsize=1)
    stages, current = {}, None
    for line in process.stdout:
        now = time.perf_counter() - started
        if line.startswith("Running stage '"):
            current = line.split("'")[1]
        elif line.startswith("> ") and current:
            stages[current] = [now, None]
        elif line.startswith(("Updating lock file", "Generating lock file")) and current in stages:
            stages[current][1] = now
            current = None
    process.wait()
    total = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"dvc repro failed with exit code {process.returncode} in {clone}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {usable_cores()} cores")
    print(f"{'stage':<20}{'seconds':>9}")
    spent = 0.0
    for name, (begin, end) in stages.items():
        spent += end - begin
        print(f"{name:<20}{end - begin:>9.1f}")
    print(f"{'DVC overhead':<20}{total - spent:>9.1f}")
    print(f"{'total dvc repro':<20}{total:>9.1f}  ({total / 60:.1f} min)")
    print(f"peak resident memory of one process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
