"""``benchmarks/index.py``: the index table in ``benchmarks/README.md`` is the one generated from the results, every
benchmark folder is in the registry with its script, README and results, every quick argument is one its script
declares, and every relative link of the benchmarks' READMEs (and of the READMEs and docs pointing into them)
resolves."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import index  # noqa: E402

FOLDERS = sorted(p.name for p in BENCHMARKS.iterdir() if p.is_dir() and p.name not in ("harness", "__pycache__"))


def test_readme_holds_the_generated_table():
    text = index.README.read_text()
    assert index.START in text and index.END in text, "benchmarks/README.md lost the markers of the index table"
    current = text.split(index.START, 1)[1].split(index.END, 1)[0]
    assert current == index.table(), (
        "benchmarks/README.md's index is stale (a benchmark's results changed): run `python benchmarks/index.py "
        "--write`")


def test_the_index_stays_short():
    assert len(index.README.read_text().splitlines()) <= 150


def test_every_folder_is_a_benchmark_in_the_registry():
    assert sorted(b.name for b in index.BENCHMARKS_ALL) == FOLDERS
    for name in FOLDERS:
        folder = BENCHMARKS / name
        assert (folder / f"{name}.py").is_file(), f"benchmarks/{name}/ has no {name}.py"
        assert (folder / "README.md").is_file(), f"benchmarks/{name}/ has no README.md"
        assert (folder / "results").is_dir(), f"benchmarks/{name}/ has no results/"
    assert not (BENCHMARKS / "results").exists(), "results belong in each benchmark's folder"


@pytest.mark.parametrize("bench", index.BENCHMARKS_ALL, ids=lambda b: b.name)
def test_quick_arguments_are_declared_by_the_script(bench):
    script = (BENCHMARKS / bench.name / f"{bench.name}.py").read_text()
    declared = set(re.findall(r"add_argument\(\s*f?\"(--[a-z0-9-]+)\"", script))
    declared |= {f"--{n}" for n in re.findall(r"for name in \(([^)]*)\):\s*\n\s*group\.add_argument", script)
                 for n in re.findall(r"\"(\w+)\"", n)}  # scaling_law's preset flags
    for flag in re.findall(r"(--[a-z0-9-]+)", bench.quick):
        assert flag in declared, f"{bench.name}: quick argument {flag} is not an argument of {bench.name}.py"


def _links(path: Path) -> list[tuple[str, Path]]:
    """Relative markdown links of ``path`` (no URLs, no pure anchors), resolved against its folder."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        out.append((target, (path.parent / target.split("#", 1)[0]).resolve()))
    return out


@pytest.mark.parametrize("readme", [*sorted(BENCHMARKS.glob("*/README.md")), BENCHMARKS / "README.md",
                                    ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(readme):
    broken = [target for target, path in _links(readme) if not path.exists()]
    assert not broken, f"{readme.relative_to(ROOT)}: links to missing files: {broken}"


def test_no_reference_to_the_flat_layout():
    """Commands and paths name the folders: no script path or results folder of the flat layout is left."""
    flat = re.compile(r"benchmarks/(results/|(" + "|".join(FOLDERS) + r")\.py)")
    texts = [*BENCHMARKS.glob("*/README.md"), BENCHMARKS / "README.md", ROOT / "README.md",
             *(ROOT / "docs").glob("*.md"), *BENCHMARKS.glob("*/*.py"), ROOT / "scripts" / "device_check.sh",
             *(ROOT / "tests" / "benchmarks").glob("*.py")]
    stale = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts for m in flat.finditer(p.read_text())]
    assert not stale, stale
