"""The federated sync loop without processes: a scripted stand-in for torchft's Manager and its process group.

What torchft would report is scripted (a collective that fails, a commit vote that says no, the quorum each attempt
gets); the engine, the communicator and the retry loop are the library's. Reference: the mean over the groups of the
successful attempt, written out here.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from lightning_localsgd.engine import OuterSync
from lightning_localsgd.federation import Federation, TorchftCommunicator


class _Work:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def wait(self, timeout=None):
        if self.error is not None:
            raise self.error
        return True


class FakePG:
    """Adds the other groups' values (``others``) in an all-reduce; ``fail`` makes the next one fail in ``wait``."""

    def __init__(self) -> None:
        self.others: list[torch.Tensor] = []
        self.fail: Exception | None = None
        self.calls = 0

    def allreduce(self, tensors, opts):
        self.calls += 1
        if self.fail is None:
            for other in self.others:
                tensors[0].add_(other[: tensors[0].numel()])
        error, self.fail = self.fail, None
        return _Work(error)


class FakeManager:
    """Each ``start_quorum`` takes the next ``(participants, vote)`` of ``script`` (the last one repeats)."""

    def __init__(self, script: list[tuple[int, bool]]) -> None:
        self.script = list(script)
        self._pg = FakePG()
        self._quorum_future = object()
        self._errored: Exception | None = None
        self.participants, self.vote = 0, True  # before the first quorum, as torchft reports it
        self.votes: list[bool] = []
        self.snapshots_at_quorum: list[torch.Tensor] = []
        self.engine: OuterSync | None = None

    def start_quorum(self, timeout=None):
        self._errored = None
        self.participants, self.vote = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if self.engine is not None:
            self.snapshots_at_quorum.append(self.engine.snapshot[0].detach().clone())

    def num_participants(self):
        return self.participants

    def participating_rank(self):
        return 0

    def report_error(self, err):
        self._errored = err

    def errored(self):
        return self._errored

    def should_commit(self):
        vote = self.vote and self._errored is None
        self.votes.append(vote)
        return vote


def federation(script, timeout=30.0):
    fed = Federation("127.0.0.1:1", "g0", 1, timeout)
    fed.manager = FakeManager(script)
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=timeout))
    return fed


def engine(fed, values):
    param = torch.nn.Parameter(torch.tensor(values))
    sync = OuterSync([param], cross_group=fed.comm)
    fed.manager.engine = sync
    return param, sync


def test_collective_failing_mid_sync_leaves_theta_g_untouched_and_is_redone_with_the_groups_left():
    fed = federation([(3, True), (2, True)])  # attempt 1: three groups, one dies inside it; attempt 2: two left
    param, sync = engine(fed, [0.0, 0.0])
    with torch.no_grad():
        param.copy_(torch.tensor([1.0, 2.0]))  # θ_i after the interval; θ_g = 0
    fed.manager._pg.fail = ConnectionError("Connection reset by peer")
    fed.manager._pg.others = [torch.tensor([3.0, 4.0, 1.0])]  # the surviving peer's θ_i and weight 1
    fed.trained = True
    result = fed.sync(sync)
    assert fed.manager.votes == [False, True]  # the failure reached the vote, the redo committed
    assert torch.equal(fed.manager.snapshots_at_quorum[1], torch.zeros(2))  # θ_g untouched by the failed attempt
    assert [a["committed"] for a in fed.attempts] == [False, True]
    assert "Connection reset" in fed.attempts[0]["error"]
    expected = torch.tensor([(1.0 + 3.0) / 2, (2.0 + 4.0) / 2])  # mean over this group and the survivor
    assert torch.equal(sync.snapshot[0].detach(), expected) and torch.equal(param.detach(), expected)
    assert not result.skipped and sync.num_syncs == 1 and fed.trained is False


def test_commit_vote_against_aborts_before_anything_is_written():
    fed = federation([(2, False), (1, True)])  # e.g. another rank of this job failed: the vote says no
    param, sync = engine(fed, [0.0])
    with torch.no_grad():
        param.fill_(5.0)
    fed.manager._pg.others = [torch.tensor([7.0, 1.0])]
    fed.trained = True
    fed.sync(sync)
    assert fed.manager.votes == [False, True]
    assert torch.equal(fed.manager.snapshots_at_quorum[1], torch.zeros(1))  # nothing written by the aborted attempt
    assert "aborted" in fed.attempts[0]["error"]
    assert float(sync.snapshot[0]) == 5.0  # the redo alone (one group): its own θ_i
    assert sync.num_syncs == 1


def test_joining_group_weighs_zero():
    fed = federation([(2, True)])
    param, sync = engine(fed, [1.0])
    fed.manager._pg.others = [torch.tensor([3.0, 1.0])]  # the running peer: θ_i = 3, weight 1
    fed.join(sync)  # not trained: weight 0, so the mean is the peer's alone
    assert fed.attempts[0]["weight"] == 0.0 and float(sync.snapshot[0]) == 3.0 and float(param) == 3.0


def test_sync_that_never_succeeds_raises_within_sync_timeout():
    fed = federation([(2, False)], timeout=0.3)
    _, sync = engine(fed, [0.0])
    with pytest.raises(TimeoutError, match=r"did not succeed within sync_timeout=0.3 s.*min_groups=1"):
        fed.sync(sync)
    assert len(fed.attempts) > 1 and not any(a["committed"] for a in fed.attempts)


def test_a_bug_inside_a_sync_is_raised_not_retried():
    fed = federation([(1, True)] * 3)
    _, sync = engine(fed, [0.0])
    sync.reducer.start = lambda *a, **k: (_ for _ in ()).throw(KeyError("bug"))
    with pytest.raises(KeyError, match="bug"):
        fed.sync(sync)


def test_quorum_of_joiners_only_takes_no_outer_step():
    """Every group weighs 0 (e.g. a job resumed alone from its checkpoint): DiLoCo's momentum must not move θ_g."""
    from lightning_localsgd.engine.presets import resolve_outer_optimizer

    fed = federation([(1, True)])
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sync = OuterSync([param], outer_optimizer=resolve_outer_optimizer("diloco"), cross_group=fed.comm)
    fed.manager.engine = sync
    sync.snapshot[0].grad = torch.tensor([0.5, -0.5])
    sync.outer_optimizer.step()  # momentum from an earlier sync
    sync.snapshot[0].grad = None
    before = sync.snapshot[0].detach().clone()
    momentum = sync.outer_optimizer.state[sync.snapshot[0]]["momentum_buffer"].clone()
    fed.join(sync)
    # θ_g as it was; the parameters keep their own values (a job resumed mid-interval keeps its inner progress)
    assert torch.equal(sync.snapshot[0].detach(), before) and torch.equal(param.detach(), torch.tensor([1.0, 2.0]))
    assert not torch.equal(before, torch.tensor([1.0, 2.0]))
    assert torch.equal(sync.outer_optimizer.state[sync.snapshot[0]]["momentum_buffer"], momentum)
