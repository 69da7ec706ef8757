# SPDX-License-Identifier: Apache-2.0
"""Second-turn prompts: a first turn, the target's own answer to it, and a follow-up request.

Multi-turn chats (MT-Bench's second turns, any chat client) ask the target to continue from
its own earlier answer. :func:`second_turn_records` builds those prompts as token ids from a
``generate`` output (the first turn's prompt and response ids exactly as the target produced
them) plus the chat template's glue and a follow-up user turn, so that ``vllm-redrafter
generate --second-turn-of DIR`` can collect the target's second answers for distillation.

The follow-up of a record is its own second turn when the prompts file has one (``{"turns":
[first, second, ...]}``), else one of :data:`FOLLOW_UPS` picked by a stable hash of its id.

Example (SmolLM2's template): first-turn ids ``<|im_start|>system ... <|im_start|>assistant\\n``
+ response ids ending in ``<|im_end|>`` become ``... <|im_end|>`` + ids of
``"\\n<|im_start|>user\\nShorten your answer to two sentences.<|im_end|>\\n<|im_start|>assistant
\\n"``. A first response cut at the length cap is closed with ``<|im_end|>`` first, as a chat
client that sends the cut answer back in the conversation would have the template do.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from vllm_redrafter.training.data import PromptRecord, iter_generations

# Our own generic follow-ups, in the spirit of a user's second message (not MT-Bench's).
FOLLOW_UPS = (
    "Shorten your answer to two sentences.",
    "Can you explain that more simply, as if to a ten-year-old?",
    "Give me three concrete examples.",
    "Turn your answer into a bulleted list.",
    "Rewrite your answer in a more formal tone.",
    "Rewrite your answer in a friendly, casual tone.",
    "What are the weak points of your answer?",
    "Expand on the most important point in more detail.",
    "Summarize your answer in one sentence.",
    "Write a short title for your answer.",
    "Now write it as a short poem.",
    "Can you give a step-by-step version?",
    "What would someone who disagrees say?",
    "Add a short conclusion to your answer.",
    "Explain the reasoning behind your answer.",
    "Make your answer half as long without losing the key facts.",
    "Write a short email that shares this answer with a colleague.",
    "Give one common misconception about this topic and correct it.",
    "Can you put that in a table?",
    "What should I read or learn next about this?",
    "Rewrite the first paragraph so that it is more engaging.",
    "Are there any exceptions to what you said?",
    "Give me a practical tip based on your answer.",
    "How would you explain this to an expert instead?",
    "Continue your answer with one more paragraph.",
    "List the key terms in your answer and define each one.",
    "Write three quiz questions about your answer.",
    "Compare your answer with another possible approach.",
    "What is the single most important takeaway?",
    "Rewrite your answer without using any technical terms.",
    "Tell me a short story that illustrates your answer.",
    "Check your answer for mistakes and correct any you find.",
)

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
Encode = Callable[[str], list[int]]  # text -> ids, no special tokens added


def pick_follow_up(record_id: str, follow_ups: tuple[str, ...] = FOLLOW_UPS) -> str:
    """A follow-up for ``record_id``, the same on every run (crc32 of the id)."""
    return follow_ups[zlib.crc32(record_id.encode()) % len(follow_ups)]


def template_glue(render: Render, eos_text: str) -> tuple[str, str]:
    """``(before, after)`` text around a follow-up ``F``: what the template writes after a
    first answer's end-of-turn token and before ``F``, and after ``F`` up to the
    assistant's generation prompt. Raises ``ValueError`` for a template that does not end
    an assistant turn with ``eos_text`` or that rewrites earlier turns.

    Example (SmolLM2): ``("\\n<|im_start|>user\\n", "<|im_end|>\\n<|im_start|>assistant\\n")``.
    """
    first, answer, follow = "\x01FIRST\x01", "\x01ANSWER\x01", "\x01FOLLOW\x01"
    one = [{"role": "user", "content": first}, {"role": "assistant", "content": answer}]
    done = render(one, False)
    two = render(one + [{"role": "user", "content": follow}], True)
    if not two.startswith(done) or answer not in done or follow not in two:
        raise ValueError("the chat template rewrites earlier turns when a turn is added: "
                         "second-turn prompts cannot be built from first-turn token ids")
    end_of_answer = done[done.rindex(answer) + len(answer):]
    if not end_of_answer.startswith(eos_text):
        raise ValueError(f"the chat template ends an assistant turn with "
                         f"{end_of_answer!r}, not with the EOS token {eos_text!r}")
    added = two[len(done):]
    cut = added.index(follow)
    return end_of_answer[len(eos_text):] + added[:cut], added[cut + len(follow):]


def second_turn_records(first_turns: Iterable[dict], records: Iterable[PromptRecord],
                        render: Render, encode: Encode, eos_id: int, eos_text: str
                        ) -> list[PromptRecord]:
    """Second-turn prompts (token ids) for each of ``records`` that has a first-turn
    generation (``{"id", "token_ids", ...}``), in ``records`` order; the follow-up is the
    record's own ``follow_up`` or :func:`pick_follow_up`; an answer that does not end with
    ``eos_id`` (cut at the length cap) is closed with it."""
    before, after = template_glue(render, eos_text)
    by_id = {str(g["id"]): g for g in first_turns}
    out = []
    for record in records:
        gen = by_id.get(record.id)
        if gen is None or not gen["token_ids"]:
            continue  # never generated
        ids = list(gen["token_ids"])
        if ids[-1] != eos_id:
            ids.append(eos_id)
        follow = record.follow_up or pick_follow_up(record.id)
        ids += encode(before + follow + after)
        out.append(PromptRecord(record.id, token_ids=ids))
    return out


def load_second_turn_records(records: Iterable[PromptRecord], first_dir: str | Path,
                             target: str | Path) -> list[PromptRecord]:
    """:func:`second_turn_records` with the target's tokenizer and chat template and the
    first turns from ``first_dir/generations.jsonl``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    if tok.eos_token_id is None or tok.chat_template is None:
        raise ValueError(f"{target}: second turns need a tokenizer with a chat template "
                         "and an EOS token")
    first = Path(first_dir)
    first = first / "generations.jsonl" if first.is_dir() else first
    if not first.is_file():
        raise FileNotFoundError(f"--second-turn-of: {first} not found (a `vllm-redrafter "
                                "generate` output directory)")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return second_turn_records(iter_generations(first), records, render, encode,
                               tok.eos_token_id, tok.eos_token)
