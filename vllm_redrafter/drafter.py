# SPDX-License-Identifier: Apache-2.0
"""The ReDrafter drafter: a small recurrent network on top of the target's hidden state.

Follows Apple's reference drafter (``apple/ml-recurrent-drafter``,
``recurrent_drafting/modeling_drafter.py`` and ``train/model.py``)::

    s_0 = 0
    s_t = SiLU(rnn_w(e_t) + rnn_u(s_{t-1}))     (rnn=True; s_1 = SiLU(rnn_w(e_1) + b_u))
    s_t = s_{t-1} + e_t                         (rnn=False; so s_1 = e_1)
    z   = concat([h, s_t])                      (h FIRST, width 2H)
    z   = input_proj(z)                         (only when exit_dim != 2H)
    z   = z + SiLU(layers[k].linear(z))         (k = 0 .. num_draft_layers - 1)
    logits = lm_head(z)                         (no bias, [Vd] outputs; head="drafter")
    logits = T[draft_vocab] @ head_proj(z)      (head="target": T = target's frozen head)

``h`` is the target's post-norm last-layer hidden state at the last committed token and
``e_t = E(x_t)`` are embeddings from the **target's** input embedding table (the drafter
owns no embedding table); ``x_1`` is the token the target itself chose after ``h``.

Differences from the reference:

- The ResBlocks and the output projection are separate attributes (``layers``,
  ``lm_head``) instead of one ``nn.Sequential`` named ``lm_head``; see
  :mod:`vllm_redrafter.checkpoint` for the key mapping.
- Optional reduced output vocabulary (``DrafterConfig.draft_vocab``).
- Optional ``head="target"``: a learned ``head_proj: Linear(E, H)`` in front of the
  target's own frozen output head (:class:`TargetHead`), so the drafter learns far fewer
  parameters and can score every token of the target's vocabulary.
- No logits post-processing here (Apple subtracts the row max and applies a top-50 mask
  inside the drafter); that belongs to the beam search (``draft_top_k``).

Glossary: ``B`` batch, ``S`` sequence length, ``H`` target hidden size, ``E`` exit_dim,
``V`` target vocabulary, ``Vd`` draft vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.beam_search import top_candidates as beam_top_candidates

LM_HEAD_INIT_STD = 0.02
"""Std of ``lm_head``'s normal init (small: near-uniform initial draft distribution)."""


