# SPDX-License-Identifier: Apache-2.0
"""Prompt-file parsing: prompt / token ids / turns / ShareGPT conversations / messages."""

from __future__ import annotations

import json

import pytest

from vllm_redrafter.training.data import load_generations, load_prompts, parse_prompt_record


def test_formats():
    r = parse_prompt_record({"prompt": "hi"}, "0")
    assert r.messages == [{"role": "user", "content": "hi"}] and r.id == "0"
    assert parse_prompt_record({"prompt": [5, 6]}, "1").token_ids == [5, 6]
    assert parse_prompt_record({"prompt_token_ids": [7]}, "1").token_ids == [7]
    r = parse_prompt_record({"question_id": 81, "turns": ["a", "b"]}, "2")
    assert r.id == "81" and r.messages == [{"role": "user", "content": "a"}]
    conv = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"},
                              {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                              {"from": "gpt", "value": "a2"}]}
    r = parse_prompt_record(conv, "3")
    assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "user"]
    assert r.messages[-1]["content"] == "q2"
    with pytest.raises(ValueError):
        parse_prompt_record({"text": "?"}, "4")


def test_load_slices_and_shuffle(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(10)))
    assert [r.id for r in load_prompts(path, limit=3, offset=2)] == ["2", "3", "4"]
    shuffled = load_prompts(path, shuffle_seed=0)
    assert sorted(r.id for r in shuffled) == [str(i) for i in range(10)]
    first = load_prompts(path, limit=4, shuffle_seed=0)
    rest = load_prompts(path, offset=4, shuffle_seed=0)
    assert [r.id for r in first + rest] == [r.id for r in shuffled]


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps({"id": "0", "prompt_len": 1, "token_ids": [1, 2]}) + "\n"
                    + '{"id": "1", "prom')
    assert [g["id"] for g in load_generations(tmp_path)] == ["0"]
