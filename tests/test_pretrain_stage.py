"""Each layer's noise, loss and emphasis in the stages: pretrain builds them from params.yaml and names them in its
log; track names the MLflow run by each layer's noise."""

import subprocess
import sys

import yaml

from sda.dae import Emphasis
from sda.noise import GaussianNoise, MaskingNoise, SaltPepperNoise
from stages.params import parse_params
from stages.pretrain import describe_objective
from stages.track import run_name
from tests.conftest import ROOT, tiny_digits_params


def test_the_log_names_the_noise_and_the_loss_and_emphasis_where_not_plain():
    assert describe_objective(MaskingNoise(0.1), "cross_entropy", Emphasis()) == "MaskingNoise(nu=0.1, mode='fixed')"
    assert describe_objective(SaltPepperNoise(0.25), "cross_entropy", Emphasis(1, 0.5)) == \
        "SaltPepperNoise(nu=0.25), emphasis alpha=1 beta=0.5"
    assert describe_objective(GaussianNoise(0.3), "squared_error", Emphasis()) == "GaussianNoise(sigma=0.3), squared_error loss"


# prepare, then pretrain@layer1 and @layer2, in one interpreter (each start-up imports torch).
STAGES = """
import runpy, sys
for argv in (["prepare"], ["pretrain", "layer1"], ["pretrain", "layer2"]):
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module("stages." + argv[0], run_name="__main__")
"""


def test_the_stage_trains_salt_pepper_with_emphasis_and_gaussian_with_squared_error(tmp_path):
    params = tiny_digits_params()
    params["engine"] = "autograd"
    params["pretrain"]["layer1"].update(noise="salt_pepper", corruption=0.25, emphasis={"alpha": 1, "beta": 0.5}, epochs=2)
    layer2 = params["pretrain"]["layer2"]
    del layer2["corruption"], layer2["masking"]
    layer2.update(noise="gaussian", sigma=0.3, loss="squared_error", epochs=2)
    parse_params(params)  # valid, or the test would only show a refusal
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "-c", STAGES], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SDA_THREADS": "1", "SDA_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "layer1: 64 -> 24 units, SaltPepperNoise(nu=0.25), emphasis alpha=1 beta=0.5, 2 epochs, autograd engine" in done.stdout
    assert "layer2: 24 -> 24 units, GaussianNoise(sigma=0.3), squared_error loss, 2 epochs, autograd engine" in done.stdout
    for layer in ("layer1", "layer2"):
        assert (tmp_path / "models/pretrain" / layer / "weights.pt").is_file()
        assert (tmp_path / "data/codes" / layer / "train.npz").is_file()


def test_the_run_name_shows_each_layers_noise():
    params = tiny_digits_params()
    assert run_name(parse_params(params), "") == "digits nu 0.1/0.2/0.3 seed 1234"  # as before the other noises
    params["engine"] = "autograd"
    params["pretrain"]["layer1"].update(noise="salt_pepper", corruption=0.25)
    del params["pretrain"]["layer2"]["corruption"], params["pretrain"]["layer2"]["masking"]
    params["pretrain"]["layer2"].update(noise="gaussian", sigma=0.3)
    assert run_name(parse_params(params), "exp-1") == "digits nu s&p 0.25/sigma 0.3/0.3 seed 1234 autograd (exp-1)"
