"""The checkpoint folder (lightning_localsgd.checkpoint): every rank writes its own files, nothing is gathered on rank 0,
a save that fails midway leaves the previous checkpoint, fsspec paths work, old single-file checkpoints still resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _launch import max_diff, run_tiny
from lightning_localsgd import checkpoint as ckpt_module
from lightning_localsgd.checkpoint import (convert_checkpoint, is_checkpoint_folder, load_checkpoint, merge_group_parts,
                                           read_checkpoint, save_checkpoint, split_group_state)
from lightning_localsgd.config import LocalSGDConfig
from lightning_localsgd.controller import LocalSGDController
from lightning_localsgd.state import ReplicaState

#: Written by the single-file format of commit 8c93cad (every group gathered on rank 0) with
#: ``train_tiny.py --devices 2 --sync-every 4 --steps 10 --outer diloco --inner adamw --seed-by-rank
#: --batches-per-epoch 3 --ckpt-every 6``: its step=6.ckpt.
LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_single_file_step6.pt"
RESUME_OPTS = dict(devices=2, sync_every=4, steps=10, outer="diloco", inner="adamw", seed_by_rank=True,
                   batches_per_epoch=3)
#: Collectives that could bring another rank's state to rank 0. A save may only broadcast rank 0's path and wait.
RECEIVING = {"gather", "gather_object", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_single",
             "reduce", "all_reduce", "all_to_all", "reduce_scatter_tensor", "reduce_scatter_single", "scatter"}


def test_save_gathers_nothing_each_group_writes_its_replica_once(tmp_path):
    # 4 ranks in 2 DDP groups of 2, checkpoints at steps 3 and 6 (mid-interval: the groups differ)
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every=4, steps=7, ckpt_every=3, seed_by_rank=True,
                     count_collectives=True, outer="diloco", inner="adamw")
    for r, dump in enumerate(ranks):
        during_save = [c for c in dump["collectives"] if c.get("saving")]
        assert during_save, r  # the saves ran on every rank, collectives included
        assert {c["op"] for c in during_save} <= {"broadcast_object_list", "barrier"}, (r, during_save)
        assert not [c for c in during_save if c["op"] in RECEIVING], r
    folder = tmp_path / "ckpt" / "step=6.ckpt"
    (save,) = [p for p in folder.iterdir() if p.is_dir()]
    # each group's replica written once, in 2 parts (one per rank of the group); every rank its own outer state
    assert sorted(p.name for p in save.glob("*.pt")) == [f"group{g:05d}.part{k:05d}.pt" for g in range(2)
                                                         for k in range(2)] + [f"rank{r:05d}.pt" for r in range(4)]
    whole = read_checkpoint(folder)
    assert max_diff(whole["local_sgd"]["groups"][1]["state_dict"], ranks[2]["steps"][5]) == 0.0
    assert max_diff(whole["state_dict"], ranks[0]["steps"][5]) == 0.0
    assert max_diff(ranks[0]["steps"][5], ranks[2]["steps"][5]) > 0.0


def test_old_single_file_checkpoint_still_resumes_exactly(tmp_path):
    """The file was written on another machine: its steps 1-6 can differ from this CPU's in the last bit (float kernels
    differ between CPU models: 1.5e-8 on an Intel Xeon for a file written on an AMD EPYC). So the load is checked
    bit for bit against the file itself, and the continuation against a run straight through on this machine: bit for
    bit where this machine's step 6 is the file's, else within the rounding of those 6 steps carried 4 more."""
    whole = torch.load(LEGACY, weights_only=False)
    legacy = whole["local_sgd"]
    models = [whole["state_dict"]] + [g["state_dict"] for g in legacy["groups"][1:]]  # group 0's is Lightning's own
    straight = run_tiny(tmp_path / "a", **RESUME_OPTS)
    loaded = run_tiny(tmp_path / "c", resume=LEGACY, **{**RESUME_OPTS, "steps": 6})  # loads it, trains nothing
    resumed = run_tiny(tmp_path / "b", resume=LEGACY, **RESUME_OPTS)
    for r, (a, b, c) in enumerate(zip(straight, resumed, loaded)):
        assert max_diff(c["final"], models[r]) == 0.0 and c["info"]["num_syncs"] == 1
        assert all(torch.equal(x, y) for x, y in zip(c["outer_state"]["snapshot"], legacy["ranks"][r]["snapshot"]))
        here = max_diff(a["steps"][5], models[r])  # this machine's step 6 against the file's
        assert here <= 1e-6
        assert max_diff(a["final"], b["final"]) <= (0.0 if here == 0.0 else 1e-6)
        assert a["info"]["num_syncs"] == b["info"]["num_syncs"] == 3
        snapshots = zip(a["outer_state"]["snapshot"], b["outer_state"]["snapshot"])
        assert all(torch.equal(x, y) if here == 0.0 else torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in snapshots)
    # and the one converter reads it: group 1's model at step 6
    plain = torch.load(convert_checkpoint(LEGACY, tmp_path / "g1.ckpt", group=1), weights_only=False)
    assert "local_sgd" not in plain and max_diff(plain["state_dict"], models[1]) == 0.0


# ------------------------------------------------------------------------------------------------ one process
class _OneRank(SimpleNamespace):
    """The strategy surface the checkpoint helpers use, for a world of one rank."""

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        pass


def _strategy() -> _OneRank:
    controller = LocalSGDController(LocalSGDConfig.from_kwargs({"group_size": 1}, {}))
    return _OneRank(global_rank=0, group_size=1, world_size=1, is_global_zero=True, local_sgd=controller)


def _checkpoint(value: float) -> dict:
    return {"epoch": 0, "global_step": int(value), "state_dict": {"w": torch.full((3,), value)},
            "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": []}


def _save(path, value: float) -> None:
    strategy = _strategy()
    save_checkpoint(strategy, _checkpoint(value), path, ReplicaState(strategy))


def test_failed_save_leaves_the_previous_checkpoint_and_removal_removes_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    _save(path, 1.0)
    real_write = ckpt_module._write

    def fail_on_group_file(obj, target):
        if "group" in str(target):
            raise OSError("disk full")
        real_write(obj, target)

    monkeypatch.setattr(ckpt_module, "_write", fail_on_group_file)
    with pytest.raises(OSError, match="disk full"):
        _save(path, 2.0)
    monkeypatch.setattr(ckpt_module, "_write", real_write)
    checkpoint, layout, _ = load_checkpoint(path, rank=0, group_size=1, rank_state=False)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(3)) and checkpoint["global_step"] == 1
    _save(path, 3.0)  # the next save commits and removes the failed save's leftovers
    assert len([p for p in path.iterdir() if p.is_dir()]) == 1
    assert read_checkpoint(path)["global_step"] == 3
    from lightning_localsgd import AtomicCheckpointIO

    AtomicCheckpointIO().remove_checkpoint(path)  # what save_top_k does through the strategy
    assert not path.exists()


def test_fsspec_paths_write_and_read_the_same_folder():
    path = "memory://checkpoints/step=1.ckpt"  # fsspec's in-memory file system
    _save(path, 5.0)
    assert is_checkpoint_folder(path)
    checkpoint, layout, _ = load_checkpoint(path, rank=0, group_size=1, rank_state=False)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.full((3,), 5.0)) and layout["layout_version"] == 1
    _save(path, 6.0)
    assert read_checkpoint(path)["global_step"] == 6


def test_a_replica_split_across_the_group_ranks_merges_back_whole():
    state = {"state_dict": {f"w{i}": torch.full((i + 1, 3), float(i)) for i in range(7)},
             "optimizer_states": [{"state": {i: {"exp_avg": torch.ones(i + 1, 3), "step": torch.tensor(5.0)}
                                             for i in range(7)}, "param_groups": [{"lr": 0.1, "params": list(range(7))}]}],
             "lr_schedulers": [{"last_epoch": 3}]}
    parts = split_group_state(state, 3)
    sizes = [sum(t.numel() for t in p["state_dict"].values())
             + sum(t.numel() for st in p["optimizer_states"][0]["state"].values() for t in st.values()) for p in parts]
    assert len(parts) == 3 and max(sizes) - min(sizes) <= 22  # about equal: within the largest single item
    merged = merge_group_parts(parts)
    assert list(merged["state_dict"]) == list(state["state_dict"])  # the key order too
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in state["state_dict"].items())
    assert sorted(merged["optimizer_states"][0]["state"]) == list(range(7))
    assert merged["optimizer_states"][0]["param_groups"] == state["optimizer_states"][0]["param_groups"]
    assert merged["lr_schedulers"] == state["lr_schedulers"]
    # tied weights (one storage under two keys) stay in one part, so the files hold them once
    tied = {"state_dict": {"wte": torch.ones(50, 4), "x": torch.zeros(60, 4)}}
    tied["state_dict"]["lm_head"] = tied["state_dict"]["wte"]
    a, b = split_group_state(tied, 2)
    assert ("wte" in a["state_dict"]) == ("lm_head" in a["state_dict"])
