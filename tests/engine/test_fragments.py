"""How streaming sync cuts the parameters into fragments: contiguous runs, the largest as small as possible."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_localsgd.engine import split_fragments


def _largest(sizes, bounds):
    return max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))


def test_matches_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        sizes = [rng.randint(1, 60) for _ in range(n)]
        fragments = rng.randint(1, n)
        bounds = split_fragments(sizes, fragments)
        assert len(bounds) == fragments + 1 and bounds[0] == 0 and bounds[-1] == n
        assert all(a < b for a, b in zip(bounds, bounds[1:]))  # every fragment holds a tensor
        best = min(_largest(sizes, (0, *cut, n)) for cut in itertools.combinations(range(1, n), fragments - 1))
        assert _largest(sizes, bounds) == best, (sizes, fragments, bounds)


def test_gpt_like_layout_peak_is_a_quarter_and_a_bit():
    # the micro GPT's parameter tensors: the nearest-to-k/F cut gave a largest fragment of 0.30 of the model
    sizes = [16384, 8192, 64, 12288, 4096, 64, 16384, 16384, 64, 12288, 4096, 64, 16384, 16384, 64]
    bounds = split_fragments(sizes, 4)
    assert _largest(sizes, bounds) == 32896  # 0.267 of the model, the best contiguous cut


@pytest.mark.parametrize("fragments", [0, 5])
def test_more_fragments_than_tensors_is_refused(fragments):
    with pytest.raises(ValueError, match="fragments"):
        split_fragments([3, 1, 4, 1], fragments)
