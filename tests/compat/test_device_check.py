"""scripts/device_check.sh --dry-run: the plumbing of the GPU device check (docs/gpu.md), run on the CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from lightning_localsgd.engine.codecs import CODECS

ROOT = Path(__file__).resolve().parents[2]
RETURNED = ["check.log", "cuda_tests.xml", "gpu.md", "gpu.png", "gpu_codecs.csv", "gpu_inner_step.csv",
            "gpu_sync.csv"]


@pytest.mark.slow  # a pytest run of tests/cuda and the benchmark's toy pipeline in fresh interpreters: ~30 s
def test_device_check_dry_run_writes_every_result_within_what_comes_back(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # the device tool returns at most 8 files: the check writes exactly these
    assert sorted(p.name for p in out.iterdir()) == RETURNED
    log = (out / "check.log").read_text()
    assert "tests/cuda exit status 0" in log and "benchmark exit status 0" in log and "torch " + torch.__version__ in log
    suite = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) >= 25 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    if not torch.cuda.is_available():  # every CUDA test is skipped here, with the hardware it needs
        reasons = [c.find("skipped").get("message") for c in cases]
        assert all("needs a CUDA GPU" in r or "needs 4 GPUs" in r for r in reasons), set(reasons)
    sync = list(csv.DictReader(open(out / "gpu_sync.csv")))
    assert {(r["size"], r["impl"], r["state"]) for r in sync} == {
        (size, impl, state) for size in ("124M", "1B") for impl in ("local_sgd average", "local_sgd diloco")
        for state in ("device", "host")} | {(size, "torch PeriodicModelAverager", "device") for size in ("124M", "1B")}
    assert all(float(r["seconds"]) > 0 and float(r["ratio_to_limit"]) > 0 for r in sync)
    # one row per built-in codec: bf16, int8, int4 and the sparse topk / topk_ef
    assert [r["codec"] for r in csv.DictReader(open(out / "gpu_codecs.csv"))] == list(CODECS)
    assert list(CODECS) == ["bf16", "int8", "int4", "topk", "topk_ef", "topk_recipe"]
    assert len(list(csv.DictReader(open(out / "gpu_inner_step.csv")))) == 2  # one row per interleaved round
    assert "(c) inner step" in (out / "gpu.md").read_text()
