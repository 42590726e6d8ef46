"""Example model and data for local SGD language-model training.

Installed as ``lightning_localsgd.examples``:

* :class:`~lightning_localsgd.examples.gpt.GPT` - a small nanoGPT-style decoder-only
  transformer LightningModule with a named size ladder (``GPT_SIZES``).
* :class:`~lightning_localsgd.examples.data.TextDataModule` - a token-stream
  LightningDataModule (builtin offline corpus, text files, nanoGPT ``.bin`` files
  or Hugging Face datasets) with a fixed held-out validation split.
"""

from .data import TextDataModule
from .gpt import GPT, GPT_SIZES

__all__ = ["GPT", "GPT_SIZES", "TextDataModule"]
