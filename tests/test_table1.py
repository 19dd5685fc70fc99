"""The Table 1 command: its grid, selection and verdicts, and a real interrupted-and-resumed run."""

import json
import shutil
import sys

import mlflow
import pytest
import yaml

from sda.generators import BENCHMARKS
from stages.params import ParamsError
from sweeps.dvc_queue import SweepError
from sweeps.grid import check_disk, parse_set as parse_any_set
from sweeps.table1 import (
    DATASET_GRID,
    GRID,
    GRID_OPTIONS,
    PAPER,
    edges,
    grid_points,
    is_grid_key,
    points_past_edges,
    round_points,
    select,
    summarise,
    verdict,
)
from tests.conftest import ROOT, interrupt_after_the_first_finished_point, processes_of_this_test_in


def parse_set(pairs):
    return parse_any_set(pairs, is_grid_key, GRID_OPTIONS)


def test_every_benchmark_has_the_papers_numbers():
    assert set(PAPER) == set(BENCHMARKS)
    assert PAPER["rect"]["SdA-3"] == (1.99, 0.12) and PAPER["convex"]["SAA-3"] == (18.41, 0.34)


def test_the_grid_crosses_nu_with_the_epochs_and_rates_and_a_dataset_may_extend_it():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    points = grid_points(raw, ["mnist-rot", "mnist-basic", "rect"], [0.1, 0.25, 0.4],
                         {"pretrain_epochs": None, "pretrain_lr": None, "finetune_lr": None})
    by_dataset = {d: [p for p in points if p["dataset"] == d] for d in ("mnist-rot", "mnist-basic", "rect")}
    for dataset, mine in by_dataset.items():
        axes = {**GRID, **{k: v for k, v in DATASET_GRID[dataset].items() if k in GRID}}
        assert len(mine) == 4 * len(axes["pretrain_epochs"]) * len(axes["pretrain_lr"]) * len(axes["finetune_lr"])
        assert {p["pretrain_epochs"] for p in mine} == set(axes["pretrain_epochs"])
    assert len({p["label"] for p in points}) == len(points)
    assert {p["nu"] for p in by_dataset["mnist-rot"]} == {0.0, 0.1, 0.25, 0.4}
    assert {p["params"]["pretrain.layer3.epochs"] for p in by_dataset["rect"]} == set(DATASET_GRID["rect"]["pretrain_epochs"])
    assert {p["params"]["finetune.max_epochs"] for p in by_dataset["rect"]} == {DATASET_GRID["rect"]["finetune.max_epochs"]}
    for point in by_dataset["mnist-basic"]:  # every layer gets the point's nu, epochs and rate; the first fine-tuning rate runs first
        assert {point["params"][f"pretrain.layer{i}.corruption"] for i in (1, 2, 3)} == {point["nu"]}
        assert point["params"]["finetune.lr"] == point["finetune_lr"]
        assert point["phase"] == DATASET_GRID["mnist-basic"]["finetune_lr"].index(point["finetune_lr"])


def test_set_applies_to_every_point_and_refuses_the_grids_own_keys():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    axes = {"pretrain_epochs": [15], "pretrain_lr": None, "finetune_lr": [2.0]}
    points = grid_points(raw, ["mnist-bg-rand", "rect"], [0.4], axes, parse_set(["finetune.max_epochs=100", "pretrain.layer2.units=500"]))
    assert {(p["params"]["finetune.max_epochs"], p["params"]["pretrain.layer2.units"]) for p in points} == {(100, 500)}
    for bad, message in [("pretrain.layer1.epochs=3", "set by the grid"), ("finetune.lr=1", "set by the grid"), ("max_epochs", "KEY=VALUE")]:
        with pytest.raises(ParamsError, match=message):
            parse_set([bad])
    with pytest.raises(ParamsError, match=r"finetune.max_epochz: not in params.yaml; add it with \+\+finetune.max_epochz"):
        grid_points(raw, ["rect"], [0.4], axes, parse_set(["finetune.max_epochz=1"]))
    with pytest.raises(ParamsError, match="finetune.max_epochz: unknown key"):
        grid_points(raw, ["rect"], [0.4], axes, parse_set(["++finetune.max_epochz=1"]))
    with pytest.raises(ParamsError, match="set by the grid"):  # DVC's prefixes do not get a grid key past the check
        parse_set(["++finetune.lr=1"])


