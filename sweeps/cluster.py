"""Sweep points on a Ray cluster, into one MLflow server, sharing DVC's cache through a DVC remote.

A point is one Ray task: a fresh clone of the git remote at the sweep's commit, in which
`python -m sweeps.point` opens the point's MLflow run, runs `dvc exp run --pull` and pushes the
stages and the experiment (see there). Machines share only the git remote, the DVC remote and the
MLflow server; each node keeps its own DVC cache.

Before anything runs, the services are checked (the MLflow server answers, the commit is on the git
remote, a local DVC remote exists): a configuration error stops the sweep at once, naming what is
wrong. Points with a finished MLflow run are left out, so submitting the same sweep again resumes
it. A point that shares its lower layers with an earlier one waits for it (Ray runs it once the
earlier task is done), so the layers are trained once cluster-wide and restored from the DVC
remote's run-cache everywhere else. A node that dies costs its points one retry (Ray's
``max_retries``) on another node; a point whose pipeline fails is not retried, and is listed.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from stages.track import finished_point_runs, mark_restored
from sweeps.dvc_queue import SweepError, set_args

# A Ray worker that dies (its node killed, say) sends its point's process group SIGTERM: Linux's
# parent-death signal, set between fork and exec.
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class Cluster:
    """Where a sweep runs: the Ray cluster and the three services every node shares."""
    ray_address: str
    git_remote: str
    dvc_remote: str
    tracking_uri: str
    commit: str
    retries: int = 3
    cpus_per_point: float = 1.0


def check_services(cluster: Cluster) -> None:
    """Stop at once, naming the service, when one a point needs is not there."""
    if not cluster.tracking_uri.startswith(("http://", "https://")):
        raise SweepError(f"MLFLOW_TRACKING_URI must name an MLflow server (http://...) that every node reaches, got "
                         f"{cluster.tracking_uri!r}")
    health = cluster.tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=10) as answer:
            if answer.status != 200:
                raise SweepError(f"the MLflow server {cluster.tracking_uri} answers {answer.status} at {health}")
    except (urllib.error.URLError, OSError) as err:
        raise SweepError(f"the MLflow server {cluster.tracking_uri} does not answer at {health}: {err}") from None
    listed = subprocess.run(["git", "ls-remote", cluster.git_remote], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if listed.returncode != 0:
        raise SweepError(f"the git remote {cluster.git_remote} cannot be read: {listed.stderr.strip()}")
    if cluster.commit not in {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}:
        raise SweepError(f"commit {cluster.commit[:12]} is not a branch or tag of the git remote {cluster.git_remote}, so "
                         "the nodes cannot check it out: push it first (git push <remote> HEAD)")
    if "://" not in cluster.dvc_remote and not Path(cluster.dvc_remote).is_dir():
        raise SweepError(f"the DVC remote {cluster.dvc_remote} is not a directory (a local or shared-disk remote must exist)")


def run_point_in_a_fresh_clone(point_id: str, overrides: list[str], cluster: Cluster, *after) -> dict:
    """The Ray task of one point (``after``: the tasks whose layers it reuses, done before it starts).

    Only the standard library and Ray here: the task is shipped by value, and the point's code is
    the clone's, at the sweep's commit."""
    import ctypes
    import shutil

    import ray

    node = ray.get_runtime_context().get_node_id()
    cache = Path(tempfile.gettempdir()) / "sda-dvc-cache" / node
    workdir = Path(tempfile.mkdtemp(prefix=f"sda-point-{point_id}-"))
    try:
        for git in (["clone", "--quiet", "--no-checkout", cluster.git_remote, str(workdir)], ["-C", str(workdir), "checkout", "--quiet", cluster.commit]):
            done = subprocess.run(["git", *git], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                return {"point_id": point_id, "node": node, "error": f"git {git[0] if git[0] != '-C' else 'checkout'}: {done.stderr.strip()}"}
        libc = ctypes.CDLL(None, use_errno=True)
        env = dict(os.environ, MLFLOW_TRACKING_URI=cluster.tracking_uri, SDA_THREADS=str(max(1, int(cluster.cpus_per_point))),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        command = [sys.executable, "-m", "sweeps.point", "--point-id", point_id, "--node", node, "--git-remote", cluster.git_remote,
                   "--dvc-remote", cluster.dvc_remote, "--cache", str(cache), *(arg for o in overrides for arg in ("-S", o))]
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM))
        print(done.stdout[-20000:], done.stderr[-5000:], flush=True)  # into the task's log
        lines = done.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            return {"point_id": point_id, "node": node, "error": f"sweeps.point ended with code {done.returncode}: "
                                                                  f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def prefix_keys(params: dict[str, object]) -> tuple[tuple, tuple]:
    """(the layers below the last one, all the pretrained layers) of a point's params: a point
    reuses the layers of an earlier point with the same first key, or the same second one."""
    layers = sorted({key.split(".")[1] for key in params if key.startswith("pretrain.")})
    upstream = {k: v for k, v in params.items() if not k.startswith(("finetune.", "evaluate."))}
    lower = {k: v for k, v in upstream.items() if not k.startswith(f"pretrain.{layers[-1]}.")}
    return tuple(sorted(lower.items(), key=str)), tuple(sorted(upstream.items(), key=str))


def run_points_on_ray(sweep_id: str, points: list[dict], cluster: Cluster) -> tuple[dict[str, object], dict[str, str]]:
    """Run the points (named by ``grid.run_points``) on the cluster; return ({experiment name: its
    MLflow run}, {failed point: why})."""
    import ray
    from ray import cloudpickle

    check_services(cluster)
    mark_restored(points)
    missing = [point for point in points if not point["restored"]]
    print(f"{len(points) - len(missing)} of {len(points)} points have a finished MLflow run already; running {len(missing)} "
          f"on the Ray cluster at {cluster.ray_address}", flush=True)

    failed: dict[str, str] = {}
    if missing:
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            ray.init(address=cluster.ray_address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SweepError(f"no Ray cluster answers at {cluster.ray_address}: {str(err).splitlines()[0]}") from None
        refs = {}
        try:
            largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
            if largest < cluster.cpus_per_point:
                raise SweepError(f"each point asks for {cluster.cpus_per_point:g} CPUs (--threads), but no node of the Ray cluster "
                                 f"at {cluster.ray_address} has more than {largest:g}")
            task = ray.remote(run_point_in_a_fresh_clone).options(max_retries=cluster.retries, num_cpus=cluster.cpus_per_point)
            first: dict[tuple, object] = {}
            for point in missing:
                lower, upstream = prefix_keys(point["params"])
                after = [first[key] for key in (upstream, lower) if key in first][:1]
                overrides = set_args(point["overrides"])[1::2]  # the values of its -S arguments
                refs[point["experiment"]] = task.remote(point["experiment"], overrides, cluster, *after)
                for key in (lower, upstream):
                    first.setdefault(key, refs[point["experiment"]])
            for name, ref in refs.items():
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    failed[name] = f"no attempt finished ({cluster.retries + 1} tries): {str(err).splitlines()[0]}"
                    continue
                if result.get("error"):
                    failed[name] = result["error"]
                seconds = ", ".join(f"{step} {value:g} s" for step, value in result.get("seconds", {}).items())
                print(f"{name}: {'failed: ' + result['error'] if result.get('error') else 'done'} on node "
                      f"{result.get('node', '?')[:12]}, attempt {result.get('attempt', '?')} ({seconds or 'no step'}), "
                      f"ran {', '.join(result.get('ran') or []) or 'no stage'}", flush=True)
        except KeyboardInterrupt:
            # Force-cancelling kills each task's worker process, and with it the point's process
            # group (its parent-death signal): nothing of the sweep runs on.
            for ref in refs.values():
                ray.cancel(ref, force=True)
            raise SweepError("interrupted: the sweep's tasks were cancelled on the cluster; submit it again to finish "
                             "what is missing") from None
        finally:
            ray.shutdown()

    return finished_point_runs(points, failed), failed
