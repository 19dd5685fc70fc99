"""DVC's queue workers never outlive a sweep: not even one that sleeps on after the queue is done.

The hang these tests reproduce: `dvc exp run --run-all --jobs 2` returned, all its experiments had
succeeded, but a `dvc exp queue-worker` slept on, and the forked helper waiting for it held the
caller's stdout open, so a caller reading that pipe never returned. Here a watcher thread puts the
queue's workers to sleep (SIGSTOP) the moment `--run-all` returns, before they can exit by
themselves, so every run meets the condition instead of the occasional one.
"""

import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from sweeps.dvc_queue import repo_processes
from tests.conftest import ROOT, PipelineRepo

pytestmark = pytest.mark.slow

DEADLINE = 150  # seconds for one captured queue run: about 40 s here, of which 15 s is the stop's grace

# One stage that copies its parameter: the queue machinery is what is under test, not the pipeline.
DVC_YAML = """\
stages:
  copy:
    cmd: python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['x'])" > out.txt
    params: [x]
    outs: [out.txt]
"""


# The same, sleeping x seconds first: an experiment that is still running when the sweep is interrupted.
SLOW_DVC_YAML = DVC_YAML.replace("import yaml; print(", "import time, yaml; time.sleep(yaml.safe_load(open('params.yaml'))['x']); print(")


class QueueRepo(PipelineRepo):
    """A git + DVC repository whose pipeline is one stage reading ``x`` from params.yaml."""

    def __init__(self, path, dvc_yaml: str = DVC_YAML):
        path.mkdir()
        (path / "dvc.yaml").write_text(dvc_yaml)
        super().__init__(path, {"x": 0}, tracked=())

    def queue(self, values) -> None:
        for value in values:
            self.run("dvc", "exp", "run", "--queue", "-S", f"x={value}")

    def succeeded(self) -> int:
        return sum("Success" in line.split() for line in self.run("dvc", "queue", "status").stdout.splitlines())


class PutWorkersToSleep(threading.Thread):
    """Once the main `dvc exp run --run-all` process of ``repo`` exits, SIGSTOP its queue workers."""

    def __init__(self, repo):
        super().__init__(daemon=True)
        self.repo, self.stopped, self.done = repo, [], threading.Event()

    def run(self) -> None:
        main = None
        while not self.done.is_set():
            processes = repo_processes(self.repo.path)
            if main is None:
                main = next((p for p in processes if self.is_main_run_all(p)), None)
            elif self.exited(main):
                for process in processes:
                    try:
                        if "queue-worker" in process.cmdline():
                            process.send_signal(signal.SIGSTOP)
                            self.stopped.append(process)
                    except psutil.NoSuchProcess:
                        pass
                return
            time.sleep(0.05)

    @staticmethod
    def exited(process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by its caller
        except psutil.NoSuchProcess:
            return True

    @staticmethod
    def is_main_run_all(process) -> bool:
        """`dvc exp run --run-all` itself, not one of the helpers it forks for its workers."""
        try:
            return "--run-all" in process.cmdline() and "--run-all" not in process.parent().cmdline()
        except psutil.Error:
            return False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.join(timeout=5)  # time to see `--run-all` gone, when it is the command just returned
        self.done.set()
        self.join()


@pytest.fixture
def queue_repo(tmp_path):
    repo = QueueRepo(tmp_path / "repo")
    yield repo
    repo.stop_leftovers()


def test_a_captured_sweep_returns_and_leaves_no_worker_even_when_one_sleeps_on(queue_repo):
    repo = queue_repo
    repo.queue([1, 2])
    sweep = [sys.executable, "-c", "from sweeps.dvc_queue import run_queue; run_queue(jobs=2)"]
    with PutWorkersToSleep(repo) as sleeper:
        done = subprocess.run(sweep, cwd=repo.path, env={**repo.env, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sleeper.stopped, "no worker was put to sleep: the test did not reproduce the hang's condition"
    assert "stopped DVC queue processes still alive after the queue ran" in done.stdout
    assert "`dvc queue status`" in done.stdout and "`dvc queue stop`" in done.stdout
    assert not any(p.is_running() for p in sleeper.stopped)
    assert repo_processes(repo.path) == []
    assert repo.succeeded() == 2


def test_the_harness_never_waits_on_a_pipe_a_sleeping_worker_holds(queue_repo):
    """Plain `dvc exp run --run-all`, as the README's users run it, through the tests' runner."""
    repo = queue_repo
    repo.queue([1, 2])
    started = time.monotonic()
    with PutWorkersToSleep(repo) as sleeper:
        repo.run("dvc", "exp", "run", "--run-all", "--jobs", "2")
    assert time.monotonic() - started < DEADLINE
    assert sleeper.stopped
    assert "queue-worker" in repo.stop_leftovers()
    assert repo_processes(repo.path, dvc_only=False) == []


def start_and_wait_for_an_experiment(repo, code: str) -> subprocess.Popen:
    """Start ``python -c code`` in ``repo`` and return it once one of the queue's (sleeping) experiments runs."""
    sweep = subprocess.Popen([sys.executable, "-c", code], cwd=repo.path, env={**repo.env, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not any("time.sleep" in command_line(p) for p in repo_processes(repo.path)):
        assert time.monotonic() < deadline and sweep.poll() is None, "no experiment started"
        time.sleep(0.2)
    return sweep


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # it exited since it was listed
        return ""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_stops_its_workers_and_the_experiments_they_run(tmp_path, stop):
    repo = QueueRepo(tmp_path / "repo", SLOW_DVC_YAML)
    try:
        repo.queue([120, 121])
        sweep = start_and_wait_for_an_experiment(repo, "from sweeps.dvc_queue import run_queue; run_queue(jobs=2)")
        sweep.send_signal(stop)
        stdout, stderr = sweep.communicate(timeout=60)
        assert sweep.returncode == 1 and "interrupted: the queue's workers and the experiments they ran were stopped" in stderr, \
            stdout + stderr
        assert repo_processes(repo.path, dvc_only=False) == []
    finally:
        repo.stop_leftovers()


def test_a_run_all_left_waiting_by_a_removed_entry_is_stopped_once_the_queue_is_idle(tmp_path):
    """`dvc exp run --run-all` waits for the result of every entry it started with; `dvc queue
    remove` of one still queued leaves it waiting forever, though nothing is left to run."""
    repo = QueueRepo(tmp_path / "repo", SLOW_DVC_YAML)
    try:
        repo.queue([10, 11])
        sweep = start_and_wait_for_an_experiment(repo, "from sweeps.dvc_queue import run_all; run_all(jobs=1, poll=2, idle_limit=6)")
        repo.run("dvc", "queue", "remove", "--queued")
        stdout, stderr = sweep.communicate(timeout=90)
        assert sweep.returncode == 0, stdout + stderr
        assert "still waits 6 s after the queue ran its last experiment" in stdout and "stopping it" in stdout
        assert repo.succeeded() == 1
    finally:
        repo.stop_leftovers()
