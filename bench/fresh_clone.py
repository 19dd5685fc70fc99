"""A temporary clone of the committed repository, for the bench scripts that run the pipeline.

Your workspace is never touched: the scripts measure what is committed, in a directory of their own.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def fresh_clone(keep: bool = False):
    """Yield (clone, env): a clone of the repository's HEAD in a temporary directory, and the
    environment to run dvc there (this interpreter's dvc first on PATH, telemetry off).

    Removed afterwards unless ``keep`` (its path is then printed); kept when the body fails, so that
    the failure can be looked at.
    """
    workdir = Path(tempfile.mkdtemp(prefix="sda-bench-"))
    clone = workdir / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")
    yield clone, env
    if keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(workdir)
