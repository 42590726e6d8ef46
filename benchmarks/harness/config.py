"""Run configurations: plain JSON-able dicts, so that a run can be described once and launched in a subprocess."""

from __future__ import annotations

from typing import Optional

DEFAULT_DATA = dict(max_tokens=8_000_000, val_fraction=0.05)

# Optional strategy settings: written to the config only when they differ from the default, so that configurations
# (and their JSON) of runs that do not use a feature stay as they were.
_OPTIONAL_DEFAULTS = dict(compression=None, local_warmup_steps=0, outer=None, fragments=1, overlap_steps=0,
                          overlap_mix=0.0, step_bytes=False, precision=None, share_gpu=False)


def run_label(mode: str, H: int) -> str:
    """How tables name a run of ``mode``: ``DDP``, ``local SGD H=16`` (averaging), ``DiLoCo H=64``."""
    return "DDP" if mode == "ddp" else f"{'local SGD' if mode == 'average' else 'DiLoCo'} H={H}"


def run_config(
    name: str,
    mode: str,
    steps: int,
    model: dict,
    batch_size: int = 16,
    block_size: int = 128,
    devices: int = 2,
    group_size: int = 1,
    sync_every: int = 16,
    eval_every: int = 0,
    val_windows: int = 256,
    seed: int = 1234,
    net: Optional[dict] = None,
    stop_at_loss: Optional[float] = None,
    outer_state_device: Optional[str] = None,
    data: Optional[dict] = None,
    accelerator: str = "cpu",
    compression: Optional[str] = None,
    local_warmup_steps: int = 0,
    outer: Optional[dict] = None,
    fragments: int = 1,
    overlap_steps: int = 0,
    overlap_mix: float = 0.0,
    step_bytes: bool = False,
    precision: Optional[str] = None,
    share_gpu: bool = False,
) -> dict:
    """A run configuration. ``mode``: ``ddp``, ``average`` (local SGD) or ``diloco``.

    ``eval_every=0`` evaluates at the start and the end only. The strategy options below (local SGD / DiLoCo only)
    are left out of the dict at their defaults:

    * ``compression``: the strategy's codec for the sync (``"bf16"``, ``"int8"``, ``"int4"``); ``None`` = fp32.
    * ``local_warmup_steps``: the strategy's ``warmup_steps``, fully synchronous steps before local SGD starts.
    * ``outer``: keyword arguments of ``torch.optim.SGD`` for the outer optimizer, e.g. ``{"lr": 0.7, "momentum":
      0.9, "nesterov": True}`` (replaces the mode's preset; ``None`` = the preset of ``mode``).
    * ``fragments``, ``overlap_steps``, ``overlap_mix``: the strategy's streaming sync.
    * ``step_bytes``: also return the cross-group bytes of every training step (``step_cross_bytes``), their maximum
      (``peak_step_cross_bytes``) and the bytes of the train-end sync (``train_end_cross_bytes``).
    * ``precision``: Lightning's ``Trainer(precision=...)``, e.g. ``"bf16-mixed"``; ``None`` = fp32.
    * ``share_gpu``: all ``devices`` processes on one GPU (``cuda:0``), joined over gloo (NCCL refuses two ranks on
      one device); see :func:`harness.launch.launch`.
    """
    if mode not in ("ddp", "average", "diloco"):
        raise ValueError(f"unknown mode {mode!r}")
    optional = dict(compression=compression, local_warmup_steps=local_warmup_steps,
                    outer=dict(outer) if outer is not None else None, fragments=fragments,
                    overlap_steps=overlap_steps, overlap_mix=overlap_mix, step_bytes=bool(step_bytes),
                    precision=precision, share_gpu=bool(share_gpu))
    return dict(
        name=name, mode=mode, steps=steps, model=model, batch_size=batch_size, block_size=block_size,
        devices=devices, group_size=group_size, sync_every=sync_every, eval_every=eval_every,
        val_windows=val_windows, seed=seed, net=net, stop_at_loss=stop_at_loss,
        outer_state_device=outer_state_device, data={**DEFAULT_DATA, **(data or {})}, accelerator=accelerator,
        **{k: v for k, v in optional.items() if v != _OPTIONAL_DEFAULTS[k]},
    )
