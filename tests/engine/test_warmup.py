"""The warm-up step's gradient mean (engine/warmup.py) against a mean computed by hand, and the members' vote."""

from __future__ import annotations

import pytest
import torch

from lightning_localsgd.engine.comm import Communicator
from lightning_localsgd.engine.warmup import average_gradients


class PeerComm(Communicator):
    """A cross group of two seen from member 0: the reduce adds the peer's flat gradient; ``vote`` is the commit."""

    def __init__(self, peer: torch.Tensor, vote: bool = True, fail: bool = False) -> None:
        self.peer, self.vote, self.fail, self.reduced = peer, vote, fail, 0

    size = property(lambda self: 2)
    rank = property(lambda self: 0)

    def all_reduce(self, tensor, op="sum", async_op=False):
        assert op == "sum"
        self.reduced += 1
        if self.fail:
            raise ConnectionError("connection closed by peer")
        tensor.add_(self.peer)

    def all_to_all(self, output, input, async_op=False):
        raise AssertionError("the warm-up mean runs one all-reduce")

    def all_gather(self, output, input):
        raise AssertionError("the warm-up mean runs one all-reduce")

    def commit(self) -> bool:
        return self.vote


def params_with_grads():
    a, b, unused = torch.zeros(2, 3, requires_grad=True), torch.zeros(4, requires_grad=True), torch.zeros(2)
    unused.requires_grad_(True)
    a.grad, b.grad = torch.arange(6.0).view(2, 3), torch.tensor([1.0, -2.0, 3.0, -4.0])
    return [a, b, unused]


def test_committed_step_gets_the_mean_over_the_groups_and_unused_parameters_a_zero_gradient():
    params = params_with_grads()
    mine = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    peer = [torch.full_like(p, 10.0 * (i + 1)) for i, p in enumerate(params)]
    comm = PeerComm(torch.cat([g.reshape(-1) for g in peer]))
    assert average_gradients(comm, params) is True
    assert comm.reduced == 1  # one flat all-reduce for every parameter
    for p, m, o in zip(params, mine, peer):
        torch.testing.assert_close(p.grad, (m + o) / 2)


def test_a_vote_against_drops_every_gradient():
    params = params_with_grads()
    assert average_gradients(PeerComm(torch.zeros(12), vote=False), params) is False
    assert all(p.grad is None for p in params)
    params = params_with_grads()  # a failed collective of a transport that votes: the step is dropped, no raise
    assert average_gradients(PeerComm(torch.zeros(12), vote=False, fail=True), params) is False
    assert all(p.grad is None for p in params)


def test_a_failed_collective_without_a_vote_raises():
    with pytest.raises(ConnectionError, match="closed by peer"):
        average_gradients(PeerComm(torch.zeros(12), fail=True), params_with_grads())


def test_a_group_alone_keeps_its_gradients():
    class Alone(PeerComm):
        size = property(lambda self: 1)

    params = params_with_grads()
    mine = [None if p.grad is None else p.grad.clone() for p in params]
    comm = Alone(torch.zeros(12))
    assert average_gradients(comm, params) is True
    assert comm.reduced == 0
    for p, m in zip(params, mine):
        assert (p.grad is None) if m is None else torch.equal(p.grad, m)
