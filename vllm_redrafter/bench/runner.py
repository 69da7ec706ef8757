# SPDX-License-Identifier: Apache-2.0
"""Run benchmark configurations side by side, one engine per configuration.

Each configuration (``none``, ``ngram``, ``redrafter``...) runs in its own subprocess
(:mod:`vllm_redrafter.bench.worker`), so a configuration that fails to start or crashes is
reported as failed without aborting the others, and every engine gets a clean process.
Inside the subprocess one ``LLM`` engine runs every (temperature, concurrency) cell with
the same pre-tokenized prompts; concurrency ``c`` keeps exactly ``c`` requests in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vllm_redrafter.bench.report import CONTROL, CellResult, SpecCounters
from vllm_redrafter.logger import get_logger

logger = get_logger(__name__)


@dataclasses.dataclass
class BenchSettings:
    """What every configuration of one invocation shares."""

    target: str
    prompts: list[list[int]]  # pre-tokenized chat prompts
    max_tokens: int
    concurrency: list[int]
    temperatures: list[float]
    dtype: str = "float32"
    max_model_len: int = 2048
    seed: int = 0
    timeout_s: float = 3600.0
    max_steal: float | None = None
    """Measure a cell again while the hypervisor stole more than this share of the
    machine's CPU time during it (None: never)."""
    steal_retries: int = 0
    """At most this many more measurements of a cell (``max_steal``)."""


def config_specs(drafter: str | None, beam_width: int, beam_length: int,
                 ngram_tokens: int = 4,
                 names: list[str] | tuple[str, ...] = ()) -> dict[str, dict[str, Any] | None]:
    """The speculative configs compared by ``bench``, keyed by name.

    Always ``none``, ``none-control`` (:data:`CONTROL_CONFIG`), ``ngram``, and (with a
    drafter) ``redrafter`` (chain) and ``redrafter-tree`` at the given beam settings, and
    ``redrafter-default`` (only the drafter: every option at the plugin's default, as
    ``make demo`` serves it). Any name of ``names`` of the form
    ``redrafter[-tree]@W<w>L<l>`` adds that configuration, e.g. ``redrafter@W1L5`` (chain,
    one beam) or ``redrafter-tree@W2L4``.
    """
    specs: dict[str, dict[str, Any] | None] = {
        "none": None,
        CONTROL_CONFIG: None,
        "ngram": {"method": "ngram", "num_speculative_tokens": ngram_tokens,
                  "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    }
    if drafter:
        specs["redrafter"] = _redrafter_spec(drafter, beam_width, beam_length, tree=False)
        specs["redrafter-tree"] = _redrafter_spec(drafter, beam_width, beam_length, tree=True)
        specs[DEFAULT_CONFIG] = {"method": "redrafter", "model": str(drafter)}
        for name in names:
            spec = _named_spec(name, drafter, specs)
            if spec is not None:
                specs[name] = spec
    return specs


CONTROL_CONFIG = CONTROL
"""A second engine without speculation, measured like any other config: its ratio to
``none`` (an A/A comparison) shows how far two identical engines read apart in that cell,
the noise band every other ratio of the run sits in."""

DEFAULT_CONFIG = "redrafter-default"
"""The config serving the drafter with every option at the plugin's default."""

AUTO_SUFFIX = "+auto"
"""Config-name suffix that turns load-aware drafting on (``"adaptive": true``)."""

LOOKUP_SUFFIX = "+lookup"
"""Config-name suffix that adds context look-up branches to a tree config (``"lookup":
true``: the defaults of :class:`~vllm_redrafter.config.LookupOptions`); ``+lookup<N>``
also gives them ``N`` extra tree nodes (``extra_nodes``)."""


DRAFT_DTYPE_SUFFIXES = {"+bf16draft": "bfloat16", "+fp32draft": "float32"}
"""Config-name suffixes pinning the drafter's dtype (``draft_dtype``; default ``auto``)."""


LOOKUP_SUFFIXES = {"skip": "skip_beams_match", "deep": "trusted_depth"}
"""Look-up options a config name sets by suffix: ``+skip<N>``, ``+deep<N>``."""


INT8_SUFFIXES: dict[str, dict[str, Any]] = {
    "+int8": {"draft_int8": True, "draft_bits": 8},
    "+int4": {"draft_int8": True, "draft_bits": 4},
    "+noint8": {"draft_int8": False},
}
"""Config-name suffixes pinning low-bit drafting weights on (8 or 4 bits) or off
(``"draft_int8"``, ``"draft_bits"``; defaults ``"auto"`` and 4: on for bfloat16 drafting
on CPU)."""


def _split_suffix(name: str) -> tuple[str, dict[str, Any]] | None:
    """``"x+auto"`` -> ``("x", {"adaptive": True})``; ``"x+lookup4"`` ->
    ``("x", {"lookup": {"extra_nodes": 4}})``; ``"x+fp32draft"`` -> ``("x",
    {"draft_dtype": "float32"})``; ``"x+int4"`` -> ``("x", {"draft_int8": True,
    "draft_bits": 4})`` (:data:`INT8_SUFFIXES`); ``"x+skip3"`` -> ``("x",
    {"skip_beams_match": 3})`` and ``"x+deep8"`` -> ``("x", {"trusted_depth": 8})``
    (look-up options); None without a known suffix."""
    if name.endswith(AUTO_SUFFIX):
        return name[: -len(AUTO_SUFFIX)], {"adaptive": True}
    for suffix, options in INT8_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], dict(options)
    for suffix, dtype in DRAFT_DTYPE_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], {"draft_dtype": dtype}
    option = re.fullmatch(r"(.*)\+(%s)(\d+)" % "|".join(LOOKUP_SUFFIXES), name)
    if option is not None:
        return option.group(1), {LOOKUP_SUFFIXES[option.group(2)]: int(option.group(3))}
    match = re.fullmatch(r"(.*)\+lookup(\d*)", name)
    if match is None:
        return None
    extra = match.group(2)
    return match.group(1), {"lookup": {"extra_nodes": int(extra)} if extra else True}


