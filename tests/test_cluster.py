"""Sweeps on a Ray cluster, with real processes on one machine: PostgreSQL, an MLflow server on it,
a bare git remote, a directory DVC remote, and a Ray head with two worker nodes.

Ray binds to the machine's routable address even when told 127.0.0.1, so the services and the
sweep's driver run in a private network namespace whose only interface is its own loopback; at
teardown every process in that namespace is killed and the namespace deleted.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from sweeps.dvc_queue import is_dvc
from tests.conftest import PipelineRepo, tiny_digits_params

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PG_PORT, MLFLOW_PORT, RAY_PORT = 55432, 5000, 6379  # inside the namespace: nothing else listens there
TRACKING_URI = f"http://127.0.0.1:{MLFLOW_PORT}"
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if PG_BIN is None:
        return "PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin)"
    if shutil.which("ip") is None or shutil.which("runuser") is None:
        return "iproute2's ip and util-linux's runuser are needed"
    return None


class Cluster:
    """The services of one test module, inside the network namespace ``self.ns``."""

    def __init__(self, root: Path):
        self.root, self.ns = root, f"sda-test-{uuid.uuid4().hex[:8]}"
        self.started: dict[str, float] = {}
        self.venv_bin = Path(sys.executable).parent
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "SDA_", "RAY_"))}
        self.env.update(PATH=f"{self.venv_bin}{os.pathsep}{self.env.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true",
                        DVC_NO_ANALYTICS="1", RAY_USAGE_STATS_ENABLED="0", MLFLOW_TRACKING_URI=TRACKING_URI,
                        # A killed worker's children die within seconds instead of running on as orphans.
                        RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper="true")

    def in_ns(self, *cmd: str, check: bool = True, user: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        prefix = ["ip", "netns", "exec", self.ns] + (["runuser", "-u", user, "--"] if user else [])
        done = subprocess.run([*prefix, *cmd], env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=kwargs.pop("timeout", 120), **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def start(self) -> None:
        # The points' clones and the nodes' DVC caches go under the fixture's own temporary folder.
        self.tmp = Path(tempfile.mkdtemp(prefix="sda-cluster-"))
        self.env["TMPDIR"] = str(self.tmp)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.in_ns("ip", "link", "set", "lo", "up")
        self.start_postgres()
        self.start_mlflow()
        self.start_ray()

    def timed(self, name: str, started: float) -> None:
        self.started[name] = round(time.monotonic() - started, 1)

    def start_postgres(self) -> None:
        started = time.monotonic()
        self.pg = Path(tempfile.mkdtemp(prefix="sda-pg-"))  # initdb refuses root: the postgres user owns it
        shutil.chown(self.pg, "postgres")
        self.in_ns(str(PG_BIN / "initdb"), "-D", str(self.pg / "data"), "-U", "mlflow", "--auth=trust", "-E", "UTF8", user="postgres")
        self.in_ns(str(PG_BIN / "pg_ctl"), "-D", str(self.pg / "data"), "-l", str(self.pg / "log"), "-w", "start", "-o",
                   f"-p {PG_PORT} -k {self.pg} -c listen_addresses=127.0.0.1 -c fsync=off", user="postgres")
        self.in_ns(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "mlflow", "mlflow", user="postgres")
        self.timed("postgres", started)

    def start_mlflow(self) -> None:
        started = time.monotonic()
        self.artifacts = self.root / "mlartifacts"
        log = open(self.root / "mlflow-server.log", "w")
        subprocess.Popen(["ip", "netns", "exec", self.ns, str(self.venv_bin / "mlflow"), "server",
                          "--backend-store-uri", f"postgresql+psycopg2://mlflow@127.0.0.1:{PG_PORT}/mlflow",
                          "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                          "--workers", "1"], env={**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while self.in_ns("python", "-c", f"import urllib.request; urllib.request.urlopen('{TRACKING_URI}/health', timeout=2)",
                         check=False).returncode != 0:
            assert time.monotonic() < deadline, (self.root / "mlflow-server.log").read_text()[-3000:]
            time.sleep(1)
        self.timed("mlflow server", started)

    def start_ray(self) -> None:
        started = time.monotonic()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Unix socket paths must stay short
        self.in_ns("ray", "start", "--head", f"--port={RAY_PORT}", "--num-cpus=0", "--include-dashboard=false",
                   f"--temp-dir={self.ray_tmp}", "--disable-usage-stats")
        for worker in ("w1", "w2"):
            self.in_ns("ray", "start", f"--address=127.0.0.1:{RAY_PORT}", "--num-cpus=1", f"--resources={{\"{worker}\": 1}}",
                       "--object-store-memory=80000000")
        self.timed("ray head + 2 workers", started)

    def memory_mib(self) -> float:
        """Proportional set size of every process in the namespace (what they add to the machine)."""
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except psutil.Error:
                continue
        return total / 2**20

    def pids(self) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def stop(self) -> list[int]:
        """Kill every process in the namespace, delete it and the services' files; return the
        processes still alive after five rounds of SIGKILL (none, or the teardown failed)."""
        for _ in range(5):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        alive = self.pids()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        for folder in (getattr(self, "pg", None), getattr(self, "ray_tmp", None), getattr(self, "tmp", None)):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        return alive

    def runs(self) -> list[dict]:
        """Every run of the store: status, params, metrics, tags, artifact paths."""
        code = ("import json, mlflow; c = mlflow.MlflowClient(); e = c.get_experiment_by_name('sda-pipeline'); "
                "runs = c.search_runs([e.experiment_id], max_results=1000) if e else []; "
                "print(json.dumps([{'status': r.info.status, 'params': r.data.params, 'metrics': r.data.metrics, 'tags': r.data.tags, "
                "'artifacts': [a.path for a in c.list_artifacts(r.info.run_id)]} for r in runs]))")
        return json.loads(self.in_ns("python", "-c", code).stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := missing_requirement():
        pytest.skip(reason)
    services = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        services.start()
        yield services
    finally:
        assert services.stop() == []


@pytest.fixture(scope="module")
def repo(cluster, tmp_path_factory):
    """The project on tiny digits, pushed to a bare git remote, with a directory DVC remote."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "repo").mkdir()
    repo = PipelineRepo(root / "repo", tiny_digits_params())
    repo.env.update({k: v for k, v in cluster.env.items() if k.startswith(("RAY_", "MLFLOW_"))})
    repo.remote, repo.dvc_remote = root / "remote.git", root / "dvc-remote"
    repo.dvc_remote.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo.remote)], check=True)
    repo.run("git", "remote", "add", "origin", str(repo.remote))
    repo.run("git", "push", "-q", "origin", "main")
    yield repo
    repo.stop_leftovers()


