"""torchft: ``torchft.local_sgd.LocalSGD`` / ``DiLoCo`` with a ``torchft.Manager`` per process (its own replica group
of one rank, ``ProcessGroupGloo``) and torchft's lighthouse (``torchft._torchft.LighthouseServer``, in the launcher
process, ``quorum_tick_ms`` as ``--quorum-tick-ms``)."""

from __future__ import annotations

import time
from typing import Any

from .common import COUNT, DILOCO, WORLD, count_collective, init_default_group, tensor_bytes
from .interface import AddTry, Loop, Peer, PlainPeer, SyncImpl, signature, try_dead_peer, try_resume_plain


def count_manager(manager: Any) -> None:
    """Count torchft's managed all-reduces, and time its quorums (``manager.quorum_seconds``)."""
    allreduce, start_quorum = manager.allreduce, manager.start_quorum
    manager.quorum_seconds = 0.0

    def counted(tensor: Any, *a: Any, **k: Any) -> Any:
        count_collective(tensor.numel() * tensor.element_size())
        return allreduce(tensor, *a, **k)

    def timed_quorum(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return start_quorum(*a, **k)
        finally:
            manager.quorum_seconds += time.perf_counter() - t0

    manager.allreduce, manager.start_quorum = counted, timed_quorum


def torchft_manager(job: dict, rank: int, min_replicas: int | None = None, state: Any = None) -> Any:
    """A torchft Manager for this process (its own replica group of one rank), as federation.py starts it."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=job.get("torchft_timeout", 60))
    get, put = state or (dict, lambda sd: None)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=put, state_dict=get,
                      min_replica_size=min_replicas or WORLD, use_async_quorum=False, timeout=timeout,
                      quorum_timeout=timeout, connect_timeout=timeout, rank=0, world_size=1,
                      store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=job["lighthouse"],
                      replica_id=f"peer{rank}_{job.get('tag', '')}", hostname="127.0.0.1", init_sync=False)
    manager._bench_store = store  # keep the store alive
    count_manager(manager)
    return manager


def forget_diloco(manager: Any) -> None:
    """Unregister a previous DiLoCo's state functions from ``manager``: torchft allows one DiLoCo per Manager (its
    ``register_state_dict_fn`` asserts the key is new), and the benchmark builds several in one process."""
    for d in (manager._load_state_dict_fns, manager._user_state_dicts):
        for key in [k for k in d if k.startswith("StreamingDiLoCoFragment_")]:
            del d[key]


def diloco_state_bytes(diloco: Any, outer: Any) -> int:
    """torchft DiLoCo's outer state: the fragments' backup of θ_g and the outer optimizer's momentum."""
    backup = sum(tensor_bytes(f.original_parameters.values()) for f in diloco._fragments)
    return backup + sum(tensor_bytes(st.values()) for st in outer.state.values())


