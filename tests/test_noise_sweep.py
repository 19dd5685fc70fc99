"""The noise comparison command: its grid, and a real interrupted-and-resumed run over noise kinds."""

import json
import re
import sys
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from stages.params import ParamsError
from stages.track import find_point_run, flatten
from sweeps.dvc_queue import set_args
from sweeps.grid import apply_overrides, is_pretraining_key, parse_set
from sweeps.noise import LEVELS, grid_points, is_grid_key
from tests.conftest import ROOT, interrupt_after_the_first_finished_point


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_grid_is_no_noise_then_each_kind_at_its_levels_masking_and_salt_pepper_also_emphasised():
    points = grid_points(default_raw(), ["mnist", "mnist-rot"], LEVELS, (1.0, 0.5), {})
    assert len(points) == 2 * (1 + 3 * 2 + 3 * 2 + 3) and len({p["label"] for p in points}) == len(points)
    for point in points:
        params = point["params"]
        assert params["engine"] == "autograd"
        for layer in ("layer1", "layer2", "layer3"):  # every layer the same noise, level and loss
            key = f"pretrain.{layer}"
            if point["kind"] == "gaussian":
                assert params[f"{key}.noise"] == "gaussian" and params[f"{key}.sigma"] == point["level"]
                assert f"{key}.corruption" not in params and f"{key}.masking" not in params
            else:
                assert params[f"{key}.noise"] == ("masking" if point["kind"] == "none" else point["kind"])
                assert params[f"{key}.corruption"] == point["level"] and params[f"{key}.masking"] == "fixed"
            emphasised = (params.get(f"{key}.emphasis.alpha"), params.get(f"{key}.emphasis.beta"))
            assert emphasised == (point["emphasis"] or (None, None))
    assert {p["level"] for p in points if p["kind"] == "none"} == {0.0}
    assert not any(p["emphasis"] for p in points if p["kind"] in ("gaussian", "none"))


def test_the_overrides_are_dvcs_set_arguments_adding_and_removing_keys():
    gaussian = next(p for p in grid_points(default_raw(), ["mnist"], {"gaussian": [0.3]}, None, {}) if p["kind"] == "gaussian")
    args = set_args(gaussian["overrides"])
    assert "++pretrain.layer2.sigma=0.3" in args and "~pretrain.layer2.corruption" in args and "~pretrain.layer2.masking" in args
    emphasised = grid_points(default_raw(), ["mnist"], {"salt_pepper": [0.25]}, (1.0, 0.5), {})[-1]
    assert "++pretrain.layer1.emphasis={alpha:1.0,beta:0.5}" in set_args(emphasised["overrides"])


def test_dvc_applies_the_overrides_as_the_sweep_checked_them(tmp_path):
    """The sweep checks each point's params before queueing it; DVC's own -S must give the same file."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    raw = default_raw()
    points = grid_points(raw, ["mnist"], {"gaussian": [0.3], "salt_pepper": [0.25]}, (1.0, 0.5), {"finetune.max_epochs": 5})
    for point in points:
        path = tmp_path / f"{point['label']}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        dvc_apply_overrides(path, set_args(point["overrides"])[1::2])
        assert flatten(yaml.safe_load(path.read_text())) == point["params"], point["label"]


def test_the_overrides_follow_dvcs_rules_for_adding_and_removing_keys():
    raw = default_raw()
    assert apply_overrides(raw, {"++pretrain.layer1.noise": "salt_pepper", "engine": "autograd"})["pretrain"]["layer1"]["noise"] == "salt_pepper"
    for overrides, message in [({"pretrain.layer1.noise": "salt_pepper"}, r"pretrain.layer1.noise: not in params.yaml; add it with \+\+"),
                               ({"~pretrain.layer1.sigma": None}, "pretrain.layer1.sigma: not in params.yaml, so it cannot be removed"),
                               ({"+pretrain.layer1.corruption": 0.2}, "pretrain.layer1.corruption: already in params.yaml"),
                               ({"pretrain.layer9.units": 5}, "pretrain.layer9: not in params.yaml")]:
        with pytest.raises(ParamsError, match=message):
            apply_overrides(raw, overrides)


def test_a_plain_point_is_not_mistaken_for_its_emphasised_twin():
    """A finished run counts for a point only with exactly the point's params: one more key (an
    emphasis) makes it another point's run."""
    plain, emphasised = (p for p in grid_points(default_raw(), ["mnist"], {"masking": [0.25]}, (1.0, 0.5), {}) if p["level"] == 0.25)
    run_of = {name: SimpleNamespace(data=SimpleNamespace(params={k: str(v) for k, v in point["params"].items()}), name=name)
              for name, point in (("plain", plain), ("emphasised", emphasised))}
    newest_first = [run_of["emphasised"], run_of["plain"]]
    assert find_point_run(newest_first, plain["params"]).name == "plain"
    assert find_point_run(newest_first, emphasised["params"]).name == "emphasised"
    assert find_point_run([run_of["emphasised"]], plain["params"]) is None
    pretraining = {k: v for k, v in plain["params"].items() if is_pretraining_key(k)}
    assert find_point_run([run_of["emphasised"]], pretraining, in_scope=is_pretraining_key) is None
    assert find_point_run(newest_first, pretraining, in_scope=is_pretraining_key).name == "plain"


