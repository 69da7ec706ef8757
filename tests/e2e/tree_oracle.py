# SPDX-License-Identifier: Apache-2.0
"""An oracle ReDrafter proposer for tree-mode engine tests (imported in vLLM workers).

It knows the target's greedy continuation of every test prompt (a JSON file named by
the environment variable :data:`REFS_ENV`: a list of full token sequences) and drafts
``W = 3`` beams of length ``L = 4`` whose **correct branch is never beam 0**::

    beam 0   init  w    w    w      wrong at depth 1 (a chain verifier accepts nothing)
    beam 1   init  c0   c1   c2     the target's own continuation
    beam 2   init  c0   c1   x      shares beam 1's prefix (deduplicated), wrong at 3

so the tree ``root -> {w -> w -> w, c0 -> c1 -> {c2, x}}`` (8 nodes) must accept all
three drafts every step, through nodes 4, 5, 6: depth positions, the tree mask and the
KV fix-up are all load-bearing.
"""

from __future__ import annotations

import json
import os

import torch

from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import DraftStep

REFS_ENV = "REDRAFTER_TEST_ORACLE_REFS"
CLASS_PATH = "tests.e2e.tree_oracle.OracleTreeProposer"
WIDTH, LENGTH = 3, 4


def oracle_beams(history: list[int], refs: list[list[int]], vocab: int) -> list[list[int]]:
    """The three oracle beams after ``history`` (see the module docstring).

    Example: refs ``[[1, 2, 3, 4, 5, 6]]``, history ``[1, 2]``: ``c = [3, 4, 5]`` gives
    ``[[2, 4, 4, 4], [2, 3, 4, 5], [2, 3, 4, 6]]``.
    """
    p = len(history)
    cont: list[int] = []
    for ref in refs:
        if len(ref) > p and ref[:p] == history:
            cont = ref[p : p + LENGTH - 1]
            break
    cont = cont + [0] * (LENGTH - 1 - len(cont))
    init = history[-1]
    wrong = (cont[0] + 1) % vocab
    return [
        [init, wrong, wrong, wrong],
        [init, *cont],
        [init, cont[0], cont[1], (cont[2] + 1) % vocab],
    ]


class OracleTreeProposer(ReDrafterProposer):
    """ReDrafterProposer whose beams come from :func:`oracle_beams`."""

    def __init__(self, vllm_config):
        super().__init__(vllm_config)
        self.wants_history = True
        with open(os.environ[REFS_ENV]) as f:
            self.refs = json.load(f)
        self.vocab = int(vllm_config.model_config.get_vocab_size())

    def _draft_beams(self, step: DraftStep, hidden: torch.Tensor) -> torch.Tensor:
        beams = [oracle_beams([int(t) for t in req.history], self.refs, self.vocab)
                 for req in step.requests]
        return torch.tensor(beams, dtype=torch.int64)  # [B, W, L]


WRONG_CLASS_PATH = "tests.e2e.tree_oracle.WrongBeamsProposer"


def wrong_beams(history: list[int], refs: list[list[int]], vocab: int) -> list[list[int]]:
    """Three beams that are all wrong at depth 1 (``c0 + 1``, ``c0 + 2``, ``c0 + 3``):
    with them, every accepted draft token must come from somewhere else (look-up).

    Example: refs ``[[1, 2, 3, 4, 5, 6]]``, history ``[1, 2]`` ->
    ``[[2, 4, 4, 4], [2, 5, 5, 5], [2, 6, 6, 6]]``.
    """
    right = oracle_beams(history, refs, vocab)[1]
    init, first = right[0], right[1]
    return [[init] + [(first + k) % vocab] * (LENGTH - 1) for k in range(1, WIDTH + 1)]


class WrongBeamsProposer(OracleTreeProposer):
    """ReDrafterProposer whose beams are never accepted (:func:`wrong_beams`)."""

    def _draft_beams(self, step: DraftStep, hidden: torch.Tensor) -> torch.Tensor:
        beams = [wrong_beams([int(t) for t in req.history], self.refs, self.vocab)
                 for req in step.requests]
        return torch.tensor(beams, dtype=torch.int64)  # [B, W, L]
