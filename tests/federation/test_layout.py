"""The layout check of federated jobs (unit level): what each job holds, its fixed-size encoding for the all-gather
over the managed process group, and the refusal naming both jobs' layouts. The check inside a sync is exercised by
``test_federated_sharded.py::test_job_of_another_world_size_is_refused_naming_both_layouts``."""

from __future__ import annotations

import pytest

pytest.importorskip("torchft")
from lightning_localsgd.federation import (decode_layout, describe_layout, encode_layout, job_layout,
                                           layout_mismatch, sizes_digest)


def fsdp_layout(group_id: str, shards: list[list[int]]) -> dict:
    return job_layout(group_id, "sharded", [(sum(n), sizes_digest(n)) for n in shards])


def test_layout_encoding_round_trips():
    layout = fsdp_layout("cluster-a", [[16, 2, 4, 1], [16, 2, 4, 0]])
    decoded = decode_layout(encode_layout(layout))
    assert decoded == layout
    assert encode_layout(layout).shape == encode_layout(fsdp_layout("b", [[1]])).shape  # one all-gather fits all


def test_same_layout_passes_and_a_different_sharding_is_named():
    a = fsdp_layout("g0", [[16, 2, 4, 1], [16, 2, 4, 0]])
    assert layout_mismatch(a, [a, fsdp_layout("g1", [[16, 2, 4, 1], [16, 2, 4, 0]])]) is None
    # the same total per rank, split differently (another auto_wrap_policy): the digest tells them apart
    b = fsdp_layout("g1", [[16, 3, 4, 0], [16, 1, 4, 1]])
    message = layout_mismatch(a, [b])
    assert message is not None and describe_layout(a) in message and describe_layout(b) in message
    assert "job 'g0': 2 rank(s) with FSDP2 shards, syncing 23+22 elements per rank" in message
    assert "job 'g1': 2 rank(s) with FSDP2 shards, syncing 23+22 elements per rank" in message


def test_other_world_size_or_strategy_is_refused():
    a = fsdp_layout("g0", [[8, 4], [8, 4]])
    one_rank = fsdp_layout("g1", [[16, 8]])
    assert "job 'g1': 1 rank(s) with FSDP2 shards, syncing 24 elements" in layout_mismatch(a, [one_rank])
    zero = job_layout("g2", "zero", [(12, sizes_digest([12])), (12, sizes_digest([12]))])
    assert "job 'g2': 2 rank(s) with ZeRO partitions" in layout_mismatch(a, [zero])


class _Work:
    def wait(self, timeout=None):
        return None


class _AloneManager:
    """torchft's Manager as a job alone at the lighthouse sees it: every quorum holds this job only."""

    _quorum_future = object()
    _quorum_id = 1

    class _pg:  # noqa: N801 (the managed process group: a one-member all-gather copies the input)
        @staticmethod
        def allgather(outputs, inputs, opts):
            outputs[0][0].copy_(inputs[0])
            return _Work()

    def start_quorum(self, timeout=None):
        pass

    def num_participants(self):
        return 1

    def participating_rank(self):
        return 0

    def should_commit(self):
        return True

    def errored(self):
        return None

    def report_error(self, err):
        raise AssertionError(err)


@pytest.mark.parametrize("ckpt_path", [None, "/runs/a/last.ckpt"])
def test_job_alone_at_start_says_where_its_state_comes_from(ckpt_path, caplog):
    import logging
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning_localsgd.syncs import HostFacts
    from lightning_localsgd.federation import Federation, TorchftCommunicator

    fed = Federation("lighthouse-host:29510", "g1", min_groups=1, sync_timeout=10)
    fed.manager = _AloneManager()
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=10))
    whole = SimpleNamespace(synced_at=0)  # the engine's sync of every parameter (engine.fragment.FragmentSync)
    engine = SimpleNamespace(cross=fed.comm, layout=SimpleNamespace(numels=[8, 1]), device="cpu", pending={},
                             num_fragments=1, whole=whole, fragments=[], fragment_syncs=[whole],
                             fragment_sync=lambda fragment: whole,
                             start_sync=lambda fragment, weight=None, stop=None: None,
                             finish_sync=lambda fragment, mix=0.0: SimpleNamespace(weight=0.0))
    fed.host = HostFacts(rank=0, world_size=1, training_state=lambda: SimpleNamespace(kind="replica"),
                         global_step=lambda: 24 if ckpt_path else 0, checkpoint_path=lambda: ckpt_path)
    with caplog.at_level(logging.INFO):
        fed.join(engine)
    source = f"its checkpoint {ckpt_path} (step 24)" if ckpt_path else "its initial weights (step 0)"
    expected = (f"local SGD: group 'g1' found no live peer at the lighthouse lighthouse-host:29510: it starts from "
                f"{source} and trains alone until other groups join (they heal from it).")
    assert fed.alone_at_start == expected
    assert [r.getMessage() for r in caplog.records if "no live peer" in r.getMessage()] == [expected]
    assert fed.attempts[-1]["committed"] and fed.attempts[-1]["participants"] == 1


class _CountingManager(_AloneManager):
    """Counts the layout all-gathers; ``_quorum_id`` is set by the test, as torchft's lighthouse would."""

    def __init__(self) -> None:
        self.gathers = 0
        manager = self

        class _pg:  # noqa: N801
            @staticmethod
            def allgather(outputs, inputs, opts):
                manager.gathers += 1
                outputs[0][0].copy_(inputs[0])
                return _Work()

        self._pg = _pg


def test_layouts_are_checked_once_per_set_of_members_and_again_after_a_failure_or_from_a_healing_peer():
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning_localsgd.engine.comm import SyncAbortedError
    from lightning_localsgd.syncs import HostFacts
    from lightning_localsgd.federation import Federation, TorchftCommunicator, _Attempt

    fed = Federation("lighthouse-host:29510", "g0", min_groups=1, sync_timeout=10)
    fed.manager = manager = _CountingManager()
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=10))
    fed.host = HostFacts(rank=0, world_size=1, training_state=lambda: None)
    fed._layout = fsdp_layout("g0", [[16, 2, 4, 1]])
    engine = SimpleNamespace(device="cpu")
    checks = []
    for quorum in (1, 1, 1, 2, 2):  # torchft's quorum id changes exactly when the members change
        manager._quorum_id = quorum
        fed._check_layouts(engine)
        checks.append(manager.gathers)
    assert checks == [1, 1, 1, 2, 2]  # one all-gather per set of members, not one per attempt
    # a failed attempt: every member's fails (a collective needs all), so each checks again at the next one
    attempt = _Attempt({"step": 3}, None, None, deadline=0.0, began=0.0, inner_steps=0)
    assert fed._failed(attempt, SyncAbortedError("the vote said no"))
    fed._check_layouts(engine)
    assert manager.gathers == 3
    fed._check_layouts(engine)
    assert manager.gathers == 3
    # a job that heals takes the id its peer recorded, so that it decides as the peer does in the same quorum
    fed._checked_quorum = None
    peer = {"layout": fed._layout, "training": {"federation": {"fragment": None, "checked_quorum": 2},
                                                "counters": {"global_step": 5}}}
    fed.host = HostFacts(rank=0, world_size=1, training_state=lambda: SimpleNamespace(load=lambda state: None))
    fed.load_state_dict(peer)
    fed._check_layouts(engine)
    assert manager.gathers == 3 and fed.healed_from_peer == 1
