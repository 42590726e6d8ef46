"""The command line: help, fit from each runnable example config on 2 CPU processes, validate, argument errors.

Every run is a subprocess in ``tmp_path`` (``python -m lightning_localsgd ...``, forked by the tests' fork server,
``tests/_forkserver.py``), so Lightning's popen launcher re-runs the same command for rank 1 (a fresh interpreter), as
it does for users.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _forkserver
import lightning_localsgd
from lightning_localsgd.cli import CONFIG_DIR, DEFAULT_CONFIG, main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
STRATEGY_ARGS = ("sync_every", "outer_optimizer", "group_size", "warmup_steps", "outer_state_device")
STEPS, BATCH, BLOCK = 4, 4, 32
TINY = [
    "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
    "--data.max_tokens", "50000", "--data.block_size", str(BLOCK), "--data.batch_size", str(BATCH),
    "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false",
]
#: per config: extra flags, expected syncs, logger name
RUNS = {
    "ddp": ([], None),
    "local_sgd": (["--trainer.strategy.sync_every", "2"], 2),
    "diloco": ([], 1),  # sync_every 32 > 4 steps: only the sync at the end of training
    # H=4, 4 fragments, τ=2: fragments 0, 1 applied at steps 3, 4; 2, 3 in flight at the end (fragment 3 completes
    # a sync), then the full train-end sync
    "streaming_diloco": (["--trainer.strategy.sync_every", "4"], 2),
}


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(var, None)
    return env


def _cli(args: list[str], cwd: Path, command: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    command = command or [sys.executable, "-m", "lightning_localsgd"]
    return _forkserver.run(command + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _words(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def _first_words(arg: str, n: int = 6) -> str:
    """The start of the argument's description in LocalSGDStrategy's docstring."""
    import docstring_parser

    params = {p.arg_name: p.description for p in docstring_parser.parse(lightning_localsgd.LocalSGDStrategy.__doc__).params}
    return " ".join(_words(params[arg]).split()[:n])


# ---------------------------------------------------------------------------------------------------------- help
def _help(capsys, args: list[str]) -> str:
    """Run the CLI in this process for an action that prints and exits (--help, --print_config)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("args", [["fit", "--help"], ["fit", "--trainer.strategy.help", "LocalSGDStrategy"],
                                  ["fit", "--trainer.strategy.help", "lightning_localsgd.LocalSGDStrategy"]],
                         ids=["fit-help", "strategy-help-short", "strategy-help-class-path"])
def test_help_lists_strategy_arguments(capsys, args):
    out = _words(_help(capsys, args))
    for arg in STRATEGY_ARGS:
        assert f"--trainer.strategy.{arg}" in out, arg
        assert _first_words(arg) in out, (arg, _first_words(arg))


def test_multi_cluster_config_parses(capsys):
    """The illustrative multi-node config is not runnable here, but it must parse against the current classes."""
    out = _help(capsys, ["fit", "--config", str(CONFIGS / "multi_cluster.yaml"), "--print_config"])
    for expected in ("num_nodes: 4", "devices: 8", "group_size: 8", "outer_optimizer: diloco", "size: gpt2"):
        assert expected in out, expected


def test_default_config_is_the_local_sgd_example():
    assert DEFAULT_CONFIG == CONFIG_DIR / "local_sgd.yaml" and DEFAULT_CONFIG.is_file()
    assert CONFIG_DIR.resolve() == CONFIGS.resolve()


# ---------------------------------------------------------------------------------------------------------- fit
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """fit with a tiny model from an example config on 2 CPU processes; runs once per config and is cached."""
    cache: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in cache:
            cwd = tmp_path_factory.mktemp(name)
            extra, _ = RUNS[name]
            proc = _cli(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *TINY, *extra], cwd)
            cache[name] = (proc, cwd)
        return cache[name]

    return run


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.slow
def test_fit_from_config(fit_run, name):
    proc, cwd = fit_run(name)
    assert proc.returncode == 0, _output(proc)
    assert "Training summary" in proc.stdout, _output(proc)
    assert "sample:" in proc.stdout
    log_dir = cwd / "logs" / "tensorboard" / name / "version_0"
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["optimizer_steps"] == STEPS
    assert summary["tokens"] == STEPS * BATCH * BLOCK * 2
    assert math.isfinite(summary["val_loss"]) and summary["val_loss_step"] == STEPS
    assert summary["non_embedding_params"] == 12 * 32 * 32 + 2 * 32 + 32
    assert summary["ddp_bytes_per_rank"] > 0
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "no checkpoint"
    assert (cwd / "logs" / "csv" / name / "version_0" / "metrics.csv").is_file()
    syncs = RUNS[name][1]
    if syncs is None:  # plain DDP: no local-SGD numbers
        assert summary["num_syncs"] is None and summary["bytes_sent_per_rank"] is None
        assert summary["strategy"].startswith("DDPStrategy")
        assert re.search(r"local-SGD syncs\s*│\s*n/a", proc.stdout), _output(proc)
    else:
        assert summary["strategy"].startswith("LocalSGDStrategy")
        assert summary["num_syncs"] == syncs
        assert 0 < summary["bytes_sent_per_rank"] < summary["ddp_bytes_per_rank"]
        assert summary["bytes_ratio"] == pytest.approx(summary["ddp_bytes_per_rank"] / summary["bytes_sent_per_rank"])