def test_a_table_that_would_fill_the_disk_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh, empty MLflow store: every configuration is still to train
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    points = grid_points(raw, ["mnist-basic"], [0.1, 0.25, 0.4], {"pretrain_epochs": None, "pretrain_lr": None, "finetune_lr": None})
    configurations = 4 * len(DATASET_GRID["mnist-basic"]["pretrain_epochs"])  # the fine-tuning rates share them
    gigabytes = configurations * 62_000 * 3_000 * 4 / 1e9  # 62,000 examples' codes of 3 x 1000 units in float32
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=int((gigabytes + 1) * 1e9)))
    check_disk(points, spare_gb=0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=int((gigabytes - 1) * 1e9)))
    with pytest.raises(SweepError, match=rf"about {gigabytes:.0f} GB to DVC's cache \({configurations} pretraining configurations.*dvc gc"):
        check_disk(points, spare_gb=0)


def test_selection_uses_the_validation_error_only():
    rows = [{"nu": nu, "valid_error": valid, "test_error": test, "pretrain_epochs": 15, "pretrain_lr": 0.1, "finetune_lr": 2.0}
            for nu, valid, test in [(0.0, 0.05, 0.01), (0.0, 0.04, 0.09), (0.1, 0.03, 0.20), (0.25, 0.02, 0.30), (0.4, 0.02, 0.10)]]
    assert select(rows, baseline=True)["valid_error"] == 0.04
    assert select(rows, baseline=False)["nu"] == 0.25  # a tie on validation goes to the smaller nu, whatever the test error
    assert select([r for r in rows if r["nu"] > 0], baseline=True) is None


def test_a_selection_that_is_the_last_value_tried_on_an_axis_gets_the_next_value_past_it():
    def point(nu, epochs, pretrain_lr, finetune_lr, valid):
        return {"dataset": "rect", "nu": nu, "pretrain_epochs": epochs, "pretrain_lr": pretrain_lr, "finetune_lr": finetune_lr,
                "valid_error": valid, "test_error": valid, "test_error_ci95": 0.01}

    rows = [point(0.0, 15, 0.1, 2.0, 0.05), point(0.0, 50, 0.1, 2.0, 0.04),  # SAA-3: 50 epochs, the largest tried
            point(0.0, 50, 0.03, 2.0, 0.06), point(0.0, 150, 0.03, 2.0, 0.01),  # off SAA-3's lines: no bearing on its edges
            point(0.1, 15, 0.1, 4.0, 0.02), point(0.1, 15, 0.1, 2.0, 0.03), point(0.1, 5, 0.1, 4.0, 0.03)]  # SdA-3: rate 4, the top
    failed = [{k: v for k, v in point(0.0, 50, 0.1, 4.0, None).items() if "error" not in k}]  # diverged: tried, not selectable
    summary = summarise("rect", rows[:2] + rows[4:])
    assert (summary["saa3"]["pretrain_epochs"], summary["sda3"]["finetune_lr"]) == (50, 4.0)
    tried = [*rows, *failed]
    saa = edges(summary["saa3"], tried)
    assert saa["pretrain_epochs"] == {"value": 50, "tried": [15, 50], "past": {"up": 150}}  # rect's own epochs ladder
    assert saa["pretrain_lr"] == {"value": 0.1, "tried": [0.03, 0.1], "past": {"up": 0.3}}
    assert saa["finetune_lr"] == {"value": 2.0, "tried": [2.0, 4.0], "past": {"down": 1.0}}  # 4.0 diverged, yet was tried
    assert edges(summary["sda3"], tried)["finetune_lr"]["past"] == {"up": None}  # 4.0 (0.2 per example) ends the JMLR range
    wanted = {(c["nu"], c["pretrain_epochs"], c["pretrain_lr"], c["finetune_lr"]): c["why"] for c in points_past_edges([summary], tried)}
    assert wanted == {(0.0, 150, 0.1, 2.0): "SAA-3 past pretrain_epochs 50", (0.0, 50, 0.3, 2.0): "SAA-3 past pretrain_lr 0.1",
                      (0.0, 50, 0.1, 1.0): "SAA-3 past finetune_lr 2", (0.1, 15, 0.3, 4.0): "SdA-3 past pretrain_lr 0.1",
                      (0.1, 15, 0.03, 4.0): "SdA-3 past pretrain_lr 0.1", (0.1, 50, 0.1, 4.0): "SdA-3 past pretrain_epochs 15"}


