"""Language-modelling data: a token stream cut into fixed-length windows.

:class:`TextDataModule` turns one of several sources into a single 1-D token
stream, splits it into a training part and a held-out validation part, and
serves ``(x, y)`` pairs of ``block_size`` tokens where ``y`` is ``x`` shifted
by one position.

Sources (``source=``):

* ``"builtin"`` - the ``.py`` files of the Python standard library of the running
  interpreter: a few MB of real text available offline, no download. Byte-level.
* ``"text"`` - a ``.txt`` file, or a folder searched recursively for ``.txt`` files.
* ``"bin"`` - a nanoGPT-style ``.bin`` file of ``uint16`` token ids (read via memmap).
* ``"hf"`` - a Hugging Face dataset: a hub name (``hf_name="allenai/c4"``,
  ``hf_config="en"``; streamed by default) or a directory written by
  ``Dataset.save_to_disk`` (``path=...``).
* ``"auto"`` (default) - ``builtin`` when neither ``path`` nor ``hf_name`` is
  given, ``hf`` for ``hf_name`` or a ``save_to_disk`` directory, ``bin`` for a
  ``.bin`` file and ``text`` otherwise.

Text is tokenized byte-level (UTF-8 bytes, vocabulary 256, byte 0 separates
documents) unless ``tokenizer`` names a Hugging Face tokenizer.

Train/validation split: the **last** ``val_fraction`` of the token stream is the
validation set. It depends only on the data and ``val_fraction`` - not on the
number of processes or the seed - so differently distributed runs (DDP, local
SGD, ...) are evaluated on the same held-out tokens. The training windows are
shuffled; under multi-process training Lightning wraps the train loader in a
``DistributedSampler`` so each rank trains on its own disjoint part.

Exact data position on resume: the order of an epoch's training windows depends
only on the seed and the epoch (``EpochShuffleSampler``, or under a local-SGD
strategy the library's ``ResumableSampler``, which has Lightning's
``DistributedSampler`` order), and the train loader is the library's
:class:`~lightning_localsgd.data.ResumableDataLoader`, whose position Lightning
saves in the checkpoint, so a resumed fit sees exactly the batches an
uninterrupted run would - also under a plain Lightning strategy (a local-SGD
strategy makes any plain ``DataLoader`` resumable by itself).
"""

from __future__ import annotations

import os
import pickle
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_localsgd.data import ResumableDataLoader

__all__ = ["TextDataModule", "TokenWindowDataset", "BYTE_EOS", "SOURCES", "EpochShuffleSampler"]

#: Valid values of ``TextDataModule(source=...)``.
SOURCES = ("auto", "builtin", "text", "bin", "hf")
#: Document separator of the byte-level tokenizer (the NUL byte never occurs in normal text).
BYTE_EOS = 0
#: Default corpus cap (tokens = bytes) for ``source="builtin"``.
BUILTIN_MAX_TOKENS = 8_000_000
#: Default corpus cap for a streamed Hugging Face dataset (the stream would otherwise not end).
HF_STREAMING_MAX_TOKENS = 10_000_000


class TokenWindowDataset(Dataset):
    """Windows of ``block_size + 1`` tokens from ``tokens[start:end]`` (a 1-D array).

    Window ``i`` starts at token ``start + i * block_size``; consecutive windows
    share one token, so every token of the range except the first is a target
    exactly once. Item ``i`` is ``(x, y) = (w[:-1], w[1:])`` as ``int64`` tensors
    of length ``block_size``. A ``numpy.memmap`` is re-opened (not copied) when
    the dataset is pickled to DataLoader worker processes.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, start: int = 0, end: Optional[int] = None) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.start = start
        self.end = len(tokens) if end is None else end

    def __len__(self) -> int:
        return max(0, (self.end - self.start - 1) // self.block_size)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = self.start + i * self.block_size
        window = torch.from_numpy(np.asarray(self.tokens[s : s + self.block_size + 1]).astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap) and self.tokens.filename is not None:
            state["tokens"] = None
            state["_memmap"] = (self.tokens.filename, self.tokens.dtype.str, self.tokens.offset, self.tokens.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        memmap = state.pop("_memmap", None)
        self.__dict__.update(state)
        if memmap is not None:
            filename, dtype, offset, shape = memmap
            self.tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)


def _stdlib_python_files() -> list[Path]:
    """The standard library's ``.py`` files (without site-packages), in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _check_argument_types(args: dict[str, Any]) -> None:
    """Wrong types fail here, not later with an unrelated message (e.g. ``'<' not supported ...``)."""
    from lightning_localsgd.validation import check_bool, check_int, check_number, check_path, check_str

    owner = "TextDataModule"
    for name in ("block_size", "batch_size", "num_workers", "seed"):
        check_int(owner, name, args[name])
    check_int(owner, "max_tokens", args["max_tokens"], optional=True)
    check_number(owner, "val_fraction", args["val_fraction"])
    check_bool(owner, "streaming", args["streaming"])
    check_path(owner, "path", args["path"])
    for name in ("hf_split", "text_field"):
        check_str(owner, name, args[name])
    for name in ("hf_name", "hf_config", "tokenizer"):
        check_str(owner, name, args[name], optional=True)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def _check_is_text(path: Path, probe: int = 1 << 16) -> None:
    """Refuse a binary file given as text (a checkpoint, an archive, token ids): it would train on its bytes."""
    with open(path, "rb") as f:
        head = f.read(probe)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not merely a character cut at the end of the probe
            raise ValueError(
                f"TextDataModule path={os.fspath(path)!r} is not a UTF-8 text file (byte {err.start} is not text): "
                "pass a .txt file or a folder of them; token ids go in a .bin file (source='bin')."
            ) from None
    if b"\x00" in head:
        raise ValueError(
            f"TextDataModule path={os.fspath(path)!r} is a binary file (it contains NUL bytes), not text: pass a .txt "
            "file or a folder of them; token ids go in a .bin file (source='bin')."
        )