def sweep(cluster, repo, *args: str) -> subprocess.CompletedProcess:
    return cluster.in_ns(sys.executable, "-m", "sweeps.ablate", "--backend", "ray", "--ray-address", f"127.0.0.1:{RAY_PORT}",
                         "--dvc-remote", str(repo.dvc_remote), *args, cwd=repo.path, env=repo.env, timeout=400, check=False)


def stages_ran(stdout: str) -> list[str]:
    """Every stage that a point of the sweep executed (its driver's per-point lines), cluster-wide."""
    return [stage for line in stdout.splitlines() if " ran " in line and line.split(" ran ")[1] != "no stage"
            for stage in line.split(" ran ")[1].split(", ")]


@pytest.mark.timeout(480)
def test_a_sweep_fans_out_over_both_nodes_into_one_store_and_trains_shared_layers_once(cluster, repo):
    """4 points, 2 levels of layer 3's corruption x 2 seeds: per seed, prepare and layers 1-2 run once."""
    done = sweep(cluster, repo, "--layers", "layer3", "--nu", "0", "0.25", "--seeds", "1", "2", "--sweep-id", "fan")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 of 4 points have a finished MLflow run already; running 4" in done.stdout

    runs = [r for r in cluster.runs() if r["tags"].get("kind") != "sweep-report"]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"FINISHED"}
    assert {(r["params"]["seed"], r["params"]["pretrain.layer3.corruption"]) for r in runs} == {
        (seed, nu) for seed in ("1", "2") for nu in ("0.0", "0.25")}
    assert all("test_error" in r["metrics"] and "pretrain.layer1.train_loss" in r["metrics"] for r in runs)
    assert all("params.yaml" in r["artifacts"] for r in runs)
    assert {r["tags"]["attempt"] for r in runs} == {"1"} and len({r["tags"]["node"] for r in runs}) == 2  # both workers
    assert len({r["tags"]["point_id"] for r in runs}) == 4

    # The stages shared by a seed's points ran once per seed, cluster-wide; layer 3 and after, once per point.
    ran = stages_ran(done.stdout)
    assert {stage: ran.count(stage) for stage in ("prepare", "pretrain@layer1", "pretrain@layer2", "pretrain@layer3", "finetune")} == {
        "prepare": 2, "pretrain@layer1": 2, "pretrain@layer2": 2, "pretrain@layer3": 4, "finetune": 4}

    refs = subprocess.run(["git", "ls-remote", str(repo.remote), "refs/exps/*"], capture_output=True, text=True).stdout
    assert sorted(line.rsplit("/", 1)[1] for line in refs.splitlines()) == sorted(r["tags"]["point_id"] for r in runs)

    # Submitted again, the sweep runs nothing.
    again = sweep(cluster, repo, "--layers", "layer3", "--nu", "0", "0.25", "--seeds", "1", "2", "--sweep-id", "fan")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 of 4 points have a finished MLflow run already; running 0" in again.stdout
    assert len([r for r in cluster.runs() if r["tags"].get("kind") != "sweep-report"]) == 4
    print(f"\nstart-up: {cluster.started} s; memory of every service process: {cluster.memory_mib():.0f} MiB\n"
          + "\n".join(line for line in done.stdout.splitlines() if line.startswith("fan-")))