def test_a_rounds_points_that_share_their_layers_run_in_phases_so_the_layers_train_once():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def point(nu, epochs, finetune_lr, valid):
        return {"dataset": "convex", "nu": nu, "pretrain_epochs": epochs, "pretrain_lr": 0.1, "finetune_lr": finetune_lr,
                "valid_error": valid, "test_error": valid, "test_error_ci95": 0.01}

    rows = [point(0.0, 15, 2.0, 0.2), point(0.0, 5, 2.0, 0.3), point(0.1, 15, 2.0, 0.1)]  # each rate the only one tried
    summary = summarise("convex", rows)
    new = round_points(raw, points_past_edges([summary], rows), {"convex": {}}, 1)
    phases = {}
    for p in new:
        phases.setdefault((p["nu"], p["pretrain_epochs"], p["pretrain_lr"]), {})[p["finetune_lr"]] = p["phase"]
    # Fine-tuning 1 and 4 around each selection share its layers: one trains them, the other restores them.
    for selected in ((0.0, 15, 0.1), (0.1, 15, 0.1)):
        assert sorted(phases.pop(selected).items(), key=lambda item: item[1]) in ([(1.0, 0), (4.0, 1)], [(4.0, 0), (1.0, 1)])
    assert phases and all(by_rate == {2.0: 0} for by_rate in phases.values())  # the other axes' points train their own layers
    assert {p["round"] for p in new} == {1} and all(p["params"]["finetune.lr"] == p["finetune_lr"] for p in new)


@pytest.mark.parametrize("ours, expected", [((2.80, 0.14), "inside"), ((2.94, 0.1), "inside"), ((2.95, 0.1), "worse"),
                                            ((2.60, 0.1), "better")])
def test_the_verdict_places_our_error_against_the_papers_interval(ours, expected):
    assert verdict(ours, (2.80, 0.14)) == expected


