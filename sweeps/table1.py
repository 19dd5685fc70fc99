"""ICML 2008 Table 1: SdA-3 and SAA-3 on the eight benchmarks, next to the paper's numbers.

    python -m sweeps.table1 --profile reduced --datasets mnist-basic rect convex   # CPU, minutes
    python -m sweeps.table1 --profile full                                          # all eight: a GPU job

For each dataset it runs SAA-3 (nu = 0 in every layer) and SdA-3 at every nu of --nu (default
0.1 0.25 0.4, in every layer) as queued DVC experiments (the sweep machinery of sweeps/ablate.py:
one shared `prepare` per dataset, parallel workers, one MLflow run per point), picks SdA-3's nu by
the validation error as the paper did, and writes reports/table1/<id>/table1.md and .json: our test
error +- 95% CI beside the paper's SdA-3 and SAA-3, with "overlap" where the two CIs overlap.

Profiles: `full` is params.yaml as it is (3 x 1000 units, 15 pretraining epochs per layer,
fine-tuning up to 30 epochs); `reduced` keeps the architecture and cuts the budget: 5 pretraining
epochs per layer and fine-tuning up to 15 epochs (patience 8).
"""

import argparse
import time
from pathlib import Path

import yaml

from sda.artifacts import save_json, save_text
from sda.data import BENCHMARKS
from stages.common import run
from stages.params import ParamsError, load_params
from stages.track import flatten, log_sweep
from sweeps.ablate import apply_overrides, default_threads, run_points
from sweeps.dvc_queue import SweepError

# ICML 2008 Table 1 (../shared/paper/tables.md): test error %, half-width of the 95% CI, SdA-3's nu.
PAPER = {
    "mnist-basic": {"SAA-3": (3.46, 0.16), "SdA-3": (2.80, 0.14), "nu": 0.10},
    "mnist-rot": {"SAA-3": (10.30, 0.27), "SdA-3": (10.29, 0.27), "nu": 0.10},
    "mnist-bg-rand": {"SAA-3": (11.28, 0.28), "SdA-3": (10.38, 0.27), "nu": 0.40},
    "mnist-bg-img": {"SAA-3": (23.00, 0.37), "SdA-3": (16.68, 0.33), "nu": 0.25},
    "mnist-rot-bg-img": {"SAA-3": (51.93, 0.44), "SdA-3": (44.49, 0.44), "nu": 0.25},
    "rect": {"SAA-3": (2.41, 0.13), "SdA-3": (1.99, 0.12), "nu": 0.10},
    "rect-img": {"SAA-3": (24.05, 0.37), "SdA-3": (21.59, 0.36), "nu": 0.25},
    "convex": {"SAA-3": (18.41, 0.34), "SdA-3": (19.06, 0.34), "nu": 0.10},
}
PROFILES = {
    "full": {},
    "reduced": {"epochs": 5, "finetune.max_epochs": 15, "finetune.patience": 8},
}


def profile_overrides(profile: str, layers: list[str]) -> dict[str, object]:
    overrides = {}
    for key, value in PROFILES[profile].items():
        if key == "epochs":
            overrides.update({f"pretrain.{layer}.epochs": value for layer in layers})
        else:
            overrides[key] = value
    return overrides


