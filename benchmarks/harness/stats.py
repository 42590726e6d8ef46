"""Intervals for deterministic (loss) comparisons: paired bootstrap over the held-out windows."""

from __future__ import annotations


def paired_ratio_ci(a: list, b: list, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(a) / mean(b) over the held-out windows (evaluation noise only)."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    r = a[idx].mean(1) / b[idx].mean(1)
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))
