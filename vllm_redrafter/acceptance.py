# SPDX-License-Identifier: Apache-2.0
"""Verification: which drafted tokens the target accepts, and what it emits next.

Two rules:

- **Greedy** (temperature 0), exact: a drafted token is accepted iff it equals the
  target's argmax after the prefix before it; the best beam (or tree path) is the
  longest accepted run, and the target's argmax after its last accepted token is the
  bonus token. This follows Apple's ``recurrent_drafting.py``
  (``_greedy_choose_from_candidates``); ties between equally long beams go to the
  smallest beam index. Output equals greedy autoregressive decoding of the target.
- **Sample-and-descend** (any temperature / top-k / top-p), lossless for any tree: at
  the current node sample the target's token; if a child carries it, accept and descend,
  otherwise emit it and stop. Apple's sampling rule (a ratio test against the drafter's
  beam-search distribution) is *not* lossless because beams are not sampled from the
  drafter; see ``redrafter-algorithm.md`` §4.2. Acceptance is lower than rejection
  sampling with sampled drafts, but the output distribution is exactly the target's.

Convention: ``p`` is the target distribution (there is no draft distribution ``q`` in
these rules). Glossary: ``B`` batch, ``W`` beam width, ``L`` beam length (includes the
init token), ``N`` packed tree nodes (``Nmax`` padded), ``V`` target vocabulary.
"""

from __future__ import annotations

import torch

