"""Corruption sweeps through real DVC experiments and parallel queue workers into real MLflow."""

import json
import sqlite3
import sys

import mlflow
import pytest

from sweeps.dvc_queue import repo_processes

pytestmark = pytest.mark.slow


def point_runs(repo):
    client = mlflow.MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sda-pipeline")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    return client, [r for r in runs if r.data.tags.get("kind") != "sweep-report"]


def ablate(repo, *args):
    return repo.run(sys.executable, "-m", "sweeps.ablate", *args)


def test_a_two_point_sweep_with_two_workers(pipeline_repo):
    repo = pipeline_repo
    assert not (repo.path / "mlflow.db").exists()
    done = ablate(repo, "--nu", "0", "0.5", "--layers", "layer3", "--jobs", "2", "--sweep-id", "s1")
    assert "2 workers x 1 torch threads" in done.stdout
    assert repo_processes(repo.path) == []  # no queue worker outlives the sweep
    status = repo.run("dvc", "queue", "status").stdout
    assert "Worker status: 0 active, 0 idle" in status, status

    client, runs = point_runs(repo)
    assert sorted(float(r.data.params["pretrain.layer3.corruption"]) for r in runs) == [0.0, 0.5]
    for run in runs:
        tags = run.data.tags
        assert tags["sweep_id"] == "s1" and tags["dataset"] == "digits"
        assert tags["dvc_experiment"].startswith("s1-nu")
        assert tags["git_commit"] == repo.run("git", "rev-parse", "HEAD").stdout.strip()
        assert {"dvc_stage.prepare", "dvc_stage.pretrain@layer1", "dvc_stage.finetune", "dvc_stage.evaluate"} <= set(tags)
        assert 0 <= run.data.metrics["test_error"] < 1 and "test_error_ci95" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "models/pretrain/layer1")] == ["models/pretrain/layer1/filters.png"]
    # Layers 1-2 were trained once and restored from DVC's run-cache in every point: the same
    # recorded training time (a retrained layer would record its own) and the same stage hash.
    for layer in ("layer1", "layer2"):
        assert len({r.data.metrics[f"pretrain.{layer}.seconds"] for r in runs}) == 1
        assert len({r.data.tags[f"dvc_stage.pretrain@{layer}"] for r in runs}) == 1
    assert len({r.data.tags["dvc_stage.pretrain@layer3"] for r in runs}) == 2
    for name in ("s1-nu0", "s1-nu0p5"):
        log = repo.run("dvc", "queue", "logs", name).stdout
        assert "Stage 'pretrain@layer1' is cached - skipping run" in log
        assert "Running stage 'pretrain@layer3'" in log and "on cpu (1 thread, float32 products by " in log

    report = repo.path / "reports/sweeps/s1"
    table = json.loads((report / "table.json").read_text())
    assert [row["nu"] for row in table] == [0.0, 0.5]
    assert (report / "test_error_vs_nu.png").read_bytes()[:4] == b"\x89PNG"
    assert not (report / "filters_by_nu.png").exists()  # layer1 was not swept: its filters do not vary
    shown = repo.run("dvc", "exp", "show", "--json").stdout
    assert "s1-nu0p5" in shown

    # The same sweep again: every point is found in the store, nothing runs and no run is duplicated.
    again = ablate(repo, "--nu", "0", "0.5", "--layers", "layer3", "--jobs", "2", "--sweep-id", "s2")
    assert "2 of 2 points have a finished MLflow run already; running 0" in again.stdout
    assert "dvc exp run" not in again.stdout
    _, again = point_runs(repo)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    assert {r.data.tags["sweep_id"] for r in again} == {"s2"}


def test_sweeping_the_first_layer_draws_the_filter_figure_from_one_initialisation(pipeline_repo):
    """Two of the figure's three levels: a panel per level the sweep has."""
    repo = pipeline_repo
    ablate(repo, "--nu", "0", "0.5", "--layers", "layer1", "--jobs", "2", "--sweep-id", "f1")
    report = repo.path / "reports/sweeps/f1"
    assert (report / "filters_by_nu.txt").read_text().strip() == "panels, left to right: nu = 0, 0.5"
    assert (report / "filters_by_nu.png").read_bytes()[:4] == b"\x89PNG"


def test_two_workers_and_no_store_beforehand_lose_and_duplicate_nothing(pipeline_repo):
    """Plain DVC, without the sweep command creating the store first: track's lock must hold. Two
    points on two workers run side by side, so both create the store at about the same time."""
    repo = pipeline_repo
    for nu in ("0.05", "0.45"):
        repo.run("dvc", "exp", "run", "--queue", "-S", f"pretrain.layer2.corruption={nu}")
    assert not (repo.path / "mlflow.db").exists()
    repo.run("dvc", "exp", "run", "--run-all", "--jobs", "2")
    _, runs = point_runs(repo)
    assert sorted(r.data.params["pretrain.layer2.corruption"] for r in runs) == ["0.05", "0.45"]
    with sqlite3.connect(repo.path / "mlflow.db") as db:
        assert db.execute("pragma integrity_check").fetchall() == [("ok",)]


def test_uncommitted_changes_are_refused_before_anything_runs(pipeline_repo):
    repo = pipeline_repo
    (repo.path / "stages" / "pretrain.py").write_text((repo.path / "stages" / "pretrain.py").read_text() + "\n# edit\n")
    done = repo.run(sys.executable, "-m", "sweeps.ablate", "--nu", "0", "0.1", check=False)
    assert done.returncode == 1
    assert "commit these first" in done.stderr and "stages/pretrain.py" in done.stderr
    assert not (repo.path / "mlflow.db").exists()


def test_bad_sweep_arguments_name_the_option(pipeline_repo):
    repo = pipeline_repo
    done = repo.run(sys.executable, "-m", "sweeps.ablate", "--nu", "0", "1.2", check=False)
    assert done.returncode == 2 and "error: --nu 1.2: pretrain.layer1.corruption: must be a number in [0, 1)" in done.stderr
    done = repo.run(sys.executable, "-m", "sweeps.ablate", "--layers", "layer7", check=False)
    assert done.returncode == 2 and "error: --layers: 'layer7' is not a layer" in done.stderr
    for option, value in (("--jobs", "0"), ("--threads", "-1")):
        done = repo.run(sys.executable, "-m", "sweeps.ablate", option, value, check=False)
        assert done.returncode == 2 and f"error: {option}: must be an integer >= 1, got {value}" in done.stderr
