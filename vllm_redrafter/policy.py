# SPDX-License-Identifier: Apache-2.0
"""Load-aware drafting: how many tokens to draft this step, from measured costs.

Speculation pays only while verifying drafted tokens is cheap next to the tokens they
save. For a decode batch of ``B`` requests each drafting ``k`` tokens the expected speed is

    rate(k) = B * E(k) / (T(B * (1 + k)) + D(B, k) + O(B, k)),  E(k) = 1 + sum_{d=1..k} A(d)
    rate(0) = B / (T0(B) + O(B, 0))

- ``T(n)``: measured seconds of a target step that verifies ``n`` tokens
  (:class:`StepCostTable`, from the engine's own steps). Steps that verified drafts and
  steps that did not are kept apart: a plain step of ``n`` requests (``T0(n)``,
  :attr:`DraftPolicy.plain`) computes logits and samples ``n`` rows, a verification step
  of ``n`` tokens computes logits for all ``n`` and runs the rejection sampler, so the two
  differ at the same ``n`` (in-process, bfloat16, 2026-12-03: ``n = 16`` read 133 ms from
  4 requests verifying 3 drafts each, 80 ms from 16 plain requests; mixed in one bin, the
  first made plain decoding at 16 requests look 1.7x slower than it was, and drafting
  two tokens was rated 1.7x faster than it);
- ``D(B, k)``: measured seconds of drafting ``k`` tokens for ``B`` requests
  (:class:`DraftCostTable`);
- ``O(B, k)``: measured seconds of the rest of such a step's cycle, from one drafting call
  to the next: scheduling, output processing, bookkeeping (:class:`OverheadTable`; 0 until
  measured);
- ``A(d)``: measured share of drafted requests whose accepted path reached depth ``d``
  (:class:`AcceptanceTracker`). In tree mode ``k`` is the tree's depth (its beams and
  look-up branches cut after ``k`` tokens), the target verifies ``B * (1 + N(k))`` tokens
  with ``N(k)`` the measured mean node count of depth-``k`` trees (:class:`TreeSizeTable`),
  and ``A(d)`` is the share whose accepted path reached depth ``d`` of the tree.

:class:`DraftPolicy` picks the ``k`` with the highest rate, ``k = 0`` (no draft, no drafting
cost: plain decoding) included, so it drafts only when drafting is expected to be faster.
Until every cost it needs has been measured it drafts fully (warm-up), where that is
affordable: a full draft's step, verification plus drafting, may cost at most
``warm_up_cost`` (2x) a plain step's by the cost tables' estimates, otherwise it decodes
plainly and warms up later at a smaller batch (on this CPU a fresh engine hit by 64
requests would verify 64 x 5 tokens, 4.75x a plain step, to learn what it could learn at
batch 1; where verification and drafting are nearly free, as on a GPU, it warms up at
any batch). While it is not drafting it drafts once every ``explore_every`` steps with
the draft closest to paying (usually one token: cheap under load), so that acceptance
and costs stay current. The converse holds too: while it drafts, a plain step's cost
``T(B)`` is measured, not only extrapolated from the drafting steps' sizes (a drafting
step also pays the rejection sampler, so a line through ``T(2B)``, ``T(3B)``
overestimates ``T(B)``: at 4 requests on this CPU 78 ms extrapolated, 60 ms measured).
So it takes one plain step as soon as ``T(B)`` is unmeasured, and one every
``explore_every`` drafting steps to keep it current.
A draft must beat plain decoding by ``min_gain`` (10%) to be chosen: the model leaves out
costs a drafting step causes elsewhere (prefills interleaved differently, requests
finishing at staggered steps so that batches run part-empty; the scheduler's and the
output path's work on the spec tokens is ``O``, measured since 2026-12-03), and measured
against it (before ``O``) the prediction was optimistic by
3-9% on this CPU (per-step probes, 2026-12-01: c=4 T=0.7 predicted +3%, measured -4%;
c=16 greedy +4% vs -5%; c=4 greedy +13% vs +10%).

Worked example (the CPU numbers of the README, rounded): ``T(1) = 0.100``,
``T(5) = 0.110``, ``D(1, 4) = 0.020`` s, ``A = (0.40, 0.16, 0.08, 0.04)``: ``rate(0) = 10.0``,
``rate(4) = 1.68 / 0.130 = 12.9`` tok/s: draft. At ``B = 16``, ``T(16) = 0.16``,
``T(80) = 0.50``, ``D(16, 4) = 0.06``: ``rate(0) = 100``, ``rate(4) = 16 * 1.68 / 0.56 = 48``:
do not draft.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

EMA = 0.2
"""Weight of a new observation in a cost bin's running mean."""

