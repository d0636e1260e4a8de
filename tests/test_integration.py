"""The happy path through real processes: a bundled nats-server, the five services as separate
`tuneforge serve` processes on loopback, SQLite, real TRL/peft training of a Llama stand-in, and a
real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.core.client import Clients
from tuneforge.dataset_builder import formats
from tuneforge.plugins import get_registry
from tuneforge.quickstart import BASE_MODEL, EXAMPLES, run_job
from tuneforge.stack import Stack
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration

TOPICS = ["billing", "shipping"]
JOB_NAME = "billing-shipping-sft"


def _expected_examples(topics: list[str]) -> dict[str, list[str]]:
    """content hash -> topics of the example file's examples with one of ``topics``."""
    out: dict[str, list[str]] = {}
    for i, raw in enumerate(EXAMPLES.read_bytes().splitlines(), 1):
        example, errors = formats.parse_line(raw, i)
        assert not errors, errors
        if set(example.topics) & set(topics):
            out[example.content_hash] = list(example.topics)
    return out


@pytest.fixture(scope="module")
def stand_in_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(BASE_MODEL), store)
    return store


def test_sft_job_end_to_end(tmp_path, smtp_server, stand_in_store):
    data_dir = tmp_path / "state"
    env = {
        "TUNEFORGE_SMTP_HOST": smtp_server.host,
        "TUNEFORGE_SMTP_PORT": str(smtp_server.port),
        "TUNEFORGE_MODEL_STORE": str(stand_in_store),
        "TUNEFORGE_TRAINING_HEARTBEAT_SECONDS": "1",
        # A tiny stand-in gains nothing from intra-op threads; on 2 busy cores they stall (greedy
        # decoding of the evaluation samples measured 4x slower with 2 threads than with 1).
        "OMP_NUM_THREADS": "1",
    }
    with Stack(data_dir, extra_env=env) as stack:
        outcome = asyncio.run(run_job(
            stack.endpoints, stack.admin_token, topics=TOPICS, job_name=JOB_NAME, email="owner@example.com",
            hyperparameters=common_pb2.Hyperparameters(max_epochs=1, n_evals=2),
        ))
        downloaded = tmp_path / "download"
        async def lookups():
            clients = Clients.connect(stack.endpoints, outcome.api_key)
            try:
                files = await sdk.download_dataset(clients, outcome.job.dataset.dataset_id, downloaded)
                resolved = await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name=JOB_NAME))
                return files, resolved
            finally:
                await clients.close()

        files, resolved = asyncio.run(lookups())
        time.sleep(1.0)  # would a second email arrive?
        assert all(stack.alive().values()), stack.alive()

    job = outcome.job
    assert job.state == js.JOB_STATE_SUCCEEDED, job.failure_reason

    # States in order, each once.
    states = [e.state for e in outcome.events if e.kind == "state_changed"]
    assert states == [
        js.JOB_STATE_VALIDATING, js.JOB_STATE_BUILDING_DATASET, js.JOB_STATE_QUEUED,
        js.JOB_STATE_TRAINING, js.JOB_STATE_REGISTERING, js.JOB_STATE_SUCCEEDED,
    ]
    assert [e.sequence for e in outcome.events] == list(range(1, len(outcome.events) + 1))
    progress = [e.progress for e in outcome.events if e.kind == "progress"]
    assert progress and progress[-1].step == progress[-1].total_steps
    assert any(p.HasField("eval_loss") for p in progress)

    # The dataset: chosen topics only, round(0.1 × n) in the test split.
    expected = _expected_examples(TOPICS)
    n = len(expected)
    assert job.dataset.test_count == round(0.1 * n)
    assert job.dataset.train_count == n - round(0.1 * n)
    assert set(job.dataset.topic_counts) == set(TOPICS)
    assert {f.name for f in files} == {"train.jsonl", "test.jsonl", "manifest.json"}
    seen = []
    for split in ("train", "test"):
        for line in (downloaded / f"{split}.jsonl").read_text().splitlines():
            h = formats.content_hash(json.loads(line))
            assert h in expected, f"{split} holds an example outside {TOPICS}"
            seen.append(h)
    assert sorted(seen) == sorted(expected)
    assert len((downloaded / "test.jsonl").read_text().splitlines()) == round(0.1 * n)

    # The registered model and its adapter, loadable with peft.
    model = outcome.model
    assert model is not None and model.name == JOB_NAME and model.job_id == job.id
    assert model.base_model == BASE_MODEL and model.dataset.content_hash == job.dataset.content_hash
    assert model.metrics.HasField("eval_loss")
    adapter_dir = data_dir / "artifacts" / model.adapter_path
    assert (adapter_dir / "adapter_model.safetensors").exists()
    # Did it learn? The base model's eval loss and greedy samples reached the registry (and the job).
    assert model.metrics.HasField("base_eval_loss") and model.metrics.base_eval_loss > 0
    samples = model.metrics.samples
    assert len(samples) == min(5, job.dataset.test_count)
    assert all(s.prompt and s.reference and json.loads(s.prompt_json) for s in samples)
    assert list(job.metrics.samples) == list(samples)
    written = [json.loads(line) for line in (adapter_dir / "samples.jsonl").read_text().splitlines()]
    assert [w["tuned_answer"] for w in written] == [s.tuned_answer for s in samples]
    assert resolved.model_id == model.id and len(resolved.adapter_sha256) == 64
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stand_in_store / BASE_MODEL)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())

    # Exactly one email, naming the job.
    assert len(smtp_server.messages) == 1
    message = smtp_server.messages[0]
    assert message["To"] == "owner@example.com"
    assert JOB_NAME in message["Subject"]
    assert JOB_NAME in message.get_body(("plain",)).get_content()
    assert f"Eval loss: base {model.metrics.base_eval_loss:.4f} -> fine-tuned" in message.get_body(("plain",)).get_content()
    assert f"Samples from the test split (greedy, base model vs fine-tuned, {len(samples)}):" in message.get_body(("plain",)).get_content()
    assert [d.destination for d in outcome.deliveries] == [f"smtp://{smtp_server.host}:{smtp_server.port}"]
