"""The rank that failed is the one named, also when global rank 0 (the host of the rendezvous store) gives up first.

The probe of issue 16: with rank 2 of 4 SIGKILLed, ranks 1 and 3 named rank 0 (rank 0 had given up first and exited,
taking the store along, while they still polled it); with rank 2 SIGSTOPped, rank 1 named [0, 2]. Now rank 0 keeps the
store up until the ranks that reached the sync have read it (bounded), a rank whose store goes away while it polls
keeps what it last read, and the exchange of the stop flag before a sync step records its own marks.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import torch.distributed as dist

from lightning_localsgd.reliability import SyncFailedError, SyncGuard

from test_failures import launch_each_rank


def _guard(rank: int, store, world: int = 3, timeout: float = 2.0) -> SyncGuard:
    return SyncGuard(timeout=timeout, groups=[], rank=rank, world_size=world, store=store)


def _fail(guard: SyncGuard, step: int, before_step: bool = False) -> SyncFailedError:
    with pytest.raises(SyncFailedError) as exc:
        with guard.sync(step, before_step=before_step):
            raise RuntimeError("Connection closed by peer")
    return exc.value


class LeavingStore:
    """A store whose host exits after ``checks`` calls of ``check`` (every later call fails, as a closed TCPStore)."""

    def __init__(self, store: dist.Store, checks: int) -> None:
        self.store, self.checks = store, checks

    def _gone(self) -> None:
        if self.checks <= 0:
            raise RuntimeError("Broken pipe: the store's host is gone")

    def set(self, *a):
        self._gone()
        return self.store.set(*a)

    def check(self, keys):
        self._gone()
        self.checks -= 1
        return self.store.check(keys)

    def get(self, key):
        self._gone()
        return self.store.get(key)

    def multi_get(self, keys):
        self._gone()
        return self.store.multi_get(keys)


def test_a_store_that_leaves_while_polling_keeps_the_ranks_it_showed_missing():
    store = dist.HashStore()
    for r in (0, 1):
        _guard(r, store)._mark(8)  # ranks 0 and 1 reached the sync of step 8, rank 2 did not
    # one read of the 3 marks takes 4 checks (all keys, then each): the host leaves during the second read
    err = _fail(_guard(1, LeavingStore(store, checks=6)), 8)
    assert err.missing_ranks == [2], str(err)
    assert "rank(s) [2] did not reach it" in str(err) and "global rank 0 is gone" not in str(err)


@pytest.mark.slow
def test_the_store_host_waits_until_the_others_have_read_who_is_missing():
    store = dist.HashStore()
    guards = [_guard(r, store, timeout=1.0) for r in range(3)]
    guards[0]._hosts_store = lambda: True  # rank 0 hosts the store (in a real run: the default store of rank 0)
    for g in guards[:2]:
        g._mark(8)
    read_at: list[float] = []

    def rank_1_fails_later() -> None:
        time.sleep(1.5)
        err = _fail(guards[1], 8)
        read_at.append(time.monotonic())
        assert err.missing_ranks == [2]

    late = threading.Thread(target=rank_1_fails_later)
    start = time.monotonic()
    late.start()
    err = _fail(guards[0], 8)
    returned = time.monotonic()
    late.join()
    assert err.missing_ranks == [2]
    # rank 0 polled until its deadline (1 s), then kept the store up for rank 1, which read it 1.5 s in
    assert read_at and returned >= read_at[0] - 0.3, (returned - start, read_at[0] - start)
    assert returned - start < 10


@pytest.mark.slow
def test_the_stop_flag_exchange_names_the_ranks_that_did_not_start_the_step():
    store = dist.HashStore()
    guards = [_guard(r, store) for r in range(3)]
    for g in guards:
        with g.sync(4):
            pass
    guards[1]._mark(8, key="local_sgd/started_step/{rank}")
    err = _fail(guards[0], 8, before_step=True)
    assert err.missing_ranks == [2] and "rank 2: last sync at step 4" in str(err), str(err)
    # a rank that started step 8 but then hangs is named at the sync of step 8, not taken as present
    err = _fail(guards[0], 8)
    assert err.missing_ranks == [1, 2], str(err)


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
@pytest.mark.slow
def test_every_survivor_of_four_names_rank_2(tmp_path, fault):
    # 4 ranks, a sync every 4 steps; rank 2 is SIGKILLed / SIGSTOPped at the start of step 6 (mid-interval). Ranks 0, 1
    # and 3 stop at the next sync-step (step 8), each naming rank 2 alone.
    at = {"die_at": 5} if fault == "sigkill" else {"freeze_at": 5}
    ranks = launch_each_rank(tmp_path, world=4, timeout=150, frozen=(2,) if fault == "sigstop" else (),
                             sync_every=4, steps=10, fault_rank=2, sync_timeout=4.0, **at)
    if fault == "sigkill":
        assert ranks[2]["rc"] == -signal.SIGKILL
    for r in (0, 1, 3):
        log = ranks[r]["log"]
        assert ranks[r]["rc"] not in (0, None), log[-3000:]
        named = re.findall(r"local SGD sync at step 8 failed on rank \d: rank\(s\) (\[[\d, ]*\]) did not reach it", log)
        assert named == ["[2]"], f"rank {r}:\n{log[-3000:]}"
        assert "rank 2: last sync at step 4" in log, log[-3000:]