@pytest.mark.slow
def test_validate_from_checkpoint(fit_run):
    proc, cwd = fit_run("local_sgd")
    assert proc.returncode == 0, _output(proc)
    ckpt = sorted((cwd / "logs" / "tensorboard" / "local_sgd" / "version_0" / "checkpoints").glob("*.ckpt"))[-1]
    # the architecture (1 layer, 32 wide) comes from the checkpoint, not from the config (3 layers, 96 wide)
    proc = _cli(["validate", "--config", str(CONFIGS / "local_sgd.yaml"), "--ckpt_path", str(ckpt),
                 "--data.max_tokens", "50000", "--data.block_size", str(BLOCK), "--data.batch_size", str(BATCH),
                 "--trainer.limit_val_batches", "2", "--trainer.logger", "false"], cwd)
    assert proc.returncode == 0, _output(proc)
    match = re.search(r"val_loss\s*│\s*([0-9.]+)", proc.stdout)
    assert match, _output(proc)
    assert 0 < float(match.group(1)) < 10


# ---------------------------------------------------------------------------------------------------------- errors
@pytest.mark.slow
def test_bad_strategy_argument_names_it(tmp_path):
    proc = _cli(["fit", "--config", str(CONFIGS / "local_sgd.yaml"), "--trainer.strategy.sync_every", "0"], tmp_path,
                timeout=120)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "sync_every must be an integer >= 1, got 0" in err, _output(proc)
    assert not (tmp_path / "logs").exists()  # failed before training


@pytest.mark.skipif(shutil.which("lightning-localsgd") is None, reason="console script not installed")
@pytest.mark.slow
def test_console_script_relaunches_ranks(tmp_path):
    """Lightning's popen launcher re-runs `lightning-localsgd ...` (a script path) for rank 1."""
    proc = _cli(["fit", *TINY, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                 "--trainer.logger", "false", "--trainer.strategy.sync_every", "2"],
                tmp_path, command=[shutil.which("lightning-localsgd")])
    assert proc.returncode == 0, _output(proc)
    assert "[rank: 1]" in proc.stderr + proc.stdout, _output(proc)


def test_banner_names_a_class_path_outer_optimizer_with_its_arguments():
    # LightningCLI (jsonargparse) hands the strategy `partial(call_without_instantiate_context, ..., SGD, lr=0.5, ...)`
    from lightning_localsgd.cli import LocalSGDCLI
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    cli = LocalSGDCLI(GPT, TextDataModule, run=False, auto_configure_optimizers=False,
                      parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
                      args=["--trainer.strategy.outer_optimizer", "torch.optim.SGD",
                            "--trainer.strategy.outer_optimizer.lr", "0.5",
                            "--trainer.strategy.outer_optimizer.momentum", "0.9", "--trainer.logger", "false"])
    banner = cli.trainer.strategy.local_sgd.config.describe(2)
    assert "outer optimizer SGD(lr=0.5, momentum=0.9), warm-up" in banner, banner


def test_convert_command_writes_a_plain_checkpoint_or_names_the_problem(tmp_path, capsys):
    # the conversion itself is checked on real folders in tests/strategies (test_resume, test_fsdp, test_deepspeed)
    # and tests/clients/test_hugging_face.py
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "model.ckpt")])
    assert "is not a local-SGD checkpoint folder (no meta.pt)" in capsys.readouterr().err
    (tmp_path / "plain.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "plain.ckpt"), str(tmp_path / "model.ckpt")])
    assert "cannot be read: it is empty, truncated" in capsys.readouterr().err