def overlap(ours: tuple[float, float], theirs: tuple[float, float]) -> bool:
    return abs(ours[0] - theirs[0]) <= ours[1] + theirs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS, metavar="NAME",
                        help=f"benchmarks to run (default: all eight: {', '.join(BENCHMARKS)})")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="reduced", help="budget (default: %(default)s)")
    parser.add_argument("--nu", type=float, nargs="+", default=[0.1, 0.25, 0.4], help="SdA-3's candidate nu (default: %(default)s)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel queue workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores / jobs)")
    parser.add_argument("--id", help="name of this reproduction (default: table1-<date>-<time>)")
    args = parser.parse_args()
    if args.jobs < 1:
        raise ParamsError(f"--jobs: must be an integer >= 1, got {args.jobs}")
    if any(nu <= 0 for nu in args.nu):
        raise ParamsError(f"--nu: SdA-3's candidates must be > 0 (nu = 0 is SAA-3, always run), got {args.nu}")

    params = load_params()
    raw = yaml.safe_load(Path("params.yaml").read_text())
    layers = [l.name for l in params.layers]
    table_id = args.id or time.strftime("table1-%Y%m%d-%H%M%S")
    budget = profile_overrides(args.profile, layers)
    points, shared = [], []
    for dataset in args.datasets:
        shared.append(("prepare", {"data.dataset": dataset}))
        for nu in [0.0, *args.nu]:
            overrides = {"data.dataset": dataset, **budget, **{f"pretrain.{layer}.corruption": nu for layer in layers}}
            points.append({"label": f"{dataset}-nu{nu:g}".replace(".", "p"), "dataset": dataset, "nu": nu,
                           "overrides": overrides, "params": flatten(apply_overrides(raw, overrides))})

    found = run_points(table_id, points, shared, args.jobs, args.threads or default_threads(args.jobs))
    results = []
    for (name, mlrun), point in zip(found.items(), points):
        m = mlrun.data.metrics
        results.append({"dataset": point["dataset"], "nu": point["nu"], "experiment": name, "run_id": mlrun.info.run_id,
                        "valid_error": m["valid_error"], "test_error": m["test_error"], "test_error_ci95": m["test_error_ci95"]})

    lines = [f"Profile `{args.profile}`; SdA-3's nu chosen on the validation set from {', '.join(f'{nu:g}' for nu in args.nu)}. "
             "Test error % +- 95% CI; 'overlap': our CI overlaps the paper's.", "",
             "| dataset | SAA-3 ours | SAA-3 paper | | SdA-3 ours (nu) | SdA-3 paper (nu) | |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for dataset in args.datasets:
        rows = [r for r in results if r["dataset"] == dataset]
        saa = next(r for r in rows if r["nu"] == 0)
        sda = min((r for r in rows if r["nu"] > 0), key=lambda r: (r["valid_error"], r["nu"]))
        paper = PAPER[dataset]
        ours_saa = (100 * saa["test_error"], 100 * saa["test_error_ci95"])
        ours_sda = (100 * sda["test_error"], 100 * sda["test_error_ci95"])
        lines.append(
            f"| {dataset} | {ours_saa[0]:.2f} +- {ours_saa[1]:.2f} | {paper['SAA-3'][0]:.2f} +- {paper['SAA-3'][1]:.2f} | "
            f"{'overlap' if overlap(ours_saa, paper['SAA-3']) else ''} | "
            f"{ours_sda[0]:.2f} +- {ours_sda[1]:.2f} ({sda['nu']:g}) | {paper['SdA-3'][0]:.2f} +- {paper['SdA-3'][1]:.2f} ({paper['nu']:g}) | "
            f"{'overlap' if overlap(ours_sda, paper['SdA-3']) else ''} |")
        summary.append({"dataset": dataset, "saa3": saa, "sda3": sda, "paper": paper,
                        "saa3_overlaps_paper": overlap(ours_saa, paper["SAA-3"]), "sda3_overlaps_paper": overlap(ours_sda, paper["SdA-3"])})
    report = Path("reports/table1") / table_id
    save_text(report / "table1.md", "\n".join(lines) + "\n")
    save_json(report / "table1.json", {"profile": args.profile, "candidates": args.nu, "datasets": summary, "points": results})
    parent = log_sweep(table_id, {name: r.info.run_id for name, r in found.items()}, report,
                       {"profile": args.profile, "datasets": ",".join(args.datasets)})
    print("\n".join(lines))
    print(f"report: {report}/table1.md; MLflow: parent run {parent} with {len(found)} child runs")


if __name__ == "__main__":
    run(main, known_errors=(SweepError,))
