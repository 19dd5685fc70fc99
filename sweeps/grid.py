"""What every sweep command shares: points as queued DVC experiments, found again in MLflow.

A point is a dict with ``label`` (its name after the sweep's id), ``overrides`` (DVC's `-S`
keys and values) and ``params`` (the flattened params.yaml it runs), checked before anything is
queued. ``run_points`` runs them resumably: points with a finished MLflow run of the same params
are left out, shared stages run once beforehand to fill DVC's run-cache, the rest run in phases
on parallel queue workers, and Ctrl-C, SIGTERM or SIGHUP leave nothing queued or running.
"""

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sda.device import usable_cores
from sda.generators import SPLIT_SIZES
from stages.params import ParamsError, parse_params
from stages.track import find_point_run, finished_point_runs, finished_runs, log_sweep, mark_restored, open_store
from sweeps.dvc_queue import (
    SweepError,
    dvc,
    error_line,
    queue_entries,
    remove_queue_entries,
    run_queue,
    set_args,
    stop_signals_interrupt,
)

if TYPE_CHECKING:
    from sweeps.cluster import Cluster


def changed_files(*paths: str) -> list[str]:
    """The tracked files (under ``paths``, or all) that differ from git's HEAD."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], capture_output=True, text=True)
    if done.returncode != 0:
        raise SweepError(f"not a git repository here: {done.stderr.strip()}")
    return [line[3:] for line in done.stdout.splitlines()]


def check_committed() -> None:
    """The code and params a point runs must be committed: `dvc exp run --queue` would carry
    uncommitted changes into some points and not others (those queued before an edit)."""
    changed = changed_files("dvc.yaml", "params.yaml", "dvc.lock", "sda", "stages")
    if changed:
        raise SweepError(f"commit these first, so that every point runs the same code and params: {', '.join(changed[:5])}")


def check_queue_empty(sweep_id: str) -> None:
    """The queue must hold nothing waiting or running, but for this sweep's own leftovers of an
    interrupted run, which are removed."""
    remove_queue_entries(lambda name, status: name.startswith(f"{sweep_id}-") and status == "Queued")
    if any(status in ("Queued", "Running") for status in queue_entries().values()):
        raise SweepError("the DVC queue already holds experiments (see `dvc queue status`); run them or "
                         "`dvc queue remove --queued` first, so this sweep runs only its own points")


def apply_overrides(params_raw: dict, overrides: dict[str, object]) -> dict:
    """A copy of the params tree with dotted-key overrides applied, checked against the contract.

    Keys follow DVC's `-S` (Hydra) rules, so that what passes here also passes `dvc exp run`:
    ``key`` changes a value params.yaml has, ``+key`` adds one it lacks, ``++key`` does either,
    ``~key`` (value ignored) removes one it has."""
    candidate = yaml.safe_load(yaml.safe_dump(params_raw))
    for key, value in overrides.items():
        path = key.lstrip("+~")
        node = candidate
        *parents, last = path.split(".")
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{'.'.join(parents[:depth + 1])}: not in params.yaml, so {key} cannot be set")
            node = node[part]
        present = isinstance(node, dict) and last in node
        if key.startswith("~") and not present:
            raise ParamsError(f"{path}: not in params.yaml, so it cannot be removed")
        if key.startswith("+") and not key.startswith("++") and present:
            raise ParamsError(f"{path}: already in params.yaml; change it with {path}=... or ++{path}=...")
        if not key.startswith(("+", "~")) and not present:
            raise ParamsError(f"{path}: not in params.yaml; add it with ++{path}=...")
        if key.startswith("~"):
            del node[last]
        else:
            node[last] = value
    parse_params(candidate)
    return candidate


def parse_set(pairs: list[str], is_grid_key: Callable[[str], bool], grid_options: str) -> dict[str, object]:
    """--set's KEY=VALUE pairs (values read as YAML); keys the command's grid sets are refused, naming its options."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set: expected KEY=VALUE, got {pair!r}")
        if is_grid_key(key.lstrip("+~")):
            raise ParamsError(f"--set: {key} is set by the grid ({grid_options})")
        extra[key] = yaml.safe_load(value)
    return extra


