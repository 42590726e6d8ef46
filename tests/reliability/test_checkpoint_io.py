"""Checkpoint writes are atomic: a writer killed mid-save leaves the previous checkpoint complete and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import _forkserver
import lightning_localsgd  # noqa: F401
from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.checkpoint_io import AtomicCheckpointIO

# The child saves OLD completely, then overwrites it with NEW and stalls at `stall` (while pickling, or after all
# bytes are written but before the rename), printing "stalled"; the test then SIGKILLs it.
CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from lightning_localsgd.checkpoint_io import AtomicCheckpointIO

    path, stall = sys.argv[1], sys.argv[2]

    class Stall:
        def __reduce__(self):
            print("stalled", flush=True)
            time.sleep(600)
            return (int, (0,))

    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": "old", "w": torch.arange(1000.0)}, path)
    new = {"version": "new", "w": torch.zeros(4_000_000)}
    if stall == "pickling":
        new["x"] = Stall()
    else:
        real_fsync = os.fsync
        def fsync(fd):
            real_fsync(fd)
            print("stalled", flush=True)
            time.sleep(600)
        os.fsync = fsync
    io.save_checkpoint(new, path)
""")


@pytest.mark.parametrize("stall", ["pickling", "before_rename"])
def test_writer_killed_mid_save_leaves_the_old_checkpoint(tmp_path, stall):
    path = tmp_path / "last.ckpt"
    proc = _forkserver.Popen([sys.executable, "-c", CHILD, str(path), stall], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "stalled"
        if stall == "before_rename":  # the new bytes are all in the temp file, flushed to disk
            (tmp,) = tmp_path.glob(".last.ckpt.*.tmp")
            assert tmp.stat().st_size > 16_000_000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["version"] == "old" and torch.equal(ckpt["w"], torch.arange(1000.0))
    # the next save replaces it and removes the leftover of the killed one
    AtomicCheckpointIO().save_checkpoint({"version": "next"}, path)
    assert torch.load(path, weights_only=True)["version"] == "next"
    # the checkpoint and its checksum sidecar (lightning_localsgd.integrity), nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.sha256", "last.ckpt"]


def test_save_load_remove_and_file_mode(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"  # the folder is created
    io.save_checkpoint({"w": torch.ones(3)}, path)
    assert torch.equal(io.load_checkpoint(path)["w"], torch.ones(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it, not mkstemp's 0600
    io.save_checkpoint({"w": torch.zeros(3)}, str(path))  # overwrite, str path
    assert torch.equal(io.load_checkpoint(path)["w"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == [".a.ckpt.sha256", "a.ckpt"]
    io.remove_checkpoint(path)
    assert not path.exists() and list(path.parent.iterdir()) == []  # the sidecar goes with it
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, path, storage_options={"x": 1})


def test_remote_paths_go_through_lightning(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, "memory://ckpt/a.ckpt")  # fsspec's in-memory file system
    assert torch.equal(io.load_checkpoint("memory://ckpt/a.ckpt")["w"], torch.ones(2))


def test_local_sgd_strategy_writes_atomically_unless_told_otherwise():
    assert isinstance(LocalSGDStrategy().checkpoint_io, AtomicCheckpointIO)
    mine = TorchCheckpointIO()
    assert LocalSGDStrategy(checkpoint_io=mine).checkpoint_io is mine
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(), logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(), plugins=[mine], logger=False)
    assert trainer.strategy.checkpoint_io is mine
    # a wrapping plugin without its own base plugin gets the atomic one inside
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="local_sgd", plugins=[AsyncCheckpointIO()],
                        logger=False)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
