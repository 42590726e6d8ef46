"""Atomic checkpoint files: a process killed while saving leaves the previous checkpoint loadable.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` serializes the whole checkpoint into memory and
then writes it through an fsspec transaction, which for local files writes a temporary file in the system's temp
folder and moves it over the target at the end. When that folder is on another file system (a ``tmpfs`` ``/tmp``, a
container overlay) the move is a copy, so a process killed or a node losing power during it leaves a truncated
checkpoint; nothing is flushed to disk either.

:class:`AtomicCheckpointIO` writes local checkpoints the POSIX way: ``torch.save`` streams into a temporary file in the
*same* folder, the file is flushed and ``fsync``-ed, then ``os.replace`` swaps it in (atomic on one file system) and
the folder is ``fsync``-ed so the rename itself survives a power loss. A reader sees either the old complete file or
the new complete file, never a partial one. It also does not hold a second, serialized copy of the checkpoint in
memory. Remote paths (``s3://``, ...) go to
``TorchCheckpointIO``: object stores replace objects atomically.

:class:`~lightning_localsgd.LocalSGDStrategy` uses it unless you pass your own ``checkpoint_io`` (to the strategy or in
``Trainer(plugins=...)``); a wrapping plugin such as ``AsyncCheckpointIO`` without an inner one gets it inside.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from . import integrity
from ._compat import PATH as _PATH, wrapper_lacks_base_io

log = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointIO", "atomic_save", "with_atomic_default"]

_TMP_SUFFIX = ".tmp"


def _is_local(path: _PATH) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _umask() -> int:
    """The process umask, read without changing it where possible (``os.umask`` sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temp file in the same folder, fsync, ``os.replace``) and
    checksummed; a local checkpoint is verified before it is loaded (:mod:`lightning_localsgd.integrity`).

    A writer killed mid-save leaves a hidden ``.<name>.<random>.tmp`` file next to the checkpoint; the next
    successful save of the same name removes it.
    """

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        kwargs = {"weights_only": weights_only} if map_location is None else \
            {"map_location": map_location, "weights_only": weights_only}
        if not _is_local(path) or not os.path.exists(path):
            return super().load_checkpoint(path, **kwargs)  # remote, or Lightning's FileNotFoundError
        integrity.verify(path)
        with integrity.reading(path):
            return super().load_checkpoint(path, **kwargs)

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            try:
                integrity.checksum_path(os.fspath(path)).unlink()
            except OSError:
                pass

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by AtomicCheckpointIO. Pass "
                "your own `checkpoint_io` to the strategy to use storage options."
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, path)


def atomic_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a local path atomically: temp file in the same folder, fsync, ``os.replace``, fsync folder.

    Every local checkpoint file of :mod:`lightning_localsgd.checkpoint` goes through here (a reader sees the old file
    or the new one). The
    SHA-256 of what was written goes into a sidecar (:mod:`lightning_localsgd.integrity`), replaced before the rename
    and listing the previous digest too, so the file on disk verifies whenever a crash happens.
    """
    target = Path(os.fspath(path)).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            writer = integrity.HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        previous = (integrity.read_digests(target) or [])[:1] if target.exists() else []
        integrity.write_digests(target, [writer.hexdigest(), *previous])
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(target.parent)
    _remove_stale_temps(target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(target: Path) -> None:
    """Temp files of earlier saves of ``target`` that were killed before their rename."""
    for stale in target.parent.glob(f".{target.name}.*{_TMP_SUFFIX}"):
        try:
            stale.unlink()
            log.debug(f"Removed the leftover of an interrupted checkpoint save: {stale}")
        except OSError:
            pass


def with_atomic_default(checkpoint_io: Optional[CheckpointIO]) -> CheckpointIO:
    """``checkpoint_io`` with :class:`AtomicCheckpointIO` filled in where Lightning would put ``TorchCheckpointIO``."""
    if checkpoint_io is None:
        return AtomicCheckpointIO()
    if wrapper_lacks_base_io(checkpoint_io):
        checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # the setter fills the innermost wrapper
    return checkpoint_io
