# SPDX-License-Identifier: Apache-2.0
"""Version and signature checks for the vLLM internals this plugin touches.

Every patch in :mod:`vllm_redrafter.integration.hooks` calls :func:`require_vllm_version`
and :func:`require_parameters` before it changes anything, so a vLLM release that moved or
reshaped a patched function fails loudly at start-up (:class:`PatchError` naming the target
and the difference) instead of misbehaving at run time.

This module imports vLLM lazily (inside functions) so that importing it is cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from vllm_redrafter import SUPPORTED_VLLM_RANGE
from vllm_redrafter.versioning import PatchError, vllm_version_supported

PROPOSER_CLASS_PATH = "vllm_redrafter.proposers.redrafter.ReDrafterProposer"
"""What ``speculative_config.model`` holds once ``method="redrafter"`` is translated to
vLLM's ``custom_class`` method (the class vLLM's ``create_custom_proposer`` imports)."""

ADDITIONAL_CONFIG_KEY = "redrafter"
"""Key of ``VllmConfig.additional_config`` that carries the ReDrafter settings to every
process (front end, engine core, TP workers, Ray actors)."""


def vllm_version() -> str:
    """The installed vLLM version string (e.g. ``"0.32.0+cpu"``)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def require_vllm_version(patch_name: str) -> None:
    """Raise :class:`PatchError` unless vLLM is inside :data:`SUPPORTED_VLLM_RANGE`."""
    version = vllm_version()
    if not vllm_version_supported(version):
        low, high = SUPPORTED_VLLM_RANGE
        raise PatchError(
            f"patch {patch_name}: vLLM {version} is outside the supported range "
            f">={low},<{high}"
        )


def require_parameters(
    patch_name: str,
    func: Callable[..., Any],
    expected: Sequence[str],
    *,
    exact: bool = True,
) -> inspect.Signature:
    """Check that ``func`` takes exactly (or at least) the parameters ``expected``.

    Args:
        patch_name: ledger name, used in the error message.
        func: the (unwrapped) vLLM function about to be wrapped.
        expected: parameter names in order (``self``/``cls`` included when present).
        exact: if True the parameter list must be identical; otherwise ``expected`` must
            be a prefix of it.

    Returns:
        ``inspect.signature(func)``.

    Raises:
        PatchError: naming the function, the expected and the found parameters.
    """
    signature = inspect.signature(func)
    found = list(signature.parameters)
    ok = found == list(expected) if exact else found[: len(expected)] == list(expected)
    if not ok:
        qualname = getattr(func, "__qualname__", repr(func))
        raise PatchError(
            f"patch {patch_name}: {func.__module__}.{qualname} has parameters "
            f"{found}, expected {list(expected)}; this vLLM version is not supported "
            "by this vllm-redrafter release"
        )
    return signature


def require_attribute(patch_name: str, owner: Any, name: str) -> Any:
    """Return ``getattr(owner, name)`` or raise :class:`PatchError` naming it."""
    if not hasattr(owner, name):
        raise PatchError(
            f"patch {patch_name}: {getattr(owner, '__qualname__', owner)!s} has no "
            f"attribute {name!r}; this vLLM version is not supported"
        )
    return getattr(owner, name)
