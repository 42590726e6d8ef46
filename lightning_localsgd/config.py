"""The local-SGD arguments: declared, documented and validated once, shared by every strategy.

:class:`LocalSGDConfig` holds the arguments every local-SGD strategy takes. :func:`local_sgd_arguments` adds them to a
strategy class: to its constructor's signature (so LightningCLI / jsonargparse build them from YAML and list them in
``--help``) and to its docstring's ``Args:`` section, from :data:`ARGUMENT_DOCS`. A strategy's own ``__init__`` takes
them in ``**kwargs`` and hands them to :meth:`LocalSGDConfig.from_kwargs`, which validates them before training.
"""

import inspect
import math
import textwrap
import typing
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Callable, Literal, Mapping, Optional, TypeVar, Union

import torch

from .engine.codecs import check_codec
from .engine.presets import (OuterOptimizerFactory, OuterOptimizerSpec, check_outer_optimizer_factory,
                             outer_optimizer_name, resolve_outer_optimizer)
from .engine.schedules import SyncSchedule, build_schedule
from .engine.screen import PseudoGradientScreen, check_screen_arguments
from . import support
from .federation import check_lighthouse_address
from .reliability import check_sync_timeout
from .run_secret import check_run_secret_file

__all__ = ["ARGUMENT_DOCS", "LocalSGDConfig", "check_state_device", "local_sgd_arguments"]

