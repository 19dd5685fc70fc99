"""The JMLR 2010 comparison of corruptions: masking, salt-and-pepper and Gaussian noise, with and
without emphasis, each point a DVC experiment and an MLflow run, compared on validation.

    python -m sweeps.noise --id noise-mnist                                 # MNIST, the levels below
    python -m sweeps.noise --id noise-3 --datasets mnist mnist-rot mnist-bg-rand
    python -m sweeps.noise --id quick --kinds salt_pepper --salt-pepper 0.25 --set finetune.max_epochs=10

Per dataset: no noise (SAE-3), then per kind its levels, the same noise and level in every layer:
masking nu {0.1, 0.25, 0.4} and salt-and-pepper nu {0.1, 0.25, 0.4}, each with and without
emphasis (alpha, beta) = (1, 0.5), and Gaussian sigma {0.1, 0.3, 0.5}, plain only: it changes
every component, which leaves nothing for beta to weigh. Every point trains on the `autograd`
engine, the one that runs every kind, so that the noise is the only difference between points;
everything else is params.yaml, or --set. The best point of each kind is chosen on the validation
error; the test split is only reported.

Interrupted? Run the same command again: points with a finished MLflow run of the same params are
not run again, failed points are retried. Before anything runs, the command checks that the disk
can hold what DVC's cache will gain (every point trains its own layers).

Writes reports/noise/<id>/: noise.md (every point; the best of each kind beside the journal's
numbers where it has them), noise.json, test_error_by_noise.png, and per kind
filters_<kind>.png: first-layer filters at no noise and at each level, one initialisation; all
under one MLflow parent run, the kind and level of each point in its params.
"""

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from sda.artifacts import atomic_path, save_json, save_text
from sda.data import DATASETS
from sda.noise import NOISE_KINDS
from stages.common import run
from stages.params import ParamsError, load_params
from stages.track import download_artifact, flatten
from sweeps.dvc_queue import SWEEP_INTERRUPTED, SweepError
from sweeps.grid import (
    add_run_arguments,
    apply_overrides,
    check_disk,
    parse_set,
    publish_report,
    run_points,
    run_settings,
)
from sweeps.report import filter_figure

LEVELS = {"masking": [0.1, 0.25, 0.4], "salt_pepper": [0.1, 0.25, 0.4], "gaussian": [0.1, 0.3, 0.5]}
EMPHASIS = (1.0, 0.5)  # (alpha, beta): the journal's emphasised loss
LABEL_PREFIX = {"masking": "mask", "salt_pepper": "sp", "gaussian": "gauss"}
# JMLR 2010 (../shared/paper/tables.md, README "Later noises"): test error % of SAE-3 and of the
# best SDAE-3 per kind where the journal gives one.
JOURNAL = {
    "mnist": {"none": 1.40, "masking": 1.28},
    "mnist-rot": {"none": 10.30, "masking": 9.53, "salt_pepper": 8.76},
    "mnist-bg-rand": {"none": 11.28, "masking": 10.30, "salt_pepper": 8.52},
}


def is_grid_key(key: str) -> bool:
    parts = key.split(".")
    return key in ("data.dataset", "engine") or (
        parts[0] == "pretrain" and len(parts) > 2 and parts[2] in ("noise", "corruption", "masking", "sigma", "emphasis"))


def noise_overrides(raw: dict, kind: str, level: float, emphasis: tuple[float, float] | None) -> dict[str, object]:
    """-S overrides giving every layer ``kind`` at ``level`` (no noise: masking at 0), with ``emphasis`` or the plain loss."""
    overrides: dict[str, object] = {}
    for name, layer in raw["pretrain"].items():
        key = f"pretrain.{name}"
        overrides[f"++{key}.noise"] = kind
        if kind == "gaussian":
            overrides[f"++{key}.sigma"] = level
            overrides.update({f"~{key}.{gone}": None for gone in ("corruption", "masking") if gone in layer})
        else:  # salt-and-pepper corrupts a fixed count; masking keeps the layer's mode
            overrides.update({f"++{key}.corruption": level,
                              f"++{key}.masking": layer.get("masking", "fixed") if kind == "masking" else "fixed"})
            if "sigma" in layer:
                overrides[f"~{key}.sigma"] = None
        if emphasis:
            overrides[f"++{key}.emphasis"] = {"alpha": emphasis[0], "beta": emphasis[1]}
        elif "emphasis" in layer:
            overrides[f"~{key}.emphasis"] = None
    return overrides


