"""Optional packages (deepspeed, torchft, transformers) are imported only on use: ``import lightning_localsgd`` works
without them and imports none of them; using a feature that needs one says what to install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

OPTIONAL = ("deepspeed", "torchft", "transformers")


def _run(body: str, hide: bool) -> dict:
    """Run ``body`` in a fresh interpreter; it prints one JSON line. ``hide``: ``sys.modules[name] = None`` makes
    importing a package raise ImportError, as when it is not installed. Lightning is imported before that: torchmetrics
    imports transformers when its metadata says it is installed, which hiding the module alone would break."""
    prelude = "import json, sys\n"
    if hide:
        prelude += f"import lightning.pytorch, torchmetrics\nfor _n in {OPTIONAL!r}:\n    sys.modules[_n] = None\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_does_not_import_optional_packages():
    """Lightning itself may import transformers (torchmetrics' BERTScore, when it is installed): only what the package
    adds to what ``import lightning.pytorch, torchmetrics`` loaded counts."""
    out = _run(
        """
        import lightning.pytorch, torchmetrics
        before = set(sys.modules)
        import lightning_localsgd, lightning_localsgd.examples, lightning_localsgd.cli
        print(json.dumps({"loaded": [n for n in %r if n in sys.modules and n not in before]}))
        """ % (OPTIONAL,),
        hide=False,
    )
    assert out["loaded"] == []


@pytest.mark.slow
def test_import_and_messages_with_optional_packages_missing():
    out = _run(
        """
        import lightning_localsgd
        from lightning_localsgd import LocalSGDDeepSpeedStrategy
        from lightning_localsgd.examples import GPT, TextDataModule
        from lightning.pytorch.strategies import StrategyRegistry
        result = {"registered": "local_sgd" in StrategyRegistry and "local_sgd_deepspeed" in StrategyRegistry}
        try:
            LocalSGDDeepSpeedStrategy()
        except ImportError as err:
            result["deepspeed"] = str(err)
        try:
            TextDataModule(tokenizer="gpt2").tokenizer
        except ImportError as err:
            result["transformers"] = str(err)
        print(json.dumps(result))
        """,
        hide=True,
    )
    assert out["registered"]
    assert "lightning-localsgd[deepspeed]" in out["deepspeed"]
    assert "pip install transformers" in out["transformers"]
