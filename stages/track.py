"""Stage track: record the pipeline's results as one MLflow run. The only module that talks to MLflow.

It reads what the other stages recorded (params.yaml, metrics/, plots/, the filter image, dvc.lock),
so a stage that DVC skipped still appears in the run. DVC re-runs this stage only when one of those
outputs changed, and a run whose content is already in the store is not logged twice.

Store: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db with artifacts in <repo>/mlartifacts,
where <repo> is $DVC_ROOT (the real repository, also for `dvc exp run --queue`'s temporary copies)
or the current directory.
"""

import contextlib
import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead
    fcntl = None
    import msvcrt

# An unreachable server must fail in seconds, not after MLflow's minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from sda.artifacts import save_json  # noqa: E402
from stages.common import run, stage_parser  # noqa: E402
from stages.environment import RECORD_DIR  # noqa: E402
from stages.params import load_params  # noqa: E402

EXPERIMENT = os.environ.get("SDA_MLFLOW_EXPERIMENT", "sda-pipeline")
RUN_RECORD = Path("reports/mlflow_run.json")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def open_experiment(client: mlflow.MlflowClient, root: Path) -> str:
    """The experiment's id, creating it with its artifacts under the real repository."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = (root / "mlartifacts").as_uri() if client.tracking_uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and our create.
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def stage_hashes(lock_path: Path) -> dict[str, str]:
    """md5 of each stage's command, deps, params and outs as recorded in dvc.lock."""
    if not lock_path.is_file():
        return {}
    stages = yaml.safe_load(lock_path.read_text()).get("stages", {})
    return {
        name: hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()
        for name, entry in stages.items()
        if name != "track"
    }


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def git_dirty() -> str:
    """"true" when the pipeline's code (sda/, stages/, dvc.yaml) differs from the commit; params are logged apart."""
    done = subprocess.run(["git", "status", "--porcelain", "--", "sda", "stages", "dvc.yaml"], capture_output=True, text=True)
    return "unknown" if done.returncode != 0 else str(bool(done.stdout.strip())).lower()


def computed_by_tags(records: dict[str, dict[str, str]]) -> dict[str, str]:
    """One tag per key of the stages' records (stages/environment.py): the value where every stage
    that records the key agrees, else each one's value ("pretrain@layer1: ...; finetune: ...")."""
    tags = {}
    for key in dict.fromkeys(k for record in records.values() for k in record):
        values = {stage: record[key] for stage, record in records.items() if key in record}
        distinct = set(values.values())
        tags[key] = distinct.pop() if len(distinct) == 1 else "; ".join(f"{stage}: {v}" for stage, v in values.items())
    return tags


def noise_level(layer) -> str:
    """A layer's noise in the run name: nu for masking noise (``0.1``), else the kind and its level (``s&p 0.25``, ``sigma 0.3``)."""
    if layer.noise == "gaussian":
        return f"sigma {layer.sigma:g}"
    return f"s&p {layer.corruption:g}" if layer.noise == "salt_pepper" else f"{layer.corruption:g}"


def run_name(params, experiment: str) -> str:
    """What the run is: ``mnist nu 0.1/0.2/0.3 seed 1234`` (and the DVC experiment's name, if any).

    A layer with another noise shows it in its place: ``mnist nu s&p 0.25/sigma 0.3/0.3 seed 1234``.
    """
    name = f"{params.dataset} nu {'/'.join(noise_level(l) for l in params.layers)} seed {params.seed}"
    if params.engine != "fused":
        name += f" {params.engine}"
    return f"{name} ({experiment})" if experiment else name


