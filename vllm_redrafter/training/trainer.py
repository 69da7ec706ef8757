# SPDX-License-Identifier: Apache-2.0
"""Stage 3 of distillation: train the drafter on cached hidden states (the target stays frozen).

Every response position is one training *row*: the target's post-norm hidden state ``h_t``, the
token ``x_{t+1}`` the target emitted right after it, and the following tokens. Drafter step ``i``
consumes the embeddings of ``x_{t+1} .. x_{t+i+1}`` (the target's own, frozen embedding table)
and predicts ``x_{t+i+2}`` (redrafter-algorithm.md §5). Rows are independent, so batches are
uniform random samples of positions, which mixes sequences far better than sequence batches.

The loss is Apple's: the sum over steps of each step's mean cross-entropy. Labels outside the
draft vocabulary are left out of the loss but count as misses in the accuracies.

Held-out evaluation reports, per step, the loss and top-1 / top-k accuracy, and an estimate of the
mean acceptance length (tokens per target step, ``1 + accepted``) under greedy verification: the
responses are the target's own greedy output, so the beam search's candidates can be checked
against the sequence itself. It is measured at every response position (inference only visits
the positions it reaches), so it is an estimate.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_redrafter.logger import get_logger
from vllm_redrafter.training.loss import IGNORE, distill_loss, row_windows
from vllm_redrafter.training.options import TrainConfig

logger = get_logger(__name__)


# --------------------------------------------------------------------------- data


@dataclass
class RowSet:
    """Rows of a data set: ``hidden`` [T, H], ``windows`` [T, n+1], ``seq`` [T] (sequence index)."""

    hidden: torch.Tensor
    windows: torch.Tensor
    seq: torch.Tensor
    ids: list[str]
    tokens: torch.Tensor  # [T] int64, tokens[k] = windows[k, 0]

    @classmethod
    def from_shards(cls, shards: dict, num_steps: int) -> RowSet:
        offsets = shards["seq_offsets"]  # [n_seq+1]
        lengths = offsets[1:] - offsets[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [T]
        win = row_windows(shards["tokens"], offsets, num_steps)  # [T, n+1]
        return cls(shards["hidden"], win, seq, list(shards["ids"]), shards["tokens"])

    def rows_of(self, seq_mask: torch.Tensor) -> torch.Tensor:
        """``[R]`` row indices of the selected sequences that have at least one label."""
        return torch.nonzero(seq_mask[self.seq] & (self.windows[:, 1] >= 0)).squeeze(1)


def split_sequences(num_seqs: int, heldout_fraction: float, seed: int) -> torch.Tensor:
    """``[n_seq]`` bool, True for held-out sequences (a fixed random subset)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_seqs, generator=gen)
    n_held = int(round(num_seqs * heldout_fraction))
    if heldout_fraction > 0 and num_seqs > 1:
        n_held = max(1, min(n_held, num_seqs - 1))
    mask = torch.zeros(num_seqs, dtype=torch.bool)
    mask[perm[:n_held]] = True
    return mask


# ------------------------------------------------------------------------ forward


def step_logits(model, embed_table: torch.Tensor, hidden: torch.Tensor, windows: torch.Tensor,
                num_steps: int, dropout: float = 0.0, training: bool = False):
    """Yield ``[N, Vd]`` logits of drafter steps ``0 .. n-1`` for ``N`` rows.

    Args:
        hidden: ``[N, H]`` target hidden states ``h_t``.
        windows: ``[N, n+1]`` target ids ``x_{t+1} .. x_{t+n+1}`` (``-1`` past the end; those
            inputs become zero embeddings and their labels must be ignored).
    """
    logits = all_step_logits(model, embed_table, hidden, windows, num_steps, dropout, training)
    for i in range(num_steps):
        yield logits[:, i]  # [N, Vd]


