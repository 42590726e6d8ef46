#!/usr/bin/env bash
# The one device check of the CUDA path (docs/gpu.md): on a bare GPU machine with no network, install the carried
# wheels, run tests/cuda and the GPU benchmark, and write everything to $OUT — in at most ~8 minutes.
#
#   bash scripts/build_device_wheels.sh          # here, once: .whl/ (git-ignored, ~6 MB)
#   bash scripts/device_check.sh                 # there: carry .whl; OUT is the folder that comes back
#   bash scripts/device_check.sh --dry-run       # anywhere: the same plumbing on the CPU (CI runs it: tests/compat)
#
# What comes back (at most 8 files): check.log (everything printed, versions first), cuda_tests.xml (JUnit),
# gpu_sync.csv, gpu_codecs.csv, gpu_inner_step.csv, gpu.md, gpu.png. Exit status: 0 when the tests passed and the
# benchmark finished.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$(mktemp -d -t device_check.XXXX)}"
PY="${PYTHON:-python3}"
TESTS_LIMIT="${DEVICE_CHECK_TESTS_SECONDS:-330}"
BENCH_LIMIT="${DEVICE_CHECK_BENCH_SECONDS:-200}"
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
t0=$(date +%s)
say() { echo "[device_check +$(( $(date +%s) - t0 ))s] $*"; }

say "OUT=$OUT dry_run=$DRY"
if [[ $DRY == 0 ]]; then
    if [[ -d .whl ]]; then
        say "installing $(ls .whl | wc -l) carried wheels into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { say "FAILED: wheel install"; exit 2; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "no .whl/ folder: DeepSpeed and jsonargparse tests will be skipped if missing (bash scripts/build_device_wheels.sh)"
    fi
    # the project from the working tree, as it is (its examples/ folder is the lightning_localsgd.examples package)
    [[ -e lightning_localsgd/examples ]] || ln -s ../examples lightning_localsgd/examples
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

say "versions"
"$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
          "| memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("lightning", "lightning_localsgd", "deepspeed", "jsonargparse", "transformers", "torchft"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as err:  # noqa: BLE001 - a missing package is reported, not fatal
        print(f"{name}: not importable ({type(err).__name__}: {err})")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv

say "tests/cuda (limit ${TESTS_LIMIT}s)"
PAR=()
"$PY" -c "import xdist" 2>/dev/null && [[ $DRY == 0 ]] && PAR=(-n 6)
timeout "$TESTS_LIMIT" "$PY" -m pytest tests/cuda -p no:cacheprovider -rA -q --timeout 200 "${PAR[@]}" \
    --junitxml "$OUT/cuda_tests.xml"
tests_rc=$?
say "tests/cuda exit status $tests_rc"

say "benchmarks/gpu/gpu.py (limit ${BENCH_LIMIT}s)"
BENCH=(--out "$OUT")
[[ $DRY == 1 ]] && BENCH+=(--dry-run --repeats 2 --rounds 2 --steps 4)
timeout "$BENCH_LIMIT" "$PY" benchmarks/gpu/gpu.py "${BENCH[@]}"
bench_rc=$?
say "benchmark exit status $bench_rc"

say "done: tests $tests_rc, benchmark $bench_rc; files: $(ls "$OUT" | tr '\n' ' ')"
[[ $tests_rc == 0 && $bench_rc == 0 ]]
