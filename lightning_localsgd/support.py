"""What combines with what: the one table of refused feature × mode × inner-strategy combinations.

A refusal that exists because two settings do not go together (not because one value is malformed: those checks stay
with the argument in :mod:`~lightning_localsgd.config`) is one row of :data:`REFUSALS`: the setting the message names,
when the combination is present, where it applies (one world or federated; DDP, FSDP or DeepSpeed inside the groups),
and the message (why, and what to do instead). :func:`check` runs the table: the arguments (``LocalSGDConfig``) run
the rows every strategy shares, a strategy its own rows. The README's feature × mode × strategy table is generated
from this module (``python -m lightning_localsgd.support``), with the test that exercises each combination that is
not refused (:data:`TESTED`); ``tests/compat/test_support_table.py`` keeps the README, the table and the tests in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["FEATURES", "MODES", "REFUSALS", "STRATEGIES", "TESTED", "Refusal", "check", "markdown_table"]

MODES = ("one world", "federated")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
_STRATEGY_NAMES = {"ddp": "LocalSGDStrategy", "fsdp": "LocalSGDFSDPStrategy", "deepspeed": "LocalSGDDeepSpeedStrategy"}


def _federated(config: Any) -> bool:
    return config.lighthouse is not None


def _streaming(config: Any) -> bool:
    return config.fragments > 1 or config.overlap_steps > 0 or config.overlap_mix > 0


@dataclass(frozen=True)
class Refusal:
    """One refused combination: ``parameter`` is the setting its message names, ``present(config)`` whether the
    combination is in the arguments, ``message(config)`` the error (why, and the fix)."""

    parameter: str
    present: Callable[[Any], bool]
    message: Callable[[Any], str]
    reason: str
    """The reason in a few words (the README's table cell)."""
    modes: tuple[str, ...] = MODES
    strategies: tuple[str, ...] = STRATEGIES
    whole_feature: bool = False
    """Whether it refuses the feature itself in those modes / strategies (a cell of the README's table), rather than
    one combination of settings (listed under the table)."""

    def applies(self, mode: str, strategy: Optional[str]) -> bool:
        """Whether this row is checked in ``mode`` for ``strategy`` (``None``: the rows every strategy shares)."""
        shared = self.strategies == STRATEGIES
        return mode in self.modes and (shared if strategy is None else not shared and strategy in self.strategies)


def _deepspeed_refuses(name: str, default: Any, why: str) -> Refusal:
    return Refusal(
        name, lambda c: getattr(c, name) != default,
        lambda c: (f"{name}={getattr(c, name)!r} is not supported by LocalSGDDeepSpeedStrategy ({why}). Leave "
                   f"{name}={default!r}, or use LocalSGDStrategy / LocalSGDFSDPStrategy for streaming and time-based "
                   "sync."),
        reason=why, strategies=("deepspeed",), whole_feature=True)


_DS_STREAMING = "ZeRO keeps the parameters as flat partitions, not per-tensor fragments"
_DS_LOCKSTEP = "ZeRO syncs flat partitions, and DeepSpeed's own collectives assume every group steps together"

#: Every refused combination, in the order they are checked.
REFUSALS: list[Refusal] = [
    Refusal("cluster_size", lambda c: c.sync_every_seconds is not None and c.cluster_size is not None,
            lambda c: (f"sync_every_seconds (time-based sync of uneven workers) does not combine with cluster_size="
                       f"{c.cluster_size!r}. Remove one of them."),
            reason="time-based groups take different numbers of steps; the cluster level counts steps"),
    # two-stage is cluster_size in one world, cluster_sync_every alone across federated jobs (config.two_stage)
    Refusal("cluster_size", lambda c: _streaming(c) and c.two_stage,
            lambda c: ("streaming sync (fragments > 1, overlap_steps > 0 or overlap_mix > 0) does not combine with two-stage sync "
                       "(cluster_size, or cluster_sync_every with lighthouse=). Use one of them."),
            reason="level 2 reads level 1's whole θ_c, which streaming never completes at once"),
    Refusal("cluster_size", lambda c: _federated(c) and c.cluster_size is not None,
            lambda c: (f"cluster_size={c.cluster_size!r} is not supported with lighthouse= (federated worker groups): "
                       "in federated mode the job is the cluster, so cluster_size is implied (the job's worker groups: "
                       "its world size / group_size). Run one job per cluster; for several worker groups per job set "
                       "group_size below the job's world size and cluster_sync_every for the sync across jobs. Leave "
                       "cluster_size=None, or train in one world without lighthouse."),
            reason="implied: the job is the cluster (cluster_sync_every)", modes=("federated",)),
    Refusal("warmup_steps",
            lambda c: _federated(c) and c.cluster_sync_every is not None and c.warmup_steps != 0,
            lambda c: (f"warmup_steps={c.warmup_steps!r} is not supported with lighthouse= (federated worker groups): "
                       "with several worker groups per job a warm-up step would average gradients inside the job and "
                       "across jobs in one vote, which federated warm-up does not do; use one group per job for "
                       "warm-up. Leave warmup_steps=0, or train in one world without lighthouse."),
            reason="with several groups per job: one vote would span both levels", modes=("federated",)),
    Refusal("overlap_steps",
            lambda c: (_federated(c) and c.sync_every_seconds is None  # time-based: one fragment in flight anyway
                       and c.overlap_steps >= c.sync_every // max(1, c.fragments)),
            lambda c: (f"overlap_steps={c.overlap_steps} with lighthouse= (federated worker groups) must be smaller "
                       f"than sync_every/fragments={c.sync_every // max(1, c.fragments)}: each fragment's sync is one "
                       "quorum of torchft's manager, which holds one quorum at a time, so a fragment's sync must be "
                       "applied before the next one starts. Use overlap_steps <= "
                       f"{c.sync_every // max(1, c.fragments) - 1}, or fewer fragments."),
            reason="overlap_steps ≥ sync_every/fragments: torchft holds one quorum at a time", modes=("federated",)),
    Refusal("data_jobs", lambda c: not _federated(c) and (c.data_jobs is not None or c.data_job_index is not None),
            lambda c: (f"data_jobs={c.data_jobs!r} / data_job_index={c.data_job_index!r} partition one dataset over "
                       "federated jobs (lighthouse=); in one world the strategy's sampler already gives every rank "
                       "its own share. Remove them, or set lighthouse='host:port' (see docs/multi_cluster.md)."),
            reason="one world: every rank already reads its own share", modes=("one world",)),
    Refusal("data_jobs", lambda c: _federated(c) and c.data_jobs is not None and _streaming(c),
            lambda c: (f"data_jobs={c.data_jobs!r} does not combine with streaming sync (fragments > 1, overlap_steps "
                       "> 0 or overlap_mix > 0): a job's data position at a sync is one number, while a streaming "
                       "sync commits one fragment at a time, so no position says which samples every fragment "
                       "holds. Sync every parameter at once (fragments=1, overlap_steps=0), or leave data_jobs=None."),
            reason="streaming commits fragments at different steps: no one position", modes=("federated",)),
    Refusal("data_jobs", lambda c: _federated(c) and c.data_jobs is not None and c.warmup_steps != 0,
            lambda c: (f"data_jobs={c.data_jobs!r} does not combine with warmup_steps={c.warmup_steps!r} yet: the "
                       "jobs' data positions travel with the syncs, not with the warm-up steps' rounds, so a job "
                       "healing during warm-up would not know where its share continues. Use warmup_steps=0, or "
                       "leave data_jobs=None."),
            reason="positions travel with syncs, not warm-up rounds", modes=("federated",)),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False),
            lambda c: ("async_sync=True runs the sync across federated jobs (lighthouse=) beside training; in one world "
                       "the groups' collectives share one world with their inner steps, so nothing can run beside "
                       "them. Set lighthouse='host:port' (docs/multi_cluster.md), or leave async_sync=False."),
            reason="federated only: it runs the sync across jobs beside training", modes=("one world",),
            whole_feature=True),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False) and (c.sync_every_seconds is None
                                                                           or c.sync_schedule is not None),
            lambda c: ("async_sync=True needs time-based syncs (sync_every_seconds=...): with step-based or registered "
                       "schedules every job must take part in every sync, and a sync due while the previous one is "
                       "still in flight on one job but not on another would pair different syncs. Set "
                       "sync_every_seconds (e.g. 30.0) without sync_schedule, or leave async_sync=False."),
            reason="needs time-based syncs: step-based jobs must pair sync k with sync k", modes=("federated",)),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False) and (_streaming(c) or c.two_stage),
            lambda c: ("async_sync=True syncs every parameter at once in the background; it does not combine with "
                       "streaming (fragments > 1, overlap_steps > 0, overlap_mix > 0: their syncs are already applied "
                       "behind inner steps, by their own rule) nor with two levels (cluster_sync_every: level 1 runs "
                       "on the training thread over the job's own process groups). Leave async_sync=False, or use "
                       "fragments=1, overlap_steps=0, overlap_mix=0 and no cluster_sync_every."),
            reason="whole-model syncs only: not with streaming or two levels", modes=("federated",)),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False) and c.data_jobs is not None,
            lambda c: ("async_sync=True does not combine with data_jobs yet: a job's data position travels with its "
                       "sync, and the background thread would read the training loader while it iterates. Leave "
                       "data_jobs=None, or async_sync=False."),
            reason="data positions would be read beside the training loader", modes=("federated",)),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False) and c.on_nonfinite == "skip",
            lambda c: ("async_sync=True does not combine with on_nonfinite='skip': a skipped sync resets every group "
                       "to θ_g, but the delayed update keeps the local progress made while the sync ran, which would "
                       "keep the non-finite values. Use on_nonfinite='raise', or async_sync=False."),
            reason="a skipped sync's reset would keep the non-finite local progress", modes=("federated",)),
    Refusal("async_sync", lambda c: getattr(c, "async_sync", False),
            lambda c: ("async_sync=True is supported with LocalSGDStrategy jobs of one rank only: with FSDP2 or ZeRO "
                       "the sync's collectives inside the job (the norm over the shards, the commit vote, gathers) "
                       "would run on the background thread over the process groups the training thread's sharded "
                       "collectives use at the same time. Leave async_sync=False, or use LocalSGDStrategy."),
            reason="the sync's collectives inside the job would run beside the sharded ones",
            strategies=("fsdp", "deepspeed"), whole_feature=True),
    Refusal("warmup_steps", lambda c: c.warmup_steps != 0,
            lambda c: (f"warmup_steps={c.warmup_steps!r}: fully synchronous warm-up steps are not supported with "
                       "DeepSpeed (ZeRO reduces the gradients into its own partitioned buffers inside the worker group, "
                       "so there is no clean place to average them across groups). Use warmup_steps=0, or warm up with "
                       "LocalSGDStrategy / LocalSGDFSDPStrategy."),
            reason="ZeRO reduces gradients into its own partitioned buffers inside the group",
            strategies=("deepspeed",), whole_feature=True),
    _deepspeed_refuses("fragments", 1, _DS_STREAMING),
    _deepspeed_refuses("overlap_steps", 0, _DS_STREAMING),
    _deepspeed_refuses("overlap_mix", 0.0, _DS_STREAMING),
    _deepspeed_refuses("sync_every_seconds", None, _DS_LOCKSTEP),
]


