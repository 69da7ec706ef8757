# SPDX-License-Identifier: Apache-2.0
"""Helpers of the chain-mode engine tests: targets, drafters, engines, metrics.

Everything is built locally (no downloads): a tiny random Llama with a *peaked* output
layer (so sampled next tokens have low entropy and statistical tests have power),
random drafters, and an *overfit* drafter memorising the target's own greedy
continuations of the test prompts (so acceptance is high and every accept/reject path of
vLLM's rejection sampler runs).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tests.conftest import MT_BENCH, TINY_LLAMA

PROMPT_TOKENS = 48
"""Length of every tiny-Llama prompt (token ids = UTF-8 bytes of an MT-Bench turn)."""

NEW_TOKENS = 64
"""Generated tokens per prompt in the parity tests (the issue's minimum)."""

NUM_PROMPTS = 10
"""MT-Bench first turns per parity test (the issue's minimum)."""

LM_HEAD_SCALE = 40.0
"""Multiplier of the tiny Llama's ``lm_head`` init: peaked next-token distributions."""

BEAM_WIDTH = 3
BEAM_LENGTH = 4

ENGINE_KWARGS: dict[str, Any] = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=512,
    max_num_seqs=16,
    seed=0,
    disable_log_stats=False,
)
"""Common ``LLM(...)`` arguments of the CPU engine tests."""


def mt_bench_turns(n: int) -> list[str]:
    """The first ``n`` MT-Bench first turns."""
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()]
    return [row["turns"][0] for row in rows[:n]]


def byte_prompts(n: int, vocab_size: int = TINY_LLAMA["vocab_size"]) -> list[list[int]]:
    """Tokenizer-free prompts: the first PROMPT_TOKENS UTF-8 bytes (+3) of each turn."""
    prompts = []
    for text in mt_bench_turns(n):
        ids = [(b + 3) % vocab_size for b in text.encode("utf-8")[:PROMPT_TOKENS]]
        assert len(ids) == PROMPT_TOKENS, "MT-Bench first turns are longer than 48 bytes"
        prompts.append(ids)
    return prompts


