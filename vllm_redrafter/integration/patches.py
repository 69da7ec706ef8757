# SPDX-License-Identifier: Apache-2.0
"""Guarded monkeypatches of vLLM, and their ledger.

Every change this project makes to vLLM's own objects is a :class:`Patch` in :data:`LEDGER`:
why it exists, how it works, and what upstream change would let us delete it. Each patch
checks the vLLM version and the exact signature it wraps before touching anything, and is
applied at most once per process (re-entrant plugin loading is normal in vLLM).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any

from vllm_redrafter.integration import compat
from vllm_redrafter.logger import get_logger
from vllm_redrafter.versioning import PatchError

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One guarded monkeypatch and its ledger entry."""

    name: str
    target: str  # dotted path of the patched object, e.g. "vllm...GPUModelRunner.foo"
    why: str
    how: str
    remove_when: str
    apply: Callable[[], None]  # raises PatchError if the target changed shape
    stage: str = "plugin"
    """When it is applied: ``"plugin"`` by :func:`apply_all` (every process, at plugin
    load); ``"proposer"`` lazily by :func:`ensure_applied` when the ReDrafter proposer is
    built inside a model runner (so front-end processes never import the runner module);
    ``"refused"`` only by the plugin when it refuses the installed vLLM version."""
    skippable: bool = False
    """Whether :data:`ENV_SKIP` may switch it off (fixes of vLLM bugs that ReDrafter runs
    without, only less correctly; never the hooks ReDrafter needs to run at all)."""


ENV_SKIP = "VLLM_REDRAFTER_SKIP_PATCHES"
"""Comma-separated names of skippable patches not to apply, for diagnosis only (for
example to check whether a vLLM bug fix matters on your build); each skip is logged as a
warning in every process. A name that is unknown or not skippable is an error."""

PATCH_MARK = "__redrafter_patch__"
"""Attribute set on every wrapper (value: the patch name); makes patches idempotent."""


def mark_patched(wrapper: Any, name: str) -> Any:
    """Tag ``wrapper`` as the installed wrapper of patch ``name``; returns it."""
    setattr(wrapper, PATCH_MARK, name)
    return wrapper


def is_patched(func: Any, name: str) -> bool:
    """True if ``func`` is the wrapper installed by patch ``name``."""
    return getattr(func, PATCH_MARK, None) == name


def wrap_runner_method(
    patch: str,
    method: str,
    parameters: tuple[str, ...],
    make_wrapper: Callable[[Callable[..., Any], inspect.Signature], Callable[..., Any]],
) -> None:
    """Install ``make_wrapper(original, signature)`` as ``GPUModelRunner.<method>`` for
    ``patch``, after the version and exact-signature checks; a no-op if that patch is
    already installed. The CPU runner subclasses GPUModelRunner, so an override of
    ``method`` there would bypass the wrapper: a PatchError."""
    compat.require_vllm_version(patch)
    from vllm.v1.worker import gpu_model_runner

    runner_cls = compat.require_attribute(patch, gpu_model_runner, "GPUModelRunner")
    current = compat.require_attribute(patch, runner_cls, method)
    if is_patched(current, patch):
        return
    signature = compat.require_parameters(patch, current, parameters)
    cpu_module = sys.modules.get("vllm.v1.worker.cpu_model_runner")
    cpu_cls = getattr(cpu_module, "CPUModelRunner", None)
    if cpu_cls is not None and method in vars(cpu_cls):
        raise PatchError(f"patch {patch}: CPUModelRunner overrides {method}; this vLLM "
                         "version is not supported")
    setattr(runner_cls, method, mark_patched(make_wrapper(current, signature), patch))


LEDGER: list[Patch] = []
_applied: list[str] = []
_skipped: list[str] = []
"""Patches left out in this process because :data:`ENV_SKIP` names them."""


def register_patch(patch: Patch) -> Patch:
    """Add ``patch`` to the ledger (module import time); returns it unchanged."""
    if any(p.name == patch.name for p in LEDGER):
        raise ValueError(f"duplicate patch name {patch.name!r}")
    LEDGER.append(patch)
    return patch