def all_step_logits(model, embed_table: torch.Tensor, hidden: torch.Tensor,
                    windows: torch.Tensor, num_steps: int, dropout: float = 0.0,
                    training: bool = False) -> torch.Tensor:
    """``[N, n, Vd]`` logits of all drafter steps for token windows (``-1`` past the end):
    the target's embeddings looked up, then :meth:`RecurrentDrafter.forward_rows`."""
    inp = windows[:, :num_steps]  # [N, n]
    emb = embed_table[inp.clamp(min=0)].to(hidden.dtype)  # [N, n, H]
    emb = emb * (inp >= 0).unsqueeze(-1).to(emb.dtype)  # zeros past the end
    return model.forward_rows(hidden, emb, dropout if training else 0.0)  # [N, n, Vd]


def draft_labels(windows: torch.Tensor, t2d: torch.Tensor,
                 num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_labels, acc_labels)`` both ``[N, n]`` draft ids.

    ``loss_labels`` use ``IGNORE`` past the end and outside the draft vocabulary;
    ``acc_labels`` use ``IGNORE`` past the end and ``-1`` (always a miss) outside it.
    """
    tgt = windows[:, 1:num_steps + 1]  # [N, n]
    acc = t2d[tgt.clamp(min=0)]  # [N, n]
    acc = torch.where(tgt >= 0, acc, torch.full_like(acc, IGNORE))
    loss = torch.where(acc >= 0, acc, torch.full_like(acc, IGNORE))
    return loss, acc


@torch.no_grad()
def teacher_logits(hidden: torch.Tensor, rows: torch.Tensor, windows: torch.Tensor,
                   head_rows: torch.Tensor, num_steps: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits at each step's label position, from the cached hidden states.

    Step ``i`` of row ``r`` predicts the token the target emitted after hidden row
    ``r + i + 1`` (same sequence), so the target's distribution there is
    ``head_rows @ hidden[r + i + 1]``.

    Args:
        hidden: ``[T, H]`` all cached rows of the data set.
        rows: ``[N]`` the batch's row indices.
        windows: ``[N, n+1]`` their token windows (``-1`` past the sequence's end).
        head_rows: ``[Vd, H]`` the target's output head over the draft vocabulary.

    Returns:
        ``(logits [N, n, Vd], valid [N, n])``; invalid rows hold finite garbage.

    Example: rows ``[7]``, windows ``[[a, b, c, -1]]`` (n = 3): label rows 8, 9, 10,
    valid ``[True, True, False]``.
    """
    valid = windows[:, 1:num_steps + 1] >= 0  # [N, n]
    label_rows = rows[:, None] + 1 + torch.arange(num_steps)[None]  # [N, n]
    label_rows = label_rows.clamp(max=hidden.shape[0] - 1)
    h = hidden[label_rows].to(head_rows.dtype)  # [N, n, H]
    return F.linear(h, head_rows), valid  # [N, n, Vd]


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run (warm-up, then decay)."""
    if cfg.warmup_ratio > 0 and progress < cfg.warmup_ratio:
        return max(progress / cfg.warmup_ratio, 1e-3)
    if cfg.schedule == "constant":
        return 1.0
    frac = min(1.0, (progress - cfg.warmup_ratio) / max(1e-9, 1.0 - cfg.warmup_ratio))
    if cfg.schedule == "linear":
        shape = 1.0 - frac
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, embed_table: torch.Tensor, data: RowSet, rows: torch.Tensor,
             t2d: torch.Tensor, cfg: TrainConfig, batch: int = 4096) -> dict:
    """Per-step loss / top-1 / top-k on ``rows`` (capped at ``cfg.eval_rows``, fixed subset) and
    the estimated mean acceptance length at beam widths 1 and ``cfg.beam_width``."""
    from vllm_redrafter.beam_search import beam_search

    was_training = model.training
    model.eval()
    n = cfg.num_steps
    if rows.numel() > cfg.eval_rows:
        gen = torch.Generator().manual_seed(1234)
        rows = rows[torch.randperm(rows.numel(), generator=gen)[: cfg.eval_rows]].sort().values
    loss_sum = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)  # labels counted for accuracy
    loss_count = torch.zeros(n, dtype=torch.float64)
    top1 = torch.zeros(n, dtype=torch.float64)
    topk = torch.zeros(n, dtype=torch.float64)
    for start in range(0, rows.numel(), batch):
        idx = rows[start:start + batch]
        hid = data.hidden[idx].float()  # [N, H]
        win = data.windows[idx]  # [N, n+1]
        loss_lab, acc_lab = draft_labels(win, t2d, n)  # [N, n]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
            for i, logits in enumerate(step_logits(model, embed_table, hid, win, n)):
                logits = logits.float()  # [N, Vd]
                valid = loss_lab[:, i] != IGNORE
                if valid.any():
                    loss_sum[i] += F.cross_entropy(logits[valid], loss_lab[valid, i],
                                                   reduction="sum").item()
                    loss_count[i] += int(valid.sum())
                counted = acc_lab[:, i] != IGNORE
                count[i] += int(counted.sum())
                top = logits.topk(cfg.topk, dim=-1).indices  # [N, k]
                hit = top == acc_lab[:, i:i + 1]  # [N, k]
                top1[i] += int(hit[:, 0].sum())
                topk[i] += int(hit.any(-1).sum())
    result = {
        "rows": int(rows.numel()),
        "loss": (loss_sum / loss_count.clamp(min=1)).tolist(),
        "top1": (top1 / count.clamp(min=1)).tolist(),
        f"top{cfg.topk}": (topk / count.clamp(min=1)).tolist(),
    }
    # acceptance estimate on a fixed subset
    acc_rows = rows
    if rows.numel() > cfg.accept_rows:
        gen = torch.Generator().manual_seed(4321)
        acc_rows = rows[torch.randperm(rows.numel(), generator=gen)[: cfg.accept_rows]]
    hid = data.hidden[acc_rows].float()  # [N, H]
    win = data.windows[acc_rows]  # [N, n+1]
    gt = win[:, 1:]  # [N, n]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return embed_table[ids].float()  # [*, H]

    for width in sorted({1, cfg.beam_width}):
        beams = beam_search(model, embed, hid, win[:, 0], width, n + 1)
        cand = beams.tokens[:, :, 1:]  # [N, W, n]
        match = (cand == gt.unsqueeze(1)) & (gt.unsqueeze(1) >= 0)  # [N, W, n]
        accepted = match.long().cumprod(-1).sum(-1).max(-1).values  # [N]
        result[f"accept_len_w{width}"] = float((1 + accepted).float().mean())
    if was_training:
        model.train()
    return result


# ----------------------------------------------------------------------- training


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_target_config(target: str | Path) -> dict:
    p = Path(target) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


@dataclass
class DataPlan:
    """The deterministic split and draft vocabulary of a run (from the data and the seed)."""

    held_seq: torch.Tensor  # [n_seq] bool, held-out sequences
    train_rows: torch.Tensor  # [R] row indices trained on
    held_rows: torch.Tensor  # [R'] held-out row indices
    draft_vocab: list[int] | None
    t2d: torch.Tensor  # [V] target id -> draft id (-1 outside)
    coverage: dict[str, float]


def plan_data(train_data: RowSet, cfg: TrainConfig, vocab_size: int, eos: Any,
              extra_eval: dict[str, RowSet],
              fixed_vocab: tuple[list[int] | None] | None = None) -> DataPlan:
    """Held-out sequences, training rows and the draft vocabulary (most frequent tokens of
    the training responses, plus EOS; or ``fixed_vocab[0]`` when given, as when
    fine-tuning a drafter), with the vocabulary's coverage of every set."""
    from vllm_redrafter.training.vocab import (choose_draft_vocab, coverage, target_to_draft,
                                               token_counts)

    held_seq = split_sequences(len(train_data.ids), cfg.heldout_fraction, cfg.seed)  # [n_seq]
    train_rows = train_data.rows_of(~held_seq)  # [R]
    held_rows = train_data.rows_of(held_seq)
    counts = token_counts(train_data.tokens[(~held_seq)[train_data.seq]], vocab_size)  # [V]
    always = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    draft_vocab = (fixed_vocab[0] if fixed_vocab is not None
                   else choose_draft_vocab(counts, cfg.draft_vocab_size, always=always))
    cov = {"train": coverage(counts, draft_vocab)}
    if held_rows.numel():
        cov["heldout"] = coverage(
            token_counts(train_data.tokens[held_seq[train_data.seq]], vocab_size), draft_vocab)
    for name, rs in extra_eval.items():
        cov[name] = coverage(token_counts(rs.tokens, vocab_size), draft_vocab)
    return DataPlan(held_seq, train_rows, held_rows, draft_vocab,
                    target_to_draft(draft_vocab, vocab_size), cov)