def check(config: Any, strategy: Optional[str] = None) -> None:
    """Raise a ``ValueError`` for the first refused combination in ``config``: a ``LocalSGDConfig``, or any object
    with its attributes (:meth:`LocalSGDConfig.check_support <lightning_localsgd.config.LocalSGDConfig.check_support>`
    passes a strategy's keyword arguments over the defaults, so that a strategy refuses a setting it does not support
    before the arguments' own checks look at it). ``strategy``: ``None`` checks the rows every strategy shares,
    ``"ddp"`` / ``"fsdp"`` / ``"deepspeed"`` that strategy's own."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy kind {strategy!r}; one of {STRATEGIES}.")
    mode = "federated" if _federated(config) else "one world"
    for refusal in REFUSALS:
        if refusal.applies(mode, strategy) and refusal.present(config):
            raise ValueError(refusal.message(config))


# ---------------------------------------------------------------------------------------------------- the README table
#: The features of the table: name, and the setting that turns the feature on (for the refusal rows).
FEATURES: list[tuple[str, tuple[str, ...]]] = [
    ("averaging / DiLoCo (any outer optimizer)", ()),
    ("warm-up (`warmup_steps`)", ("warmup_steps",)),
    ("compression (`compression`, error feedback)", ("compression",)),
    ("streaming (`fragments`, `overlap_steps`)", ("fragments", "overlap_steps", "overlap_mix")),
    ("time-based, token-weighted (`sync_every_seconds`)", ("sync_every_seconds",)),
    ("registered schedule (`sync_schedule`)", ("sync_schedule",)),
    ("two levels (`cluster_size` / federated: `cluster_sync_every`)", ("cluster_size", "cluster_sync_every")),
    ("exact resume from a checkpoint", ()),
    ("asynchronous checkpoint save (`async_save`)", ("async_save",)),
    ("robust screen of each sync (`screen_factor`)", ("screen_factor", "screen_history", "screen_ban_syncs",
                                                     "screen_min_cosine")),
    ("syncs nobody waits for (`async_sync`)", ("async_sync",)),
]

#: The test that exercises each combination that is not refused: (feature, mode, strategy) -> test.
TESTED: dict[tuple[str, str, str], str] = {}


def _tested(feature: str, mode: str, strategies: tuple[str, ...], test: str) -> None:
    for s in strategies:
        TESTED[(feature, mode, s)] = test


_F = [f for f, _ in FEATURES]
_tested(_F[0], "one world", ("ddp",), "tests/strategies/test_groups.py")
_tested(_F[0], "one world", ("fsdp",), "tests/strategies/test_fsdp.py::test_fsdp_groups_match_reference_and_only_shards_cross_groups")
_tested(_F[0], "one world", ("deepspeed",), "tests/strategies/test_deepspeed.py::test_deepspeed_stages_match_reference_and_only_partitions_cross_groups")
_tested(_F[0], "federated", ("ddp",), "tests/federation/test_federated.py")
_tested(_F[0], "federated", ("fsdp",), "tests/federation/test_federated_sharded.py::test_two_jobs_of_two_ranks_fsdp_inside_each_match_the_hand_reference")
_tested(_F[0], "federated", ("deepspeed",), "tests/federation/test_federated_sharded.py::test_two_jobs_of_two_ranks_zero_inside_each_match_the_hand_reference")
_tested(_F[7], "federated", ("fsdp",), "tests/federation/test_federated_sharded.py::test_fsdp_jobs_checkpoint_on_their_own_and_one_resumes_alone_from_its_folder")
_tested(_F[1], "one world", ("ddp",), "tests/features/test_streaming.py::test_fragments_without_overlap_after_warmup_match_reference")
_tested(_F[1], "federated", ("ddp",), "tests/federation/test_federated_schedules.py::test_warmup_then_a_registered_schedule_across_two_jobs")
_tested(_F[2], "one world", ("ddp",), "tests/engine/test_compression.py::test_compressed_average_matches_hand_reference")
_tested(_F[2], "federated", ("ddp",), "tests/federation/test_federated_features.py::test_two_jobs_int8_compressed_syncs_match_the_hand_reference")
_tested(_F[3], "one world", ("ddp", "fsdp"), "tests/features/test_streaming.py::test_streaming_with_worker_groups_of_two")
_tested(_F[3], "federated", ("ddp",), "tests/federation/test_federated_features.py::test_two_jobs_streaming_with_overlap_match_the_hand_reference")
_tested(_F[4], "one world", ("ddp", "fsdp"), "tests/features/test_time_based.py::test_groups_of_two_agree_on_the_sync_step")
_tested(_F[4], "federated", ("ddp",), "tests/federation/test_federated_schedules.py::test_time_based_token_weighted_syncs_with_a_three_times_slower_job")
_tested(_F[5], "one world", ("ddp",), "tests/extensions/test_extension_points.py")
_tested(_F[5], "federated", ("ddp",), "tests/federation/test_federated_schedules.py::test_warmup_then_a_registered_schedule_across_two_jobs")
_tested(_F[6], "one world", ("ddp",), "tests/features/test_two_stage.py::test_two_stage_matches_reference")
_tested(_F[6], "federated", ("ddp",), "tests/federation/test_federated_groups.py::test_two_jobs_of_two_groups_match_the_two_stage_reference")
_tested(_F[7], "one world", ("ddp",), "tests/strategies/test_resume.py")
_tested(_F[7], "one world", ("fsdp",), "tests/strategies/test_fsdp.py::test_fsdp_mid_interval_resume_is_exact")
_tested(_F[7], "one world", ("deepspeed",), "tests/strategies/test_deepspeed.py::test_deepspeed_mid_interval_resume_is_exact")
_tested(_F[8], "one world", ("ddp", "fsdp", "deepspeed"), "tests/reliability/test_async_save.py")
_SHARDED = "tests/strategies/test_sharded_features.py::"
_FSDP_FEATURES = _SHARDED + "test_fsdp_warmup_int8_schedule_and_two_levels_match_references"
_DEEPSPEED_FEATURES = _SHARDED + "test_deepspeed_int8_schedule_and_two_levels_match_references"
for _feature in (_F[1], _F[2], _F[5], _F[6]):
    _tested(_feature, "one world", ("fsdp",), _FSDP_FEATURES)
for _feature in (_F[2], _F[5], _F[6]):  # warm-up is refused with DeepSpeed
    _tested(_feature, "one world", ("deepspeed",), _DEEPSPEED_FEATURES)
# federated: one run exercises several features at once, against a hand reference of exactly that combination
_COMBINED = "tests/federation/test_federated_combinations.py::"
_RESUME_ASYNC = _COMBINED + "test_int8_registered_schedule_then_exact_resume_from_checkpoints_saved_in_the_background"
_tested(_F[1], "federated", ("fsdp",), _RESUME_ASYNC)
_tested(_F[2], "federated", ("fsdp", "deepspeed"), _RESUME_ASYNC)
_tested(_F[3], "federated", ("fsdp",), _COMBINED + "test_fsdp_jobs_streaming_with_overlap_match_the_hand_reference")
_tested(_F[4], "federated", ("fsdp",),
        _COMBINED + "test_fsdp_jobs_time_based_token_weighted_syncs_with_a_three_times_slower_job")
_tested(_F[5], "federated", ("fsdp", "deepspeed"), _RESUME_ASYNC)
_tested(_F[6], "federated", ("fsdp", "deepspeed"),
        "tests/federation/test_federated_groups.py::test_two_jobs_of_two_groups_match_the_two_stage_reference")
_tested(_F[7], "federated", ("ddp", "deepspeed"), _RESUME_ASYNC)
_tested(_F[8], "federated", ("ddp", "fsdp", "deepspeed"), _RESUME_ASYNC)
_tested(_F[9], "one world", ("ddp",),
        "tests/reliability/test_screen_training.py::test_a_broken_group_is_left_out_of_every_sync")
_tested(_F[9], "one world", ("fsdp",),
        "tests/reliability/test_screen_training.py::test_fsdp_groups_of_two_one_broken_group_is_left_out")
_tested(_F[9], "federated", ("ddp",),
        "tests/federation/test_federated_screen.py::test_three_jobs_one_broken_the_honest_two_end_as_without_it")
_tested(_F[10], "federated", ("ddp",),
        "tests/federation/test_async_sync.py::test_two_jobs_async_syncs_match_the_delayed_update_reference")


def _refusal_for(settings: tuple[str, ...], mode: str, strategy: str) -> Optional[Refusal]:
    """The row that refuses a feature (one of ``settings``) itself in ``mode`` with ``strategy``, if any."""
    return next((r for r in REFUSALS if r.whole_feature and r.parameter in settings and mode in r.modes
                 and strategy in r.strategies), None)


def markdown_table() -> str:
    """The README's feature × mode × inner-strategy table: "tested" (the test), "refused: reason" or "runs, no test"
    for a combination neither refused nor exercised by a test yet; then the refused combinations of settings."""
    head = "| feature | " + " | ".join(f"{m}: {s.upper() if s != 'deepspeed' else 'DeepSpeed'}" for m in MODES
                                        for s in STRATEGIES) + " |"
    rows = [head, "|" + "---|" * (1 + len(MODES) * len(STRATEGIES))]
    for feature, settings in FEATURES:
        cells = []
        for mode in MODES:
            for strategy in STRATEGIES:
                refusal = _refusal_for(settings, mode, strategy)
                test = TESTED.get((feature, mode, strategy))
                cells.append(f"refused: {refusal.reason}" if refusal is not None else
                             f"tested: `{test}`" if test is not None else "runs, no test")
        rows.append(f"| {feature} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Combinations refused in every strategy (the error names the setting and the fix):")
    rows.append("")
    seen = set()
    for r in REFUSALS:
        if not r.whole_feature and (r.parameter, r.reason) not in seen:
            seen.add((r.parameter, r.reason))
            where = "" if r.modes == MODES else f" ({', '.join(r.modes)} only)"
            rows.append(f"- `{r.parameter}`{where}: {r.reason}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
