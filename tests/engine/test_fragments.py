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


def test_a_fragments_sync_is_one_object_over_the_engines_state():
    """Each fragment's FragmentSync views its own θ_g and snapshot parameters, holds its sync in flight
    (OuterSync.pending is a read-only view of them) and its phase-2 error feedback, which the checkpoint keys still
    carry."""
    import torch

    from lightning_localsgd.engine import OuterSync
    from lightning_localsgd.engine.comm import Communicator

    class Alone(Communicator):  # a cross group of one: the engine never talks
        size, rank = 1, 0

        def all_reduce(self, tensor, op="sum", async_op=False):
            raise AssertionError("a group alone sends nothing")

        all_to_all = all_gather = all_reduce

    params = [torch.nn.Parameter(torch.full((n,), float(n))) for n in (3, 2, 4)]
    engine = OuterSync(params, cross_group=Alone(), compression="int8", fragments=2)
    first, second = engine.fragments
    assert [s.index for s in engine.fragment_syncs] == [None, 0, 1] and engine.whole.owned == (0, 9)
    for sync in engine.fragment_syncs:  # views of the flat θ_g, and the snapshot parameters over them
        lo, hi = sync.owned
        assert sync.theta.data_ptr() == engine._flat[lo:hi].data_ptr() and sync.theta.numel() == hi - lo
        assert sum(p.numel() for p in sync.snapshot) == hi - lo
    assert [p.numel() for p in first.snapshot] + [p.numel() for p in second.snapshot] == [3, 2, 4]
    engine.start_sync(1, weight=1.0)
    assert list(engine.pending) == [1] and engine.pending[1] is second.pending and first.pending is None
    with pytest.raises(TypeError):
        engine.pending[0] = second.pending  # read-only: a sync in flight is its fragment's
    engine.finish_sync(1)
    assert not engine.pending and second.mean_error is not None and first.mean_error is None
    assert second.error is not None and torch.equal(second.error, engine.compressor.error[5:9])
    state = engine.state_dict()
    assert list(state["compression_mean_error"]) == [1] and state["compression_mean_error_owner"] == {1: (1, 0)}
    copy = OuterSync([torch.nn.Parameter(p.detach().clone()) for p in params], cross_group=Alone(),
                     compression="int8", fragments=2)
    copy.load_state_dict(state)
    assert torch.equal(copy.fragments[1].mean_error, second.mean_error) and copy.fragments[1].mean_error_owner == (1, 0)
    assert copy.fragments[0].mean_error is None and copy.whole.mean_error is None


def test_a_time_based_streaming_schedule_counts_in_the_engines_fragments():
    from lightning_localsgd.engine.fragment import FragmentTokens
    from lightning_localsgd.engine.schedules import TimeBasedStreamingSchedule

    schedule = TimeBasedStreamingSchedule(1.0, fragments=2, clock=lambda: 0.0)
    schedule.record_tokens(5)
    fragments = [FragmentTokens(), FragmentTokens()]
    schedule.bind_fragments(fragments)  # the counts so far go with them
    schedule.record_tokens(3)
    assert [f.tokens for f in fragments] == [8, 8] == schedule.fragment_tokens
    assert schedule.start_next() == 0 and fragments[0].weight_in_flight == 8.0 and fragments[0].tokens == 0
    assert schedule.state_dict()["in_flight_weights"] == {0: 8.0}
    schedule.fragment_applied(0, applied=False)  # dropped: its tokens count at its next sync
    assert fragments[0].weight_in_flight is None and schedule.fragment_weight(0) == 8.0
    with pytest.raises(ValueError, match="bind_fragments"):
        schedule.bind_fragments([FragmentTokens()])