def build_model(cfg: TrainConfig, target: str | Path, embed_table: torch.Tensor,
                draft_vocab: list[int] | None):
    """``(drafter, head_rows)``: a freshly initialised drafter (target head bound when
    ``head="target"``) and the target's ``[Vd, H]`` head rows used by the soft labels
    (``None`` when neither needs them)."""
    from vllm_redrafter.config import DrafterConfig
    from vllm_redrafter.drafter import RecurrentDrafter
    from vllm_redrafter.training.hidden import load_target_head

    vocab_size, hidden_size = embed_table.shape
    dcfg = DrafterConfig(hidden_size=hidden_size, vocab_size=vocab_size,
                         exit_dim=cfg.exit_dim or 2 * hidden_size,
                         num_draft_layers=cfg.num_layers, rnn=cfg.rnn, draft_vocab=draft_vocab,
                         head=cfg.head)
    torch.manual_seed(cfg.seed)
    model = RecurrentDrafter(dcfg, generator=torch.Generator().manual_seed(cfg.seed))
    head_rows = None  # [Vd, H]
    if dcfg.uses_target_head or cfg.soft_weight > 0:
        target_head = load_target_head(target, embed_table)  # [V, H]
        if dcfg.uses_target_head:
            model.bind_target_head(target_head)
        if draft_vocab is not None:
            target_head = target_head[torch.tensor(draft_vocab)]  # [Vd, H]
        head_rows = target_head.to(torch.bfloat16 if cfg.amp else torch.float32)
    return model, head_rows


