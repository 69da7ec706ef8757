# SPDX-License-Identifier: Apache-2.0
"""Second-turn prompts from first-turn generations: literal glue for a ChatML-like
template, the record's own second turn before the built-in follow-ups, answers cut at the
length cap left out, templates that cannot work refused; and with the demo target's real
tokenizer, the built ids equal the chat template applied to the decoded conversation."""

from __future__ import annotations

import json

import pytest

from vllm_redrafter.training.data import PromptRecord, load_prompts
from vllm_redrafter.training.followups import (FOLLOW_UPS, pick_follow_up,
                                               second_turn_records, template_glue)

EOS = "<end>"


def _chatml(messages, add_generation_prompt):
    text = "<sys>be nice<end>\n" + "".join(f"<{m['role']}>{m['content']}<end>\n"
                                           for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


def _encode(text):  # one id per character, offset so that 0..99 stay free
    return [100 + ord(c) for c in text]


def test_glue_of_a_chatml_like_template():
    assert template_glue(_chatml, EOS) == ("\n<user>", "<end>\n<assistant>")


def test_records_continue_finished_answers_with_the_follow_up():
    gens = [{"id": "a", "token_ids": [5, 6, 7, 2], "finished": True},
            {"id": "b", "token_ids": [5, 6, 8, 9], "finished": False},  # hit the cap
            {"id": "c", "token_ids": [5, 2], "finished": True}]
    wanted = [PromptRecord("c"), PromptRecord("b", follow_up="Go on."),
              PromptRecord("a", follow_up="Why?"), PromptRecord("z")]
    records = second_turn_records(gens, wanted, _chatml, _encode, eos_id=2, eos_text=EOS)
    assert [r.id for r in records] == ["c", "b", "a"]  # wanted order; z never generated
    assert records[2].token_ids == [5, 6, 7, 2] + _encode("\n<user>Why?<end>\n<assistant>")
    # the cut answer is closed with EOS (once), as the template would close it
    assert records[1].token_ids == [5, 6, 8, 9, 2] + _encode(
        "\n<user>Go on.<end>\n<assistant>")
    follow = pick_follow_up("c")
    assert follow in FOLLOW_UPS and follow == pick_follow_up("c")  # stable
    assert records[0].token_ids == [5, 2] + _encode(f"\n<user>{follow}<end>\n<assistant>")


def test_follow_ups_are_spread_over_the_list():
    picked = {pick_follow_up(str(i)) for i in range(400)}
    assert len(picked) >= len(FOLLOW_UPS) - 2


def test_a_template_that_does_not_end_answers_with_eos_is_refused():
    with pytest.raises(ValueError, match="not with the EOS token"):
        template_glue(_chatml, "</s>")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    def forgetful(messages, add_generation_prompt):  # shows only the last turn
        return _chatml(messages[-1:], add_generation_prompt)

    with pytest.raises(ValueError, match="rewrites earlier turns"):
        template_glue(forgetful, EOS)


def test_load_prompts_keeps_the_second_turn_as_the_follow_up(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [
        {"question_id": 81, "turns": ["Write.", "Rewrite it."]},
        {"prompt": "Hello"},
        {"turns": ["Only one"]},
        {"turns": ["One", "Two"]}]) + "\n")
    records = load_prompts(path)
    assert {r.id: r.follow_up for r in records} == {"81": "Rewrite it.", "1": None,
                                                    "2": None, "3": "Two"}
    assert records[0].messages == [{"role": "user", "content": "Write."}]


@pytest.mark.time_limit(300)
def test_real_template_matches_the_decoded_conversation(demo_target_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_target_dir))
    first = [{"role": "user", "content": "Name a colour."}]
    prompt = tok(tok.apply_chat_template(first, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    answer = tok("Blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    gens = [{"id": "0", "token_ids": prompt + answer, "finished": True}]

    def render(messages, add_generation_prompt):
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    [record] = second_turn_records(
        gens, [PromptRecord("0", follow_up="And another?")], render,
        lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id,
        tok.eos_token)
    whole = first + [{"role": "assistant", "content": "Blue."},
                     {"role": "user", "content": "And another?"}]
    expected = tok(render(whole, True), add_special_tokens=False)["input_ids"]
    assert record.token_ids == expected
