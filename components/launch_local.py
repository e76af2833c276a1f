"""The local launch backend: `torchrun --standalone --nproc-per-node N --no-python maskdit train ...` as a
subprocess with the job's command and environment, so that the same DAG runs without a cluster.

torchrun starts each worker in a session of its own, so a timeout or a SIGTERM / Ctrl-C to the step
stops the whole process tree (SIGTERM, as Kubernetes does, then SIGKILL after a grace period), not
torchrun's process group: the workers must not outlive their step.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from components.launch_base import (
    TERMINATED_CLEANUP_S,
    JobFailed,
    JobTimeout,
    LaunchResult,
    StepTerminated,
    Terminated,
    sigterm_raises,
)
from components.pytorchjob import TrainJob
from maskdit.core import storage


def _executable(name: str) -> str:
    """`name` from this interpreter's environment first (a venv need not be on PATH)."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)


def local_command(job: TrainJob, nproc: int) -> list[str]:
    """The torchrun command that runs `job` on this machine with `nproc` processes (via maskdit.elastic if there)."""
    runner = "maskdit.elastic" if importlib.util.find_spec("maskdit.elastic") else "torch.distributed.run"
    return [sys.executable, "-m", runner, "--standalone", f"--nproc-per-node={nproc}",
            "--no-python", _executable(job.command[0]), *job.command[1:]]


def stop_tree(pid: int, grace_s: float) -> None:
    """SIGTERM `pid` and every process under it, SIGKILL whatever is left after `grace_s`.

    torchrun starts each worker in a session of its own, so killing torchrun's process group would
    leave the workers running (and holding the output pipe); they are found as descendants instead.
    SIGTERM first, as Kubernetes does: the trainer stops after its step and saves a checkpoint
    (maskdit.elastic)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def launch_local(job: TrainJob, nproc: int = 1, timeout_s: float = 86400.0, tail_lines: int = 50,
                 out=None, grace_s: float = 30.0) -> LaunchResult:
    """Run `job` with torchrun here, streaming its output; save it as `<checkpoint_uri>/logs/local.log`.
    After `timeout_s` every process of the job gets SIGTERM, and SIGKILL `grace_s` later."""
    out = out or sys.stdout
    cmd = local_command(job, nproc)
    print(f"[launcher] {' '.join(cmd)}", file=out, flush=True)
    env = {**os.environ, **job.env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        stop_tree(proc.pid, grace_s)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    terminated = False
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp, "local.log")
        try:
            with open(spool, "w") as saved, sigterm_raises():
                try:
                    for line in proc.stdout:
                        print(line, end="", file=out, flush=True)
                        saved.write(line)
                        tail.append(line.rstrip("\n"))
                except (Terminated, KeyboardInterrupt):  # the job must not outlive its step
                    terminated = True
                    stop_tree(proc.pid, min(grace_s, TERMINATED_CLEANUP_S))
            code = proc.wait()
        finally:
            timer.cancel()
        log_uris = {}
        uri = storage.join(job.checkpoint_uri, "logs", "local.log")
        try:
            storage.put_file(spool, uri)
            log_uris["local"] = uri
        except Exception as error:  # the log is diagnostics: never hide the job's own outcome behind it
            print(f"[launcher] could not save the log to {uri}: {error}", file=out, flush=True)
    text = "\n".join(tail)
    if terminated:
        raise StepTerminated(f"the step got SIGTERM or Ctrl-C: stopped local training job {job.name} (SIGTERM to "
                             f"torchrun and its workers, SIGKILL what was left); rerun the step to resume from its "
                             f"last checkpoint. Last log lines:\n{text}")
    if timed_out.is_set():
        raise JobTimeout(f"local training job {job.name} did not finish within {timeout_s:.0f}s and was killed. "
                         f"Last log lines:\n{text}")
    if code != 0:
        raise JobFailed(f"local training job {job.name} failed (exit code {code}). Last log lines:\n{text}")
    return LaunchResult(job=job.name, namespace="", log_uris=log_uris, tail=text)
