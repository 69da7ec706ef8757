# SPDX-License-Identifier: Apache-2.0
"""Run ``vllm serve`` on loopback and talk to it (stdlib only; used by the demo and tests).

:class:`LocalServer` starts the server in its own process group on ``127.0.0.1`` with a
free port, waits for ``/health``, and always stops the whole group on exit (also on
Ctrl-C), so no engine process outlives the caller.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The server exited early or did not become healthy in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, payload: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def vllm_command() -> str:
    """The ``vllm`` console script of the running interpreter's environment."""
    return str(Path(sys.executable).with_name("vllm"))


def wait_for_health(base: str, proc: subprocess.Popen, log_path: Path,
                    timeout: float) -> None:
    """Poll ``base/health`` until 200; raise :class:`ServerError` if ``proc`` exits first
    or ``timeout`` seconds pass (the message carries the end of ``log_path``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"vllm serve exited with code {proc.returncode}:\n"
                              f"{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise ServerError(f"vllm serve did not become healthy within {timeout:.0f} s:\n"
                      f"{_tail(log_path)}")


def stop_process_group(proc: subprocess.Popen, grace: float = 60) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM its leader only,
    so that ``vllm serve`` shuts its engine-core processes down itself, in order; then
    SIGKILL whatever is left of the process group (or all of it after ``grace`` seconds).

    Signalling the whole group at once races: an engine core that exits on its own
    SIGTERM before the API server starts its shutdown makes the server log
    ``EngineDeadError`` with a traceback, although nothing went wrong. (vLLM 0.32 can
    still log one such traceback during its own orderly shutdown, vLLM issue #48745;
    :func:`server_log_problems` tells that one apart from real failures.)
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s group, then reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone
    proc.wait()


SHUTDOWN_MARK = "[shutdown] API server: shutdown triggered"
_SHUTDOWN_RACE = "AsyncLLM output_handler failed"


def server_log_problems(log: str) -> list[str]:
    """What in a ``vllm serve`` log says something went wrong: any traceback before the
    API server's shutdown began, and any after it except vLLM 0.32's own shutdown race.

    That race (vLLM issue #48745, fix proposed in vLLM PR #49000): ``AsyncLLM.shutdown``
    stops the engine core before it cancels its output handler, so the handler may log
    ``AsyncLLM output_handler failed.`` with an ``EngineDeadError`` traceback although the
    shutdown is orderly. Only that record, ending in ``EngineDeadError``, is let through
    (in a chained traceback each ``Traceback`` is a block of its own, and the later ones
    do not follow that message, so chaining is reported); remove the exception when vLLM
    ships the fix.

    Example: a log whose only traceback is ``... [async_llm.py:906] AsyncLLM output_handler
    failed.`` / ``... Traceback (most recent call last):`` / ``...`` / ``... EngineDeadError:
    ...`` after ``[shutdown] API server: shutdown triggered`` gives ``[]``; the same record
    before that line gives one problem.
    """
    before, _, after = log.partition(SHUTDOWN_MARK)
    problems = [f"a traceback while serving: {_exception_line(block)}"
                for block in _traceback_blocks(before)]
    problems += [f"a traceback during shutdown: {_exception_line(block)}"
                 for block in _traceback_blocks(after) if not _is_shutdown_race(block)]
    if "EngineDeadError" in before:
        problems.append("EngineDeadError while serving")
    return problems


def _traceback_blocks(text: str) -> list[list[str]]:
    """Each traceback in ``text`` as its lines: the log record's message line before
    ``Traceback (most recent call last):``, then every line up to the exception line (the
    first non-blank unindented line after the frames, log prefixes such as ``(APIServer
    pid=1) ERROR 12-01 14:34:37 [async_llm.py:906] `` stripped for that test)."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        prefix = line[:line.index("Traceback")]
        block = lines[max(i - 1, 0):i + 1]
        for follow in lines[i + 1:]:
            block.append(follow)
            body = follow[len(prefix):] if follow.startswith(prefix) else follow
            if body and not body[0].isspace():
                break
        blocks.append(block)
    return blocks


def _is_shutdown_race(block: list[str]) -> bool:
    """Whether ``block`` is vLLM's spurious output-handler ``EngineDeadError`` record."""
    return _SHUTDOWN_RACE in block[0] and "EngineDeadError" in block[-1]


def _exception_line(block: list[str]) -> str:
    """The block's last line (the exception, or the end of a truncated log), shortened."""
    return block[-1].strip()[-300:]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class LocalServer:
    """``with LocalServer(target, extra_args, log_path) as server: server.base ...``"""

    def __init__(self, target: str, extra_args: list[str], log_path: Path,
                 env: dict[str, str] | None = None, startup_timeout: float = 600) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [vllm_command(), "serve", target, "--host", "127.0.0.1",
                        "--port", str(self.port), *extra_args]
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE":
                    os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        try:
            wait_for_health(self.base, self.proc, self.log_path, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log_path, chars)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
