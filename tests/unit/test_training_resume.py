# SPDX-License-Identifier: Apache-2.0
"""An interrupted training run resumes to exactly the uninterrupted result; export loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_redrafter.checkpoint import load_drafter
from vllm_redrafter.training.trainer import RowSet, TrainConfig, train_drafter

H, V = 8, 40


def _rows(generator) -> RowSet:
    lengths = torch.tensor([20, 15, 25, 18, 22, 30])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    shards = {"hidden": torch.randn(total, H, generator=generator).to(torch.bfloat16),
              "tokens": torch.randint(0, V, (total,), generator=generator),
              "seq_offsets": offsets, "ids": [str(i) for i in range(lengths.numel())]}
    return RowSet.from_shards(shards, 3)


def _cfg(**extra) -> TrainConfig:
    base = dict(num_steps=3, exit_dim=12, num_layers=1, lr=3e-3, dropout=0.1,
                weight_decay=0.01, epochs=2, batch_tokens=16, heldout_fraction=0.2,
                draft_vocab_size=24, eval_every=4, eval_rows=64, accept_rows=16,
                beam_width=2, save_every=3, amp=False, export_dtype="float32")
    return TrainConfig(**{**base, **extra})


@pytest.mark.parametrize("extra", [{}, {"head": "target", "soft_weight": 0.5}],
                         ids=["own-head-hard", "target-head-soft"])
def test_resume_reaches_the_same_result(tmp_path, generator, extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a busy machine
    try:
        _resume(tmp_path, generator, extra)
    finally:
        torch.set_num_threads(threads)


def _resume(tmp_path, generator, extra):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"eos_token_id": 2,
                                                    "architectures": ["LlamaForCausalLM"]}))
    rows = _rows(generator)
    table = torch.randn(V, H, generator=generator)  # [V, H]

    full = train_drafter(target, rows, tmp_path / "full", _cfg(**extra), embed_table=table,
                         progress=False)
    part = train_drafter(target, rows, tmp_path / "part", _cfg(**extra), embed_table=table,
                         stop_after=5, progress=False)
    assert part["stopped_at"] == 5
    resumed = train_drafter(target, rows, tmp_path / "part", _cfg(**extra), embed_table=table,
                            progress=False)
    assert resumed["total_steps"] == full["total_steps"]
    # it continued from the checkpoint (a silent restart from step 0 would reach the same
    # weights with the same seed)
    assert (full["resumed_from_step"], part["resumed_from_step"]) == (0, 0)
    assert resumed["resumed_from_step"] == 5
    a = load_file(str(tmp_path / "full" / "drafter" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "drafter" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full["final_eval"]["heldout"]["top1"] == resumed["final_eval"]["heldout"]["top1"]

    drafter = load_drafter(tmp_path / "full" / "drafter")
    assert drafter.config.head == extra.get("head", "drafter")
    assert drafter.config.draft_vocab_size == 24
    assert 2 in drafter.config.draft_vocab  # EOS is always in the draft vocabulary
    assert (tmp_path / "full" / "curves.png").stat().st_size > 0
    evals = [json.loads(line) for line in
             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "eval" and "accept_len_w2" in e["heldout"] for e in evals)


def test_init_from_starts_at_the_exported_drafter_and_keeps_its_vocabulary(tmp_path,
                                                                           generator):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    rows = _rows(generator)
    table = torch.randn(V, H, generator=generator)  # [V, H]
    first = train_drafter(target, rows, tmp_path / "a", _cfg(), embed_table=table,
                          progress=False)
    start = load_drafter(first["drafter"], dtype=torch.float32)
    # other data whose most frequent tokens differ: a fresh run would pick another vocab
    other = _rows(torch.Generator().manual_seed(7))
    other.tokens[:] = other.tokens % 30
    fresh = train_drafter(target, other, tmp_path / "fresh", _cfg(epochs=0.01),
                          embed_table=table, progress=False)
    assert load_drafter(fresh["drafter"]).config.draft_vocab != start.config.draft_vocab

    cfg = _cfg(init_from=str(first["drafter"]), epochs=0.01, lr=1e-9)
    tuned = train_drafter(target, other, tmp_path / "tuned", cfg, embed_table=table,
                          progress=False)
    end = load_drafter(tuned["drafter"], dtype=torch.float32)
    assert end.config == start.config  # its vocabulary, not the new data's
    for key, value in start.state_dict().items():  # one step at lr 1e-9: the same weights
        assert torch.allclose(end.state_dict()[key], value, atol=1e-5), key
    # negative control: without --init-from the same one step starts from fresh weights
    assert not torch.allclose(load_drafter(fresh["drafter"], dtype=torch.float32)
                              .rnn_u.weight, start.rnn_u.weight, atol=1e-3)


def test_init_from_refuses_other_options_and_names_the_flags(tmp_path, generator):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    rows = _rows(generator)
    table = torch.randn(V, H, generator=generator)  # [V, H]
    first = train_drafter(target, rows, tmp_path / "a", _cfg(epochs=0.01), embed_table=table,
                          progress=False)
    bad = _cfg(init_from=str(first["drafter"]), epochs=0.01).model_copy(
        update={"num_layers": 2, "draft_vocab_size": 30})
    with pytest.raises(ValueError, match=r"--layers 2 \(the drafter has 1\).*"
                                         r"--draft-vocab 30 \(the drafter has 24\)"):
        train_drafter(target, rows, tmp_path / "b", bad, embed_table=table, progress=False)