def _load_ledger() -> None:
    """Import the modules that define patches, so they register themselves."""
    from vllm_redrafter.integration import hooks  # noqa: F401


_MISSING = object()


def _resolve_owner(dotted: str) -> tuple[Any, str]:
    """``(owner object, attribute name)`` of a ledger ``target`` such as
    ``"vllm.engine.arg_utils.EngineArgs.from_cli_args"``: the longest importable module
    prefix, then attribute lookups. Raises ``ImportError``/``AttributeError`` if absent."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ImportError(f"cannot import any module prefix of {dotted!r}")


def _snapshot(patch: Patch) -> Callable[[], None]:
    """An undo for ``patch``: restores its target attribute exactly as found (the raw
    ``__dict__`` entry, so staticmethod/classmethod wrappers come back unchanged)."""
    try:
        owner, attr = _resolve_owner(patch.target)
    except (ImportError, AttributeError):
        return lambda: None  # nothing there to change, nothing to restore
    raw = vars(owner).get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING

    def undo() -> None:
        if raw is _MISSING:
            if attr in vars(owner):
                delattr(owner, attr)
        else:
            setattr(owner, attr, raw)

    return undo


def apply_all() -> list[str]:
    """Apply every plugin-stage ledger patch once in this process, all or nothing.

    Returns the names applied so far. If one patch fails, the patches this call applied
    are undone (each target restored to the object found before) and the error is
    re-raised, so vLLM is left exactly as it was.
    """
    _load_ledger()
    undo: list[tuple[str, Callable[[], None]]] = []
    try:
        for patch in LEDGER:
            if patch.stage == "plugin" and patch.name not in _applied:
                restore = _snapshot(patch)
                _apply_one(patch)
                undo.append((patch.name, restore))
    except BaseException:
        for name, restore in reversed(undo):
            restore()
            _applied.remove(name)
        raise
    return list(_applied)


def skipped_by_user() -> set[str]:
    """The patch names in :data:`ENV_SKIP` (validated: each one is a skippable patch).

    Raises:
        PatchError: a name is unknown or names a patch ReDrafter cannot run without.
    """
    import os

    names = {n.strip() for n in os.environ.get(ENV_SKIP, "").split(",") if n.strip()}
    if not names:
        return set()
    _load_ledger()
    skippable = {p.name for p in LEDGER if p.skippable}
    bad = sorted(names - skippable)
    if bad:
        raise PatchError(
            f"{ENV_SKIP} names {bad}, which are not skippable patches; the skippable ones "
            f"are {sorted(skippable)}")
    return names


def _apply_one(patch: Patch) -> None:
    if patch.name in _applied or patch.name in _skipped:
        return
    if patch.name in skipped_by_user():
        _skipped.append(patch.name)
        logger.warning("vllm-redrafter: patch %s NOT applied (%s): %s", patch.name,
                       ENV_SKIP, patch.why)
        return
    patch.apply()
    _applied.append(patch.name)
    logger.debug("applied patch %s on %s", patch.name, patch.target)


def get_patch(name: str) -> Patch:
    """The ledger entry called ``name`` (KeyError if there is none)."""
    _load_ledger()
    for patch in LEDGER:
        if patch.name == name:
            return patch
    raise KeyError(f"no patch named {name!r} in the ledger")


def ensure_applied(name: str) -> None:
    """Apply the ledger patch ``name`` in this process unless it already is."""
    _apply_one(get_patch(name))


def applied() -> list[str]:
    """Names of the patches applied in this process."""
    return list(_applied)


def ledger_markdown() -> str:
    """The ledger as a Markdown table (used for docs/patches.md)."""
    _load_ledger()
    rows = [
        "| patch | target | applied | why | how | remove when |",
        "|---|---|---|---|---|---|",
    ]
    for p in LEDGER:
        stage = f"{p.stage} (skippable)" if p.skippable else p.stage
        rows.append(
            f"| {p.name} | `{p.target}` | {stage} | {p.why} | {p.how} | "
            f"{p.remove_when} |"
        )
    return "\n".join(rows)