from vllm_redrafter.tree import BeamTree

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (same threshold as vLLM's sampler)."""


# --------------------------------------------------------------------------- greedy


def greedy_accept_beams(
    tokens: torch.Tensor, target_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance over beams.

    Args:
        tokens: ``[B, W, L]`` int64 beams (column 0 = init token, already emitted).
        target_argmax: ``[B, W, L]`` int64; ``target_argmax[b, i, k]`` is the target's
            argmax **after** ``tokens[b, i, :k+1]``.

    Returns:
        ``(num_accepted [B], best_beam [B], next_tokens [B])``, all int64:
        ``num_accepted`` in ``0..L-1`` drafted tokens accepted on ``best_beam`` (the
        smallest beam with the longest accepted run), and ``next_tokens`` the target's
        token after them (the bonus token, the next init token). The request emits
        ``tokens[b, best, 1 : num_accepted + 1]`` then ``next_tokens[b]``.

    Example: beams ``[a x y], [a x z]``, argmax ``[x z w], [x z v]`` -> beam 0 accepts
    ``x`` then fails (``y != z``), beam 1 accepts ``x, z``: ``(2, 1, v)``.
    """
    if tokens.dim() != 3 or target_argmax.shape != tokens.shape:
        raise ValueError(
            "tokens and target_argmax must both be [B, W, L], got "
            f"{tuple(tokens.shape)} and {tuple(target_argmax.shape)}"
        )
    ok = tokens[:, :, 1:] == target_argmax[:, :, :-1]  # [B, W, L-1]
    run = ok.to(torch.int64).cumprod(dim=2).sum(dim=2)  # [B, W] leading-true count
    # argmax returns the first maximal index: ties go to the smallest beam.
    best_beam = run.argmax(dim=1)  # [B]
    num_accepted = run.gather(1, best_beam[:, None]).squeeze(1)  # [B]
    rows = torch.arange(tokens.shape[0], device=tokens.device)  # [B]
    next_tokens = target_argmax[rows, best_beam, num_accepted]  # [B]
    return num_accepted, best_beam, next_tokens


def greedy_accept_tree(
    packed_tokens: torch.Tensor | list[int],
    parents: torch.Tensor | list[int],
    target_argmax: torch.Tensor | list[int],
) -> tuple[list[int], int]:
    """Greedy acceptance on one request's packed tree (a walk from the root).

    Args:
        packed_tokens: ``[N]`` node tokens (padding ``-1`` allowed).
        parents: ``[N]`` parent node of each node, ``-1`` for the root and padding.
        target_argmax: ``[N]`` target argmax after the prefix ending at each node.

    Returns:
        ``(path, next_token)``: ``path`` lists the accepted nodes from the root (node 0)
        down, so ``len(path) - 1`` drafted tokens are accepted (their tokens are
        ``packed_tokens[path[1:]]``); ``next_token = target_argmax[path[-1]]``. When
        several children carry the argmax token (only possible without dedup), the
        smallest node index wins.

    Example (tree of ``tree.py``'s docstring, ``A B C D / E F / G D'``): argmax
    ``[B, E, x, x, F, y, x, x]`` accepts ``B`` (node 1), ``E`` (node 4), ``F`` (node 5):
    ``([0, 1, 4, 5], y)``.
    """
    tokens = _as_list(packed_tokens)
    parent_of = _as_list(parents)
    argmax = _as_list(target_argmax)
    if not (len(tokens) == len(parent_of) == len(argmax)) or not tokens:
        raise ValueError(
            "packed_tokens, parents and target_argmax must be non-empty and of equal "
            f"length, got {len(tokens)}, {len(parent_of)}, {len(argmax)}"
        )
    children = _children_lists(parent_of)
    path = [0]
    while True:
        wanted = argmax[path[-1]]
        child = next((c for c in children[path[-1]] if tokens[c] == wanted), None)
        if child is None:
            return path, wanted
        path.append(child)


def greedy_accept_tree_batched(
    tree: BeamTree, target_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance on a batch of packed trees, loop-free.

    A node is accepted iff every node on its root path (itself included, root excluded)
    carries the target's argmax after its parent; the deepest accepted node ends the
    path. Equals :func:`greedy_accept_beams` on the unpacked beams.

    Args:
        tree: the packed trees (:func:`vllm_redrafter.tree.build_tree`).
        target_argmax: ``[B, Nmax]`` int64 target argmax after each node (any value on
            padding).

    Returns:
        ``(num_accepted [B], best_beam [B], next_tokens [B])`` as in
        :func:`greedy_accept_beams`. The accepted nodes are
        ``tree.unpacker[b, best_beam[b], : num_accepted[b] + 1]``.
    """
    if target_argmax.shape != tree.packed_tokens.shape:
        raise ValueError(
            f"target_argmax must be [B, Nmax]={tuple(tree.packed_tokens.shape)}, "
            f"got {tuple(target_argmax.shape)}"
        )
    valid = tree.valid  # [B, Nmax]
    parent_argmax = target_argmax.gather(1, tree.parents.clamp(min=0))  # [B, Nmax]
    node_ok = torch.where(
        tree.parents >= 0, tree.packed_tokens == parent_argmax, valid
    )  # [B, Nmax]
    # Accepted iff no ancestor-or-self is rejected.
    rejected_on_path = (tree.attn_mask & ~node_ok[:, None, :]).any(dim=2)  # [B, Nmax]
    accepted = valid & ~rejected_on_path  # [B, Nmax]
    # Deepest accepted node (first on ties: smallest node index, i.e. smallest beam).
    last = torch.where(accepted, tree.depth, -1).argmax(dim=1)  # [B]
    rows = torch.arange(last.shape[0], device=last.device)  # [B]
    num_accepted = tree.depth[rows, last]  # [B]
    best_beam = tree.packed_index[rows, last] // tree.beam_length  # [B]
    next_tokens = target_argmax[rows, last]  # [B]
    return num_accepted, best_beam, next_tokens


# ------------------------------------------------------------------------- warping


def warp_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Target sampling distribution after temperature, top-k and top-p (vLLM order).

    Order: divide by ``temperature``; keep the logits ``>=`` the k-th largest (ties at
    the k-th value are all kept); renormalise; keep the smallest set of most likely
    tokens whose mass reaches ``top_p`` (equal probabilities ranked by token id; the
    most likely token is always kept). This is vLLM's sampler order (top-p is relative
    to the top-k distribution).

    Args:
        logits: ``[*, V]`` float logits.
        temperature: ``< 1e-5`` (including 0 and negatives) means greedy: a point mass
            on the argmax (first maximal index); top-k/top-p are then irrelevant.
        top_k: None, ``0`` or ``-1`` (vLLM's "all") disable it; otherwise ``>= 1``.
        top_p: None or ``1.0`` disable it; otherwise in ``(0, 1]``.

    Returns:
        ``[*, V]`` float32 probabilities (rows sum to 1).

    Example: logits ``log([0.5, 0.3, 0.15, 0.05])``, ``T = 1``: ``top_k = 3`` gives
    ``[0.526, 0.316, 0.158, 0]``; adding ``top_p = 0.8`` keeps ``0.526 + 0.316 >= 0.8``:
    ``[0.625, 0.375, 0, 0]``.
    """
    if top_k is not None and top_k < -1:
        raise ValueError(f"top_k must be None, -1, 0 or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    logits = logits.float()  # [*, V]
    vocab = logits.shape[-1]
    if temperature < SAMPLING_EPS:
        best = logits.argmax(dim=-1, keepdim=True)  # [*, 1]
        return torch.zeros_like(logits).scatter_(-1, best, 1.0)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [*, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p_mask(logits, top_p)
    return logits.softmax(dim=-1)


def _top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (``-inf``) the tokens ranked after the mass above them reaches ``top_p``.

    Args:
        logits: ``[*, V]`` float32 logits (may hold ``-inf``).
        top_p: in ``(0, 1)``.

    Returns:
        ``[*, V]`` masked logits. Example: probs ``[0.1, 0.6, 0.3]``, ``top_p = 0.7``:
        ranked ``0.6, 0.3, 0.1``, mass above them ``0, 0.6, 0.9`` -> keep tokens 1, 2.
    """
    probs = logits.softmax(dim=-1)  # [*, V]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [*, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [*, V]
    drop_sorted = mass_before >= top_p  # [*, V]
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # [*, V]
    return logits.masked_fill(drop, float("-inf"))


# --------------------------------------------------------------- sample-and-descend


def sample_and_descend(
    packed_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """Lossless sampling acceptance on one request's tree.

    Start at the root (node 0). At the current node ``u`` draw ``x ~ target_probs[u]``;
    if a child of ``u`` carries ``x`` (smallest index on ties), accept it and move
    there; otherwise (including at a leaf) emit ``x`` and stop.

    Why it is lossless: ``target_probs[u]`` is the target's (warped) conditional after
    the prefix ending at ``u``, and ``x`` is drawn from it no matter what the tree
    holds. The tree only decides *whether to stop*, and that decision depends on tokens
    already drawn, never on future ones. So every emitted token is drawn from exactly
    the target conditional of the tokens before it, i.e. the emitted tokens are the
    first steps of an ordinary autoregressive sample; the next step resumes from the
    same kind of draw. The tree must not depend on this step's random draws (it is built
    from the committed context only), which holds for drafted beams.

    Args:
        packed_tokens: ``[N]`` int64 node tokens (padding ``-1``).
        parents: ``[N]`` int64 parent of each node, ``-1`` for the root and padding.
        target_probs: ``[N, V]`` target distribution after each node's prefix (e.g.
            :func:`warp_logits` of the target logits); padding rows are never read.
        generator: torch RNG on ``target_probs``' device (None: the global RNG).

    Returns:
        ``(path, emitted)``: ``path`` the accepted nodes from the root down,
        ``emitted`` the tokens to append to the output, ``len(emitted) == len(path)``:
        ``emitted[:-1] == packed_tokens[path[1:]]`` (accepted drafts) and
        ``emitted[-1]`` is the final sampled token (the next init token). The root's own
        token is not in ``emitted``.

    Example (tree ``A B C D / E F / G D'`` of ``tree.py``): drawing ``B`` at node 0,
    ``G`` at node 1, then ``z`` at node 6 (no child of ``G`` carries it) gives
    ``([0, 1, 6], [B, G, z])``.
    """
    if packed_tokens.dim() != 1 or parents.shape != packed_tokens.shape:
        raise ValueError(
            "packed_tokens and parents must both be [N], got "
            f"{tuple(packed_tokens.shape)} and {tuple(parents.shape)}"
        )
    path, emitted, count = sample_and_descend_batched(
        packed_tokens[None], parents[None], target_probs[None], generator
    )
    num = int(count[0])
    return path[0, :num].tolist(), emitted[0, :num].tolist()


def sample_and_descend_batched(
    packed_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_and_descend` for a batch of trees, looping only over depth.

    Every step draws one uniform per request (finished requests too), so results depend
    only on ``generator``'s state and ``B``.

    Args:
        packed_tokens: ``[B, Nmax]`` int64 node tokens, ``-1`` on padding.
        parents: ``[B, Nmax]`` int64 parents, ``-1`` for roots and padding.
        target_probs: ``[B, Nmax, V]`` target distribution after each node's prefix.
        generator: torch RNG on ``target_probs``' device (None: the global RNG).

    Returns:
        ``(path [B, T], emitted [B, T], num_emitted [B])`` int64, ``T`` = longest
        emitted run in the batch (``<= tree depth + 1``); entries past
        ``num_emitted[b]`` are ``-1``. Row ``b`` is the ``(path, emitted)`` pair of
        :func:`sample_and_descend`.
    """
    if packed_tokens.dim() != 2 or parents.shape != packed_tokens.shape:
        raise ValueError(
            "packed_tokens and parents must both be [B, Nmax], got "
            f"{tuple(packed_tokens.shape)} and {tuple(parents.shape)}"
        )
    if target_probs.dim() != 3 or target_probs.shape[:2] != packed_tokens.shape:
        raise ValueError(
            f"target_probs must be [B, Nmax, V] with [B, Nmax]="
            f"{tuple(packed_tokens.shape)}, got {tuple(target_probs.shape)}"
        )
    batch = packed_tokens.shape[0]
    device = target_probs.device
    rows = torch.arange(batch, device=device)  # [B]
    node = torch.zeros(batch, dtype=torch.int64, device=device)  # [B] current node
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [B]
    path_cols: list[torch.Tensor] = []
    emitted_cols: list[torch.Tensor] = []
    while True:
        sampled = _sample_rows(target_probs[rows, node], generator)  # [B]
        path_cols.append(torch.where(active, node, -1))
        emitted_cols.append(torch.where(active, sampled, -1))
        # Child of the current node carrying the sampled token, if any.
        match = (parents == node[:, None]) & (packed_tokens == sampled[:, None])
        # match: [B, Nmax]
        active = active & match.any(dim=1)  # [B]
        node = torch.where(active, match.to(torch.uint8).argmax(dim=1), node)  # [B]
        if not bool(active.any()):
            break
    path = torch.stack(path_cols, dim=1)  # [B, T]
    emitted = torch.stack(emitted_cols, dim=1)  # [B, T]
    return path, emitted, (path >= 0).sum(dim=1)


def _sample_rows(
    probs: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One categorical draw per row by inverse CDF (float64), never a zero-prob token.

    Args:
        probs: ``[R, V]`` non-negative weights (need not be normalised).
        generator: torch RNG on ``probs``' device, or None.

    Returns:
        ``[R]`` int64 token ids. Example: ``probs [[0.2, 0, 0.8]]`` and a uniform draw
        ``u = 0.5`` -> CDF ``[0.2, 0.2, 1.0]``, first entry ``> 0.5`` -> token 2.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [R, V]
    total = cdf[:, -1:]  # [R, 1]
    uniform = torch.rand(
        probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device
    )  # [R, 1]
    # Keep the target strictly below the total mass (rounding could reach it), so the
    # first CDF entry above it always belongs to a token with positive probability.
    below_total = torch.nextafter(total, torch.zeros_like(total))  # [R, 1]
    target = torch.minimum(uniform * total, below_total)  # [R, 1]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]
    return drawn.clamp(max=probs.shape[1] - 1)  # only an all-zero row reaches V


def _as_list(values: torch.Tensor | list[int]) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


def _children_lists(parent_of: list[int]) -> list[list[int]]:
    """``children[u]`` = nodes whose parent is ``u``, ascending. Example:
    ``[-1, 0, 1, 2, 1, 4, 1, 6]`` -> ``[[1], [2, 4, 6], [3], [], [5], [], [7], []]``."""
    children: list[list[int]] = [[] for _ in parent_of]
    for node, parent in enumerate(parent_of):
        if parent >= 0:
            children[parent].append(node)
    return children
