# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures of the CPU unit tier: seeded randomness, never the global RNG."""

from __future__ import annotations

import pytest
import torch

DEFAULT_SEED = 20240524


@pytest.fixture
def seed() -> int:
    """The seed of every randomised unit test (fixed, so failures reproduce)."""
    return DEFAULT_SEED


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`seed`."""
    return torch.Generator().manual_seed(seed)
