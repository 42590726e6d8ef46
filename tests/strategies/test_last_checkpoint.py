"""The last checkpoint a fit writes holds the model fit returns, however the fit ends (max_steps, max_epochs,
EarlyStopping, should_stop), also when it ends between two syncs: the train-end sync runs before that checkpoint."""

from __future__ import annotations

from pathlib import Path


from _launch import max_diff, run_tiny
from lightning_localsgd.checkpoint import read_checkpoint

WORKER = Path(__file__).resolve().parents[1] / "workers" / "train_end_conditions.py"


def test_last_checkpoint_holds_the_synced_model_for_every_end_condition(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, worker=WORKER)
    expected_steps = {"max_steps": 7, "max_epochs": 6, "early_stopping": 3, "should_stop": 4}
    assert set(ranks[0]) == set(expected_steps)
    for name, steps in expected_steps.items():
        final = ranks[0][name]["params"]
        assert ranks[0][name]["global_step"] == steps, name
        assert steps % 5 and ranks[0][name]["num_syncs"] == steps // 5 + 1, name  # ended mid-interval: + 1 sync
        assert max_diff(ranks[1][name]["params"], final) == 0.0, name  # fit returns one model on every rank
        files = sorted((tmp_path / name).iterdir())
        last = [f for f in files if f.name == "last.ckpt" or f.name == f"step={steps}.ckpt"]
        assert (tmp_path / name / "last.ckpt") in last, (name, files)
        for path in last:
            saved = read_checkpoint(path)
            assert saved["global_step"] == steps, (name, path.name)
            assert max_diff(saved["state_dict"], final) == 0.0, (name, path.name)  # group 0 = the synced model
            state = saved["local_sgd"]
            assert state["schedule"] == {"steps_done": steps, "steps_since_sync": 0}, (name, path.name)
            assert max_diff(state["groups"][1]["state_dict"], final) == 0.0, (name, path.name)  # so is group 1
