"""`tuneforge demo`'s fast parts: the data it feeds SmolLM2 and its refusal without the real model.
(The demo itself is a ~10-minute CPU run: `make demo`; its figures are in benchmarks/README.md.)"""

from __future__ import annotations

import json
import subprocess
import sys

from tuneforge.core import capabilities
from tuneforge.demo import BASE_MODEL, TOPICS, tool_free_examples
from tuneforge.plugins import get_registry
from tuneforge.quickstart import EXAMPLES


def test_demo_data_fits_smollm2(tmp_path):
    spec = get_registry().base_model(BASE_MODEL)
    assert capabilities.TOOL_CALLING not in spec.capabilities  # why the demo leaves tool calls out
    kept, dropped = tool_free_examples(EXAMPLES, tmp_path / "kept.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == len(rows) and kept + dropped == len(EXAMPLES.read_text().splitlines())
    assert dropped > 0 and not any(capabilities.needs(r) for r in rows)
    on_topics = [r for r in rows if set(r["topics"]) & set(TOPICS)]
    assert len(on_topics) >= 200  # the product's min_examples: the demo keeps the default


def test_demo_without_the_real_model_says_make_real_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(tmp_path), "demo"],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={"PATH": "/usr/bin:/bin", "TUNEFORGE_MODEL_STORE": str(tmp_path / "empty")})
    assert result.returncode == 1
    assert "make real-model" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "demo").exists()  # nothing started
