"""Stopping on SIGTERM, and exit codes that Kubernetes can act on, for training under torchrun.

A pod that is preempted, drained or deleted gets SIGTERM, and SIGKILL `terminationGracePeriodSeconds`
later. The contract, from the outside in:

- The container's top process is `python -m maskdit.elastic <torchrun args>`: torchrun in this
  process. SIGTERM/SIGINT reach it, torchrun sends the same signal to every worker and waits for
  them (up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which this module raises from torchrun's 30 s to
  600 s unless set: the workers bound themselves, see below), then this process exits with
      2   (EXIT_USER_ERROR) when a worker exited 2 (a config or data error: never retried), and for
          bad torchrun arguments;
      1   when a worker exited with another code below 128 (outside `maskdit train`'s handling);
      143 (EXIT_RETRYABLE) when every failed worker exited 143 or was killed by a signal (OOM killer,
          SIGKILL), when this process got SIGTERM/SIGINT, or when the rendezvous failed (a peer node
          not up in time): the pod is restarted and resumes;
      0   on success.
  When one worker fails, torchrun stops the others with SIGTERM; their exits never hide the code of
  the one that failed first. torchrun alone exits 1 in all of these cases, which
  `restartPolicy: ExitCode` reads as permanent.
- Each worker (`maskdit train`) holds a `StopOnSignal`: the signal only sets a flag; every rank
  adds its flag to the step's one all-reduce, so all ranks stop after the same step; every
  rank writes its shard of that step's checkpoint and rank 0 commits it (maskdit/method/sharded.py), MLflow closes the run as KILLED, and the command
  exits 143. If `grace_period_s` after the signal the process is still alive (a checkpoint write
  that is too slow, a peer that hangs), a watchdog exits it with 143 at once: a checkpoint write
  in flight is abandoned (a folder without its commit marker, a hidden `.partial` file, or an
  invisible unfinished S3 upload), the
  newest complete checkpoint stays the one a restart resumes from.

Usage (the PyTorchJob container's command):

    python -m maskdit.elastic --nproc-per-node 8 --no-python maskdit train --config cfg.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType, TracebackType

from maskdit.core.errors import EXIT_RETRYABLE, EXIT_USER_ERROR, is_retryable_exit

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SHUTDOWN_TIMEOUT_S = 600  # torchrun's wait for its workers after a signal, before it SIGKILLs them


#################################################################################
#                        The worker: stop at a step boundary                    #
#################################################################################


class StopOnSignal:
    """While entered: SIGTERM/SIGINT set `requested` instead of killing; `grace_period_s` later the
    process exits with 143 whatever it is doing. A second signal changes nothing.

    Handlers can only be installed from the main thread; elsewhere the signals keep their defaults.
    """

    def __init__(self, grace_period_s: float):
        self.grace_period_s = grace_period_s
        self.signal_name: str | None = None  # of the first signal received
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._signalled = threading.Event()
        self._done = threading.Event()
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def remaining(self) -> float:
        """Seconds of the grace period left (the whole period before any signal)."""
        if self.received_at is None:
            return self.grace_period_s
        return self.grace_period_s - (time.monotonic() - self.received_at)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            threading.Thread(target=self._watchdog, name="maskdit-stop-watchdog", daemon=True).start()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._done.set()
        self._signalled.set()  # lets an idle watchdog end

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received_at is None:  # kept minimal (it interrupts the main thread anywhere): no logging
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            self._signalled.set()

    def _watchdog(self) -> None:
        self._signalled.wait()
        if self._done.is_set() or self._done.wait(max(self.remaining(), 0.0)):
            return
        log.error("training did not stop within checkpoint.grace_period_s=%g s of %s: exiting with %d now; a "
                  "checkpoint write in flight is abandoned and the newest complete checkpoint stays the one "
                  "to resume from (raise checkpoint.grace_period_s and the pod's terminationGracePeriodSeconds)",
                  self.grace_period_s, self.signal_name, EXIT_RETRYABLE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_RETRYABLE)


#################################################################################
#                   The launcher: torchrun with exit codes that mean something  #
#################################################################################


def exit_code(worker_codes: Iterable[int]) -> int:
    """The exit code for the pod from the failed workers' codes (negative: killed by that signal).

    When one worker fails, torchrun stops the others with SIGTERM: their -15 (or 143, from a worker that
    stops cleanly) come with the code of the one that failed first. Those are always retryable codes,
    so a permanent code (1-127) among them is the cause and wins; 2 (a user error) before any other.
    """
    codes = list(worker_codes)
    if not codes:
        return 0
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    if any(code > 0 and not is_retryable_exit(code) for code in codes):  # the one classification (errors.py)
        return 1  # torchrun's own code for a failed worker
    return EXIT_RETRYABLE  # every failure was a signal (OOM killer, SIGKILL, SIGTERM) or a retryable exit


def _raise_signal(signum: int, frame: FrameType | None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"process {os.getpid()} got signal {signal.Signals(signum).name}",
                          sigval=signal.Signals(signum))


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv` in this process; return the exit code described in the module docstring."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    for sig in STOP_SIGNALS:  # until torchrun installs its own handlers (which raise the same exception)
        signal.signal(sig, _raise_signal)
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
        code = exit_code(codes.values())
        print(f"maskdit.elastic: workers failed with exit codes {codes} (negative: killed by that signal); "
              f"exiting with {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as error:
        print(f"maskdit.elastic: got {error.sigval.name}; the workers were asked to stop; exiting with "
              f"{EXIT_RETRYABLE}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    except RendezvousError as error:
        print(f"maskdit.elastic: rendezvous failed ({type(error).__name__}: {error}); exiting with "
              f"{EXIT_RETRYABLE}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
