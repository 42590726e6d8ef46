"""One federated worker group (one job, one CPU process) training the tiny model; dumps what the tests compare.

    python tests/workers/train_federated.py --lighthouse HOST:PORT --group-id g0 --seed 0 --out DIR [options]

Each group reads the dataset in its own order (``--seed``), so groups drift apart between syncs. With
``--cluster-sync-every`` the job holds several worker groups (``--group-size`` ranks each) syncing inside it every
``--sync-every`` steps and across jobs every ``--cluster-sync-every`` (two levels). The job writes ``DIR/{group_id}.pt``
(rank ``r > 0``: ``DIR/{group_id}_r{r}.pt``) at the end (or right before ``--die-at-step`` SIGKILLs it): the parameters
after every step, the sync attempts (step, participants, weight, committed, seconds) and the step the job started
training from.

``--warmup-steps``, ``--sync-every-seconds`` (with ``--step-sleep``: a slower job) and ``--schedule growing`` (a
schedule registered here) select the sync features.

``--ckpt-dir`` writes the job's own checkpoints (every ``--ckpt-every`` steps; ``--async-save``: in the background,
each rank file's write first sleeping ``--write-delay`` s, and the stall of every save is dumped as ``save_seconds``);
``--resume`` continues from one. ``--resumable-data`` reads the job's order through a loader that resumes mid-epoch
(the example data module's), so a resumed job reads the batches an uninterrupted one would.

``--lr-decay G`` adds an LR scheduler (the inner LR times ``G`` after every step). The dump holds, per rank, the
global step of every peer state it healed from (``healed_steps``) and, at the start of its first step after its last
heal, the global step, the LRs, the LR schedulers' states and the local-SGD counters (``after_heal``).

``--die-in-sync-at-step N`` SIGKILLs the job *inside* the sync of step N: in its cross-group all-reduce (or, with
``--compression``, the all-to-all of phase 1), after the quorum of that attempt formed (the others already count it
in) and before its data goes out, so the others' reduce cannot complete and their attempt fails. With streaming
(``--fragments``, ``--overlap-steps``) that is the sync a fragment starts at step N. Every all-reduce / all-to-all
records what the sync reads and must not have written yet (``θ_g``, ``θ_i``, the outer optimizer state, the error
feedback of compressed syncs) under ``reduces`` in the dump.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import GrowingSchedule, TinyModule, ValidatedTinyModule, make_dataset

from lightning_localsgd import LocalSGDStrategy, register_schedule
from lightning_localsgd.federation import Federation, TorchftCommunicator


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (no collective), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_params(module) -> dict[str, torch.Tensor]:
    """Whole parameters: FSDP2 shards (DTensors) and ZeRO-3 partitions gathered inside the job (collective there);
    ZeRO 1-2 keep whole parameters on every rank."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {k: v.detach().clone() for k, v in module.named_parameters()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.named_parameters()}


