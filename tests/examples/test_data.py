"""Tests of the example data module (lightning_localsgd.examples.data), on tiny local data only."""

import importlib.util
import pickle

import numpy as np
import sys

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from lightning_localsgd.examples.data import BYTE_EOS, TextDataModule, TokenWindowDataset
from lightning_localsgd.examples.gpt import decode_bytes

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60))


def byte_tokens(*docs: str) -> np.ndarray:
    return np.concatenate([np.frombuffer(d.encode() + bytes([BYTE_EOS]), dtype=np.uint8) for d in docs])


def all_tokens(dm: TextDataModule) -> np.ndarray:
    """Train range followed by val range, as one int array."""
    ds_t, ds_v = dm.train_dataset, dm.val_dataset
    return np.asarray(dm.tokens[ds_t.start : ds_v.end]).astype(np.int64)


def check_windows(dataset: TokenWindowDataset, tokens: np.ndarray, block_size: int) -> None:
    assert len(dataset) == (dataset.end - dataset.start - 1) // block_size
    for i in (0, len(dataset) - 1):
        x, y = dataset[i]
        start = dataset.start + i * block_size
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (block_size,)
        assert x.tolist() == tokens[start : start + block_size].tolist()
        assert y.tolist() == tokens[start + 1 : start + block_size + 1].tolist()


# ---------------------------------------------------------------- sources


def test_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = TextDataModule(path=str(path), block_size=16, batch_size=4, val_fraction=0.1)
    assert dm.source == "text" and dm.vocab_size == 256
    dm.setup("fit")
    expected = byte_tokens(TEXT)
    assert np.array_equal(dm.tokens, expected)
    n_val = int(len(expected) * 0.1)
    assert (dm.val_dataset.start, dm.val_dataset.end) == (len(expected) - n_val, len(expected))
    check_windows(dm.train_dataset, expected, 16)
    check_windows(dm.val_dataset, expected, 16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x, _ = next(iter(dm.val_dataloader()))
    assert decode_bytes(x[0]) == decode_bytes(expected[len(expected) - n_val :][:16])


def test_text_folder_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second " * 40)
    (tmp_path / "sub" / "c.txt").write_text("third " * 40)
    (tmp_path / "a.txt").write_text("first " * 40)
    (tmp_path / "ignored.md").write_text("not text " * 40)
    dm = TextDataModule(path=str(tmp_path), block_size=8, val_fraction=0.2)
    dm.setup()
    assert dm.source == "text"
    assert np.array_equal(dm.tokens, byte_tokens("first " * 40, "second " * 40, "third " * 40))


def test_text_max_tokens(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = TextDataModule(path=str(path), max_tokens=500, block_size=16)
    dm.setup()
    assert len(dm.tokens) == 500 and dm.val_dataset.end == 500


def test_bin_file(tmp_path):
    tokens = (np.arange(3000) * 7 % 500).astype(np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    dm = TextDataModule(path=str(path), block_size=32, val_fraction=0.1)
    assert dm.source == "bin"
    assert dm.vocab_size == 500  # max(token) + 1 without a meta.pkl
    dm.setup()
    assert isinstance(dm.tokens, np.memmap)
    check_windows(dm.train_dataset, tokens, 32)
    check_windows(dm.val_dataset, tokens, 32)
    assert dm.val_dataset.start == 3000 - 300
    # nanoGPT's meta.pkl provides the vocabulary size
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {}, "stoi": {}}, f)
    assert TextDataModule(path=str(path)).vocab_size == 65
    # max_tokens caps the memmap
    dm = TextDataModule(path=str(path), block_size=32, max_tokens=1000, val_fraction=0.1)
    dm.setup()
    assert dm.val_dataset.end == 1000 and dm.val_dataset.start == 900


def test_memmap_dataset_pickles_without_copying(tmp_path):
    path = tmp_path / "big.bin"
    np.arange(100_000, dtype=np.uint16).tofile(path)
    dm = TextDataModule(path=str(path), block_size=64)
    dm.setup()
    blob = pickle.dumps(dm.train_dataset)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert isinstance(clone.tokens, np.memmap)
    for i in (0, 17, len(clone) - 1):
        assert all(torch.equal(a, b) for a, b in zip(clone[i], dm.train_dataset[i]))


def test_builtin_corpus_is_deterministic():
    a = TextDataModule(max_tokens=20_000, block_size=32)
    b = TextDataModule(source="builtin", max_tokens=20_000, block_size=32, seed=7)
    assert a.source == "builtin" and a.vocab_size == 256
    a.setup()
    b.setup()
    assert len(a.tokens) == 20_000 and np.array_equal(a.tokens, b.tokens)
    text = decode_bytes(a.tokens[:5000])
    assert "import" in text or "def " in text  # Python source code


def hf_datasets():
    return pytest.importorskip("datasets")


DOCS = ["first document " * 10, "second document " * 12, "third one " * 15, "fourth " * 20]


def test_hf_local_saved_dataset(tmp_path):
    datasets = hf_datasets()
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(4))}).save_to_disk(str(path))
    dm = TextDataModule(path=str(path), block_size=16, val_fraction=0.2)
    assert dm.source == "hf"
    dm.setup()
    assert np.array_equal(dm.tokens, byte_tokens(*DOCS))
    # explicit source, a text_field other than "text", and max_tokens
    path2 = tmp_path / "saved2"
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(path2))
    dm = TextDataModule(source="hf", path=str(path2), text_field="content", max_tokens=200, block_size=16,
                        val_fraction=0.2)
    dm.setup()
    assert np.array_equal(dm.tokens, byte_tokens(*DOCS)[:200])


