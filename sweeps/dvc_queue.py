"""DVC commands and DVC's experiment queue, run so that nothing of them outlives the command.

`dvc exp run --run-all --jobs N` starts each queue worker from a forked helper process that
inherits the caller's stdout and stderr and waits for its worker. A worker normally exits once it
has been idle a few seconds, but on some machines one sleeps on long after the queue is empty, and
whatever reads those pipes (``subprocess.run(..., capture_output=True)``) waits with it. So every
dvc command here writes its output to files, and after the queue has run its workers are asked to
stop (`dvc queue stop`), given a grace period, then killed, with a line saying so.
"""

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil

STOP_HINT = "see them with `dvc queue status`, stop them with `dvc queue stop`"
# Ctrl-C outside a queue run (between a sweep's phases or rounds) ends a sweep at once: no worker runs then.
SWEEP_INTERRUPTED = "no queue worker was running; run the command again with the same id to finish what is missing"


class SweepError(RuntimeError):
    """A sweep (sweeps.ablate, sweeps.noise, sweeps.table1) cannot start or one of its points failed."""


def run_to_files(cmd: list[str] | tuple[str, ...], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)`` with no standard input and its output read back from files,
    never from pipes, which a detached DVC queue worker could inherit and hold open."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        returncode = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, **kwargs).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())


def dvc(*args: str, env: dict | None = None, echo: bool = True) -> str:
    """Run ``dvc args`` in the working directory; its stdout, or SweepError with its output's end."""
    if echo:
        print("$ dvc " + " ".join(args), flush=True)
    done = run_to_files(["dvc", *args], env=env)
    if done.returncode != 0:
        raise SweepError(f"`dvc {' '.join(args)}` failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def set_args(overrides: dict[str, object]) -> list[str]:
    """`dvc exp run` arguments: ``-S key=value`` (``-S ~key`` removes; a dict of numbers is written {a:1,b:2})."""
    def hydra_value(value) -> str:
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}" if isinstance(value, dict) else str(value)

    return [arg for key, value in overrides.items() for arg in ("-S", key if key.startswith("~") else f"{key}={hydra_value(value)}")]


def error_line(output: str, empty: str, prefixes: tuple[str, ...] = ("error:",)) -> str:
    """The last line of ``output`` starting with one of ``prefixes`` (the stages print one
    `error: ...` line; dvc itself writes `ERROR: ...`), else its last line, else ``empty``."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(prefixes)]
    return (errors or lines or [empty])[-1]


def queue_entries() -> dict[str, str]:
    """{experiment name: status} of the entries `dvc queue status` lists (Queued, Running, Success, Failed, Unknown)."""
    entries = {}
    for line in dvc("queue", "status", echo=False).splitlines():
        words = line.split()
        # Task, Name, Created (one or more words), Status: an entry's last word is its status.
        if len(words) >= 4 and words[-1] in ("Queued", "Running", "Success", "Failed", "Unknown"):
            entries[words[1]] = words[-1]
    return entries


def remove_queue_entries(which: Callable[[str, str], bool]) -> list[str]:
    """Remove the queue's entries for which ``which(name, status)`` holds; return their names."""
    chosen = sorted(name for name, status in queue_entries().items() if which(name, status))
    if chosen:
        dvc("queue", "remove", *chosen, echo=False)
    return chosen


def is_dvc(process: psutil.Process) -> bool:
    """True for a dvc command line: the `dvc` entry point or ``python .../dvc/__main__.py`` (dvc's daemons)."""
    return any(Path(arg).name == "dvc" or arg.endswith(f"dvc{os.sep}__main__.py") for arg in process.cmdline()[:2])


def repo_processes(repo: Path, since: float = 0.0, dvc_only: bool = True) -> list[psutil.Process]:
    """Live processes working inside ``repo`` (their working directory is in it), started at ``since``
    or later, this process and its ancestors excepted.

    With ``dvc_only``, the dvc processes among them (queue workers and their helpers, `dvc exp
    exec-run`) and everything those started (the stages of an experiment), and whatever runs in an
    experiment's temporary copy (.dvc/tmp/exps/): a stage just started by a dvc process killed a
    moment later is nobody's child any more, but still works there.
    """
    repo = repo.resolve()
    experiments = repo / ".dvc" / "tmp" / "exps"
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if process.pid in own or process.create_time() < since:
                continue
            cwd = Path(process.cwd())
            if cwd != repo and repo not in cwd.parents:
                continue
            if not dvc_only or experiments in cwd.parents:
                found[process.pid] = process
            elif is_dvc(process):
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def describe(processes: list[psutil.Process]) -> str:
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} ({' '.join(process.cmdline()[1:5])})")
        except psutil.Error:
            names.append(str(process.pid))
    return ", ".join(names)


