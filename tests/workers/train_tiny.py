"""Multi-process training of a tiny model with the local-SGD strategy; each rank dumps what the tests compare.

Run by the tests as a script (Lightning's popen launcher re-runs it once per rank)::

    python tests/workers/train_tiny.py --devices 2 --out DIR [options]

Every rank writes ``DIR/rank{r}.pt`` with the parameters after every training step, the final optimizer states,
the strategy counters and a log of the Python-level collectives it ran (with the training step they ran in).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import torch.distributed as dist
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import TinyModule, make_dataset  # noqa: E402

import lightning_localsgd  # noqa: E402,F401
from lightning_localsgd import LocalSGDStrategy  # noqa: E402

COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "all_to_all", "reduce", "gather", "scatter", "barrier", "all_gather_object", "gather_object",
               "broadcast_object_list")
CURRENT = {"batch": -1}
LOG: list[dict] = []


def _ranks(group):
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except Exception:
        return None


def install_collective_counter() -> None:
    """Wrap the Python-level collectives of torch.distributed to record what each rank sends, and on which group."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def wrapper(*args, __name=name, __orig=original, **kwargs):
            group = kwargs.get("group")
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if __name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_single") and len(args) > 1:
                tensor = args[1]
            if os.environ.get("TRACE_COLLECTIVE") == __name and CURRENT["batch"] >= 0:
                import traceback; traceback.print_stack(limit=8)
            LOG.append({"op": __name, "batch": CURRENT["batch"], "ranks": _ranks(group),
                        "numel": tensor.numel() if tensor is not None else 0})
            return __orig(*args, **kwargs)

        setattr(dist, name, wrapper)


def _full(named) -> dict[str, torch.Tensor]:
    """Whole tensors: FSDP2 shards (DTensors) are gathered inside the worker group."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in named}


class Recorder(Callback):
    """Records parameters after every training step (after the strategy's own step-end sync)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.buffers: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        CURRENT["batch"] = trainer.fit_loop.total_batch_idx

    def on_fit_start(self, trainer, pl_module):
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # route DDP's gradient all-reduce through torch.distributed.all_reduce so the counter sees it
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(model.process_group, default_hooks.allreduce_hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(_full(pl_module.named_parameters()))
        self.buffers.append({k: v.detach().clone() for k, v in pl_module.named_buffers()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="local_sgd", choices=["local_sgd", "ddp", "registered", "fsdp"])
    p.add_argument("--registered-name", default="local_sgd")
    p.add_argument("--sync-every", type=int, default=3)
    p.add_argument("--outer", default="average")
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--inner", default="sgd", choices=["sgd", "momentum", "adamw"])
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--manual", action="store_true", help="manual optimization with two optimizers")
    p.add_argument("--buffer", action="store_true", help="add a running-mean buffer")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--state-device", default=None)
    p.add_argument("--seed-by-rank", action="store_true", help="seed each rank differently before building")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--shard", default="", choices=["", "group", "world"], help="shard in configure_model")
    p.add_argument("--mp-bf16", action="store_true", help="FSDP MixedPrecisionPolicy(bf16 params, fp32 reduce)")
    p.add_argument("--full-checkpoint", action="store_true", help="FSDP: one full-state checkpoint file")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--csv-dir", default=None, help="log to a CSVLogger in this folder")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="limit_train_batches")
    p.add_argument("--count-collectives", action="store_true")
    p.add_argument("--nan-at", type=int, default=-1, help="put a NaN in group 1's weights at this batch")
    args = p.parse_args()

    rank = int(os.environ.get("LOCAL_RANK", 0))
    L.seed_everything(1000 + rank if args.seed_by_rank else 0, verbose=False)
    model = TinyModule(inner=args.inner, manual=args.manual, buffer=args.buffer, nan_at=args.nan_at,
                       group_size=args.group_size, shard=args.shard)
    L.seed_everything(0, verbose=False)
    data = DataLoader(make_dataset(), batch_size=2, shuffle=False)

    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    elif args.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from lightning_localsgd import LocalSGDFSDPStrategy

        strategy = LocalSGDFSDPStrategy(
            sync_every=args.sync_every, outer_optimizer=args.outer, group_size=args.group_size,
            warmup_steps=args.warmup, outer_state_device=args.state_device, process_group_backend="gloo",
            save_distributed_checkpoint=not args.full_checkpoint,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if args.mp_bf16 else None,
        )
    elif args.strategy == "registered":
        strategy = args.registered_name
    else:
        strategy = LocalSGDStrategy(
            sync_every=args.sync_every, outer_optimizer=args.outer, group_size=args.group_size,
            warmup_steps=args.warmup, outer_state_device=args.state_device, process_group_backend="gloo",
        )
    recorder = Recorder()
    callbacks = [recorder]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        logger=L.pytorch.loggers.CSVLogger(args.csv_dir, name="", version="") if args.csv_dir else False,
        precision=args.precision, log_every_n_steps=1,
        enable_checkpointing=bool(args.ckpt_every), enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip, use_distributed_sampler=True,
        callbacks=callbacks, limit_train_batches=args.batches_per_epoch,
    )
    if args.count_collectives:
        install_collective_counter()
    trainer.fit(model, data, ckpt_path=args.resume)

    s = trainer.strategy
    info = {"global_rank": trainer.global_rank, "global_step": trainer.global_step}
    if hasattr(s, "outer_sync"):
        info.update(num_syncs=s.outer_sync.num_syncs, bytes_sent=s.outer_sync.bytes_sent,
                    steps_done=s.schedule.steps_done, steps_since_sync=s.schedule.steps_since_sync,
                    state_bytes=s.outer_sync.state_bytes, ddp_bytes_per_step=s.ddp_bytes_per_step,
                    snapshot_device=str(s.outer_sync.snapshot[0].device))
        outer_state = s.outer_sync.state_dict()
    else:
        outer_state = None
    from lightning_localsgd.strategies.fsdp import _dtensor_to_local

    optimizers = [_dtensor_to_local(o.state_dict()) for o in trainer.optimizers]  # FSDP: this rank's shards
    final = {**_full(model.named_parameters()), **_full(model.named_buffers())}
    torch.save({"steps": recorder.steps, "buffers": recorder.buffers, "final": final,
                "optimizers": optimizers, "info": info, "collectives": LOG, "outer_state": outer_state},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))
    with open(os.path.join(args.out, f"info{trainer.global_rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