def load_init_drafter(cfg: TrainConfig, hidden_size: int, vocab_size: int):
    """The exported drafter ``cfg.init_from`` (float32) after checking that it is the
    architecture the other options describe; raises ``ValueError`` naming each mismatch
    and the flag that fixes it.

    Example: a drafter exported with ``--layers 2 --draft-vocab 8192`` fine-tunes with
    ``--init-from DIR --layers 2 --draft-vocab 8192``; ``--layers 1`` is refused.
    """
    from vllm_redrafter.checkpoint import load_drafter

    init = load_drafter(cfg.init_from, dtype=torch.float32)
    have = init.config
    want = {"--layers": (cfg.num_layers, have.num_draft_layers),
            "--exit-dim": (cfg.exit_dim or 2 * hidden_size, have.exit_dim),
            "--rnn/--no-rnn": (cfg.rnn, have.rnn), "--head": (cfg.head, have.head),
            "--draft-vocab": (cfg.draft_vocab_size,
                              None if have.draft_vocab is None else len(have.draft_vocab))}
    wrong = [f"{flag} {mine} (the drafter has {theirs})"
             for flag, (mine, theirs) in want.items() if mine != theirs]
    if (have.hidden_size, have.vocab_size) != (hidden_size, vocab_size):
        wrong.append(f"target hidden/vocab {hidden_size}/{vocab_size} (the drafter was "
                     f"trained for {have.hidden_size}/{have.vocab_size}: another target)")
    if wrong:
        raise ValueError(f"--init-from {cfg.init_from}: options do not match the drafter: "
                         + "; ".join(wrong) + ". Pass the drafter's values.")
    return init


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (β = 0.9, 0.98); no weight decay on biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(0.9, 0.98))