def test_hf_local_dataset_dict_split(tmp_path):
    datasets = hf_datasets()
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": DOCS}), "test": datasets.Dataset.from_dict({"text": ["x"]})}
    ).save_to_disk(str(path))
    dm = TextDataModule(path=str(path), block_size=16)
    assert dm.source == "hf"
    dm.setup()
    assert np.array_equal(dm.tokens, byte_tokens(*DOCS))
    with pytest.raises(ValueError, match="hf_split='validation' not in the saved dataset"):
        TextDataModule(path=str(path), hf_split="validation").setup()


def test_hf_hub_dataset_streaming_path(monkeypatch):
    """The hub code path (load_dataset + streaming + max_tokens cap), with load_dataset faked locally."""
    datasets = hf_datasets()
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": DOCS * 50}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = TextDataModule(hf_name="allenai/c4", hf_config="en", max_tokens=1000, block_size=16)
    assert dm.source == "hf"
    dm.setup()
    assert calls == [("allenai/c4", "en", "train", True)]
    assert np.array_equal(dm.tokens, byte_tokens(*(DOCS * 50))[:1000])


def test_hf_unknown_dataset_error(monkeypatch):
    datasets = hf_datasets()

    def fake_load_dataset(name, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = TextDataModule(hf_name="nobody/no-such-dataset", max_tokens=100)
    with pytest.raises(ValueError, match="could not load the Hugging Face dataset hf_name='nobody/no-such-dataset'"):
        dm.setup()


def test_hf_wrong_text_field(tmp_path):
    datasets = hf_datasets()
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(path))
    with pytest.raises(ValueError, match=r"text_field='text' is not a column .* columns: \['content'\]"):
        TextDataModule(path=str(path)).setup()


def test_tokenizer_without_transformers_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without it (the dev extra installs it)
    dm = TextDataModule(tokenizer="gpt2")
    with pytest.raises(ImportError, match="pip install transformers"):
        dm.vocab_size


# ---------------------------------------------------------------- split and sharding


