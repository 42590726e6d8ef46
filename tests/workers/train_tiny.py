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
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _listening import listening  # noqa: E402
from tiny import TinyModule, ValidatedTinyModule, make_dataset  # noqa: E402

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
                        "numel": tensor.numel() if tensor is not None else 0, "saving": CURRENT.get("saving", False)})
            return __orig(*args, **kwargs)

        setattr(dist, name, wrapper)


def mark_saves(strategy) -> None:
    """Collectives logged while the strategy saves a checkpoint carry ``saving: True``."""
    original = strategy.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        CURRENT["saving"] = True
        try:
            return original(*args, **kwargs)
        finally:
            CURRENT["saving"] = False

    strategy.save_checkpoint = save_checkpoint


def time_saves(strategy, seconds: list) -> None:
    """The seconds each ``strategy.save_checkpoint`` keeps the training thread (the stall of a save)."""
    original = strategy.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    strategy.save_checkpoint = save_checkpoint


def _full(named) -> dict[str, torch.Tensor]:
    """Whole tensors: FSDP2 shards (DTensors) are gathered inside the worker group."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in named}


def _params(module) -> dict[str, torch.Tensor]:
    """Whole parameters; DeepSpeed ZeRO-3 partitions are gathered inside the worker group (collective there)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not partitioned:
        return _full(module.named_parameters())
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return _full(module.named_parameters())


def _deepspeed_state(optimizer) -> dict:
    """This rank's ZeRO state: the fp32 master partitions and the inner (torch) optimizer's state of them."""
    master = (getattr(optimizer, "fp32_partitioned_groups_flat", None)
              or getattr(optimizer, "single_partition_of_fp32_groups", None)
              or optimizer.fp32_groups_flat_partition)
    state = optimizer.optimizer.state  # keyed by the master partitions (ZeRO-3 empties param_groups between steps)
    return {"master": [m.detach().clone() for m in master],
            "state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.get(m, {}).items()}
                      for i, m in enumerate(master)}}


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

    def on_train_end(self, trainer, pl_module):
        self.train_end = _params(pl_module)  # what a user's on_train_end hook sees

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.device = str(next(pl_module.parameters()).device)  # where training ran (teardown moves it to the CPU)
        self.steps.append(_params(pl_module))
        self.buffers.append({k: v.detach().clone() for k, v in pl_module.named_buffers()})


