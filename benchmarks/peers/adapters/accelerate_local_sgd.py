"""accelerate: ``accelerate.local_sgd.LocalSGD(accelerator, model, local_sgd_steps=H)`` with
``Accelerator(cpu=True)`` (the model and optimizer go through ``accelerator.prepare``: DDP on gloo, whose gradient
all-reduce ``LocalSGD`` turns off with ``no_sync``)."""

from __future__ import annotations

from typing import Any

from .interface import AddTry, Loop, Peer, PlainPeer, SyncImpl, first_arg, signature, try_dead_peer, try_resume_plain


def accelerator(job: dict) -> Any:
    """The job's one ``Accelerator(cpu=True)`` (it initializes the default gloo group from the environment)."""
    from accelerate import Accelerator

    cache = job.setdefault("_acc_cache", {})
    if "acc" not in cache:
        cache["acc"] = Accelerator(cpu=True)
    return cache["acc"]


class AccelerateLocalSGD(Peer):
    family, column = "accelerate", "accelerate"
    labels = {"accelerate": "accelerate LocalSGD"}
    sync_impls = {"average": ["accelerate"]}
    train_runs = {"average": ["accelerate"]}

    def sync_impl(self, name: str, model: Any, acc: Any, manager: Any) -> SyncImpl:
        from accelerate.local_sgd import LocalSGD

        wrapped = acc.prepare(model)
        local = LocalSGD(accelerator=acc, model=wrapped, local_sgd_steps=1)
        return SyncImpl(name, model, local.step, lambda: 0, "none")

    def loop(self, name: str, job: dict, rank: int, model: Any, opt: Any) -> Loop:
        from accelerate.local_sgd import LocalSGD

        acc = accelerator(job)
        forward, opt = acc.prepare(model, opt)
        ctx = LocalSGD(accelerator=acc, model=forward, local_sgd_steps=job["sync_every"])
        # its LocalSGD averages once more in __exit__ (its context's end): outside the clock, not counted
        return Loop(forward, opt, ctx.step, ctx, exit_ctx=False)

    def features(self, job: dict, rank: int, batches: list, add: AddTry) -> None:
        from accelerate.local_sgd import LocalSGD

        accelerator(job)
        name = "accelerate LocalSGD"
        init = LocalSGD.__init__
        add("DiLoCo outer step", name, lambda: ("no", f"averaging only: {signature(init)}"))
        add("exact resume mid-interval", name, lambda: try_resume_plain(self, "accelerate", job, rank, batches))
        arg = first_arg(init, "warm")
        add("synchronous warm-up", name, lambda: ("yes", arg) if arg else
            ("no", f"no warm-up argument ({signature(init)}); enabled=False + a second LocalSGD is up to the user"))
        add("compressed sync on CPU", name, lambda: ("no", f"no codec option: {signature(init)}"))
        add("streaming (fragments)", name, lambda: ("no", f"one sync of all parameters: {signature(init)}"))
        add("token-weighted mean (uneven workers)", name, lambda: ("no", ("accelerator.reduce(…, reduction='mean'): "
                                                                         "uniform mean, no weights")))
        add("FSDP groups", name, lambda: ("no", ("LocalSGD refuses anything but DDP / single-device (its __init__ "
                                                "checks accelerator.distributed_type)")))
        peer = PlainPeer(self, "accelerate", job, rank)
        local = LocalSGD(accelerator=accelerator(job), model=peer.forward, local_sgd_steps=1)
        add("dead-peer handling", name, lambda: try_dead_peer(local.step, rank, job["dead_limit"]))
