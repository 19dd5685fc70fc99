"""Screenshot MLflow's compare view of one sweep's runs (for README.md), with headless Chromium.

    python docs/screenshot_mlflow.py SWEEP_ID docs/mlflow_compare.png [--store sqlite:///mlflow.db]

Starts `mlflow ui` on a free loopback port (one worker, job execution off: ~0.5 GB), opens the
compare page of the sweep's point runs in Debian's chromium and saves a PNG. Needs `chromium`
(apt-get install chromium).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_id")
    parser.add_argument("output")
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--size", default="1600,1100")
    args = parser.parse_args()

    os.environ["MLFLOW_TRACKING_URI"] = args.store
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stages.track import finished_runs, open_store  # the one module that talks to MLflow

    client, experiment_id, _ = open_store()
    runs = [r for r in finished_runs(client, experiment_id) if r.data.tags.get("sweep_id") == args.sweep_id]
    if not runs:
        sys.exit(f"no runs tagged sweep_id={args.sweep_id} in {args.store}")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        ids = json.dumps([r.info.run_id for r in runs])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([experiment_id])})
        url = f"http://127.0.0.1:{port}/#/compare-runs?{query}"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-quic", f"--user-data-dir={profile}", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=30000",
                            f"--screenshot={Path(args.output).resolve()}", url],
                           check=True, capture_output=True, timeout=300)
        print(f"{args.output}: compare view of {len(runs)} runs of sweep {args.sweep_id}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
