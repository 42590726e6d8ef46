"""One checkpoint folder for every local-SGD strategy: every rank writes its own files, nothing is gathered.

A checkpoint is a folder at the path ``ModelCheckpoint`` / ``Trainer.save_checkpoint`` names (``step=6.ckpt``)::

    step=6.ckpt/
      meta.pt                   Lightning's checkpoint without model and optimizer states (epoch, loops, callbacks,
                                hyper-parameters) + the local-SGD layout and counters under ``local_sgd``.
                                Written last, by global rank 0: it names the save it completes.
      <save>/group00001.pt      worker group 1's replica (DDP): state_dict, optimizer_states, lr_schedulers; written
                                once per group; with groups of S ranks as S parts of about equal bytes
                                (group00001.part00000.pt, ...), part k by rank k of the group
      <save>/rank00003.pt       rank 3's own TrainingState: its θ_g slice, outer optimizer state, error feedback
                                (FSDP: also its parameter shards and their optimizer state)
      <save>/deepspeed/group00001/   DeepSpeed: group 1's ZeRO partitions, written by DeepSpeed on the group's ranks

What each file holds is the :class:`~lightning_localsgd.state.TrainingState` of the strategy's kind. Every file is
written atomically and checksummed (:func:`~lightning_localsgd.checkpoint_io.atomic_save`, local paths) or through
fsspec (remote paths, where object stores replace objects whole). A save writes into a new ``<save>`` sub-folder and
commits by replacing ``meta.pt``; the sub-folders of earlier saves are removed only after that, so a save that fails
midway (a killed rank, a full disk) leaves the previous checkpoint of the same name complete and loadable. Removing a
checkpoint (``save_top_k``) removes its folder. With ``async_save`` the files are written and committed in the
background (:mod:`lightning_localsgd.async_checkpoint`): the commit waits for every rank's files, and a ``save_top_k``
removal for the commit.

Every strategy's ``save_checkpoint`` / ``load_checkpoint`` is :func:`save_checkpoint` / :func:`restore_checkpoint`
with what differs between them: the strategy's ``TrainingState`` (what each file holds and how it is restored), the
layout check, DeepSpeed's partitions (``write_partitions`` / ``read_partitions``).

:func:`convert_checkpoint` (``lightning-localsgd convert FOLDER model.ckpt``) turns a folder of any strategy into one
plain Lightning checkpoint file; :func:`read_checkpoint` reads every group's and rank's state into one dict, offline.
Single-file checkpoints of earlier versions (every group gathered on rank 0) still load and resume.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem

from . import integrity
from .async_checkpoint import AsyncCheckpointWriter
from .checkpoint_io import _is_local, atomic_save
from .config import LocalSGDConfig
from .controller import CHECKPOINT_KEY, FORMAT_VERSION
from .data import drop_strategy_loader_states, loader_states, restore_loader_states
from .engine.outer import merge_outer_states
from .tensors import tensor_bytes

__all__ = ["LAYOUT_VERSION", "META_FILE", "check_elastic_resume", "check_exact_resume", "convert_checkpoint",
           "is_checkpoint_folder", "load_checkpoint", "read_checkpoint", "restore_checkpoint", "save_checkpoint",
           "save_folder", "split_single_file"]

#: Version of the folder layout (``local_sgd.layout_version`` in ``meta.pt``).
LAYOUT_VERSION = 1
META_FILE = "meta.pt"
_SAVE_PREFIX = "save-"
_DEEPSPEED_DIR = "deepspeed"
#: Lightning checkpoint keys that hold model or optimizer state: never in ``meta.pt``.
_MODEL_KEYS = ("state_dict", "optimizer_states")


def group_file(group: int, part: int = 0, parts: int = 1) -> str:
    return f"group{group:05d}.pt" if parts == 1 else f"group{group:05d}.part{part:05d}.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def deepspeed_dir(folder: str, group: int) -> str:
    """Where DeepSpeed writes worker group ``group``'s partitions inside a save's sub-folder."""
    return _join(folder, _DEEPSPEED_DIR, f"group{group:05d}")


def _join(path: str, *names: str) -> str:
    return os.path.join(path, *names) if _is_local(path) else posixpath.join(path, *names)


def _write(obj: Any, path: str) -> None:
    if _is_local(path):
        atomic_save(obj, path)
        return
    with get_filesystem(path).open(path, "wb") as f:
        torch.save(obj, f)


def _read(path: str) -> Any:
    if _is_local(path):
        return integrity.load(path, map_location="cpu", weights_only=False)
    with get_filesystem(path).open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=False)


def is_checkpoint_folder(path: Any) -> bool:
    """Whether ``path`` is a checkpoint folder of this module (it holds a ``meta.pt``)."""
    path = str(path)
    fs = get_filesystem(path)
    return fs.isdir(path) and fs.isfile(_join(path, META_FILE))


# ---------------------------------------------------------------------------------------------------------- save
def save_checkpoint(strategy: Any, checkpoint: Mapping[str, Any], filepath: Any, state: Any,
                    write_partitions: Optional[Callable[[str], None]] = None,
                    writer: Optional[AsyncCheckpointWriter] = None, **layout: Any) -> None:
    """Write ``checkpoint`` as a folder at ``filepath``: every rank its own files, in parallel. Collective.

    Args:
        strategy: the local-SGD strategy (for its ranks, ``broadcast`` and ``barrier``).
        checkpoint: the dict Lightning built on this rank (``Trainer.save_checkpoint`` builds it on every rank).
        filepath: the checkpoint's path (rank 0's is used everywhere); local or an fsspec URL.
        state: the strategy's :class:`~lightning_localsgd.state.TrainingState`.
        write_partitions: DeepSpeed: writes the group's partitions into the folder it is given (collective; always
            before this returns, also with ``writer``).
        writer: asynchronous save (:mod:`lightning_localsgd.async_checkpoint`): this rank's files are copied to host
            memory and written, then committed, by the writer's background thread; this returns once the copy is
            made. ``None``: written and committed before this returns.
        **layout: extra entries of the layout in ``meta.pt`` (e.g. the FSDP shard layout the converter needs).
    """
    strategy.local_sgd.settle()  # async_sync: the sync running beside training is applied first (nothing in flight)
    if writer is not None:
        writer.wait()  # one write in flight: the previous save is committed (or its error raised) first
    # rank 0's path (a path with a timestamp differs between ranks) and a new sub-folder for this save
    path, save = strategy.broadcast((str(filepath), f"{_SAVE_PREFIX}{uuid.uuid4().hex[:12]}"))
    fs = get_filesystem(path)
    folder = _join(path, save)
    rank, group_size = strategy.global_rank, strategy.group_size
    group = rank // group_size
    if strategy.is_global_zero:
        if fs.isfile(path):
            fs.rm(path)  # a single-file checkpoint of an earlier version under the same name
        fs.makedirs(folder, exist_ok=True)
    strategy.barrier("local_sgd.save_checkpoint")
    if state.holds_model_per_rank:
        group_state = None
    else:  # DDP: the group's ranks hold one replica, written once per group, split across the group's ranks
        group_state = {k: checkpoint[k] for k in ("state_dict", "optimizer_states", "lr_schedulers")
                       if k in checkpoint}
    # outside fit (no engines) a DDP rank has nothing of its own to write
    rank_files = strategy.local_sgd.outer_sync is not None or state.holds_model_per_rank
    files: list[tuple[Any, str]] = []  # (object, path) this rank writes
    if group_state is not None:  # rank k of the group writes part k of the replica
        part = rank % group_size
        files.append((split_group_state(group_state, group_size)[part],
                      _join(folder, group_file(group, part, group_size))))
    if write_partitions is not None:
        write_partitions(deepspeed_dir(folder, group))
    if rank_files:  # with this rank's own training-loader position (meta.pt holds rank 0's)
        files.append(({**state.rank_state(), **loader_states(checkpoint)}, _join(folder, rank_file(rank))))
    meta = None
    if strategy.is_global_zero:
        in_files = _MODEL_KEYS if group_state is None else (*_MODEL_KEYS, "lr_schedulers")
        meta = {k: v for k, v in checkpoint.items() if k not in in_files}
        meta[CHECKPOINT_KEY] = strategy.local_sgd.meta(
            strategy.world_size, kind=state.kind, layout_version=LAYOUT_VERSION, save=save,
            group_files=group_state is not None, group_parts=group_size, rank_files=rank_files, **layout)
    if writer is not None:
        files, meta = writer.stage((files, meta))  # host copies: training may change the live state from here on
        writer.submit(lambda: _write_all(files), (lambda: _commit(path, save, meta)) if meta is not None else None,
                      description=path)
        return
    _write_all(files)
    strategy.barrier("local_sgd.save_checkpoint")
    if meta is not None:
        _commit(path, save, meta)
    strategy.barrier("local_sgd.save_checkpoint")


def _write_all(files: list[tuple[Any, str]]) -> None:
    for obj, file in files:
        _write(obj, file)


def _commit(path: str, save: str, meta: Mapping[str, Any]) -> None:
    """Global rank 0, once every rank's files of ``save`` are written: ``meta.pt`` names ``save``, and the files of
    earlier saves under the same name go."""
    _write(meta, _join(path, META_FILE))  # the commit: from here on the checkpoint is the new one
    _remove_other_saves(path, keep=save)


def split_group_state(group_state: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut a group state into ``parts`` pieces of about equal bytes, whole tensors each: the model's tensors and each
    optimizer state tensor (e.g. AdamW's ``exp_avg`` of one parameter) go to the lightest part so far, largest first;
    part 0 also holds the rest (parameter groups, LR schedulers) and the order of the keys. :func:`merge_group_parts`
    puts it together."""
    if parts == 1:
        return [dict(group_state)]
    out: list[dict[str, Any]] = [{"state_dict": {}, "optimizer_states": []} for _ in range(parts)]
    optimizers = group_state.get("optimizer_states") or []
    for piece in out:
        piece["optimizer_states"] = [{"state": {}} for _ in optimizers]
    out[0].update(lr_schedulers=group_state.get("lr_schedulers"), order=list(group_state.get("state_dict", {})),
                  param_groups=[o["param_groups"] for o in optimizers], has_optimizers="optimizer_states" in group_state)
    items: list[tuple[int, tuple, Any]] = [(tensor_bytes(v), ("state_dict", k), v)
                                           for k, v in group_state.get("state_dict", {}).items()]
    items += [(tensor_bytes(v), ("optimizer", i, idx, key), v) for i, o in enumerate(optimizers)
              for idx, st in o["state"].items() for key, v in st.items()]  # e.g. exp_avg, exp_avg_sq apart
    load = [0] * parts
    placed: dict[int, int] = {}  # storage -> part: tensors sharing storage (tied weights) stay in one file, saved once
    for nbytes, where, value in sorted(items, key=lambda item: -item[0]):
        storage = value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) and nbytes else None
        if storage in placed:
            k = placed[storage]
        else:
            k = load.index(min(load))
            load[k] += nbytes
            if storage is not None:
                placed[storage] = k
        if where[0] == "state_dict":
            out[k]["state_dict"][where[1]] = value
        else:
            out[k]["optimizer_states"][where[1]]["state"].setdefault(where[2], {})[where[3]] = value
    return out


