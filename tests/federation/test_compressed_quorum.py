"""Compressed syncs over a changing membership, without processes: the torchft communicator's all-to-all and
all-gather over a scripted manager, and the weighted two-phase compressed mean over members run as threads of this
process (a communicator whose collectives meet at a barrier), against the mean written out by hand."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch

from lightning_localsgd.engine import OuterSync
from lightning_localsgd.engine.codecs import payload_bytes
from lightning_localsgd.engine.comm import Communicator, SyncAbortedError
from lightning_localsgd.federation import TorchftCommunicator
from reference import weighted_compressed_sync as hand_weighted

N = 300  # two int8 blocks of 256, the second one partial


class _Work:
    def __init__(self, error=None):
        self.error = error

    def wait(self, timeout=None):
        if self.error is not None:
            raise self.error
        return True


class PeerPG:
    """torchft's managed process group as seen by member ``rank`` of two; ``peer`` is the other member's input."""

    def __init__(self, rank: int, peer: torch.Tensor) -> None:
        self.rank, self.peer, self.fail = rank, peer, None
        self.calls: list[tuple] = []

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        self.calls.append(("alltoall_base", output_split_sizes, input_split_sizes))
        half = input.numel() // 2
        lo, hi = self.rank * half, (self.rank + 1) * half
        mine, theirs = input[lo:hi], self.peer[lo:hi]
        output.copy_(torch.cat([mine, theirs] if self.rank == 0 else [theirs, mine]))
        return _Work(self.fail)

    def allgather(self, output_lists, input_list, opts):
        self.calls.append(("allgather", len(output_lists[0])))
        values = [input_list[0], self.peer] if self.rank == 0 else [self.peer, input_list[0]]
        for out, value in zip(output_lists[0], values):
            out.copy_(value)
        return _Work(self.fail)


class PeerManager:
    def __init__(self, pg: PeerPG) -> None:
        self._pg, self._quorum_future, self._errored = pg, object(), None

    def num_participants(self):
        return 2

    def participating_rank(self):
        return self._pg.rank

    def report_error(self, err):
        self._errored = err

    def errored(self):
        return self._errored

    def should_commit(self):
        return self._errored is None


@pytest.mark.parametrize("rank", [0, 1])
def test_torchft_communicator_all_to_all_and_all_gather_in_member_order(rank):
    peer = torch.arange(100, 108, dtype=torch.uint8)
    pg = PeerPG(rank, peer)
    comm = TorchftCommunicator(PeerManager(pg), timedelta(seconds=5))
    assert (comm.size, comm.rank) == (2, rank)
    mine = torch.arange(0, 8, dtype=torch.uint8)
    out = torch.empty(8, dtype=torch.uint8)
    work = comm.all_to_all(out, mine, async_op=True)
    work.wait()
    halves = [mine[rank * 4 : rank * 4 + 4], peer[rank * 4 : rank * 4 + 4]]
    assert torch.equal(out, torch.cat(halves if rank == 0 else halves[::-1]))  # member j's j-th chunk, in order
    gathered = torch.empty(16, dtype=torch.uint8)
    comm.all_gather(gathered, mine)
    assert torch.equal(gathered, torch.cat([mine, peer] if rank == 0 else [peer, mine]))
    assert pg.calls == [("alltoall_base", [], []), ("allgather", 2)]  # equal splits; one view per member
    assert comm.commit()


def test_torchft_communicator_failed_all_to_all_and_all_gather_reach_the_vote():
    for collective in ("all_to_all", "all_gather"):
        pg = PeerPG(0, torch.zeros(8, dtype=torch.uint8))
        pg.fail = ConnectionError("Connection closed by peer")
        comm = TorchftCommunicator(PeerManager(pg), timedelta(seconds=5))
        with pytest.raises(ConnectionError, match="by peer"):
            x = torch.zeros(8, dtype=torch.uint8)
            if collective == "all_to_all":
                comm.all_to_all(torch.empty_like(x), x)
            else:
                comm.all_gather(torch.empty(16, dtype=torch.uint8), x)
        assert not comm.commit(), collective  # reported to the manager: the vote says no


class ThreadGroup:
    """Members that are threads of this process; every collective meets at a barrier."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=30), [None] * size


