"""One training run inside the subprocess (every rank runs this; rank 0 writes the result JSON)."""

from __future__ import annotations

import functools
import json
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_localsgd import LocalSGDStrategy  # importing the package registers the strategies
from lightning_localsgd.examples.data import TextDataModule
from lightning_localsgd.examples.gpt import GPT

from .measure import Measure, window_losses
from .netmodel import NetworkModel, install_network_model

STREAMING_KEYS = ("fragments", "overlap_steps", "overlap_mix")


def build_strategy(cfg: dict) -> Any:
    """DDP, or the local-SGD strategy with the configuration's outer optimizer, warm-up, codec and streaming."""
    # gloo on the CPU and for ranks sharing one GPU (NCCL refuses two ranks on one device)
    backend = "gloo" if cfg.get("accelerator", "cpu") == "cpu" or cfg.get("share_gpu") else "nccl"
    if cfg["mode"] == "ddp":
        return DDPStrategy(process_group_backend=backend)
    outer_optimizer: Any = cfg["mode"]
    if cfg.get("outer") is not None:
        outer_optimizer = functools.partial(torch.optim.SGD, **cfg["outer"])
    extra = {k: cfg[k] for k in STREAMING_KEYS if k in cfg}
    if cfg.get("compression"):
        extra["compression"] = cfg["compression"]
    return LocalSGDStrategy(sync_every=cfg["sync_every"], outer_optimizer=outer_optimizer,
                            warmup_steps=cfg.get("local_warmup_steps", 0), group_size=cfg["group_size"],
                            outer_state_device=cfg.get("outer_state_device"), process_group_backend=backend, **extra)


def build_trainer(cfg: dict, measure: Measure) -> L.Trainer:
    """A quiet Trainer: no logger, checkpoints, progress bar or Lightning validation (the harness evaluates)."""
    # share_gpu: every rank is the one rank of its own "node" (see harness.launch.launch), on device 0
    devices, num_nodes = (1, cfg["devices"]) if cfg.get("share_gpu") else (cfg["devices"], 1)
    return L.Trainer(
        accelerator=cfg.get("accelerator", "cpu"), devices=devices, num_nodes=num_nodes,
        strategy=build_strategy(cfg), precision=cfg.get("precision") or "32-true",
        max_steps=cfg["steps"], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[measure],
        use_distributed_sampler=True,
    )


def base_result(cfg: dict, trainer: L.Trainer, model: GPT, measure: Measure, counter: dict,
                netmodel: Optional[NetworkModel], per_window: list[float]) -> dict:
    """What every run reports: loss (curve, final, per window), clock, sizes and the Python collectives."""
    steps = trainer.global_step
    final_loss = sum(per_window) / len(per_window)
    if not measure.curve or measure.curve[-1]["step"] != steps:  # e.g. the train-end sync of a partial interval
        measure.curve.append(dict(step=steps, tokens=measure.tokens(trainer, steps),
                                  train_seconds=measure.train_seconds, val_loss=final_loss))
    local = cfg["mode"] != "ddp"
    return dict(
        name=cfg["name"], mode=cfg["mode"], devices=cfg["devices"], group_size=cfg["group_size"],
        sync_every=cfg["sync_every"] if local else 1, steps=steps, tokens=measure.tokens(trainer, steps),
        final_val_loss=final_loss, per_window=per_window, curve=measure.curve,
        train_seconds=measure.train_seconds, params=sum(p.numel() for p in model.parameters()),
        non_embedding_params=model.num_non_embedding_params, stopped_at_target=measure.stopped_at_target,
        python_collectives=counter.get("calls", 0), python_collective_bytes=counter.get("bytes", 0),
        python_collective_ops=counter.get("ops", {}), emulated_sleep_seconds=netmodel.slept if netmodel else 0.0,
    )


