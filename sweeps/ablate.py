"""Corruption sweep: one DVC experiment per nu, run by parallel queue workers, compared in MLflow.

    python -m sweeps.ablate                                   # nu 0 .1 .25 .4 .5 on every layer
    python -m sweeps.ablate --nu 0 0.25 0.5 --layers layer3 --jobs 2 --dataset digits

Steps: (1) create the MLflow store once, and leave out the points it holds a finished run of
(same params): an interrupted sweep, run again, finishes only what is missing; (2) run the stages
that every point shares (data, and the layers below the lowest swept one) once, in a temporary
DVC experiment, which fills DVC's run-cache; (3) queue one experiment per nu (`dvc exp run --queue -S ...`) and run them with N
workers (`dvc exp run --run-all -j N`), each restoring the shared stages from the run-cache and
using cores/N torch threads; (4) find each point's MLflow run, tag it with the sweep id and group
it under one parent run that holds the report; (5) write reports/sweeps/<id>/: table.md/json,
test_error_vs_nu.png, filters_by_nu.png. Results are also in `dvc exp show`.

Queued experiments see only what git tracks: commit your changes first (this command checks).
"""

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import yaml

from sda.data import DATASETS
from stages.common import run
from stages.params import ParamsError, load_params
from stages.track import download_artifact, flatten, log_sweep
from sweeps.dvc_queue import SWEEP_INTERRUPTED, SweepError
from sweeps.grid import add_run_arguments, apply_overrides, run_points, run_settings
from sweeps.report import FILTER_LEVELS, filter_figure, plot_error_against_nu, write_table

DEFAULT_NU = (0.0, 0.1, 0.25, 0.4, 0.5)


def sweep_points(params_raw: dict, nus: list[float], layers: list[str], dataset: str | None,
                 seeds: list[int] | None = None) -> list[dict]:
    """Each point's name part, -S overrides and full params, checked before anything runs; with
    ``seeds``, every nu once per seed."""
    points = []
    for nu, seed in itertools.product(nus, seeds or [None]):
        overrides: dict[str, object] = {f"pretrain.{layer}.corruption": nu for layer in layers}
        if dataset:
            overrides["data.dataset"] = dataset
        if seed is not None:
            overrides["seed"] = seed
        try:
            candidate = apply_overrides(params_raw, overrides)
        except ParamsError as err:
            raise ParamsError(f"--nu {nu:g}: {err}") from err
        label = f"nu{nu:g}".replace(".", "p") + ("" if seed is None else f"-seed{seed}")
        points.append({"label": label, "nu": nu, "seed": candidate["seed"], "overrides": overrides, "params": flatten(candidate)})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nu", type=float, nargs="+", default=list(DEFAULT_NU), help="corruption levels (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", default=["all"], help="layers whose corruption is swept: all, or names such as layer3 (default: all)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset for every point (default: params.yaml's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every nu once per seed (default: params.yaml's seed only)")
    parser.add_argument("--sweep-id", help="name of the sweep (default: sweep-<date>-<time>)")
    parser.add_argument("--params", default="params.yaml", help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args()
    threads, cluster = run_settings(args)

    params = load_params(args.params)
    layer_names = [l.name for l in params.layers]
    layers = layer_names if args.layers == ["all"] else args.layers
    for layer in layers:
        if layer not in layer_names:
            raise ParamsError(f"--layers: {layer!r} is not a layer of params.yaml ({', '.join(layer_names)}) or 'all'")
    if len(set(args.nu)) != len(args.nu):
        raise ParamsError(f"--nu: values must be distinct, got {args.nu}")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ParamsError(f"--seeds: values must be distinct, got {args.seeds}")
    points = sweep_points(yaml.safe_load(Path(args.params).read_text()), args.nu, layers, args.dataset, args.seeds)
    sweep_id = args.sweep_id or time.strftime("sweep-%Y%m%d-%H%M%S")

    # Shared: prepare, and the layers below the lowest swept one.
    lowest = min(layer_names.index(layer) for layer in layers)
    shared_target = "prepare" if lowest == 0 else f"pretrain@{layer_names[lowest - 1]}"
    shared_overrides = {k: v for k, v in points[0]["overrides"].items() if k == "data.dataset"}
    found, _ = run_points(sweep_id, points, [(shared_target, shared_overrides)], args.jobs, threads, cluster=cluster)

    rows = []
    for point in points:
        run_ = found[point["experiment"]]
        metrics = run_.data.metrics
        rows.append({"nu": point["nu"], "seed": point["seed"], "experiment": point["experiment"], "run_id": run_.info.run_id,
                     **{k: metrics[k] for k in ("valid_error", "test_error", "test_error_ci95")},
                     **{f"{l}_train_loss": metrics[f"pretrain.{l}.train_loss"] for l in layer_names}})

    report_dir = Path("reports/sweeps") / sweep_id
    report_dir.mkdir(parents=True, exist_ok=True)
    write_table(rows, layer_names, report_dir)
    dataset = args.dataset or params.dataset
    plot_error_against_nu(rows, f"{dataset}: corruption of {', '.join(layers)}", report_dir)
    has_figure = False
    if "layer1" in layers:
        with tempfile.TemporaryDirectory() as tmp:
            images = {row["nu"]: download_artifact(row["run_id"], "models/pretrain/layer1/filters.png", Path(tmp) / f"{row['nu']:g}")
                      for row in rows if row["nu"] in FILTER_LEVELS and row["seed"] == rows[0]["seed"]}
            has_figure = filter_figure(images, report_dir)
    point_runs = {name: run_.info.run_id for name, run_ in found.items()}
    parent = log_sweep(sweep_id, point_runs, report_dir, {"dataset": dataset, "swept_layers": ",".join(layers)})
    print((report_dir / "table.md").read_text())
    print(f"report: {report_dir}/ (table.md, test_error_vs_nu.png{', filters_by_nu.png' if has_figure else ''}); "
          f"MLflow: parent run {parent} with {len(point_runs)} child runs")


if __name__ == "__main__":
    run(main, known_errors=(SweepError,), interrupted=SWEEP_INTERRUPTED)