def collect(params_path: str) -> tuple[dict, dict, list[Metric], list[Path]]:
    """Params, tags, metrics (final and per-epoch) and artifact files of the current workspace."""
    params = load_params(params_path)
    flat_params = {k: str(v) for k, v in flatten(yaml.safe_load(Path(params_path).read_text())).items()}
    metrics: list[Metric] = []

    def add(key: str, value: float, step: int = 0) -> None:
        metrics.append(Metric(key, float(value), 0, step))

    for key, value in json.loads(Path("metrics/evaluate.json").read_text()).items():
        add(key, value)
    for key, value in json.loads(Path("metrics/finetune.json").read_text()).items():
        add(f"finetune.{key}", value)
    for row in read_curve(Path("plots/finetune.csv")):
        for key in ("lr", "train_loss", "train_error", "valid_error"):
            add(f"finetune.epoch.{key}", row[key], int(row["epoch"]))
    artifacts = [Path(params_path), Path("plots/finetune.csv"), Path("metrics/evaluate.json"), Path("metrics/finetune.json")]
    for layer in params.layers:
        for key, value in json.loads(Path(f"metrics/pretrain/{layer.name}.json").read_text()).items():
            add(f"pretrain.{layer.name}.{key}", value)
        curve = Path(f"plots/pretrain/{layer.name}.csv")
        for row in read_curve(curve):
            add(f"pretrain.{layer.name}.epoch.loss", row["loss"], int(row["epoch"]))
        artifacts += [curve, Path(f"metrics/pretrain/{layer.name}.json")]
    artifacts += [Path("models/pretrain/layer1/filters.png"), Path("plots/gallery/train.png")]
    stages = [f"pretrain@{layer.name}" for layer in params.layers] + ["finetune", "evaluate"]
    records = {stage: json.loads((RECORD_DIR / f"{stage}.json").read_text()) for stage in stages}
    artifacts += [RECORD_DIR / f"{stage}.json" for stage in stages]

    hashes = stage_hashes(Path("dvc.lock"))
    experiment = os.environ.get("DVC_EXP_NAME", "")
    tags = {
        "dataset": params.dataset,
        # Queued experiments run in a temporary copy whose HEAD is not the user's commit.
        "git_commit": os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(),
        "git_dirty": git_dirty(),
        "dvc_experiment": experiment,
        "mlflow.runName": run_name(params, experiment),
        **computed_by_tags(records),
        **{f"dvc_stage.{name}": value for name, value in hashes.items()},
    }
    # Identity of the results, leaving out wall-clock timings and the records of what computed them,
    # so that re-running an unchanged pipeline (dvc repro --force, a re-queued experiment, another
    # machine's identical results) is recognised and not logged twice.
    content = hashlib.sha256()
    content.update(json.dumps(flat_params, sort_keys=True).encode())
    left_out = {Path("metrics/finetune.json")} | {Path(f"metrics/pretrain/{l.name}.json") for l in params.layers}
    left_out |= {RECORD_DIR / f"{stage}.json" for stage in stages}
    for path in artifacts:
        if path not in left_out:
            content.update(path.read_bytes())
    tags["content_hash"] = content.hexdigest()
    return flat_params, tags, metrics, artifacts


@contextlib.contextmanager
def store_lock():
    """Serialise the writers of a local sqlite store across processes.

    Several processes creating one sqlite store at the same moment corrupt it (MLflow 3.17), and
    parallel queue workers finish at the same moment often enough; a server store needs no lock.
    """
    uri = tracking_uri(repo_root())
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        _lock_file(lock)
        try:
            yield
        finally:
            _lock_file(lock, unlock=True)


def _lock_file(lock, unlock: bool = False) -> None:
    """Take (or release) an exclusive lock on an open file, waiting for it: flock, or msvcrt on Windows."""
    if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_UN if unlock else fcntl.LOCK_EX)
        return
    lock.seek(0)
    while True:
        try:  # LK_LOCK itself gives up after 10 s: keep waiting, as flock does
            msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK if unlock else msvcrt.LK_LOCK, 1)
            return
        except OSError:
            if unlock:
                raise