class Fault(Callback):
    """Kills (SIGKILL) or stalls one rank at the start of a training step, to test failure handling."""

    def __init__(self, args) -> None:
        self.args = args

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        a = self.args
        if trainer.global_rank != a.fault_rank:
            return
        if trainer.global_step == a.die_at:
            print(f"[fault] rank {a.fault_rank} killed at step {a.die_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_step == a.freeze_at:
            print(f"[fault] rank {a.fault_rank} freezes at step {a.freeze_at}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # a frozen node: alive, but answers nothing
        if trainer.global_step == a.stall_at:
            print(f"[fault] rank {a.fault_rank} stalls at step {a.stall_at}", flush=True)
            time.sleep(a.stall_seconds)


def slow_or_failing_writes(args, rank: int) -> None:
    """Test hooks on the checkpoint file writer (also the background thread's, with --async-save): every file of a
    save at step >= --write-delay-from sleeps --write-delay s first; rank --write-fail-rank's files of the save at
    step --write-fail-step raise. The step is read from the checkpoint's name (``step=N.ckpt``), since a background
    write runs while training is at later steps."""
    import re

    from lightning_localsgd import checkpoint

    original = checkpoint._write

    def _write(obj, path):
        found = re.search(r"step=(\d+)", str(path))
        step = int(found.group(1)) if found else -1
        if args.write_delay and step >= args.write_delay_from and not str(path).endswith("meta.pt"):
            time.sleep(args.write_delay)
        if rank == args.write_fail_rank and step == args.write_fail_step and not str(path).endswith("meta.pt"):
            raise OSError(f"injected write failure: {path}")
        return original(obj, path)

    checkpoint._write = _write


class KillDuringWrite(Callback):
    """Every rank SIGKILLs itself at the start of step --die-during-write-at while its background checkpoint write is
    still in flight (it first records that it was: ``killed{rank}.json``)."""

    def __init__(self, step: int, out: str) -> None:
        self.step, self.out = step, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        writer = trainer.strategy._async_writer
        thread = writer._thread if writer is not None else None
        with open(os.path.join(self.out, f"killed{trainer.global_rank}.json"), "w") as f:
            json.dump({"writing": thread is not None and thread.is_alive()}, f)
        print(f"[fault] rank {trainer.global_rank} killed at step {self.step} during a checkpoint write", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class Preempt(Callback):
    """Sends SIGTERM to one rank ``delay`` seconds after it starts a step, as a scheduler would (e.g. while it waits
    in that step's sync for a slower rank)."""

    def __init__(self, rank: int, step: int, delay: float) -> None:
        self.rank, self.step, self.delay = rank, step, delay

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"[fault] SIGTERM to rank {self.rank} in {self.delay:g} s (step {self.step})", flush=True)
            threading.Timer(self.delay, os.kill, args=(os.getpid(), signal.SIGTERM)).start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"[step] rank {trainer.global_rank} finished step {trainer.global_step}", flush=True)


class Slow(Callback):
    """Makes one rank slow (a heterogeneous / edge worker): it sleeps at the start of every training step."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)


class SyncRecorder(Callback):
    """Records, at every sync, the parameters going in (θ_i), the weight sent and the parameters coming out."""

    def __init__(self, syncs: list, fragment_syncs: list) -> None:
        self.syncs = syncs
        self.fragment_syncs = fragment_syncs

    def on_fit_start(self, trainer, pl_module):
        outer = trainer.strategy
        strategy = trainer.strategy

        def wrap_setup():
            engine = strategy.outer_sync
            original = engine.sync

            def sync(weight=None, stop=None):
                before = _full(pl_module.named_parameters())
                theta_g = torch.cat([t.detach().reshape(-1).cpu() for t in engine.snapshot])  # this rank's θ_g
                result = original(weight=weight, stop=stop)
                self.syncs.append({"step": strategy.schedule.steps_done, "weight": weight, "stop": stop,
                                   "stop_requested": result.stop_requested, "before": before, "theta_g": theta_g,
                                   "after": _full(pl_module.named_parameters()), "seconds": result.seconds})
                return result

            engine.sync = sync
            start_fragment, finish_fragment = engine.start_sync, engine.finish_sync

            def start_sync(fragment=None, weight=None, stop=None):
                if fragment is not None:  # streaming: the fragment's flat range, what goes in
                    self.fragment_syncs.append({
                        "fragment": fragment, "flat": engine.layout.fragment(fragment).flat, "weight": weight,
                        "stop": stop, "start_step": strategy.schedule.steps_done,
                        "before": _full(pl_module.named_parameters())})
                return start_fragment(fragment, weight=weight, stop=stop)

            def finish_sync(fragment=None, mix=0.0):
                result = finish_fragment(fragment, mix=mix)
                if fragment is not None:
                    record = next(r for r in reversed(self.fragment_syncs) if r["fragment"] == fragment)
                    record.update(finish_step=strategy.schedule.steps_done, stop_requested=result.stop_requested,
                                  after=_full(pl_module.named_parameters()))
                return result

            engine.start_sync, engine.finish_sync = start_sync, finish_sync

        original_setup = outer.setup_local_sgd

        def setup(trainer_):
            original_setup(trainer_)
            wrap_setup()

        outer.setup_local_sgd = setup
        if outer.outer_sync is not None:
            wrap_setup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="local_sgd", choices=["local_sgd", "ddp", "registered", "fsdp", "deepspeed"])
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
    p.add_argument("--save-top-k", type=int, default=-1)
    p.add_argument("--async-save", action="store_true", help="the strategy's async_save=True")
    p.add_argument("--save-after-fit", action="store_true", help="trainer.save_checkpoint once fit returned")
    p.add_argument("--write-delay", type=float, default=0.0, help="seconds each checkpoint file write sleeps first")
    p.add_argument("--write-delay-from", type=int, default=0, help="... for saves at this step and later")
    p.add_argument("--write-fail-rank", type=int, default=-1, help="this rank's checkpoint files fail to write ...")
    p.add_argument("--write-fail-step", type=int, default=-1, help="... at the save of this step")
    p.add_argument("--die-during-write-at", type=int, default=-1,
                   help="every rank SIGKILLs itself at the start of this step, during a background checkpoint write")
    p.add_argument("--resume", default=None)
    p.add_argument("--compression", default=None)
    p.add_argument("--cluster-size", type=int, default=None)
    p.add_argument("--cluster-sync-every", type=int, default=None)
    p.add_argument("--cluster-outer", default="diloco")
    p.add_argument("--sync-schedule", default=None, help="a registered schedule's name (sync_schedule=)")
    p.add_argument("--shard", default="", choices=["", "group", "world"], help="shard in configure_model")
    p.add_argument("--mp-bf16", action="store_true", help="FSDP MixedPrecisionPolicy(bf16 params, fp32 reduce)")
    p.add_argument("--full-checkpoint", action="store_true", help="FSDP: one full-state checkpoint file")
    p.add_argument("--stage", type=int, default=2, help="DeepSpeed: ZeRO stage")
    p.add_argument("--ds-persist-threshold", type=int, default=None,
                   help="DeepSpeed ZeRO-3: stage3_param_persistence_threshold (0: every parameter partitioned)")
    p.add_argument("--ds-fp32-grad-accum", action="store_true", help="DeepSpeed: data_types.grad_accum_dtype fp32")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--csv-dir", default=None, help="log to a CSVLogger in this folder")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="limit_train_batches")
    p.add_argument("--count-collectives", action="store_true")
    p.add_argument("--nan-at", type=int, default=-1, help="put a NaN in group 1's weights at this batch")
    p.add_argument("--on-nonfinite", default=None, choices=["raise", "skip"])
    p.add_argument("--sync-timeout", type=float, default=None)
    p.add_argument("--die-at", type=int, default=-1, help="SIGKILL --fault-rank at the start of this step")
    p.add_argument("--stall-at", type=int, default=-1, help="--fault-rank sleeps at the start of this step")
    p.add_argument("--stall-seconds", type=float, default=120.0)
    p.add_argument("--freeze-at", type=int, default=-1, help="--fault-rank SIGSTOPs itself at the start of this step")
    p.add_argument("--nan-from", type=int, default=-1, help="a NaN in group 1's weights at every batch from this one")
    p.add_argument("--nan-loss-at", type=int, default=-1, help="group 1's loss is NaN at this batch")
    p.add_argument("--nan-buffer-at", type=int, default=-1, help="a NaN in group 1's running_mean at this batch")
    p.add_argument("--max-consecutive-skips", type=int, default=None)
    p.add_argument("--loss-scale", type=float, default=1.0, help="group 1's loss is scaled by this at every step")
    p.add_argument("--loss-scale-from", type=int, default=0, help="... from this step on (default: every step)")
    p.add_argument("--screen-factor", type=float, default=None, help="the robust screen (screen_factor=)")
    p.add_argument("--screen-min-cosine", type=lambda v: v if v == "chance" else float(v), default=None,
                   help="the screen's direction test (screen_min_cosine=): a number or 'chance'")
    p.add_argument("--same-data", action="store_true",
                   help="every rank reads the whole dataset in the same order (no distributed sampler)")
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--term-at", type=int, default=-1, help="SIGTERM --term-rank --term-delay s after this step starts")
    p.add_argument("--term-rank", type=int, default=0)
    p.add_argument("--term-delay", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=8, help="width of the tiny model's hidden layer")
    p.add_argument("--fragments", type=int, default=1, help="streaming sync: fragments")
    p.add_argument("--overlap-steps", type=int, default=0, help="streaming sync: τ")
    p.add_argument("--overlap-mix", type=float, default=0.0, help="streaming sync: α")
    p.add_argument("--sync-every-seconds", type=float, default=None, help="time-based sync")
    p.add_argument("--validate-every", type=int, default=0, help="a validation loop every N steps during fit")
    p.add_argument("--slow-rank", type=int, default=-1, help="this rank sleeps --slow-seconds per step")
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="gloo", help="process group backend (nccl: tests/cuda on several GPUs)")
    p.add_argument("--store-listeners", action="store_true",
                   help="record the addresses the rendezvous store (MASTER_PORT) listens on after fit")
    p.add_argument("--num-nodes", type=int, default=1,
                   help="ranks sharing one GPU are started as the one rank of their own node (tests/cuda)")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    L.seed_everything(1000 + rank if args.seed_by_rank else 0, verbose=False)
    model = (ValidatedTinyModule if args.validate_every else TinyModule)(inner=args.inner, manual=args.manual, buffer=args.buffer, nan_at=args.nan_at,
                       group_size=args.group_size, shard=args.shard, hidden=args.hidden, nan_from=args.nan_from,
                       nan_loss_at=args.nan_loss_at, nan_buffer_at=args.nan_buffer_at, loss_scale=args.loss_scale,
                       loss_scale_from=args.loss_scale_from)
    L.seed_everything(0, verbose=False)
    data = DataLoader(make_dataset(), batch_size=2, shuffle=False)

    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend=args.backend)
    elif args.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from lightning_localsgd import LocalSGDFSDPStrategy

        strategy = LocalSGDFSDPStrategy(
            sync_every=args.sync_every, outer_optimizer=args.outer, group_size=args.group_size,
            warmup_steps=args.warmup, outer_state_device=args.state_device, process_group_backend=args.backend,
            save_distributed_checkpoint=not args.full_checkpoint,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if args.mp_bf16 else None,
            fragments=args.fragments, overlap_steps=args.overlap_steps, overlap_mix=args.overlap_mix,
            sync_every_seconds=args.sync_every_seconds, async_save=args.async_save, compression=args.compression,
            cluster_size=args.cluster_size, cluster_sync_every=args.cluster_sync_every,
            cluster_outer_optimizer=args.cluster_outer, sync_schedule=args.sync_schedule,
            screen_factor=args.screen_factor,
        )
    elif args.strategy == "deepspeed":
        from lightning_localsgd import LocalSGDDeepSpeedStrategy

        ds = dict(stage=args.stage)
        if args.ds_persist_threshold is not None or args.ds_fp32_grad_accum:
            zero = {"stage": args.stage}
            if args.ds_persist_threshold is not None:
                zero["stage3_param_persistence_threshold"] = args.ds_persist_threshold
            ds = dict(config={"zero_optimization": zero, "zero_allow_untested_optimizer": True})
            if args.ds_fp32_grad_accum:  # bf16 + ZeRO stage 1 then runs DeepSpeed's BF16_Optimizer
                ds["config"]["data_types"] = {"grad_accum_dtype": "fp32"}
        strategy = LocalSGDDeepSpeedStrategy(
            sync_every=args.sync_every, outer_optimizer=args.outer, group_size=args.group_size,
            warmup_steps=args.warmup, outer_state_device=args.state_device, process_group_backend=args.backend,
            logging_batch_size_per_gpu=2, cluster_size=args.cluster_size, cluster_sync_every=args.cluster_sync_every,
            cluster_outer_optimizer=args.cluster_outer, compression=args.compression, async_save=args.async_save,
            sync_schedule=args.sync_schedule, **ds,
        )
    elif args.strategy == "registered":
        strategy = args.registered_name
    else:
        extra = {k: v for k, v in (("on_nonfinite", args.on_nonfinite), ("sync_timeout", args.sync_timeout),
                                   ("max_consecutive_skips", args.max_consecutive_skips),
                                   ("screen_factor", args.screen_factor),
                                   ("screen_min_cosine", args.screen_min_cosine)) if v is not None}
        strategy = LocalSGDStrategy(
            sync_every=args.sync_every, outer_optimizer=args.outer, group_size=args.group_size,
            warmup_steps=args.warmup, outer_state_device=args.state_device, process_group_backend=args.backend, **extra,
            cluster_size=args.cluster_size, cluster_sync_every=args.cluster_sync_every,
            cluster_outer_optimizer=args.cluster_outer, compression=args.compression, fragments=args.fragments,
            overlap_steps=args.overlap_steps, overlap_mix=args.overlap_mix, sync_every_seconds=args.sync_every_seconds,
            async_save=args.async_save, sync_schedule=args.sync_schedule,
        )
    recorder = Recorder()
    callbacks = [recorder]
    if args.die_at >= 0 or args.stall_at >= 0 or args.freeze_at >= 0:
        callbacks.append(Fault(args))
    if args.slow_rank >= 0:
        callbacks.append(Slow(args.slow_rank, args.slow_seconds))
    if args.term_at >= 0:
        callbacks.append(Preempt(args.term_rank, args.term_at, args.term_delay))
    syncs: list[dict] = []
    fragment_syncs: list[dict] = []
    if args.sync_every_seconds is not None:
        callbacks.append(SyncRecorder(syncs, fragment_syncs))
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                         save_top_k=args.save_top_k, filename="{step}"))
    if args.write_delay or args.write_fail_rank >= 0:
        slow_or_failing_writes(args, rank)
    if args.die_during_write_at >= 0:
        callbacks.append(KillDuringWrite(args.die_during_write_at, args.out))
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, max_steps=args.steps,
        logger=L.pytorch.loggers.CSVLogger(args.csv_dir, name="", version="") if args.csv_dir else False,
        precision=args.precision, log_every_n_steps=1,
        enable_checkpointing=bool(args.ckpt_every), enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip,
        use_distributed_sampler=not args.same_data, callbacks=callbacks, limit_train_batches=args.batches_per_epoch,
        **(dict(val_check_interval=args.validate_every, limit_val_batches=2) if args.validate_every else {}),
    )
    if args.count_collectives:
        install_collective_counter()
        mark_saves(trainer.strategy)
    save_seconds: list[float] = []
    if args.ckpt_every:
        time_saves(trainer.strategy, save_seconds)
    trainer.fit(model, data, data if args.validate_every else None, ckpt_path=args.resume)
    after_fit_committed = None
    if args.save_after_fit:  # a save after fit returned: written and committed before save_checkpoint returns
        from lightning_localsgd.checkpoint import is_checkpoint_folder

        path = os.path.join(args.out, "ckpt", f"step={trainer.global_step}-after-fit.ckpt")
        trainer.save_checkpoint(path)
        after_fit_committed = is_checkpoint_folder(path)

    s = trainer.strategy
    info = {"global_rank": trainer.global_rank, "global_step": trainer.global_step, "save_seconds": save_seconds,
            "after_fit_committed": after_fit_committed,
            "param_device": getattr(recorder, "device", None)}
    if args.store_listeners:  # the store lives until the process exits (the default process group with it)
        info["store_listeners"] = sorted(listening(int(os.environ["MASTER_PORT"])))
    if hasattr(s, "outer_sync"):
        info.update(num_syncs=s.outer_sync.num_syncs, bytes_sent=s.outer_sync.bytes_sent,
                    cluster_syncs=s.cluster_sync.num_syncs if getattr(s, "cluster_sync", None) else None,
                    steps_done=s.schedule.steps_done, steps_since_sync=s.schedule.steps_since_sync,
                    state_bytes=s.outer_sync.state_bytes, ddp_bytes_per_step=s.ddp_bytes_per_step,
                    snapshot_device=str(s.outer_sync.snapshot[0].device))
        outer_state = s.outer_sync.state_dict()
    else:
        outer_state = None
    if args.strategy == "deepspeed":
        info["ds_persistent"] = len(getattr(s.deepspeed_engine.optimizer, "persistent_parameters", None) or [])
        info["ds_optimizer"] = type(s.deepspeed_engine.optimizer).__name__
    from lightning_localsgd.tensors import dtensor_to_local as _dtensor_to_local

    if args.strategy == "deepspeed":
        optimizers = [_deepspeed_state(o) for o in trainer.optimizers]  # this rank's ZeRO partitions
    else:
        optimizers = [_dtensor_to_local(o.state_dict()) for o in trainer.optimizers]  # FSDP: this rank's shards
    final = {**_params(model), **_full(model.named_buffers())}
    info["syncs_recorded"] = len(syncs)
    torch.save({"train_end": getattr(recorder, "train_end", None), "syncs": syncs, "fragment_syncs": fragment_syncs, "steps": recorder.steps, "buffers": recorder.buffers, "final": final,
                "optimizers": optimizers, "info": info, "collectives": LOG, "outer_state": outer_state},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))
    with open(os.path.join(args.out, f"info{trainer.global_rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