@pytest.mark.slow
@pytest.mark.timeout(540)  # eleven experiments and an interruption: over 300 s on 2 busy cores
def test_the_table_resumes_after_an_interruption_without_retraining_a_finished_point(pipeline_repo):
    """Fine-tuning rate 0.5 runs first and trains the layers; at 1000 fine-tuning diverges: those points fail, listed.
    0.5 is then the lowest rate tried where both selections sit: a round past that edge runs 0.25 for each."""
    repo = pipeline_repo
    command = [sys.executable, "-m", "sweeps.table1", "--datasets", "digits", "--nu", "0.25", "--pretrain-epochs", "3",
               "--pretrain-lr", "0.1", "--finetune-lr", "0.5", "1000", "--past-edges", "finetune_lr", "--rounds", "1", "--jobs", "1", "--id", "t"]
    interrupt_after_the_first_finished_point(repo, command)
    client = mlflow.MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sda-pipeline").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'FINISHED'")}
    assert 1 <= len(before) <= 2  # the second point of the first rate may finish before the signal lands

    # Where it stands, running nothing: the finished points' errors, the rest listed as not finished.
    preview = repo.run(*command, "--report-only")
    # The grid's points without a run (the one the interrupt killed, if any, is failed), and the
    # rate past 0.5 for each finished point at 0.5: 4 either way.
    state = json.loads((repo.path / "reports/table1/t/table1.json").read_text())
    assert len(state["not_finished"]) + len(state["failed"]) == 4 and len(state["points"]) == len(before)
    assert f"{len(state['not_finished'])} points have no finished run yet" in preview.stdout
    assert "report: reports/table1/t/ (not logged to MLflow: --report-only)" in preview.stdout
    assert {r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'FINISHED'")} == before  # nothing ran

    done = repo.run(*command)
    assert f"{len(before)} of 4 points have a finished MLflow run already; running {4 - len(before)}" in done.stdout
    runs = [r for r in client.search_runs([experiment], "attributes.status = 'FINISHED'") if r.data.tags.get("kind") != "sweep-report"]
    assert len(runs) == 4 and before <= {r.info.run_id for r in runs}  # nothing re-trained, nothing duplicated
    assert {(r.data.params["pretrain.layer1.corruption"], r.data.params["finetune.lr"]) for r in runs} == {
        ("0.0", "0.5"), ("0.25", "0.5"), ("0.0", "0.25"), ("0.25", "0.25")}
    # The second fine-tuning rate's points, and those past the edge, restored the layers the first one's trained.
    assert "past the edges, round 1: 2 points" in done.stdout
    for nu in ("0", "0p25"):
        log = repo.run("dvc", "queue", "logs", f"t-digits-nu{nu}-e3-plr0p1-flr1000").stdout
        assert "Stage 'pretrain@layer3' is cached - skipping run" in log and "training diverged (lr=1000)" in log
        log = repo.run("dvc", "queue", "logs", f"t-digits-nu{nu}-e3-plr0p1-flr0p25").stdout
        assert "Stage 'pretrain@layer3' is cached - skipping run" in log and "Running stage 'finetune'" in log
    assert "2 points failed (listed in the report); running the command again retries those that did not diverge" in done.stdout
    report = json.loads((repo.path / "reports/table1/t/table1.json").read_text())
    assert [s["dataset"] for s in report["datasets"]] == ["digits"]
    assert report["datasets"][0]["sda3"]["nu"] == 0.25 and report["datasets"][0]["saa3"]["nu"] == 0
    assert sum(not p["restored"] for p in report["points"]) == 4 - len(before)
    assert sorted(p["past_edge"] or "" for p in report["points"]) == ["", "", "SAA-3 past finetune_lr 0.5", "SdA-3 past finetune_lr 0.5"]
    assert report["past_edges"] == {"axes": ["finetune_lr"], "rounds": 1}
    assert sorted(f["experiment"] for f in report["failed"]) == ["t-digits-nu0-e3-plr0p1-flr1000", "t-digits-nu0p25-e3-plr0p1-flr1000"]
    assert all("training diverged" in f["why"] for f in report["failed"])
    parents = client.search_runs([experiment], "tags.kind = 'sweep-report'")
    assert len(parents) == 1 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
                                     for r in client.search_runs([experiment], "tags.sweep_id = 't'")
                                     if r.data.tags.get("kind") != "sweep-report")

    # Once more: the diverged points are not run again, only listed; --retry-diverged runs them (they
    # fail again); the parent run is updated, not doubled.
    again = repo.run(*command)
    assert "2 points diverged when last run here; not run again (--retry-diverged runs them)" in again.stdout
    assert "2 of 2 points have a finished MLflow run already; running 0" in again.stdout and "points done" not in again.stdout
    report = json.loads((repo.path / "reports/table1/t/table1.json").read_text())
    assert sorted(f["experiment"] for f in report["failed"]) == ["t-digits-nu0-e3-plr0p1-flr1000", "t-digits-nu0p25-e3-plr0p1-flr1000"]
    again = repo.run(*command, "--retry-diverged")
    assert "2 of 4 points have a finished MLflow run already; running 2" in again.stdout
    assert "0 points done, 2 failed" in again.stdout
    assert "2 of 2 points have a finished MLflow run already; running 0" in again.stdout
    assert [r.info.run_id for r in client.search_runs([experiment], "tags.kind = 'sweep-report'")] == [parents[0].info.run_id]
    assert processes_of_this_test_in(repo.path) == []
