"""Command line: train the example GPT with local SGD, DiLoCo or DDP, configured by YAML files and flags.

``lightning-localsgd`` (or ``python -m lightning_localsgd``) is a :class:`~lightning.pytorch.cli.LightningCLI` for
:class:`~lightning_localsgd.examples.GPT` and :class:`~lightning_localsgd.examples.TextDataModule`::

    lightning-localsgd fit --config examples/configs/local_sgd.yaml
    lightning-localsgd fit --config examples/configs/local_sgd.yaml --trainer.strategy.sync_every 32
    lightning-localsgd fit --trainer.strategy diloco --data.path my.txt
    lightning-localsgd validate --config examples/configs/local_sgd.yaml --ckpt_path path/to/last.ckpt
    lightning-localsgd fit --trainer.strategy.help LocalSGDStrategy
    lightning-localsgd plan --params 1.3e9 --step-time 0.4 --bandwidth 1Gbit --latency 20ms --groups 8
    lightning-localsgd lighthouse --port 29510 --min-groups 1   # federated worker groups (docs/multi_cluster.md)
    lightning-localsgd convert path/to/last.ckpt model.ckpt   # an FSDP checkpoint folder -> one plain file

``data.block_size`` and ``data.vocab_size`` are linked to the model. Every setting not given on the command line or in
a ``--config`` comes from :data:`DEFAULT_CONFIG` (``examples/configs/local_sgd.yaml``: the 2-process CPU local-SGD
demo). See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn, Optional

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_localsgd  # noqa: F401  (registers "local_sgd" / "diloco" with Lightning's strategy registry)

from . import examples
from ._compat import import_class_path
from .checkpoint import META_FILE, convert_checkpoint, is_checkpoint_folder
from .examples.data import TextDataModule
from .examples.gpt import GPT
from .federation import main_lighthouse
from .planner import main as plan_main
from .strategies import LocalSGDStrategy

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "TRACEBACK_ENV", "LocalSGDCLI", "convert_main", "main", "short_parse_error"]

#: The example configs (``examples/configs`` in the repository, installed with ``lightning_localsgd.examples``).
CONFIG_DIR = Path(examples.__file__).resolve().parent / "configs"
#: Defaults of every subcommand: the local-SGD demo (GPT on the builtin corpus, 2 CPU processes, sync every 16 steps).
DEFAULT_CONFIG = CONFIG_DIR / "local_sgd.yaml"


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs."""


def _strategy_epilog(width: int = 79) -> str:
    """The documented arguments of :class:`LocalSGDStrategy`, for the end of ``fit --help``."""
    lines = [
        "local SGD strategy arguments (of the default strategy, LocalSGDStrategy): set them",
        "with --trainer.strategy.NAME VALUE, or in a config under trainer.strategy.init_args.",
    ]
    try:
        import docstring_parser

        params = [p for p in docstring_parser.parse(LocalSGDStrategy.__doc__ or "").params
                  if not p.arg_name.startswith("*")]
    except Exception:  # docstring_parser missing or a docstring it cannot read: point to the full help only
        params = []
    for p in params:
        text = " ".join((p.description or "").replace("``", "").split())
        lines.append(textwrap.fill(f"--trainer.strategy.{p.arg_name}: {text}", width, initial_indent="  ",
                                   subsequent_indent="      "))
    lines.append("all of them, with Lightning's DDP arguments: --trainer.strategy.help LocalSGDStrategy")
    lines.append("presets by name: --trainer.strategy local_sgd (averaging), diloco, or Lightning's ddp, ...")
    return "\n".join(lines)


