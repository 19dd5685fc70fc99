"""The default MNIST pipeline with the fused engine and with the autograd engine, side by side, in one run.

Clones the committed repository into a temporary directory (your workspace is not touched), runs
`dvc repro prepare` there once (untimed: both engines share it), then for each engine sets
`engine` in params.yaml and times `dvc repro` (the three pretraining stages, finetune, evaluate,
track) and reads the metrics it wrote. Prints one row per engine and the time ratio.

Usage: python bench/bench_engines.py [--engines fused autograd] [--keep]
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fresh_clone import fresh_clone  # noqa: E402

from sda.device import usable_cores  # noqa: E402
from stages.environment import cpu_model  # noqa: E402


def repro(clone: Path, env: dict, *args: str) -> float:
    """Seconds that `dvc repro args` took; its output goes to <clone>/../repro-<n>.log."""
    log = clone.parent / f"repro-{len(list(clone.parent.glob('repro-*.log')))}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(["dvc", "repro", *args], cwd=clone, env=env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"dvc repro {' '.join(args)} failed with exit code {done.returncode}; its output: {log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["fused", "autograd"], help="engines to run, in order")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
    args = parser.parse_args()
    with fresh_clone(args.keep) as (clone, env):
        compare(clone, env, args.engines)


def compare(clone: Path, env: dict, engines: list[str]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    repro(clone, env, "prepare")

    rows = []
    for engine in engines:
        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["engine"] = engine
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        seconds = repro(clone, env)
        metrics = json.loads((clone / "metrics/evaluate.json").read_text())
        finetune = json.loads((clone / "metrics/finetune.json").read_text())
        layers = [json.loads(path.read_text())["seconds"] for path in sorted((clone / "metrics/pretrain").glob("layer*.json"))]
        rows.append((engine, seconds, metrics, finetune, layers))

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; {cpu_model()}, {usable_cores()} cores")
    print(f"{'engine':<10}{'dvc repro':>11}{'valid error':>13}{'test error +- 95% CI':>24}{'best epoch / run':>18}"
          f"{'pretraining s per layer':>26}{'s per fine-tuning epoch':>25}")
    for engine, seconds, m, ft, layers in rows:
        test = f"{m['test_error']:.2%} +- {m['test_error_ci95']:.2%}"
        print(f"{engine:<10}{seconds / 60:>9.1f} m{m['valid_error']:>13.2%}{test:>24}{ft['best_epoch']:>11} / {ft['epochs_run']:<4}"
              f"{' / '.join(f'{s:.1f}' for s in layers):>26}{ft['seconds'] / ft['epochs_run']:>25.2f}")
    if len(rows) == 2:
        (first, *_, first_layers), (second, *_, second_layers) = rows
        per_epoch = (rows[1][3]["seconds"] / rows[1][3]["epochs_run"]) / (rows[0][3]["seconds"] / rows[0][3]["epochs_run"])
        print(f"{second} / {first}: dvc repro {rows[1][1] / rows[0][1]:.2f}x (the runs may stop after different epochs), "
              f"pretraining {sum(second_layers) / sum(first_layers):.2f}x, a fine-tuning epoch {per_epoch:.2f}x")


if __name__ == "__main__":
    main()