def merge_group_parts(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The group state that :func:`split_group_state` cut into ``parts``."""
    if len(parts) == 1:
        return dict(parts[0])
    first = parts[0]
    tensors = {k: v for p in parts for k, v in p["state_dict"].items()}
    merged: dict[str, Any] = {"state_dict": {k: tensors[k] for k in first["order"]},
                              "lr_schedulers": first["lr_schedulers"]}
    if first["has_optimizers"]:
        merged["optimizer_states"] = []
        for i, groups in enumerate(first["param_groups"]):
            state: dict[Any, dict[str, Any]] = {}
            for p in parts:
                for idx, values in p["optimizer_states"][i]["state"].items():
                    state.setdefault(idx, {}).update(values)
            merged["optimizer_states"].append({"state": dict(sorted(state.items())), "param_groups": groups})
    return merged


def _read_group(folder: str, group: int, layout: Mapping[str, Any]) -> dict[str, Any]:
    """Worker group ``group``'s replica, from its one file or the parts its ranks wrote."""
    parts = int(layout.get("group_parts", 1))
    state = merge_group_parts([_read(_join(folder, group_file(group, k, parts))) for k in range(parts)])
    if state.get("lr_schedulers") is None:
        state.pop("lr_schedulers", None)
    return state


def _remove_other_saves(path: str, keep: str) -> None:
    """The sub-folders of earlier saves (and of saves that failed midway), once the new one is committed."""
    fs = get_filesystem(path)
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(str(entry).rstrip("/"))
        if name.startswith(_SAVE_PREFIX) and name != keep:
            fs.rm(entry, recursive=True)


# ---------------------------------------------------------------------------------------------------------- load
def load_checkpoint(path: Any, rank: int, group_size: int,
                    check: Optional[Callable[[Mapping[str, Any]], Optional[bool]]] = None, rank_state: bool = True,
                    ) -> tuple[dict[str, Any], Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """Read what rank ``rank`` needs from a checkpoint folder: in an exact resume, no rank reads another group's or
    another rank's files.

    Args:
        path: the folder.
        rank: the reading rank's global rank.
        group_size: ranks per worker group of the reading run.
        check: called with the local-SGD layout before any per-group or per-rank file is read: raises on a
            layout this run cannot resume; returns ``False`` for another layout it resumes from ``θ_g`` (elastic
            resume, DDP replicas only: :func:`_load_other_layout`).
        rank_state: whether to read the rank's own file (``False``: validate / test / predict: group 0's model).

    Returns:
        ``(checkpoint, layout, rank_state)``: the Lightning checkpoint dict with this rank's group's
        ``state_dict`` / ``optimizer_states`` / ``lr_schedulers`` (DDP), the local-SGD layout and counters, and this
        rank's :class:`~lightning_localsgd.state.TrainingState` rank state (``None`` when not read).
    """
    path = str(path)
    checkpoint = dict(_read(_join(path, META_FILE)))
    layout = checkpoint[CHECKPOINT_KEY]
    _check_layout_version(layout, path)
    folder = save_folder(path, layout)
    if check is not None and rank_state and check(layout) is False:
        return _load_other_layout(folder, checkpoint, layout, rank, group_size)
    group = rank // group_size if rank_state else 0
    if layout.get("group_files"):
        checkpoint.update(_read_group(folder, group, layout))
    mine = _read(_join(folder, rank_file(rank))) if rank_state and layout.get("rank_files", True) else None
    if mine is not None:
        restore_loader_states(checkpoint, mine)
    return checkpoint, layout, mine


def _load_other_layout(folder: str, checkpoint: dict[str, Any], layout: Mapping[str, Any], rank: int,
                       group_size: int) -> tuple[dict[str, Any], Mapping[str, Any], dict[str, Any]]:
    """Elastic resume of DDP replicas on another world size / ``group_size``: ``θ_g`` and the outer state, whole,
    from the rank files of the old group 0 (together they hold every slice of them); the inner optimizer and LR
    scheduler states from old group ``new group mod old groups``. The caller starts the model from ``θ_g``. Each rank
    reads ``θ_g`` whole (one model's worth) and keeps its slice."""
    if layout.get("kind", "replica") != "replica" or not layout.get("group_files") or not layout.get("rank_files"):
        raise ValueError("cannot resume this checkpoint on another world size or group_size: it holds no "
                         "per-group replicas and global parameters (a sharded or weights-only checkpoint).")
    old_size = layout["group_size"] or layout["world_size"]
    old_groups = layout["world_size"] // old_size
    checkpoint.update(_read_group(folder, (rank // group_size) % old_groups, layout))
    ranks = [_read(_join(folder, rank_file(r))) for r in range(old_size)]
    merged = merge_outer_states([r["outer"] for r in ranks])
    return checkpoint, layout, {"outer": merged, "cluster": None}


def save_folder(path: Any, layout: Mapping[str, Any]) -> str:
    """The sub-folder of ``path`` that holds the files of the save ``layout`` (from its ``meta.pt``) completed."""
    path = str(path)
    return _join(path, layout["save"]) if layout.get("save") else path


def _check_layout_version(layout: Mapping[str, Any], path: str) -> None:
    version = layout.get("layout_version", 0)
    if version > LAYOUT_VERSION:
        raise ValueError(f"{path} was written by a newer lightning-localsgd (checkpoint layout {version}, this one "
                         f"reads up to {LAYOUT_VERSION}): upgrade lightning-localsgd to load it.")


def check_exact_resume(meta: Mapping[str, Any], config: LocalSGDConfig, world_size: int) -> None:
    """Raise a ``ValueError`` saying what changed when a checkpoint cannot be resumed exactly by this run."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown local-SGD checkpoint format {meta.get('format_version')!r}.")
    if meta["world_size"] != world_size or meta["group_size"] != config.group_size:
        raise ValueError(
            f"cannot resume local SGD exactly: the checkpoint was written by {meta['world_size']} ranks in worker "
            f"groups of {meta['group_size']}, this run has {world_size} ranks and group_size="
            f"{config.group_size}. Resume with the same devices, num_nodes and group_size; or load only the "
            "weights into a new run (e.g. `LightningModule.load_from_checkpoint`) to start a fresh local-SGD run "
            "from them."
        )
    if meta.get("fragments", 1) != config.fragments:
        raise ValueError(
            f"cannot resume local SGD exactly: the checkpoint was written with fragments={meta.get('fragments', 1)}"
            f", this run has fragments={config.fragments} (streaming syncs in flight belong to the old "
            "fragments). Resume with the same fragments, or load only the weights into a new run."
        )


def check_elastic_resume(meta: Mapping[str, Any], config: LocalSGDConfig) -> None:
    """Raise a ``ValueError`` when a checkpoint of another layout cannot be resumed from its ``θ_g``."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown local-SGD checkpoint format {meta.get('format_version')!r}.")
    c = config
    features = {"cluster_size": c.cluster_size, "fragments": c.fragments if c.fragments != 1 else None,
                "sync_every_seconds": c.sync_every_seconds}
    used = {k: v for k, v in features.items() if v is not None}
    if used or meta.get("fragments", 1) != 1:
        raise ValueError(
            f"cannot resume local SGD on another world size or group_size with {used or {'fragments': meta.get('fragments')}}: "
            f"the checkpoint was written by {meta['world_size']} ranks in worker groups of {meta['group_size']}, "
            f"this run has group_size={c.group_size}. Resume with the same devices, num_nodes and group_size; "
            "elastic resume supports the periodic sync of one level."
        )


def split_single_file(checkpoint: dict[str, Any], rank: int, group_size: int
                      ) -> tuple[dict[str, Any], Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """A single-file checkpoint of an earlier version (every group gathered into one file) read as
    :func:`load_checkpoint` reads a folder: ``(checkpoint with this rank's group's model, layout, rank state)``.
    A plain Lightning checkpoint (no local-SGD state) comes back with ``layout`` ``None``."""
    layout = checkpoint.get(CHECKPOINT_KEY)
    if layout is None:
        return checkpoint, None, None
    out = {k: v for k, v in checkpoint.items() if k != CHECKPOINT_KEY}
    groups = layout.get("groups")
    if groups is not None and rank // group_size < len(groups) and groups[rank // group_size] is not None:
        out.update({k: v for k, v in groups[rank // group_size].items() if v is not None})
    ranks = layout.get("ranks")
    if ranks is None or rank >= len(ranks):
        return out, layout, None
    if "groups" in layout:  # DDP: the ranks' engine states
        clusters = layout.get("clusters") or [None] * len(ranks)
        return out, layout, {"outer": ranks[rank], "cluster": clusters[rank]}
    return out, layout, ranks[rank]  # FSDP: the ranks' whole states


# ---------------------------------------------------------------------------------------------------------- resume
def restore_checkpoint(strategy: Any, path: Any, state: Any, fitting: bool,
                       check: Optional[Callable[[Mapping[str, Any]], Optional[bool]]] = None,
                       read_file: Optional[Callable[[str], dict[str, Any]]] = None,
                       read_partitions: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Every strategy's ``load_checkpoint``: read what this rank needs of a checkpoint and restore this rank's
    :class:`~lightning_localsgd.state.TrainingState` from it (:meth:`~lightning_localsgd.state.TrainingState.restore`).

    Args:
        strategy: the local-SGD strategy (for its ranks and its controller).
        path: a checkpoint folder, or a single file (an earlier version's, or a plain Lightning checkpoint).
        state: the strategy's :class:`~lightning_localsgd.state.TrainingState`.
        fitting: whether ``fit`` resumes (``False``: validate / test / predict, which read group 0's model unless
            this rank's own files hold its shards of the model).
        check: called with the local-SGD layout of a folder before any per-group or per-rank file is read (see
            :func:`load_checkpoint`). Default: the checkpoint must have been written by this run's layout.
        read_file: reads a single-file checkpoint (default: as this module reads its own files).
        read_partitions: DeepSpeed: loads the group's partitions from the folder it is given (collective).

    Returns:
        The Lightning checkpoint dict, for Lightning's own restore (loops, callbacks; for DDP also the group's model,
        optimizers and LR schedulers).
    """
    path = str(path)
    exact = lambda layout: check_exact_resume(layout, strategy.local_sgd.config, strategy.world_size)  # noqa: E731
    own_files = fitting or state.model_in_rank_files  # else group 0's model
    rank, group_size = strategy.global_rank, strategy.group_size
    if is_checkpoint_folder(path):
        checkpoint, layout, mine = load_checkpoint(path, rank, group_size, check or exact, rank_state=own_files)
        if read_partitions is not None:
            assert layout is not None
            read_partitions(deepspeed_dir(save_folder(path, layout), rank // group_size if own_files else 0))
    else:
        checkpoint = (read_file or _read)(path)
        if own_files and checkpoint.get(CHECKPOINT_KEY) is not None:
            exact(checkpoint[CHECKPOINT_KEY])  # an earlier version's single file resumes exactly only
        checkpoint, layout, mine = split_single_file(checkpoint, rank if own_files else 0, group_size)
    state.restore(checkpoint, layout, mine, fitting)
    return checkpoint

# ---------------------------------------------------------------------------------------------------------- offline
def read_checkpoint(path: Any) -> dict[str, Any]:
    """Every group's and rank's state of a checkpoint (folder or single file) in one dict, in a single process.

    The dict is shaped as a single-file checkpoint of earlier versions: Lightning's keys with group 0's model and
    optimizer states; under ``local_sgd`` the layout and counters, ``groups`` (DDP: each group's ``state_dict`` /
    ``optimizer_states``, ``None`` for group 0) and ``ranks`` (each rank's engine state; FSDP: its whole rank state).
    For inspection and tests: it holds every group's model at once.
    """
    path = str(path)
    if not is_checkpoint_folder(path):
        return _read(path)
    checkpoint = dict(_read(_join(path, META_FILE)))
    layout = dict(checkpoint[CHECKPOINT_KEY])
    _check_layout_version(layout, path)
    folder = save_folder(path, layout)
    world, size = layout["world_size"], layout["group_size"] or layout["world_size"]
    if layout.get("group_files"):
        groups = [_read_group(folder, g, layout) for g in range(world // size)]
        checkpoint.update(groups[0])
        layout["groups"] = [None] + [{k: g.get(k) for k in _MODEL_KEYS} for g in groups[1:]]
    ranks = [_read(_join(folder, rank_file(r))) for r in range(world)] if layout.get("rank_files", True) else []
    if layout.get("kind", "replica") == "replica":
        layout["ranks"] = [r["outer"] for r in ranks]
        layout["clusters"] = [r.get("cluster") for r in ranks]
    else:
        layout["ranks"] = ranks
    checkpoint[CHECKPOINT_KEY] = layout
    return checkpoint


def convert_checkpoint(checkpoint_path: Any, output_file: Any, group: int = 0) -> Path:
    """Turn a local-SGD checkpoint (a folder of any strategy, or a single file) into one plain Lightning checkpoint.

    The file holds one worker group's full model under ``state_dict``, in the LightningModule's own names, plus the
    rest of the checkpoint (``epoch``, ``global_step``, hyper-parameters, loops, callbacks), so
    ``LightningModule.load_from_checkpoint(output_file)`` reads it in a single process. From a DDP folder it also
    holds the group's optimizer and LR scheduler states, so a plain DDP run resumes from it; FSDP's and DeepSpeed's
    optimizer states are sharded and left out; so are the data positions of the loaders the strategy made resumable
    (:mod:`lightning_localsgd.data`; a plain run's own loader starts its epoch again). Use the folder itself to resume
    a local-SGD run exactly.

    The last checkpoint of a ``fit`` holds the synced model (the train-end sync runs before it is saved), so every
    group gives the same weights; a checkpoint taken between two syncs holds each group's own model, ``group`` picks
    which. Also on the command line: ``lightning-localsgd convert CHECKPOINT OUTPUT_FILE [--group N]``.

    Args:
        checkpoint_path: the folder ``ModelCheckpoint`` / ``Trainer.save_checkpoint`` wrote (or a single file).
        output_file: the checkpoint file to write (atomically).
        group: which worker group's model to write, ``0 <= group < world_size / group_size``. Default 0.

    Returns:
        The path of the file written.

    Raises:
        ValueError: ``checkpoint_path`` is not a checkpoint, or ``group`` is out of range.
    """
    source, output = str(checkpoint_path), Path(output_file)
    fs = get_filesystem(source)
    if fs.isdir(source) and not is_checkpoint_folder(source):
        raise ValueError(f"checkpoint_path={source!r} is not a local-SGD checkpoint folder (no {META_FILE}). Pass the "
                         "folder that ModelCheckpoint / Trainer.save_checkpoint wrote.")
    if not fs.exists(source):
        raise ValueError(f"checkpoint_path={source!r} does not exist.")
    if not fs.isdir(source):  # a single file: pick the group from it
        checkpoint, layout, _ = split_single_file(dict(_read(source)), rank=0, group_size=1)
        if layout is not None:
            num_groups = layout["world_size"] // (layout["group_size"] or layout["world_size"])
            _check_group(group, num_groups)
            if layout.get("groups") is not None and group > 0:
                checkpoint.update({k: v for k, v in layout["groups"][group].items() if v is not None})
            if "groups" not in layout:  # FSDP single file: group 0's full model only
                _check_group(group, 1)
        return _write_plain(checkpoint, output)
    checkpoint = dict(_read(_join(source, META_FILE)))
    layout = checkpoint.pop(CHECKPOINT_KEY)
    _check_layout_version(layout, source)
    folder = save_folder(source, layout)
    size = layout["group_size"] or layout["world_size"]
    _check_group(group, layout["world_size"] // size)
    kind = layout.get("kind", "sharded" if "shards" in layout else "replica")
    if kind == "replica":
        checkpoint.update(_read_group(folder, group, layout))
    elif kind == "sharded":
        ranks = [_read(_join(folder, rank_file(r))) for r in range(group * size, (group + 1) * size)]
        shards = layout.get("shards") or {}
        checkpoint["state_dict"] = _unshard(ranks, shards, source)
        if "optimizers" in shards and checkpoint.get("loops") is not None:
            checkpoint["optimizer_states"] = _unshard_optimizers(ranks, shards)
    else:
        checkpoint["state_dict"] = _zero_state_dict(deepspeed_dir(folder, group))
    return _write_plain(checkpoint, output)


def _check_group(group: Any, num_groups: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < num_groups:
        raise ValueError(f"group={group!r}: the checkpoint has {num_groups} worker group(s); pass 0 <= group < "
                         f"{num_groups}.")


def _write_plain(checkpoint: dict[str, Any], output: Path) -> Path:
    checkpoint.pop(CHECKPOINT_KEY, None)
    drop_strategy_loader_states(checkpoint)  # a plain run has the user's own loader
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint, output)
    return output


def _unshard(ranks: list[Mapping[str, Any]], shards: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """One group's full ``state_dict`` from its ranks' FSDP shards (row ``group`` of the mesh, in shard order)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, first in ranks[0]["params"].items():
        info = shards.get("params", {}).get(name, {"dim": 0 if first.dim() else None})
        full = first if info["dim"] is None else torch.cat([r["params"][name] for r in ranks], dim=info["dim"])
        if "shape" in info and list(full.shape) != info["shape"]:
            raise ValueError(f"{source}: the shards of {name!r} make a tensor of shape {list(full.shape)}, the model's "
                             f"is {info['shape']}; the folder is incomplete or was written by another layout.")
        tensors[name] = full
    tensors.update(ranks[0]["buffers"])
    keys = shards.get("state_dict") or {name: name for name in tensors}
    return {key: tensors[name] for key, name in keys.items()}


def _unshard_optimizers(ranks: list[Mapping[str, Any]], shards: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One group's full inner optimizer states from its ranks' shards: a per-parameter state tensor shaped like the
    parameter's shard is concatenated along the parameter's sharded dimension; the rest (``step``) is rank 0's."""
    out = []
    for i, names in enumerate(shards["optimizers"]):
        states = [r["optimizers"][i] for r in ranks]
        full: dict[str, Any] = {"param_groups": states[0]["param_groups"], "state": {}}
        for idx, first in states[0]["state"].items():
            name = names[int(idx)]
            dim = shards["params"].get(name, {}).get("dim") if name is not None else None
            shard = ranks[0]["params"].get(name) if name is not None else None
            full["state"][idx] = {
                k: torch.cat([s["state"][idx][k] for s in states], dim=dim)
                if dim is not None and isinstance(v, torch.Tensor) and shard is not None and v.shape == shard.shape
                else v
                for k, v in first.items()
            }
        out.append(full)
    return out


def _zero_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """One group's full fp32 ``state_dict`` from its DeepSpeed partitions (DeepSpeed's own converter)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ModuleNotFoundError(f"converting a DeepSpeed checkpoint needs DeepSpeed ({err}): pip install "
                                  "'lightning-localsgd[deepspeed]'.") from err
    state = get_fp32_state_dict_from_zero_checkpoint(folder, tag="checkpoint")
    # Lightning's DeepSpeed engine wraps the LightningModule: its keys carry a `_forward_module.` prefix
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}