def open_store() -> tuple[mlflow.MlflowClient, str, str]:
    """(client, experiment id, tracking URI), creating the store and experiment if needed."""
    root = repo_root()
    uri = tracking_uri(root)
    try:
        with store_lock():  # the client creates (migrates) a new sqlite store when constructed
            client = mlflow.MlflowClient(tracking_uri=uri)
            return client, open_experiment(client, root), uri
    except mlflow.exceptions.MlflowException as err:
        raise StoreError(f"MLflow store {uri} failed: {str(err).splitlines()[0]}") from err


class StoreError(RuntimeError):
    """The MLflow store cannot be reached or written."""


def log_pipeline_run(params_path: str) -> tuple[str, str]:
    """Log the workspace's results as one run, unless identical results are logged already."""
    flat_params, tags, metrics, artifacts = collect(params_path)
    client, experiment_id, uri = open_store()
    with store_lock():
        return _log_once(client, experiment_id, uri, flat_params, tags, metrics, artifacts)


def _log_once(client, experiment_id, uri, flat_params, tags, metrics, artifacts) -> tuple[str, str]:
    # A cluster point's attempt opened a placeholder run (start_point_attempt): the results take
    # over its point, attempt and node tags, and replace it once logged.
    attempt_run = os.environ.get(ATTEMPT_RUN_VARIABLE)
    try:
        if attempt_run:
            placeholder = client.get_run(attempt_run).data.tags
            tags = tags | {key: placeholder[key] for key in ATTEMPT_TAGS if key in placeholder}
        existing = client.search_runs(
            [experiment_id], f"tags.content_hash = '{tags['content_hash']}' and attributes.status = 'FINISHED'", max_results=1
        )
        if existing:
            run_id = existing[0].info.run_id
            if attempt_run:
                client.delete_run(attempt_run)
            print(f"track: these results are already MLflow run {run_id}; not logging a duplicate")
            return run_id, uri
        run_id = client.create_run(experiment_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id
        try:
            client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params.items()])
            for start in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[start : start + 900])
            for path in artifacts:
                folder = path.parent.as_posix()
                client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)
        except BaseException:
            client.set_terminated(run_id, "FAILED")  # never passes for a complete record
            raise
        client.set_terminated(run_id)
        if attempt_run:
            client.delete_run(attempt_run)
        print(f"track: logged MLflow run {run_id} in experiment {EXPERIMENT!r} at {uri}")
        return run_id, uri
    except mlflow.exceptions.MlflowException as err:
        raise StoreError(f"MLflow store {uri} failed: {str(err).splitlines()[0]}") from err


# Cluster points (sweeps/cluster.py): one run per attempt, opened before the pipeline runs.

ATTEMPT_RUN_VARIABLE = "SDA_MLFLOW_RUN_ID"
ATTEMPT_TAGS = ("point_id", "attempt", "node")


def start_point_attempt(point_id: str, node: str) -> tuple[str, int]:
    """(run id, attempt number) of a new attempt at a cluster point: a RUNNING placeholder run
    tagged with the point, the attempt and the node, which the pipeline's track stage replaces with
    the results' run, tagged the same (its id in $SDA_MLFLOW_RUN_ID). An earlier attempt's
    placeholder still RUNNING died with its node: it is marked FAILED first, so that a point has at
    most one live run and a record of each attempt that died."""
    client, experiment_id, uri = open_store()
    try:
        earlier = client.search_runs([experiment_id], f"tags.point_id = '{point_id}'", max_results=1000)
        for stale in earlier:
            if stale.info.status == "RUNNING":
                client.set_terminated(stale.info.run_id, "FAILED")
        attempt = 1 + max((int(r.data.tags.get("attempt", "0")) for r in earlier), default=0)
        run_id = client.create_run(experiment_id, run_name=f"{point_id} (attempt {attempt})",
                                   tags={"point_id": point_id, "attempt": str(attempt), "node": node}).info.run_id
        return run_id, attempt
    except mlflow.exceptions.MlflowException as err:
        raise StoreError(f"MLflow store {uri} failed: {str(err).splitlines()[0]}") from err