def step_bytes_result(measure: Measure) -> dict:
    """Cross-group bytes of every training step, their peak, and the train-end sync's bytes."""
    return dict(step_cross_bytes=measure.step_bytes, peak_step_cross_bytes=max(measure.step_bytes, default=0),
                train_end_cross_bytes=measure.train_end_bytes)


def fragment_bounds(outer_sync: Any) -> list[int]:
    """Index of every fragment's first tensor, then the tensor count: ``outer_sync.layout.fragment_bounds`` (the
    library's engine layout), or ``outer_sync.fragment_bounds`` in versions before the engine refactor."""
    layout = getattr(outer_sync, "layout", None)
    return list(layout.fragment_bounds if layout is not None else outer_sync.fragment_bounds)


def streaming_result(cfg: dict, s: LocalSGDStrategy) -> dict:
    """The streaming settings and the fragments' boundaries and sizes (parameter elements)."""
    sizes = [p.numel() for p in s.outer_sync.tensors]
    b = fragment_bounds(s.outer_sync)
    return dict(fragments=cfg.get("fragments", 1), overlap_steps=cfg.get("overlap_steps", 0),
                overlap_mix=cfg.get("overlap_mix", 0.0), fragment_bounds=b,
                fragment_numel=[sum(sizes[b[i]:b[i + 1]]) for i in range(len(b) - 1)])


def local_result(cfg: dict, s: LocalSGDStrategy, counter: dict) -> dict:
    """Local SGD / DiLoCo: warm-up bytes, syncs, bytes and state as the strategy counts them."""
    out = dict(local_warmup_steps=cfg.get("local_warmup_steps", 0), outer=cfg.get("outer"),
               warmup_bytes=cfg.get("local_warmup_steps", 0) * s.ddp_bytes_per_step)
    if cfg.get("fragments", 1) > 1 or cfg.get("overlap_steps"):
        out.update(streaming_result(cfg, s))
    out.update(num_syncs=s.outer_sync.num_syncs, bytes_sent=s.outer_sync.bytes_sent,
               state_bytes=s.outer_sync.state_bytes, ddp_bytes_per_step=s.ddp_bytes_per_step,
               sync_seconds=s.sync_seconds_total, cross_bytes=counter.get("bytes", 0))
    return out


def ddp_result(model: GPT, measure: Measure, counter: dict) -> dict:
    """DDP: the gradient bytes and time counted in the comm hook."""
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return dict(num_syncs=0, bytes_sent=measure.ddp["bytes"], state_bytes=0, ddp_bytes_per_step=grad_bytes,
                ddp_calls=measure.ddp["calls"], sync_seconds=measure.ddp["comm_seconds"],
                cross_bytes=measure.ddp["bytes"] + counter.get("bytes", 0))


def worker(cfg: dict) -> None:
    """Train the configured run; rank 0 evaluates the final model on every window and writes ``cfg["out"]``."""
    torch.set_num_threads(1)
    counter: dict = {}
    originals, netmodel = install_network_model(counter, cfg.get("net"))
    L.seed_everything(cfg["seed"], verbose=False)
    model = GPT(block_size=cfg["block_size"], **cfg["model"])
    data = TextDataModule(block_size=cfg["block_size"], batch_size=cfg["batch_size"], **cfg["data"])
    measure = Measure(cfg, counter, netmodel, originals["all_reduce"])
    trainer = build_trainer(cfg, measure)
    trainer.fit(model, data)
    if trainer.global_rank != 0:
        return
    # Final evaluation on rank 0 after the train-end sync: every rank holds the same model now.
    x, y = measure.windows(trainer)
    per_window = window_losses(model, x.to(model.device), y.to(model.device))
    result = base_result(cfg, trainer, model, measure, counter, netmodel, per_window)
    if cfg.get("step_bytes"):
        result.update(step_bytes_result(measure))
    if cfg["mode"] != "ddp":
        result.update(local_result(cfg, trainer.strategy, counter))
    else:
        result.update(ddp_result(model, measure, counter))
    with open(cfg["out"], "w") as f:
        json.dump(result, f)
