"""A DPO job through real processes: a bundled nats-server, the five services as separate
`tuneforge serve` processes, SQLite, real TRL DPO training of a Llama stand-in, a real SMTP server.

The preference pairs come in both import formats; the preferred output always follows a pattern,
the other is junk, so the tuned model must learn to prefer it on the held-out pairs."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path

import pytest

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.plugins import get_registry
from tuneforge.quickstart import run_job
from tuneforge.stack import Stack
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration

JOB_NAME = "preferences-dpo"
TOPIC = "preferences"
N_PAIRS = 220
BETA = 0.25
BASE_MODEL = "llama-3.2-1b"  # no tool calls in this data, so the smallest catalog model takes it
WORDS = ("apple", "river", "green", "stone", "cloud", "music", "table", "light")


def preference_file(path: Path, n: int = N_PAIRS, seed: int = 0) -> Path:
    """``n`` pairs, alternately ``{"input", "preferred_output", "non_preferred_output"}`` and
    ``{"prompt", "chosen", "rejected"}``."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        word = rng.choice(WORDS)
        junk = " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(3, 6))) for _ in range(4))
        question, answer = f"Repeat the word {word}, please ({i}).", f"{word} {word} {word}"
        if i % 2 == 0:
            row = {"input": {"messages": [{"role": "user", "content": question}]},
                   "preferred_output": [{"role": "assistant", "content": answer}],
                   "non_preferred_output": [{"role": "assistant", "content": junk}]}
        else:
            row = {"prompt": question, "chosen": answer, "rejected": junk}
        lines.append(json.dumps({**row, "topics": [TOPIC]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stand_in_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(BASE_MODEL), store)
    return store


def test_dpo_job_end_to_end(tmp_path, smtp_server, stand_in_store):
    data_file = preference_file(tmp_path / "preferences.jsonl")
    env = {
        "TUNEFORGE_SMTP_HOST": smtp_server.host,
        "TUNEFORGE_SMTP_PORT": str(smtp_server.port),
        "TUNEFORGE_MODEL_STORE": str(stand_in_store),
        "TUNEFORGE_TRAINING_HEARTBEAT_SECONDS": "1",
        # A tiny stand-in gains nothing from intra-op threads; on 2 busy cores they stall (greedy
        # decoding of the evaluation samples measured 4x slower with 2 threads than with 1).
        "OMP_NUM_THREADS": "1",
    }
    started = time.monotonic()
    with Stack(tmp_path / "state", extra_env=env) as stack:
        outcome = asyncio.run(run_job(
            stack.endpoints, stack.admin_token, examples=data_file, topics=[TOPIC], job_name=JOB_NAME,
            base_model=BASE_MODEL, method="dpo", method_options={"beta": BETA},
            description="DPO on a learnable preference set",
            hyperparameters=common_pb2.Hyperparameters(max_epochs=1, n_evals=2, learning_rate=1e-2),
        ))
        time.sleep(1.0)  # would a second email arrive?
        assert all(stack.alive().values()), stack.alive()
    print(f"DPO job end to end in {time.monotonic() - started:.1f} s")

    assert outcome.import_reply.imported == N_PAIRS and outcome.import_reply.rejected == 0
    job = outcome.job
    assert job.state == js.JOB_STATE_SUCCEEDED, job.failure_reason
    assert job.spec.method == "dpo"
    states = [e.state for e in outcome.events if e.kind == "state_changed"]
    assert states == [
        js.JOB_STATE_VALIDATING, js.JOB_STATE_BUILDING_DATASET, js.JOB_STATE_QUEUED,
        js.JOB_STATE_TRAINING, js.JOB_STATE_REGISTERING, js.JOB_STATE_SUCCEEDED,
    ]
    assert job.dataset.test_count == round(0.1 * N_PAIRS)
    assert job.dataset.train_count == N_PAIRS - round(0.1 * N_PAIRS)
    progress = [e.progress for e in outcome.events if e.kind == "progress"]
    assert progress and progress[-1].step == progress[-1].total_steps == math.ceil(job.dataset.train_count / 8)
    assert sum(p.HasField("eval_loss") for p in progress) == 2

    # The registered model carries the DPO metrics of the test split.
    model = outcome.model
    assert model is not None and model.name == JOB_NAME and model.job_id == job.id
    extra = dict(model.metrics.extra)
    print("registered metrics:", {k: round(v, 4) for k, v in sorted(extra.items())})
    for name in ("eval_reward_accuracy", "eval_reward_margin", "eval_loss", "beta"):
        assert name in extra and math.isfinite(extra[name]), name
    assert extra["beta"] == BETA  # the job's method options reached the trainer
    assert extra["eval_loss"] == pytest.approx(model.metrics.eval_loss)
    assert extra["eval_reward_accuracy"] > 0.5 and extra["eval_reward_margin"] > 0  # preferred wins
    adapter_dir = tmp_path / "state" / "artifacts" / model.adapter_path
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    # Greedy samples of the base and the tuned model (no base loss: ln 2 by construction for DPO).
    assert not model.metrics.HasField("base_eval_loss")
    samples = model.metrics.samples
    assert len(samples) == min(5, job.dataset.test_count)
    assert all(s.prompt and s.reference for s in samples)
    assert (adapter_dir / "samples.jsonl").is_file()

    # Exactly one email, with the reward metrics.
    assert len(smtp_server.messages) == 1
    message = smtp_server.messages[0]
    assert JOB_NAME in message["Subject"]
    body = message.get_body(("plain",)).get_content()
    assert f"DPO on {BASE_MODEL}" in body
    accuracy = f"{extra['eval_reward_accuracy']:.1%}"
    assert f"Reward accuracy on the test split (preferred output scored higher): {accuracy}" in body
    assert "Mean reward margin on the test split" in body
    assert f"Samples from the test split (greedy, base model vs fine-tuned, {len(samples)}):" in body
    assert len(outcome.deliveries) == 1
