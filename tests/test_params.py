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
    # The noise family's keys (each absent in the default params): bad values, and what the
    # default fused engine does not run.
    ("pretrain.layer2.noise", "foo", "pretrain.layer2.noise"),
    ("pretrain.layer1.sigma", 0.3, "pretrain.layer1.sigma"),
    ("pretrain.layer1.loss", "hinge", "pretrain.layer1.loss"),
    ("pretrain.layer1.emphasis", 0.5, "pretrain.layer1.emphasis"),
    ("pretrain.layer1.emphasis", {"alpha": -1, "beta": 1}, "pretrain.layer1.emphasis.alpha"),
    ("pretrain.layer3.emphasis", {"alpha": 1}, "pretrain.layer3.emphasis.beta"),
    ("pretrain.layer1.emphasis", {"alpha": 0, "beta": 0.0}, "pretrain.layer1.emphasis"),
    ("pretrain.layer1.noise", "salt_pepper", "pretrain.layer1.noise"),
    ("pretrain.layer3.loss", "squared_error", "pretrain.layer3.loss"),
    ("pretrain.layer2.emphasis", {"alpha": 1, "beta": 0.5}, "pretrain.layer2.emphasis"),
]


def case_id(path: str, value) -> str:
    return f"{path}={value!r}"


@pytest.mark.parametrize("path, value, key", BAD, ids=[case_id(p, v) for p, v, _ in BAD])
def test_bad_value_is_refused_naming_the_key(path, value, key):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    assert str(err.value).startswith(key + ":"), str(err.value)


def with_layer(name: str, engine: str = "autograd", drop: tuple[str, ...] = (), **changes) -> dict:
    """The default params with layer ``name`` changed (``changes``, keys in ``drop`` removed), on ``engine``."""
    params = copy.deepcopy(DEFAULT)
    params["engine"] = engine
    layer = params["pretrain"][name]
    for key in drop:
        del layer[key]
    layer.update(changes)
    return params


GAUSSIAN = {"drop": ("corruption", "masking"), "noise": "gaussian", "sigma": 0.3}

BAD_ON_AUTOGRAD = [  # (layer, changes, the key the error must name)
    ("layer1", dict(noise="gaussian", sigma=0.3), "pretrain.layer1.corruption"),  # gaussian has no nu
    ("layer2", dict(drop=("corruption",), noise="gaussian", sigma=0.3), "pretrain.layer2.masking"),
    ("layer1", dict(GAUSSIAN, sigma=-0.1), "pretrain.layer1.sigma"),
    ("layer1", dict(GAUSSIAN, sigma="0.3"), "pretrain.layer1.sigma"),
    ("layer1", dict(GAUSSIAN, sigma=float("inf")), "pretrain.layer1.sigma"),
    ("layer3", {k: v for k, v in GAUSSIAN.items() if k != "sigma"}, "pretrain.layer3.sigma"),  # missing
    ("layer1", dict(GAUSSIAN, emphasis={"alpha": 1, "beta": 0.5}), "pretrain.layer1.emphasis"),  # nothing uncorrupted
    ("layer1", dict(noise="salt_pepper", masking="bernoulli"), "pretrain.layer1.masking"),
    ("layer1", dict(noise="salt_pepper", sigma=0.3), "pretrain.layer1.sigma"),
    ("layer2", dict(noise="salt_pepper", corruption=1.0), "pretrain.layer2.corruption"),
    ("layer2", dict(noise="salt_pepper", drop=("corruption",)), "pretrain.layer2.corruption"),
    ("layer1", dict(emphasis={"alpha": float("nan"), "beta": 1}), "pretrain.layer1.emphasis.alpha"),
    ("layer1", dict(emphasis={"alpha": 1, "beta": True}), "pretrain.layer1.emphasis.beta"),
    ("layer1", dict(emphasis={"alpha": 1, "beta": 1, "gamma": 1}), "pretrain.layer1.emphasis.gamma"),
    ("layer1", dict(loss="squared"), "pretrain.layer1.loss"),
]


@pytest.mark.parametrize("layer, changes, key", BAD_ON_AUTOGRAD, ids=[f"{l}:{c}" for l, c, _ in BAD_ON_AUTOGRAD])
def test_bad_noise_settings_are_refused_naming_the_key(layer, changes, key):
    with pytest.raises(ParamsError) as err:
        parse_params(with_layer(layer, **changes))
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_absent_noise_keys_mean_masking_with_the_plain_cross_entropy():
    for layer, (name, nu) in zip(parse_params(DEFAULT).layers, [("layer1", 0.1), ("layer2", 0.2), ("layer3", 0.3)]):
        assert (layer.name, layer.noise, layer.corruption, layer.masking, layer.sigma, layer.emphasis, layer.loss) == (
            name, "masking", nu, "fixed", None, (1.0, 1.0), "cross_entropy")