BINS_PER_OCTAVE = 4
"""Cost tables bin token and request counts on a log scale, 4 bins per doubling."""


def cost_clock(device_type: str) -> Callable[[], float]:
    """The clock the policy's step and drafting costs are read with: the calling thread's
    CPU time on a ``"cpu"`` device, wall time on any other.

    On a virtual machine, wall time includes the hypervisor's *steal* (time the virtual
    CPU was ready and something else ran). On this project's shared VM it came in bursts of
    up to 55% (2026-12-03): an identical schedule's forward read 8.3 to 25.8 s. The policy
    measures a plain step's cost only once every ``explore_every`` drafting steps, so one
    plain step timed in a burst made every draft look cheap for the next 64 steps. A
    thread's CPU time leaves steal out (in a 5 s busy loop, wall minus thread time equalled
    the CPU's steal to 0.01 s) and still counts the forward the thread runs, or spins in
    while OpenMP's other threads finish theirs. On a GPU the host thread may sleep in a
    blocking synchronisation, so there the wall clock is the cost.

    Example: ``cost_clock("cpu") is time.thread_time``; ``cost_clock("cuda") is
    time.perf_counter``.
    """
    return time.thread_time if device_type == "cpu" else time.perf_counter


def _bin(n: int) -> int:
    """Log-scale bin of ``n >= 1``. Example: 1 -> 0, 2 -> 4, 3 -> 6, 16 -> 16."""
    return int(math.floor(math.log2(max(n, 1)) * BINS_PER_OCTAVE + 1e-9))


@dataclass
class _Bin:
    n: float
    seconds: float


@dataclass
class StepCostTable:
    """Seconds of a step against its size ``n`` (tokens verified, or requests drafted).

    Observations go into log-scale bins (running means of ``n`` and seconds); an
    estimate at ``n`` interpolates linearly between the nearest measured bins, and
    extrapolates from the two nearest on one side (never below the nearest measured
    value when going up, never below zero going down).

    Example: bins measured at n=8 (0.10 s) and n=32 (0.16 s): ``estimate(16) = 0.12``,
    ``estimate(64) = 0.24``, ``estimate(4) = 0.09``.
    """

    bins: dict[int, _Bin] = field(default_factory=dict)

    def observe(self, n: int, seconds: float) -> None:
        if n < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        key = _bin(n)
        old = self.bins.get(key)
        if old is None:
            self.bins[key] = _Bin(float(n), seconds)
        else:
            old.n += EMA * (n - old.n)
            old.seconds += EMA * (seconds - old.seconds)

    def estimate(self, n: int) -> float | None:
        """Estimated seconds at size ``n``; None with no measurement at all."""
        points = sorted((b.n, b.seconds) for b in self.bins.values())
        if not points:
            return None
        if len(points) == 1:
            n0, s0 = points[0]
            return s0 * max(n, 1) / n0 if n > n0 else s0  # proportional above, flat below
        below = [p for p in points if p[0] <= n]
        above = [p for p in points if p[0] > n]
        if below and above:
            (n0, s0), (n1, s1) = below[-1], above[0]
        elif above:  # below every measurement
            (n0, s0), (n1, s1) = above[0], above[1]
        else:  # above every measurement
            (n0, s0), (n1, s1) = below[-2], below[-1]
        slope = (s1 - s0) / (n1 - n0) if n1 != n0 else 0.0
        value = s0 + slope * (n - n0)
        if not above:
            value = max(value, s1)
        return max(value, 0.0)

    @property
    def num_bins(self) -> int:
        return len(self.bins)


