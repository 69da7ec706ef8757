# SPDX-License-Identifier: Apache-2.0
"""Run the configurations of one bench invocation cell by cell, interleaved.

A shared machine drifts: on this project's 2-core CPU the plain baseline has read 85.8 and
67.4 tok/s a few minutes apart. Run configuration by configuration (all of ``none``'s cells,
then all of ``redrafter``'s), each ratio compares two engines measured minutes apart and
carries that drift. Here every configuration's engine is started once (one after the other,
so that start-up timings such as ``draft_int8=auto``'s are not taken under contention) and
kept alive in its own subprocess (:func:`vllm_redrafter.bench.worker.serve`); then each
(temperature, concurrency) cell runs on every engine back to back before the next cell
starts, in an order that alternates from cell to cell and round to round
(:func:`cell_order`), so both sides of a ratio are measured within the same minute and
neither side always goes first. Idle engines wait on a pipe and use no CPU.

A configuration whose engine fails to start, crashes or times out is reported as failed
for its remaining cells; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from vllm_redrafter.bench.report import CellResult
from vllm_redrafter.bench.runner import (BenchSettings, cell_from_json, worker_env,
                                          write_job)
from vllm_redrafter.logger import get_logger
from vllm_redrafter.server import stop_process_group

logger = get_logger(__name__)

WORKER_COMMAND = (sys.executable, "-m", "vllm_redrafter.bench.worker", "--serve")
"""How a live configuration is started (followed by JOB.json and the reply fd)."""


def cell_order(configs: Sequence[str], cell_index: int, round_: int) -> list[str]:
    """The order in which the configurations run one cell: as given on even
    ``cell_index + round_``, reversed on odd, so that no configuration always runs first.

    >>> cell_order(["none", "redrafter"], 0, 0), cell_order(["none", "redrafter"], 1, 0)
    (['none', 'redrafter'], ['redrafter', 'none'])
    >>> cell_order(["none", "redrafter"], 1, 1)
    ['none', 'redrafter']
    """
    order = list(configs)
    return order if (cell_index + round_) % 2 == 0 else order[::-1]


class LiveConfig:
    """One configuration's engine in a ``worker --serve`` subprocess.

    ``start`` launches it and waits until it has warmed up; ``run_cell`` sends one cell
    command and waits for its result; ``close`` asks it to quit (then kills it). After any
    failure ``error`` says what happened and every later cell comes back failed.
    """

    def __init__(self, name: str, spec: dict[str, Any] | None, settings: BenchSettings,
                 workdir: Path, log_path: Path | None = None,
                 command: Sequence[str] = WORKER_COMMAND) -> None:
        self.name, self.spec, self.settings = name, spec, settings
        self.workdir, self.log_path, self.command = workdir, log_path, tuple(command)
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self._reply_fd: int | None = None
        self._buffer = b""

    def start(self) -> None:
        """Launch the engine and wait (up to the settings' timeout) until it is ready;
        on failure ``error`` says why."""
        job = write_job(self.workdir / f"{self.name}.job.json", self.name, self.spec,
                        self.settings)
        read_fd, write_fd = os.pipe()
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [*self.command, str(job), str(write_fd)], stdin=subprocess.PIPE,
                stdout=log, stderr=subprocess.STDOUT, env=worker_env(), pass_fds=(write_fd,),
                start_new_session=True)  # its engine-core processes go with it
        except OSError as exc:
            os.close(read_fd)
            self._fail(f"could not start: {exc}")
            return
        finally:
            os.close(write_fd)
            if self.log_path:
                log.close()
        self._reply_fd = read_fd
        self._read_reply("start")  # {"ready": true} once warmed up

    def run_cell(self, temperature: float, concurrency: int) -> CellResult:
        """Measure one cell on this engine; a failed cell if the engine is gone."""
        if self.error is None:
            command = {"op": "cell", "temperature": temperature, "concurrency": concurrency}
            try:
                self.proc.stdin.write((json.dumps(command) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                self._fail(f"engine gone: {exc}")
            else:
                reply = self._read_reply(f"c={concurrency} T={temperature}")
                if reply is not None and "cell" in reply:
                    return cell_from_json(reply["cell"])
        return CellResult(config=self.name, concurrency=concurrency,
                          temperature=temperature, status="failed", error=self.error)

    def request_quit(self) -> None:
        """Ask the engine to quit (without waiting: engines shut down side by side)."""
        if self.proc is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    def close(self) -> None:
        """Ask the engine to quit; stop its process group if it has not within 60 s."""
        self.request_quit()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            stop_process_group(self.proc, grace=10)
        if self._reply_fd is not None:
            os.close(self._reply_fd)
            self._reply_fd = None

    def _read_reply(self, what: str) -> dict[str, Any] | None:
        """The next JSON line from the engine, or None (and ``error`` set) when it exits
        or the settings' timeout passes first."""
        deadline = time.monotonic() + self.settings.timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"{what} timed out after {self.settings.timeout_s:.0f} s")
                return None
            ready, _, _ = select.select([self._reply_fd], [], [], min(left, 1.0))
            chunk = os.read(self._reply_fd, 65536) if ready else None
            # EOF, or the worker gone while a forked child of it still holds the pipe
            if chunk == b"" or (not chunk and self.proc.poll() is not None):
                self._fail(f"{what}: exited with code {self.proc.wait()}")
                return None
            if chunk:
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _fail(self, error: str) -> None:
        if self.log_path:
            error += f" (log: {self.log_path})"
        self.error = error
        logger.warning("bench configuration %s failed: %s", self.name, error)
        if self.proc is not None:
            stop_process_group(self.proc, grace=1)


def run_interleaved(names: Sequence[str], specs: dict[str, dict[str, Any] | None],
                    settings: BenchSettings, repeats: int = 1,
                    out_dir: Path | None = None,
                    command: Sequence[str] = WORKER_COMMAND) -> list[CellResult]:
    """Every cell of every configuration, ``repeats`` rounds, interleaved (module
    docstring); each cell's ``repeat`` is its round."""
    measured: list[CellResult] = []
    with tempfile.TemporaryDirectory(prefix="redrafter-bench-") as tmp:
        live = [LiveConfig(name, specs[name], settings, Path(tmp),
                           log_path=out_dir / f"{name}.log" if out_dir else None,
                           command=command) for name in names]
        try:
            for config in live:
                print(f"[bench] starting {config.name} ({len(settings.prompts)} prompts)...",
                      file=sys.stderr, flush=True)
                config.start()
            by_name = {config.name: config for config in live}
            grid = [(t, c) for t in settings.temperatures for c in settings.concurrency]
            for round_ in range(repeats):
                for index, (temperature, concurrency) in enumerate(grid):
                    for name in cell_order(names, index, round_):
                        cell = by_name[name].run_cell(temperature, concurrency)
                        measured.append(dataclasses.replace(cell, repeat=round_))
        finally:
            for config in live:
                config.request_quit()
            for config in live:
                config.close()
    return sorted(measured, key=lambda cell: _report_position(cell, names, settings))


def _report_position(cell: CellResult, names: Sequence[str], settings: BenchSettings
                     ) -> tuple[int, int, int, int]:
    """Where a cell stands in the report: by round, then configuration, temperature and
    concurrency in the order given (the order a sequential run measures them in)."""
    return (cell.repeat, list(names).index(cell.config),
            settings.temperatures.index(cell.temperature),
            settings.concurrency.index(cell.concurrency))
