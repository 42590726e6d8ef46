"""A stop signal (SIGTERM: SLURM preemption, ``kill``, a scheduler) under local SGD: every rank stops at one step.

Lightning (>= 2.5) makes a SIGTERM stop every rank of a run together in two places, and both clash with local SGD:

* its signal handler broadcasts a flag from rank 0 *inside the handler*. Python runs the handler when the rank is back
  in Python after the signal, e.g. between two collectives of a sync; the broadcast then pairs with the sync's next
  collective on the other ranks and the sync fails on every rank (``SyncFailedError``, exit code 1) instead of
  stopping cleanly;
* its training loop broadcasts the flag before every batch: one latency-bound collective per step across the slow
  links, the very cost local SGD removes.

:func:`stop_at_sync_steps` replaces both, on the ranks of a run with more than one worker group:

* the handler only records the signal (and forwards it to the ranks this process launched, as Lightning does): no
  collective, so a signal is harmless wherever it lands, in a sync included. It is recorded aside, not in
  ``trainer.received_sigterm``: Lightning stops a rank that has that flag at the end of an epoch on its own, which
  would leave the other ranks waiting at their next sync;
* before a step that crosses groups anyway (the schedule's ``communicates_next``: a step ending in a sync, a warm-up
  step), every rank all-reduces its flag (MAX): a SIGTERM on *any* rank stops every rank before the same step with
  Lightning's ``SIGTERMException`` (exit code 0), at most ``sync_every`` steps after it arrived. At a step ending in a
  sync the exchange runs under the sync guard: a rank that is gone or hangs is named there as at the sync itself
  (:class:`~lightning_localsgd.reliability.SyncFailedError`, within ``sync_timeout``), not silently ignored;
* time-based sync (groups take different numbers of steps): the flag rides on the next timed sync (its stop flag),
  and every group then ends training normally (its last checkpoint and ``on_train_end`` run). The strategy reads
  :attr:`SigtermStop.received` in its ``wants_to_stop()`` (:class:`~lightning_localsgd.controller.SyncHost`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from ._compat import (clear_sigterm_notifier, set_sigterm_broadcast, set_sigterm_notifier, sigterm_broadcast,
                      signal_connector)
from .controller import LocalSGDController

__all__ = ["SigtermStop", "stop_at_sync_steps"]

log = logging.getLogger(__name__)


class SigtermStop:
    """The SIGTERM handling installed for one ``fit``: whether a signal arrived on this rank, and its removal."""

    def __init__(self) -> None:
        self.received = False
        """Set by the signal handler (this rank only; every rank learns it at the next step that crosses groups)."""
        self._remove: Callable[[], None] = _nothing

    def remove(self) -> None:
        """Put Lightning's own handling back (once)."""
        remove, self._remove = self._remove, _nothing
        remove()


def stop_at_sync_steps(trainer: Trainer, controller: LocalSGDController) -> SigtermStop:
    """Install the SIGTERM handling described above for ``trainer``; return its handle (:class:`SigtermStop`).

    Call it in the strategy's setup: Lightning registers its signal handlers after the strategy's setup and takes the
    handler from its connector then.
    """
    connector = signal_connector(trainer)
    loop = trainer.fit_loop.epoch_loop
    original = sigterm_broadcast(loop)

    handling = SigtermStop()  # .received: set by the handler; trainer.received_sigterm only once every rank knows

    def record_signal(signum: Any, _frame: Any) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.local_rank))
        if not handling.received and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the ranks this process started get it too
        handling.received = True

    def agree_at_sync_steps() -> None:
        schedule = controller.schedule
        if not (schedule.lockstep and schedule.communicates_next()):
            return
        step = schedule.steps_done + 1
        guard = controller.guard if not schedule.in_warmup else None  # sync_timeout applies to syncs only
        flag = torch.tensor([1.0 if handling.received else 0.0], device=trainer.strategy.root_device)
        with guard.sync(step, before_step=True) if guard is not None else nullcontext():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            connector.received_sigterm = True
            raise SIGTERMException()

    if original is None:  # Lightning < 2.5 exchanges no stop flag: its own handling (no collective) stays
        return handling
    set_sigterm_notifier(connector, record_signal)  # (an instance attribute: Lightning's bound method stays intact)
    set_sigterm_broadcast(loop, agree_at_sync_steps)

    def remove() -> None:
        clear_sigterm_notifier(connector)
        set_sigterm_broadcast(loop, original)

    handling._remove = remove
    return handling


def _nothing() -> None:
    return None