#: The documentation of every local-SGD argument (``--help`` and the strategies' docstrings show it).
ARGUMENT_DOCS: dict[str, str] = {
    "sync_every": "``H``, optimizer steps between two syncs (a training step that steps several optimizers counts "
                  "once; gradient accumulation does not change it). Larger ``H`` sends fewer bytes; the paper finds "
                  "``H`` of 16–256 competitive with DDP. Default 64.",
    "outer_optimizer": "``\"average\"`` (plain model averaging: outer SGD with lr 1.0, no momentum), ``\"diloco\"`` "
                       "(outer SGD, Nesterov momentum 0.9, lr 0.7; use AdamW as the inner optimizer), "
                       "``\"topk_recipe\"`` (outer SGD, lr √2, no momentum: with ``compression=\"topk_recipe\"``), "
                       "the name of a preset added with ``register_outer_optimizer``, or a callable ``params -> "
                       "torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.5)``). Default "
                       "``\"average\"``.",
    "group_size": "ranks per worker group; must divide the world size. Set it to the devices per node so only the "
                  "periodic sync crosses nodes. Default 1 (every rank is its own worker).",
    "warmup_steps": "fully synchronous steps (gradients averaged across all ranks) before local SGD starts "
                    "(\"post-local SGD\"). Default 0.",
    "outer_state_device": "where the global snapshot ``θ_g`` and the outer optimizer state live: ``None`` (the "
                          "parameters' device) or e.g. ``\"cpu\"`` to keep accelerator memory free. Default None.",
    "on_nonfinite": "what a NaN/inf pseudo-gradient does: ``\"raise\"`` (default) stops training with an error naming "
                    "the step, leaving ``θ_g`` untouched; ``\"skip\"`` drops that sync and resets every group to "
                    "``θ_g``.",
    "max_consecutive_skips": "with ``on_nonfinite=\"skip\"``: raise after this many syncs in a row were skipped "
                             "(training is not recovering). At a skipped sync every group restarts from ``θ_g`` and "
                             "the groups with non-finite values also reset their inner optimizer state (e.g. AdamW's "
                             "moments) and take the other groups' mean buffers. Default 3.",
    "screen_factor": "the robust screen of each sync: a worker group whose pseudo-gradient norm ``‖θ_g − θ_i‖`` (per "
                     "token with time-based sync) exceeds this multiple of the lower median of the groups' norms is "
                     "left out of that sync (weight 0 in the mean; every group continues from the mean of the "
                     "others), logged and counted in ``local_sgd/screened_out``. With two groups (no majority) each "
                     "group is held to its own history instead: this multiple of the median of its last "
                     "``screen_history`` norms. Catches a broken group's finite but wild pseudo-gradient (a data "
                     "bug, silent data corruption, a blown-up learning rate), not one of an honest norm in a wrong "
                     "direction. Costs one more round trip of a few numbers per sync (README \"Robustness\"). "
                     "Default None: off; e.g. 10.0.",
    "screen_history": "with ``screen_factor``: how many of its recent norms each group's own median covers (the "
                      "two-group bound, which applies once a group has 3), and the window in which a group left out "
                      "twice is a repeated offender. Default 8.",
    "screen_ban_syncs": "with ``screen_factor``: a group left out at two of its last ``screen_history`` syncs is "
                        "left out of this many further syncs it takes part in, whatever its norm. Default 0: each "
                        "sync judges every group afresh.",
    "screen_min_cosine": "with ``screen_factor``: the direction test, which catches a pseudo-gradient of an honest "
                         "norm pointing the wrong way (a sign flip): with three or more groups, one whose score (the "
                         "upper median of its pseudo-gradient's cosines with the other groups') is below this is left "
                         "out of the sync while the groups' upper median is above it, logged and counted like a norm "
                         "outlier. Rests on the honest groups agreeing (README). "
                         "The cosines come from a 1024-bucket count sketch of each pseudo-gradient, sent with the "
                         "norms (no extra round trip; one pass over the parameters per sync). With two groups "
                         "it does nothing (who is wrong cannot be told). ``\"chance\"``: a group must agree with the "
                         "others significantly, its cosines at least 3 times their spread for a pseudo-gradient of "
                         "independent noise (about ``3/sqrt(1024)`` = 0.094), so noise is left out too, where a "
                         "threshold of 0 lets it through at about half the syncs (README). Default None: off; e.g. "
                         "\"chance\" or 0.0.",
    "sync_on_train_end": "run a last sync when training ends mid-interval, so every rank ends with the same model. "
                         "Default True.",
    "async_save": "write checkpoints in the background during ``fit``: a save copies this rank's state to host "
                  "memory and training continues while a background thread writes the rank's files; the folder is "
                  "committed (its ``meta.pt`` written) once every rank's files are written, so a crash during the "
                  "write leaves the previous checkpoints loadable, and ``save_top_k`` removes an old checkpoint only "
                  "after the new one is committed. The next save and the end of ``fit`` wait for the write in "
                  "flight and raise its error. Passing Lightning's ``AsyncCheckpointIO`` plugin turns it on too. "
                  "Saves outside ``fit`` are synchronous. Default False.",
    "sync_timeout": "seconds a rank waits at a sync for the other ranks. When a rank crashed, was killed or hangs, "
                    "every other rank stops after at most this long with a ``SyncFailedError`` naming the missing "
                    "ranks and the step (a dead rank is usually reported at once). Must exceed the normal spread of "
                    "arrival times at a sync (e.g. rank 0 writing a checkpoint while the others train on). Default "
                    "None: the process group's ``timeout`` (30 min by default).",
    "cluster_size": "two-stage sync for multi-cluster training: worker groups per cluster (groups ``[c·n, (c+1)·n)`` "
                    "form cluster ``c``). Groups sync inside their cluster every ``sync_every`` steps with "
                    "``outer_optimizer`` and clusters sync every ``cluster_sync_every`` steps with "
                    "``cluster_outer_optimizer``. Default None: one level. With ``lighthouse`` it is implied (the job "
                    "is the cluster) and refused: set ``cluster_sync_every``.",
    "cluster_sync_every": "``H2``, steps between two syncs across clusters; a multiple of ``sync_every``. With "
                          "``lighthouse`` the job is the cluster: ``group_size`` below the job's world size gives "
                          "several worker groups per job that sync inside it every ``sync_every`` steps, and the "
                          "jobs sync every ``cluster_sync_every`` steps through the lighthouse "
                          "(docs/multi_cluster.md).",
    "cluster_outer_optimizer": "the outer optimizer across clusters (with ``lighthouse``: across jobs; same forms as "
                               "``outer_optimizer``). Default "
                               "``\"diloco\"``.",
    "compression": "compress what crosses groups at a sync: ``None`` (fp32 all-reduce), ``\"bf16\"`` (½ the bytes), "
                   "``\"int8\"`` (≈ ¼), ``\"int4\"`` (≈ ⅛), ``\"topk\"`` (sparse: per 4096 values the 64 largest "
                   "in 2 bits, 1/141 of fp32; SparseLoCo), ``\"topk_ef\"`` (the same values, indices Elias-Fano "
                   "coded: 1/195), ``\"topk_recipe\"`` (96 of 4096, Elias-Fano indices, 1/141; each value averaged "
                   "over the groups that sent it; with ``outer_optimizer=\"topk_recipe\"`` it ended within 2% of "
                   "uncompressed DiLoCo's loss on the compression benchmark) or a codec added with "
                   "``register_codec``, with per-block "
                   "scales and error feedback (the quantization error of one sync is added to the next; decayed by "
                   "0.95 a sync for topk). The dense codecs go through a two-phase compressed all-reduce; the topk "
                   "codecs are all-gathered and summed on every rank (each rank sends (G-1) payloads a sync: the "
                   "same as the two phases at 2 groups). Default None.",
    "fragments": "streaming sync (Streaming DiLoCo): split the parameters into this many fragments of about equal "
                 "size (runs of whole parameter tensors) that sync on a staggered schedule, fragment ``f`` at steps "
                 "``(f+1)·sync_every/fragments`` mod ``sync_every``, so each sync moves about 1/fragments of the "
                 "model and the peak bytes per step drop by that factor. ``sync_every`` must be a multiple. With "
                 "``sync_every_seconds`` the fragments take turns by the clock instead: one fragment's sync every "
                 "``sync_every_seconds/fragments`` seconds, each weighted by the tokens since its own last sync. "
                 "Default 1.",
    "overlap_steps": "``τ``: a fragment's sync is started (its all-reduce launched asynchronously) and applied ``τ`` "
                     "inner steps later, so the communication runs behind those steps. Must be below "
                     "``sync_every`` (with ``lighthouse``: below ``sync_every/fragments``, one quorum at a time). "
                     "With ``sync_every_seconds``: τ of each group's own steps, and the next fragment's clock starts "
                     "when the sync is applied. Default 0 (applied at once).",
    "overlap_mix": "``α`` of Streaming DiLoCo: a synced fragment continues from ``α·θ_local + (1−α)·θ_global`` "
                   "(``θ_local``: its parameters when the sync is applied, ``τ`` steps after what it sent; with "
                   "``overlap_steps=0`` what it sent, which still differs from the new ``θ_global``). 0 keeps only "
                   "the global result; the paper uses 0.5. Above 0 the syncs stream (one fragment with "
                   "``fragments=1``), so training ends with a sync of every parameter. Default 0.",
    "sync_every_seconds": "time-based sync for uneven workers: instead of every ``sync_every`` steps, each group "
                          "syncs at its first step end after this many seconds since the last sync, running as many "
                          "steps as it can in between, and the average is weighted by the tokens each group "
                          "processed (the elements of each batch's first tensor). A slow group delays the others by "
                          "at most one of its steps. Groups then take different numbers of steps, so nothing "
                          "collective may run between syncs: validation, checkpoint and early-stopping callbacks "
                          "during fit are refused (validate and save after fit), and training ends for all groups at "
                          "the first sync after any group finishes. Default None (step-based).",
    "sync_schedule": "the name of a sync schedule added with ``register_schedule`` (or a built-in: ``\"periodic\"``, "
                "``\"two_stage\"``, ``\"streaming\"``, ``\"time_based\"``, ``\"time_based_streaming\"``). Default "
                "None: chosen from the arguments above.",
    "lighthouse": "federated worker groups: the ``host:port`` of torchft's lighthouse (``lightning-localsgd "
                  "lighthouse --port 29510``). Each job (its own SLURM job, torchrun or machine) is then one "
                  "cluster: one worker group (``group_size`` = the job's world size; DDP, FSDP2 or DeepSpeed ZeRO "
                  "inside it, rank k of every job syncing shard k), or several with ``cluster_sync_every``; jobs "
                  "join and leave between syncs, a sync averages over the jobs present, a joining job heals from a "
                  "live peer (each rank its own shard), a job that does not hold the model like the others is "
                  "refused. ``sync_timeout`` bounds each sync (quorum, reduce, retries; default 600 s in this mode). "
                  "See docs/multi_cluster.md. Default None: "
                  "one world.",
    "group_id": "with ``lighthouse``: this job's name among the groups (no ``:``); a job restarted with the same "
                "name takes its place. Default None: the host name and a random suffix.",
    "min_groups": "with ``lighthouse``: fewest groups a sync may average over; with fewer the sync waits (until "
                  "``sync_timeout``) for more to join. Default 1.",
    "run_secret_file": "with ``lighthouse``: a file holding the run secret (else the environment variable "
                       "``LOCALSGD_RUN_SECRET``; give every job of the run the same). With a secret the members of "
                       "each quorum prove it to each other before any sync: a process without it receives no "
                       "parameters, optimizer state or ``θ_g`` (healing included: the healing transport serves and "
                       "accepts state only with a proof), nothing it sends is averaged, and the jobs log one line "
                       "naming it and train on without it. Only the path is kept (config dumps show the path, never "
                       "the secret). It authenticates, it does not encrypt: see docs/multi_cluster.md (\"Security\"). "
                       "Default None: ``LOCALSGD_RUN_SECRET`` if set, else no secret (a trusted network).",
    "data_jobs": "with ``lighthouse``: the number of jobs that share one dataset. Each epoch's order (one seed for "
                 "every job: ``seed_everything``'s) is partitioned over ``data_jobs`` × the job's world size "
                 "replicas, this job reading the shares of ``data_job_index``; each job's position at every "
                 "committed sync travels with the sync, and a job that heals from a peer continues its share where "
                 "its last committed sync ended. Give every job the same value: the count is the run's, not the "
                 "jobs present now. Default None: each job reads the whole dataset in its own order.",
    "async_sync": "with ``lighthouse`` and ``sync_every_seconds``: syncs that nobody waits for. Each sync's quorum, "
                  "collectives (any ``compression``) and outer step run on one background thread while the job keeps "
                  "taking inner steps; the training thread only copies what the sync sends when it starts and, at "
                  "the first step end after the background work finished, applies the one-step-delayed outer update "
                  "with its local progress kept (DiLoCoX / eager updates): ``θ_i ← θ_g_new + (θ_i − θ_i_sent)``. One "
                  "sync is in flight at a time (the next is due ``sync_every_seconds`` after it is applied). Trades "
                  "one sync of staleness for no idle time at syncs; the sync carrying the stop at the end keeps no "
                  "local progress, so every job ends on one model. Jobs of one rank with LocalSGDStrategy, whole-model "
                  "syncs (README \"Syncs that nobody waits for\"). Default False.",
    "data_job_index": "with ``data_jobs``: this job's share of the dataset, 0 .. ``data_jobs`` - 1, one per job "
                      "(e.g. the SLURM array index); a job restarted in its place takes the same index.",
    "data_rebalance_after": "with ``data_jobs``: a job that took part in none of the last this many committed "
                            "syncs has left for good: the jobs of that sync split its unread data between them (its "
                            "share of the epoch it was in from its last committed position, and of every later "
                            "epoch: contiguous parts in ``data_job_index`` order, read after their own share), so "
                            "each epoch is still read once. Counted in committed syncs of the replicated record, so "
                            "every job decides alike without clocks. A job that comes back later gets a fresh share "
                            "(its own share from the first epoch no job has begun), never its old position. Logged "
                            "when it happens. Default 8; None: never (a departed job's data waits for it).",
}