def is_pretraining_key(key: str) -> bool:
    """The params that decide the pretrained layers (and so what DVC's cache holds of them)."""
    return key.startswith("pretrain.") or key in ("seed", "engine", "data.dataset")


def pretraining_params(point: dict) -> dict[str, object]:
    """The point's params that decide its pretrained layers: points with equal ones share them."""
    return {k: v for k, v in point["params"].items() if is_pretraining_key(k)}


def phase_by_shared_layers(points: list[dict]) -> list[dict]:
    """Set each point's ``phase`` to the number of points before it in the list that pretrain
    the same layers: the first of them trains the layers, the others run in later phases and
    restore them from DVC's run-cache instead of training them again alongside."""
    seen: dict[tuple, int] = {}
    for point in points:
        layers = tuple(sorted(pretraining_params(point).items()))
        point["phase"] = seen.get(layers, 0)
        seen[layers] = point["phase"] + 1
    return points


def check_disk(points: list[dict], cache: Path = Path(".dvc/cache"), spare_gb: float = 5.0) -> None:
    """Refuse to start when DVC's cache would fill the disk: every pretraining configuration still
    to train stores its layers' codes of all three splits in float32 (about 0.7 GB for 3 x 1000
    units on a 62,000-example benchmark)."""
    client, experiment_id, _ = open_store()
    runs = finished_runs(client, experiment_id)
    to_train = {}
    for point in points:
        pretraining = pretraining_params(point)
        key = tuple(sorted(pretraining.items()))
        if key not in to_train and find_point_run(runs, pretraining, in_scope=is_pretraining_key) is None:
            examples = sum(SPLIT_SIZES.get(point["dataset"], (60_000, 5_000, 10_000)))
            units = sum(v for k, v in pretraining.items() if k.endswith(".units"))
            to_train[key] = examples * units * 4 / 1e9
    need, free = sum(to_train.values()) + spare_gb, shutil.disk_usage(cache if cache.exists() else Path.cwd()).free / 1e9
    if need > free:
        raise SweepError(f"the points still to run add about {need - spare_gb:.0f} GB to DVC's cache ({len(to_train)} pretraining "
                         f"configurations, their codes in float32), plus {spare_gb:.0f} GB of working room, but {free:.0f} GB are free "
                         f"at {cache.resolve()}: free some (`dvc gc --workspace` drops what the workspace does not use), move the "
                         "cache to a bigger disk (`dvc cache dir PATH`), or run fewer --datasets at a time")
    print(f"disk: about {need - spare_gb:.0f} GB more in DVC's cache for {len(to_train)} pretraining configurations; {free:.0f} GB free",
          flush=True)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--jobs, --threads, --backend and the cluster's options, the same for every sweep command."""
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel queue workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads per point (default: cores / jobs, at least 1; with --backend ray: 1, "
                                                    "and each point asks Ray for as many CPUs)")
    parser.add_argument("--backend", choices=("queue", "ray"), default="queue",
                        help="queue: DVC's experiment queue on this machine (default); ray: a Ray cluster, one fresh clone per point "
                             "(README, 'Sweeps on a cluster')")
    group = parser.add_argument_group("--backend ray", "the cluster's shared services; MLflow is $MLFLOW_TRACKING_URI, a server")
    group.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), help="the Ray cluster's head, host:port (default: $RAY_ADDRESS)")
    group.add_argument("--git-remote", help="the git remote the nodes clone and push experiments to (default: origin's URL)")
    group.add_argument("--dvc-remote", help="the DVC remote URL every node pulls stages from and pushes them to (default: the repo's default remote's URL)")
    group.add_argument("--retries", type=int, default=3, help="attempts a point gets on other nodes when its node dies (default: %(default)s)")