class EpochShuffleSampler(RandomSampler):
    """A shuffle whose order is a function of ``seed`` and the epoch only (Lightning calls ``set_epoch``), so the
    epoch a run resumes in is shuffled as it was before the interruption. A ``RandomSampler``: under several
    processes Lightning replaces it by a shuffling ``DistributedSampler``, which is ordered the same way."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class TextDataModule(LightningDataModule):
    """Token-stream language-modelling data for :class:`~lightning_localsgd.examples.gpt.GPT`.

    Args:
        source: Where the text comes from: ``"auto"``, ``"builtin"`` (Python standard
            library sources, offline), ``"text"`` (.txt file or folder), ``"bin"``
            (nanoGPT uint16 token file) or ``"hf"`` (Hugging Face dataset). ``"auto"``
            picks ``builtin`` without ``path``/``hf_name``, else infers from them.
        path: A ``.txt`` file, a folder of ``.txt`` files (searched recursively), a
            ``.bin`` token file, or a directory saved by ``datasets``' ``save_to_disk``.
            For ``source="hf"`` a non-existing path is used as a hub dataset name.
        hf_name: Hugging Face hub dataset name, e.g. ``"allenai/c4"`` or
            ``"cerebras/SlimPajama-627B"``.
        hf_config: Dataset configuration, e.g. ``"en"`` for ``allenai/c4``.
        hf_split: Split to read (also used to pick a split from a saved ``DatasetDict``).
        text_field: Column holding the document text.
        streaming: Stream a hub dataset instead of downloading it completely. The
            stream is read until ``max_tokens`` tokens (default 10M).
        tokenizer: Hugging Face tokenizer name (needs ``transformers``). Default:
            byte-level tokens (UTF-8 bytes, vocabulary 256).
        max_tokens: Use at most this many tokens of the source (default: all; 8M for
            ``builtin``; 10M for a streamed dataset).
        block_size: Sequence length of a training sample (``<= model.block_size``).
        batch_size: Samples per batch (per process).
        val_fraction: Fraction at the end of the token stream held out for validation,
            in (0, 1).
        num_workers: DataLoader worker processes.
        seed: Seed of the training-set shuffle (single process: epoch ``e`` is shuffled
            with ``seed + e``; under a distributed sampler Lightning uses the global seed).
    """

    def __init__(
        self,
        source: str = "auto",
        path: Optional[str] = None,
        hf_name: Optional[str] = None,
        hf_config: Optional[str] = None,
        hf_split: str = "train",
        text_field: str = "text",
        streaming: bool = True,
        tokenizer: Optional[str] = None,
        max_tokens: Optional[int] = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_argument_types(locals())
        if source not in SOURCES:
            raise ValueError(f"Unknown TextDataModule source={source!r}; choose one of {list(SOURCES)}.")
        if block_size < 1:
            raise ValueError(f"TextDataModule block_size must be >= 1, got {block_size}.")
        if batch_size < 1:
            raise ValueError(f"TextDataModule batch_size must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"TextDataModule val_fraction must be in the open interval (0, 1), got {val_fraction}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"TextDataModule max_tokens must be >= 1 (or None for no cap), got {max_tokens}.")
        if num_workers < 0:
            raise ValueError(f"TextDataModule num_workers must be >= 0, got {num_workers}.")
        self.path = path
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.hf_split = hf_split
        self.text_field = text_field
        self.streaming = streaming
        self.tokenizer_name = tokenizer
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.source = self._resolve_source(source)
        self._tokenizer: Any = None
        self._vocab_size: Optional[int] = None
        self.tokens: Optional[np.ndarray] = None
        self.train_dataset: Optional[TokenWindowDataset] = None
        self.val_dataset: Optional[TokenWindowDataset] = None

    # ------------------------------------------------------------ source
    def _resolve_source(self, source: str) -> str:
        path = Path(self.path) if self.path is not None else None
        if source == "auto":
            if path is None:
                source = "hf" if self.hf_name is not None else "builtin"
            elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                                    or (path / "dataset_dict.json").exists()):
                source = "hf"
            elif path.suffix == ".bin":
                source = "bin"
            elif path.exists():
                source = "text"
            else:
                raise FileNotFoundError(
                    f"TextDataModule path={self.path!r} does not exist. Pass an existing .txt file, folder, "
                    f".bin file or saved dataset directory, or path=None for the builtin corpus."
                )
        if source in ("text", "bin"):
            if path is None:
                what = "a .bin token file" if source == "bin" else "a .txt file or a folder of .txt files"
                raise ValueError(f"TextDataModule source={source!r} needs `path` ({what}).")
            if not path.exists():
                raise FileNotFoundError(f"TextDataModule path={self.path!r} does not exist (source={source!r}).")
            if source == "text" and path.is_file():
                _check_is_text(path)
        if source == "hf" and path is None and self.hf_name is None:
            raise ValueError("TextDataModule source='hf' needs `hf_name` (a hub dataset such as 'allenai/c4') "
                             "or `path` (a directory written by `Dataset.save_to_disk`).")
        return source

    # ------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, or ``None`` for byte-level tokens (loaded lazily)."""
        if self.tokenizer_name is None:
            return None
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError(
                    f"TextDataModule tokenizer={self.tokenizer_name!r} needs the `transformers` package: "
                    "`pip install transformers`, or set tokenizer=None for byte-level tokens."
                ) from e
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokens: 256 for bytes, ``len(tokenizer)`` for a tokenizer.

        For a ``.bin`` source without ``tokenizer`` it is read from a nanoGPT ``meta.pkl``
        next to the file, or else computed as ``max(token) + 1``. Link it to the model,
        e.g. ``parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")``.
        """
        if self._vocab_size is None:
            if self.tokenizer_name is not None:
                self._vocab_size = len(self.tokenizer)
            elif self.source == "bin":
                meta = Path(self.path).parent / "meta.pkl"
                if meta.exists():
                    with open(meta, "rb") as f:
                        self._vocab_size = int(pickle.load(f)["vocab_size"])
                else:
                    tokens = self.load_tokens()
                    n = len(tokens) if self.max_tokens is None else min(len(tokens), self.max_tokens)
                    self._vocab_size = int(tokens[:n].max()) + 1
            else:
                self._vocab_size = 256
        return self._vocab_size

    def _encode(self, text: str) -> np.ndarray:
        """Token ids of one document followed by the document separator (EOS)."""
        if self.tokenizer_name is None:
            return np.frombuffer(text.encode("utf-8") + bytes([BYTE_EOS]), dtype=np.uint8)
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is not None:
            ids = ids + [eos]
        return np.asarray(ids, dtype=_token_dtype(self.vocab_size))

    def _tokens_from_texts(self, texts: Iterable[str], max_tokens: Optional[int]) -> np.ndarray:
        """Tokenize documents, separate them by EOS, and stop after ``max_tokens`` tokens."""
        chunks: list[np.ndarray] = []
        n = 0
        for text in texts:
            chunks.append(self._encode(text))
            n += len(chunks[-1])
            if max_tokens is not None and n >= max_tokens:
                break
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=_token_dtype(self.vocab_size))
        return tokens[:max_tokens] if max_tokens is not None else tokens

    # ------------------------------------------------------------ loaders per source
    def _load_builtin(self) -> np.ndarray:
        max_tokens = self.max_tokens if self.max_tokens is not None else BUILTIN_MAX_TOKENS
        files = _stdlib_python_files()
        if not files:
            raise FileNotFoundError(
                f"No .py files found in the standard library at {sysconfig.get_paths()['stdlib']!r} for the "
                "builtin corpus; use source='text' with a path instead."
            )
        return self._tokens_from_texts((p.read_text("utf-8", errors="replace") for p in files), max_tokens)

    def _load_text(self) -> np.ndarray:
        path = Path(self.path)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise ValueError(f"TextDataModule path={self.path!r} is a folder without any .txt files "
                                 "(searched recursively). Add .txt files or point `path` at a file.")
        else:
            files = [path]
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"TextDataModule path={self.path!r} contains no text (empty .txt file(s)).")
        for p in files:
            _check_is_text(p)
        return self._tokens_from_texts((p.read_text("utf-8", errors="replace") for p in files), self.max_tokens)

    def _load_bin(self) -> np.ndarray:
        """The whole file as a read-only uint16 memmap (``max_tokens`` is applied in :meth:`setup`)."""
        path = Path(self.path)
        size = path.stat().st_size
        if size % 2 != 0:
            raise ValueError(
                f"TextDataModule path={self.path!r} has an odd size ({size} bytes); a .bin file must hold "
                "uint16 token ids (2 bytes each, as written by nanoGPT's prepare.py)."
            )
        if size == 0:
            raise ValueError(f"TextDataModule path={self.path!r} is an empty .bin file.")
        return np.memmap(path, dtype=np.uint16, mode="r")

    def _load_hf(self) -> np.ndarray:
        try:
            import datasets
        except ImportError as e:
            raise ImportError("TextDataModule source='hf' needs the `datasets` package: `pip install datasets`.") from e
        local = self.path is not None and Path(self.path).is_dir()
        max_tokens = self.max_tokens
        if local:
            ds = datasets.load_from_disk(self.path)
            if isinstance(ds, datasets.DatasetDict):
                if self.hf_split not in ds:
                    raise ValueError(f"TextDataModule hf_split={self.hf_split!r} not in the saved dataset at "
                                     f"{self.path!r}; available splits: {list(ds)}.")
                ds = ds[self.hf_split]
            name = self.path
        else:
            name = self.hf_name if self.hf_name is not None else self.path
            if self.streaming and max_tokens is None:
                max_tokens = HF_STREAMING_MAX_TOKENS
                rank_zero_info(f"TextDataModule: streaming {name!r}, reading the first {max_tokens:,} tokens "
                               "(set max_tokens to change).")
            try:
                ds = datasets.load_dataset(name, self.hf_config, split=self.hf_split, streaming=self.streaming)
            except Exception as e:
                raise ValueError(
                    f"TextDataModule could not load the Hugging Face dataset hf_name={name!r} "
                    f"(hf_config={self.hf_config!r}, hf_split={self.hf_split!r}): {type(e).__name__}: {e}. "
                    "Check the name/config/split on huggingface.co/datasets, your network access, "
                    "or pass path= a directory written by `Dataset.save_to_disk`."
                ) from e
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise ValueError(f"TextDataModule text_field={self.text_field!r} is not a column of dataset {name!r}; "
                             f"columns: {columns}.")

        def texts() -> Iterator[str]:
            for row in ds:
                if self.text_field not in row:
                    raise ValueError(f"TextDataModule text_field={self.text_field!r} missing in dataset {name!r} "
                                     f"rows; fields: {list(row)}.")
                yield row[self.text_field]

        return self._tokens_from_texts(texts(), max_tokens)

    def load_tokens(self) -> np.ndarray:
        """Return the token stream of the configured source (cached).

        Text sources are tokenized and capped at ``max_tokens``; a ``.bin`` source is
        returned as a memmap of the whole file (``max_tokens`` is applied in :meth:`setup`).
        """
        if self.tokens is None:
            loader = dict(builtin=self._load_builtin, text=self._load_text, bin=self._load_bin, hf=self._load_hf)
            self.tokens = loader[self.source]()
        return self.tokens

    # ------------------------------------------------------------ Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        tokens = self.load_tokens()
        n = len(tokens) if self.max_tokens is None else min(len(tokens), self.max_tokens)
        n_val = int(n * self.val_fraction)
        need = self.block_size + 1
        for name, size in (("train", n - n_val), ("validation", n_val)):
            if size < need:
                raise ValueError(
                    f"TextDataModule: the {name} split has {size} tokens but needs at least block_size + 1 = "
                    f"{need} (corpus: {n} tokens from source={self.source!r}, val_fraction={self.val_fraction}). "
                    "Use more data (or a larger max_tokens), a smaller block_size, or adjust val_fraction."
                )
        # the last val_fraction of the stream is the fixed held-out validation set
        self.train_dataset = TokenWindowDataset(tokens, self.block_size, start=0, end=n - n_val)
        self.val_dataset = TokenWindowDataset(tokens, self.block_size, start=n - n_val, end=n)
        rank_zero_info(
            f"TextDataModule: source={self.source!r}, {n:,} tokens (vocab {self.vocab_size}): "
            f"{len(self.train_dataset):,} train / {len(self.val_dataset):,} val windows of {self.block_size} tokens."
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **common)
        return ResumableDataLoader(dataset, sampler=EpochShuffleSampler(dataset, self.seed), **common)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)
