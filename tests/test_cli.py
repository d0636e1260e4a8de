"""`tuneforge up` and the client commands, as a user runs them: real processes, real stack."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
TEN_CATALOG_MODELS = [
    "deepseek-r1-distill-llama-70b", "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-14b",
    "llama-3.1-70b", "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b", "qwen-2.5-14b", "qwen-2.5-72b",
]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "conversations.jsonl"


def tuneforge(data_dir: Path, *args: str, key: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFORGE_API_KEY": key or ""}
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), *args],
                            capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def port_open(target: str) -> bool:
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def test_up_cli_round_trip_and_clean_stop(tmp_path):
    data_dir = tmp_path / "state"
    up = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), "up"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (data_dir / "stack.json").exists():
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        stack = json.loads((data_dir / "stack.json").read_text())
        assert set(stack["endpoints"]) == {"dataset-builder", "job-scheduler", "trainer", "model-registry", "notifier"}
        assert not stack["nats_url"].endswith(":4222")

        created = tuneforge(data_dir, "workspaces", "create", "--name", "Acme", "--plan", "pro",
                            "--email", "me@acme.test").stdout
        key = re.search(r"API key \(shown once\): (\S+)", created).group(1)
        time.sleep(0.5)  # the key reaches the other services by event

        catalog = json.loads(tuneforge(data_dir, "models", "catalog", "--json", key=key).stdout)
        by_id = {m["id"]: m for m in catalog["base_models"]}
        builtin = sorted(i for i, m in by_id.items() if m["plugin"] in ("llama", "qwen", "deepseek"))
        assert builtin == TEN_CATALOG_MODELS  # the product description's ten
        mistral_installed = importlib.util.find_spec("tuneforge_mistral") is not None
        assert len(by_id) == (13 if mistral_installed else 11)
        assert by_id["smollm2-135m"]["plugin"] == "smollm"
        qwen72 = by_id["qwen-2.5-72b"]
        assert (qwen72["display_name"], qwen72["source"], int(qwen72["parameter_count"]), int(qwen72["context_length"])) == (
            "Qwen 2.5 72B", "Qwen/Qwen2.5-72B-Instruct", 72_706_203_648, 32_768)
        assert qwen72["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
        assert by_id["deepseek-r1-distill-qwen-14b"]["capabilities"] == ["reasoning"]
        assert "sft" in catalog["methods"]
        table = tuneforge(data_dir, "models", "catalog", key=key).stdout
        assert re.search(r"deepseek-r1-distill-llama-70b\s+Deepseek R1 - Llama 3.3 70B Distil\s+70.6B\s+128k", table)
        assert re.search(r"llama-3.1-8b .* tool_calling,planning\s+llama\s+meta-llama/Llama-3.1-8B-Instruct", table)

        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
        result = tuneforge(data_dir, "data", "import", str(bad), key=key, check=False)
        assert result.returncode == 1
        assert "line 1: messages: [no_assistant_turn]" in result.stdout
        assert "1 imported" in result.stdout and "1 rejected" in result.stdout  # the good line is kept

        imported = tuneforge(data_dir, "data", "import", str(EXAMPLES), "--topic", "support", key=key).stdout
        assert "500 imported" in imported and "0 rejected" in imported
        topics = tuneforge(data_dir, "data", "topics", key=key).stdout
        assert re.search(r"billing\s+125", topics) and re.search(r"support\s+500", topics)

        built = json.loads(tuneforge(data_dir, "datasets", "build", "--base-model", "llama-3.2-1b",
                                     "--topic", "returns", "--json", key=key).stdout)["dataset"]
        assert (int(built["train_count"]), int(built["test_count"])) == (112, 13)
        out = tmp_path / "download"
        tuneforge(data_dir, "datasets", "download", built["dataset_id"], str(out), key=key)
        assert len((out / "test.jsonl").read_text().splitlines()) == 13
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["dataset_id"] == built["dataset_id"] and manifest["topics"] == ["returns"]

        bad_beta = tuneforge(data_dir, "jobs", "create", "--name", "prefs", "--base-model", "qwen-2.5-14b",
                             "--method", "dpo", "--option", "beta=abc", key=key, check=False)
        assert bad_beta.returncode == 1 and "spec.method_options_json" in bad_beta.stderr and "beta" in bad_beta.stderr
        assert "Traceback" not in bad_beta.stderr

        job = tuneforge(data_dir, "jobs", "create", "--name", "pro-dataset", "--base-model", "llama-3.2-1b",
                        "--topic", "billing", key=key).stdout
        assert "dataset only" in job  # a Pro workspace gets the dataset, not training
        job_id = re.search(r"job (job_\w+) created", job).group(1)
        watched = tuneforge(data_dir, "jobs", "watch", job_id, key=key).stdout
        assert "SUCCEEDED" in watched and "dataset ready" in watched

        wrong = tuneforge(data_dir, "jobs", "get", job_id, key="tfk_wrong", check=False)
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert code == 0, up.stdout.read()
    assert not (data_dir / "stack.json").exists()
    assert not any(port_open(t) for t in stack["endpoints"].values())