def run_settings(args: argparse.Namespace) -> tuple[int, "Cluster | None"]:
    """(torch threads per point, the cluster --backend ray names or None) from add_run_arguments' options, checked."""
    if args.jobs < 1:
        raise ParamsError(f"--jobs: must be an integer >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise ParamsError(f"--threads: must be an integer >= 1, got {args.threads}")
    return args.threads or max(1, usable_cores() // args.jobs), cluster_from_args(args, cpus_per_point=args.threads or 1)


def cluster_from_args(args: argparse.Namespace, cpus_per_point: int) -> "Cluster | None":
    """The cluster --backend ray names, its settings checked for presence (None for the queue)."""
    if args.backend != "ray":
        return None
    from sweeps.cluster import Cluster

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    def dvc_default_remote_url() -> str:
        name = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True).stdout.strip()
        return subprocess.run(["dvc", "config", f"remote.{name}.url"], capture_output=True, text=True).stdout.strip() if name else ""

    settings = {"--ray-address": args.ray_address, "--git-remote": args.git_remote or git("remote", "get-url", "origin"),
                "--dvc-remote": args.dvc_remote or dvc_default_remote_url(), "$MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}
    for option, value in settings.items():
        if not value:
            raise SweepError(f"--backend ray needs {option}" + (" (or $RAY_ADDRESS)" if option == "--ray-address" else ""))
    if args.retries < 0:
        raise ParamsError(f"--retries: must be an integer >= 0, got {args.retries}")
    return Cluster(ray_address=settings["--ray-address"], git_remote=settings["--git-remote"], dvc_remote=settings["--dvc-remote"],
                   tracking_uri=settings["$MLFLOW_TRACKING_URI"], commit=git("rev-parse", "HEAD"), retries=args.retries,
                   cpus_per_point=cpus_per_point)


def point_name(sweep_id: str, point: dict) -> str:
    """The DVC experiment name of a sweep's point, which its MLflow run is tagged with too."""
    return f"{sweep_id}-{point['label']}"


def run_points(sweep_id: str, points: list[dict], shared: list[tuple[str, dict]], jobs: int, threads: int,
               keep_going: bool = False, cluster: "Cluster | None" = None) -> tuple[dict[str, object], dict[str, str]]:
    """Run every point as a queued DVC experiment; return ({experiment name: its MLflow run}, {failed point: why}).

    Each point is named ``<sweep_id>-<label>`` (set as ``point["experiment"]``). A point with a
    finished MLflow run of the same params is not run again (a re-run after an interruption
    finishes only what is missing); ``point["restored"]`` says which were. Points run in the order
    of their ``phase`` (default 0), one queue run per phase, so a later phase can restore stages an
    earlier one trained from DVC's run-cache. ``shared``: (target, overrides) of stages that
    several points share, run once beforehand in temporary experiments for the points that need
    them. A failed point stops the sweep (SweepError) after its phase, unless ``keep_going``: then
    the others still run and the failed ones are returned, to be retried by the next invocation.
    With a ``cluster`` (--backend ray), the points run on it instead (sweeps/cluster.py): ``shared``,
    ``jobs`` and ``threads`` do not apply there.
    """
    for point in points:
        point["experiment"] = point_name(sweep_id, point)
    names = {point["experiment"]: point for point in points}
    if len(names) != len(points):
        raise SweepError(f"two points share a name; labels: {', '.join(sorted(p['label'] for p in points))}")
    check_committed()
    if cluster is not None:
        from sweeps.cluster import run_points_on_ray

        with stop_signals_interrupt():  # SIGTERM and SIGHUP cancel the sweep's tasks as Ctrl-C does
            found, failed = run_points_on_ray(sweep_id, points, cluster)
        if failed and not keep_going:
            raise SweepError("sweep points failed:\n" + "\n".join(f"  {name}: {why}" for name, why in failed.items()))
        return found, failed
    # Ctrl-C, SIGTERM or SIGHUP raise KeyboardInterrupt while the sweep queues and runs, so that
    # nothing of it stays queued or running.
    try:
        with stop_signals_interrupt():
            mark_restored(points)
            missing = {name: point for name, point in names.items() if not point["restored"]}
            print(f"{len(points) - len(missing)} of {len(points)} points have a finished MLflow run already; running {len(missing)}",
                  flush=True)
            if missing:  # nothing to run leaves the queue alone (each look at it takes seconds)
                check_queue_empty(sweep_id)

            env = dict(os.environ, SDA_THREADS=str(threads))
            needed = [(index, target, overrides) for index, (target, overrides) in enumerate(shared)
                      if any(overrides.items() <= point["overrides"].items() for point in missing.values())]
            remove_experiments([f"{sweep_id}-shared{index}" for index, _, _ in needed])
            for index, target, overrides in needed:
                dvc("exp", "run", "--temp", "--name", f"{sweep_id}-shared{index}", *set_args(overrides), target, env=env)
            failed = {}
            for phase in sorted({point.get("phase", 0) for point in missing.values()}):
                batch = [name for name, point in missing.items() if point.get("phase", 0) == phase]
                failed.update(run_batch(batch, missing, jobs, threads, env))
                if failed and not keep_going:
                    raise SweepError("sweep points failed (see `dvc queue logs <name>`):\n"
                                     + "\n".join(f"  {name}: {why}" for name, why in failed.items()))
    except KeyboardInterrupt:
        raise SweepError(f"interrupted: nothing of the sweep is left queued or running; run the command again "
                         f"(with --id {sweep_id}, where the id was not given) to finish what is missing") from None

    found = finished_point_runs(points, failed)
    if failed and not keep_going:
        raise SweepError("\n".join(f"{name}: {why}" for name, why in failed.items()))
    return found, failed


def remove_experiments(names: list[str]) -> None:
    """Remove the experiments of these names an earlier, interrupted run of the sweep saved, so that
    the names can be used again (`dvc exp run --force` would also re-run every cached stage)."""
    existing = sorted(set(names) & set(dvc("exp", "list", "--name-only", echo=False).split()))
    if existing:
        dvc("exp", "remove", *existing, echo=False)


def failure_reason(name: str) -> str:
    """The error line of a failed point's log (the stages print one `error: ...` line), or its last line."""
    try:
        return error_line(dvc("queue", "logs", name, echo=False), "empty log")
    except SweepError as err:
        return f"no log: {str(err).splitlines()[0]}"


def run_batch(batch: list[str], points: dict[str, dict], jobs: int, threads: int, env: dict) -> dict[str, str]:
    """Queue the named points and run them with ``jobs`` workers; return {failed point: why}.

    Whatever stops it (Ctrl-C, a failure of dvc itself), none of them stays queued."""
    # Entries of an interrupted earlier run under the same names (failed or never run) go first.
    remove_queue_entries(lambda name, status: name in batch)
    remove_experiments(batch)
    changed_before = changed_files()
    try:
        for name in batch:
            # `dvc exp run --queue` stashes the working tree and restores it: a file edited meanwhile
            # can lose the edit. Stop at the first sign of one.
            if (edited := sorted(set(changed_files()) - set(changed_before))):
                raise SweepError(f"{', '.join(edited[:5])} changed while the sweep queued its points: `dvc exp run --queue` "
                                 "stashes and restores the working tree, which can undo such an edit (check it is still "
                                 "there); edit once the sweep prints 'running ... points', and run the command again")
            dvc("exp", "run", "--queue", "--name", name, *set_args(points[name]["overrides"]), env=env)
        started = time.perf_counter()
        print(f"running {len(batch)} points with {jobs} workers x {threads} torch threads ...", flush=True)
        # The queue was empty before, so the workers it stops are this sweep's own.
        run_queue(jobs, env)
    except BaseException:
        remove_queue_entries(lambda name, status: name in batch and status == "Queued")
        raise
    # Only this batch's entries: the queue remembers earlier sweeps' failures too.
    statuses = queue_entries()
    failed = {name: failure_reason(name) if name in statuses else "not in the queue's records"
              for name in batch if statuses.get(name) != "Success"}
    print(f"{len(batch) - len(failed)} points done, {len(failed)} failed, in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return failed


def publish_report(sweep_id: str, found: dict[str, object], report_dir: Path, tags: dict[str, str], lines: list[str],
                   failed: int, retried: str = "them") -> None:
    """Log the report as the MLflow parent run of the points in ``found``, print it, and say where
    it is and which of the ``failed`` points running the command again ``retried``."""
    parent = log_sweep(sweep_id, {name: r.info.run_id for name, r in found.items()}, report_dir, tags)
    print("\n".join(lines))
    files = ", ".join(sorted(path.name for path in report_dir.iterdir()))
    print(f"report: {report_dir}/ ({files}); MLflow: parent run {parent} with {len(found)} child runs")
    if failed:
        print(f"{failed} points failed (listed in the report); running the command again retries {retried}")
