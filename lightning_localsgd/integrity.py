"""Checkpoint integrity: a SHA-256 written with every checkpoint file, verified before the file is used.

The atomic writer (:func:`lightning_localsgd.checkpoint_io.atomic_save`) hashes what ``torch.save`` streams into the
temporary file and records the digest in a small sidecar, ``.<name>.sha256``, next to it. The sidecar is replaced
*before* the checkpoint is renamed into place and lists the new digest and the previous one, so whichever of the two
files a crash leaves behind still verifies. :func:`verify` reads the file back and compares; :func:`load` verifies,
then loads, and turns an unreadable file into one clear error. A checkpoint written without a sidecar (by another
tool, or before this feature) is loaded unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import torch

__all__ = ["CorruptCheckpointError", "HashingWriter", "checksum_path", "load", "read_digests", "reading", "verify",
           "write_digests"]

_CHUNK = 8 * 1024 * 1024
PathLike = Union[str, os.PathLike]


class CorruptCheckpointError(ValueError):
    """A checkpoint file is damaged or incomplete: its bytes do not match the checksum written with it."""


def checksum_path(path: PathLike) -> Path:
    """The sidecar holding the checksums of ``path``."""
    p = Path(os.fspath(path))
    return p.with_name(f".{p.name}.sha256")


class HashingWriter:
    """A binary file wrapper that hashes everything written through it (``torch.save`` streams into it)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def read_digests(path: PathLike) -> Optional[list[str]]:
    """The digests recorded for ``path`` (newest first), or ``None`` without a readable sidecar."""
    try:
        return list(json.loads(checksum_path(path).read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_digests(path: PathLike, digests: list[str]) -> None:
    """Replace the sidecar of ``path`` atomically (temp file, fsync, rename)."""
    side = checksum_path(path)
    tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"sha256": digests}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, side)


def file_digest(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: PathLike) -> bool:
    """``True`` when ``path`` matches its sidecar, ``False`` when it has none; raise when it does not match.

    A checkpoint folder (:mod:`lightning_localsgd.checkpoint`) verifies when its ``meta.pt`` does and every file of
    it that has a sidecar matches it (DeepSpeed's own files have none)."""
    if os.path.isdir(path):
        for f in Path(path).rglob("*"):
            if f.is_file() and not f.name.startswith("."):  # not the sidecars and temp files
                verify(f)  # raises at a damaged file
        meta = Path(path) / "meta.pt"
        return meta.is_file() and verify(meta)
    digests = read_digests(path)
    if digests is None:
        return False
    if file_digest(path) not in digests:
        raise CorruptCheckpointError(
            f"checkpoint {os.fspath(path)} is damaged: its SHA-256 does not match the one written with it (the file "
            "was changed, truncated or only partly copied). Resume from an earlier checkpoint, or copy it again."
        )
    return True


@contextmanager
def reading(path: PathLike) -> Iterator[None]:
    """Turn the errors of ``torch.load`` on an empty, truncated or foreign file into one clear error."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (EOFError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CorruptCheckpointError(
            f"checkpoint {os.fspath(path)} cannot be read: it is empty, truncated or not a checkpoint written by "
            f"torch.save ({type(err).__name__}: {first}). Resume from an earlier checkpoint."
        ) from err


def load(path: PathLike, map_location: Any = "cpu", weights_only: bool = False) -> Any:
    """Verify ``path`` (when it has a sidecar), then ``torch.load`` it; an unreadable file raises one clear error."""
    verify(path)
    with reading(path):
        return torch.load(path, map_location=map_location, weights_only=weights_only)