def test_configuration_errors_stop_the_sweep_before_any_point_runs(cluster, repo):
    wrong_remote = sweep(cluster, repo, "--nu", "0", "--git-remote", str(repo.path.parent / "nowhere.git"), "--sweep-id", "bad")
    assert wrong_remote.returncode == 1 and "the git remote" in wrong_remote.stderr and "nowhere.git" in wrong_remote.stderr
    server_down = cluster.in_ns(sys.executable, "-m", "sweeps.ablate", "--backend", "ray", "--nu", "0", "--sweep-id", "bad",
                                "--ray-address", f"127.0.0.1:{RAY_PORT}", "--dvc-remote", str(repo.dvc_remote),
                                cwd=repo.path, env={**repo.env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}, check=False)
    assert server_down.returncode == 1 and "the MLflow server http://127.0.0.1:5999 does not answer" in server_down.stderr
    no_remote = sweep(cluster, repo, "--nu", "0", "--dvc-remote", str(repo.path.parent / "no-such-dir"), "--sweep-id", "bad")
    assert no_remote.returncode == 1 and "no-such-dir is not a directory" in no_remote.stderr
    repo.run("git", "commit", "-q", "--allow-empty", "-m", "not pushed")
    try:
        unpushed = sweep(cluster, repo, "--nu", "0", "--sweep-id", "bad")
        assert unpushed.returncode == 1 and "is not a branch or tag of the git remote" in unpushed.stderr
    finally:
        repo.run("git", "reset", "-q", "--hard", "HEAD~1")
    assert not [r for r in cluster.runs() if r["tags"].get("sweep_id") == "bad" or "bad-" in r["tags"].get("point_id", "")]


def processes_in(cluster, *words: str) -> list[psutil.Process]:
    """The processes of the namespace whose command line holds all of ``words``."""
    found = []
    for pid in cluster.pids():
        try:
            process = psutil.Process(pid)
            if all(word in " ".join(process.cmdline()) for word in words):
                found.append(process)
        except psutil.Error:
            continue
    return found


def points_processes(cluster) -> list[str]:
    """The command lines of every point's processes in the namespace: sweeps.point, dvc, the stages."""
    found = []
    for pid in cluster.pids():
        try:
            process = psutil.Process(pid)
            line = " ".join(process.cmdline())
            if is_dvc(process) or "sweeps.point" in line or "stages." in line:
                found.append(line)
        except psutil.Error:
            continue
    return found


def make_layer3_slow(repo) -> None:
    """Commit and push a layer 3 that trains long enough (1500 epochs) to be interrupted in."""
    params = repo.params()
    if params["pretrain"]["layer3"]["epochs"] != 1500:
        params["pretrain"]["layer3"]["epochs"] = 1500
        repo.write_params(params)
        repo.commit("a slow layer 3")
        repo.run("git", "push", "-q", "origin", "main")


def start_sweep_and_wait_for_layer3(cluster, repo, nu: str, sweep_id: str) -> subprocess.Popen:
    command = ["ip", "netns", "exec", cluster.ns, sys.executable, "-m", "sweeps.ablate", "--backend", "ray", "--layers", "layer3",
               "--nu", nu, "--sweep-id", sweep_id, "--ray-address", f"127.0.0.1:{RAY_PORT}", "--dvc-remote", str(repo.dvc_remote)]
    driver = subprocess.Popen(command, cwd=repo.path, env=repo.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not processes_in(cluster, "stages.pretrain", "layer3"):
        if driver.poll() is not None or time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"layer 3 never started:\n{driver.communicate()[0]}")
        time.sleep(0.2)
    return driver


def no_point_processes_within(cluster, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while leftovers := points_processes(cluster):
        assert time.monotonic() < deadline, leftovers
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_an_interrupted_cluster_sweep_cancels_its_points(cluster, repo):
    make_layer3_slow(repo)
    driver = start_sweep_and_wait_for_layer3(cluster, repo, "0.31", "stop")
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=60)
    assert driver.returncode == 1 and "interrupted: the sweep's tasks were cancelled on the cluster" in output, output
    no_point_processes_within(cluster, 15)


@pytest.mark.timeout(420)
def test_a_point_whose_node_is_killed_finishes_on_the_other_node(cluster, repo):
    """Last in the module: it leaves the cluster one worker node short."""
    make_layer3_slow(repo)
    driver = start_sweep_and_wait_for_layer3(cluster, repo, "0.33", "kill")
    try:
        (placeholder,) = [r for r in cluster.runs() if r["tags"].get("point_id") == "kill-nu0p33" and r["status"] == "RUNNING"]
        killed_node = placeholder["tags"]["node"]
        (raylet,) = processes_in(cluster, "raylet/raylet", f"--node_id={killed_node}")
        raylet.kill()
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    assert "kill-nu0p33: done on node" in output and "attempt 2" in output

    mine = [r for r in cluster.runs() if r["tags"].get("point_id") == "kill-nu0p33"]
    assert sorted((r["status"], r["tags"]["attempt"], r["tags"]["node"] == killed_node) for r in mine) == [
        ("FAILED", "1", True), ("FINISHED", "2", False)]
    no_point_processes_within(cluster, 15)  # nothing of the killed attempt runs on
