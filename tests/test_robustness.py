"""Killed stages, interrupts, divergence and an unreachable tracking server, with real processes."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def slow_layer2(repo, epochs):
    params = repo.params()
    params["pretrain"]["layer2"]["epochs"] = epochs
    repo.write_params(params)


def wait_for_descendant(parent: int, argv: list[str], timeout: float = 60) -> int:
    """The pid of the process below ``parent`` whose command line is ``argv`` (never another's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children(recursive=True):
            try:
                if child.cmdline()[-len(argv):] == argv and "python" in child.cmdline()[0]:
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process {argv} below pid {parent} within {timeout}s")


def test_sigkill_mid_epoch_leaves_nothing_half_written_and_repro_recovers(pipeline_repo):
    repo = pipeline_repo
    slow_layer2(repo, epochs=2000)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo.path, env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in dvc.stdout:  # the stage prints this line just before its epoch loop
        seen.append(line)
        if line.startswith("layer2: 24 -> 24 units"):
            break
    time.sleep(1.0)  # inside the epoch loop
    os.kill(wait_for_descendant(dvc.pid, ["-m", "stages.pretrain", "layer2"]), signal.SIGKILL)
    out = "".join(seen) + dvc.communicate(timeout=60)[0]
    assert dvc.returncode != 0, out
    assert not (repo.path / "models/pretrain/layer2/weights.pt").exists()
    assert not (repo.path / "metrics/pretrain/layer2.json").exists()

    assert repo.repro() == ["pretrain@layer2", "pretrain@layer3", "finetune", "evaluate", "track"]
    assert repo.repro() == []
    assert "up to date" in repo.run("dvc", "status").stdout
    # Every cached object still matches its hash: checking out from the cache after deleting the
    # workspace copies restores outputs identical to what dvc.lock recorded.
    for path in ("models/pretrain/layer1", "data/codes/layer1"):
        subprocess.run(["rm", "-rf", str(repo.path / path)], check=True)
    repo.run("dvc", "checkout")
    assert "up to date" in repo.run("dvc", "status").stdout
    with sqlite3.connect(repo.path / "mlflow.db") as db:
        assert db.execute("pragma integrity_check").fetchall() == [("ok",)]
        assert db.execute("select status from runs").fetchall() == [("FINISHED",)]


def test_sigint_stops_a_stage_promptly_with_a_message_and_no_output(pipeline_repo):
    repo = pipeline_repo
    assert repo.repro("prepare", "--single-item") == ["prepare"]
    repo.run("dvc", "repro", "pretrain@layer1")
    slow_layer2(repo, epochs=2000)
    stage = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "layer2"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # However slow the imports (a cold virtualenv takes seconds), interrupt inside the epoch loop.
    first = stage.stdout.readline()
    assert first.startswith("layer2: 24 -> 24 units"), first + stage.communicate()[1]
    time.sleep(1.0)
    assert stage.poll() is None, stage.communicate()
    sent = time.monotonic()
    stage.send_signal(signal.SIGINT)
    _, err = stage.communicate(timeout=10)
    assert time.monotonic() - sent < 5
    assert stage.returncode == 130
    assert "interrupted" in err
    assert not (repo.path / "models/pretrain/layer2").exists()


@pytest.mark.parametrize("lr, message", [
    (1e38, r"training loss became (nan|inf) at epoch 1 "),  # overflows float32 in the first steps
    (1e30, r"training loss \S+ at epoch 1 is over 10 times the untrained model's"),  # finite, absurd
], ids=["non-finite", "finite-but-absurd"])
def test_a_diverging_learning_rate_stops_naming_layer_and_epoch_and_writes_no_model(pipeline_repo, lr, message):
    repo = pipeline_repo
    params = repo.params()
    params["pretrain"]["layer2"]["lr"] = lr
    repo.write_params(params)
    done = repo.run("dvc", "repro", check=False)
    assert done.returncode != 0
    assert re.search(r"error: pretrain\.layer2: " + message, done.stderr), done.stderr
    assert not (repo.path / "models/pretrain/layer2").exists()
    assert (repo.path / "models/pretrain/layer1/weights.pt").exists()


def test_an_unreachable_tracking_server_fails_fast_with_a_clear_message(pipeline_repo):
    repo = pipeline_repo
    repo.repro()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(repo.env, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stages.track"], cwd=repo.path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 1
    assert f"error: MLflow store http://127.0.0.1:{port} failed" in done.stderr
