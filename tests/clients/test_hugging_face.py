"""An outside client: a Hugging Face ``GPT2LMHeadModel`` wrapped as HF users write it (``training_step`` calls
``self.model(input_ids=x, labels=x).loss``), under every strategy, on CPU processes with gloo.

Each case (tests/workers/train_hf.py) fits one epoch that ends between two syncs, with a validation pass at its end
and ``ModelCheckpoint(save_last=True)``; validates; then resumes from ``last.ckpt`` in a new Trainer. Checked: every
rank ends with the same model; the last checkpoint holds that model (a plain single process loads it and runs a
forward pass); the resumed run starts from exactly the state the first fit ended in, on every rank.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from _launch import max_diff, run_tiny

pytest.importorskip("transformers")
from workers.hf import SEQ, VOCAB, HFGPT2  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "workers" / "train_hf.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _equal(a, b) -> bool:
    """Bitwise equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _plain_checkpoint(ckpt: Path, strategy: str, tmp_path: Path) -> Path:
    """The file `load_from_checkpoint` reads: every strategy's checkpoint folder goes through the one converter."""
    from lightning_localsgd import convert_checkpoint

    return convert_checkpoint(ckpt, tmp_path / "model.ckpt")


@pytest.mark.parametrize("strategy, devices", [
    ("local_sgd", 2),      # the registered name: sync_every 64, so only the train-end sync
    ("diloco_groups", 4),  # LocalSGDStrategy(outer_optimizer="diloco", group_size=2): 2 DDP groups of 2
    ("fsdp", 4),           # LocalSGDFSDPStrategy(group_size=2), the strategy shards the module
    ("fsdp_self", 2),      # LocalSGDFSDPStrategy, the module shards itself (blocks, then itself as root)
    pytest.param("deepspeed", 2, marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")),
])
@pytest.mark.slow
def test_hugging_face_gpt2(tmp_path, monkeypatch, strategy, devices):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator in the workers
    ranks = run_tiny(tmp_path, devices=devices, worker=WORKER, timeout=400, strategy=strategy)
    first = ranks[0]["a_end"]
    assert first["global_step"] == 4 and first["schedule"] == {"steps_done": 4, "steps_since_sync": 0}
    for r, dump in enumerate(ranks):
        a, b = dump["a_end"], dump["b_start"]
        assert max_diff(a["params"], first["params"]) == 0.0, r  # fit returns the same model on every rank
        # exact resume from last.ckpt: parameters, inner optimizer state, outer state and counters as fit left them
        assert max_diff(b["params"], a["params"]) == 0.0, r
        assert _equal(b["optimizers"], a["optimizers"]), r
        assert _equal(b["outer"], a["outer"]), r
        assert b["schedule"] == a["schedule"] and b["global_step"] == 4
        assert dump["b_end"]["global_step"] == 8
        assert max_diff(dump["b_end"]["params"], ranks[0]["b_end"]["params"]) == 0.0, r
        assert torch.isfinite(torch.tensor(dump["val_loss"]))  # trainer.validate after fit B ran
    assert max_diff(ranks[0]["b_end"]["params"], first["params"]) > 0.0  # the resumed run trained on

    ckpt = _plain_checkpoint(tmp_path / "ckpt" / "last.ckpt", strategy, tmp_path)
    module = HFGPT2.load_from_checkpoint(ckpt, map_location="cpu")  # a plain single process
    assert max_diff(dict(module.named_parameters()), first["params"]) == 0.0
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    logits = module.model(input_ids=tokens).logits
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()