def build_peaked_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """The conftest tiny Llama, with ``lm_head`` scaled by LM_HEAD_SCALE (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def save_random_drafter(
    out_dir: Path, hidden_size: int, vocab_size: int, seed: int = 0, num_layers: int = 1
) -> Path:
    """A random-weight ReDrafter checkpoint (exit_dim = 2H) for a target of this size."""
    from vllm_redrafter.checkpoint import save_drafter
    from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
    from vllm_redrafter.drafter import RecurrentDrafter

    config = DrafterConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        exit_dim=2 * hidden_size,
        num_draft_layers=num_layers,
        rnn=True,
    )
    model = RecurrentDrafter(config, generator=torch.Generator().manual_seed(seed))
    options = ReDrafterOptions(beam_width=BEAM_WIDTH, beam_length=BEAM_LENGTH)
    return save_drafter(model, out_dir, options=options)


@torch.no_grad()
def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy continuations with transformers: ``[n, P + new_tokens]`` token ids."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.int64)  # [n, P]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out  # [n, P + new_tokens]


def train_overfit_drafter(
    model_dir: Path,
    sequences: torch.Tensor,
    prompt_len: int,
    out_dir: Path,
    steps: int = 400,
    seed: int = 0,
    head: str = "drafter",
) -> tuple[Path, float]:
    """Train a small drafter until it memorises ``sequences`` (teacher forcing, CE).

    Cheap on a loaded 2-core CPU: the drafter predicts over a reduced draft vocabulary
    (the tokens of ``sequences``; this also exercises ``draft_vocab`` id mapping in the
    proposer) and has a narrow ResBlock (``exit_dim = 64``, so an ``input_proj``). Only
    positions from the last prompt token onwards are trained: those are the contexts
    vLLM drafts from. Returns the checkpoint and the final top-1 accuracy over all
    drafter steps and trained positions. ``head="target"`` trains a ``head_proj`` in
    front of the target's own (untied, scaled) ``lm_head`` instead of an own head.
    """
    from transformers import LlamaForCausalLM

    from vllm_redrafter.checkpoint import save_drafter
    from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
    from vllm_redrafter.drafter import RecurrentDrafter

    target = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hidden_size = target.config.hidden_size
    with torch.no_grad():
        hidden = target.model(input_ids=sequences).last_hidden_state  # [n, S, H]
        embeds = target.get_input_embeddings()(sequences)  # [n, S, H]
    start = prompt_len - 1
    hidden, embeds, tokens = hidden[:, start:], embeds[:, start:], sequences[:, start:]
    draft_vocab = sorted(set(tokens.flatten().tolist()))
    to_draft = {tok: i for i, tok in enumerate(draft_vocab)}
    num_steps = BEAM_LENGTH - 1
    seq_len = tokens.shape[1]
    # labels[:, i, t] = draft id of tokens[t + i + 2], -100 past the end: [n, steps, S']
    draft_tokens = torch.tensor([[to_draft[t] for t in row] for row in tokens.tolist()])
    labels = torch.full((tokens.shape[0], num_steps, seq_len), -100, dtype=torch.int64)
    for i in range(num_steps):
        shift = i + 2
        labels[:, i, : seq_len - shift] = draft_tokens[:, shift:]

    config = DrafterConfig(
        hidden_size=hidden_size,
        vocab_size=target.config.vocab_size,
        exit_dim=64,
        num_draft_layers=1,
        rnn=True,
        draft_vocab=draft_vocab,
        head=head,
    )
    torch.manual_seed(seed)
    drafter = RecurrentDrafter(config, generator=torch.Generator().manual_seed(seed))
    if head == "target":
        drafter.bind_target_head(target.lm_head.weight)
    optimizer = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    mask = labels != -100
    accuracy = 0.0
    for _step in range(steps):
        logits = drafter.forward_train(hidden, embeds, num_steps)  # [n, steps, S', Vd]
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = (logits.detach().argmax(-1)[mask] == labels[mask]).float().mean().item()
        if accuracy == 1.0:
            break
    options = ReDrafterOptions(beam_width=BEAM_WIDTH, beam_length=BEAM_LENGTH)
    return save_drafter(drafter, out_dir, options=options), accuracy


@contextlib.contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads (spinning OpenMP threads crawl on a
    loaded 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(old)


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
"""vLLM's switch: ``"0"`` runs an engine's core and worker in the calling process (set by
:func:`vllm_engine`, and by the tests that start a CLI whose engine may run so)."""


@contextlib.contextmanager
def vllm_engine(*, in_process: bool | None = None, **kwargs: Any) -> Iterator[Any]:
    """An ``LLM`` that is shut down on exit (engines run one at a time on CPU).

    ``in_process`` (default: whether ``speculative_config`` is given) runs the engine core
    and its worker inside the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): on a
    2-core CPU an engine then starts in ~5 s instead of ~35 s (no two spawned processes
    re-importing vLLM and torch), and the worker code under test is the same.

    Plain references default to their own processes: a ReDrafter engine's proposer-stage
    patches (runner hooks, the tree attention backend) are process-wide and stay after it
    shuts down, so an in-process reference could run through them. The multiprocess
    topology users get is kept where it matters: ``in_process=False`` (aborts, tensor
    parallelism), and the ``vllm serve``, example, bench and plugin-loading tests, which
    start real processes.

    In process, vLLM binds the calling thread to one CPU and replaces
    ``torch.set_num_threads``; both are put back on exit, so later subprocesses (servers,
    CLIs) get every CPU. ``vllm.envs``' cache, which an in-process engine core turns on,
    is turned off on entry and exit so that environment changes between engines count.
    """
    import vllm.envs
    from vllm import LLM

    affinity = os.sched_getaffinity(0)
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    if in_process is None:
        in_process = kwargs.get("speculative_config") is not None
    old_env = set_env({MULTIPROCESSING_ENV: "0" if in_process else "1"})
    vllm.envs.disable_envs_cache()
    try:
        llm = LLM(**{**ENGINE_KWARGS, **kwargs})
        try:
            yield llm
        finally:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    finally:
        set_env(old_env)
        vllm.envs.disable_envs_cache()
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        os.sched_setaffinity(0, affinity)


def generate_ids(
    llm: Any, prompts: list[list[int]], max_tokens: int, **sampling: Any
) -> list[list[int]]:
    """Output token ids per prompt (ignore_eos so every request runs max_tokens)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_metrics(llm: Any) -> dict[str, Any]:
    """vLLM's spec-decode counters from ``LLM.get_metrics()`` (summed over engines)."""
    found: dict[str, Any] = {
        "num_drafts": 0,
        "num_draft_tokens": 0,
        "num_accepted_tokens": 0,
        "accepted_per_pos": None,
    }
    names = {
        "vllm:spec_decode_num_drafts": "num_drafts",
        "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    }
    for metric in llm.get_metrics():
        if metric.name in names:
            found[names[metric.name]] += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            found["accepted_per_pos"] = [int(v) for v in metric.values]
    drafts = found["num_drafts"]
    found["mean_acceptance_length"] = (
        1.0 + found["num_accepted_tokens"] / drafts if drafts else math.nan
    )
    return found


def chi_square_homogeneity(
    a: list[Any], b: list[Any], min_expected: float = 5.0
) -> tuple[float, int, float]:
    """Chi-square test that two samples come from the same categorical distribution.

    Categories whose pooled expected count (per sample) is below ``min_expected`` are
    merged into one "rare" bucket. Returns ``(statistic, degrees of freedom, p-value)``;
    the p-value is ``Q(df/2, stat/2)``, the chi-square survival function.
    """
    from collections import Counter

    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)
    total = n_a + n_b
    cells: list[tuple[int, int]] = []
    rare = [0, 0]
    for key in set(count_a) | set(count_b):
        ca, cb = count_a[key], count_b[key]
        if (ca + cb) * min(n_a, n_b) / total < min_expected:
            rare[0] += ca
            rare[1] += cb
        else:
            cells.append((ca, cb))
    if sum(rare):
        cells.append((rare[0], rare[1]))
    stat = 0.0
    for ca, cb in cells:
        pooled = (ca + cb) / total
        for observed, n in ((ca, n_a), (cb, n_b)):
            expected = pooled * n
            stat += (observed - expected) ** 2 / expected
    df = max(len(cells) - 1, 1)
    p_value = float(
        torch.special.gammaincc(
            torch.tensor(df / 2.0, dtype=torch.float64),
            torch.tensor(stat / 2.0, dtype=torch.float64),
        )
    )
    return stat, df, p_value