class TorchftLocalSGD(Peer):
    family, column = "torchft", "torchft"
    labels = {"torchft_localsgd": "torchft LocalSGD", "torchft_diloco": "torchft DiLoCo"}
    sync_impls = {"average": ["torchft_localsgd"], "diloco": ["torchft_diloco"]}
    train_runs = {"average": ["torchft_localsgd"], "diloco": ["torchft_diloco"]}
    needs_lighthouse = True

    def sync_impl(self, name: str, model: Any, acc: Any, manager: Any) -> SyncImpl:
        import torch
        from torchft.local_sgd import DiLoCo, LocalSGD

        params = list(model.parameters())
        if name == "torchft_localsgd":
            local = LocalSGD(manager, model, torch.optim.SGD(params, lr=0.0), sync_every=1)
            return SyncImpl(name, model, local.sync, lambda: 0, "none", manager)
        inner = torch.optim.SGD(params, lr=0.0)
        outer = torch.optim.SGD(params, **DILOCO)
        forget_diloco(manager)
        diloco = DiLoCo(manager, [model], inner, outer, sync_every=1)

        def run() -> None:
            with diloco:  # its own path: the inner optimizer's step hook syncs every sync_every steps
                inner.step()

        return SyncImpl(name, model, run, lambda: diloco_state_bytes(diloco, outer),
                        "backup: cpu; momentum: parameters' device", manager)

    def loop(self, name: str, job: dict, rank: int, model: Any, opt: Any) -> Loop:
        import torch
        from torchft.local_sgd import DiLoCo, LocalSGD

        init_default_group()  # only for the harness's barrier and the parameter file; torchft uses its own PG
        manager = job.get("_manager") or torchft_manager(job, rank)
        if name == "torchft_localsgd":
            return Loop(model, opt, ctx=LocalSGD(manager, model, opt, sync_every=job["sync_every"]), manager=manager)
        outer = torch.optim.SGD(model.parameters(), **DILOCO)
        forget_diloco(manager)
        ctx = DiLoCo(manager, [model], opt, outer, sync_every=job["sync_every"])
        return Loop(model, opt, ctx=ctx, state=lambda: diloco_state_bytes(ctx, outer), manager=manager,
                    extra=dict(outer=outer))

    def features(self, job: dict, rank: int, batches: list, add: AddTry) -> None:
        import torch
        from torchft.local_sgd import DiLoCo, LocalSGD

        init_default_group()
        job["_manager"] = torchft_manager(job, rank, min_replicas=1)
        manager = job["_manager"]
        add("DiLoCo outer step", "torchft DiLoCo",
            lambda: ("yes", "DiLoCo(…, outer_optimizer=SGD(lr=0.7, momentum=0.9, nesterov=True))"))
        add("exact resume mid-interval", "torchft LocalSGD", lambda: try_resume_plain(self, "torchft_localsgd", job,
                                                                                      rank, batches))
        add("exact resume mid-interval", "torchft DiLoCo",
            lambda: try_resume_plain(self, "torchft_diloco", job, rank, batches))
        add("synchronous warm-up", "torchft LocalSGD / DiLoCo",
            lambda: ("no", f"no warm-up argument: {signature(LocalSGD.__init__)}; "
                           f"{signature(DiLoCo.__init__)[:60]}…"))

        def quantized() -> tuple[str, str]:
            peer = PlainPeer(self, "torchft_diloco", job, rank)
            peer.outer = torch.optim.SGD(peer.model.parameters(), **DILOCO)
            forget_diloco(manager)
            peer.ctx = DiLoCo(manager, [peer.model], peer.opt, peer.outer, sync_every=job["sync_every"],
                              should_quantize=True)
            COUNT.update(on=True, bytes=0, calls=0)
            peer.train(batches[:job["sync_every"]])
            COUNT["on"] = False
            from torchft.manager import IS_TRITON_AVAILABLE

            if not IS_TRITON_AVAILABLE:
                return "no", ("DiLoCo(should_quantize=True) ran, but torchft quantizes only with triton (not available "
                              "on this CPU machine): the sync sent fp32")
            return "yes", f"DiLoCo(should_quantize=True) synced on CPU ({COUNT['bytes']:,} bytes handed to allreduce)"

        add("compressed sync on CPU", "torchft DiLoCo", quantized)

        def streaming() -> tuple[str, str]:
            peer = PlainPeer(self, "torchft_diloco", job, rank)
            m = peer.model
            frags = [m.transformer.h, torch.nn.ModuleList([m.transformer.wte, m.transformer.wpe, m.transformer.ln_f])]
            peer.outer = torch.optim.SGD(m.parameters(), **DILOCO)
            forget_diloco(manager)
            peer.ctx = DiLoCo(manager, frags, peer.opt, peer.outer, sync_every=job["sync_every"], fragment_sync_delay=1)
            peer.train(batches[:2 * job["sync_every"]])
            return "yes", "Streaming DiLoCo: 2 fragments, fragment_sync_delay=1 (overlap), ran on CPU"

        add("streaming (fragments)", "torchft DiLoCo", streaming)
        add("token-weighted mean (uneven workers)", "torchft LocalSGD / DiLoCo",
            lambda: ("no", f"uniform mean over the quorum: {signature(type(manager).allreduce)}"))
        add("FSDP groups", "torchft", lambda: ("not tried", ("too slow for the default here (torchft supports DTensor "
                                                            "parameters)")))
        peer = PlainPeer(self, "torchft_localsgd", job, rank)
        add("dead-peer handling", "torchft LocalSGD (min_replica_size=1)",
            lambda: try_dead_peer(peer.ctx.sync, rank, job["dead_limit"]))
