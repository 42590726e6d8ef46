"""The one interface every peer's adapter implements, and the parts of the benchmark built on it alone.

A :class:`Peer` is one library family (ours, torch's averagers, accelerate, torchft) used the way its own
documentation uses it. It names its implementations of the sync per mode (:attr:`Peer.sync_impls`, the first of
ours is the reference of a mode) and its training runs (:attr:`Peer.train_runs`), and builds, on the rank side:

* :meth:`Peer.sync_impl`: one implementation's sync alone on a copy of the model (part 1, ``sync``);
* :meth:`Peer.loop`: what a plain training loop needs to run with that implementation (part 2, ``train``; the
  resume try of part 4), as a :class:`Loop`;
* :meth:`Peer.features`: every feature of ``FEATURES`` tried by code (part 4, ``features``).

:class:`PlainPeer` (a loop that can be saved, rebuilt and resumed), :func:`try_resume_plain`, :func:`try_dead_peer`
and :func:`bounded_try` are the feature tries shared by several peers.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .common import flat_params, make_model, max_diff, optimizers

#: The features part 4 tries on every peer, in the report's order.
FEATURES = ["DiLoCo outer step", "exact resume mid-interval", "synchronous warm-up", "compressed sync on CPU",
            "streaming (fragments)", "token-weighted mean (uneven workers)", "dead-peer handling", "FSDP groups"]

#: ``add(feature, implementation, try)``: runs one feature try and records its (result, detail).
AddTry = Callable[[str, str, Callable[[], tuple[str, str]]], None]


class SyncImpl:
    """One implementation's sync on its own copy of the model: ``run()`` syncs once; bytes / state counted."""

    def __init__(self, name: str, model: Any, run: Callable[[], Any], state: Callable[[], int], where: str,
                 manager: Any = None) -> None:
        self.name, self.model, self.run, self.state, self.where, self.manager = name, model, run, state, where, manager


@dataclass
class Loop:
    """What a plain training loop runs with one implementation: ``forward`` and ``opt`` (the peer may wrap the model
    and the optimizer), ``step_hook`` after every optimizer step, ``ctx`` entered around the loop (exited at its end
    when ``exit_ctx``), ``state()`` = the implementation's outer-state bytes, ``manager`` = torchft's, if any."""

    forward: Any
    opt: Any
    step_hook: Callable[[], Any] = lambda: None
    ctx: Any = None
    state: Callable[[], int] = lambda: 0
    manager: Any = None
    exit_ctx: bool = True
    extra: dict = field(default_factory=dict)


class Peer:
    """One peer family behind the benchmark's interface (see the module's docstring)."""

    #: The family's key (``features`` rows, ``--parts features`` jobs) and its column in the feature matrix.
    family: ClassVar[str]
    column: ClassVar[str]
    #: Implementation name -> label in the report.
    labels: ClassVar[dict[str, str]]
    #: Mode ("average", "diloco", "compressed") -> the implementations of the sync part, in the timing order.
    sync_impls: ClassVar[dict[str, list[str]]] = {}
    #: Mode -> the implementations of the training part, in the timing order.
    train_runs: ClassVar[dict[str, list[str]]] = {}
    #: Whether its feature job needs torchft's lighthouse.
    needs_lighthouse: ClassVar[bool] = False

    def sync_impl(self, name: str, model: Any, acc: Any, manager: Any) -> SyncImpl:
        """Implementation ``name``'s sync alone on ``model`` (``acc``: accelerate's Accelerator, ``manager``:
        torchft's Manager, shared by the job's implementations)."""
        raise NotImplementedError

    def loop(self, name: str, job: dict, rank: int, model: Any, opt: Any) -> Loop:
        """What a plain loop needs to train ``model`` with ``opt`` (the GPT's AdamW) and implementation ``name``."""
        raise NotImplementedError

    def features(self, job: dict, rank: int, batches: list, add: AddTry) -> None:
        """Try every feature of :data:`FEATURES` on this peer, each through ``add``."""
        raise NotImplementedError


def signature(fn: Any) -> str:
    """``fn``'s name and signature, as a feature cell quotes the peer's API."""
    return f"{getattr(fn, '__qualname__', fn)}{inspect.signature(fn)}".replace("self, ", "")