class ThreadComm(Communicator):
    def __init__(self, group: ThreadGroup, rank: int, vote: bool = True) -> None:
        self.group, self._rank, self.vote = group, rank, vote

    @property
    def size(self):
        return self.group.size

    @property
    def rank(self):
        return self._rank

    def _exchange(self, tensor):
        self.group.slots[self._rank] = tensor.clone()
        self.group.barrier.wait()
        values = list(self.group.slots)
        self.group.barrier.wait()
        return values

    def all_reduce(self, tensor, op="sum", async_op=False):
        values = self._exchange(tensor)
        tensor.copy_(torch.stack(values).sum(0) if op == "sum" else torch.stack(values).amax(0))
        return _Work() if async_op else None

    def all_to_all(self, output, input, async_op=False):
        values = self._exchange(input)
        chunk = input.numel() // self.size
        output.copy_(torch.cat([v[self._rank * chunk : (self._rank + 1) * chunk] for v in values]))
        return _Work() if async_op else None

    def all_gather(self, output, input):
        output.copy_(torch.cat(self._exchange(input)))

    def commit(self):
        return self.vote


def run_members(engines, fn):
    """``fn(rank, engine)`` on every member at once (threads); returns their results, raises their errors."""
    results, errors = [None] * len(engines), []

    def run(r):
        try:
            results[r] = fn(r, engines[r])
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def members(size, theta, codec="int8", votes=None):
    group = ThreadGroup(size)
    engines = []
    for r in range(size):
        param = torch.nn.Parameter(theta.clone())
        engines.append(OuterSync([param], cross_group=ThreadComm(group, r, (votes or [True] * size)[r]),
                                 compression=codec))
    return engines


def test_weighted_compressed_mean_matches_the_hand_computation_and_a_weight_0_member_keeps_its_error():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(N, generator=g)
    engines = members(2, theta)
    errors, mean_errors = [torch.zeros(N), torch.zeros(N)], [None, None]
    for sync, weights in enumerate([(3.0, 1.0), (1.0, 0.0), (2.0, 2.0)]):  # (1, 0): member 1 just joined
        locals_ = [theta + 0.01 * torch.randn(N, generator=g) for _ in engines]
        for e, x in zip(engines, locals_):
            e.tensors[0].data.copy_(x)
        before = [e.compressor.error.clone() if e.compressor.error is not None else torch.zeros(N) for e in engines]
        run_members(engines, lambda r, e: e.sync(weight=weights[r]))
        theta, errors, mean_errors = hand_weighted(theta, locals_, weights, errors, mean_errors)
        for r, e in enumerate(engines):
            assert float((e.snapshot[0].detach() - theta).abs().max()) < 1e-6, (sync, r)
            assert float((e.compressor.error - errors[r]).abs().max()) < 1e-6, (sync, r)
            assert float((e.whole.mean_error - mean_errors[r]).abs().max()) < 1e-6, (sync, r)
        if weights[1] == 0:
            assert torch.equal(engines[1].compressor.error, before[1])  # weight 0: its residual untouched
    assert float(errors[0].abs().max()) > 0  # the codec lost something that was fed back


def test_weights_ride_with_the_chunks_and_no_member_weighing_in_leaves_theta_g():
    theta = torch.linspace(-1, 1, N)
    engines = members(2, theta)
    for e in engines:
        e.tensors[0].data.add_(0.5)
    run_members(engines, lambda r, e: e.sync(weight=0.0))  # e.g. every group just joined, or resumed mid-interval
    for e in engines:
        # θ_g as it was, and no mean to adopt: the parameters keep their own values (their inner progress)
        assert torch.equal(e.snapshot[0].detach(), theta) and torch.equal(e.tensors[0].detach(), theta + 0.5)
        assert e.whole.mean_error is None and float(e.compressor.error.abs().max()) == 0.0
    # a stop flag rides with them too; every member learns that one asked
    results = run_members(engines, lambda r, e: e.sync(weight=1.0, stop=r == 1))
    assert all(res.stop_requested for res in results)