def grid_points(raw: dict, datasets: list[str], levels: dict[str, list[float]], emphasis: tuple[float, float] | None,
                extra: dict[str, object]) -> list[dict]:
    """Every point: no noise, then each kind's levels (masking and salt-and-pepper also emphasised)."""
    combos = [("none", 0.0, None)]
    for kind, values in levels.items():
        for level in values:
            combos.append((kind, level, None))
            if emphasis and kind != "gaussian":
                combos.append((kind, level, emphasis))
    points = []
    for dataset in datasets:
        for kind, level, emphasised in combos:
            overrides = {"data.dataset": dataset, "engine": "autograd", **extra,
                         **noise_overrides(raw, "masking" if kind == "none" else kind, level, emphasised)}
            label = "none" if kind == "none" else f"{LABEL_PREFIX[kind]}{level:g}".replace(".", "p") + ("-emph" if emphasised else "")
            try:
                candidate = apply_overrides(raw, overrides)
            except ParamsError as err:
                raise ParamsError(f"{dataset}, {kind} {level:g}{' emphasised' if emphasised else ''}: {err}") from err
            points.append({"label": f"{dataset}-{label}", "dataset": dataset, "kind": kind, "level": level,
                           "emphasis": emphasised, "overrides": overrides, "params": flatten(candidate)})
    return points


def describe_noise(row: dict) -> str:
    if row["kind"] == "none":
        return "no noise"
    name = f"{row['kind']} {'sigma' if row['kind'] == 'gaussian' else 'nu'} {row['level']:g}"
    return name + (f", emphasis {row['emphasis'][0]:g}/{row['emphasis'][1]:g}" if row["emphasis"] else "")


def best_of_kind(rows: list[dict], kind: str) -> dict | None:
    """The lowest validation error of ``kind`` (ties: the lower level, then no emphasis)."""
    mine = [r for r in rows if r["kind"] == kind]
    return min(mine, key=lambda r: (r["valid_error"], r["level"], bool(r["emphasis"]))) if mine else None


def error_with_ci(row: dict | None) -> str:
    return f"{100 * row['test_error']:.2f} +- {100 * row['test_error_ci95']:.2f}" if row else "-"


