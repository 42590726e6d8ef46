"""One rank of a DDP job of two ranks whose background sync (``async_sync``) is driven by hand, no lighthouse: a
scripted torchft manager (tests/federation/test_retry.py's) stands for the other job (weight 1, ``θ_p``), the job's own
two ranks are a gloo world, and each rank owns one slice of the model (the engine's slice group: the world).

Inside the sync's quorum each rank posts a load to the training thread (as torchft's ``load_state_dict`` is: every rank
of a healing job gets one), rank 1's only after poll 2 while rank 0's is there from poll 1 on. torchft asks rank 0 for
its state (``state_dict``: a peer heals from it) before its load, rank 1 only after poll 4 (it picks the source job per
rank). After its last collective rank 1's background thread records its commit only after poll 6. Every poll (a step end: the same "inner step" on both
ranks first) is numbered; the rank writes ``OUT/rank{r}.pt``: the poll each request ran at, the poll the sync was
applied at, the parameters before and after, what was sent.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "federation"))
from test_retry import FakeManager  # noqa: E402

from lightning_localsgd.background import BackgroundFederation  # noqa: E402
from lightning_localsgd.engine import OuterSync  # noqa: E402
from lightning_localsgd.federation import TorchftCommunicator  # noqa: E402

POLLS = 12
#: the other job's parameters (4 elements: each rank's slice is 2) and weight
PEER, PEER_WEIGHT, WEIGHT = torch.tensor([3.0, 4.0, -1.0, 0.5]), 1.0, 3.0


class HeldAttempts(list):
    """Rank 1's records: the commit's append (after the sync's last collective) waits until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def append(self, record) -> None:
        if record.get("kind") == "sync" and record.get("committed"):
            assert self.release.wait(60), "the training thread never released the commit"
        super().append(record)


def main() -> None:
    out = Path(sys.argv[1])
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fed = BackgroundFederation("127.0.0.1:1", f"g0-r{rank}", 1, 60.0)
    fed._training_thread = threading.get_ident()
    fed.start_background_group(world)  # what start() does after torchft's manager
    fed.manager = FakeManager([(2, True)])
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=60))
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 0.0, -2.0]))
    engine = OuterSync([param], cross_group=fed.comm, slice_group=dist.group.WORLD)
    fed.engine = engine
    # the state a capture holds: the poll it ran at (Federation.state_dict's parts, the training state stubbed)
    fed._layout = {"group_id": fed.group_id}
    fed.manager._quorum_id = fed._checked_quorum = 1  # the jobs' layouts fit (no layout exchange with the script)
    fed.host = SimpleNamespace(training_state=lambda: SimpleNamespace(capture=lambda: {"rank": {}, "poll": polls[0]}))
    lo, hi = 2 * rank, 2 * rank + 2  # this rank's slice
    fed.manager._pg.others = [torch.cat([PEER_WEIGHT * PEER[lo:hi], torch.tensor([PEER_WEIGHT, 0.0])])]
    polls, loads_ran, captures_ran = [0], [], []
    asked_later = threading.Event()
    asked, release = threading.Event(), threading.Event()
    if rank == 1:
        fed.attempts = HeldAttempts(release)
    quorum = fed.manager.start_quorum

    def start_quorum(timeout=None):  # torchft asks the state callbacks inside the quorum: posted to the training thread
        if rank == 0:
            captures_ran.append(fed.state_dict()["training"]["poll"])
        if rank == 1:
            assert asked.wait(60)
        loads_ran.append(fed._training_thread_runs(lambda: polls[0]))
        if rank == 1:
            assert asked_later.wait(60)
            captures_ran.append(fed.state_dict()["training"]["poll"])
        quorum(timeout)

    fed.manager.start_quorum = start_quorum
    fed.trained = True
    sent = param.detach().clone()
    assert fed.launch(engine, weight=WEIGHT, stop=False)
    applied_at, steps = None, []
    for i in range(1, POLLS + 1):
        step = torch.full((4,), 0.01 * i)
        with torch.no_grad():
            param.add_(step)  # an inner step beside the sync (the same on both ranks, as DDP's)
        steps.append(step)
        time.sleep(0.1)  # the background threads get where they are held
        polls[0] = i
        if fed.poll(engine) is not None:
            applied_at = i
        if rank == 1 and i == 2:
            asked.set()  # rank 1's load comes after poll 2; rank 0's is there from poll 1 on
        if rank == 1 and i == 4:
            asked_later.set()  # torchft asks rank 1 for its state after poll 4
        if rank == 1 and i == 6:
            release.set()  # rank 1's commit is recorded after poll 6; rank 0's sync is done polls earlier
    torch.save({"loads_ran": loads_ran, "captures_ran": captures_ran, "applied_at": applied_at, "sent": sent,
                "final": param.detach().clone(),
                "steps": torch.stack(steps).sum(0), "snapshot": engine.snapshot[0].detach().clone(),
                "record": [a for a in fed.attempts if a["kind"] == "sync"]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
