# SPDX-License-Identifier: Apache-2.0
"""Per-test time limits without a plugin: a hung engine fails its test instead of hanging
CI (SIGALRM in the main thread; POSIX only)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

DEFAULT_LIMIT_S = 900
"""Seconds one test may take, its fixtures' set-up and tear-down included (the slowest
e2e test takes about 3 minutes on the 2-core development machine)."""


class TestTimeLimitExceeded(Exception):
    """A test ran past its time limit."""

    __test__ = False  # not a test class


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise :class:`TestTimeLimitExceeded` in the main thread if the block runs longer
    than ``seconds`` (a no-op where SIGALRM does not exist)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):  # noqa: ANN001, ARG001
        raise TestTimeLimitExceeded(
            f"{what} ran past its time limit of {seconds} s (tests/time_limit.py; mark a "
            "test @pytest.mark.time_limit(seconds) to change it)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
