# SPDX-License-Identifier: Apache-2.0
"""The per-test time limit stops a hung block, and leaves a quick one alone."""

from __future__ import annotations

import time

import pytest

from tests.time_limit import TestTimeLimitExceeded, time_limit


def test_a_block_past_its_limit_is_stopped():
    start = time.monotonic()
    with pytest.raises(TestTimeLimitExceeded, match="past its time limit of 1 s"):
        with time_limit(1, "a hung block"):
            time.sleep(5)
    assert time.monotonic() - start < 3


def test_a_quick_block_is_left_alone_and_the_alarm_is_cleared():
    with time_limit(2, "a quick block"):
        time.sleep(0.01)
    time.sleep(2.2)  # no alarm left behind


@pytest.mark.time_limit(30)
def test_the_marker_sets_the_limit(request):
    assert request.node.get_closest_marker("time_limit").args == (30,)
