"""Ours: ``Trainer(strategy=LocalSGDStrategy(sync_every=H, outer_optimizer="average" | "diloco"))`` and, at engine
level, :class:`lightning_localsgd.engine.outer.OuterSync` on bare ``torch.distributed`` in the peers' plain loop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import COUNT, WORLD, flat_params, init_default_group, make_model, max_diff
from .interface import AddTry, Loop, Peer, SyncImpl, bounded_try


def fixed_loader(items: list) -> Any:
    """A DataLoader that yields ``items`` (ready batches) in order, on every rank."""
    from torch.utils.data import DataLoader, IterableDataset

    class Fixed(IterableDataset):
        def __init__(self, items: list) -> None:
            self.items = items

        def __iter__(self) -> Any:
            return iter(self.items)

    return DataLoader(Fixed(items), batch_size=None)


def lightning_trainer(strategy: Any, max_steps: int, callbacks: list) -> Any:
    """A bare CPU Trainer over WORLD ranks: no logger, checkpoints, validation or sampler (the batches are fixed)."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=max_steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks)


def train_lightning(job: dict, rank: int, batches: list) -> dict:
    """One training run through ``Trainer(strategy=LocalSGDStrategy(...))`` (``ours_lightning``)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_localsgd import LocalSGDStrategy

    class Clock(Callback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.t1 = 0.0
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.t0 is None:
                self.t0 = time.perf_counter()
                COUNT.update(on=True, bytes=0, calls=0)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.t1 = time.perf_counter()
            self.losses.append(float(outputs["loss"]))

    model = make_model(job)
    strategy = LocalSGDStrategy(sync_every=job["sync_every"], outer_optimizer=job["mode"],
                                process_group_backend="gloo", **job.get("strategy", {}))
    clock = Clock()
    trainer = lightning_trainer(strategy, job["steps"], [clock])
    trainer.fit(model, fixed_loader(batches))
    COUNT["on"] = False
    if rank == 0:
        torch.save(flat_params(model), job["params_out"])
    s = trainer.strategy
    return dict(train_seconds=clock.t1 - clock.t0, losses=clock.losses, bytes=COUNT["bytes"], calls=COUNT["calls"],
                engine_bytes=s.outer_sync.bytes_sent, state_bytes=s.outer_sync.state_bytes,
                syncs_done=s.outer_sync.num_syncs)


class Ours(Peer):
    family, column = "ours", "ours"
    labels = {"ours_lightning": "ours (Lightning)", "ours_engine": "ours (engine)",
              "ours_engine_diloco": "ours (engine)", "ours_engine_int8": "ours (engine, int8)",
              "ours_engine_int4": "ours (engine, int4)"}
    sync_impls = {"average": ["ours_engine"], "diloco": ["ours_engine_diloco"],
                  "compressed": ["ours_engine_int8", "ours_engine_int4"]}
    train_runs = {"average": ["ours_lightning", "ours_engine"], "diloco": ["ours_lightning", "ours_engine"]}

    def sync_impl(self, name: str, model: Any, acc: Any, manager: Any) -> SyncImpl:
        from lightning_localsgd.engine.outer import OuterSync
        from lightning_localsgd.engine.presets import resolve_outer_optimizer

        outer = resolve_outer_optimizer("diloco") if name == "ours_engine_diloco" else None
        codec = name.rsplit("_", 1)[1] if name[-4:] in ("int8", "int4") else None
        engine = OuterSync(list(model.parameters()), outer_optimizer=outer, compression=codec)
        impl = SyncImpl(name, model, engine.sync, lambda: engine.state_bytes, "parameters' device (cpu)")
        impl.engine = engine
        return impl

    def loop(self, name: str, job: dict, rank: int, model: Any, opt: Any) -> Loop:
        init_default_group()
        from lightning_localsgd.engine.outer import OuterSync
        from lightning_localsgd.engine.presets import resolve_outer_optimizer

        engine = OuterSync(list(model.parameters()),
                           outer_optimizer=resolve_outer_optimizer("diloco") if job["mode"] == "diloco" else None)
        counter = [0]

        def step_hook() -> None:
            counter[0] += 1
            if counter[0] % job["sync_every"] == 0:
                engine.sync()

        return Loop(model, opt, step_hook, state=lambda: engine.state_bytes)

    def features(self, job: dict, rank: int, batches: list, add: AddTry) -> None:
        import torch.distributed as dist
        from lightning.pytorch.callbacks import Callback

        from lightning_localsgd import LocalSGDStrategy
        from lightning_localsgd.engine.outer import OuterSync

        S, k, H = job["steps"], job["resume_at"], job["sync_every"]

        def fit(steps: int, items: list, ckpt: str | None = None, callbacks: tuple = (), **strategy: Any) -> Any:
            model = make_model(job)
            trainer = lightning_trainer(LocalSGDStrategy(sync_every=H, outer_optimizer=job.get("mode", "diloco"),
                                                         process_group_backend="gloo", **strategy),
                                        steps, list(callbacks))
            trainer.fit(model, fixed_loader(items), ckpt_path=ckpt)
            return trainer, model

        add("DiLoCo outer step", "ours (Lightning)",
            lambda: ("yes", "outer_optimizer=\"diloco\" (Nesterov SGD lr 0.7, momentum 0.9), or any torch optimizer"))

        def resume() -> tuple[str, str]:
            _, straight = fit(S, batches[:S])
            trainer, _ = fit(k, batches[:k], sync_on_train_end=False)
            path = str(Path(job["tmp"], "ours.ckpt"))
            trainer.save_checkpoint(path)
            _, resumed = fit(S, batches[k:S], ckpt=path)
            d = max_diff(flat_params(straight), flat_params(resumed))
            if d == 0.0:
                return "yes", f"DiLoCo, resumed at step {k} of {S} (H = {H}) from a Lightning checkpoint: bit-identical"
            return "no", f"max |Δθ| = {d:.3g} after resuming at step {k} of {S}"

        add("exact resume mid-interval", "ours (Lightning)", resume)

        def warmup() -> tuple[str, str]:
            COUNT.update(on=True, bytes=0, calls=0)
            trainer, _model = fit(H + 2, batches[:H + 2], warmup_steps=H, sync_on_train_end=False)
            COUNT["on"] = False
            return "yes", (f"warmup_steps={H}: gradients all-reduced over all ranks for {H} steps "
                           f"(ddp_bytes_per_step {trainer.strategy.ddp_bytes_per_step:,}), then local steps")

        add("synchronous warm-up", "ours (Lightning)", warmup)
        model = make_model(job)
        base = [p.detach().clone() for p in model.parameters()]

        def perturbed() -> list:
            out = [b.clone() for b in base]
            for t in out:
                t.add_(1e-2 * (rank + 1))
            return out

        def compressed() -> tuple[str, str]:
            res = {}
            for codec in ("int8", "int4"):
                tensors = perturbed()
                engine = OuterSync(tensors, outer_optimizer=None, compression=codec)
                res[codec] = engine.sync().bytes_sent
            fp32 = sum(b.numel() for b in base) * 4
            return "yes", ", ".join(f"{c}: {b:,} bytes per sync ({b / fp32:.3f} of fp32)" for c, b in res.items()) + \
                " on CPU, error feedback"

        add("compressed sync on CPU", "ours (engine)", compressed)

        def streaming() -> tuple[str, str]:
            tensors = perturbed()
            engine = OuterSync(tensors, outer_optimizer=None, fragments=2)
            for f in range(2):
                engine.start_sync(f)
                engine.finish_sync(f)
            return "yes", f"fragments=2: synced one fragment at a time ({engine.bytes_sent:,} bytes in all)"

        add("streaming (fragments)", "ours (engine)", streaming)

        def weighted() -> tuple[str, str]:
            tensors = perturbed()
            w = float(rank + 1)
            engine = OuterSync(tensors, outer_optimizer=None)
            engine.sync(weight=w)
            # the weighted mean by hand: (1·θ_0 + 2·θ_1) / 3 with θ_r = base + 0.01 (r + 1)
            want = [b + 1e-2 * (1 * 1 + 2 * 2) / 3 for b in base]
            d = max(max_diff(t, e) for t, e in zip(tensors, want))
            return ("yes" if d < 1e-6 else "no"), f"sync(weight=tokens): max error vs the weighted mean by hand {d:.2g}"

        add("token-weighted mean (uneven workers)", "ours (engine)", weighted)
        add("FSDP groups", "ours", lambda: ("not tried", ("too slow for the default here; benchmarks/fsdp_shards/ runs "
                                                         "it (FSDP2 on CPU)")))

        class Die(Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.global_rank == 1 and batch_idx == H + 1:
                    sys.stdout.flush()
                    os._exit(0)

        def dead() -> tuple[str, str]:
            t0 = time.perf_counter()
            try:
                fit(2 * H, batches[:2 * H], callbacks=(Die(),), sync_timeout=job["dead_timeout"])
            except BaseException as err:  # noqa: BLE001
                msg = str(err).strip().splitlines()[0][:160]
                return "stops", f"{type(err).__name__} after {time.perf_counter() - t0:.1f} s: {msg}"
            return "yes", "training went on"

        dist.barrier() if dist.is_initialized() else None
        add("dead-peer handling", f"ours (Lightning, one world, sync_timeout={job['dead_timeout']:g})",
            lambda: bounded_try(dead, job["dead_limit"]))
