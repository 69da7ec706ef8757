# SPDX-License-Identifier: Apache-2.0
"""vLLM general-plugin entry point (``vllm.general_plugins`` → ``redrafter``).

vLLM calls :func:`register` once in every process it creates (front end / ``LLM`` process,
engine core, every worker, Ray workers). It must therefore be idempotent, cheap, and never
depend on driver-only state. It checks the installed vLLM version, applies the guarded patches
listed in :mod:`vllm_redrafter.integration.patches`, and logs exactly one INFO line saying what
it did, or why it refused.

It never takes vLLM down: if anything fails while it loads (a patch guard finding vLLM's
internals moved, an import error), the patches it applied are rolled back, vLLM is left as
it was, one WARNING line names the cause, and only a request for ``method: redrafter`` is
then refused (with that cause); every other use of vLLM is unaffected.

Switch it off with ``VLLM_REDRAFTER_ENABLED=0`` (or use vLLM's ``VLLM_PLUGINS`` allow-list).
"""

from __future__ import annotations

import multiprocessing
import os

from vllm_redrafter import SUPPORTED_VLLM_RANGE, __version__
from vllm_redrafter.logger import get_logger
from vllm_redrafter.versioning import vllm_version_supported  # noqa: F401 (public here)

logger = get_logger(__name__)

ENV_ENABLED = "VLLM_REDRAFTER_ENABLED"
_FALSE_VALUES = {"0", "false", "no", "off"}

_state: dict[str, str] = {}
"""Per-process outcome of :func:`register` (``{"status": ..., "detail": ...}``)."""


def status() -> dict[str, str]:
    """What :func:`register` did in this process (empty if it has not run)."""
    return dict(_state)


def unavailable_reason() -> str | None:
    """Why ReDrafter cannot serve in this process (``None`` when it can or the plugin
    has not run): the text the refusal guard puts in its error."""
    state = _state.get("status")
    if state == "refused":
        low, high = SUPPORTED_VLLM_RANGE
        return (f"vllm-redrafter {__version__} supports vLLM >={low},<{high}, but "
                f"{_state.get('detail')} is installed. Install a supported vLLM or a "
                "vllm-redrafter release for this vLLM.")
    if state == "failed":
        return (f"vllm-redrafter {__version__} could not load into this vLLM "
                f"({_state.get('detail')}); vLLM was left unpatched. Report this with "
                "your vLLM version, or pin a supported vLLM.")
    return None


def _install_refusal_guard(reason: str) -> None:
    """Best effort: make a ReDrafter config fail with a clear error naming why the plugin
    is unavailable (no patches are applied then, so vLLM's own error would be
    unrelated)."""
    try:
        from vllm_redrafter.integration import hooks, patches

        hooks.set_refusal_reason(reason)
        patches.ensure_applied(hooks.REFUSAL_GUARD)
    except Exception:  # noqa: BLE001 - unsupported vLLM: never break other methods
        logger.debug("vllm-redrafter: refusal guard not installed", exc_info=True)


def register() -> None:
    """Entry point called by vLLM's plugin loader. Idempotent."""
    if _state:
        return
    process = f"{multiprocessing.current_process().name} pid={os.getpid()}"
    if os.environ.get(ENV_ENABLED, "1").strip().lower() in _FALSE_VALUES:
        _state.update(status="disabled", detail=f"{ENV_ENABLED}=0")
        logger.info("vllm-redrafter %s disabled by %s=0 in %s", __version__,
                    ENV_ENABLED, process)
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not vllm_version_supported(version):
        _state.update(status="refused", detail=f"vLLM {version}")
        logger.warning(
            "vllm-redrafter %s refused to load in %s: vLLM %s is not supported "
            "(supported: >=%s,<%s). ReDrafter is unavailable; other methods are unaffected.",
            __version__, process, version, *SUPPORTED_VLLM_RANGE)
        _install_refusal_guard(unavailable_reason() or "")
        return
    try:
        from vllm_redrafter.integration import patches

        applied = patches.apply_all()  # all or nothing
    except Exception as exc:  # noqa: BLE001 - the plugin must never take vLLM down
        _state.update(status="failed", detail=f"{type(exc).__name__}: {exc}")
        logger.warning(
            "vllm-redrafter %s failed to load in %s (vLLM %s): %s: %s. Its patches were "
            "rolled back; ReDrafter is unavailable, other methods are unaffected.",
            __version__, process, version, type(exc).__name__, exc)
        _install_refusal_guard(unavailable_reason() or "")
        return
    _state.update(status="active", detail=",".join(applied))
    logger.info("vllm-redrafter %s active in %s (vLLM %s); patches: %s", __version__,
                process, version, ", ".join(applied) or "none")
