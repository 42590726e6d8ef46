"""``TrainingState``: the exact training state of one rank, used by checkpoints and by federated healing alike.

A rank's state falls into three parts, by who else holds the same copy:

- the **group state**: identical on every rank of a worker group: the LR schedulers, and with DDP inside the group
  the model replica and the inner optimizers. Lightning's checkpoint keys, ``state_dict`` / ``optimizer_states`` /
  ``lr_schedulers``, so a group state is a piece of a plain Lightning checkpoint.
- the **rank state**: this rank's own. The local-SGD engines (its slice of ``θ_g``, the outer optimizer state, the
  error-feedback buffers, streaming syncs in flight) and, with sharding inside the group (FSDP), the parameter shards
  and their inner optimizer state.
- the **counters**: the layout and the schedule (:meth:`LocalSGDController.meta`), the same on every rank at a sync
  boundary, plus Lightning's step counters, which a checkpoint carries in its ``loops`` and healing sets by hand.

One subclass per strategy kind says where each part lives (:class:`ReplicaState` for DDP, :class:`ShardedState` for
FSDP2, :class:`ZeroState` for DeepSpeed). Checkpoints (:mod:`lightning_localsgd.checkpoint`) write the group state once
per group and the rank state once per rank; healing (:class:`~lightning_localsgd.federation.Federation`) sends all
three parts of one live peer with :meth:`TrainingState.capture` and applies them with :meth:`TrainingState.load`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from . import _compat
from .fsdp2 import load_full_state_dict, local_to_dtensor, reshard
from .tensors import _map, dtensor_to_local, local_view, to_cpu
from .zero import master_partitions

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["GROUP_KEYS", "ReplicaState", "ShardedState", "TrainingState", "ZeroState", "set_data_counters",
           "set_trainer_counters"]

#: The keys of Lightning's checkpoint dict that hold a worker group's replica (identical on the group's ranks).
GROUP_KEYS = ("state_dict", "optimizer_states", "lr_schedulers")


class TrainingState:
    """The exact training state of one rank of a local-SGD strategy (see the module docstring for its three parts).

    Args:
        strategy: the local-SGD strategy (a :class:`~lightning_localsgd.strategies.base.LocalSGDMixin`) whose rank
            this is; only read, when a part is asked for.
    """

    kind = "replica"
    #: Whether the rank states hold the model (sharded inside the group) rather than one group state per group.
    holds_model_per_rank = False
    #: Whether this rank's own checkpoint files hold its part of the model (FSDP's shards), so that validate / test /
    #: predict read them too; otherwise those read group 0's model.
    model_in_rank_files = False

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    # ------------------------------------------------------------------ parts
    @property
    def trainer(self) -> "Trainer":
        return self.strategy.lightning_module.trainer

    def group_state(self) -> dict[str, Any]:
        """The worker group's replica, under Lightning's checkpoint keys (live references, not copies). Every kind
        has its LR schedulers here; the model and the inner optimizers only where the group's ranks hold one replica
        (sharded inside the group, they are in the rank state)."""
        trainer = self.trainer
        state: dict[str, Any] = {}
        if not self.holds_model_per_rank:
            state["state_dict"] = self.strategy.lightning_module.state_dict()
            state["optimizer_states"] = [o.state_dict() for o in trainer.optimizers]
        state["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        return state

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state: the local-SGD engines (``θ_g`` slice, outer optimizer, error feedback)."""
        return dict(self.strategy.local_sgd.rank_state())

    def counters(self) -> dict[str, Any]:
        """The layout, the schedule and Lightning's step counters."""
        trainer = self.trainer
        loop = trainer.fit_loop.epoch_loop
        return {"local_sgd": self.strategy.local_sgd.meta(trainer.world_size, kind=self.kind),
                "global_step": loop.global_step, "batches_that_stepped": _compat.batches_that_stepped(loop)}

    # ------------------------------------------------------------------ restore
    @torch.no_grad()
    def load_group_state(self, state: Mapping[str, Any]) -> None:
        """Apply a group state (healing; a checkpoint's goes through Lightning's own restore)."""
        trainer = self.trainer
        if not self.holds_model_per_rank:
            self.strategy.lightning_module.load_state_dict(state["state_dict"])
            for optimizer, saved in zip(trainer.optimizers, state.get("optimizer_states") or []):
                optimizer.load_state_dict(saved)
        for config, saved in zip(trainer.lr_scheduler_configs, state.get("lr_schedulers") or []):
            config.scheduler.load_state_dict(saved)

    def load_rank_state(self, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Restore this rank's engines and the local-SGD counters of ``meta`` (now, or once the engines exist)."""
        self.strategy.local_sgd.restore(meta, state.get("outer"), state.get("cluster"))

    # ------------------------------------------------------------------ resume
    def restore(self, checkpoint: dict[str, Any], layout: Optional[Mapping[str, Any]],
                mine: Optional[Mapping[str, Any]], fitting: bool) -> None:
        """Resume from a checkpoint: apply what :func:`~lightning_localsgd.checkpoint.restore_checkpoint` read for
        this rank (``layout``: the local-SGD layout and counters, ``None`` for a plain Lightning checkpoint; ``mine``:
        this rank's rank state). What stays in ``checkpoint`` goes through Lightning's own restore."""
        if fitting and layout is not None:
            self.load_rank_state(mine or {}, layout)

    # ------------------------------------------------------------------ healing
    def capture(self) -> dict[str, Any]:
        """All three parts, cloned to the CPU: what a live peer sends a healing group (see ``federation``)."""
        return _map({"kind": self.kind, "group": self.group_state(), "rank": self.rank_state(),
                     "counters": self.counters()}, lambda t: t.detach().cpu().clone())

    def load(self, state: Mapping[str, Any]) -> None:
        """Apply what :meth:`capture` returned on a peer (same strategy kind and layout)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"cannot load the training state of a {state.get('kind')!r} strategy into a "
                             f"{self.kind!r} one: every group of a run must use the same strategy.")
        self.load_group_state(state["group"])
        counters = state["counters"]
        self.load_rank_state(state["rank"], counters["local_sgd"])
        set_trainer_counters(self.trainer, int(counters["global_step"]), int(counters["batches_that_stepped"]))

    def _group_source(self) -> Optional[int]:
        """The global rank of the group's first rank, whose healed state the group keeps; ``None`` without a group of
        several ranks (nothing to agree on)."""
        topology = self.strategy.topology
        if topology is None or topology.inner_group is None:
            return None
        return topology.group_index * topology.group_size

    def agree_after_healing(self) -> None:
        """After every rank of the group loaded a live peer's state (collective inside the group): every rank keeps
        what the group's first rank received of what is the same on the group's ranks. torchft heals rank ``k`` from
        the live group it assigns to rank ``k`` (``(i + k) mod`` the up-to-date groups), which differs between ranks
        when several groups are live; with time-based syncs those groups are at different steps at a sync, so their
        states differ in Lightning's step counters, the LR schedulers, the optimizers' hyper-parameters (``lr``, ...)
        and the local-SGD counters (schedule, tokens, skips, data record). Unagreed, the ranks of one group would train
        with different learning rates and stop at different steps (the first to stop leaves the others in a
        collective until the timeout). They go as one object from the first rank. Each rank keeps its own engines
        (``θ_g`` slice, outer state: the same on every live group after the sync they committed) and, sharded inside
        the group, its own shard."""
        import torch.distributed as dist

        src = self._group_source()
        if src is None:
            return
        trainer = self.trainer
        first = [{
            "counters": self.counters(),
            "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "param_groups": [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups]
                             for o in trainer.optimizers],
        } if dist.get_rank() == src else None]
        dist.broadcast_object_list(first, src=src, group=self.strategy.topology.inner_group)
        if dist.get_rank() == src:
            return
        agreed = first[0]
        for optimizer, groups in zip(trainer.optimizers, agreed["param_groups"]):
            for group, hyper in zip(optimizer.param_groups, groups):
                group.update(hyper)
        for config, saved in zip(trainer.lr_scheduler_configs, agreed["lr_schedulers"]):
            config.scheduler.load_state_dict(saved)
        counters = agreed["counters"]
        self.strategy.local_sgd.restore(counters["local_sgd"], None, None)  # the counters only: the engines stay
        set_trainer_counters(trainer, int(counters["global_step"]), int(counters["batches_that_stepped"]))


class ReplicaState(TrainingState):
    """DDP inside each worker group: the group's ranks hold one replica; each rank syncs its own slice of it."""

    @torch.no_grad()
    def agree_after_healing(self) -> None:
        """The group's ranks hold one replica: they also keep the tensors its first rank received (rank ``k`` may have
        healed from another live group, whose inner optimizer state differs), broadcast inside the group."""
        import torch.distributed as dist

        src = self._group_source()
        if src is None:
            return
        tensors = [t for t in self.strategy.lightning_module.state_dict().values() if isinstance(t, Tensor)]
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    tensors += [state[k] for k in sorted(state) if isinstance(state[k], Tensor)]
        for t in tensors:
            dist.broadcast(t, src=src, group=self.strategy.topology.inner_group)
        super().agree_after_healing()

    def restore(self, checkpoint: dict[str, Any], layout: Optional[Mapping[str, Any]],
                mine: Optional[Mapping[str, Any]], fitting: bool) -> None:
        """The group's replica goes through Lightning's restore; after an elastic resume it starts from ``θ_g``."""
        if mine is not None and mine.get("outer") is not None and mine["outer"].get("merged"):
            self.start_from_global(checkpoint, mine["outer"])
        super().restore(checkpoint, layout, mine, fitting)
        if fitting and layout is None and checkpoint.get("loops") is not None and self.strategy.world_size > 1:
            rank_zero_warn(
                "Resuming from a checkpoint without local-SGD state (e.g. written by plain DDP): local SGD starts a "
                "new interval from rank 0's weights."
            )

    def start_from_global(self, checkpoint: dict[str, Any], merged: Mapping[str, Any]) -> None:
        """Elastic resume: the trainable parameters of ``checkpoint["state_dict"]`` become ``θ_g`` (the merged
        snapshot of :func:`~lightning_localsgd.engine.outer.merge_outer_states`), so every group starts from it."""
        module = self.strategy.lightning_module
        snapshot, offset, values = merged["snapshot"], 0, {}
        for p in (p for p in module.parameters() if p.requires_grad):  # the order the engine flattens them in
            values[id(p)] = snapshot[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        state_dict = dict(checkpoint["state_dict"])
        for key, t in module.state_dict(keep_vars=True).items():  # tied parameters appear under several keys
            if id(t) in values:
                state_dict[key] = values[id(t)]
        checkpoint["state_dict"] = state_dict


class ShardedState(TrainingState):
    """FSDP2 inside each worker group: each rank holds its parameter shards and their inner optimizer state."""

    kind = "sharded"
    holds_model_per_rank = True
    model_in_rank_files = True

    def rank_state(self) -> dict[str, Any]:
        module = self.strategy.lightning_module
        reshard(module)  # a checkpoint right after a validation pass: read the shards, not the gathered tensors
        return {
            "params": {n: local_view(p.detach()).cpu().clone() for n, p in module.named_parameters()},
            "buffers": {n: b.detach().cpu().clone() for n, b in module.named_buffers()},
            "optimizers": [to_cpu(dtensor_to_local(o.state_dict())) for o in self.strategy.optimizers],
            **super().rank_state(),
        }

    @torch.no_grad()
    def load_rank_state(self, state: Mapping[str, Any], meta: Mapping[str, Any], fitting: bool = True) -> None:
        module = self.strategy.lightning_module
        for name, p in module.named_parameters():
            local_view(p.detach()).copy_(state["params"][name])
        for name, b in module.named_buffers():
            if name in state["buffers"]:
                b.copy_(state["buffers"][name])
        if fitting:
            for optimizer, saved in zip(self.strategy.optimizers, state["optimizers"]):
                optimizer.load_state_dict(local_to_dtensor(saved, optimizer))
            super().load_rank_state(state, meta)

    def restore(self, checkpoint: dict[str, Any], layout: Optional[Mapping[str, Any]],
                mine: Optional[Mapping[str, Any]], fitting: bool) -> None:
        """This rank's shards (and, in ``fit``, their inner optimizer state) from its own file; a plain Lightning
        checkpoint's full weights are cut into this rank's shards (its inner optimizers start afresh)."""
        if layout is None:
            load_full_state_dict(self.strategy.model, checkpoint)
            checkpoint.pop("optimizer_states", None)
            return
        assert mine is not None
        self.load_rank_state(mine, layout, fitting=fitting)
        for key in ("state_dict", "optimizer_states"):
            checkpoint.pop(key, None)  # restored above, shard by shard

    def shard_layout(self) -> dict[str, Any]:
        """What the converter needs to rebuild the full model from a group's rank states: each parameter's full
        shape and sharded dimension, which parameter or buffer each ``state_dict`` key holds (tied weights appear
        under several keys) and which parameter each inner optimizer's state index is."""
        module = self.strategy.lightning_module
        params = {}
        for name, p in module.named_parameters():
            dims = [placement.dim for placement in getattr(p, "placements", ()) if hasattr(placement, "dim")]
            params[name] = {"shape": list(p.shape), "dim": dims[0] if dims else None}
        names = {id(t): n for n, t in [*module.named_buffers(), *module.named_parameters()]}
        keys = {key: names[id(t)] for key, t in module.state_dict(keep_vars=True).items() if id(t) in names}
        optimizers = [[names.get(id(p)) for g in o.param_groups for p in g["params"]] for o in self.strategy.optimizers]
        return {"params": params, "state_dict": keys, "optimizers": optimizers}


class ZeroState(TrainingState):
    """DeepSpeed ZeRO inside each worker group: in a checkpoint the model and optimizer partitions are in DeepSpeed's
    own files (written per rank by DeepSpeed) and the rank state holds the local-SGD engines. Healing
    (:meth:`capture`) sends this rank's partition instead: its fp32 master partitions and the inner optimizer's state
    of them (what ZeRO trains from), never the full model."""

    kind = "zero"
    holds_model_per_rank = True

    def capture(self) -> dict[str, Any]:
        optimizer = self.strategy.zero_optimizer
        masters = master_partitions(optimizer)
        inner = optimizer.optimizer.state  # keyed by the master partitions (ZeRO-3 empties param_groups between steps)
        partition = {"master": masters, "inner": [dict(inner.get(m, {})) for m in masters]}
        state = {"kind": self.kind,
                 "group": self.group_state(),
                 "rank": {**self.rank_state(), "partition": partition}, "counters": self.counters()}
        return _map(state, lambda t: t.detach().cpu().clone())

    @torch.no_grad()
    def load_rank_state(self, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        partition = state.get("partition")
        if partition is not None:  # healing: a live peer's partition of the same rank (a checkpoint's is DeepSpeed's)
            optimizer = self.strategy.zero_optimizer
            masters = master_partitions(optimizer)
            if [m.numel() for m in masters] != [m.numel() for m in partition["master"]]:
                raise ValueError("cannot heal from a peer whose ZeRO partitions differ from this rank's "
                                 f"({[m.numel() for m in partition['master']]} vs {[m.numel() for m in masters]} "
                                 "elements): every job must use the same model, world size and ZeRO stage.")
            for mine, theirs, inner in zip(masters, partition["master"], partition["inner"]):
                mine.copy_(theirs)
                optimizer.optimizer.state[mine] = {k: v.to(mine.device) if isinstance(v, Tensor) else v
                                                   for k, v in inner.items()}
            # the module's (bit16) parameters follow the partitions after the sync this healing is part of
        super().load_rank_state(state, meta)

    def restore(self, checkpoint: dict[str, Any], layout: Optional[Mapping[str, Any]],
                mine: Optional[Mapping[str, Any]], fitting: bool) -> None:
        """The partitions were loaded by DeepSpeed (``read_partitions``); this rank's engines follow them."""
        if fitting and mine is not None and layout is not None:
            self.load_rank_state(mine, layout)
            if self.strategy.outer_sync is not None:
                self.strategy.outer_sync.rebind(master_partitions(self.strategy.zero_optimizer))


def set_trainer_counters(trainer: "Trainer", global_step: int, batches_that_stepped: int) -> None:
    """Lightning's step counters, which no state_dict carries outside a checkpoint's ``loops``: ``max_steps`` and
    logging follow them."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        progress = loop.manual_optimization.optim_step_progress.total
    progress.ready = progress.completed = global_step
    _compat.set_batches_that_stepped(loop, batches_that_stepped)


def set_data_counters(trainer: "Trainer", epoch: int, batches: int) -> None:
    """Lightning's epoch and batch counters of a training that continues its data at ``batches`` of ``epoch`` (before
    the epoch's iteration starts): the sampler's epoch follows the first, the end of the epoch the second. Each
    counter's fields move by the same amount, so that those of a fit resumed mid-epoch keep the relation Lightning's
    restart expects between them (a checkpoint taken at a batch's end has one batch processed, not yet completed)."""
    for progress, value in ((trainer.fit_loop.epoch_progress.current, epoch),
                            (trainer.fit_loop.epoch_loop.batch_progress.current, batches)):
        shift = value - progress.processed
        progress.ready, progress.started = progress.ready + shift, progress.started + shift
        progress.processed, progress.completed = progress.processed + shift, progress.completed + shift