class Recorder(Callback):
    """Parameters after every step (after the strategy's own step-end sync); the dump; the self-kill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.steps: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.start_step = -1
        self.start_params: dict[str, torch.Tensor] = {}
        self.reduces: list[dict] = []
        self.start_error = None
        self.start_engines: dict = {}
        self.engines: list[tuple[int, dict]] = []
        """With two levels: both engines' states after every step."""
        self.trainer = None
        self.save_seconds: list[float] = []
        """With ``--ckpt-dir``: how long each save kept the training thread."""
        self.healed_steps: list[int] = []
        """The global step of each live peer's state this rank loaded (healing)."""
        self.after_heal: dict = {}
        """At the start of the first step after the last heal: the step, LRs, LR schedulers and local-SGD counters."""
        self.heals_seen = 0

    def on_all_reduce(self, comm: TorchftCommunicator) -> None:
        """Entering a cross-group all-reduce: record the state it starts from; the self-kill inside a sync."""
        strategy = self.trainer.strategy
        fed, outer = strategy.local_sgd.syncs, strategy.outer_sync  # the controller's syncs: the federation
        full = outer.state_dict()
        state = full["outer_optimizer"]
        self.reduces.append({
            "attempt": len(fed.attempts), "step": strategy.local_sgd.schedule.steps_done,
            "participants": comm.size, "trained": fed.trained,
            "snapshot": [s.detach().clone() for s in outer.snapshot],
            "params": {k: local(v).detach().clone() for k, v in self.trainer.lightning_module.named_parameters()},
            "momentum": {k: v["momentum_buffer"].clone() for k, v in state["state"].items()} if state else {},
            "error": full["compression_error"], "mean_error": full["compression_mean_error"],
        })
        if self.reduces[-1]["step"] == self.args.die_in_sync_at_step and fed.trained:
            self.dump(self.trainer, self.trainer.lightning_module, killed=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer
        self.dump_name = self.args.dump_name + (f"_r{trainer.global_rank}" if trainer.global_rank > 0 else "")

    def on_fit_start(self, trainer, pl_module):
        """``--barrier N``: wait (after this job's manager started heartbeating) until N jobs got here, so that the
        first quorum holds all of them whatever their start-up times."""
        open(os.path.join(self.args.out, f"ready_{self.args.dump_name}"), "w").close()
        if self.args.barrier:
            deadline = time.monotonic() + 120
            while sum(f.startswith("ready_") for f in os.listdir(self.args.out)) < self.args.barrier:
                assert time.monotonic() < deadline, "the other jobs did not start"
                time.sleep(0.1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.args.step_sleep > 0:  # a slower machine: this job's step takes that much longer
            time.sleep(self.args.step_sleep)
        if trainer.global_step == self.args.wait_at_step:  # `--wait-for NAME`: until job NAME's manager runs
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(self.args.out, f"ready_{self.args.wait_for}")):
                assert time.monotonic() < deadline, f"job {self.args.wait_for} did not start"
                time.sleep(0.1)
        if self.start_step < 0:  # after the join (healing) of on_train_start, before the first inner step
            self.start_step = trainer.global_step
            self.start_params = full_params(pl_module)
            self.start_error = trainer.strategy.outer_sync.state_dict()["compression_error"]
            self.start_engines = self.engine_states(trainer.strategy)
        if len(self.healed_steps) > self.heals_seen:
            self.heals_seen = len(self.healed_steps)
            meta = trainer.strategy.local_sgd.meta(trainer.world_size)
            self.after_heal = {
                "step": trainer.global_step, "lrs": [g["lr"] for o in trainer.optimizers for g in o.param_groups],
                "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
                # (not sync_seconds_total: each rank adds the seconds it measured itself)
                "counters": {k: copy.deepcopy(meta.get(k)) for k in
                             ("schedule", "tokens_since_sync", "consecutive_skips", "data_shares")},
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, full_params(pl_module)))
        if trainer.strategy.cluster_sync is not None:
            self.engines.append((trainer.global_step, self.engine_states(trainer.strategy)))
        if trainer.global_step == self.args.mark_at_step:  # tells the test this job got here
            open(os.path.join(self.args.out, f"at_{self.args.dump_name}"), "w").close()
        if trainer.global_step == self.args.die_at_step:
            self.dump(trainer, pl_module, killed=True)
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def engine_states(strategy) -> dict:
        """Both levels' engine states (θ_c slice / θ_g piece, outer optimizer state), with two levels."""
        # deep copies: an optimizer's state_dict holds its live state tensors
        return copy.deepcopy({"outer": strategy.outer_sync.state_dict(),
                              "cluster": strategy.cluster_sync.state_dict() if strategy.cluster_sync else None})

    @staticmethod
    def cluster_record(strategy) -> dict:
        """Two levels (``--cluster-sync-every``): the level-2 engine's piece of θ_g, its syncs and bytes."""
        cluster = strategy.cluster_sync
        if cluster is None:
            return {}
        return {"cluster_snapshot": [s.detach().clone() for s in cluster.snapshot], "cluster_syncs": cluster.num_syncs,
                "cluster_bytes": cluster.bytes_sent, "group_size": strategy.group_size,
                "cluster_state": cluster.state_dict()["outer_optimizer"],
                "cluster_size": strategy.cluster_size}

    def dump(self, trainer, pl_module, killed: bool = False) -> None:
        fed = trainer.strategy.local_sgd.syncs
        outer = trainer.strategy.outer_sync
        name = self.args.dump_name + (f"_r{trainer.global_rank}" if trainer.global_rank > 0 else "")
        torch.save({
            "group_id": self.args.group_id, "seed": self.args.seed, "killed": killed, "steps": self.steps,
            "start_step": self.start_step, "start_params": self.start_params,
            "final": full_params(pl_module),
            "attempts": fed.attempts, "healed": fed.healed_from_peer, "heal_bytes": fed.healed_bytes,
            "dropped": fed.dropped_weight, "global_step": trainer.global_step,
            "snapshot": [s.detach().clone() for s in outer.snapshot],
            "outer_state": outer.state_dict()["outer_optimizer"], "reduces": self.reduces,
            "compression_error": outer.state_dict()["compression_error"], "start_error": self.start_error,
            "pending": sorted(outer.pending, key=lambda f: -1 if f is None else f),
            "num_syncs": outer.num_syncs, **self.cluster_record(trainer.strategy),
            "screened_total": outer.screen.excluded_total if outer.screen is not None else None,
            "screen": outer.screen.state_dict() if outer.screen is not None else None,
            "start_engines": self.start_engines, "engines": self.engines,
            "inner_state": [{k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)}
                            for o in trainer.optimizers for st in o.state.values()],
            "rank": trainer.global_rank, "strategy": type(trainer.strategy).__name__,
            "alone_at_start": fed.alone_at_start, "save_seconds": self.save_seconds,
            "saved_async": trainer.strategy._async_writer is not None,
            "validation_batches": getattr(pl_module, "validation_batches", 0),
            "ledger": getattr(pl_module, "ledger", None), "epochs": getattr(pl_module, "epochs", None),
            "data_positions": dict(fed.data_positions), "data_summary": fed.data_summary,
            "data_departures": [d.as_dict() for d in fed.data_shares.departures] if fed.data_shares else [],
            "healed_steps": self.healed_steps, "after_heal": self.after_heal,
            "lrs": [g["lr"] for o in trainer.optimizers for g in o.param_groups],
        }, os.path.join(self.args.out, f"{name}.pt"))


