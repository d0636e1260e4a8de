"""`tuneforge quickstart` (what `make quickstart` runs) ends with exit code 0 and the summary."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_quickstart_succeeds_and_prints_the_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "--data-dir", str(tmp_path), "quickstart"],
        capture_output=True, text=True, timeout=600, env={"COLUMNS": "200", **__import__("os").environ},
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "quickstart succeeded" in out
    for line in ("SUCCEEDED", "support-assistant", "225 train / 25 test", "billing=125, shipping=125",
                 "Your fine-tuned model 'support-assistant' is ready"):
        assert line in out, line
    emails = list((tmp_path / "quickstart" / "outbox").glob("*.eml"))
    assert len(emails) == 1
    adapters = list((tmp_path / "quickstart" / "artifacts" / "registry").rglob("adapter_model.safetensors"))
    assert len(adapters) == 1
