# SPDX-License-Identifier: Apache-2.0
"""Cost of one verification step against the number of verified tokens, tree vs chain.

One engine (tree mode, ``W = 4``, ``L = 5``, so up to 16 drafted nodes) serves requests
whose drafts have a **fixed shape** chosen by the request id (``"<shape>-<n>-<i>"``):

- ``chain-<n>``: ``n`` drafted tokens as a chain, verified by vLLM's own path (C++
  attention kernel, rejection sampler);
- ``tree-<n>``: ``n`` drafted nodes as a tree of 4 branches from the root (``n = 4, 8,
  16``: 4 x 1, 4 x 2, 4 x 4), verified by ReDrafter's tree path (tree attention,
  tree acceptance, KV fix-up).

Draft tokens are arbitrary, so almost nothing is accepted and each step emits one token:
wall time per engine step is the cost of verifying ``1 + n`` tokens (plus scheduling,
sampling and the drafter stub, which does no work). Requests run one at a time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import DraftStep, Proposal, TreeDraft

CLASS_PATH = "vllm_redrafter.bench.verify_cost.FixedShapeProposer"
BRANCHES = 4


def fixed_shape(req_id: str) -> tuple[str, int]:
    """``"tree-8-3"`` -> ``("tree", 8)``; ``"chain-16-0"`` -> ``("chain", 16)``."""
    shape, size, _ = req_id.split("-", 2)
    if shape not in ("tree", "chain"):
        raise ValueError(f"unknown draft shape in request id {req_id!r}")
    return shape, int(size)


def branching_tree(root: int, num_drafts: int, vocab: int) -> TreeDraft:
    """``BRANCHES`` chains of ``num_drafts / BRANCHES`` nodes under the root.

    Example: ``num_drafts = 8``: parents ``[-1, 0, 1, 0, 3, 0, 5, 0, 7]``.
    """
    depth = max(1, num_drafts // BRANCHES)
    tokens, parents, depths = [root], [-1], [0]
    for branch in range(BRANCHES):
        parent = 0
        for level in range(1, depth + 1):
            tokens.append((root * 7 + branch * 131 + level * 17 + 1) % vocab)
            parents.append(parent)
            depths.append(level)
            parent = len(tokens) - 1
    return TreeDraft(tuple(tokens), tuple(parents), tuple(depths))


class FixedShapeProposer(ReDrafterProposer):
    """Proposes fixed-shape drafts (see the module docstring); no drafter work."""

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        self.vocab = int(vllm_config.model_config.get_vocab_size())

    @torch.inference_mode()
    def propose_step(self, step: DraftStep, sample_hidden_states: torch.Tensor) -> Proposal:
        proposal = Proposal()
        for req in step.requests:
            shape, size = fixed_shape(req.req_id)
            if size == 0:
                continue
            if shape == "tree":
                tree = branching_tree(req.init_token, size, self.vocab)
                proposal.trees[req.req_id] = tree
                proposal.drafts[req.req_id] = tree.drafts
            else:
                proposal.drafts[req.req_id] = [(req.init_token * 7 + j * 17 + 1) % self.vocab
                                               for j in range(1, size + 1)]
        return proposal


def measure(llm: Any, prompts: list[list[int]], shapes: list[tuple[str, int]],
            max_tokens: int) -> list[dict[str, Any]]:
    """Seconds per engine step for each (shape, drafted nodes), requests one at a time.

    Shapes are interleaved prompt by prompt (every shape runs prompt 0, then prompt 1...),
    so a drift of the machine's speed during the run hits every shape alike.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    steps = {shape: 0 for shape in shapes}
    wall = {shape: 0.0 for shape in shapes}
    for i, prompt in enumerate(prompts):
        for shape, size in shapes:
            engine.add_request(f"{shape}-{size}-{i}", {"prompt_token_ids": prompt}, params)
            engine.step()  # prefill (not timed)
            start = time.perf_counter()
            done = False
            while not done:
                done = any(out.finished for out in engine.step())
                steps[(shape, size)] += 1
            wall[(shape, size)] += time.perf_counter() - start
    return [{"shape": shape, "verified_tokens": 1 + size,
             "ms_per_step": round(1000 * wall[(shape, size)] / max(steps[(shape, size)], 1), 2),
             "steps": steps[(shape, size)]} for shape, size in shapes]
