"""SIGTERM (a scheduler's preemption) stops every rank cleanly wherever it lands, a sync included.

Lightning's own SIGTERM handler broadcasts from inside the signal handler: arriving while a rank waits in a sync, that
broadcast paired with the sync's next collective on the other rank and both ranks failed with ``SyncFailedError``
(exit code 1). Now the handler only records the signal and the ranks agree on it before the next step that ends in a
sync: every rank stops there (exit code 0), and the last checkpoint verifies.
"""

from __future__ import annotations

import pytest

from lightning_localsgd.integrity import verify

from test_failures import launch_each_rank


@pytest.mark.parametrize("term_rank", [0, 1])
@pytest.mark.slow
def test_sigterm_while_waiting_in_a_sync_stops_every_rank_cleanly(tmp_path, term_rank):
    # Sync every 4 steps. The other rank stalls 4 s at the start of step 8, so `term_rank` finishes step 8 first and
    # waits in its sync; its SIGTERM arrives 1 s after it started step 8, inside that wait. A checkpoint every 4 steps.
    other = 1 - term_rank
    ranks = launch_each_rank(tmp_path, world=2, timeout=150, sync_every=4, steps=16, stall_at=7, stall_seconds=4,
                             fault_rank=other, term_at=7, term_rank=term_rank, term_delay=1.0, ckpt_every=4,
                             sync_timeout=60)
    for r, rank in enumerate(ranks):
        log = rank["log"]
        assert f"[fault] SIGTERM to rank {term_rank}" in ranks[term_rank]["log"]
        assert rank["rc"] == 0, f"rank {r} exited with {rank['rc']}:\n{log[-3000:]}"
        assert "SyncFailedError" not in log and "Traceback" not in log, log[-3000:]
        # the sync at step 8 completed on both ranks, then both stopped before step 12, the next one that syncs
        assert f"[step] rank {r} finished step 11" in log, log[-3000:]
        assert f"[step] rank {r} finished step 12" not in log, log[-3000:]
        assert not (tmp_path / f"rank{r}.pt").exists()  # training did not run to its end
    for step in (4, 8):
        assert verify(tmp_path / "ckpt" / f"step={step}.ckpt")
    assert not (tmp_path / "ckpt" / "step=12.ckpt").exists()