def first_arg(fn: Any, *words: str) -> str | None:
    """The first parameter of ``fn`` whose name contains one of ``words`` (the peer's own API, inspected)."""
    for name in inspect.signature(fn).parameters:
        if any(w in name for w in words):
            return name
    return None


class PlainPeer:
    """A peer on a plain loop, built fresh (model, AdamW, schedule, the peer's wrapper) so that it can be resumed."""

    def __init__(self, peer: Peer, name: str, job: dict, rank: int) -> None:
        self.name, self.job, self.rank = name, job, rank
        self.model = make_model(job)
        opt, self.sched = optimizers(self.model)
        loop = peer.loop(name, job, rank, self.model, opt)
        self.forward, self.opt, self.hook, self.ctx = loop.forward, loop.opt, loop.step_hook, loop.ctx
        self.manager, self.exit_ctx, self.outer = loop.manager, loop.exit_ctx, loop.extra.get("outer")

    def train(self, batches: list) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()
        try:
            for x, y in batches:
                self.opt.zero_grad(set_to_none=True)
                _, loss = self.forward(x, y)
                loss.backward()
                self.opt.step()
                self.sched.step()
                self.hook()
        finally:
            if self.ctx is not None and self.exit_ctx:
                self.ctx.__exit__(None, None, None)

    def state_dict(self) -> dict:
        """What the peer lets a user save: model, optimizer (torch's includes the averager's step), schedule, and
        the peer object's own ``state_dict`` where it has one."""
        import copy

        st = dict(model=self.model.state_dict(), opt=self.opt.state_dict(), sched=self.sched.state_dict())
        if self.ctx is not None and hasattr(self.ctx, "state_dict"):
            st["peer"] = self.ctx.state_dict()
        if self.manager is not None:
            st["manager"] = self.manager.state_dict()
        return copy.deepcopy(st)

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if "peer" in st:
            self.ctx.load_state_dict(st["peer"])
        if "manager" in st:
            self.manager.load_state_dict(st["manager"])


def try_resume_plain(peer: Peer, name: str, job: dict, rank: int, batches: list) -> tuple[str, str]:
    """Straight S steps vs. k steps, save what the peer offers, rebuild, load, S − k more (k mid-interval)."""
    S, k = job["steps"], job["resume_at"]
    straight = PlainPeer(peer, name, job, rank)
    straight.train(batches[:S])
    first = PlainPeer(peer, name, job, rank)
    first.train(batches[:k])
    saved = first.state_dict()
    second = PlainPeer(peer, name, job, rank)
    second.load_state_dict(saved)
    second.train(batches[k:S])
    d = max_diff(flat_params(straight.model), flat_params(second.model))
    what = ", ".join(sorted(saved))
    if d == 0.0:
        return "yes", f"bit-identical to the straight run (saved: {what})"
    return "no", f"max |Δθ| = {d:.3g} vs the straight run after resuming at step {k} of {S} (saved: {what})"


def try_dead_peer(run_sync: Callable[[], Any], rank: int, limit: float) -> tuple[str, str]:
    """Rank 1 exits; rank 0 runs the sync: does it go on, stop with an error, or hang (past ``limit`` s)?"""
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        sys.stdout.flush()
        os._exit(0)
    time.sleep(0.5)
    done: dict = {}

    def target() -> None:
        t0 = time.perf_counter()
        try:
            run_sync()
            done["r"] = ("yes", f"the survivor's sync returned after {time.perf_counter() - t0:.1f} s and it goes on")
        except BaseException as err:  # noqa: BLE001
            msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            done["r"] = ("stops", f"{type(err).__name__} after {time.perf_counter() - t0:.1f} s: {msg}")

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit)
    return done.get("r", ("no", f"hangs: the survivor's sync had not returned after {limit:g} s"))


def bounded_try(fn: Callable[[], tuple[str, str]], limit: float) -> tuple[str, str]:
    """``fn()``, or "hangs" when it has not returned within ``limit`` seconds."""
    done: dict = {}
    th = threading.Thread(target=lambda: done.setdefault("r", fn()), daemon=True)
    th.start()
    th.join(limit)
    return done.get("r", ("no", f"hangs: not returned after {limit:g} s"))
