# SPDX-License-Identifier: Apache-2.0
"""Tree verification: from a request's verified rows to the tokens it emits and the KV
moves that make its cache look like a linear decode (pure torch, vLLM-free).

In tree mode a request's target forward has ``1 + n`` rows (``n`` drafted nodes): row 0
is the root (the last committed token), row ``j`` is tree node ``j``, computed with
depth positions and the ancestor mask, so **row ``j``'s logits are the target's
distribution after the path ending at node ``j``**. Acceptance walks the tree from the
root (greedy: follow the argmax; sampling: sample-and-descend, lossless, see
:mod:`vllm_redrafter.acceptance`); the request emits the accepted drafts plus one token.

KV fix-up: node ``j`` wrote its K/V into the slot of row ``j`` (its own slot), but
vLLM's accounting expects the token at depth ``d`` of the accepted path in the slot of
row ``d``. Because the node's RoPE used position ``base + depth``, copying its K/V
there makes the cache identical to a linear decode of the accepted tokens.

Glossary: ``n`` drafted nodes, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_redrafter.acceptance import greedy_accept_tree, sample_and_descend, warp_logits
from vllm_redrafter.steps import SamplingView, TreeDraft


@dataclass(frozen=True, slots=True)
class TreeVerdict:
    """What one request's tree verification decided.

    Attributes:
        path: accepted nodes from the root (node 0) down; ``path[d]`` has depth ``d``.
        emitted: tokens to append to the output: the accepted drafts then the
            target's next token; ``len(emitted) == len(path)``.
    """

    path: list[int]
    emitted: list[int]

    @property
    def num_accepted(self) -> int:
        """Drafted tokens accepted (the root is not a draft)."""
        return len(self.path) - 1

    @property
    def last_node(self) -> int:
        """Node whose hidden state seeds the next draft (0 when nothing was accepted)."""
        return self.path[-1]

    def kv_moves(self) -> list[tuple[int, int]]:
        """``(source row, destination row)`` of every accepted node not in place.

        The node at depth ``d`` of the path must end up in row ``d``'s slot; topological
        order gives ``path[d] >= d``, so sources never precede their destinations.
        Example: path ``[0, 4, 5, 6]`` -> ``[(4, 1), (5, 2), (6, 3)]``; path
        ``[0, 1, 2]`` (beam 0) -> ``[]``.
        """
        return [(node, depth) for depth, node in enumerate(self.path) if node != depth]


def verify_tree(
    tree: TreeDraft,
    logits: torch.Tensor,
    sampling: SamplingView,
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    """Accept the longest valid path of ``tree`` given its verified rows.

    Args:
        tree: the request's (possibly truncated) tree, ``n + 1`` nodes.
        logits: ``[n + 1, V]`` target logits, row ``j`` after the path to node ``j``.
        sampling: the request's temperature / top-k / top-p.
        generator: the request's seeded generator (None: torch's global RNG).

    Returns:
        :class:`TreeVerdict`. Greedy: identical to greedy decoding of the target.
        Sampling: every emitted token is drawn from the target's (warped) conditional
        after the tokens before it, whatever the tree holds (lossless).

    Example: tree ``A(root) -> x, A -> B -> C`` (tokens ``[A, x, B, C]``, parents
    ``[-1, 0, 0, 2]``) with argmax rows ``[B, ., C, D]`` gives path ``[0, 2, 3]`` and
    emitted ``[B, C, D]``.
    """
    if logits.dim() != 2 or logits.shape[0] != tree.num_nodes:
        raise ValueError(
            f"logits must be [{tree.num_nodes}, V] for a {tree.num_nodes}-node tree, "
            f"got {tuple(logits.shape)}"
        )
    if sampling.greedy:
        argmax = logits.argmax(dim=-1).tolist()  # [n + 1]
        path, next_token = greedy_accept_tree(list(tree.tokens), list(tree.parents), argmax)
        emitted = [tree.tokens[node] for node in path[1:]] + [int(next_token)]
        return TreeVerdict(path, emitted)
    probs = warp_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    tokens = torch.tensor(tree.tokens, dtype=torch.int64, device=logits.device)
    parents = torch.tensor(tree.parents, dtype=torch.int64, device=logits.device)
    path, emitted = sample_and_descend(tokens, parents, probs, generator)
    return TreeVerdict(path, emitted)


def tree_attention_mask(tree: TreeDraft) -> torch.Tensor:
    """Ancestor-or-self mask of the drafted nodes (the root is context).

    Returns:
        ``[n, n]`` bool, ``n = N - 1``; entry ``[i, j]`` is True iff drafted node
        ``j + 1`` is node ``i + 1`` or one of its ancestors. Example: parents
        ``[-1, 0, 0, 2]`` (nodes 1 and 2 under the root, 3 under 2) ->
        ``[[1,0,0],[0,1,0],[0,1,1]]``.
    """
    n = tree.num_nodes - 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    for node in range(1, tree.num_nodes):
        walk = node
        while walk > 0:
            mask[node - 1, walk - 1] = True
            walk = tree.parents[walk]
    return mask