def _positive_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}. {fix}")


def check_state_device(value: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    """Parse ``outer_state_device`` and check the device exists on this machine."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"outer_state_device={value!r} is not a device. Use 'cpu', 'cuda', 'cuda:0', ... or None "
                         "(the parameters' device).") from err
    if device.type == "meta":
        raise ValueError("outer_state_device='meta' holds no data. Use 'cpu' or None (the parameters' device).")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"outer_state_device={value!r}: no {device.type} device is available on this machine. Use "
                         "'cpu' or None (the parameters' device).")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"outer_state_device={value!r}: this machine has {count} {device.type} device(s). Use an "
                         f"index below {count}, or None (the parameters' device).")
    return device


@dataclass
class LocalSGDConfig:
    """Every local-SGD argument (documented in :data:`ARGUMENT_DOCS`), validated on construction."""

    sync_every: int = 64
    outer_optimizer: OuterOptimizerSpec = "average"
    group_size: Optional[int] = 1
    warmup_steps: int = 0
    outer_state_device: Optional[Union[str, torch.device]] = None
    on_nonfinite: str = "raise"
    max_consecutive_skips: int = 3
    screen_factor: Optional[float] = None
    screen_history: int = 8
    screen_ban_syncs: int = 0
    screen_min_cosine: Optional[Union[float, Literal["chance"]]] = None
    sync_on_train_end: bool = True
    async_save: bool = False
    sync_timeout: Optional[float] = None
    cluster_size: Optional[int] = None
    cluster_sync_every: Optional[int] = None
    cluster_outer_optimizer: OuterOptimizerSpec = "diloco"
    compression: Optional[str] = None
    fragments: int = 1
    overlap_steps: int = 0
    overlap_mix: float = 0.0
    sync_every_seconds: Optional[float] = None
    sync_schedule: Optional[str] = None
    lighthouse: Optional[str] = None
    group_id: Optional[str] = None
    min_groups: int = 1
    run_secret_file: Optional[str] = None
    data_jobs: Optional[int] = None
    data_job_index: Optional[int] = None
    data_rebalance_after: Optional[int] = 8
    async_sync: bool = False
    # derived on validation
    outer_factory: Optional[OuterOptimizerFactory] = field(default=None, init=False, repr=False)
    cluster_factory: Optional[OuterOptimizerFactory] = field(default=None, init=False, repr=False)
    state_device: Optional[torch.device] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _positive_int("sync_every", self.sync_every, 1, "It is H, the optimizer steps between two syncs; e.g. 64.")
        if self.group_size is not None:
            _positive_int("group_size", self.group_size, 1, "It is the number of ranks per worker group; e.g. 1.")
        _positive_int("warmup_steps", self.warmup_steps, 0, "Use 0 to start local SGD at the first step.")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}.")
        _positive_int("max_consecutive_skips", self.max_consecutive_skips, 1, "It is how many skipped syncs in a row "
                      "stop training; e.g. 3.")
        self._check_screen()
        if not isinstance(self.sync_on_train_end, bool):
            raise ValueError(f"sync_on_train_end must be True or False, got {self.sync_on_train_end!r}.")
        for name in ("async_save", "async_sync"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        self.outer_factory = resolve_outer_optimizer(self.outer_optimizer)
        check_outer_optimizer_factory(self.outer_factory)
        self._check_two_stage()
        check_codec(self.compression)
        self._check_streaming()
        self._check_time_based()
        self.sync_timeout = check_sync_timeout(self.sync_timeout)
        self.state_device = check_state_device(self.outer_state_device)
        self.overlap_mix = float(self.overlap_mix)
        if self.sync_every_seconds is not None:
            self.sync_every_seconds = float(self.sync_every_seconds)
        if self.sync_schedule is not None:
            build_schedule(self.sync_schedule, self)  # an unknown name fails here, before training
        self._check_federated()
        support.check(self)  # the combinations of settings that do not go together (one table: support.py)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> "LocalSGDConfig":
        """Pop the local-SGD arguments out of a strategy's ``kwargs`` (the rest stays) and validate them."""
        values = {**(defaults or {})}
        values.update({f.name: kwargs.pop(f.name) for f in fields(cls) if f.init and f.name in kwargs})
        return cls(**values)

    @classmethod
    def check_support(cls, kwargs: Mapping[str, Any], strategy: str) -> None:
        """Run ``strategy``'s own rows of :mod:`~lightning_localsgd.support` on a strategy's keyword arguments (the
        others at their defaults) before they are validated, so that a setting the strategy does not support is
        refused with the reason rather than by the argument's own check."""
        values = {f.name: f.default for f in fields(cls) if f.init and f.default is not MISSING}
        support.check(SimpleNamespace(**{**values, **{k: v for k, v in kwargs.items() if k in values}}), strategy)

    @staticmethod
    def refuse(kwargs: Mapping[str, Any], owner: str, reason: str, fix: str = "", **supported: Any) -> None:
        """Raise for an argument in ``kwargs`` that ``owner`` does not support (any value but the one given)."""
        for name, default in supported.items():
            value = kwargs.get(name, default)
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by {owner} ({reason}). Leave {name}={default!r}"
                                 f"{fix}.")

    # ------------------------------------------------------------------ derived
    @property
    def two_stage(self) -> bool:
        """Two sync levels: ``cluster_size`` in one world; in federated mode ``cluster_sync_every`` (the job is the
        cluster, its ``cluster_size`` is set once the job's world size is known)."""
        return self.cluster_size is not None or self.cluster_sync_every is not None

    @property
    def streaming(self) -> bool:
        # α mixes what a fragment's sync returns into the local parameters: only a streaming sync does that
        return self.fragments > 1 or self.overlap_steps > 0 or self.overlap_mix > 0

    @property
    def outer_name(self) -> str:
        return outer_optimizer_name(self.outer_optimizer)

    def build_screen(self) -> Optional[PseudoGradientScreen]:
        """A new robust screen for one engine (``None`` when ``screen_factor`` is not set)."""
        if self.screen_factor is None:
            return None
        return PseudoGradientScreen(self.screen_factor, self.screen_history, self.screen_ban_syncs,
                                    self.screen_min_cosine)

    def build_schedule(self) -> SyncSchedule:
        """The schedule named by ``sync_schedule``, or the one the arguments ask for."""
        if self.sync_schedule is not None:
            return build_schedule(self.sync_schedule, self)
        if self.sync_every_seconds is not None:
            return build_schedule("time_based_streaming" if self.streaming else "time_based", self)
        if self.two_stage:
            return build_schedule("two_stage", self)
        return build_schedule("streaming" if self.streaming else "periodic", self)

    def describe(self, num_groups: int) -> str:
        """One line for the log at the start of training."""
        when = f"every {self.sync_every} steps" if self.sync_every_seconds is None else \
            f"every {self.sync_every_seconds:g} s (token-weighted)"
        if self.streaming and self.sync_every_seconds is not None:
            when += (f" in {self.fragments} fragment(s) in turn (one every {self.sync_every_seconds / self.fragments:g} "
                     f"s), applied {self.overlap_steps} step(s) later")
        elif self.streaming:
            when += f" in {self.fragments} staggered fragment(s), applied {self.overlap_steps} step(s) later"
        levels = ""
        if self.two_stage:
            inside, across = ("job", "jobs (through the lighthouse)") if self.lighthouse is not None else \
                ("cluster", "clusters")
            levels = (f" inside each {inside}; across {across} every {self.cluster_sync_every} steps, outer optimizer "
                      f"{outer_optimizer_name(self.cluster_outer_optimizer)}")
        return (f"local SGD: {num_groups} worker group(s) of {self.group_size} rank(s), sync {when}, outer optimizer "
                f"{self.outer_name}{levels}, warm-up {self.warmup_steps} steps.")

    # ------------------------------------------------------------------ checks
    def _check_screen(self) -> None:
        check_screen_arguments(self.screen_factor, self.screen_history, self.screen_ban_syncs, self.screen_min_cosine)
        if self.screen_factor is None:
            for name, value, default in (("screen_history", self.screen_history, 8),
                                         ("screen_ban_syncs", self.screen_ban_syncs, 0),
                                         ("screen_min_cosine", self.screen_min_cosine, None)):
                if value != default:
                    raise ValueError(f"{name}={value!r} only acts with the robust screen: set screen_factor too "
                                     "(e.g. 10.0), or remove it.")
        else:
            self.screen_factor = float(self.screen_factor)

    def _check_two_stage(self) -> None:
        H, size, H2 = self.sync_every, self.cluster_size, self.cluster_sync_every
        if size is not None and self.lighthouse is not None:
            return  # refused by _check_federated: in federated mode the job is the cluster
        if size is None and (H2 is None or self.lighthouse is None):
            if H2 is not None:
                raise ValueError("cluster_sync_every is set but cluster_size is not: two-stage sync needs both. Set "
                                 "cluster_size (worker groups per cluster), or remove cluster_sync_every for one "
                                 "level of sync. (With lighthouse= the job is the cluster and cluster_size is "
                                 "implied: see docs/multi_cluster.md.)")
            return
        if size is not None:
            _positive_int("cluster_size", size, 1, "It is the number of worker groups per cluster.")
        if H2 is None:
            raise ValueError("cluster_size is set but cluster_sync_every is not: give H2, the steps between two syncs "
                             f"across clusters, a multiple of sync_every={H} (e.g. {4 * H}).")
        _positive_int("cluster_sync_every", H2, 1, "It is H2, steps between cross-cluster syncs.")
        if H2 % H:
            raise ValueError(f"cluster_sync_every={H2} must be a multiple of sync_every={H}: the sync across clusters "
                             f"happens on a sync inside the clusters. Use e.g. {H * max(1, round(H2 / H))}.")
        try:
            self.cluster_factory = resolve_outer_optimizer(self.cluster_outer_optimizer)
            check_outer_optimizer_factory(self.cluster_factory)
        except ValueError as err:
            raise ValueError(f"cluster_outer_optimizer: {err}") from err

    def _check_streaming(self) -> None:
        H, F, tau, mix = self.sync_every, self.fragments, self.overlap_steps, self.overlap_mix
        _positive_int("fragments", F, 1, "It is the number of parts the parameters are split into for streaming "
                      "sync; 1 syncs them all at once.")
        _positive_int("overlap_steps", tau, 0, "It is τ, inner steps a fragment's sync runs behind; 0 applies it at "
                      "once.")
        if self.sync_every_seconds is None:  # time-based: fragments take turns by the clock, one in flight at a time
            if H % F:
                raise ValueError(f"sync_every={H} must be a multiple of fragments={F}: fragment f syncs every "
                                 f"sync_every steps, staggered by sync_every/fragments steps. Use e.g. sync_every="
                                 f"{F * max(1, round(H / F))}.")
            if tau >= H:
                raise ValueError(f"overlap_steps={tau} must be smaller than sync_every={H}: a fragment's sync must be "
                                 "applied before the next sync of that fragment starts.")
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix < 1.0:
            raise ValueError(f"overlap_mix must be a number in [0, 1), got {mix!r}. It is α of Streaming DiLoCo: the "
                             "parameters continue from α·local + (1−α)·global; e.g. 0.5.")

    def _check_time_based(self) -> None:
        T = self.sync_every_seconds
        if T is None:
            return
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
            raise ValueError(f"sync_every_seconds must be a positive number of seconds, got {T!r}; e.g. 30.0, or None "
                             "to sync every sync_every steps.")
        if not self.sync_on_train_end:
            raise ValueError("sync_every_seconds needs sync_on_train_end=True: a group that finishes tells the others "
                             "to stop in its last sync, and they wait for it.")

    def _check_federated(self) -> None:
        _positive_int("min_groups", self.min_groups, 1, "It is the fewest worker groups a federated sync averages "
                      "over; e.g. 1.")
        if self.lighthouse is None:
            for name, value, default in (("group_id", self.group_id, None), ("min_groups", self.min_groups, 1),
                                         ("data_rebalance_after", self.data_rebalance_after, 8),
                                         ("run_secret_file", self.run_secret_file, None)):
                if value != default:
                    raise ValueError(f"{name}={value!r} only applies to federated worker groups: set lighthouse="
                                     "'host:port' too (see docs/multi_cluster.md), or remove it.")
            return
        check_lighthouse_address(self.lighthouse)
        if self.run_secret_file is not None:
            check_run_secret_file(self.run_secret_file)
        self._check_data_jobs()
        gid = self.group_id
        if gid is not None and (not isinstance(gid, str) or not gid or ":" in gid or gid != gid.strip()
                                or any(c.isspace() for c in gid)):
            raise ValueError(f"group_id must be a non-empty name without ':' or spaces (e.g. 'cluster-a'), got "
                             f"{gid!r}.")

    def _check_data_jobs(self) -> None:
        if self.data_jobs is None and self.data_job_index is None:
            if self.data_rebalance_after != 8:
                raise ValueError(f"data_rebalance_after={self.data_rebalance_after!r} only applies to jobs sharing one "
                                 "dataset: set data_jobs and data_job_index too, or remove it.")
            return
        _positive_int("data_jobs", self.data_jobs, 1, "It is the number of federated jobs sharing one dataset (each "
                      "reads one share of every epoch); e.g. 4.")
        if (isinstance(self.data_job_index, bool) or not isinstance(self.data_job_index, int)
                or not 0 <= self.data_job_index < self.data_jobs):  # type: ignore[operator]
            raise ValueError(f"data_job_index must be this job's share, an integer in 0 .. data_jobs - 1 = "
                             f"{self.data_jobs - 1} (one per job), got {self.data_job_index!r}.")
        if self.data_rebalance_after is not None:
            _positive_int("data_rebalance_after", self.data_rebalance_after, 1, "It is the committed syncs a job may "
                          "miss before the others split its unread data (e.g. 8), or None for never.")