@dataclass
class _PerLengthTable:
    """Seconds against the requests (a :class:`StepCostTable`), one table per draft
    length; subclasses say how a length is estimated."""

    by_length: dict[int, StepCostTable] = field(default_factory=dict)

    def observe(self, num_reqs: int, length: int, seconds: float) -> None:
        self.by_length.setdefault(length, StepCostTable()).observe(num_reqs, seconds)


@dataclass
class DraftCostTable(_PerLengthTable):
    """Seconds of one drafting step against the requests drafted, per draft length."""

    def estimate(self, num_reqs: int, length: int) -> float | None:
        """Measured at this length if possible, else scaled from the nearest measured
        length (a drafting step is ``length`` drafter steps plus fixed work)."""
        if length == 0:
            return 0.0
        table = self.by_length.get(length)
        if table is not None:
            return table.estimate(num_reqs)
        if not self.by_length:
            return None
        nearest = min(self.by_length, key=lambda m: abs(m - length))
        base = self.by_length[nearest].estimate(num_reqs)
        return None if base is None else base * length / nearest


@dataclass
class OverheadTable(_PerLengthTable):
    """Seconds of a step's cycle outside the target's step and the drafting, against the
    requests, per draft length (0: a plain step): the engine's scheduling and output
    processing, the runner's bookkeeping, the proposer's own work around the beam search.

    The cycle is measured from one drafting call to the next (:meth:`DraftPolicy.
    observe_cycle`) on the policy's clock; ``T`` and ``D`` are measured inside it, the rest
    is this table. On a CPU that clock is the worker thread's CPU time, and vLLM's worker
    busy-polls for its next step while the engine core schedules, so the waits count.
    It grows with the drafted tokens: in ``bench`` on the 2-core Xeon (bfloat16, 16
    requests, greedy, 2026-12-03) plain steps took 160 ms against ``T = 140`` ms, and
    2-token drafts 265-308 ms a step against ``T + D`` of about 170 ms, so drafting that
    ``T + D`` rated 1.3x faster than plain decoding read 0.86-0.96x of it.

    ``estimate(num_reqs, length)``: measured at this length; between two measured lengths,
    linear between them; beyond them, the nearest one's; nothing measured, 0 (the model
    without it). Example: ``observe(16, 0, 0.02)``, ``observe(16, 2, 0.10)``:
    ``estimate(16, 1) = 0.06``, ``estimate(16, 4) = 0.10``.
    """

    def estimate(self, num_reqs: int, length: int) -> float:
        below = [m for m in self.by_length if m <= length]
        above = [m for m in self.by_length if m >= length]
        if not below and not above:
            return 0.0
        lo = max(below) if below else min(above)
        hi = min(above) if above else max(below)
        lo_s = self.by_length[lo].estimate(num_reqs) or 0.0
        hi_s = self.by_length[hi].estimate(num_reqs) or 0.0
        if hi == lo:
            return lo_s
        return lo_s + (hi_s - lo_s) * (length - lo) / (hi - lo)


