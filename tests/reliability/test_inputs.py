"""Bad input everywhere fails before training with a message naming the argument: every public argument of
LocalSGDStrategy, combinations only the Trainer can judge, the TextDataModule and the command line.

One table per kind of bad input: STRATEGY_CASES (a bad constructor value or combination -> the parameter named in
the error), TRAINER_CASES (a strategy the Trainer's world size refutes), DATA_CASES and CLI_CASES. Bad values of the
FSDP and DeepSpeed strategies' own arguments are in strategies/test_fsdp.py and strategies/test_deepspeed.py."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

import _forkserver
import lightning_localsgd  # noqa: F401
from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.cli import DEFAULT_CONFIG, main
from lightning_localsgd.examples.data import TextDataModule

# ------------------------------------------------------------------------------------------------ the strategy
STRATEGY_CASES = [
    # local-SGD arguments
    ({"sync_every": 0}, "sync_every must be an integer >= 1"),
    ({"sync_every": -3}, "sync_every must be an integer >= 1"),
    ({"sync_every": 2.5}, "sync_every must be an integer >= 1"),
    ({"sync_every": True}, "sync_every must be an integer >= 1"),
    ({"sync_every": "64"}, "sync_every must be an integer >= 1, got '64'"),
    ({"outer_optimizer": "adam"}, r"outer_optimizer='adam' is not a known name.*'average', 'diloco'"),
    ({"outer_optimizer": 0.7}, "outer_optimizer must be one of"),
    ({"outer_optimizer": 3}, "outer_optimizer must be one of"),
    ({"outer_optimizer": functools.partial(torch.optim.SGD, lr=-1.0)},
     "outer_optimizer: calling it with a list of parameters failed"),
    ({"outer_optimizer": lambda: None}, "outer_optimizer: calling it with a list of parameters failed"),
    ({"outer_optimizer": lambda params: params}, "must return a torch.optim.Optimizer, but it returned list"),
    ({"outer_optimizer": lambda params: "not an optimizer"}, "must return a torch.optim.Optimizer.*returned str"),
    ({"group_size": 0}, "group_size must be an integer >= 1"),
    ({"group_size": 1.5}, "group_size must be an integer >= 1, got 1.5"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"warmup_steps": None}, "warmup_steps must be an integer >= 0, got None"),
    ({"outer_state_device": "gpu"}, "outer_state_device='gpu' is not a device"),
    ({"outer_state_device": "nonsense"}, "outer_state_device='nonsense' is not a device"),
    ({"outer_state_device": "meta"}, "outer_state_device='meta' holds no data"),
    ({"outer_state_device": "cuda:3"}, "outer_state_device='cuda:3'"),
    ({"outer_state_device": "cuda:7"}, "outer_state_device='cuda:7'"),
    ({"on_nonfinite": "warn"}, "on_nonfinite must be 'raise' or 'skip', got 'warn'"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be 'raise' or 'skip'"),
    ({"sync_on_train_end": "yes"}, "sync_on_train_end must be True or False, got 'yes'"),
    ({"async_save": "yes"}, "async_save must be True or False, got 'yes'"),
    ({"sync_timeout": 0}, "sync_timeout must be a positive number of seconds"),
    ({"sync_timeout": -5}, "sync_timeout must be a positive number of seconds"),
    ({"sync_timeout": float("nan")}, "sync_timeout must be a positive number of seconds"),
    ({"sync_timeout": float("inf")}, "sync_timeout must be a positive number of seconds"),
    ({"sync_timeout": "600"}, "sync_timeout must be a positive number of seconds.*got '600'"),
    ({"sync_schedule": "hourly"}, "sync_schedule='hourly' is not a known schedule"),
    ({"max_consecutive_skips": 0}, "max_consecutive_skips must be an integer >= 1"),
    ({"screen_factor": 0.5}, "screen_factor must be a number above 1"),
    ({"screen_factor": 10.0, "screen_history": 1}, "screen_history must be an integer >= 3"),
    ({"screen_ban_syncs": 2}, "screen_ban_syncs=2 only acts with the robust screen: set screen_factor"),
    ({"screen_factor": 10.0, "screen_min_cosine": -1.5}, "screen_min_cosine must be a number strictly between"),
    ({"sync_timeout": True}, "sync_timeout must be a positive number of seconds"),
    # two-stage sync
    ({"cluster_size": 0, "cluster_sync_every": 64}, "cluster_size must be an integer >= 1"),
    ({"cluster_size": 0, "cluster_sync_every": 8}, "cluster_size must be an integer >= 1"),
    ({"cluster_size": 2}, "cluster_size is set but cluster_sync_every is not"),
    ({"cluster_sync_every": 128}, "cluster_sync_every is set but cluster_size is not"),
    ({"cluster_sync_every": 8}, "cluster_size is not"),
    ({"cluster_sync_every": 100, "cluster_size": 2, "sync_every": 64}, "must be a multiple of sync_every=64"),
    ({"cluster_size": 2, "cluster_sync_every": 6, "sync_every": 4}, "must be a multiple of sync_every=4"),
    ({"cluster_outer_optimizer": "adam", "cluster_size": 2, "cluster_sync_every": 128},
     "cluster_outer_optimizer: outer_optimizer='adam' is not a known name"),
    ({"sync_every": 4, "cluster_size": 2, "cluster_sync_every": 8, "cluster_outer_optimizer": "sgd"},
     "cluster_outer_optimizer: outer_optimizer='sgd' is not a known name"),
    # the built-ins, then any codec a test registered (the tests' topk_test)
    ({"compression": "zip"}, r"compression must be one of \('bf16', 'int8', 'int4', 'topk'[^)]*\) or None, got 'zip'"),
    # streaming sync
    ({"fragments": 0}, "fragments must be an integer >= 1, got 0"),
    ({"fragments": "2"}, "fragments must be an integer >= 1, got '2'"),
    ({"fragments": 2.0}, "fragments must be an integer >= 1, got 2.0"),
    ({"fragments": True}, "fragments must be an integer >= 1, got True"),
    ({"fragments": 3, "sync_every": 64}, "sync_every=64 must be a multiple of fragments=3"),
    ({"overlap_steps": -1}, "overlap_steps must be an integer >= 0, got -1"),
    ({"overlap_steps": 1.5}, "overlap_steps must be an integer >= 0, got 1.5"),
    ({"overlap_steps": 64, "sync_every": 64}, "overlap_steps=64 must be smaller than sync_every=64"),
    ({"overlap_steps": 9, "sync_every": 8, "fragments": 2}, "overlap_steps=9 must be smaller than sync_every=8"),
    ({"overlap_mix": 1.0, "overlap_steps": 1}, r"overlap_mix must be a number in \[0, 1\), got 1.0"),
    ({"overlap_mix": -0.1, "overlap_steps": 1}, r"overlap_mix must be a number in \[0, 1\), got -0.1"),
    ({"overlap_mix": float("nan"), "overlap_steps": 1}, r"overlap_mix must be a number in \[0, 1\), got nan"),
    ({"overlap_mix": "0.5", "overlap_steps": 1}, r"overlap_mix must be a number in \[0, 1\), got '0.5'"),
    ({"overlap_mix": True, "overlap_steps": 1}, r"overlap_mix must be a number in \[0, 1\), got True"),
    ({"fragments": 2, "cluster_size": 2, "cluster_sync_every": 128},
     r"streaming sync \(fragments > 1, overlap_steps > 0 or overlap_mix > 0\) does not combine with two-stage sync"),
    ({"overlap_mix": 0.5, "cluster_size": 2, "cluster_sync_every": 128}, "does not combine with two-stage sync"),
    ({"overlap_steps": 1, "cluster_size": 2, "cluster_sync_every": 128}, "does not combine with two-stage sync"),
    # federated two-stage is cluster_sync_every alone: streaming was silently dropped there (the two-stage schedule won)
    ({"fragments": 2, "lighthouse": "127.0.0.1:29510", "cluster_sync_every": 128, "group_size": 1},
     r"does not combine with two-stage sync \(cluster_size, or cluster_sync_every with lighthouse=\)"),
    # time-based sync
    ({"sync_every_seconds": 0}, "sync_every_seconds must be a positive number of seconds, got 0"),
    ({"sync_every_seconds": -1}, "sync_every_seconds must be a positive number of seconds, got -1"),
    ({"sync_every_seconds": "5"}, "sync_every_seconds must be a positive number of seconds, got '5'"),
    ({"sync_every_seconds": float("nan")}, "sync_every_seconds must be a positive number of seconds, got nan"),
    ({"sync_every_seconds": float("inf")}, "sync_every_seconds must be a positive number of seconds, got inf"),
    ({"sync_every_seconds": True}, "sync_every_seconds must be a positive number of seconds, got True"),
    ({"sync_every_seconds": 5, "cluster_size": 2, "cluster_sync_every": 128}, "does not combine with cluster_size=2"),
    ({"sync_every_seconds": 5, "sync_on_train_end": False}, "sync_every_seconds needs sync_on_train_end=True"),
    # federated worker groups
    ({"lighthouse": "lighthouse-host"}, "lighthouse must be the lighthouse's 'host:port'.*got 'lighthouse-host'"),
    ({"lighthouse": "host:99999"}, "lighthouse must be the lighthouse's 'host:port'"),
    ({"lighthouse": 29510}, "lighthouse must be the lighthouse's 'host:port'"),
    ({"group_id": "cluster-a"}, "group_id='cluster-a' only applies to federated worker groups: set lighthouse"),
    ({"min_groups": 2}, "min_groups=2 only applies to federated worker groups: set lighthouse"),
    ({"min_groups": 0, "lighthouse": "h:29510"}, "min_groups must be an integer >= 1, got 0"),
    ({"group_id": "a:b", "lighthouse": "h:29510"}, "group_id must be a non-empty name without ':'"),
    ({"group_id": "", "lighthouse": "h:29510"}, "group_id must be a non-empty name"),
    ({"run_secret_file": "run.secret"}, "run_secret_file='run.secret' only applies to federated worker groups"),
    ({"run_secret_file": "/no/such/run.secret", "lighthouse": "h:29510"},
     "run_secret_file='/no/such/run.secret' cannot be read"),
    ({"lighthouse": "h:29510", "cluster_size": 2, "cluster_sync_every": 128},
     r"cluster_size=2 is not supported with lighthouse= \(federated worker groups\).*one job per cluster"),
    ({"lighthouse": "h:29510", "warmup_steps": 10, "cluster_sync_every": 128},
     r"warmup_steps=10 is not supported with lighthouse=.*several worker groups per job"),
    ({"lighthouse": "h:29510", "sync_every": 4, "fragments": 2, "overlap_steps": 2},
     r"overlap_steps=2 with lighthouse= .* must be smaller than sync_every/fragments=2: .*one quorum at a time"),
    ({"lighthouse": "h:29510", "sync_every": 4, "overlap_steps": 4},
     "overlap_steps=4 must be smaller than sync_every=4"),
    ({"data_jobs": 2, "data_job_index": 0}, r"data_jobs=2 / data_job_index=0 partition one dataset over federated"),
    ({"data_jobs": 0, "lighthouse": "h:29510"}, "data_jobs must be an integer >= 1, got 0"),
    ({"data_job_index": 2, "data_jobs": 2, "lighthouse": "h:29510"},
     r"data_job_index must be this job's share, an integer in 0 .. data_jobs - 1 = 1"),
    ({"data_rebalance_after": 0, "data_jobs": 2, "data_job_index": 0, "lighthouse": "h:29510"},
     "data_rebalance_after must be an integer >= 1, got 0"),
    ({"async_sync": True, "sync_every_seconds": 1.0},
     r"async_sync=True runs the sync across federated jobs \(lighthouse=\) beside training"),
    ({"async_sync": True, "lighthouse": "h:29510"}, "async_sync=True needs time-based syncs"),
    # DDPStrategy's arguments that would otherwise fail only inside the launched processes, or be ignored
    ({"timeout": 30}, r"timeout must be a datetime.timedelta.*got 30.*use sync_timeout"),
    ({"timeout": timedelta(0)}, "timeout must be a positive duration"),
    ({"process_group_backend": "nope"}, r"process_group_backend='nope': unknown backend 'nope'"),
    ({"process_group_backend": "cpu:gloo,cuda:nope"}, "unknown backend 'nope'"),
    ({"process_group_backend": 1}, "process_group_backend must be a backend name"),
    ({"model_averaging_period": 4}, "remove `model_averaging_period`"),
    ({"ddp_comm_state": object()}, "remove `ddp_comm_state`"),
    ({"process_group": object()}, "remove `process_group` and set group_size"),
]


@pytest.mark.parametrize("kwargs,match", STRATEGY_CASES, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"[:40]
                                                              for k, _ in STRATEGY_CASES])
def test_strategy_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(**kwargs)


def test_every_strategy_argument_is_covered():
    own = {n for n, p in inspect.signature(LocalSGDStrategy.__init__).parameters.items()
           if n != "self" and p.kind is not p.VAR_KEYWORD}
    assert own <= {name for kwargs, _ in STRATEGY_CASES for name in kwargs}


# LocalSGDDeepSpeedStrategy refuses streaming and time-based sync (any non-default value).
DEEPSPEED_REFUSED = [("fragments", 2), ("overlap_steps", 1), ("overlap_mix", 0.5), ("sync_every_seconds", 30.0)]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("name,value", DEEPSPEED_REFUSED)
def test_deepspeed_strategy_refuses_streaming_and_time_based(name, value, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from lightning_localsgd import LocalSGDDeepSpeedStrategy

    with pytest.raises(ValueError, match=rf"{name}={value!r} is not supported by LocalSGDDeepSpeedStrategy"):
        LocalSGDDeepSpeedStrategy(stage=2, **{name: value})


def test_streaming_and_time_based_good_values_are_accepted():
    s = LocalSGDStrategy(sync_every=8, fragments=4, overlap_steps=7, overlap_mix=0.5)
    assert (s.fragments, s.overlap_steps, s.overlap_mix) == (4, 7, 0.5)
    s = LocalSGDStrategy(sync_every=8, fragments=8, overlap_steps=0, overlap_mix=0)
    assert s.schedule.streaming and s.overlap_mix == 0.0
    assert not LocalSGDStrategy(sync_every=8, fragments=1, overlap_steps=0).schedule.streaming
    assert LocalSGDStrategy(sync_every_seconds=1).sync_every_seconds == 1.0
    assert LocalSGDStrategy(sync_every_seconds=0.25, group_size=2).sync_every_seconds == 0.25


def test_public_attributes_and_registered_names():
    s = LocalSGDStrategy(sync_every=8, outer_optimizer="diloco", group_size=2, warmup_steps=5,
                         outer_state_device="cpu", find_unused_parameters=True)
    assert (s.sync_every, s.outer_optimizer, s.group_size, s.warmup_steps, s.outer_state_device) == (
        8, "diloco", 2, 5, "cpu")
    assert s._ddp_kwargs == {"find_unused_parameters": True}  # DDP's own arguments pass through
    factory = functools.partial(torch.optim.SGD, lr=0.5)
    assert LocalSGDStrategy(outer_optimizer=factory).outer_optimizer is factory
    for name, outer in [("local_sgd", "average"), ("diloco", "diloco"), ("local_sgd_spawn", "average")]:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, LocalSGDStrategy) and trainer.strategy.outer_optimizer == outer


def test_good_values_are_accepted():
    s = LocalSGDStrategy(sync_timeout=2, timeout=timedelta(minutes=5), process_group_backend="cpu:gloo,cuda:nccl")
    assert s.sync_timeout == 2.0
    assert LocalSGDStrategy(sync_timeout=timedelta(seconds=90)).sync_timeout == 90.0
    assert LocalSGDStrategy().sync_timeout is None


# Combinations that only the Trainer can judge (world size = devices × nodes), checked when it is built.
TRAINER_CASES = [
    ({"devices": 2}, {"group_size": 4}, "group_size=4 is larger than the world size 2"),
    ({"devices": 3}, {"group_size": 2}, r"group_size=2 does not divide the world size 3.*\[1, 3\]"),
    ({"devices": 2, "num_nodes": 2}, {"group_size": 3}, r"group_size=3 does not divide the world size 4"),
    ({"devices": 2}, {"start_method": "nope"}, "start method 'nope' is not available"),
    ({"devices": 3}, {"cluster_size": 2, "cluster_sync_every": 128}, "cluster_size=2 does not divide the 3 worker groups"),
    ({"devices": 4}, {"sync_every": 2, "cluster_size": 3, "cluster_sync_every": 4},
     r"cluster_size=3 does not divide the 4 worker groups"),
]
if not dist.is_backend_available("nccl"):
    TRAINER_CASES.append(({"devices": 2}, {"process_group_backend": "nccl"}, "this torch build has no 'nccl' backend"))


@pytest.mark.parametrize("trainer_kwargs,strategy_kwargs,match", TRAINER_CASES)
def test_incompatible_combinations_fail_when_the_trainer_is_built(trainer_kwargs, strategy_kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.Trainer(accelerator="cpu", strategy=LocalSGDStrategy(**strategy_kwargs), logger=False, **trainer_kwargs)


def test_sync_batchnorm_is_rejected_before_training(tmp_path):
    """A Trainer combination refused at setup, before the first step (the Trainer builds without complaint)."""
    from torch.utils.data import DataLoader
    from workers.tiny import TinyModule, make_dataset

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=LocalSGDStrategy(), sync_batchnorm=True,
                        logger=False, enable_checkpointing=False, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="sync_batchnorm=False"):
        trainer.fit(TinyModule(), DataLoader(make_dataset(), batch_size=2))


# ------------------------------------------------------------------------------------------------ the data module
DATA_CASES = [
    ({"source": "csv"}, ValueError, "Unknown TextDataModule source='csv'"),
    ({"path": 3}, ValueError, "TextDataModule path must be a file or folder path"),
    ({"path": "/no/such/file.txt"}, FileNotFoundError, "path='/no/such/file.txt' does not exist"),
    ({"hf_name": ""}, ValueError, "TextDataModule hf_name must be a non-empty string or None"),
    ({"hf_config": 3}, ValueError, "TextDataModule hf_config must be a non-empty string or None, got 3"),
    ({"hf_split": ""}, ValueError, "TextDataModule hf_split must be a non-empty string"),
    ({"text_field": None}, ValueError, "TextDataModule text_field must be a non-empty string"),
    ({"streaming": "yes"}, ValueError, "TextDataModule streaming must be True or False"),
    ({"tokenizer": ""}, ValueError, "TextDataModule tokenizer must be a non-empty string or None"),
    ({"max_tokens": 0}, ValueError, "TextDataModule max_tokens must be >= 1"),
    ({"max_tokens": 2.5}, ValueError, "TextDataModule max_tokens must be an integer or None"),
    ({"block_size": "128"}, ValueError, r"TextDataModule block_size must be an integer, got '128' \(str\)"),
    ({"block_size": 0}, ValueError, "TextDataModule block_size must be >= 1"),
    ({"block_size": True}, ValueError, "TextDataModule block_size must be an integer"),
    ({"batch_size": 2.5}, ValueError, "TextDataModule batch_size must be an integer"),
    ({"batch_size": 0}, ValueError, "TextDataModule batch_size must be >= 1"),
    ({"val_fraction": "0.1"}, ValueError, "TextDataModule val_fraction must be a finite number"),
    ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in the open interval \(0, 1\)"),
    ({"num_workers": -1}, ValueError, "TextDataModule num_workers must be >= 0"),
    ({"num_workers": 1.5}, ValueError, "TextDataModule num_workers must be an integer"),
    ({"seed": "x"}, ValueError, "TextDataModule seed must be an integer"),
]


@pytest.mark.parametrize("kwargs,error,match", DATA_CASES, ids=[next(iter(k)) + "-" + str(i)
                                                                for i, (k, _, _) in enumerate(DATA_CASES)])
def test_data_module_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        TextDataModule(**kwargs)


def test_every_data_module_argument_is_covered():
    own = {n for n in inspect.signature(TextDataModule.__init__).parameters if n != "self"}
    assert own <= {next(iter(k)) for k, _, _ in DATA_CASES}


# ------------------------------------------------------------------------------------------------ the command line
CLI_CASES = [
    (["--trainer.strategy.group_size", "3"], "group_size=3 is larger than the world size 2"),
    (["--trainer.strategy.sync_timeout", "-1"], "sync_timeout must be a positive number of seconds"),
    (["--trainer.strategy.on_nonfinite", "ignore"], "on_nonfinite must be 'raise' or 'skip'"),
    (["--data.block_size", "0"], "block_size must be >= 1"),
    (["--data.val_fraction", "1.5"], r"val_fraction must be in the open interval \(0, 1\)"),
]


@pytest.mark.parametrize("args,match", CLI_CASES, ids=[a[0].lstrip("-") for a, _ in CLI_CASES])
def test_cli_rejects_before_training(args, match, monkeypatch, capsys):
    def not_reached(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(L.Trainer, "fit", not_reached)
    monkeypatch.setattr(sys, "argv", ["lightning-localsgd"])
    with pytest.raises((ValueError, SystemExit)) as exc:
        main(["fit", "--config", str(DEFAULT_CONFIG), *args])
    if isinstance(exc.value, SystemExit):
        assert exc.value.code != 0
        text = capsys.readouterr().err
    else:
        text = str(exc.value)
    import re

    assert re.search(match, text), text[-2000:]


BINARY = "binary.ckpt"
ONE_LINE_CASES = [
    (["--trainer.strategy.group_size", "3"], "group_size=3 is larger than the world size 2"),
    (["--trainer.strategy.cluster_size", "3", "--trainer.strategy.cluster_sync_every", "32"],
     r"cluster_size=3 does not divide the 2 worker groups"),
    (["--trainer.strategy.sync_every", "1.5"], r"trainer\.strategy\.sync_every: expected an integer, got 1\.5"),
    (["--trainer.strategy.sync_evry", "4"],
     r"trainer\.strategy\.sync_evry: LocalSGDStrategy has no argument 'sync_evry'; did you mean 'sync_every'\?"),
    (["--data.path", "missing.txt"], r"TextDataModule path='missing\.txt' does not exist"),
    (["--data.source", "text"], r"TextDataModule source='text' needs `path`"),
    (["--data.path", BINARY], r"binary\.ckpt' is not a UTF-8 text file"),
]


@pytest.mark.parametrize("args,match", ONE_LINE_CASES, ids=[" ".join(a) for a, _ in ONE_LINE_CASES])
def test_cli_errors_are_one_line_naming_the_argument(args, match, tmp_path, monkeypatch, capsys):
    # The probe of issue 16 got 35-70-line tracebacks or union dumps for these (and a binary file was read as text).
    def not_reached(*a, **k):
        raise AssertionError("training started")

    torch.save({"w": torch.randn(256)}, tmp_path / BINARY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", not_reached)
    monkeypatch.setattr(sys, "argv", ["lightning-localsgd"])
    monkeypatch.delenv("LIGHTNING_LOCALSGD_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(DEFAULT_CONFIG), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and len(lines) <= 2, err[-3000:]
    assert "Traceback" not in err and "Union" not in err
    import re

    assert re.search(match, errors[0]), err[-2000:]


def test_cli_incompatible_group_size_end_to_end(tmp_path):
    """One real `python -m lightning_localsgd fit` (default config: 2 CPU processes) with group_size 4 > 2 ranks."""
    proc = _forkserver.run([sys.executable, "-m", "lightning_localsgd", "fit", "--trainer.strategy.group_size", "4"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=180,
                           env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "group_size=4 is larger than the world size 2" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr[-3000:]
    assert not (tmp_path / "logs").exists()  # nothing was started
