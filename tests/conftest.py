import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from sweeps.dvc_queue import describe, is_dvc, kill, repo_processes, run_to_files

ROOT = Path(__file__).resolve().parents[1]
TRACKED = ["sda", "stages", "sweeps", "dvc.yaml", "params.yaml", ".gitignore", "pyproject.toml"]


def tiny_digits_params() -> dict:
    """The default params with digits and sizes small enough for a pipeline in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "digits"
    for layer in params["pretrain"].values():
        layer.update(units=24, epochs=3, batch_size=20, lr=0.1)
    params["finetune"].update(max_epochs=6, patience=3, batch_size=20)
    return params


def on_one_thread_and_on_two(compute):
    """``compute()``'s results with torch (and the C kernels, which share its threads) on 1 thread, then on 2."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(compute())
        return results
    finally:
        torch.set_num_threads(threads)


# Marks the processes this test run starts, for the final check; pytest-xdist's workers inherit it
# from the controlling process, which makes that check once all of them are done.
SESSION = os.environ.setdefault("SDA_TEST_SESSION", str(os.getpid()))


def pipeline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "SDA_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        SDA_THREADS="1",
        SDA_TEST_SESSION=SESSION,  # marks the suite's processes for the final check (pytest_sessionfinish)
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


class PipelineRepo:
    """A temporary git + DVC repository holding a copy of the project (of ``tracked``)."""

    def __init__(self, path: Path, params: dict, tracked: tuple[str, ...] | list[str] = TRACKED):
        self.path = path
        for name in tracked:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, path / name)
        self.write_params(params)
        self.env = pipeline_env()
        self.run("git", "init", "-q", "-b", "main")
        self.run("dvc", "init", "-q")
        self.run("dvc", "config", "core.analytics", "false")
        self.commit("initial")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the repository, its output read from files (a queue worker may outlive it)."""
        done = run_to_files(cmd, cwd=self.path, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def stop_leftovers(self) -> str:
        """Stop the DVC queue and kill every process still working in the repository; describe them ("" if none)."""
        leftovers = repo_processes(self.path, dvc_only=False)
        if not leftovers:
            return ""
        described = describe(leftovers)
        self.run("dvc", "queue", "stop", "--kill", check=False)
        kill(repo_processes(self.path, dvc_only=False))
        return described

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def repro(self, *args: str) -> list[str]:
        """Run `dvc repro`; return the stages it ran, in order."""
        done = self.run("dvc", "repro", *args)
        return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage '")]


def processes_of_this_test_in(repo):
    """Processes of this test run (marked by SDA_TEST_SESSION) working inside ``repo``: none should outlive a command."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SDA_TEST_SESSION") == SESSION and Path(process.cwd()).is_relative_to(repo):
                found.append(f"{process.pid} {' '.join(process.cmdline()[:4])}")
        except (psutil.Error, OSError):
            continue
    return found


def finished_point_runs(db):
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
        except sqlite3.OperationalError:  # the store's tables are still being created
            return 0


def interrupt_after_the_first_finished_point(repo: "PipelineRepo", command: list[str]) -> None:
    """Start the sweep ``command`` in ``repo``, press Ctrl-C once a point's MLflow run has finished,
    and check that it stops with the interrupted error, leaving nothing of it running."""
    log = repo.path.parent / "first.log"
    with open(log, "w") as out:
        # Its own process group, which gets the SIGINT, as a terminal's Ctrl-C reaches the foreground group.
        first = subprocess.Popen(command, cwd=repo.path, env=repo.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 150
        while finished_point_runs(repo.path / "mlflow.db") == 0:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=60) == 1
    assert "error: interrupted: " in log.read_text()
    assert processes_of_this_test_in(repo.path) == []


@pytest.fixture
def pipeline_repo(tmp_path):
    """A PipelineRepo on the tiny digits params; at teardown, also after a failure or a timeout,
    its queue is stopped and whatever still runs in it is killed."""
    (tmp_path / "repo").mkdir()
    repo = PipelineRepo(tmp_path / "repo", tiny_digits_params())
    yield repo
    leftovers = repo.stop_leftovers()
    if leftovers:
        print(f"\nteardown killed processes left running in {repo.path}: {leftovers}")


# The two xdist workers take whole files in collection order (pyproject.toml: --no-loadscope-reorder),
# each taking the next file as its current one runs out. The files go longest first, so that none
# starts last while the other worker has finished; a file missing from this list runs after them.
# Seconds per file in the whole suite, 2-core Intel Xeon, 2026-12-07: table1 200, cluster 178,
# sweep 153, noise_sweep 107, pipeline 97, dvc_queue 94, robustness 85, kernels 24, params 19,
# benchmarks 11, engines 8; the rest under 5 (the two workers then ended within 1 s of each other).
LONGEST_FIRST = ("test_table1.py", "test_cluster.py", "test_sweep.py", "test_noise_sweep.py", "test_pipeline.py", "test_dvc_queue.py",
                 "test_robustness.py", "test_kernels.py", "test_params.py", "test_benchmarks.py", "test_engines.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if any dvc process it started is still alive at its end (they are killed)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks for all
        return
    leftovers = []
    for process in psutil.process_iter():
        try:
            if is_dvc(process) and process.environ().get("SDA_TEST_SESSION") == SESSION:
                leftovers.append(process)
        except psutil.Error:
            continue
    if leftovers:
        print(f"\nerror: the tests left dvc processes running (now killed): {describe(leftovers)}", file=sys.stderr)
        kill(leftovers)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