@dataclass
class AcceptanceTracker:
    """Share of drafted requests whose accepted path reached each depth (decayed counts,
    so recent steps weigh more).

    ``observe(drafted_depth, accepted)``: one request's verified draft of depth
    ``drafted_depth`` (chain length, or tree depth) of which ``accepted`` tokens were
    accepted. ``reach(d)`` = accepted >= d among requests that drafted depth >= d.
    Example: observations (4, 1), (4, 0), (4, 2) -> reach = (2/3, 1/3, 0, 0), E(4) = 2.0.
    """

    max_depth: int
    decay: float = 0.999
    drafted: list[float] = field(default_factory=list)
    reached: list[float] = field(default_factory=list)
    samples: float = 0.0

    def __post_init__(self) -> None:
        self.drafted = [0.0] * (self.max_depth + 1)
        self.reached = [0.0] * (self.max_depth + 1)

    def observe(self, drafted_depth: int, accepted: int) -> None:
        if drafted_depth < 1:
            return
        self.samples = self.samples * self.decay + 1
        for d in range(1, self.max_depth + 1):
            self.drafted[d] *= self.decay
            self.reached[d] *= self.decay
            if d <= drafted_depth:
                self.drafted[d] += 1
                self.reached[d] += accepted >= d

    def reach(self, depth: int) -> float | None:
        if self.drafted[depth] <= 0:
            return None
        return self.reached[depth] / self.drafted[depth]

    def expected_tokens(self, depth: int) -> float | None:
        """``E(depth) = 1 + sum of reach(d), d <= depth``; None if a depth is unmeasured."""
        total = 1.0
        for d in range(1, depth + 1):
            share = self.reach(d)
            if share is None:
                return None
            total += share
        return total


@dataclass
class TreeSizeTable:
    """Mean drafted nodes of the trees proposed at each depth (running means).

    Until a depth is measured its size is estimated as ``min(budget, width * depth)``
    (every branch disjoint below the root). Example: ``width = 4, budget = 16``: depth 2
    -> 8 until measured; after ``observe(2, 5.0)`` -> 5.0.
    """

    width: int
    budget: int
    means: dict[int, float] = field(default_factory=dict)

    def observe(self, depth: int, mean_nodes: float) -> None:
        old = self.means.get(depth)
        self.means[depth] = mean_nodes if old is None else old + EMA * (mean_nodes - old)

    def nodes(self, depth: int) -> float:
        if depth <= 0:
            return 0.0
        return self.means.get(depth, float(min(self.budget, self.width * depth)))


@dataclass(frozen=True)
class Decision:
    """What :meth:`DraftPolicy.choose` decided, and why."""

    length: int
    """Tokens (chain) or tree nodes' depth to draft; 0 = no draft this step."""
    reason: str
    """``warm-up``, ``explore``, ``pinned`` or ``rate``."""
    rates: dict[int, float] = field(default_factory=dict)
    """Expected tokens/s per candidate length (empty unless ``reason == "rate"``)."""