def test_split_is_fixed_tail_independent_of_seed_and_batch_size(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dms = [
        TextDataModule(path=str(path), block_size=16, batch_size=bs, seed=seed, val_fraction=0.1)
        for bs, seed in ((4, 1), (8, 2))
    ]
    for dm in dms:
        dm.setup()
    a, b = dms
    assert (a.val_dataset.start, a.val_dataset.end) == (b.val_dataset.start, b.val_dataset.end)
    assert a.train_dataset.end == a.val_dataset.start  # train and val are adjacent, disjoint ranges
    n = len(a.tokens)
    assert a.val_dataset.end == n and a.val_dataset.start == n - int(n * 0.1)
    val_a = [x for batch in a.val_dataloader() for x in batch[0]]
    val_b = [x for batch in b.val_dataloader() for x in batch[0]]
    assert all(torch.equal(x, y) for x, y in zip(val_a, val_b)) and len(val_a) == len(val_b)
    assert np.array_equal(all_tokens(a), byte_tokens(TEXT))


def test_train_shuffle_is_seeded(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)

    def first_batch(seed):
        dm = TextDataModule(path=str(path), block_size=16, batch_size=8, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


def test_distributed_sampler_gives_disjoint_rank_shards(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = TextDataModule(path=str(path), block_size=16, batch_size=4)
    dm.setup()
    ds = dm.train_dataset
    n = len(ds) - len(ds) % 2  # an even number of windows, so DistributedSampler adds no padding
    ds.end = ds.start + n * ds.block_size + 1
    assert len(ds) == n
    loader = dm.train_dataloader()
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        # the way Lightning re-instantiates our DataLoader with its distributed sampler
        rank_loader = _update_dataloader(loader, sampler)
        shards.append(set(rank_loader.sampler))
        x, y = next(iter(rank_loader))
        assert x.shape == (4, 16)
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == set(range(n))
    assert len(shards[0]) == len(shards[1]) == n // 2


# ---------------------------------------------------------------- errors


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown TextDataModule source='csv'"):
        TextDataModule(source="csv")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        TextDataModule(block_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TextDataModule(batch_size=0)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction must be in the open interval \(0, 1\)"):
            TextDataModule(val_fraction=bad)
    with pytest.raises(FileNotFoundError, match="path='.*missing.txt' does not exist"):
        TextDataModule(path=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(source="bin", path=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="source='text' needs `path`"):
        TextDataModule(source="text")
    with pytest.raises(ValueError, match="source='hf' needs `hf_name`"):
        TextDataModule(source="hf")


def test_empty_inputs_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="contains no text"):
        TextDataModule(path=str(empty)).setup()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("no txt here")
    with pytest.raises(ValueError, match="folder without any .txt files"):
        TextDataModule(path=str(folder)).setup()
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="odd size"):
        TextDataModule(path=str(odd)).setup()


def test_corpus_too_short_errors(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 999)  # 1000 tokens with the EOS
    with pytest.raises(ValueError, match=r"the train split has 900 tokens but needs at least block_size \+ 1 = 1025"):
        TextDataModule(path=str(path), block_size=1024, val_fraction=0.1).setup()
    with pytest.raises(ValueError, match=r"the validation split has 10 tokens but needs at least block_size \+ 1 = 65"):
        TextDataModule(path=str(path), block_size=64, val_fraction=0.01).setup()


# ---------------------------------------------------------------- data position on resume


def _fit(tmp_path, steps: int, ckpt_path=None, every: int = 0) -> list[str]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from workers.train_data_position import BatchRecorder  # records a hash of every training batch

    dm = TextDataModule(source="builtin", max_tokens=40_000, block_size=16, batch_size=4, seed=3)
    model = BatchRecorder()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")] \
        if every else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_train_batches=5, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        enable_checkpointing=bool(every))
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.seen


def test_resume_mid_epoch_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    # epochs of 5 batches; the checkpoint at step 7 is in the middle of the second epoch
    straight = _fit(tmp_path / "a", steps=13, every=7)
    assert len(straight) == 13 and len(set(straight[:5])) == 5 and straight[:5] != straight[5:10]  # reshuffled
    resumed = _fit(tmp_path / "b", steps=13, ckpt_path=tmp_path / "a" / "step=7.ckpt")
    assert resumed == straight[7:]


def test_local_sgd_resume_mid_epoch_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    # 2 processes: Lightning's DistributedSampler replaces the shuffle, the checkpoint is a local-SGD folder
    from pathlib import Path

    from _launch import run_tiny

    worker = Path(__file__).resolve().parents[1] / "workers" / "train_data_position.py"
    straight = run_tiny(tmp_path / "a", devices=2, worker=worker, steps=13, ckpt_every=7)
    resumed = run_tiny(tmp_path / "b", devices=2, worker=worker, steps=13,
                       resume=tmp_path / "a" / "ckpt" / "step=7.ckpt")
    for a, b in zip(straight, resumed):
        assert len(a["seen"]) == 13 and b["seen"] == a["seen"][7:]
    assert straight[0]["seen"] != straight[1]["seen"]  # each rank its own part of the data