def sample_ids(llm: Any, prompt: list[int], seeds: Any, temperature: float,
               max_tokens: int) -> list[tuple[int, ...]]:
    """One seeded sample of ``max_tokens`` tokens per seed (top-k 50, top-p 0.95)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=temperature, top_k=50, top_p=0.95,
                             max_tokens=max_tokens, seed=s, ignore_eos=True)
              for s in seeds]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * len(params), params,
                        use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outs]


def sample_mixed(llm: Any, prompt: list[int], seeds: Any, greedy_prompts: list[list[int]],
                 max_tokens: int, **sampling: Any) -> tuple[list[tuple[int, ...]],
                                                         list[list[int]]]:
    """One batch mixing seeded sampled requests (``sampling``: temperature, top_k, top_p)
    on ``prompt`` with greedy requests on ``greedy_prompts`` (interleaved, so scheduled
    steps hold both kinds). Returns ``(samples, greedy outputs)``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seeds = list(seeds)
    prompts, params = [], []
    every = max(1, len(seeds) // max(1, len(greedy_prompts)))
    greedy_at = []
    for i, seed in enumerate(seeds):
        if i % every == 0 and len(greedy_at) < len(greedy_prompts):
            greedy_at.append(len(prompts))
            prompts.append(TokensPrompt(prompt_token_ids=greedy_prompts[len(greedy_at) - 1]))
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                         ignore_eos=True))
        prompts.append(TokensPrompt(prompt_token_ids=prompt))
        params.append(SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True,
                                     **sampling))
    outs = llm.generate(prompts, params, use_tqdm=False)
    ids = [tuple(o.outputs[0].token_ids) for o in outs]
    greedy_set = set(greedy_at)
    samples = [t for i, t in enumerate(ids) if i not in greedy_set]
    return samples, [list(ids[i]) for i in greedy_at]


