"""The one table of refused combinations (``lightning_localsgd/support.py``), the README's feature × mode × strategy
table generated from it, and the tests it names: kept in step."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lightning_localsgd import support
from lightning_localsgd.config import LocalSGDConfig

ROOT = Path(__file__).resolve().parents[2]


def test_readme_holds_the_generated_table():
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- support-table:start -->\n", "\n<!-- support-table:end -->"
    assert start in text and end in text, "README.md lost the markers of the generated support table"
    current = text.split(start, 1)[1].split(end, 1)[0]
    assert current == support.markdown_table(), (
        "README.md's support table is stale: paste the output of `python -m lightning_localsgd.support` between "
        "its markers")


def test_every_named_test_exists():
    for (feature, mode, strategy), ref in support.TESTED.items():
        path, _, name = ref.partition("::")
        file = ROOT / path
        assert file.is_file(), f"{feature} / {mode} / {strategy}: {path} does not exist"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M), \
                f"{feature} / {mode} / {strategy}: no test {name} in {path}"
        assert (feature, mode, strategy) not in {
            (f, m, s) for f, settings in support.FEATURES for m in support.MODES for s in support.STRATEGIES
            if support._refusal_for(settings, m, s) is not None}, f"{ref} is named for a refused combination"


def test_every_row_names_a_real_argument_and_applies_where_it_says():
    names = {f.name for f in dataclasses.fields(LocalSGDConfig) if f.init}
    for row in support.REFUSALS:
        assert row.parameter in names, row.parameter
        assert set(row.modes) <= set(support.MODES) and set(row.strategies) <= set(support.STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy kind"):
        support.check(LocalSGDConfig(), "tensor_parallel")


@pytest.mark.parametrize("kwargs,strategy,needle", [
    ({"sync_every_seconds": 5.0, "cluster_size": 2, "cluster_sync_every": 128}, None,
     "does not combine with cluster_size=2"),
    ({"warmup_steps": 4}, "deepspeed", "not supported with DeepSpeed"),
    ({"fragments": 2}, "deepspeed", "fragments=2 is not supported by LocalSGDDeepSpeedStrategy"),
])
def test_check_raises_the_rows_message(kwargs, strategy, needle):
    if strategy is None:  # the rows every strategy shares run when the arguments are built
        with pytest.raises(ValueError, match=needle):
            LocalSGDConfig(**kwargs)
    else:
        config = LocalSGDConfig(**kwargs)
        support.check(config)  # none of the shared rows
        with pytest.raises(ValueError, match=needle):
            support.check(config, strategy)
        for other in ("ddp", "fsdp"):
            support.check(config, other)  # the other strategies take it
