"""What both launch backends share: the errors a launch raises, its result, and SIGTERM to the step.

components/launcher.py (Kubernetes, and the `launch` entry point) and components/launch_local.py
(torchrun on this machine) both import this module, and nothing else of each other's.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

TERMINATED_CLEANUP_S = 20.0  # after SIGTERM, within the step pod's default 30 s grace period
POLL_ENV = "MASKDIT_LAUNCH_POLL_S"
DEFAULT_POLL_S = 15.0

Backend = Literal["kubernetes", "local"]


class LaunchError(RuntimeError):
    """The training job could not be created, failed, or did not finish in time."""


class JobFailed(LaunchError):
    pass


class JobPending(JobFailed):
    """A pod of the job stayed Pending (unschedulable, image not pulled, ...) past `pending_timeout_s`."""


class JobTimeout(LaunchError):
    pass


class DeadlinePassed(JobTimeout):
    """An earlier try of this step reached the deadline: the job is not started again."""


class StepTerminated(LaunchError):
    """The step itself got SIGTERM (KFP Terminate, its pod evicted or deleted): the job was deleted."""


class StepEvicted(StepTerminated):
    """The step's pod was evicted (a node drain) or otherwise disrupted: the job was left running for the retry."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no retry loop swallows it."""


def poll_interval() -> float:
    """Seconds between two looks at a running job (MASKDIT_LAUNCH_POLL_S, default 15): its status and pods, and
    the master's log when its stream broke."""
    from maskdit.core.config import env_seconds

    return env_seconds(POLL_ENV, DEFAULT_POLL_S, example=DEFAULT_POLL_S)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, the first SIGTERM raises `Terminated` in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:  # a second SIGTERM must not cut the cleanup the first one started
            fired.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class LaunchResult:
    """What a finished launch leaves: the job, where every replica's log was saved, the master's last lines."""

    job: str
    namespace: str  # "" for the local backend
    log_uris: dict[str, str]  # pod (or "local") -> URI of its saved log
    tail: str
