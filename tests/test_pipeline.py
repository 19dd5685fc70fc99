"""The real dvc and the real MLflow (sqlite) on a tiny digits config in a temporary git repo."""

import json
from importlib.metadata import version

import mlflow
import pytest
import torch

pytestmark = pytest.mark.slow

ALL_STAGES = ["prepare", "pretrain@layer1", "pretrain@layer2", "pretrain@layer3", "finetune", "evaluate", "track"]


def finished_runs(repo):
    client = mlflow.MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sda-pipeline")
    return client, client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")


IDENTICAL = ("metrics/evaluate.json", "plots/finetune.csv", "plots/pretrain/layer2.csv", "models/pretrain/layer2/weights.pt",
             "data/codes/layer2/train.npz", "models/finetuned/weights.pt")


@pytest.mark.timeout(480)  # eight runs of the pipeline, two of them whole: over 300 s on 2 busy cores
def test_repro_runs_all_then_nothing_then_only_what_a_param_change_touches(pipeline_repo):
    repo = pipeline_repo
    assert repo.repro() == ALL_STAGES
    assert repo.repro() == []

    # Same params and seed: every stage run again from scratch gives the same bytes, and the
    # identical result is not logged to MLflow twice.
    first = {p: (repo.path / p).read_bytes() for p in IDENTICAL}
    repo.repro("--force", "--no-run-cache")
    assert {p: (repo.path / p).read_bytes() for p in first} == first
    assert len(finished_runs(repo)[1]) == 1

    params = repo.params()
    params["pretrain"]["layer3"]["corruption"] = 0.45
    repo.write_params(params)
    assert repo.repro() == ["pretrain@layer3", "finetune", "evaluate", "track"]
    assert repo.repro() == []

    metrics = json.loads((repo.path / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["test_error"] < 0.9 and metrics["test_examples"] == 400
    assert metrics["test_error_ci95"] == pytest.approx(1.96 * (metrics["test_error"] * (1 - metrics["test_error"]) / 400) ** 0.5)
    shown = repo.run("dvc", "metrics", "show", "--json").stdout
    assert "test_error" in shown and "layer3_train_loss" in shown
    plots = repo.run("dvc", "plots", "show")
    assert "failed to load" not in plots.stdout + plots.stderr
    html = (repo.path / "dvc_plots/index.html").read_text()
    assert "reconstruction loss of layer3" in html and "fine-tuning error" in html
    assert "filters.png" in html and "gallery_train.png" in html

    client, runs = finished_runs(repo)
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.params["pretrain.layer3.corruption"] == "0.45"
    assert latest.data.metrics["test_error"] == metrics["test_error"]
    assert latest.data.tags["dataset"] == "digits"
    assert latest.data.tags["mlflow.runName"] == "digits nu 0.1/0.2/0.45 seed 1234"
    assert_records_what_computed_it(repo, latest)
    assert len(client.get_metric_history(latest.info.run_id, "pretrain.layer1.epoch.loss")) == 3
    assert len(client.get_metric_history(latest.info.run_id, "finetune.epoch.valid_error")) >= 3
    artifacts = {a.path for a in client.list_artifacts(latest.info.run_id, "models/pretrain/layer1")}
    assert artifacts == {"models/pretrain/layer1/filters.png"}
    assert (repo.path / "mlartifacts").is_dir()

    # A code edit that changes no result re-runs the stages that run that code; fine-tuning, whose
    # inputs (the pretrained weights) come out byte-identical, is skipped.
    noise = repo.path / "sda/noise.py"
    noise.write_text(noise.read_text() + "\n# an edit that changes no result\n")
    assert repo.repro() == ["pretrain@layer1", "pretrain@layer2", "pretrain@layer3", "evaluate", "track"]

    # The engine is a param of every training stage: switching it retrains them all, and the run says so.
    params["engine"] = "autograd"
    repo.write_params(params)
    assert repo.repro() == ["pretrain@layer1", "pretrain@layer2", "pretrain@layer3", "finetune", "evaluate", "track"]
    _, runs = finished_runs(repo)
    assert runs[0].data.tags["engine"] == "autograd" and runs[0].data.tags["git_dirty"] == "true"  # the sda/noise.py edit
    assert runs[0].data.tags["mlflow.runName"] == "digits nu 0.1/0.2/0.45 seed 1234 autograd"

    # Switching one layer's noise kind (JMLR 2010) re-runs that layer onward only.
    layer3 = params["pretrain"]["layer3"]
    del layer3["corruption"], layer3["masking"]
    layer3.update(noise="gaussian", sigma=0.3)
    repo.write_params(params)
    assert repo.repro() == ["pretrain@layer3", "finetune", "evaluate", "track"]
    assert finished_runs(repo)[1][0].data.tags["mlflow.runName"] == "digits nu 0.1/0.2/sigma 0.3 seed 1234 autograd"


def assert_records_what_computed_it(repo, run) -> None:
    tags = run.data.tags
    assert tags["engine"] == "fused" and tags["device"] == "cpu" and tags["threads"] == "1"
    assert tags["products"] in ("oneDNN", "torch's BLAS") and tags["cpu"] and tags["os"]
    assert tags["denormals"] == "flushed to zero"  # x86 and arm64 CPUs can
    assert " -O3 " in tags["c_kernels"] or tags["c_kernels"].startswith("none: ")  # the build command, or why none
    assert tags["torch_version"] == torch.__version__ and tags["mlflow_version"] == mlflow.__version__
    assert tags["dvc_version"] == version("dvc") and tags["numpy_version"] and tags["python_version"]
    assert tags["git_commit"] == repo.run("git", "rev-parse", "HEAD").stdout.strip() and tags["git_dirty"] == "false"
    record = json.loads((repo.path / "metrics/computed_by/pretrain@layer2.json").read_text())
    assert record["engine"] == "fused" and record["torch_version"] == torch.__version__
    assert "engine" not in json.loads((repo.path / "metrics/computed_by/evaluate.json").read_text())

