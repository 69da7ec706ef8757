# SPDX-License-Identifier: Apache-2.0
"""Prompt files and generated-sequence files.

Prompt files are JSONL; each line is one of
- ``{"prompt": "text"}`` (one user turn) or ``{"prompt": [token ids]}`` (already tokenised,
  used as-is, no chat template: for targets without a tokenizer),
- ``{"turns": ["first user turn", ...]}`` (MT-Bench style; the first turn is the prompt, the
  second, if any, is kept as the record's ``follow_up`` for second-turn generation),
- ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`` (ShareGPT style;
  the conversation up to and including its last human turn is used, so the target answers it),
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI style, same rule).
An optional ``"id"`` or ``"question_id"`` names the record; otherwise the line number does.

Generated files (``generations.jsonl``) hold one sequence per line:
``{"id": str, "prompt_len": int, "token_ids": [prompt + response ids], "finished": bool}``.
"""

from __future__ import annotations

import json
import lzma
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
             "system": "system"}


@dataclass
class PromptRecord:
    """One prompt: either chat ``messages`` (to render with the chat template) or token ids;
    ``follow_up``: the record's own second user turn, if the file gives one."""

    id: str
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    follow_up: str | None = None


def _messages_until_last_user(messages: list[dict]) -> list[dict]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise ValueError("conversation has no user turn")
    return messages[: last_user + 1]


def parse_prompt_record(obj: dict, default_id: str) -> PromptRecord:
    """Turn one JSON object of a prompts file into a :class:`PromptRecord`."""
    rid = str(obj.get("id", obj.get("question_id", default_id)))
    if "prompt_token_ids" in obj:
        return PromptRecord(rid, token_ids=[int(t) for t in obj["prompt_token_ids"]])
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, list):
            return PromptRecord(rid, token_ids=[int(t) for t in p])
        return PromptRecord(rid, messages=[{"role": "user", "content": str(p)}])
    if "turns" in obj:
        turns = obj["turns"]
        return PromptRecord(rid, messages=[{"role": "user", "content": str(turns[0])}],
                            follow_up=str(turns[1]) if len(turns) >= 2 else None)
    if "conversations" in obj:
        msgs = []
        for turn in obj["conversations"]:
            role = _ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                continue
            msgs.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
        return PromptRecord(rid, messages=_messages_until_last_user(msgs))
    if "messages" in obj:
        msgs = [{"role": _ROLE_MAP.get(m["role"], m["role"]), "content": m["content"]}
                for m in obj["messages"]]
        return PromptRecord(rid, messages=_messages_until_last_user(msgs))
    raise ValueError(f"record {rid}: expected one of prompt, prompt_token_ids, turns, "
                     "conversations, messages")


def load_prompts(path: str | Path, limit: int | None = None, offset: int = 0,
                 shuffle_seed: int | None = None) -> list[PromptRecord]:
    """Read a prompts file; ``offset``/``limit`` select a slice of its records (for splits).

    With ``shuffle_seed`` the records are first put in a fixed pseudo-random order (so a prefix
    of the file's order is a uniform sample of it, whatever the file's sort order); the slice is
    taken from that order. Ids default to the line number in the file either way.
    """
    records: list[PromptRecord] = []
    with open(path, encoding="utf-8") as f:
        lineno = -1
        for line in f:
            if not line.strip():
                continue
            lineno += 1
            records.append(parse_prompt_record(json.loads(line), default_id=str(lineno)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    end = None if limit is None else offset + limit
    return records[offset:end]


def iter_generations(path: str | Path) -> Iterator[dict]:
    """Yield the records of a ``generations.jsonl`` file, plain or ``.xz``-compressed
    (tolerates a torn last line)."""
    path = Path(path)
    if not path.is_file():
        return
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write from an interrupted run
            if line.strip():
                yield json.loads(line)


def load_generations(paths: list[str | Path] | str | Path) -> list[dict]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[dict] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "generations.jsonl"
        out.extend(iter_generations(p))
    return out