def test_set_refuses_the_noise_keys_and_a_bad_level_names_its_point():
    assert parse_set(["finetune.max_epochs=5"], is_grid_key, "the grid") == {"finetune.max_epochs": 5}
    for key in ("pretrain.layer1.sigma", "pretrain.layer3.emphasis", "engine", "data.dataset", "++engine"):
        with pytest.raises(ParamsError, match=f"--set: {re.escape(key)} is set by the grid"):
            parse_set([f"{key}=1"], is_grid_key, "the grid")
    with pytest.raises(ParamsError, match=r"mnist, salt_pepper 1: pretrain.layer1.corruption"):
        grid_points(default_raw(), ["mnist"], {"salt_pepper": [1.0]}, None, {})


@pytest.mark.slow
@pytest.mark.timeout(480)  # three experiments and an interruption: about 150 s on 2 busy cores
def test_the_noise_sweep_resumes_after_an_interruption_without_retraining_a_finished_point(pipeline_repo):
    """No noise (masking at 0) and Gaussian noise on digits, one worker; Ctrl-C once the first has finished."""
    repo = pipeline_repo
    command = [sys.executable, "-m", "sweeps.noise", "--datasets", "digits", "--kinds", "gaussian", "--gaussian", "0.3", "--jobs", "1", "--id", "n"]
    interrupt_after_the_first_finished_point(repo, command)
    client = mlflow.MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sda-pipeline").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'FINISHED'")}
    assert len(before) == 1

    done = repo.run(*command)
    assert "1 of 2 points have a finished MLflow run already; running 1" in done.stdout
    runs = [r for r in client.search_runs([experiment], "attributes.status = 'FINISHED'") if r.data.tags.get("kind") != "sweep-report"]
    assert len(runs) == 2 and before <= {r.info.run_id for r in runs}  # nothing re-trained, nothing duplicated
    assert sorted(r.data.params["pretrain.layer1.noise"] for r in runs) == ["gaussian", "masking"]
    assert all(r.data.tags["engine"] == "autograd" for r in runs)

    report = repo.path / "reports/noise/n"
    points = json.loads((report / "noise.json").read_text())["points"]
    assert sorted((p["kind"], p["level"]) for p in points) == [("gaussian", 0.3), ("none", 0.0)]
    assert [p["restored"] for p in points] == [True, False]
    table = (report / "noise.md").read_text()
    assert "| digits | none (SAE-3) | no noise (" in table and "| digits | gaussian | gaussian sigma 0.3 (" in table
    assert (report / "filters_gaussian.txt").read_text().strip() == "panels, left to right: gaussian level = 0, 0.3"
    assert (report / "filters_gaussian.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "test_error_by_noise.png").read_bytes()[:4] == b"\x89PNG"
    parents = client.search_runs([experiment], "tags.kind = 'sweep-report'")
    assert len(parents) == 1 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
