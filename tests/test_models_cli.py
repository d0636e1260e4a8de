"""`tuneforge models get` and `tuneforge models try` as a user runs them: a real stack (nats-server,
five service processes), a real SFT job on a Llama stand-in, then the CLI in subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.plugins import get_registry
from tuneforge.quickstart import BASE_MODEL, run_job
from tuneforge.stack import Stack
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration
NAME = "cli-support-bot"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One stack for the module, with one model trained through it: (data_dir, api key, store)."""
    root = tmp_path_factory.mktemp("models-cli")
    store = root / "models"
    make_standin(get_registry().base_model(BASE_MODEL), store)
    data_dir = root / "state"
    with Stack(data_dir, extra_env={"TUNEFORGE_MODEL_STORE": str(store)}) as stack:
        outcome = asyncio.run(run_job(
            stack.endpoints, stack.admin_token, topics=["billing"], job_name=NAME,
            hyperparameters=common_pb2.Hyperparameters(max_epochs=1, n_evals=1, learning_rate=1e-3, min_examples=100),
        ))
        assert outcome.job.state == js.JOB_STATE_SUCCEEDED, outcome.job.failure_reason
        yield data_dir, outcome.api_key, store


def tuneforge(trained, *args: str, stdin: str | None = None, store: Path | None = None) -> subprocess.CompletedProcess:
    data_dir, key, default_store = trained
    env = {**os.environ, "TUNEFORGE_API_KEY": key, "TUNEFORGE_MODEL_STORE": str(store or default_store)}
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_models_get_json_is_the_whole_model(trained):
    result = tuneforge(trained, "models", "get", NAME, "--json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)  # one JSON document
    assert model["name"] == NAME and model["base_model"] == BASE_MODEL and model["method"] == "sft"
    assert model["metrics"]["eval_loss"] > 0 and int(model["metrics"]["steps"]) > 0
    dataset = model["dataset"]  # int64 fields are JSON strings (proto3 JSON mapping)
    assert dataset["topic_counts"] == {"billing": "125"}
    assert (int(dataset["train_count"]), int(dataset["test_count"])) == (112, 13)
    assert model["hyperparameters"]["learning_rate"] == pytest.approx(1e-3)
    assert {f["path"] for f in model["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_models_get_shows_lineage_metrics_and_files(trained):
    model = json.loads(tuneforge(trained, "models", "get", NAME, "--json").stdout)
    result = tuneforge(trained, "models", "get", NAME)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{NAME} ({model['id']})")
    assert f"eval loss   {model['metrics']['eval_loss']:.4f}" in out
    if "base_eval_loss" in model["metrics"]:  # the base-vs-tuned evaluation, where the trainer ran it
        base = model["metrics"]["base_eval_loss"]
        change = (model["metrics"]["eval_loss"] - base) / base * 100
        assert f"(base model {base:.4f}, {change:+.1f} %)" in out
    assert f"{model['dataset']['train_count']} train / {model['dataset']['test_count']} test" in out
    weights = next(f for f in model["files"] if f["path"] == "adapter_model.safetensors")
    assert f"sha256 {weights['sha256'][:12]}" in out


def test_models_get_unknown_name_is_one_line(trained):
    result = tuneforge(trained, "models", "get", "no-such-model")
    assert result.returncode == 1
    assert result.stderr.startswith("tuneforge: error: NOT_FOUND") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_models_try_downloads_once_then_answers_a_conversation(trained):
    data_dir, _, _ = trained
    result = tuneforge(trained, "models", "try", NAME, "Say hello.", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer printed"
    assert "downloaded to" in result.stderr
    model = json.loads(tuneforge(trained, "models", "get", NAME, "--json").stdout)
    cached = data_dir / "cache" / "adapters" / model["id"] / "adapter_model.safetensors"
    weights = next(f for f in model["files"] if f["path"] == "adapter_model.safetensors")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == weights["sha256"]

    # Interactive mode from a pipe: two messages, one conversation, reusing the cached adapter.
    result = tuneforge(trained, "models", "try", NAME, "--max-new-tokens", "8", "--system", "Be brief.",
                       stdin="Say hello.\nAnd now goodbye.\nexit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "cached in" in result.stderr and "downloaded to" not in result.stderr
    first, _, rest = result.stdout.partition("> Say hello.\n")
    second_answer_start = rest.find("> And now goodbye.\n")
    assert first == "" and second_answer_start >= 0, result.stdout
    assert rest[:second_answer_start].endswith("\n")  # the first answer, ended
    assert "never read" not in result.stdout

    # A cached adapter that no longer matches the registry's checksum is downloaded again.
    cached.write_bytes(b"corrupt")
    result = tuneforge(trained, "models", "try", NAME, "Hi", "--max-new-tokens", "4", "--temperature", "0.7")
    assert result.returncode == 0, result.stderr
    assert "downloaded to" in result.stderr
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == weights["sha256"]


def test_models_try_without_base_weights_says_how_to_get_them(trained, tmp_path):
    result = tuneforge(trained, "models", "try", NAME, "Hi", store=tmp_path / "empty-store")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"base model '{BASE_MODEL}' is not in the model store" in result.stderr
    assert "tuneforge models import" in result.stderr and "make real-model" in result.stderr