#: Set to 1 to see the full traceback of an error in the configuration (by default: one line naming the argument).
TRACEBACK_ENV = "LIGHTNING_LOCALSGD_TRACEBACK"
#: Errors that a wrong argument raises while the classes are built or ``fit`` prepares (before the first step).
_CONFIG_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _exit_with(err: BaseException) -> NoReturn:
    """One line naming the problem and the fix instead of a traceback (the checks' messages say both)."""
    if os.environ.get(TRACEBACK_ENV) == "1":
        raise err
    text = " ".join(str(err).split()) or type(err).__name__
    sys.stderr.write(f"lightning-localsgd: error: {text}\n(the traceback: set {TRACEBACK_ENV}=1)\n")
    raise SystemExit(2) from err


def short_parse_error(message: str) -> Optional[str]:
    """The one line that matters in a jsonargparse error about a class argument, e.g. ``--trainer.strategy.X``.

    jsonargparse reports a bad value of a class given as ``Union[str, Class]`` with every alternative of the union and
    the whole value; the reason is in the innermost ``Parser key`` / ``Option ... is not accepted`` line. ``None`` when
    the message is not of that shape.
    """
    outer = re.match(r'\s*Parser key "([^"]+)":', message)
    cls_match = re.search(r"Problem with given class_path '([^']+)':", message)
    if outer is None or cls_match is None:
        return None
    class_path = cls_match.group(1)
    inner = message[cls_match.end():]
    cls_name = class_path.rsplit(".", 1)[-1]
    help_hint = f"see --{outer.group(1)}.help {cls_name}"
    unknown = re.search(r"[Oo]ption '([^']+)' is not accepted", inner) or re.search(r"Key '([^']+)' is not expected", inner)
    if unknown:
        name = unknown.group(1)
        known = _init_parameters(class_path)
        close = difflib.get_close_matches(name, known, n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        return f"{outer.group(1)}.{name}: {cls_name} has no argument {name!r}{guess} ({help_hint})"
    key = re.search(r'Parser key "([^"]+)":\s*\n\s*(.+)', inner)
    if key:
        reason = key.group(2).strip()
        expected = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", reason)
        if expected:
            reason = f"expected {_TYPE_WORDS.get(expected.group(1), expected.group(1))}, got {expected.group(2)}"
        return f"{outer.group(1)}.{key.group(1)}: {reason} ({help_hint})"
    return None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _init_parameters(class_path: str) -> list[str]:
    try:
        parameters = inspect.signature(import_class_path(class_path)).parameters
        return [n for n in parameters if n not in ("self", "args", "kwargs")]
    except Exception:  # an unimportable class: no suggestion
        return []


class _ArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors are one line (no usage dump of every option, no union listing)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG") or os.environ.get(TRACEBACK_ENV) == "1":
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        line = short_parse_error(message) or " ".join(message.split())
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {line}\ntip: every option: {prog} --help\n")
        raise SystemExit(2)


class LocalSGDCLI(LightningCLI):
    """``LightningCLI`` for the GPT example: links ``data.block_size`` / ``data.vocab_size`` to the model.

    Errors in the configuration (a bad value, a typo in an argument name, a missing data file, a ``group_size`` that
    does not fit the devices, a checkpoint that cannot be resumed) print one line naming the argument and the fix and
    exit with code 2, before training starts; set ``LIGHTNING_LOCALSGD_TRACEBACK=1`` for the traceback.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.__class__ = _ArgumentParser  # (adds only `error`: works whatever Lightning passes to the parser)
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test / predict are left out: the GPT example has no test_step / predict_step
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the model's hyper-parameters from a checkpoint *file*; a local-SGD checkpoint is a folder
        # whose meta.pt holds them (lightning_localsgd.checkpoint): parse them from there.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not is_checkpoint_folder(ckpt_path):
            super()._parse_ckpt_path()
            return
        self.config[subcommand]["ckpt_path"] = os.path.join(str(ckpt_path), META_FILE)
        try:
            super()._parse_ckpt_path()
        finally:
            self.config[subcommand]["ckpt_path"] = ckpt_path

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _CONFIG_ERRORS as err:  # e.g. the Trainer's check of group_size against the devices
            # A class given as `Union[str, SomeClass]` (trainer.strategy, trainer.accelerator, ...) whose __init__
            # raised: jsonargparse buries the message among the union's alternatives and the whole config. Show it.
            reasons = [line[4:] for line in str(err).splitlines()
                       if line.startswith("  - ") and not line.startswith("  - Expected a ")]
            if "Does not validate against any of the Union subtypes" in str(err) and reasons:
                sys.stderr.write("".join(f"lightning-localsgd: error: {reason}\n" for reason in reasons))
                raise SystemExit(2) from err
            _exit_with(err)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except _CONFIG_ERRORS as err:
            if self.trainer.state.stage is not None:  # training (or validation) had started: keep the traceback
                raise
            _exit_with(err)


def convert_main(argv: Optional[list[str]] = None) -> None:
    """``lightning-localsgd convert``: a checkpoint folder of any local-SGD strategy to a plain Lightning checkpoint.

    Runs :func:`lightning_localsgd.checkpoint.convert_checkpoint`; the file loads with
    ``LightningModule.load_from_checkpoint``.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-localsgd convert",
        description="Write a local-SGD checkpoint folder (DDP, FSDP or DeepSpeed inside the groups; every rank wrote "
                    "its own files) as one plain Lightning checkpoint file: one worker group's full model under "
                    "`state_dict`, which LightningModule.load_from_checkpoint reads in a single process.",
    )
    parser.add_argument("checkpoint_dir", help="the folder ModelCheckpoint / Trainer.save_checkpoint wrote")
    parser.add_argument("output_file", help="the checkpoint file to write")
    parser.add_argument("--group", type=int, default=0,
                        help="the worker group whose model to write (default 0; after the train-end sync every "
                             "group holds the same model)")
    args = parser.parse_args(argv)
    try:
        path = convert_checkpoint(args.checkpoint_dir, args.output_file, group=args.group)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {path}")


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-localsgd`` and ``python -m lightning_localsgd``.

    Returns nothing (a console script exits with the returned value); build :class:`LocalSGDCLI` yourself (as done
    here) to keep the trainer and model.

    ``lightning-localsgd plan ...`` is not a LightningCLI subcommand: it runs the planner's own command line
    (:func:`lightning_localsgd.planner.main`), which needs no model, data or trainer. Nor is
    ``lightning-localsgd convert CHECKPOINT_DIR OUTPUT_FILE`` (:func:`convert_main`).

    Args:
        args: command line arguments (default: ``sys.argv[1:]``), e.g. ``["fit", "--config", "local_sgd.yaml"]``.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "plan":
        plan_main(list(argv[1:]))
        return
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "lighthouse":  # federated groups meet there
        main_lighthouse(list(argv[1:]))
        return
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "convert":
        convert_main(list(argv[1:]))
        return
    defaults: dict[str, Any] = {"default_config_files": [str(DEFAULT_CONFIG)]}
    fit_description = (
        "Train the GPT example. Defaults: " + str(DEFAULT_CONFIG) + "\n"
        "(2 CPU processes, local SGD syncing every 16 steps, builtin corpus). Override with --config FILE and flags."
    )
    LocalSGDCLI(
        GPT,
        TextDataModule,
        seed_everything_default=1234,
        auto_configure_optimizers=False,  # GPT.configure_optimizers sets AdamW with warm-up + cosine decay
        parser_kwargs={
            "prog": "lightning-localsgd",
            "description": "Train / validate the example GPT with local SGD, DiLoCo or DDP. See docs/cli.md.\n"
                           "Choose the sync interval H for a link: lightning-localsgd plan --help.",
            "formatter_class": _HelpFormatter,  # subcommand parsers take the main parser's formatter
            "fit": {**defaults, "description": fit_description, "epilog": _strategy_epilog()},
            "validate": {**defaults, "description": "Evaluate on the validation set, e.g. a checkpoint with "
                                                    "--ckpt_path."},
        },
        args=args,
    )


if __name__ == "__main__":
    main()