T = TypeVar("T", bound=type)


def local_sgd_arguments(defaults: Optional[Mapping[str, Any]] = None,
                        docs: Optional[Mapping[str, str]] = None) -> Callable[[T], T]:
    """Class decorator: add the local-SGD arguments to a strategy's signature and docstring.

    Args:
        defaults: default values that differ for this strategy (e.g. ``{"group_size": None}``).
        docs: argument docs that differ for this strategy (replacing those of :data:`ARGUMENT_DOCS`).
    """
    def decorate(cls: T) -> T:
        init = cls.__init__
        resolved = typing.get_type_hints(init)  # the strategy module may use `from __future__ import annotations`
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=resolved.get(p.name, p.annotation))
               for p in inspect.signature(init).parameters.values()]
        var_kw = [p for p in own if p.name == "kwargs" or p.kind is inspect.Parameter.VAR_KEYWORD]
        own = [p for p in own if p.name not in ("self", "local_sgd") and p not in var_kw]
        hints = {f.name: f.type for f in fields(LocalSGDConfig) if f.init}
        base = {f.name: f.default for f in fields(LocalSGDConfig) if f.init}
        values = {**base, **(defaults or {})}
        ours = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=values[name],
                                  annotation=hints[name]) for name in base]
        keep_var_kw = [p.replace(kind=inspect.Parameter.VAR_KEYWORD) for p in var_kw if p.name == "kwargs"]
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        init.__signature__ = inspect.Signature([self_param, *ours, *own, *keep_var_kw], return_annotation=None)
        cls.__doc__ = _insert_docs(cls.__doc__ or "", {**ARGUMENT_DOCS, **(docs or {})})
        cls.local_sgd_defaults = dict(defaults or {})
        return cls

    return decorate


def _insert_docs(doc: str, arg_docs: Mapping[str, str]) -> str:
    """Put the local-SGD arguments first in the ``Args:`` section of a Google-style class docstring."""
    lines = doc.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if at is None:
        raise ValueError("local_sgd_arguments: the strategy's docstring needs an 'Args:' section.")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())] + "    "
    block = []
    for name, text in arg_docs.items():
        block += textwrap.wrap(f"{name}: {text}", 116, initial_indent=indent, subsequent_indent=indent + "    ",
                               break_on_hyphens=False)
    return "\n".join(lines[: at + 1] + block + lines[at + 1:]) + "\n"