def fail_point_attempt(run_id: str) -> None:
    """Mark an attempt's run FAILED, unless its pipeline's track stage completed it."""
    client, _, _ = open_store()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    try:
        run_id, uri = log_pipeline_run(args.params)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    save_json(RUN_RECORD, {"run_id": run_id, "experiment": EXPERIMENT, "tracking_uri": uri})


# Sweeps (sweeps/grid.py): find each point's run, group the runs, log the sweep's report.


def finished_runs(client: mlflow.MlflowClient, experiment_id: str) -> list:
    """Every complete pipeline run of the experiment, newest first (sweep reports excluded)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += [found for found in page if found.data.tags.get("kind") != "sweep-report"]
        token = page.token
        if not token:
            return runs


def find_point_run(runs: list, expected: dict[str, object], in_scope: Callable[[str], bool] = lambda key: True):
    """The newest run whose params equal ``expected`` (numbers compared as numbers), or None.

    Equal means no other param either, among those ``in_scope`` selects (all by default): a run
    with a key the point lacks, such as an emphasis, is another point."""

    def same(logged: str | None, wanted) -> bool:
        if logged is None:
            return False
        if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
            try:
                return float(logged) == float(wanted)
            except ValueError:
                return False
        return logged == str(wanted)

    for candidate in runs:
        if ({k for k in candidate.data.params if in_scope(k)} == set(expected)
                and all(same(candidate.data.params.get(k), v) for k, v in expected.items())):
            return candidate
    return None


def mark_restored(points: list[dict]) -> None:
    """Set each point's ``restored``: whether a finished run of its params is in the store already.
    Opens (creates) the store first, so that it exists before any worker writes to it."""
    client, experiment_id, _ = open_store()
    runs = finished_runs(client, experiment_id)
    for point in points:
        point["restored"] = find_point_run(runs, point["params"]) is not None


def finished_point_runs(points: list[dict], failed: dict[str, str]) -> dict[str, object]:
    """{experiment name: newest finished run of its params} for the points not in ``failed``; a
    point that ran without failing but has no such run is added to ``failed``, saying so."""
    client, experiment_id, uri = open_store()
    runs = finished_runs(client, experiment_id)  # a re-run of an unchanged point finds the earlier run: no duplicate
    found = {}
    for point in points:
        name = point["experiment"]
        if name in failed:
            continue
        if (run := find_point_run(runs, point["params"])) is None:
            failed[name] = f"the point ran but no finished MLflow run with its params is in {uri}"
        else:
            found[name] = run
    return found


def log_sweep(sweep_id: str, point_runs: dict[str, str], report_dir: Path, tags: dict[str, str]) -> str:
    """One parent run holding the sweep's report; the point runs become its children.

    A sweep run again under its id (to finish an interrupted one) updates its parent run in place.
    """
    client, experiment_id, _ = open_store()
    tags = {"kind": "sweep-report", "sweep_id": sweep_id, **tags}
    earlier = client.search_runs([experiment_id], f"tags.kind = 'sweep-report' and tags.sweep_id = '{sweep_id}'", max_results=1)
    if earlier:
        parent = earlier[0].info.run_id
        for key, value in tags.items():
            client.set_tag(parent, key, value)
    else:
        parent = client.create_run(experiment_id, run_name=f"sweep {sweep_id}", tags=tags).info.run_id
    for path in sorted(report_dir.iterdir()):
        client.log_artifact(parent, str(path), artifact_path="report")
    for exp_name, run_id in point_runs.items():
        client.set_tag(run_id, "sweep_id", sweep_id)
        client.set_tag(run_id, "mlflow.parentRunId", parent)
        client.set_tag(run_id, "sweep_point", exp_name)
    client.set_terminated(parent)
    return parent


def download_artifact(run_id: str, path: str, destination: Path) -> Path:
    client, _, _ = open_store()
    return Path(client.download_artifacts(run_id, path, str(destination)))


if __name__ == "__main__":
    run(main)
