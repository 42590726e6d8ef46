"""The benchmarks' timing method (``benchmarks/harness/timing.py``) recovers known time ratios.

Two synthetic configurations whose true ratio is known: B does exactly twice A's work (two 20 ms sleeps against
one), so B / A = 2 whatever the per-sleep overhead of a loaded machine. And a simulated machine whose speed drifts
between runs: interleaving cancels the drift, timing one configuration after the other does not.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness import timing  # noqa: E402


def _sleeps(n: int, seconds: float = 0.02):
    """A configuration whose work is ``n`` sleeps of ``seconds``."""
    def work() -> None:
        for _ in range(n):
            time.sleep(seconds)
    return timing.timed(work)


def test_recovers_a_known_ratio_of_real_sleeps():
    measured = timing.run_interleaved({"A": _sleeps(1), "B": _sleeps(2)}, repeats=15, log=None)
    est = timing.ratio(measured, "B", "A")
    assert 1.7 <= est.median <= 2.3, est.text()
    assert est.min <= 2.0 <= est.max, est.text()  # [min, max] misses the median ratio with probability 2^-14
    assert est.low <= est.median <= est.high
    assert est.n == 15 and len(measured.loads()) == 30
    assert est.verdict(2.5) == "shown" and est.verdict(1.5) == "not shown"


def test_rounds_alternate_the_order():
    assert timing.round_orders(["A", "B"], 4) == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert timing.round_orders(["A", "B", "C"], 2) == [["A", "B", "C"], ["C", "B", "A"]]


class DriftingMachine:
    """A simulated clock: each run costs ``work × speed``, and the machine gets 10% slower with every run."""

    def __init__(self) -> None:
        self.runs = 0

    def config(self, work: float):
        def run() -> float:
            self.runs += 1
            return work * (1 + 0.1 * self.runs)
        return run


def test_interleaving_cancels_drift_that_sequential_timing_keeps():
    machine = DriftingMachine()
    est = timing.ratio(timing.run_interleaved({"A": machine.config(1.0), "B": machine.config(2.0)}, repeats=8,
                                              log=None), "B", "A")
    assert est.median == pytest.approx(2.0, rel=0.01) and est.low <= 2.0 <= est.high, est.text()
    # the same rounds timed sequentially (all of A, then all of B) carry the drift into the ratio
    machine = DriftingMachine()
    a = [machine.config(1.0)() for _ in range(8)]
    b = [machine.config(2.0)() for _ in range(8)]
    sequential = timing.ratio_of(b, a)
    assert sequential.low > 2.2, sequential.text()


def test_bootstrap_interval_is_reproducible_and_ordered():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2]
    assert timing.bootstrap_median(values) == timing.bootstrap_median(values)
    low, high = timing.bootstrap_median(values)
    assert min(values) <= low <= high <= max(values)
    with pytest.raises(ValueError):
        timing.ratio_of([1.0], [])
