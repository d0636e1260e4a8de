"""Only the trainer imports torch: the four light services must start without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


@pytest.mark.parametrize(
    "module",
    [
        "tuneforge.dataset_builder.service",
        "tuneforge.job_scheduler.service",
        "tuneforge.model_registry.service",
        "tuneforge.notifier.service",
    ],
)
def test_service_does_not_import_heavy_stack(module):
    code = (
        "import importlib, sys, json\n"
        f"m = importlib.import_module({module!r})\n"
        "from tuneforge.plugins import get_registry\n"
        "get_registry()  # the catalog and methods load too\n"
        "from tuneforge.stack import load_service_class\n"
        f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"{module} imported {result.stdout.strip()}"


def test_trainer_service_module_defers_torch():
    """Even the trainer imports torch only when it trains (fast start, health first)."""
    code = (
        "import sys, tuneforge.trainer.service, tuneforge.trainer.worker\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