class ResBlock(nn.Module):
    """``z + SiLU(linear(z))`` with ``linear: Linear(E, E, bias=True)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [*, E]
        return z + F.silu(self.linear(z))


class TargetHead(nn.Module):
    """The target's frozen output head, restricted to the draft vocabulary.

    Holds no parameters (nothing of it is saved with the drafter): :meth:`bind` hands it
    the target's ``[V, H]`` output matrix (the input embedding for tied models such as
    the demo target). Without a draft vocabulary the matrix is used by reference; with
    one, its ``[Vd, H]`` rows are gathered once.

    Example: ``V = 5``, ``draft_vocab = [1, 4]``: after ``bind(T)`` the head computes
    ``x @ T[[1, 4]].T``, so logit ``j`` scores target token ``draft_vocab[j]``.
    """

    def __init__(self, vocab_size: int, draft_vocab: list[int] | None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.draft_vocab = draft_vocab
        self.rows: torch.Tensor | None = None  # [Vd, H], not a buffer: never saved

    @torch.no_grad()
    def bind(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Use ``weight [V, H]`` (the target's output head) from now on."""
        if weight.dim() != 2 or weight.shape[0] < self.vocab_size:
            raise ValueError(
                f"target head must be [V>={self.vocab_size}, H], got {tuple(weight.shape)}")
        weight = weight[: self.vocab_size].detach()
        if self.draft_vocab is not None:
            index = torch.tensor(self.draft_vocab, dtype=torch.int64, device=weight.device)
            weight = weight.index_select(0, index)  # [Vd, H]
        self.rows = weight if dtype is None else weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, H]`` -> ``[*, Vd]`` logits."""
        if self.rows is None:
            raise RuntimeError(
                "this drafter scores tokens with the target's output head (head='target'); "
                "call RecurrentDrafter.bind_target_head(target_head_weight) first")
        return F.linear(x, self.rows)


class RecurrentDrafter(nn.Module):
    """ReDrafter's recurrent draft head (see the module docstring for the formulas).

    Parameters (these names are the keys of our checkpoints):

    ==================================  ==========  ================================
    key                                 shape       present when
    ==================================  ==========  ================================
    ``input_proj.weight`` / ``.bias``   [E, 2H]/[E] ``config.has_input_proj``
    ``rnn_w.weight`` (no bias)          [H, H]      ``config.rnn``
    ``rnn_u.weight`` / ``.bias``        [H, H]/[H]  ``config.rnn``
    ``layers.{i}.linear.weight/.bias``  [E, E]/[E]  ``i < num_draft_layers``
    ``lm_head.weight`` (no bias)        [Vd, E]     ``head == "drafter"``
    ``head_proj.weight`` (no bias)      [H, E]      ``head == "target"``
    ``draft_vocab`` (int64 buffer)      [Vd]        ``config.draft_vocab`` is set
    ==================================  ==========  ================================

    Args:
        config: the architecture.
        generator: optional RNG for a reproducible initialisation (default: torch's
            global RNG). Ignored when the module is created on the ``meta`` device.
    """

    def __init__(
        self, config: DrafterConfig, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.config = config
        hidden, exit_dim = config.hidden_size, config.exit_dim

        self.input_proj: nn.Linear | None = None
        if config.has_input_proj:
            self.input_proj = nn.Linear(2 * hidden, exit_dim, bias=True)
        self.rnn_w: nn.Linear | None = None
        self.rnn_u: nn.Linear | None = None
        if config.rnn:
            self.rnn_w = nn.Linear(hidden, hidden, bias=False)
            self.rnn_u = nn.Linear(hidden, hidden, bias=True)
        self.layers = nn.ModuleList(
            ResBlock(exit_dim) for _ in range(config.num_draft_layers)
        )
        self.head_proj: nn.Linear | None = None
        self.lm_head: nn.Module
        if config.uses_target_head:
            self.head_proj = nn.Linear(exit_dim, hidden, bias=False)
            self.lm_head = TargetHead(config.vocab_size, config.draft_vocab)
        else:
            self.lm_head = nn.Linear(exit_dim, config.draft_vocab_size, bias=False)

        self.draft_vocab: torch.Tensor | None
        if config.draft_vocab is not None:
            # [Vd] int64: draft id j -> target id draft_vocab[j]
            self.register_buffer(
                "draft_vocab", torch.tensor(config.draft_vocab, dtype=torch.int64)
            )
        else:
            self.draft_vocab = None

        if not self._reference_param().is_meta:
            self.init_weights(generator)

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter.

        Linear layers get PyTorch's default ``nn.Linear`` distribution
        (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weight and bias); ``lm_head`` gets
        ``N(0, LM_HEAD_INIT_STD)``. Values are drawn on the CPU in float32 and copied,
        so a CPU ``generator`` works whatever the module's device and dtype.
        """
        for name, param in self.named_parameters():
            if name == "lm_head.weight":
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, LM_HEAD_INIT_STD, generator=generator)
            else:
                # weight [out, in] and bias [out] share fan_in = in_features
                module_name = name.rsplit(".", 1)[0]
                linear = self.get_submodule(module_name)
                assert isinstance(linear, nn.Linear)
                bound = 1.0 / math.sqrt(linear.in_features)
                values = torch.empty(param.shape, dtype=torch.float32)
                values.uniform_(-bound, bound, generator=generator)
            param.copy_(values)

    def num_parameters(self) -> int:
        """Number of trainable scalars (buffers excluded)."""
        return sum(param.numel() for param in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the weights."""
        return self._reference_param().dtype

    @property
    def hidden_size(self) -> int:
        """``H``."""
        return self.config.hidden_size

    @property
    def draft_vocab_size(self) -> int:
        """``Vd``."""
        return self.config.draft_vocab_size

    def _reference_param(self) -> torch.Tensor:
        """A parameter every architecture has (dtype/device source)."""
        if self.head_proj is not None:
            return self.head_proj.weight
        weight = self.lm_head.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def _param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        weight = self._reference_param()
        return weight.dtype, weight.device

    def bind_target_head(self, weight: torch.Tensor) -> None:
        """Give a ``head="target"`` drafter the target's ``[V, H]`` output matrix (cast to
        the drafter's dtype). Raises ``ValueError`` for a drafter that owns its head."""
        if not isinstance(self.lm_head, TargetHead):
            raise ValueError("bind_target_head: this drafter owns its output head "
                             "(head='drafter')")
        self.lm_head.bind(weight, dtype=self._param_dtype_device()[0])

    # ---------------------------------------------------------------- inference

    def initial_state(
        self,
        shape_prefix: tuple[int, ...] | torch.Size,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The RNN state before any token, ``s_0 = 0``.

        Args:
            shape_prefix: leading dims, e.g. ``(B, W)``.
            dtype, device: default to those of the drafter's parameters.

        Returns:
            ``[*shape_prefix, H]`` zeros.
        """
        param_dtype, param_device = self._param_dtype_device()
        return torch.zeros(
            (*shape_prefix, self.hidden_size),
            dtype=dtype if dtype is not None else param_dtype,
            device=device if device is not None else param_device,
        )

    def update_state(
        self, state: torch.Tensor, token_embeds: torch.Tensor
    ) -> torch.Tensor:
        """One recurrence step, feeding the embedding of the newest token.

        Args:
            state: ``[*, H]`` previous state ``s_{t-1}`` (zeros for ``t = 1``).
            token_embeds: ``[*, H]`` target embedding ``e_t`` of token ``x_t``.

        Returns:
            ``[*, H]`` new state: ``SiLU(rnn_w(e_t) + rnn_u(s_{t-1}))`` if ``rnn`` else
            ``s_{t-1} + e_t``.
        """
        if self.rnn_w is None or self.rnn_u is None:
            return state + token_embeds  # [*, H]
        return F.silu(self.rnn_w(token_embeds) + self.rnn_u(state))  # [*, H]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Head on already concatenated features.

        Args:
            features: ``[*, 2H]`` = ``concat([hidden, state])``.

        Returns:
            ``[*, Vd]`` raw logits.
        """
        return self.lm_head(self._head_input(features))  # [*, Vd]

    def _head_input(self, features: torch.Tensor) -> torch.Tensor:
        """``[*, 2H]`` features -> what ``lm_head`` reads: ``[*, E]`` (own head) or
        ``[*, H]`` (``head="target"``)."""
        z = features  # [*, 2H]
        if self.input_proj is not None:
            z = self.input_proj(z)  # [*, E]
        for block in self.layers:
            z = block(z)  # [*, E]
        if self.head_proj is not None:
            z = self.head_proj(z)  # [*, H], fed to the target's frozen head
        return z

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits for the next token.

        Args:
            hidden: ``[*, H]`` target hidden state ``h`` (broadcast to ``state``'s
                leading dims, e.g. ``[B, 1, H]`` against ``[B, W, H]``).
            state: ``[*, H]`` current RNN state ``s_t``.

        Returns:
            ``[*, Vd]`` raw logits (no max-subtraction, no top-k mask).
        """
        return self.head(self._features(hidden, state))  # [*, Vd]

    def _features(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``concat([hidden, state])`` with ``hidden`` broadcast: ``[*, 2H]``."""
        if hidden.shape != state.shape:
            hidden = hidden.expand_as(state)  # [*, H]
        return torch.cat([hidden, state], dim=-1)  # [*, 2H], hidden FIRST

    def top_candidates(
        self, hidden: torch.Tensor, state: torch.Tensor, k: int, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``k`` most likely next draft ids, as beam search needs them.

        Same inputs as :meth:`logits`; returns ``(log_probs [*, K] float32, ids [*, K]
        int64)`` with ``K = min(k, Vd)``, sorted descending, ``draft_top_k``-masked
        entries ``-inf`` (see :func:`vllm_redrafter.beam_search.top_candidates`). An
        ``lm_head`` with its own ``top_candidates(z, k, top_k)`` (a vocab-sharded head
        merging per-shard candidates) answers directly; no full float32 log-softmax is
        ever materialised.
        """
        z = self._head_input(self._features(hidden, state))  # [*, E] or [*, H]
        sharded = getattr(self.lm_head, "top_candidates", None)
        if sharded is not None:
            return sharded(z, k, top_k)
        return beam_top_candidates(self.lm_head(z), k, top_k)

    def best_draft(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Each row's most likely next draft id (the one-beam chain's step).

        Same inputs as :meth:`logits`; returns ``[*]`` int64 draft ids: the argmax of
        the logits (the first of equal maxima), with no log-softmax. A vocab-sharded
        head (``tp_size > 1``) answers with its merged top candidate instead of
        all-gathering the logits. Example: logits ``[1., 3., 3.]`` -> ``1``.
        """
        z = self._head_input(self._features(hidden, state))  # [*, E] or [*, H]
        sharded = getattr(self.lm_head, "top_candidates", None)
        if sharded is not None and getattr(self.lm_head, "tp_size", 1) > 1:
            return sharded(z, 1)[1][..., 0]  # [*]
        # max's indices: the first of equal maxima, as argmax, at a third of argmax's
        # time on a bfloat16 row of 8,192 here (10 vs 31 us)
        return self.lm_head(z).max(dim=-1).indices  # [*]

    # ----------------------------------------------------------------- training

    def forward_train(
        self, hidden: torch.Tensor, token_embeds: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        """Teacher-forced logits of ``num_steps`` drafter steps at every position.

        Step ``i`` (0-based) at position ``t`` has consumed the embeddings of tokens
        ``t+1 .. t+i+1`` (in that order) and predicts token ``t+i+2``; this is exactly
        what inference computes when ``h = hidden[:, t]`` and the target's own next
        token is ``tokens[t+1]``. Inputs past the end of the sequence are zero
        embeddings; the loss must mask the corresponding labels (``t+i+2 >= S``).

        Worked example, ``S = 5``, tokens ``[a, b, c, d, e]`` with embeddings
        ``[Ea, Eb, Ec, Ed, Ee]``, ``num_steps = 2``::

            position t           0     1     2     3     4
            step 0 consumes      b     c     d     e     0
                   predicts      c     d     e     -     -     (t=3, 4 masked)
            step 1 consumes      b,c   c,d   d,e   e,0   0,0
                   predicts      d     e     -     -     -     (t=2, 3, 4 masked)

        i.e. step ``i`` feeds ``token_embeds`` shifted left by ``i + 1`` positions
        (zero-filled at the end) into the recurrence.

        Args:
            hidden: ``[B, S, H]`` target post-norm hidden states.
            token_embeds: ``[B, S, H]`` target embeddings of the same tokens.
            num_steps: number of drafter steps (>= 1), the training horizon.

        Returns:
            ``[B, num_steps, S, Vd]`` logits; ``[:, i, t]`` scores token ``t + i + 2``.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden must be [B, S, H={self.hidden_size}], "
                f"got {tuple(hidden.shape)}"
            )
        if token_embeds.shape != hidden.shape:
            raise ValueError(
                f"token_embeds must have hidden's shape {tuple(hidden.shape)}, "
                f"got {tuple(token_embeds.shape)}"
            )
        bsz, seq_len, width = hidden.shape
        # windows[:, t, i] = token_embeds[:, t + i + 1] (zeros past the end): [B, S, n, H]
        padded = torch.cat([token_embeds, token_embeds.new_zeros(bsz, num_steps + 1, width)],
                           dim=1)  # [B, S + n + 1, H]
        windows = torch.stack(
            [padded[:, i + 1: i + 1 + seq_len] for i in range(num_steps)], dim=2
        )  # [B, S, n, H]
        logits = self.forward_rows(
            hidden.reshape(bsz * seq_len, width), windows.reshape(bsz * seq_len, num_steps, width)
        )  # [B*S, n, Vd]
        return logits.view(bsz, seq_len, num_steps, -1).transpose(1, 2)  # [B, n, S, Vd]

    def forward_rows(
        self, hidden: torch.Tensor, step_embeds: torch.Tensor, dropout: float = 0.0
    ) -> torch.Tensor:
        """Teacher-forced logits in the *row* layout (the trainer's): one example per row.

        Row ``r`` holds ``h_t`` and the embeddings of ``x_{t+1} .. x_{t+n}``; step ``i``
        has consumed ``x_{t+1} .. x_{t+i+1}`` and predicts ``x_{t+i+2}``. The recurrence
        runs step by step; the head (the expensive part) runs once on all steps.

        Example: ``n = 2``, one row with ``h`` and embeddings ``[Eb, Ec]``: step 0 scores
        the token after ``b`` from ``(h, s1 = f(Eb))``, step 1 the token after ``c`` from
        ``(h, s2 = f(Ec, s1))``.

        Args:
            hidden: ``[N, H]`` target hidden states.
            step_embeds: ``[N, n, H]`` input embeddings (zeros where past the end).
            dropout: dropout probability on the head's input features (training only).

        Returns:
            ``[N, n, Vd]`` logits.
        """
        num_steps = step_embeds.shape[1]
        state = self.initial_state(
            (hidden.shape[0],), dtype=hidden.dtype, device=hidden.device
        )  # [N, H]
        states = []
        for step in range(num_steps):
            state = self.update_state(state, step_embeds[:, step])  # [N, H]
            states.append(state)
        stacked = torch.stack(states, dim=1)  # [N, n, H]
        features = torch.cat(
            [hidden.unsqueeze(1).expand_as(stacked), stacked], dim=-1
        )  # [N, n, 2H], hidden FIRST
        if dropout > 0 and self.training:
            features = F.dropout(features, dropout, training=True)
        return self.head(features)  # [N, n, Vd]

    def forward(
        self, hidden: torch.Tensor, token_embeds: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        """Alias of :meth:`forward_train` (so ``nn.Module.__call__`` hooks apply)."""
        return self.forward_train(hidden, token_embeds, num_steps)

    # ----------------------------------------------------------- vocab mapping

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids (identity without a draft vocab).

        Args:
            draft_ids: ``[*]`` int64 ids in ``[0, Vd)``.

        Returns:
            ``[*]`` int64 target ids. Example: with ``draft_vocab = [2, 5, 7]``,
            ``to_target_ids(tensor([0, 2])) == tensor([2, 7])``.
        """
        if self.draft_vocab is None:
            return draft_ids
        return self.draft_vocab[draft_ids]  # [*]

    def target_to_draft_map(self) -> torch.Tensor:
        """``[V]`` int64 map from target id to draft id, ``-1`` outside the draft vocab.

        Example: ``V = 8``, ``draft_vocab = [2, 5, 7]`` gives
        ``[-1, -1, 0, -1, -1, 1, -1, 2]``; without a draft vocab it is ``arange(V)``.
        """
        device = self._reference_param().device
        vocab_size = self.config.vocab_size
        if self.draft_vocab is None:
            return torch.arange(vocab_size, dtype=torch.int64, device=device)
        mapping = torch.full((vocab_size,), -1, dtype=torch.int64, device=device)
        mapping[self.draft_vocab] = torch.arange(
            self.draft_vocab.numel(), dtype=torch.int64, device=device
        )
        return mapping  # [V]

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"hidden_size={cfg.hidden_size}, exit_dim={cfg.exit_dim}, "
            f"num_draft_layers={cfg.num_draft_layers}, rnn={cfg.rnn}, "
            f"vocab_size={cfg.vocab_size}, draft_vocab_size={cfg.draft_vocab_size}, "
            f"head={cfg.head}"
        )


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The dtype names the project accepts (drafter, training, hidden states), one map."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for any other name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_draft_dtype(option: str, uses_target_head: bool) -> None:
    """Refuse a ``draft_dtype`` option that cannot apply (the one check behind the
    start-up validation and :func:`resolve_draft_dtype`).

    Raises:
        ValueError: an unknown name, or an explicit dtype for a drafter that scores with
            the target's head.
    """
    if option == "auto":
        return
    if option not in DTYPES:
        raise ValueError(f"draft_dtype must be auto, {', '.join(DTYPES)}; got {option!r}")
    if uses_target_head:
        raise ValueError(
            "draft_dtype applies to drafters with their own output head; this drafter "
            "scores with the target's head (head='target'), which runs in the target's "
            "dtype: omit draft_dtype")


def resolve_draft_dtype(option: str, target_dtype: torch.dtype, stored_dtype: torch.dtype,
                        uses_target_head: bool) -> torch.dtype:
    """The dtype a drafter runs in (the ``draft_dtype`` option).

    ``"auto"``: the target's dtype, except that a float32 target runs a drafter stored
    in 16 bits in its stored dtype (its weights hold no more precision, and a 16-bit
    matmul is ~1.6x faster at batch 1 and ~3x at batch 16 on an AMX CPU); a drafter that
    scores with the target's head (``uses_target_head``) shares the head's weights by
    reference and always runs in the target's dtype. Any other value is taken as given.

    Example: ``("auto", float32, bfloat16, False)`` -> bfloat16;
    ``("auto", float32, float32, False)`` -> float32; ``("auto", bfloat16, float32,
    False)`` -> bfloat16; ``("float32", bfloat16, bfloat16, False)`` -> float32.

    Raises:
        ValueError: an explicit dtype for a target-head drafter, or an unknown name.
    """
    check_draft_dtype(option, uses_target_head)
    if option != "auto":
        return DTYPES[option]
    if uses_target_head or target_dtype != torch.float32:
        return target_dtype
    return stored_dtype if stored_dtype in (torch.bfloat16, torch.float16) else target_dtype
