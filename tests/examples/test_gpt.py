"""Tests of the example GPT model (lightning_localsgd.examples.gpt)."""

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_localsgd.examples.data import TextDataModule
from lightning_localsgd.examples.gpt import (
    GPT,
    GPT_SIZES,
    count_non_embedding_params,
    decode_bytes,
    encode_bytes,
    warmup_cosine_lr_factor,
)


def built(**kwargs) -> GPT:
    torch.manual_seed(0)
    model = GPT(**kwargs)
    model.configure_model()
    return model


def counted_non_embedding_params(model: GPT) -> int:
    # named_parameters() de-duplicates the tied lm_head weight (reported as transformer.wte.weight)
    excluded = {"transformer.wte.weight", "transformer.wpe.weight"}
    return sum(p.numel() for name, p in model.named_parameters() if name not in excluded)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_layer=2, n_head=2, n_embd=32),
        dict(n_layer=3, n_head=4, n_embd=48, bias=True, vocab_size=100, block_size=16),
        dict(size="micro"),
        dict(size="tiny", bias=True),
    ],
)
def test_non_embedding_param_formula_matches_built_model(kwargs):
    model = GPT(**kwargs)
    expected = model.num_non_embedding_params  # from the config, before building
    assert model.transformer is None
    model.configure_model()
    assert counted_non_embedding_params(model) == expected
    # the formula by hand for the first config: 2 * (12 * 32^2 + 2 * 32) + 32
    if kwargs == dict(n_layer=2, n_head=2, n_embd=32):
        assert expected == 2 * (12 * 32 * 32 + 64) + 32 == 24_736


def test_size_ladder_increases_and_overrides_shape():
    counts = [count_non_embedding_params(cfg["n_layer"], cfg["n_embd"]) for cfg in GPT_SIZES.values()]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    model = GPT(size="small", n_layer=1, n_head=1, n_embd=8)
    assert (model.n_layer, model.n_head, model.n_embd) == (6, 6, 192)
    for name, cfg in GPT_SIZES.items():
        assert cfg["n_embd"] % cfg["n_head"] == 0, name


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown GPT size='huge'"):
        GPT(size="huge")
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPT(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        GPT(n_layer=0)
    with pytest.raises(RuntimeError, match="configure_model"):
        GPT()(torch.zeros(1, 4, dtype=torch.long))


def test_configure_model_is_idempotent_and_ties_weights():
    model = built(size="nano")
    params = list(model.parameters())
    model.configure_model()
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_forward_backward_shapes_and_initial_loss():
    model = built(n_layer=2, n_head=2, n_embd=64, block_size=32)
    idx = torch.randint(0, 256, (4, 32))
    targets = torch.randint(0, 256, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 256)
    # small init -> near-uniform predictions -> loss ~ ln(vocab_size)
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    logits, loss = model(idx[:, :5])
    assert logits.shape == (4, 5, 256) and loss is None
    with pytest.raises(ValueError, match="block_size is only 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_weight_decay_groups():
    model = built(n_layer=2, n_head=2, n_embd=32, bias=True, weight_decay=0.05)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    # every parameter exactly once (the tied lm_head / wte weight counted once)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    # 2-D: wte, wpe, per block c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(decay["params"]) == 2 + 4 * 2
    # 1-D: per block 2 LN weights + 2 LN biases + 4 linear biases; ln_f weight + bias
    assert len(no_decay["params"]) == 8 * 2 + 2
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_lr_schedule_warmup_then_cosine():
    model = built(n_layer=1, n_head=1, n_embd=8, learning_rate=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    factor = scheduler.lr_lambdas[0]
    expected = {
        0: 0.1,  # (0 + 1) / 10
        4: 0.5,
        9: 1.0,  # end of warm-up
        10: 1.0,  # start of the cosine
        60: 0.1 + 0.9 * 0.5,  # half-way: cos(pi/2) = 0
        35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
        110: 0.1,
        500: 0.1,  # stays at the minimum
    }
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value), step
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    # no max_steps and no trainer: constant after warm-up
    assert warmup_cosine_lr_factor(1000, warmup_steps=10, max_steps=None, min_lr_ratio=0.1) == 1.0
    assert warmup_cosine_lr_factor(0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == 1.0
    assert warmup_cosine_lr_factor(5, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5)


def test_generate_and_byte_helpers():
    model = built(n_layer=1, n_head=2, n_embd=16, block_size=8)
    prompt = encode_bytes("hello").unsqueeze(0).repeat(2, 1)
    out = model.generate(prompt, max_new_tokens=7, temperature=0.8, top_k=5)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    assert out.dtype == torch.long and int(out.max()) < 256
    # prompts longer than block_size are cropped to the last block_size tokens
    assert model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=3).shape == (1, 13)
    assert decode_bytes(encode_bytes("héllo, wörld")) == "héllo, wörld"
    assert decode_bytes([104, 105, 255]) == "hi\ufffd"


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_fit_on_builtin_corpus_reduces_loss(tmp_path):
    torch.manual_seed(0)
    data = TextDataModule(max_tokens=100_000, block_size=64, batch_size=16, val_fraction=0.05)
    model = GPT(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=data.vocab_size,
                learning_rate=3e-3, warmup_steps=5)
    recorder = LossRecorder()
    trainer = Trainer(
        accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=10, limit_val_batches=2,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=data)
    losses = recorder.losses
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_ppl", "val_loss", "val_ppl"} <= set(metrics)
    assert metrics["val_ppl"].item() == pytest.approx(math.exp(metrics["val_loss"].item()), rel=1e-4)
    assert metrics["val_loss"].item() < math.log(256)
    # max_steps=None -> cosine decay over trainer.estimated_stepping_batches (= 20): final lr near the minimum
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(
        3e-3 * warmup_cosine_lr_factor(20, 5, 20, 0.1)
    )

    # validation loss is the token-weighted mean over the validation batches
    result = trainer.validate(model, datamodule=data, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        total, count = 0.0, 0
        for i, (x, y) in enumerate(data.val_dataloader()):
            if i == 2:
                break
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    assert result["val_loss"] == pytest.approx(total / count, rel=1e-5)

    # checkpoints round-trip: load_from_checkpoint builds the modules via configure_model
    path = tmp_path / "gpt.ckpt"
    trainer.save_checkpoint(path)
    loaded = GPT.load_from_checkpoint(path)
    loaded.eval()
    x, _ = data.val_dataset[0]
    torch.testing.assert_close(loaded(x[None])[0], model(x[None])[0])
