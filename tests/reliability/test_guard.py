"""SyncGuard's report, in one process with an in-memory store: who is named, and when."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from lightning_localsgd.reliability import SyncFailedError, SyncGuard


def _guard(rank: int = 0, world: int = 3, timeout: float | None = 1.0, store=None) -> SyncGuard:
    return SyncGuard(timeout=timeout, groups=[], rank=rank, world_size=world,
                     store=store if store is not None else dist.HashStore())


def _fail(guard: SyncGuard, step: int, message: str = "Connection closed by peer") -> SyncFailedError:
    with pytest.raises(SyncFailedError) as exc:
        with guard.sync(step):
            raise RuntimeError(message)
    return exc.value


def test_names_the_rank_that_did_not_reach_the_sync():
    store = dist.HashStore()
    guards = [_guard(r, store=store) for r in range(3)]
    for g in guards:
        with g.sync(4):
            pass  # a good sync at step 4: every rank recorded it
    guards[2]._mark(8)
    err = _fail(guards[0], 8)
    assert err.step == 8 and err.rank == 0 and err.missing_ranks == [1]
    assert "local SGD sync at step 8 failed on rank 0: rank(s) [1] did not reach it" in str(err)
    assert "rank 1: last sync at step 4" in str(err) and "Cause: RuntimeError: Connection closed by peer" in str(err)
    assert isinstance(err.__cause__, RuntimeError)


def test_a_late_but_live_rank_is_not_named():
    store = dist.HashStore()
    guards = [_guard(r, world=2, timeout=5.0, store=store) for r in range(2)]
    # rank 1 arrives 0.5 s late, then sees the failure too (a live rank reports it)
    late = threading.Timer(0.5, lambda: _fail(guards[1], 8))
    late.start()
    start = time.monotonic()
    err = _fail(guards[0], 8)
    late.join()
    assert err.missing_ranks == [] and "every rank reached it, then its communication failed" in str(err)
    assert time.monotonic() - start < 4  # stopped waiting as soon as everyone was there


@pytest.mark.slow
def test_a_rank_that_dies_inside_the_sync_is_named():
    # Every rank reached the sync of step 8; rank 2 then died in it (it never reports the failure), rank 1 reports it.
    store = dist.HashStore()
    guards = [_guard(r, world=3, timeout=1.0, store=store) for r in range(3)]
    guards[2]._mark(8)
    other = threading.Thread(target=lambda: _fail(guards[1], 8))
    other.start()
    start = time.monotonic()
    err = _fail(guards[0], 8)
    other.join()
    assert err.missing_ranks == [2], str(err)
    assert "every rank reached it, then rank(s) [2] stopped answering during the sync" in str(err)
    assert time.monotonic() - start < 1.0 + 5.0 + 1.5  # the sync's deadline + the time to report, + slack


def test_timeout_wording_and_no_wait_after_the_deadline():
    guard = _guard(world=2, timeout=0.2)
    start = time.monotonic()
    err = _fail(guard, 8, "Timed out waiting 200ms for recv operation to complete")
    assert time.monotonic() - start < 2
    assert "rank(s) [1] did not reach it within sync_timeout=0.2 s" in str(err)
    assert "rank 1: no sync reached" in str(err)


def test_unreachable_store_names_rank_0():
    class GoneStore:
        def set(self, *a):
            raise RuntimeError("Broken pipe")

        check = get = set

    err = _fail(_guard(rank=1, world=2, store=GoneStore()), 8)
    assert err.missing_ranks == [0]
    assert "global rank 0 is gone: the rendezvous store it hosts at" in str(err) and "Broken pipe" in str(err)


def test_other_errors_pass_through_unchanged():
    guard = _guard()
    with pytest.raises(FloatingPointError):
        with guard.sync(4):
            raise FloatingPointError("nan")  # the non-finite check has its own error
    with guard.sync(5):
        pass  # and a good sync raises nothing
