"""``python -m harness CONFIG.json``: one training run (Lightning's launcher re-runs this for the other ranks)."""

import json
import sys
from pathlib import Path

from harness.worker import worker

if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
