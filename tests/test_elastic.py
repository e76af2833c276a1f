"""Exit codes as Kubernetes reads them: the worker's (exit_for_restart_policy), the launcher's
(maskdit.elastic over torchrun), and the stop flag with its grace-period watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import typer

from maskdit.core.config import ConfigError
from maskdit.core.elastic import StopOnSignal, exit_code
from maskdit.core.errors import EXIT_RETRYABLE, EXIT_USER_ERROR, Interrupted, exit_for_restart_policy
from maskdit.method.checkpoint import CheckpointError


@pytest.mark.parametrize("codes, expected", [
    ([], 0),
    ([EXIT_USER_ERROR, -signal.SIGTERM], EXIT_USER_ERROR),  # a user error on one rank, the others stopped
    ([EXIT_RETRYABLE, EXIT_RETRYABLE], EXIT_RETRYABLE),
    ([-signal.SIGKILL], EXIT_RETRYABLE),  # the OOM killer
    ([137], EXIT_RETRYABLE),
    ([EXIT_RETRYABLE, -signal.SIGTERM], EXIT_RETRYABLE),  # e.g. an NCCL error, then torchrun stops the others
    ([1, -signal.SIGTERM], 1),  # a worker that failed outside `maskdit train`'s handling, the others stopped
    ([1, EXIT_RETRYABLE], 1),
])
def test_exit_code_of_failed_workers(codes, expected):
    assert exit_code(codes) == expected


@pytest.mark.parametrize("error, code, traceback", [
    (ConfigError("unknown key 'optim.learning_rate'"), EXIT_USER_ERROR, False),
    (CheckpointError("checkpoint s3://b/x is corrupt"), EXIT_USER_ERROR, False),
    (Interrupted("stopped on SIGTERM after step 7"), EXIT_RETRYABLE, False),
    (KeyboardInterrupt(), EXIT_RETRYABLE, False),
    (RuntimeError("NCCL error: unhandled system error"), EXIT_RETRYABLE, True),
])
def test_training_exit_codes(error, code, traceback, capsys):
    with pytest.raises(typer.Exit) as exit_info:
        with exit_for_restart_policy():
            raise error
    assert exit_info.value.exit_code == code
    err = capsys.readouterr().err
    assert str(error) in err
    assert ("Traceback" in err) == traceback  # only an unexpected failure shows one


def test_stop_on_signal_sets_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(grace_period_s=60) as stop:
        assert not stop.requested and stop.remaining() == 60
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
        assert stop.requested and stop.signal_name == "SIGTERM" and 0 < stop.remaining() <= 60
    assert signal.getsignal(signal.SIGTERM) is before


WATCHED = textwrap.dedent("""
    import sys, time
    from maskdit.core.elastic import StopOnSignal
    with StopOnSignal(grace_period_s=float(sys.argv[1])) as stop:
        print("ready", flush=True)
        while not stop.requested:
            time.sleep(0.01)
        time.sleep(float(sys.argv[2]))  # the last step and its checkpoint write
    print("stopped in time", flush=True)
""")


@pytest.mark.parametrize("grace, work, code, out", [(0.3, 30.0, EXIT_RETRYABLE, ""), (30.0, 0.2, 0, "stopped in time")])
def test_the_grace_period_bounds_the_stop(grace, work, code, out):
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, str(grace), str(work)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stdout.strip() == out and time.monotonic() - start < 20
    if code:
        assert "did not stop within checkpoint.grace_period_s=0.3 s of SIGTERM" in stderr


def _elastic(*worker: str) -> list[str]:
    return [sys.executable, "-m", "maskdit.elastic", "--standalone", "--nproc-per-node", "2", "--no-python",
            sys.executable, "-c", *worker]


@pytest.mark.slow
@pytest.mark.parametrize("worker, code", [
    ("import os; os.environ['RANK'] == '1' and os.kill(os.getpid(), 9)", EXIT_RETRYABLE),  # one rank SIGKILLed
    ("import os, sys; sys.exit(143 if os.environ['RANK'] == '0' else 0)", EXIT_RETRYABLE),
    ("import sys; sys.exit(1)", 1),  # (success, 0, and a user error, 2: tests/test_preemption.py)
])
def test_elastic_maps_worker_exits(worker, code):
    run = subprocess.run(_elastic(worker), capture_output=True, text=True, timeout=120)
    assert run.returncode == code, run.stderr[-3000:]


SLOW_TO_STOP = textwrap.dedent("""
    import os, signal, sys, time
    def stop(signum, frame):
        time.sleep(1.0)  # a checkpoint write after the signal
        open(os.path.join(sys.argv[1], os.environ["RANK"]), "w").write(signal.Signals(signum).name)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_sigterm_to_elastic_reaches_every_worker_and_waits_for_it(tmp_path):
    """torchrun forwards the signal and waits: each worker finishes its second of work; then 143 (torchrun: 1)."""
    proc = subprocess.Popen(_elastic(SLOW_TO_STOP, str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready = ""
    while ready.count("ready") < 2:  # both workers write to one pipe: their lines may interleave
        line = proc.stdout.readline()
        assert line, f"a worker did not start: {ready!r}"
        ready += line
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RETRYABLE, stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"SIGTERM"}
