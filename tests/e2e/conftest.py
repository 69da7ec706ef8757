# SPDX-License-Identifier: Apache-2.0
"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The peaked tiny Llama, its prompts and drafters (built once per session under the
    session's base temp dir, see :func:`tests.e2e.chain_helpers.tiny_assets`)."""
    return h.tiny_assets(tmp_path_factory.getbasetemp() / "chain-tiny-assets")
