"""Invalid params stop every stage before any work, with a message naming the key."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value):
    params = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return params


BAD = [
    ("pretrain.layer1.corruption", -0.1, "pretrain.layer1.corruption"),
    ("pretrain.layer2.corruption", 1.0, "pretrain.layer2.corruption"),
    ("pretrain.layer3.corruption", "0.3", "pretrain.layer3.corruption"),
    ("pretrain.layer1.units", 0, "pretrain.layer1.units"),
    ("pretrain.layer2.units", 100.5, "pretrain.layer2.units"),
    ("pretrain.layer1.masking", "gaussian", "pretrain.layer1.masking"),
    ("pretrain.layer1.epochs", -1, "pretrain.layer1.epochs"),
    ("pretrain.layer1.lr", 0, "pretrain.layer1.lr"),
    ("pretrain.layer3.batch_size", 0, "pretrain.layer3.batch_size"),
    ("pretrain.layer3.batch_size", True, "pretrain.layer3.batch_size"),
    ("pretrain.layer2.input", "data/codes/layer3", "pretrain.layer2.input"),
    ("pretrain.layer2.corruption", KeyError, "pretrain.layer2.corruption"),
    ("pretrain.layer1.corruptoin", 0.1, "pretrain.layer1.corruptoin"),
    ("data.dataset", "cifar10", "data.dataset"),
    ("data", KeyError, "params.yaml.data"),
    ("seed", -3, "seed"),
    ("finetune.lr", -0.1, "finetune.lr"),
    ("finetune.momentum", 1.0, "finetune.momentum"),
    ("finetune.lr_decay", 0.0, "finetune.lr_decay"),
    ("finetune.batch_size", 0, "finetune.batch_size"),
    ("finetune.max_epochs", 0, "finetune.max_epochs"),
    ("finetune.patience", KeyError, "finetune.patience"),
    ("finetune.improvement_threshold", 1.5, "finetune.improvement_threshold"),
    ("pretrain", {}, "pretrain"),
    ("engine", "jax", "engine"),
]


@pytest.mark.parametrize("path, value, key", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_is_refused_naming_the_key(path, value, key):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_a_params_file_without_engine_means_fused():
    assert parse_params(with_change("engine", KeyError)).engine == "fused"
    assert parse_params(with_change("engine", "autograd")).engine == "autograd"


def test_layers_must_be_numbered_in_order():
    params = copy.deepcopy(DEFAULT)
    params["pretrain"] = {"layer1": params["pretrain"]["layer1"], "layer3": params["pretrain"]["layer3"]}
    with pytest.raises(ParamsError, match=r"^pretrain\.layer3: layers must be named layer1, layer2"):
        parse_params(params)


def test_malformed_yaml_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\npretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: malformed YAML"):
        load_params(path)


def test_default_params_are_valid_and_give_the_papers_architecture():
    params = parse_params(DEFAULT)
    assert [(l.name, l.units, l.corruption) for l in params.layers] == [
        ("layer1", 1000, 0.1), ("layer2", 1000, 0.2), ("layer3", 1000, 0.3)]
    assert params.dataset == "mnist"


def test_a_fourth_layer_section_adds_a_layer():
    params = copy.deepcopy(DEFAULT)
    params["pretrain"]["layer4"] = dict(params["pretrain"]["layer3"], input="data/codes/layer3")
    assert [l.name for l in parse_params(params).layers] == ["layer1", "layer2", "layer3", "layer4"]


def run_stage(directory: Path, *stage: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *stage], cwd=directory, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def bad_params_stages(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """`python -m stages.pretrain layer1` on each BAD params file, all started at once (each is mostly
    interpreter start-up); {case id: (its directory, its result)}."""
    started = {}
    for path, value, _ in BAD:
        directory = tmp_path_factory.mktemp("bad")
        (directory / "params.yaml").write_text(yaml.safe_dump(with_change(path, value)))
        started[f"{path}={value!r}"] = directory, subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain", "layer1"], cwd=directory, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    finished = {}
    for case, (directory, process) in started.items():
        stdout, stderr = process.communicate(timeout=240)
        finished[case] = directory, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("path, value, key", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_every_kind_of_bad_params_stops_a_stage_with_one_line_and_writes_nothing(bad_params_stages, path, value, key):
    tmp_path, done = bad_params_stages[f"{path}={value!r}"]
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and done.stderr.startswith(f"error: {key}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("text, message", [
    ("seed: 1\npretrain: [unclosed\n", "error: params.yaml: malformed YAML"),
    ("- just\n- a list\n", "error: params.yaml: must be a mapping"),
    (yaml.safe_dump(dict(DEFAULT, pretrain={"layer2": DEFAULT["pretrain"]["layer2"]})), "error: pretrain.layer2: layers must be named layer1, layer2"),
], ids=["malformed", "not-a-mapping", "misnumbered-layers"])
def test_unreadable_params_files_stop_a_stage_the_same_way(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    done = run_stage(tmp_path, "stages.pretrain", "layer1")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage", [["stages.prepare"], ["stages.pretrain", "layer1"], ["stages.finetune"], ["stages.evaluate"]])
def test_every_stage_exits_before_work_and_writes_nothing(tmp_path, stage):
    bad = with_change("pretrain.layer3.corruption", 1.2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    done = run_stage(tmp_path, *stage)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: pretrain.layer3.corruption: must be a number in [0, 1), got 1.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