@dataclass
class RunState:
    """What a checkpoint restores besides the weights."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0


def resume(ckpt_path: Path, model, opt, cfg: TrainConfig,
           draft_vocab: list[int] | None) -> RunState:
    """Load ``ckpt_path`` into ``model``/``opt`` (and torch's RNG) if it exists; refuse one
    written with other options (the time budget may change) or another vocabulary."""
    if not ckpt_path.is_file():
        return RunState()
    ck = torch.load(ckpt_path, weights_only=False)

    def comparable(options: dict) -> dict:
        return {k: v for k, v in options.items() if k != "time_budget_min"}

    if comparable(ck["config"]) != comparable(cfg.model_dump()) or \
            ck["draft_vocab"] != draft_vocab:
        raise ValueError(f"{ckpt_path} was written with a different configuration or data; "
                         "use a new --out or delete it")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    return RunState(ck["step"], ck["history"], ck.get("elapsed", 0.0))


def train_step(model, opt, embed_table: torch.Tensor, data: RowSet, idx: torch.Tensor,
               t2d: torch.Tensor, head_rows: torch.Tensor | None, cfg: TrainConfig, lr: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on rows ``idx``: returns ``(per_step_loss [n], top1_hits [n],
    counted [n])`` (detached)."""
    n = cfg.num_steps
    hid = data.hidden[idx].float()  # [N, H]
    win = data.windows[idx]  # [N, n+1]
    loss_lab, acc_lab = draft_labels(win, t2d, n)  # [N, n]
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
        logits = all_step_logits(model, embed_table, hid, win, n, cfg.dropout,
                                 training=True)  # [N, n, Vd]
    teacher, teacher_ok = None, None
    if cfg.soft_weight > 0:
        assert head_rows is not None
        teacher, teacher_ok = teacher_logits(data.hidden, idx, win, head_rows, n)
    total_loss, per_step = distill_loss(logits, loss_lab, teacher, teacher_ok,
                                        cfg.soft_weight)  # [], [n]
    opt.zero_grad(set_to_none=True)
    total_loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    counted = acc_lab != IGNORE  # [N, n]
    hits = ((logits.detach().argmax(-1) == acc_lab) & counted).sum(0).float()
    return per_step, hits, counted.sum(0).float()


def train_drafter(target: str | Path, train_data: RowSet, out_dir: str | Path, cfg: TrainConfig,
                  *, extra_eval: dict[str, RowSet] | None = None,
                  embed_table: torch.Tensor | None = None, stop_after: int | None = None,
                  verifier_name: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) a drafter; export it to ``out_dir/drafter``. Returns a summary dict.

    ``stop_after`` ends this call after that many optimiser steps (checkpoint saved): used to
    test that an interrupted run resumes to the same result.
    """
    from tqdm import tqdm

    from vllm_redrafter.training.hidden import load_target_embeddings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    extra_eval = extra_eval or {}
    tcfg = _read_target_config(target)
    if embed_table is None:
        embed_table = load_target_embeddings(target)  # [V, H]
    vocab_size, hidden_size = embed_table.shape
    if train_data.hidden.shape[1] != hidden_size:
        raise ValueError(f"hidden states have width {train_data.hidden.shape[1]}, target "
                         f"embeddings {hidden_size}")
    init = load_init_drafter(cfg, hidden_size, vocab_size) if cfg.init_from else None
    plan = plan_data(train_data, cfg, vocab_size, tcfg.get("eos_token_id"), extra_eval,
                     fixed_vocab=None if init is None else (init.config.draft_vocab,))
    model, head_rows = build_model(cfg, target, embed_table, plan.draft_vocab)
    if init is not None:  # same architecture, checked (a bound target head is not state)
        model.load_state_dict(init.state_dict(), strict=True)
    model.train()
    opt = build_optimizer(model, cfg)
    steps_per_epoch = max(1, math.ceil(plan.train_rows.numel() / cfg.batch_tokens))
    total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    info = {"train_sequences": int((~plan.held_seq).sum()),
            "heldout_sequences": int(plan.held_seq.sum()),
            "train_rows": int(plan.train_rows.numel()),
            "heldout_rows": int(plan.held_rows.numel()),
            "draft_vocab_size": model.config.draft_vocab_size, "coverage": plan.coverage,
            "parameters": model.num_parameters(), "steps_per_epoch": steps_per_epoch,
            "total_steps": total}
    logger.info("train: %s", json.dumps(info))
    state = resume(ckpt_path, model, opt, cfg, plan.draft_vocab)
    info["resumed_from_step"] = state.step
    if state.step:
        logger.info("train: resumed from %s at step %d/%d", ckpt_path, state.step, total)
    (out_dir / "train_config.json").write_text(json.dumps({"config": cfg.model_dump(), **info},
                                                          indent=2))
    t_start = time.perf_counter()

    def save_ckpt() -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "rng": torch.get_rng_state(), "step": state.step,
                            "history": state.history, "config": cfg.model_dump(),
                            "draft_vocab": plan.draft_vocab,
                            "elapsed": state.elapsed_before + time.perf_counter() - t_start},
                           ckpt_path)

    def run_eval() -> None:
        rec = {"step": state.step, "kind": "eval"}
        if plan.held_rows.numel():
            rec["heldout"] = evaluate(model, embed_table, train_data, plan.held_rows,
                                      plan.t2d, cfg)
        for name, rs in extra_eval.items():
            rec[name] = evaluate(model, embed_table, rs, rs.rows_of(
                torch.ones(len(rs.ids), dtype=torch.bool)), plan.t2d, cfg)
        state.history.append(rec)
        brief = {k: [round(x, 3) for x in v["top1"]] for k, v in rec.items()
                 if isinstance(v, dict)}
        acc = {k: round(v.get(f"accept_len_w{cfg.beam_width}", 0), 2) for k, v in rec.items()
               if isinstance(v, dict)}
        logger.info("eval step %d: top1 %s, accept_len(W=%d) %s", state.step, brief,
                    cfg.beam_width, acc)

    perm_cache: dict[int, torch.Tensor] = {}
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", file=sys.stderr,
               disable=not progress)
    n = cfg.num_steps
    run_loss, run_hit, run_cnt = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    run_steps = rows_done = steps_this_call = 0
    t_rate = time.perf_counter()
    while state.step < total:
        step = state.step
        epoch, it = divmod(step, steps_per_epoch)
        if epoch not in perm_cache:
            perm_cache.clear()
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            perm_cache[epoch] = torch.randperm(plan.train_rows.numel(), generator=gen)
        idx = plan.train_rows[perm_cache[epoch][it * cfg.batch_tokens:
                                                (it + 1) * cfg.batch_tokens]]
        fraction = step / total
        if cfg.time_budget_min:
            spent = state.elapsed_before + time.perf_counter() - t_start
            fraction = max(fraction, spent / (60.0 * cfg.time_budget_min))
            if fraction >= 1.0:
                logger.info("train: time budget of %.1f min reached at step %d/%d",
                            cfg.time_budget_min, step, total)
                break
        per_step, hits, counted = train_step(model, opt, embed_table, train_data, idx,
                                             plan.t2d, head_rows, cfg,
                                             cfg.lr * lr_factor(fraction, cfg))
        run_loss += per_step
        run_hit += hits
        run_cnt += counted
        state.step += 1
        step = state.step
        steps_this_call += 1
        run_steps += 1
        rows_done += idx.numel()
        bar.update(1)
        if step % 10 == 0 or step == total:
            rate = rows_done / max(time.perf_counter() - t_rate, 1e-9)
            bar.set_postfix_str(f"loss {float(run_loss.sum()) / run_steps:.3f} top1 "
                                f"{float(run_hit[0] / run_cnt[0].clamp(min=1)):.3f} "
                                f"{rate:.0f} tok/s")
        if (step % cfg.eval_every == 0 or step == total or step % 50 == 0) and run_steps:
            state.history.append({
                "step": step, "kind": "train", "epoch": step / steps_per_epoch,
                "lr": opt.param_groups[0]["lr"], "loss": (run_loss / run_steps).tolist(),
                "top1": (run_hit / run_cnt.clamp(min=1)).tolist(),
                "tok_per_s": rows_done / max(time.perf_counter() - t_rate, 1e-9)})
            run_loss.zero_(), run_hit.zero_(), run_cnt.zero_()
            run_steps = 0
        if step % cfg.eval_every == 0 or step == total:
            run_eval()
        if step % cfg.save_every == 0 or step == total:
            save_ckpt()
            write_history(state.history, out_dir)
        if stop_after is not None and steps_this_call >= stop_after and step < total:
            save_ckpt()
            bar.close()
            return {"stopped_at": step, **info}
    bar.close()
    evals = [h for h in state.history if h["kind"] == "eval"]
    if not evals or evals[-1]["step"] != state.step:
        run_eval()
    info["final_step"] = state.step
    info["epochs_done"] = state.step / steps_per_epoch
    save_ckpt()
    elapsed = state.elapsed_before + time.perf_counter() - t_start
    export(model, out_dir, cfg, target, verifier_name, tcfg.get("architectures"))
    write_history(state.history, out_dir)
    try:
        plot_curves(state.history, out_dir / "curves.png", n)
    except Exception as exc:  # plotting must never lose a trained drafter
        logger.warning("train: could not plot curves: %s", exc)
    final = [h for h in state.history if h["kind"] == "eval"][-1]
    summary = {**info, "train_seconds": elapsed, "final_eval": final,
               "drafter": str(out_dir / "drafter")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(model, out_dir: Path, cfg: TrainConfig, target: str | Path,
           verifier_name: str | None, architectures: list[str] | None) -> Path:
    """Write the drafter in our checkpoint format to ``out_dir/drafter`` (with the target
    tokenizer's fingerprint when the target has a tokenizer)."""
    from vllm_redrafter.checkpoint import fingerprint_of_tokenizer, save_drafter
    from vllm_redrafter.config import ReDrafterOptions
    from vllm_redrafter.drafter import torch_dtype

    dtype = torch_dtype(cfg.export_dtype)
    return save_drafter(model, out_dir / "drafter", verifier=verifier_name or str(target),
                        options=ReDrafterOptions(beam_width=cfg.beam_width,
                                                 beam_length=cfg.num_steps + 1),
                        dtype=dtype, verifier_architectures=architectures,
                        tokenizer_fingerprint=fingerprint_of_tokenizer(target))


def write_history(history: list[dict], out_dir: Path) -> None:
    tmp = out_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out_dir / "metrics.jsonl")


def plot_curves(history: list[dict], path: str | Path, num_steps: int) -> None:
    """PNG: loss (train, eval sets) and per-step top-1 (train dashed, eval solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    sets = sorted({k for h in evals for k, v in h.items() if isinstance(v, dict)})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    if train:
        ax1.plot([h["step"] for h in train], [sum(h["loss"]) for h in train], label="train",
                 color="0.5")
    for s in sets:
        pts = [h for h in evals if s in h]
        ax1.plot([h["step"] for h in pts], [sum(h[s]["loss"]) for h in pts], marker="o",
                 label=s)
    ax1.set_xlabel("optimiser step")
    ax1.set_ylabel(f"loss (sum over {num_steps} steps)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", ":", "-."]
    for i in range(num_steps):
        c = colors[i % len(colors)]
        if train:
            ax2.plot([h["step"] for h in train], [h["top1"][i] for h in train], "--", color=c,
                     alpha=0.5, label=f"train step {i + 1}")
        for j, s in enumerate(sets):
            pts = [h for h in evals if s in h]
            ax2.plot([h["step"] for h in pts], [h[s]["top1"][i] for h in pts],
                     styles[j % len(styles)], marker="o", ms=3, color=c,
                     label=f"{s} step {i + 1}")
    ax2.set_xlabel("optimiser step")
    ax2.set_ylabel("top-1 accuracy")
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
