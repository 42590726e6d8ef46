"""Command line: train the example GPT with local SGD, DiLoCo or DDP from a YAML config.

``lightning-localsgd`` (or ``python -m lightning_localsgd``) is a :class:`~lightning.pytorch.cli.LightningCLI` for
:class:`~lightning_localsgd.examples.GPT` and :class:`~lightning_localsgd.examples.TextDataModule`::

    lightning-localsgd fit --config examples/configs/local_sgd.yaml
    lightning-localsgd fit --config examples/configs/local_sgd.yaml --trainer.strategy.sync_every 32
    lightning-localsgd fit --trainer.strategy diloco --data.path my.txt
    lightning-localsgd validate --config examples/configs/local_sgd.yaml --ckpt_path logs/.../last.ckpt
    lightning-localsgd fit --trainer.strategy.help LocalSGDStrategy

``data.vocab_size`` and ``data.block_size`` are linked to the model. Without a config the defaults are a local-SGD
demo on 2 CPU processes (see :data:`TRAINER_DEFAULTS`). See ``docs/cli.md``.
"""

from __future__ import annotations

from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_localsgd  # noqa: F401  (registers "local_sgd" / "diloco" with Lightning's strategy registry)

from .examples.data import TextDataModule
from .examples.gpt import GPT

__all__ = ["LocalSGDCLI", "TRAINER_DEFAULTS", "main"]

#: Trainer defaults when neither a config nor the command line sets them: the 2-process CPU local-SGD demo.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 2,
    "strategy": {
        "class_path": "lightning_localsgd.LocalSGDStrategy",
        "init_args": {"sync_every": 16, "outer_optimizer": "average"},
    },
    "max_steps": 480,
    "val_check_interval": 96,
    "check_val_every_n_epoch": None,
    "limit_val_batches": 16,
    "log_every_n_steps": 8,
    "callbacks": [  # configurable: a config's trainer.callbacks replaces this list, `--trainer.callbacks+=` appends
        {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
        {"class_path": "lightning_localsgd.examples.summary.TrainingSummary"},
    ],
    "logger": [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "logs/tensorboard", "name": "local_sgd"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": "logs/csv", "name": "local_sgd"}},
    ],
}


class LocalSGDCLI(LightningCLI):
    """``LightningCLI`` that links the data module's ``vocab_size`` and ``block_size`` to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI appends trainer_defaults["callbacks"] as fixed instances; set them as parser defaults instead
        parser.set_defaults({"trainer.callbacks": TRAINER_DEFAULTS["callbacks"]})
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # jsonargparse expands DDPStrategy's **kwargs into DistributedDataParallel's arguments and passes all of
        # them, process_group=None included, which LocalSGDStrategy rejects: drop the None.
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        strategy = config.get("trainer.strategy")
        if isinstance(strategy, Namespace) and strategy.get("init_args.process_group", "unset") is None:
            del strategy["init_args.process_group"]


def main(args: ArgsType = None) -> Optional[LocalSGDCLI]:
    """Entry point of ``lightning-localsgd`` and ``python -m lightning_localsgd``."""
    return LocalSGDCLI(
        GPT,
        TextDataModule,
        trainer_defaults={k: v for k, v in TRAINER_DEFAULTS.items() if k != "callbacks"},
        seed_everything_default=1234,
        auto_configure_optimizers=False,  # GPT.configure_optimizers sets AdamW + warm-up/cosine
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
    )


if __name__ == "__main__":
    main()