def test_the_defaults_written_out_are_the_defaults_and_run_on_the_fused_engine():
    explicit = with_layer("layer2", engine="fused", noise="masking", emphasis={"alpha": 1, "beta": 1}, loss="cross_entropy")
    assert parse_params(explicit) == parse_params(DEFAULT)


def test_every_noise_loss_and_emphasis_parses_on_the_autograd_engine():
    salt_pepper = parse_params(with_layer("layer1", noise="salt_pepper", corruption=0.25, emphasis={"alpha": 1, "beta": 0.5})).layers[0]
    assert (salt_pepper.noise, salt_pepper.corruption, salt_pepper.masking, salt_pepper.emphasis) == ("salt_pepper", 0.25, None, (1.0, 0.5))
    without_masking = parse_params(with_layer("layer1", drop=("masking",), noise="salt_pepper", corruption=0.25)).layers[0]
    assert without_masking.noise == "salt_pepper"  # `masking: fixed` may stay, or go
    gaussian = parse_params(with_layer("layer3", **GAUSSIAN, loss="squared_error", emphasis={"alpha": 1, "beta": 1})).layers[2]
    assert (gaussian.noise, gaussian.sigma, gaussian.corruption, gaussian.masking, gaussian.loss) == ("gaussian", 0.3, None, None, "squared_error")
    masking = parse_params(with_layer("layer2", emphasis={"alpha": 1, "beta": 0}, loss="squared_error")).layers[1]
    assert (masking.noise, masking.emphasis, masking.loss) == ("masking", (1.0, 0.0), "squared_error")


@pytest.mark.parametrize("changes, message", [
    (dict(noise="salt_pepper"), "pretrain.layer2.noise: salt_pepper needs engine: autograd"),
    (GAUSSIAN, "pretrain.layer2.noise: gaussian needs engine: autograd"),
    (dict(loss="squared_error"), "pretrain.layer2.loss: squared_error needs engine: autograd"),
    (dict(emphasis={"alpha": 1, "beta": 0}), "pretrain.layer2.emphasis: alpha=1, beta=0 needs engine: autograd"),
], ids=["salt_pepper", "gaussian", "squared_error", "emphasis"])
def test_the_fused_engine_refuses_what_it_does_not_run_naming_the_key_and_the_fix(changes, message):
    with pytest.raises(ParamsError) as err:
        parse_params(with_layer("layer2", engine="fused", **changes))
    assert str(err.value) == message + " (the fused engine runs masking noise with the plain loss only)"
    parse_params(with_layer("layer2", engine="autograd", **changes))  # the fix works
    params_without_engine = with_layer("layer2", **changes)
    del params_without_engine["engine"]  # absent means fused
    with pytest.raises(ParamsError, match="needs engine: autograd"):
        parse_params(params_without_engine)


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


# Every BAD case's message is checked in-process above; a stage process meets them all through the
# same path (load_params, then run's error line), so one case per kind of fault runs as a process:
# a value out of range, a misspelt key, a missing key and section, a nested key, another section,
# and a setting the default engine refuses.
IN_A_STAGE = [case for case in BAD if case_id(*case[:2]) in {
    "pretrain.layer1.corruption=-0.1", "pretrain.layer1.corruptoin=0.1", "pretrain.layer2.corruption=<class 'KeyError'>",
    "data=<class 'KeyError'>", "pretrain.layer1.emphasis={'alpha': -1, 'beta': 1}", "finetune.lr=-0.1", "engine='jax'",
    "pretrain.layer1.noise='salt_pepper'"}]


def test_every_case_chosen_to_run_in_a_stage_is_a_bad_case():
    assert len(IN_A_STAGE) == 8  # a renamed BAD case must not drop out of the stage test unseen


@pytest.fixture(scope="module")
def bad_params_stages(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """`python -m stages.pretrain layer1` on each IN_A_STAGE params file, all started at once (each is
    mostly interpreter start-up); {case id: (its directory, its result)}."""
    started = {}
    for path, value, _ in IN_A_STAGE:
        directory = tmp_path_factory.mktemp("bad")
        (directory / "params.yaml").write_text(yaml.safe_dump(with_change(path, value)))
        started[case_id(path, value)] = directory, subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain", "layer1"], cwd=directory, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    finished = {}
    for case, (directory, process) in started.items():
        stdout, stderr = process.communicate(timeout=240)
        finished[case] = directory, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("path, value, key", IN_A_STAGE, ids=[case_id(p, v) for p, v, _ in IN_A_STAGE])
def test_every_kind_of_bad_params_stops_a_stage_with_one_line_and_writes_nothing(bad_params_stages, path, value, key):
    tmp_path, done = bad_params_stages[case_id(path, value)]
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
