"""The tests' fork server (tests/_forkserver.py) behaves like the fresh interpreters it replaces (with
LOCALSGD_TESTS_NO_FORKSERVER=1 the same checks run on the fresh interpreters it falls back to)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import _forkserver

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_forked_process_is_what_python_would_start(tmp_path):
    code = ("import os, sys, warnings, torch\n"
            "print(sys.argv, os.getcwd(), os.environ['SOME_VAR'], sys.path[0] == '', torch.get_num_threads())\n"
            "print(__name__, 'lightning_localsgd' in sys.modules)\n"
            "warnings.warn('hidden')\n"
            "sys.exit(7)\n")
    proc = _forkserver.run([sys.executable, "-c", code, "x", "y"], env={**ENV, "SOME_VAR": "v",
                                                                        "PYTHONWARNINGS": "ignore"},
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    preloaded = _forkserver.enabled()  # the package comes imported in a forked process
    assert proc.stdout.splitlines() == [f"['-c', 'x', 'y'] {tmp_path} v True 1", f"__main__ {preloaded}"]
    assert proc.stderr == ""  # PYTHONWARNINGS=ignore applied
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(sys.argv[1:], sys.path[0])\nraise ValueError('boom')\n")
    proc = _forkserver.run([sys.executable, str(script), "--a"], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == f"['--a'] {tmp_path}\n"
    assert proc.stderr.startswith("Traceback (most recent call last):\n  File \"" + str(script)), proc.stderr
    assert proc.stderr.endswith("ValueError: boom\n")
    assert _forkserver.STATS["forked"] >= (2 if _forkserver.enabled() else 0)


def test_each_process_gets_its_own_random_seeds():
    code = "import random, numpy, torch; print(torch.initial_seed(), random.random(), numpy.random.rand())"
    outs = [_forkserver.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60).stdout
            for _ in range(2)]
    a, b = (out.split() for out in outs)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b)), outs


def test_startup_environment_changes_start_a_fresh_interpreter():
    proc = _forkserver.Popen([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                             env={**ENV, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE, text=True)
    assert not proc.forked and proc.communicate(timeout=60)[0] == "2\n"


def test_signals_and_timeouts(tmp_path):
    proc = _forkserver.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.forked is _forkserver.enabled() and proc.stdout.readline() == "up\n"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):
        _forkserver.run([sys.executable, "-c", "import time; time.sleep(60)"], env=ENV, timeout=0.5)


def test_run_ranks_returns_rank_0s_code_and_stops_the_others_when_a_rank_fails():
    code = ("import os, sys, time\n"
            "r = int(os.environ['LOCAL_RANK'])\n"
            "print(f'rank {r} of {os.environ[\"WORLD_SIZE\"]} port {os.environ[\"MASTER_PORT\"]}', flush=True)\n"
            "if r == 1: sys.exit(3)\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    proc = _forkserver.run_ranks([sys.executable, "-c", code], 3, env=ENV, timeout=60, grace=0.5)
    assert time.monotonic() - start < 30
    assert proc.returncode == -signal.SIGKILL  # as Lightning's child-process observer leaves rank 0
    lines = sorted(proc.stdout.splitlines())
    assert [line.split(" port ")[0] for line in lines] == ["rank 0 of 3", "rank 1 of 3", "rank 2 of 3"]
    assert len({line.split(" port ")[1] for line in lines}) == 1


def _fail_on_rank_1(rank: int, value: int) -> None:
    if rank == 1:
        raise SystemExit(value)


def test_spawn_raises_when_a_process_fails():
    with pytest.raises(RuntimeError, match="process 1 terminated with exit code 5"):
        _forkserver.spawn(_fail_on_rank_1, args=(5,), nprocs=2, timeout=60)
    _forkserver.spawn(_fail_on_rank_1, args=(0,), nprocs=2, timeout=60)