@dataclass
class DraftPolicy:
    """Picks the draft length of each step (see the module docstring).

    Args:
        max_length: ``L - 1``, the longest chain the drafter makes.
        tree: the tree's node sizes per depth (``None`` in chain mode); in tree mode the
            choice is the tree's depth ``0 .. L - 1``.
        adaptive: False pins the full draft on every step (the policy only measures).
        explore_every: while not drafting, draft (the best-rated length) once every this
            many steps.
        min_samples: drafted requests needed before acceptance is trusted.
        min_gain: a draft is chosen only if its rate is at least this multiple of plain
            decoding's.
        warm_up_cost: warm-up drafts fully only while the estimated cost of such a step
            (verification plus drafting) is at most this multiple of a plain step's (no
            draft otherwise).
        target: seconds of steps that verified drafts, against their tokens (the
            proposer feeds only steps that verified nothing else: no prefill beside).
        plain: seconds of steps without a draft (plain decoding, prefills), against
            their tokens. Until it has a measurement, plain steps are estimated from
            :attr:`target` (recorded tables with one kind of step).
    """

    max_length: int
    tree: TreeSizeTable | None = None
    adaptive: bool = True
    explore_every: int = 64
    min_samples: int = 32
    min_gain: float = 1.10
    warm_up_cost: float = 2.0
    target: StepCostTable = field(default_factory=StepCostTable)
    plain: StepCostTable = field(default_factory=StepCostTable)
    draft: DraftCostTable = field(default_factory=DraftCostTable)
    overhead: OverheadTable = field(default_factory=OverheadTable)
    acceptance: AcceptanceTracker = field(init=False)
    idle_steps: int = 0
    busy_steps: int = 0
    steps: int = 0
    no_draft_steps: int = 0
    drafted_length_sum: int = 0

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceTracker(self.max_length)

    def candidates(self) -> list[int]:
        """Lengths considered: chain lengths, or tree depths, ``0 .. L - 1``."""
        return list(range(self.max_length + 1))

    def verified_tokens(self, num_reqs: int, length: int) -> int:
        """Tokens the target verifies for ``num_reqs`` requests drafting ``length``
        (a chain of ``length`` tokens, or a tree of depth ``length``)."""
        if length == 0:
            return num_reqs
        nodes = self.tree.nodes(length) if self.tree is not None else length
        return int(round(num_reqs * (1 + nodes)))

    def _plain_table(self) -> StepCostTable:
        """Where plain steps are read: :attr:`plain`, or :attr:`target` while
        :attr:`plain` is empty."""
        return self.plain if self.plain.num_bins else self.target

    def plain_cost(self, num_reqs: int) -> float | None:
        """``T0(num_reqs)``: a plain step's seconds (:meth:`_plain_table`)."""
        return self._plain_table().estimate(num_reqs)

    def verify_cost(self, num_tokens: int) -> float | None:
        """``T(num_tokens)``: seconds of a step verifying ``num_tokens`` tokens. From
        :attr:`target`; with only one size measured there, that measurement shifted by
        the plain steps' slope (a verification step costs a plain step of its size plus
        a roughly constant extra), not scaled in proportion; with none, a plain step's
        (so that a fresh engine's warm-up is priced from its prefills).

        Example: verified ``T(5) = 0.110``, plain ``T0(1) = 0.100``, ``T0(16) = 0.130``:
        ``verify_cost(3) = 0.110 + (0.104 - 0.108) = 0.106``."""
        if self.target.num_bins == 0:  # none yet: plain steps of that size stand in
            return self.plain.estimate(num_tokens)
        if self.target.num_bins == 1 and self.plain.num_bins >= 1:
            (only,) = self.target.bins.values()
            shift = self.plain.estimate(num_tokens) - self.plain.estimate(round(only.n))
            return max(only.seconds + shift, 0.0)
        return self.target.estimate(num_tokens)

    def costs_known(self) -> bool:
        """Whether plain and verification steps can both be estimated: two sizes of
        either kind, or one of each (an unmeasured kind is warmed up first)."""
        if self.plain.num_bins == 0:
            return self.target.num_bins >= 2
        return self.target.num_bins >= 1

    def rate(self, num_reqs: int, length: int) -> float | None:
        """Expected tokens per second, or None if a needed cost is unmeasured."""
        tokens = 1.0 if length == 0 else self.acceptance.expected_tokens(length)
        target = (self.plain_cost(num_reqs) if length == 0
                  else self.verify_cost(self.verified_tokens(num_reqs, length)))
        drafting = self.draft.estimate(num_reqs, length)
        if tokens is None or target is None or drafting is None or target + drafting <= 0:
            return None
        return num_reqs * tokens / (target + drafting + self.overhead.estimate(num_reqs, length))

    def observe_cycle(self, num_reqs: int, length: int, cycle_s: float,
                      target_s: float, drafting_s: float) -> None:
        """One cycle from a drafting call to the next: ``length`` drafted for
        ``num_reqs`` requests (``drafting_s``), then the target's step (``target_s``),
        then the rest (:class:`OverheadTable`). A remainder above ``target_s`` is not a
        step's cost but a gap (the engine idle between requests, or a step in between
        that sampled nothing and called no drafting): not observed.

        Example: a 0.232 s cycle, ``T = 0.164``, ``D = 0.019`` -> 0.049 s observed;
        a 0.500 s cycle with the same ``T`` and ``D`` -> nothing."""
        rest = cycle_s - target_s - drafting_s
        if num_reqs >= 1 and math.isfinite(rest) and 0.0 <= rest <= target_s:
            self.overhead.observe(num_reqs, length, rest)

    def choose(self, num_reqs: int) -> Decision:
        """The draft length for a step drafting for ``num_reqs`` requests."""
        decision = self._decide(num_reqs)
        self.steps += 1
        self.drafted_length_sum += decision.length
        if decision.length == 0:
            self.no_draft_steps += 1
            self.idle_steps += 1
            self.busy_steps = 0
        else:
            self.idle_steps = 0
            self.busy_steps += 1
        return decision

    def _decide(self, num_reqs: int) -> Decision:
        if not self.adaptive:
            return Decision(self.max_length, "pinned")
        if self.acceptance.samples < self.min_samples or not self.costs_known():
            return self._warm_up(num_reqs)
        rates = {k: r for k in self.candidates()
                 if (r := self.rate(num_reqs, k)) is not None}
        if 0 not in rates or len(rates) < 2:
            return self._warm_up(num_reqs)
        best = max(rates, key=lambda k: (rates[k], -k))  # ties: the shorter draft
        if best > 0 and rates[best] < self.min_gain * rates[0]:
            best = 0  # a gain within the model's error: plain decoding
        if best > 0 and (not self.plain_measured(num_reqs)
                         or self.busy_steps + 1 >= self.explore_every):
            return Decision(0, "explore", rates)  # measure T(B) of a plain step
        if best == 0 and self.idle_steps + 1 >= self.explore_every:
            # the draft closest to paying: cheap to try under load, and what would be
            # chosen first if its measurements turn out better than estimated
            drafts = [k for k in rates if k > 0]
            return Decision(max(drafts, key=lambda k: (rates[k], -k)), "explore", rates)
        return Decision(best, "rate", rates)

    def _warm_up(self, num_reqs: int) -> Decision:
        """A full draft to measure acceptance and costs, unless such a step,
        verification and drafting together, is estimated at more than ``warm_up_cost``
        plain steps at this batch (then none). One request always warms up: no smaller
        batch will come.

        The drafting cost counts where the draft table can estimate it (after any
        drafting step; from one measured batch size it scales in proportion to the
        requests, which overestimates a batched beam search: the rule errs towards
        decoding plainly). Example (the README's CPU costs, float32): ``T(1) = 0.100``,
        ``T(5) = 0.110``, ``D(1, 4) = 0.020``: at 1 request 1.3x, warm up;
        ``T(64) = 0.40``, ``T(320) = 1.90``: at 64 requests 4.75x before drafting, no
        draft. In bfloat16 (recorded in-process, 2026-12-01) at 8 requests: ``T(8) = 0.034``,
        ``T(40) = 0.064`` (1.9x: the target alone would warm up), ``D(8, 4) = 0.017``:
        2.4x, no draft.
        """
        length = self.max_length
        full = self.verify_cost(self.verified_tokens(num_reqs, length))
        plain = self.plain_cost(num_reqs)
        drafting = self.draft.estimate(num_reqs, length)
        if full is not None and drafting is not None:
            full += drafting
        too_dear = full is not None and plain and full > self.warm_up_cost * plain
        if too_dear and num_reqs > 1:
            return Decision(0, "warm-up")
        return Decision(length, "warm-up")

    def plain_measured(self, num_reqs: int) -> bool:
        """Whether a plain step of ``num_reqs`` requests (``T0(num_reqs)``, no draft) has
        a measured cost bin (not only an extrapolation from other steps): in
        :meth:`_plain_table`."""
        return _bin(num_reqs) in self._plain_table().bins

    def counters(self) -> dict[str, float]:
        """Steps decided, steps without a draft, sum of draft lengths (the bench takes
        their differences over a cell)."""
        return {"steps": float(self.steps), "no_draft_steps": float(self.no_draft_steps),
                "length_sum": float(self.drafted_length_sum)}

    def stats(self) -> dict[str, float]:
        """Steps decided, share without a draft, mean draft length."""
        counts = self.counters()
        steps = max(counts["steps"], 1.0)
        return {"steps": counts["steps"], "no_draft_share": counts["no_draft_steps"] / steps,
                "mean_length": counts["length_sum"] / steps}
