#!/usr/bin/env bash
# Build .whl/ (git-ignored): the wheels scripts/device_check.sh installs on a GPU machine that has no network.
# That machine (docs/gpu.md) has Python 3.12 with torch + CUDA, lightning, transformers, pytest, rich, scipy, numpy;
# it lacks jsonargparse (CLI), DeepSpeed and DeepSpeed's pydantic / hjson. The project itself runs from the working tree
# (device_check.sh puts it on PYTHONPATH), so that the check runs the code as it is. Run here, from anywhere:
#     bash scripts/build_device_wheels.sh        # ~6 MB, ten seconds
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PY="--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all: --no-deps"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# pure-Python and binary dependencies, pinned to what the project is tested with here
python -m pip download -q $PY $PLAT -d .whl \
    "jsonargparse==$(python -c 'import jsonargparse; print(jsonargparse.__version__)')" \
    docstring-parser typeshed-client importlib-resources \
    pydantic pydantic-core annotated-types typing-inspection hjson
# DeepSpeed is published as a source archive only: build its wheel here (pure Python: no CUDA ops are prebuilt)
DS_BUILD_OPS=0 DS_BUILD_AIO=0 python -m pip wheel -q --no-deps -w .whl \
    "deepspeed==$(python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
# one version of each: pydantic-core must be the one this pydantic pins
python - <<'PY'
import pathlib, re, zipfile
whl = pathlib.Path(".whl")
pyd = next(whl.glob("pydantic-[0-9]*.whl"))
meta = zipfile.ZipFile(pyd).read(next(n for n in zipfile.ZipFile(pyd).namelist() if n.endswith("METADATA"))).decode()
want = re.search(r"Requires-Dist: pydantic-core==([\d.]+)", meta).group(1)
have = [p.name for p in whl.glob("pydantic_core-*.whl")]
assert any(f"-{want}-" in n for n in have), f"pydantic {pyd.name} needs pydantic-core {want}, have {have}"
PY
ls -la .whl
du -sh .whl