def report_lines(noise_id: str, rows: list[dict], kinds: list[str], failed: dict[str, str], wall: float) -> list[str]:
    lines = [f"# Noise comparison `{noise_id}`", "",
             "Test error % +- 95% CI. Every layer gets the same noise; the best of each kind is chosen on validation.", "",
             "## The best of each kind", "",
             "| dataset | kind | selected (valid error %) | test ours | journal | winner on validation |", "|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        chosen = {kind: best_of_kind(mine, kind) for kind in ["none", *kinds]}
        winner = min((r for r in chosen.values() if r), key=lambda r: r["valid_error"])
        for kind, row in chosen.items():
            journal = JOURNAL.get(dataset, {}).get(kind)
            selected = f"{describe_noise(row)} ({100 * row['valid_error']:.2f})" if row else "no point finished"
            lines.append(f"| {dataset} | {'none (SAE-3)' if kind == 'none' else kind} | {selected} | {error_with_ci(row)} | "
                         f"{f'{journal:.2f}' if journal else '-'} | {'**yes**' if row is winner else ''} |")
    lines += ["", "## Every point", "", "| dataset | noise | valid error % | test error % | DVC experiment |", "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {describe_noise(r)} | {100 * r['valid_error']:.2f} | {error_with_ci(r)} | {r['experiment']} |" for r in rows]
    lines += ["", "## Failed points", "", *([f"- {name}: {why}" for name, why in failed.items()] or ["None."]), "",
              f"Wall time of this command: {wall / 60:.1f} min ({sum(not r['restored'] for r in rows)} points run, "
              f"{sum(r['restored'] for r in rows)} restored from the MLflow store, {len(failed)} failed)."]
    return lines


def plot_error_by_noise(rows: list[dict], path: Path) -> None:
    """Per dataset: test error against the level, a line per kind (dashed: emphasised), no noise as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), dpi=100, squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for index, kind in enumerate(LEVELS):
            for emphasised in (False, True):
                line = sorted((r for r in mine if r["kind"] == kind and bool(r["emphasis"]) == emphasised), key=lambda r: r["level"])
                if line:
                    ax.errorbar([r["level"] for r in line], [100 * r["test_error"] for r in line],
                                yerr=[100 * r["test_error_ci95"] for r in line], marker="o", capsize=3, color=f"C{index}",
                                linestyle="--" if emphasised else "-", label=f"{kind}{' + emphasis' if emphasised else ''}")
        for r in (r for r in mine if r["kind"] == "none"):
            error, ci = 100 * r["test_error"], 100 * r["test_error_ci95"]
            ax.axhspan(error - ci, error + ci, color="grey", alpha=0.25, label="no noise (SAE-3) +- CI")
        ax.set_title(dataset)
        ax.set_xlabel("level (nu; sigma for gaussian)")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist"], choices=DATASETS, metavar="NAME",
                        help="datasets (default: mnist; the journal also reports mnist-rot and mnist-bg-rand)")
    parser.add_argument("--kinds", nargs="+", default=list(LEVELS), choices=NOISE_KINDS, help="noise kinds (default: all three)")
    for kind, levels in LEVELS.items():
        parser.add_argument(f"--{kind.replace('_', '-')}", type=float, nargs="+", default=levels, metavar="LEVEL",
                            help=f"{kind} levels, {'sigma' if kind == 'gaussian' else 'nu'} (default: %(default)s)")
    parser.add_argument("--emphasis", type=float, nargs=2, default=list(EMPHASIS), metavar=("ALPHA", "BETA"),
                        help="the emphasised loss's weights of corrupted / other components, run beside the plain loss "
                             "for masking and salt_pepper (default: %(default)s)")
    parser.add_argument("--no-emphasis", action="store_true", help="plain loss only")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="a params.yaml value for every point, e.g. finetune.max_epochs=10 (not the dataset, engine or noise keys)")
    parser.add_argument("--id", help="name of this comparison: experiment names and the report's folder (default: noise-<date>-<time>)")
    add_run_arguments(parser)
    args = parser.parse_args()
    threads, cluster = run_settings(args)
    levels = {kind: getattr(args, kind) for kind in LEVELS if kind in args.kinds}
    for kind, values in levels.items():
        if len(set(values)) != len(values) or any(v <= 0 for v in values):
            raise ParamsError(f"--{kind.replace('_', '-')}: levels must be distinct and > 0 (no noise always runs), got {values}")

    load_params()  # params.yaml itself must be valid before anything is queued
    raw = yaml.safe_load(Path("params.yaml").read_text())
    noise_id = args.id or time.strftime("noise-%Y%m%d-%H%M%S")
    extra = parse_set(args.set, is_grid_key, "--datasets, --kinds, the levels, --emphasis; every point runs engine autograd")
    points = grid_points(raw, args.datasets, levels, None if args.no_emphasis else tuple(args.emphasis), extra)
    print(f"Noise comparison `{noise_id}`: {len(points)} points; interrupted, run it again with --id {noise_id}", flush=True)
    if cluster is None:  # the nodes' own caches are theirs to watch
        check_disk(points)
    started = time.perf_counter()
    shared = [("prepare", {"data.dataset": dataset}) for dataset in args.datasets]
    found, failed = run_points(noise_id, points, shared, args.jobs, threads, keep_going=True, cluster=cluster)
    wall = time.perf_counter() - started

    rows = []
    for point in points:
        if point["experiment"] in found:
            mlrun = found[point["experiment"]]
            rows.append({k: point[k] for k in ("dataset", "kind", "level", "emphasis", "restored", "experiment")} | {
                "run_id": mlrun.info.run_id, **{k: mlrun.data.metrics[k] for k in ("valid_error", "test_error", "test_error_ci95")}})
    report = Path("reports/noise") / noise_id
    lines = report_lines(noise_id, rows, list(levels), failed, wall)
    save_text(report / "noise.md", "\n".join(lines) + "\n")
    save_json(report / "noise.json", {"id": noise_id, "levels": levels, "emphasis": None if args.no_emphasis else args.emphasis,
                                      "points": rows, "failed": failed, "wall_seconds": round(wall, 1)})
    if rows:
        plot_error_by_noise(rows, report / "test_error_by_noise.png")
    with tempfile.TemporaryDirectory() as tmp:  # the first dataset's filters, plain loss: the journal's figure
        plain_rows = [r for r in rows if r["dataset"] == args.datasets[0] and not r["emphasis"]]
        for kind in levels:
            images = {r["level"]: download_artifact(r["run_id"], "models/pretrain/layer1/filters.png", Path(tmp) / r["experiment"])
                      for r in plain_rows if r["kind"] in ("none", kind)}
            filter_figure(images, report, levels=sorted(images), name=f"filters_{kind}", caption=f"{kind} level")
    publish_report(noise_id, found, report, {"kind_of_sweep": "noise", "datasets": ",".join(args.datasets)}, lines, len(failed))


if __name__ == "__main__":
    run(main, known_errors=(SweepError,), interrupted=SWEEP_INTERRUPTED)
