# SPDX-License-Identifier: Apache-2.0
"""``server_log_problems`` on literal ``vllm serve`` logs: vLLM 0.32's spurious shutdown
traceback (vLLM issue #48745, lines copied from a CI run's log) passes; every other
traceback, and that same record while serving, is reported."""

from __future__ import annotations

from vllm_redrafter.server import SHUTDOWN_MARK, server_log_problems

_P = "(APIServer pid=21776) ERROR 12-01 14:34:37 [async_llm.py:906] "
_RACE = "\n".join([
    _P + "AsyncLLM output_handler failed.",
    _P + "Traceback (most recent call last):",
    _P + '  File "/v/vllm/v1/engine/async_llm.py", line 849, in output_handler',
    _P + "    outputs = await engine_core.get_output_async()",
    _P + "              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    _P + '  File "/v/vllm/v1/engine/core_client.py", line 1235, in get_output_async',
    _P + "    raise self._format_exception(outputs) from None",
    _P + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
         "See stack trace (above) for the root cause.",
])
_SERVING = "\n".join([
    "(APIServer pid=21776) INFO 12-01 14:33:55 [api_server.py:1] ReDrafter speculative "
    "decoding: tree",
    "(APIServer pid=21776) INFO 12-01 14:34:30 [loggers.py:1] Avg generation throughput",
])
_SHUTDOWN = "\n".join([
    "(APIServer pid=21776) INFO 12-01 14:34:36 [launcher.py:254] " + SHUTDOWN_MARK,
    "(APIServer pid=21776) INFO 12-01 14:34:36 [launcher.py:271] [shutdown] API server: "
    "stopping engine client mode=abort timeout=0s",
])
_AFTER = "\n".join([
    "(APIServer pid=21776) INFO 12-01 14:34:37 [launcher.py:279] [shutdown] API server: "
    "engine client stopped",
    "INFO:     Application shutdown complete.",
    "nanobind: leaked 4 instances!",
])
_CRASH = "\n".join([
    "(EngineCore pid=21900) ERROR 12-01 14:34:20 [core.py:1505] EngineCore encountered a "
    "fatal error.",
    "(EngineCore pid=21900) ERROR 12-01 14:34:20 [core.py:1505] Traceback (most recent "
    "call last):",
    '(EngineCore pid=21900) ERROR 12-01 14:34:20 [core.py:1505]   File "/x.py", line 3, '
    "in step",
    "(EngineCore pid=21900) ERROR 12-01 14:34:20 [core.py:1505] IndexError: index 7 is "
    "out of bounds",
])


def _log(*parts: str) -> str:
    return "\n".join(parts) + "\n"


def test_a_clean_log_has_no_problems():
    assert server_log_problems(_log(_SERVING, _SHUTDOWN, _AFTER)) == []


def test_vllms_shutdown_race_after_the_shutdown_mark_is_let_through():
    assert server_log_problems(_log(_SERVING, _SHUTDOWN, _RACE, _AFTER)) == []


def test_the_same_record_while_serving_is_a_problem():
    # Negative control for the exception: before the shutdown mark, the identical record
    # means the engine died under load.
    problems = server_log_problems(_log(_SERVING, _RACE, _SHUTDOWN, _AFTER))
    assert any("while serving" in p and "EngineDeadError" in p for p in problems)


def test_an_engine_crash_during_shutdown_is_a_problem():
    problems = server_log_problems(_log(_SERVING, _SHUTDOWN, _CRASH, _RACE, _AFTER))
    assert problems == ["a traceback during shutdown: " + _CRASH.splitlines()[-1]]


def test_a_crash_while_serving_is_a_problem_and_names_the_exception():
    problems = server_log_problems(_log(_SERVING, _CRASH, _SHUTDOWN, _AFTER))
    assert len(problems) == 1 and "IndexError: index 7 is out of bounds" in problems[0]


def test_an_output_handler_failure_that_is_not_engine_dead_is_a_problem():
    other = _RACE.replace("vllm.v1.engine.exceptions.EngineDeadError: EngineCore "
                          "encountered an issue.", "KeyError: 'req-3'.")
    problems = server_log_problems(_log(_SERVING, _SHUTDOWN, other, _AFTER))
    assert len(problems) == 1 and "KeyError" in problems[0]


def test_a_plain_unprefixed_traceback_is_found():
    raw = "\n".join(["Traceback (most recent call last):", '  File "a.py", line 1, in f',
                     "    g()", "RuntimeError: boom"])
    problems = server_log_problems(_log(_SERVING, raw, _SHUTDOWN))
    assert problems == ["a traceback while serving: RuntimeError: boom"]


def test_a_race_record_chained_to_another_exception_is_a_problem():
    # The handler's EngineDeadError raised while handling a real error: the first
    # traceback ends in that error, the chained one does not follow the handler's
    # message; both are reported.
    first = _RACE.splitlines()[:3] + [_P + "KeyError: 'req-3'", _P,
                                      _P + "During handling of the above exception, "
                                           "another exception occurred:", _P]
    chained = "\n".join(first + _RACE.splitlines()[1:])
    problems = server_log_problems(_log(_SERVING, _SHUTDOWN, chained, _AFTER))
    assert problems == ["a traceback during shutdown: " + _P.strip() + " KeyError: 'req-3'",
                        "a traceback during shutdown: " + _RACE.splitlines()[-1].strip()]
