# SPDX-License-Identifier: Apache-2.0
"""Dynamic tree attention: deduplicate the beams' shared prefixes into one packed tree.

All ``W`` beams of a request start with the same init token and often share longer
prefixes. Verifying every beam token separately costs ``W * L`` target tokens; verifying
each distinct prefix once costs ``N <= 1 + W * (L - 1)`` tokens. This module computes
the packing (which beam tokens are new tree nodes), the way back (``unpacker``), and
what the target needs to run the packed tokens as a tree: depths (position offsets),
parents and the ancestor-or-self attention mask.

Follows Apple's ``recurrent_drafting/tree_attention.py`` (``dedup_prefix``,
``pack``/``unpack``); differences from the reference:

- The unpacker is read directly off the owner beam (``tree[b, i, k] * L + k`` is the
  flat slot of the node that stands for beam token ``(i, k)``), not rebuilt from segment
  starts and offsets; the result is the same.
- Rows of a batch are padded with explicit ``-1`` sentinels, not with garbage tokens
  read past each row's own segment.
- The mask only covers the ``N x N`` tree part; the committed context columns are the
  caller's business (they are all visible to every node).

Glossary: ``B`` batch (requests), ``W`` beam width, ``L`` beam length (includes the init
token), ``N`` packed nodes of one request, ``Nmax`` the largest ``N`` in the batch.

Worked example (Apple's ``docs/tree_attention.md``), one request, ``W = 3``, ``L = 4``::

    beams          A B C D         prefix_tree    0 0 0 0        unpacker   0 1 2 3
                   A B E F                        0 0 1 1                   0 1 4 5
                   A B G D                        0 0 2 2                   0 1 6 7

    packed node     0  1  2  3  4  5  6  7
    packed_tokens   A  B  C  D  E  F  G  D'      (D' is beam 2's D: its prefix differs)
    packed_index    0  1  2  3  6  7 10 11       (flat slot i * L + k of the beam token)
    depth           0  1  2  3  2  3  2  3       (position offset after the context)
    parents        -1  0  1  2  1  4  1  6
    attn_mask row  {0} {0,1} {0,1,2} {0,1,2,3} {0,1,4} {0,1,4,5} {0,1,6} {0,1,6,7}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1
"""Sentinel for padded node slots (``packed_tokens``, ``packed_index``, ``depth``) and
for "no parent" (``parents`` of roots and of padding)."""


@dataclass(frozen=True, slots=True)
class BeamTree:
    """The deduplicated prefix tree of a batch of beams (see the module docstring).

    Node ``p`` of request ``b`` is valid iff ``p < num_nodes[b]``; slots past that are
    padding. Valid nodes are ordered row-major over (beam, depth) of their first
    occurrence, so node 0 is the root (beam 0's init token), every parent precedes its
    children, and beam 0's tokens are nodes ``0 .. L-1``.

    Attributes:
        prefix_tree: ``[B, W, L]`` int64; ``prefix_tree[b, i, k]`` is the smallest beam
            ``j`` with ``tokens[b, j, :k+1] == tokens[b, i, :k+1]`` (the beam that owns
            the node standing for token ``(i, k)``).
        num_nodes: ``[B]`` int64 number of valid nodes per request.
        packed_tokens: ``[B, Nmax]`` int64 token of each node, ``-1`` on padding.
        packed_index: ``[B, Nmax]`` int64 flat beam slot ``i * L + k`` of each node,
            ``-1`` on padding.
        unpacker: ``[B, W, L]`` int64 node index of every beam token;
            ``packed_tokens[b, unpacker[b]] == tokens[b]``.
        depth: ``[B, Nmax]`` int64 depth ``k`` of each node (root 0), ``-1`` on padding.
            Position id of a node = number of committed context tokens + depth.
        parents: ``[B, Nmax]`` int64 parent node, ``-1`` for roots and padding. The
            parent of the node of token ``(i, k)`` is ``unpacker[b, i, k - 1]``.
        attn_mask: ``[B, Nmax, Nmax]`` bool; for a valid node ``p``, entry ``[b, p, q]``
            is True iff ``q`` is ``p`` or an ancestor of ``p``. Padding columns are
            False in every valid row. A padding row is True only on its diagonal, so
            that softmax over a padding row stays finite (no NaN); its output must be
            ignored.
    """

    prefix_tree: torch.Tensor
    num_nodes: torch.Tensor
    packed_tokens: torch.Tensor
    packed_index: torch.Tensor
    unpacker: torch.Tensor
    depth: torch.Tensor
    parents: torch.Tensor
    attn_mask: torch.Tensor

    @property
    def beam_width(self) -> int:
        """``W``."""
        return self.prefix_tree.shape[1]

    @property
    def beam_length(self) -> int:
        """``L``."""
        return self.prefix_tree.shape[2]

    @property
    def max_nodes(self) -> int:
        """``Nmax``, the padded node dimension."""
        return self.packed_tokens.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """``[B, Nmax]`` bool, True on real nodes, False on padding."""
        return self.packed_index >= 0


def prefix_tree_of(tokens: torch.Tensor) -> torch.Tensor:
    """Owner beam of every beam token (Apple's ``dedup_prefix``), loop-free.

    Args:
        tokens: ``[B, W, L]`` int token ids.

    Returns:
        ``[B, W, L]`` int64 ``tree`` with ``tree[b, i, k]`` = smallest ``j`` such that
        ``tokens[b, j, :k+1] == tokens[b, i, :k+1]``. Always ``tree[b, i, k] <= i``.

    Example: beams ``[A B C D], [A B E F], [A B G D]`` give
    ``[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 2, 2]]``.
    """
    length = tokens.shape[-1]
    # eq[b, i, j, k]: beams i and j carry the same token at depth k.
    eq = tokens[:, :, None, :] == tokens[:, None, :, :]  # [B, W, W, L]
    # Same prefix 0..k iff the first k+1 depths all match.
    need = torch.arange(1, length + 1, device=tokens.device)  # [L]
    same_prefix = eq.cumsum(dim=-1) == need  # [B, W, W, L]
    # argmax returns the first maximal index: the smallest matching j (j = i matches).
    return same_prefix.to(torch.uint8).argmax(dim=2)  # [B, W, L]


def build_tree(tokens: torch.Tensor) -> BeamTree:
    """Deduplicate and pack a batch of beams into prefix trees (loop-free).

    Args:
        tokens: ``[B, W, L]`` int64 beam tokens (column 0 = init token), all dims
            ``>= 1``.

    Returns:
        :class:`BeamTree`; see the module docstring for a worked example. Identical
        beams add no nodes (they map entirely onto the smaller beam's nodes).

    Raises:
        ValueError: if ``tokens`` is not a non-empty 3-D integer tensor.
    """
    _check_tokens(tokens)
    batch, width, length = tokens.shape
    device = tokens.device

    prefix_tree = prefix_tree_of(tokens)  # [B, W, L]
    beam_ids = torch.arange(width, device=device)  # [W]
    depth_ids = torch.arange(length, device=device)  # [L]
    # Beam token (i, k) is a new node iff its own beam owns it.
    is_new = (prefix_tree == beam_ids[:, None]).flatten(1)  # [B, W*L]
    num_nodes = is_new.sum(dim=1)  # [B]
    max_nodes = int(num_nodes.max())

    # Node index of every new slot = number of new slots before it (row-major order).
    node_of_slot = is_new.cumsum(dim=1) - 1  # [B, W*L], meaningful where is_new
    owner_slot = prefix_tree * length + depth_ids  # [B, W, L] flat slot of the owner
    unpacker = node_of_slot.gather(1, owner_slot.flatten(1)).view(batch, width, length)

    # Flat slots of the new tokens, in order: a stable sort moves them to the front.
    order = torch.sort((~is_new).to(torch.uint8), dim=1, stable=True).indices
    order = order[:, :max_nodes]  # [B, Nmax]
    node_ids = torch.arange(max_nodes, device=device)  # [Nmax]
    valid = node_ids < num_nodes[:, None]  # [B, Nmax]
    node_depth = order % length  # [B, Nmax]

    packed_index = torch.where(valid, order, PAD)  # [B, Nmax]
    packed_tokens = torch.where(valid, tokens.flatten(1).gather(1, order), PAD)
    depth = torch.where(valid, node_depth, PAD)  # [B, Nmax]
    # Parent of the node at slot (i, k) is the node standing for (i, k - 1).
    parent_slot = (order - 1).clamp(min=0)  # [B, Nmax]
    parent_node = unpacker.flatten(1).gather(1, parent_slot)  # [B, Nmax]
    parents = torch.where(valid & (node_depth > 0), parent_node, PAD)  # [B, Nmax]

    attn_mask = _ancestor_mask(unpacker, order, valid)  # [B, Nmax, Nmax]
    return BeamTree(
        prefix_tree=prefix_tree,
        num_nodes=num_nodes,
        packed_tokens=packed_tokens,
        packed_index=packed_index,
        unpacker=unpacker,
        depth=depth,
        parents=parents,
        attn_mask=attn_mask,
    )


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(
            "tokens must be a [B, W, L] tensor, got "
            f"{getattr(tokens, 'shape', type(tokens))}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")


def _ancestor_mask(
    unpacker: torch.Tensor, order: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Ancestor-or-self mask of the packed nodes.

    The node at slot ``(i, k)`` sees exactly the nodes ``unpacker[i, 0..k]`` (its beam's
    causal row pushed through the unpacker). In the module example node 5 (``F``, slot
    ``(1, 3)``) sees ``unpacker[1, :4] = [0, 1, 4, 5]``.

    Args:
        unpacker: ``[B, W, L]`` node index of every beam token.
        order: ``[B, Nmax]`` flat slot of every node (garbage on padding).
        valid: ``[B, Nmax]`` bool.

    Returns:
        ``[B, Nmax, Nmax]`` bool; padding rows are True on their diagonal only.
    """
    batch, width, length = unpacker.shape
    max_nodes = order.shape[1]
    device = unpacker.device
    node_beam = order // length  # [B, Nmax]
    node_depth = order % length  # [B, Nmax]
    # Beam-causal row of each node's beam, mapped to node indices.
    beam_rows = unpacker.gather(
        1, node_beam[:, :, None].expand(batch, max_nodes, length)
    )  # [B, Nmax, L]
    depth_ids = torch.arange(length, device=device)  # [L]
    visible = (depth_ids <= node_depth[:, :, None]) & valid[:, :, None]  # [B, Nmax, L]
    # Invisible entries are scattered into one extra dummy column, then dropped.
    columns = torch.where(visible, beam_rows, max_nodes)  # [B, Nmax, L]
    mask = torch.zeros(batch, max_nodes, max_nodes + 1, dtype=torch.bool, device=device)
    mask.scatter_(2, columns, True)
    mask = mask[:, :, :max_nodes]  # [B, Nmax, Nmax]
    eye = torch.eye(max_nodes, dtype=torch.bool, device=device)  # [Nmax, Nmax]
    return mask | (eye & ~valid[:, :, None])


def unpack(values: torch.Tensor, tree: BeamTree) -> torch.Tensor:
    """Gather per-node values back to the beam layout.

    Args:
        values: ``[B, Nmax, ...]`` one entry per packed node (e.g. target logits
            ``[B, Nmax, V]`` or hidden states ``[B, Nmax, H]``).
        tree: the tree the nodes came from.

    Returns:
        ``[B, W, L, ...]`` with ``out[b, i, k] = values[b, tree.unpacker[b, i, k]]``.
        Example: ``unpack(tree.packed_tokens, tree) == tokens``.
    """
    batch, width, length = tree.unpacker.shape
    if values.dim() < 2 or values.shape[0] != batch:
        raise ValueError(
            f"values must be [B={batch}, Nmax, ...], got {tuple(values.shape)}"
        )
    rows = torch.arange(batch, device=values.device)[:, None]  # [B, 1]
    flat = values[rows, tree.unpacker.flatten(1)]  # [B, W*L, ...]
    return flat.view(batch, width, length, *values.shape[2:])


def pack(values: torch.Tensor, tree: BeamTree, fill: float | int = 0) -> torch.Tensor:
    """Select the per-node entries of a beam-layout tensor (inverse of :func:`unpack`).

    Args:
        values: ``[B, W, L, ...]`` one entry per beam token. Entries of tokens that map
            to the same node are assumed equal; the owner's (first occurrence's) is
            kept.
        tree: the tree of the beams.
        fill: value written on padding node slots.

    Returns:
        ``[B, Nmax, ...]``: ``out[b, p] = values.flatten(1, 2)[b, packed_index[b, p]]``.
        Example: ``pack(tokens, tree, fill=-1) == tree.packed_tokens``.
    """
    batch, width, length = tree.unpacker.shape
    if values.dim() < 3 or tuple(values.shape[:3]) != (batch, width, length):
        raise ValueError(
            f"values must be [B={batch}, W={width}, L={length}, ...], "
            f"got {tuple(values.shape)}"
        )
    flat = values.flatten(1, 2)  # [B, W*L, ...]
    valid = tree.valid  # [B, Nmax]
    rows = torch.arange(batch, device=values.device)[:, None]  # [B, 1]
    picked = flat[rows, tree.packed_index.clamp(min=0)]  # [B, Nmax, ...]
    valid = valid.view(*valid.shape, *([1] * (picked.dim() - 2)))
    return torch.where(valid, picked, picked.new_full((), fill))