def _named_spec(name: str, drafter: str, specs: dict[str, dict[str, Any] | None]
                ) -> dict[str, Any] | None:
    """The spec a ``--configs`` name asks for: ``redrafter[-tree]@W<w>L<l>``, or any
    ReDrafter name with ``+auto``, ``+lookup[N]``, ``+skip<N>`` and ``+deep<N>`` (with
    ``+lookup``), ``+int8`` / ``+int4`` / ``+noint8`` and ``+fp32draft`` / ``+bf16draft`` suffixes (e.g.
    ``redrafter+auto``, ``redrafter-tree+lookup``, ``redrafter-tree@W1L5+lookup4+auto``,
    ``redrafter-tree@W1L5+lookup4+skip3+deep8+auto``, ``redrafter+auto+fp32draft``)."""
    base, extra = name, {}
    while (split := _split_suffix(base)) is not None:
        base, options = split
        extra.update(options)
    parsed = parse_redrafter_name(base)
    if parsed is not None:
        tree, width, length = parsed
        spec = _redrafter_spec(drafter, width, length, tree=tree)
    elif extra and isinstance(specs.get(base), dict) and specs[base]["method"] == "redrafter":
        spec = dict(specs[base])
    else:
        return None
    if extra.get("lookup") and not spec.get("tree"):
        return None  # look-up branches join a tree: only tree configs take +lookup
    for key in LOOKUP_SUFFIXES.values():  # +skip<N>, +deep<N>: look-up options
        value = extra.pop(key, None)
        if value is not None:
            if not extra.get("lookup"):
                return None
            lookup = extra["lookup"] if isinstance(extra["lookup"], dict) else {}
            extra["lookup"] = {**lookup, key: value}
    spec.update(extra)
    return spec


def _redrafter_spec(drafter: str, width: int, length: int, tree: bool) -> dict[str, Any]:
    """A bench config: fixed drafting (``"adaptive": false``, whatever the default) so
    that a name means the same settings in every report; ``+auto`` turns the policy on."""
    return {"method": "redrafter", "model": str(drafter), "beam_width": width,
            "beam_length": length, "tree": tree, "adaptive": False}


def parse_redrafter_name(name: str) -> tuple[bool, int, int] | None:
    """``"redrafter-tree@W4L5"`` -> ``(True, 4, 5)``; ``"redrafter@W1L5"`` ->
    ``(False, 1, 5)``; None for any other name."""
    match = re.fullmatch(r"redrafter(-tree)?@W(\d+)L(\d+)", name)
    if match is None:
        return None
    return match.group(1) is not None, int(match.group(2)), int(match.group(3))


def run_config(name: str, spec: dict[str, Any] | None, settings: BenchSettings,
               log_path: Path | None = None) -> list[CellResult]:
    """Run one configuration in a subprocess; on failure, failed cells with the error."""
    with tempfile.TemporaryDirectory(prefix="redrafter-bench-") as tmp:
        job = write_job(Path(tmp) / "job.json", name, spec, settings)
        result = Path(tmp) / "result.json"
        env = worker_env()
        log = open(log_path, "a") if log_path else subprocess.DEVNULL
        error = None
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_redrafter.bench.worker", str(job), str(result)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=settings.timeout_s)
            if proc.returncode != 0:
                error = f"exited with code {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {settings.timeout_s:.0f} s"
        finally:
            if log_path:
                log.close()
        if error is None and result.is_file():
            return [cell_from_json(c) for c in json.loads(result.read_text())["cells"]]
        if error is None:
            error = "no result written"
        if log_path:
            error += f" (log: {log_path})"
        logger.warning("bench configuration %s failed: %s", name, error)
        return [CellResult(config=name, concurrency=c, temperature=t, status="failed",
                           error=error)
                for t in settings.temperatures for c in settings.concurrency]


def write_job(path: Path, name: str, spec: dict[str, Any] | None,
              settings: BenchSettings) -> Path:
    """Write the JSON job a bench worker subprocess reads (its config and settings)."""
    path.write_text(json.dumps({"name": name, "spec": spec,
                                "settings": dataclasses.asdict(settings)}))
    return path


def worker_env() -> dict[str, str]:
    """The environment of a bench worker subprocess."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(callable), ours only
    return env


def cell_from_json(d: dict[str, Any]) -> CellResult:
    """The inverse of :func:`cell_to_json`."""
    d = dict(d)
    d["counters"] = SpecCounters(**d["counters"])
    return CellResult(**d)


def cell_to_json(cell: CellResult) -> dict[str, Any]:
    return dataclasses.asdict(cell)
