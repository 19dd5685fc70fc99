"""One sweep point on a cluster node, run inside a fresh clone at the sweep's commit (sweeps/cluster.py).

    python -m sweeps.point --point-id ID --node NODE --git-remote URL --dvc-remote URL [-S key=value ...]

It opens the point's MLflow run for this attempt (tagged point_id, attempt and node; an earlier
attempt's run left RUNNING by a dead node is marked FAILED), runs `dvc exp run --pull -n ID -S ...`
(stages that any node pushed to the DVC remote are restored, not re-run), then pushes the stages it
ran with their run-cache entries (`dvc push --run-cache`) and the experiment (`dvc exp push`). The
last line it prints is a JSON summary: attempt, run id, the stages it ran, and the error, if any.
MLflow is $MLFLOW_TRACKING_URI (a server: every node writes to it).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from stages.track import ATTEMPT_RUN_VARIABLE, fail_point_attempt, start_point_attempt
from sweeps.dvc_queue import error_line


def dvc(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``dvc args`` with its output echoed after it ends (it also lands in the Ray task's log)."""
    done = subprocess.run(["dvc", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    print(f"$ dvc {' '.join(args)}\n{done.stdout}{done.stderr}", flush=True)
    return done


def failure(done: subprocess.CompletedProcess) -> str:
    return error_line(done.stdout + done.stderr, f"exit code {done.returncode}", prefixes=("error:", "ERROR:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point-id", required=True, help="the experiment's name, also the MLflow runs' point_id tag")
    parser.add_argument("--node", required=True, help="the node it runs on, for the run's node tag")
    parser.add_argument("--git-remote", required=True, help="where the experiment is pushed (`dvc exp push`)")
    parser.add_argument("--dvc-remote", required=True, help="the DVC remote every node pulls from and pushes to")
    parser.add_argument("--cache", help="this node's DVC cache directory (default: the clone's own)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override, as for `dvc exp run -S`")
    args = parser.parse_args()
    # SIGTERM (the Ray worker that started this died: see sweeps/cluster.py) ends the whole process
    # group, dvc and the stage it runs included: nothing of a dead attempt runs on.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))

    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    summary = {"point_id": args.point_id, "node": args.node, "error": None, "seconds": {}}
    for setup in (["remote", "add", "--local", "--force", "--default", "cluster", args.dvc_remote],
                  *([["cache", "dir", "--local", args.cache]] if args.cache else [])):
        done = dvc(*setup, env=env)
        if done.returncode != 0:
            print(json.dumps(summary | {"error": f"dvc {' '.join(setup[:2])}: {failure(done)}"}))
            sys.exit(1)
    run_id, attempt = start_point_attempt(args.point_id, args.node)
    summary.update(run_id=run_id, attempt=attempt)
    env[ATTEMPT_RUN_VARIABLE] = run_id
    steps = [("exp", "run", "--pull", "--name", args.point_id, *(arg for o in args.overrides for arg in ("-S", o))),
             ("push", "--run-cache"),
             ("exp", "push", args.git_remote, args.point_id)]
    for step in steps:
        started = time.monotonic()
        done = dvc(*step, env=env)
        summary["seconds"][" ".join(step[:2])] = round(time.monotonic() - started, 1)
        if step[:2] == ("exp", "run"):
            summary["ran"] = [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage '")]
        if done.returncode != 0:
            summary["error"] = f"dvc {' '.join(step[:2])}: {failure(done)}"
            break
    if summary["error"]:
        fail_point_attempt(run_id)
    print(json.dumps(summary))
    sys.exit(1 if summary["error"] else 0)


if __name__ == "__main__":
    main()
