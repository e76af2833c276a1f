"""Transient failures retried in process: jittered exponential backoff within one time budget.

A call that raises `ServiceUnavailable` (MLflow or the object store down, timed out, 5xx,
throttling, overload) is tried again after 0.5, 1, 2, 4 ... s (capped at 30 s), each wait drawn
from [d/2, d] so that many pods that lost the same service do not come back in step. When the
budget (MASKDIT_RETRY_BUDGET_S, default 300 s: longer than an MLflow pod's `Recreate` or a node
drain) is spent, the last error is raised with that said, and the step exits 143 (a restart may
find the service back). Any other error, permanent ones included, is raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from maskdit.core.config import env_seconds
from maskdit.core.errors import ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

BUDGET_ENV = "MASKDIT_RETRY_BUDGET_S"
DEFAULT_BUDGET_S = 300.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
_jitter = random.Random()  # its own generator: a retry never moves the global RNG a seeded run relies on


def budget_s() -> float:
    """Seconds a transient failure is retried in process (MASKDIT_RETRY_BUDGET_S; 0: not retried)."""
    return env_seconds(BUDGET_ENV, DEFAULT_BUDGET_S, example=DEFAULT_BUDGET_S, zero_ok=True, infinite_ok=True)


def retrying(call: Callable[[], T], what: str, budget: float | None = None) -> T:
    """`call()`, retried while it raises `ServiceUnavailable` and `budget` s (default `budget_s()`) last."""
    budget = budget_s() if budget is None else budget
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except ServiceUnavailable as error:
            left = deadline - time.monotonic()
            if left <= 0:
                if budget > 0:
                    error.args = ((f"{error} (still failing after {budget:g} s of retries, {BUDGET_ENV}; "
                                   "exiting 143 so that the step is restarted)"),)
                raise
            delay = min(left, MAX_DELAY_S, FIRST_DELAY_S * 2 ** min(attempt, 16))
            delay = _jitter.uniform(delay / 2, delay)
            log.warning("%s: %s; retrying in %.1f s (%.0f s of the retry budget left)", what, error, delay, left)
            time.sleep(delay)
            attempt += 1
