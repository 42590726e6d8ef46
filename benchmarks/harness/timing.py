"""One timing method for every wall-clock comparison: interleaved repetitions, median ratios with intervals.

A shared, noisy machine changes speed over seconds to minutes (other jobs start and stop). Timing configuration A,
then B, puts that drift into the ratio B / A. Here the configurations run in rounds, each round one run of every
configuration, the order reversed every other round (A B, B A, A B, … — ABBA blocks for two, A B C, C B A, … for
more), so that a linear drift over two rounds hits every configuration equally and each ratio is taken between runs
that ran next to each other. From the rounds:

* the ratio of each round (``value(B) / value(A)`` of the same round),
* its median over the rounds (robust to a round hit by a burst of load),
* a percentile-bootstrap interval of that median (resampling rounds; seeded, so the report is reproducible) and
  the min / max over the rounds (for n rounds, [min, max] holds the true median ratio with probability
  1 − 2^(1−n) when the rounds' ratios scatter independently around it: 94% for 5 rounds),
* the machine load seen: the 1-minute load average before every run.

A target is *shown* only when the whole interval (bootstrap upper bound) is on the right side of it; otherwise the
result is reported as "not shown", not as a pass. Pure standard library (the tests import it without torch).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

Runner = Callable[[], Any]


def round_orders(names: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of the runs in each round: ``names``, then reversed, alternately (ABBA blocks for two)."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(repeats)]


@dataclass
class Run:
    """One run of one configuration: its result, when it ran and the load average before it."""

    name: str
    round: int
    result: Any
    started: float
    seconds: float
    load_before: float


@dataclass
class Interleaved:
    """The runs of an interleaved measurement, by round (``rounds[r][name]``)."""

    rounds: list[dict[str, Run]] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        """Every run in the order it ran."""
        return sorted((run for rnd in self.rounds for run in rnd.values()), key=lambda run: run.started)

    def results(self, name: str) -> list[Any]:
        """The results of configuration ``name``, one per round."""
        return [rnd[name].result for rnd in self.rounds]

    def loads(self) -> list[float]:
        """The 1-minute load average before each run."""
        return [run.load_before for run in self.runs]

    def load_text(self) -> str:
        """The load seen, e.g. ``load 0.9-2.1 (median 1.4) over 10 runs``."""
        loads = self.loads()
        return (f"load {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f}) "
                f"over {len(loads)} runs")


def run_interleaved(runners: Mapping[str, Runner], repeats: int,
                    log: Optional[Callable[[str], None]] = print) -> Interleaved:
    """Run every configuration ``repeats`` times, interleaved (:func:`round_orders`); ``runners[name]()`` = one run."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    out = Interleaved()
    for r, order in enumerate(round_orders(list(runners), repeats)):
        rnd: dict[str, Run] = {}
        for name in order:
            load, t0, started = os.getloadavg()[0], time.perf_counter(), time.time()
            result = runners[name]()
            rnd[name] = Run(name, r, result, started, time.perf_counter() - t0, load)
            if log is not None:
                log(f"round {r + 1}/{repeats} {name}: {rnd[name].seconds:.1f} s (load {load:.2f})")
        out.rounds.append(rnd)
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_median(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (resampling them with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return _quantile(medians, (1 - level) / 2), _quantile(medians, (1 + level) / 2)


@dataclass
class RatioEstimate:
    """The median of per-round ratios with its bootstrap interval and the rounds' min / max."""

    median: float
    low: float
    high: float
    min: float
    max: float
    ratios: list[float]

    @property
    def n(self) -> int:
        return len(self.ratios)

    def shown_at_most(self, target: float) -> bool:
        """Whether the ratio is shown to be ≤ ``target``: the whole bootstrap interval is."""
        return self.high <= target

    def verdict(self, target: float) -> str:
        """``"shown"`` or ``"not shown"`` for "ratio ≤ target"."""
        return "shown" if self.shown_at_most(target) else "not shown"

    def text(self, digits: int = 3) -> str:
        """E.g. ``1.012 [0.995, 1.031] (min 0.981, max 1.044, 5 rounds)``."""
        f = f"{{:.{digits}f}}"
        return (f"{f.format(self.median)} [{f.format(self.low)}, {f.format(self.high)}] "
                f"(min {f.format(self.min)}, max {f.format(self.max)}, {self.n} rounds)")

    def row(self, prefix: str = "ratio") -> dict:
        """The estimate as CSV/markdown columns."""
        return {f"{prefix}_median": self.median, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                f"{prefix}_min": self.min, f"{prefix}_max": self.max, f"{prefix}_rounds": self.n}


def ratio_of(numerators: Sequence[float], denominators: Sequence[float], **bootstrap: Any) -> RatioEstimate:
    """Median of the paired ratios ``numerators[i] / denominators[i]`` (one pair per round) with its intervals."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("one numerator and one denominator per round, at least one round")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    low, high = bootstrap_median(ratios, **bootstrap)
    return RatioEstimate(statistics.median(ratios), low, high, min(ratios), max(ratios), ratios)


def ratio(measured: Interleaved, numerator: str, denominator: str,
          value: Callable[[Any], float] = float, **bootstrap: Any) -> RatioEstimate:
    """``value(result of numerator) / value(result of denominator)`` per round, as a :class:`RatioEstimate`."""
    return ratio_of([value(r) for r in measured.results(numerator)],
                    [value(r) for r in measured.results(denominator)], **bootstrap)


def timed(fn: Callable[[], Any]) -> Runner:
    """A runner whose result is the wall-clock seconds of ``fn()`` (for configurations timed from outside)."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run