def bootstrap_power(ref: list[tuple[int, ...]], alt: list[tuple[int, ...]], positions: int,
                    resamples: int = 200, seed: int = 0) -> float:
    """Estimated power of :func:`assert_same_token_distribution` against the alternative
    ``alt`` was drawn from: the share of ``resamples`` pairs of samples of the same sizes,
    drawn with replacement from ``ref`` and ``alt``, that the check rejects."""
    gen = torch.Generator().manual_seed(seed)
    rejected = 0
    for _ in range(resamples):
        a = [ref[i] for i in torch.randint(len(ref), (len(ref),), generator=gen).tolist()]
        b = [alt[i] for i in torch.randint(len(alt), (len(alt),), generator=gen).tolist()]
        try:
            assert_same_token_distribution(a, b, positions)
        except AssertionError:
            rejected += 1
    return rejected / resamples


def assert_same_token_distribution(ref: list[tuple[int, ...]],
                                   got: list[tuple[int, ...]], positions: int) -> None:
    """Chi-square homogeneity per position ``1..positions`` and of the first two tokens
    jointly (Bonferroni over the ``positions + 1`` tests, 1% level), and non-trivial
    draws (several distinct tokens at every position)."""
    assert len(ref) == len(got)
    p_values = []
    for pos in range(positions):
        _, _, p = chi_square_homogeneity([s[pos] for s in ref], [s[pos] for s in got])
        p_values.append(p)
    _, _, p_pairs = chi_square_homogeneity([s[:2] for s in ref], [s[:2] for s in got])
    assert min(p_values + [p_pairs]) > 0.01 / (positions + 1), p_values + [p_pairs]
    assert all(len({s[pos] for s in got}) >= 3 for pos in range(positions))


def set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or unset, for None) environment variables; return the previous values."""
    old = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return old


def tiny_assets(root: Path) -> dict[str, Any]:
    """The peaked tiny Llama, its prompts, a random and an overfit drafter, built once per
    test session under ``root`` (reused by every chain-mode module)."""
    marker = root / "ready.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        return {k: Path(v) if k.endswith("_dir") else v for k, v in info.items()}
    root.mkdir(parents=True, exist_ok=True)
    prompts = byte_prompts(NUM_PROMPTS)
    target_dir = build_peaked_tiny_llama(root / "target")
    with torch_threads(1):
        sequences = hf_greedy(target_dir, prompts, NEW_TOKENS)  # [n, P + new]
        overfit_dir, accuracy = train_overfit_drafter(
            target_dir, sequences, PROMPT_TOKENS, root / "overfit-drafter"
        )
        target_head_dir, head_accuracy = train_overfit_drafter(
            target_dir, sequences, PROMPT_TOKENS, root / "target-head-drafter",
            head="target"
        )
    random_dir = save_random_drafter(
        root / "random-drafter", TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]
    )
    info = {
        "target_dir": str(target_dir),
        "overfit_dir": str(overfit_dir),
        "random_dir": str(random_dir),
        "target_head_dir": str(target_head_dir),
        "prompts": prompts,
        "train_accuracy": accuracy,
        "target_head_accuracy": head_accuracy,
    }
    marker.write_text(json.dumps(info))
    return {k: Path(v) if k.endswith("_dir") else v for k, v in info.items()}