def kill(processes: list[psutil.Process], grace: float = 3.0) -> None:
    """SIGTERM (and SIGCONT, for a stopped one), then SIGKILL for what is still alive after ``grace`` seconds."""
    for process in processes:
        try:
            process.terminate()
            process.resume()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def stop_workers(repo: Path, since: float, kill_running: bool = False, grace: float = 5.0) -> str:
    """Stop the queue workers of ``repo`` started at ``since`` or later; describe those that had to be killed ("" if none).

    `dvc queue stop` asks the workers to exit (``kill_running`` also kills the experiments they are
    running); whatever dvc process of the queue is still alive ``grace`` seconds later is killed.
    """
    # psutil's start times rest on a boot time rounded to the second: a worker started in the same
    # second as ``since`` may read as up to a second earlier.
    since -= 2.0
    # Listed before the stop too: a running experiment's stage is a dvc process's child only until
    # `--kill` ends that dvc process.
    before = repo_processes(repo, since)
    try:
        dvc("queue", "stop", *(["--kill"] if kill_running else []), echo=False)
    except SweepError as err:  # the processes are killed below all the same
        print(f"warning: {err}", flush=True)
    ours = {process.pid: process for process in [*before, *repo_processes(repo, since)]}
    _, lingering = psutil.wait_procs(list(ours.values()), timeout=grace)
    killed = [describe(lingering)] if lingering else []
    kill(lingering)
    # A worker being stopped may still start its next experiment: list again until none is left.
    for _ in range(5):
        late = repo_processes(repo, since)
        if not late:
            break
        killed.append(describe(late))
        kill(late)
    else:
        if late := repo_processes(repo, since):
            print(f"warning: DVC queue processes still alive after five rounds of kills: {describe(late)}; {STOP_HINT}", flush=True)
    # An experiment killed with its worker stays "Running" in the queue's records: mark it failed.
    try:
        stale = [name for name, status in queue_entries().items() if status == "Running"]
        if stale:
            dvc("queue", "kill", *stale, echo=False)
    except SweepError as err:
        print(f"warning: {err}", flush=True)
    clear_worker_mailboxes(repo)
    return ", ".join(killed)


def clear_worker_mailboxes(repo: Path) -> None:
    """Drop the control messages left for queue workers that no longer run.

    `dvc queue stop` broadcasts a shutdown to every worker name the queue has known. DVC's
    file-based broker keeps the message of a worker that had already exited, and the next worker
    started under that name (the next sweep's second worker) reads it and exits at once: the
    sweep then runs on one worker. With none of the repository's workers alive, no message there
    is still for anyone.
    """
    for process in repo_processes(repo):
        try:
            if "queue-worker" in " ".join(process.cmdline()):
                return
        except psutil.Error:  # exited since the listing: not a worker any more
            continue
    for message in (repo / ".dvc" / "tmp" / "exps" / "celery" / "broker" / "in").glob("*.celery.pidbox.msg"):
        message.unlink(missing_ok=True)


@contextlib.contextmanager
def stop_signals_interrupt():
    """Inside the block, SIGINT (Ctrl-C), SIGTERM (`kill`, a job scheduler) and SIGHUP (a closed
    terminal) raise KeyboardInterrupt, so that the code around it stops what it started: left to
    their defaults, SIGTERM and SIGHUP end the process at once and orphan the queue's workers, and
    the stages' SIGINT handler exits at once."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def queue_is_busy() -> bool:
    """True while the queue holds an entry queued or running, or when `dvc queue status` cannot tell."""
    try:
        return any(status in ("Queued", "Running") for status in queue_entries().values())
    except SweepError:
        return True


def run_all(jobs: int, env: dict | None = None, poll: float = 60.0, idle_limit: float = 120.0) -> None:
    """`dvc exp run --run-all --jobs N`, stopped when the queue has held nothing queued or running
    for ``idle_limit`` seconds: it waits for the result of every entry it started with, and one
    removed meanwhile (`dvc queue remove`) never gives one."""
    args = ["exp", "run", "--run-all", "--jobs", str(jobs)]
    print("$ dvc " + " ".join(args), flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(["dvc", *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        idle_since = None
        try:
            while True:
                try:
                    process.wait(timeout=poll)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if queue_is_busy():
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= idle_limit:
                    print(f"warning: `dvc {' '.join(args)}` still waits {idle_limit:.0f} s after the queue ran its last "
                          "experiment (an entry removed while it ran, with `dvc queue remove`?): stopping it", flush=True)
                    return
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if process.returncode != 0:
            out.seek(0)
            err.seek(0)
            raise SweepError(f"`dvc {' '.join(args)}` failed:\n{out.read()[-3000:]}{err.read()[-3000:]}")


def run_queue(jobs: int, env: dict | None = None) -> None:
    """Run every queued experiment of the working directory's repository with ``jobs`` workers.

    Returns when the queue is done and none of its workers is left. When dvc fails or Ctrl-C,
    SIGTERM or SIGHUP interrupts, the workers and the experiments they run are stopped before the
    error goes on. A worker still alive after the queue is done is killed, and a `--run-all` still
    waiting two minutes after the queue went idle is stopped, each with a line saying so.
    """
    repo, started, done = Path.cwd(), time.time(), False
    try:
        with stop_signals_interrupt():
            run_all(jobs, env)
        done = True
    except KeyboardInterrupt:
        raise SweepError("interrupted: the queue's workers and the experiments they ran were stopped; "
                         "run the command again to finish what is missing") from None
    finally:
        killed = stop_workers(repo, started, kill_running=not done)
        if killed:
            print(f"stopped DVC queue processes still alive after the queue ran: {killed}; {STOP_HINT}", flush=True)