def test_phase_2_error_feedback_of_another_membership_is_dropped():
    """The residual a member keeps is that of the mean chunk it encoded; when its index among the members (or their
    number) changes it would land on another chunk: it is dropped, and the sync equals the hand computation with
    none."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(N, generator=g)
    engines = members(2, theta)
    locals_ = [theta + 0.01 * torch.randn(N, generator=g) for _ in engines]
    for e, x in zip(engines, locals_):
        e.tensors[0].data.copy_(x)
    run_members(engines, lambda r, e: e.sync(weight=1.0))
    theta, errors, _ = hand_weighted(theta, locals_, [1.0, 1.0], [torch.zeros(N)] * 2, [None, None])
    assert all(e.whole.mean_error is not None for e in engines)
    # the next quorum orders the two members the other way round
    engines = engines[::-1]
    errors = errors[::-1]
    for r, e in enumerate(engines):
        e.cross._rank = r
    locals_ = [theta + 0.01 * torch.randn(N, generator=g) for _ in engines]
    for e, x in zip(engines, locals_):
        e.tensors[0].data.copy_(x)
    run_members(engines, lambda r, e: e.sync(weight=1.0))
    theta, _, mean_errors = hand_weighted(theta, locals_, [1.0, 1.0], errors, [None, None])
    for r, e in enumerate(engines):
        assert float((e.snapshot[0].detach() - theta).abs().max()) < 1e-6
        assert float((e.whole.mean_error - mean_errors[r]).abs().max()) < 1e-6
        assert e.whole.mean_error_owner == (2, r)


def test_aborted_commit_leaves_theta_g_and_both_error_feedbacks_as_they_were():
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(N, generator=g)
    engines = members(2, theta)
    for e in engines:
        e.tensors[0].data.add_(0.01 * torch.randn(N, generator=g))
    run_members(engines, lambda r, e: e.sync(weight=1.0))  # a committed sync: some error feedback to keep
    kept = [(e.snapshot[0].detach().clone(), e.compressor.error.clone(), e.whole.mean_error.clone())
            for e in engines]
    for e in engines:
        e.tensors[0].data.add_(0.01 * torch.randn(N, generator=g))
        e.cross.vote = False  # e.g. a rank of this job failed: the quorum's vote says no

    def aborted(r, e):
        with pytest.raises(SyncAbortedError):
            e.sync(weight=1.0)

    run_members(engines, aborted)
    for e, (snap, error, mean_error) in zip(engines, kept):
        assert torch.equal(e.snapshot[0].detach(), snap)
        assert torch.equal(e.compressor.error, error) and torch.equal(e.whole.mean_error, mean_error)
        assert not e.pending


def test_healing_state_sends_no_error_feedback_and_names_the_fragment_of_the_quorum():
    """What a live peer sends a joining group: its training state without its error feedback (the joiner starts
    from zero), and which fragment this quorum syncs (the joiner takes part in that one)."""
    from types import SimpleNamespace

    from lightning_localsgd.syncs import HostFacts
    from lightning_localsgd.federation import Federation

    engine = members(1, torch.zeros(N))[0]
    engine.tensors[0].data.add_(torch.linspace(-1, 1, N))
    engine.sync(weight=1.0)  # alone: the codec's residuals are kept all the same
    assert float(engine.compressor.error.abs().max()) > 0 and engine.whole.mean_error is not None
    def capture():
        return {"kind": "replica", "group": {}, "rank": {"outer": engine.state_dict(), "cluster": None},
                "counters": {}}

    fed = Federation("127.0.0.1:1", "g0", 1, 30.0)
    fed.host = HostFacts(rank=0, world_size=1, training_state=lambda: SimpleNamespace(capture=capture))
    fed._unit = 1  # this rank is starting fragment 1's sync
    fed._layout = {"group_id": "g0", "kind": "replica", "world_size": 1, "elements": [N], "digest": 0}  # from the join
    sent = fed.state_dict()
    assert sent["layout"] == fed._layout  # the peer compares it before loading anything
    state = sent["training"]
    outer = state["rank"]["outer"]
    assert outer["compression_error"] is None and outer["compression_mean_error"] == {}
    assert torch.equal(outer["snapshot"][0], engine.snapshot[0].detach())  # θ_g itself is sent
    # no layout checked yet in this test (the data record travels with the controller's counters since data_shares:
    # tests/federation/test_data_departure.py checks it goes into a checkpoint and comes back)
    assert state["federation"] == {"fragment": 1, "checked_quorum": None}
    joiner = members(1, torch.zeros(N))[0]
    joiner.compressor.error = torch.ones(N)  # whatever a restarted job had
    joiner.load_state_dict(outer)
    assert joiner.compressor.error is None and joiner.whole.mean_error is None  # zero error feedback


def test_sparse_all_gather_over_a_changing_membership_matches_the_hand_computation():
    """topk's all-gather exchange over quorums that change: a member of weight 0 (just joined) keeps its residual,
    the members' order reverses (each residual stays with its member: there is no mean chunk to own), a third member
    joins healed (zero error feedback) and an aborted commit leaves θ_g and every residual as they were. Every sync
    equals the hand computation bit for bit (each member's payload decoded and summed in member order)."""
    from reference import gathered_compressed_sync
    from workers.tiny import TOPK_TEST

    g = torch.Generator().manual_seed(3)
    theta = torch.randn(N, generator=g)
    engines = members(2, theta, codec=TOPK_TEST)
    errors = [torch.zeros(N), torch.zeros(N)]

    def sync(weights):
        nonlocal theta, errors
        locals_ = [theta + 0.01 * torch.randn(N, generator=g) for _ in engines]
        for e, x in zip(engines, locals_):
            e.tensors[0].data.copy_(x)
        before = [e.compressor.error.clone() if e.compressor.error is not None else None for e in engines]
        results = run_members(engines, lambda r, e: e.sync(weight=weights[r]))
        theta, errors = gathered_compressed_sync(theta, locals_, list(weights), errors, TOPK_TEST)
        for r, e in enumerate(engines):
            assert torch.equal(e.snapshot[0].detach(), theta) and torch.equal(e.compressor.error, errors[r]), r
            assert e.whole.mean_error is None and results[r].bytes_sent == payload_bytes(TOPK_TEST, N) + 4
            if weights[r] == 0:
                assert before[r] is None or torch.equal(e.compressor.error, before[r])  # its residual untouched

    sync((3.0, 1.0))
    sync((1.0, 0.0))
    engines, errors = engines[::-1], errors[::-1]  # the next quorum orders the two members the other way round
    for r, e in enumerate(engines):
        e.cross._rank = r
    sync((1.0, 2.0))
    # a third member joins: healed from a live peer's state, which carries no error feedback
    joiner = members(1, torch.zeros(N), codec=TOPK_TEST)[0]
    joiner.load_state_dict({**engines[0].state_dict(), "compression_error": None})
    assert joiner.compressor.error is None
    group = ThreadGroup(3)
    engines = engines + [joiner]
    for r, e in enumerate(engines):
        e.cross.group, e.cross._rank = group, r
    errors = errors + [torch.zeros(N)]
    sync((1.0, 1.0, 0.0))  # its first sync: weight 0 (it trained no interval)
    sync((2.0, 1.0, 1.0))
    assert all(float(e.abs().max()) > 0 for e in errors)
    kept = [(e.snapshot[0].detach().clone(), e.compressor.error.clone()) for e in engines]
    for e in engines:
        e.tensors[0].data.add_(0.01 * torch.randn(N, generator=g))
        e.cross.vote = False

    def aborted(r, e):
        with pytest.raises(SyncAbortedError):
            e.sync(weight=1.0)

    run_members(engines, aborted)
    for e, (snap, error) in zip(engines, kept):
        assert torch.equal(e.snapshot[0].detach(), snap) and torch.equal(e.compressor.error, error)