def make_strategy(args: argparse.Namespace):
    """The job's strategy with every sync feature the options select."""
    federated = dict(sync_every=args.sync_every, outer_optimizer=args.outer, lighthouse=args.lighthouse,
                     group_id=args.group_id, min_groups=args.min_groups, sync_timeout=args.sync_timeout,
                     process_group_backend="gloo", compression=args.compression, fragments=args.fragments,
                     overlap_steps=args.overlap_steps, warmup_steps=args.warmup_steps,
                     sync_every_seconds=args.sync_every_seconds, sync_schedule=args.schedule,
                     async_save=args.async_save, screen_factor=args.screen_factor)
    if args.screen_min_cosine is not None:
        federated["screen_min_cosine"] = args.screen_min_cosine
    if args.async_sync:
        federated["async_sync"] = True
    if args.overlap_steps:
        federated["overlap_mix"] = args.overlap_mix
    if args.group_size is not None:
        federated["group_size"] = args.group_size
    if args.data_jobs is not None:
        federated.update(data_jobs=args.data_jobs, data_job_index=args.data_job_index)
        if args.data_rebalance_after is not None:
            federated["data_rebalance_after"] = args.data_rebalance_after or None  # 0: never
    if args.run_secret_file is not None:
        federated["run_secret_file"] = args.run_secret_file
    if args.cluster_sync_every is not None:
        federated.update(cluster_sync_every=args.cluster_sync_every, cluster_outer_optimizer=args.cluster_outer)
    if args.strategy == "fsdp":
        from lightning_localsgd import LocalSGDFSDPStrategy

        return LocalSGDFSDPStrategy(**federated)
    if args.strategy == "deepspeed":
        from lightning_localsgd import LocalSGDDeepSpeedStrategy

        return LocalSGDDeepSpeedStrategy(stage=args.stage, logging_batch_size_per_gpu=2, **federated)
    return LocalSGDStrategy(**federated)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lighthouse", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--outer", default="average")
    parser.add_argument("--min-groups", type=int, default=1)
    parser.add_argument("--sync-timeout", type=float, default=60.0)
    parser.add_argument("--die-at-step", type=int, default=-1)
    parser.add_argument("--die-in-sync-at-step", type=int, default=-1)
    parser.add_argument("--barrier", type=int, default=0)
    parser.add_argument("--dump-name", default=None, help="default: the group id")
    parser.add_argument("--wait-for", default=None)
    parser.add_argument("--wait-at-step", type=int, default=-1)
    parser.add_argument("--devices", type=int, default=1, help="ranks of this job (DDP inside it)")
    parser.add_argument("--compression", default=None)
    parser.add_argument("--fragments", type=int, default=1)
    parser.add_argument("--overlap-steps", type=int, default=0)
    parser.add_argument("--overlap-mix", type=float, default=0.0)
    parser.add_argument("--group-size", type=int, default=None, help="ranks per worker group inside the job")
    parser.add_argument("--cluster-sync-every", type=int, default=None, help="several groups per job: H2 across jobs")
    parser.add_argument("--cluster-outer", default="diloco")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--sync-every-seconds", type=float, default=None, help="time-based, token-weighted syncs")
    parser.add_argument("--schedule", default=None, help="a schedule registered here: 'growing'")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds each step of this job sleeps")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed"], help="inside the job")
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage with --strategy deepspeed")
    parser.add_argument("--ckpt-dir", default=None, help="this job's own checkpoints, every --ckpt-every steps")
    parser.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (--sync-every)")
    parser.add_argument("--async-save", action="store_true", help="the strategy's async_save=True")
    parser.add_argument("--async-sync", action="store_true", help="the strategy's async_sync=True")
    parser.add_argument("--write-delay", type=float, default=0.0, help="seconds each checkpoint rank file write sleeps")
    parser.add_argument("--resumable-data", action="store_true", help="a loader that resumes mid-epoch")
    parser.add_argument("--resume", default=None, help="a checkpoint (folder) of this job to resume from")
    parser.add_argument("--shard", default="", choices=["", "group"],
                        help="'group': the module shards itself in configure_model (FSDP2 over the job's mesh)")
    parser.add_argument("--inner", default="sgd", choices=["sgd", "momentum"], help="the inner optimizer")
    parser.add_argument("--screen-factor", type=float, default=None, help="the robust screen (screen_factor=)")
    parser.add_argument("--screen-min-cosine", type=float, default=None,
                        help="the screen's direction test (screen_min_cosine=)")
    parser.add_argument("--loss-scale", type=float, default=1.0,
                        help="this job's loss (a broken job) scaled by this (-1: SGD ascends, a sign-flipped job)")
    parser.add_argument("--hidden", type=int, default=8, help="the tiny model's hidden width (another model: 16)")
    parser.add_argument("--data-jobs", type=int, default=None, help="the jobs partition one dataset (data_jobs)")
    parser.add_argument("--data-job-index", type=int, default=None, help="this job's share with --data-jobs")
    parser.add_argument("--data-rebalance-after", type=int, default=None,
                        help="data_rebalance_after with --data-jobs (0: None, never)")
    parser.add_argument("--ledger-size", type=int, default=0,
                        help="train on the first N samples, each carrying its index; the dump's ledger lists them")
    parser.add_argument("--validate-every", type=int, default=0, help="a validation loop every N steps during fit")
    parser.add_argument("--lr-decay", type=float, default=0.0,
                        help="an LR scheduler: the inner LR times this after every step (0: none)")
    parser.add_argument("--mark-at-step", type=int, default=-1, help="write DIR/at_{dump name} after this step")
    parser.add_argument("--run-secret-file", default=None, help="the strategy's run_secret_file")
    parser.add_argument("--secret-env-file", default=None,
                        help="LOCALSGD_RUN_SECRET is set to this file's content (the run secret from the environment)")
    args = parser.parse_args()
    if args.secret_env_file is not None:
        with open(args.secret_env_file) as f:
            os.environ["LOCALSGD_RUN_SECRET"] = f.read()
    args.dump_name = args.dump_name or args.group_id
    if args.devices > 1:  # Lightning's DistributedSampler splits this job's own order (seed --seed) over its ranks
        os.environ["PL_GLOBAL_SEED"] = str(args.seed)
    if args.data_jobs is not None:  # one order for every job, partitioned over them
        os.environ["PL_GLOBAL_SEED"] = "0"
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)  # every group starts from the same weights
    model = (ValidatedTinyModule if args.validate_every else TinyModule)(
        args.inner, hidden=args.hidden, shard=args.shard, loss_scale=args.loss_scale, loss_scale_group=0)
    loader = DataLoader(make_dataset(), batch_size=2, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    if args.devices > 1:
        loader = DataLoader(make_dataset(), batch_size=2, shuffle=True)
    if args.resumable_data:  # the same order (epoch 0: a permutation of seed --seed), skipping what a resume trained
        from lightning_localsgd.data import ResumableDataLoader
        from lightning_localsgd.examples.data import EpochShuffleSampler

        data = make_dataset()
        loader = ResumableDataLoader(data, batch_size=2, sampler=EpochShuffleSampler(data, args.seed))
    if args.ledger_size:  # the samples' indices recorded per training step (train_ledger.py's module)
        from train_ledger import IndexedDataset, LedgerModule

        model = LedgerModule(inner=args.inner, hidden=args.hidden, shard=args.shard)
        loader = DataLoader(IndexedDataset(args.ledger_size), batch_size=2, shuffle=True)
    if args.lr_decay:
        configure = model.configure_optimizers

        def with_scheduler():
            optimizer = configure()
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        model.configure_optimizers = with_scheduler
    if args.schedule == "growing":
        register_schedule("growing", lambda c: GrowingSchedule(c.sync_every, c.warmup_steps), override=True)
    recorder = Recorder(args)
    all_reduce, all_to_all = TorchftCommunicator.all_reduce, TorchftCommunicator.all_to_all

    def recorded_all_reduce(comm, tensor, op="sum", async_op=False):
        recorder.on_all_reduce(comm)
        return all_reduce(comm, tensor, op, async_op)

    def recorded_all_to_all(comm, output, input, async_op=False):
        recorder.on_all_reduce(comm)
        return all_to_all(comm, output, input, async_op)

    load_state_dict = Federation.load_state_dict

    def recorded_load_state_dict(fed, state):  # which peer state this rank heals from
        recorder.healed_steps.append(int(state["training"]["counters"]["global_step"]))
        return load_state_dict(fed, state)

    Federation.load_state_dict = recorded_load_state_dict
    # this job's own communicator (fault injection, records)
    TorchftCommunicator.all_reduce, TorchftCommunicator.all_to_all = recorded_all_reduce, recorded_all_to_all
    callbacks = [recorder]
    if args.ckpt_dir:  # per-job checkpoints: every rank of this job writes its own files of each folder
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, filename="{step}",
                                         every_n_train_steps=args.ckpt_every or args.sync_every,
                                         save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.max_steps, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=args.devices > 1, callbacks=callbacks,
        strategy=make_strategy(args),
        **(dict(val_check_interval=args.validate_every, limit_val_batches=2) if args.validate_every else {}),
    )
    if args.write_delay:
        from train_tiny import slow_or_failing_writes

        slow_or_failing_writes(argparse.Namespace(write_delay=args.write_delay, write_delay_from=0, write_fail_rank=-1,
                                                  write_fail_step=-1), trainer.global_rank)
    if args.ckpt_dir:
        from train_tiny import time_saves

        time_saves(trainer.strategy, recorder.save_seconds)
    val_loader = DataLoader(make_dataset(), batch_size=2) if args.validate_every else None
    trainer.fit(model, loader, val_loader, ckpt_path=args.resume)
    recorder.dump(trainer, model)


if __name__ == "__main__":
    main()
