"""Exact resume across attempts, and fencing of a stale attempt.

1. N steps straight vs. k steps in a subprocess that uploads its checkpoints to the artifact
   store the way the worker does (``upload_checkpoint``) and is then SIGKILLed, then the worker's
   download path (``complete_checkpoints`` → ``download_checkpoint``) and a resumed run to N: the
   same adapter weights (max abs difference ≤ 1e-5) and the same per-step losses (rel 1e-5). A
   torn upload (no completion marker) and a corrupt checkpoint (marker, wrong bytes) are never
   resumed from.
2. The job-scheduler ignores every event of attempt 1 once attempt 2 has started, and accepts
   attempt 2's; the model registered is attempt 2's.

The trainer that crashes every time (bounded attempts) is in tests/test_supervised_stack.py: it
needs real processes under the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuneforge.core.storage import ArtifactStore
from tuneforge.trainer import worker as w
from conftest import WorkMsg

CATALOG_ID = "llama-3.2-1b"
WS, JOB = "ws-resume", "job-resume"
KILL_AFTER_STEP = 4  # the subprocess stops (and is killed) once this checkpoint is uploaded
WEIGHT_TOLERANCE = 1e-5  # max abs difference of any adapter weight
LOSS_TOLERANCE = 1e-5  # relative, per logged step

# The same run in the parent and in the killed subprocess: 24 train rows, batch 4, 2 epochs =
# 12 steps; checkpoints at 4 and 8 (12 is the final adapter), so the kill at 4 is mid-epoch and
# the resumed run must skip the batches already seen, then reshuffle for epoch 2; LoRA dropout
# on, so the restored RNG state matters. No evaluations: they cost more than the training here
# (tests/test_sft_training.py checks the eval loss after a resume).
HYPERPARAMETERS = dict(
    learning_rate=2e-2, batch_size=4, max_epochs=2, n_evals=0, n_checkpoints=3, lora_rank=8, lora_alpha=16.0,
    lora_dropout=0.1, early_stopping_patience=0, warmup_ratio=0.1, lr_peak_ratio=0.1, seed=3,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
)

CHILD = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from tuneforge.core.hyperparameters import ResolvedHyperparameters
    from tuneforge.core.storage import ArtifactStore
    from tuneforge.plugins import get_registry
    from tuneforge.trainer import worker as w
    from tuneforge.training import TrainingContext
    from tuneforge_builtin.sft import SFT

    args = json.loads(sys.argv[1])
    store = ArtifactStore(args["store"])
    hp = ResolvedHyperparameters(**args["hp"])

    def on_checkpoint(report):
        # exactly what the worker does with a checkpoint, then wait to be killed at kill_after
        w.upload_checkpoint(store, report.path, w.checkpoint_key(args["ws"], args["job"], 1, report.step),
                            report.step)
        print(f"uploaded {report.step}", flush=True)
        if report.step >= args["kill_after"]:
            time.sleep(600)

    SFT.train(TrainingContext(
        job_id=args["job"], base_model=get_registry().base_model(args["model"]), model_dir=Path(args["model_dir"]),
        train_file=Path(args["train"]), test_file=Path(args["test"]), output_dir=Path(args["out"]),
        hyperparameters=hp, seed=hp.seed, report_checkpoint=on_checkpoint))
    print("finished without being killed", flush=True)
''')


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """This module trains: one torch thread (tests/conftest.py)."""


def _hp():
    from tuneforge.core.hyperparameters import ResolvedHyperparameters

    return ResolvedHyperparameters(**HYPERPARAMETERS)


def _context(spec, model_dir, data, output_dir, progress, resume_from=None):
    from tuneforge.training import TrainingContext

    hp = _hp()
    return TrainingContext(job_id=JOB, base_model=spec, model_dir=model_dir, train_file=data[0], test_file=data[1],
                           output_dir=output_dir, hyperparameters=hp, seed=hp.seed,
                           report_progress=progress.append, resume_from=resume_from)


def _losses(progress) -> dict[int, float]:
    return {p.step: p.train_loss for p in progress if p.train_loss is not None}


def _weights(adapter_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _start_child(args: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                                stderr=err, env=env)


def _kill_after_checkpoint(child: subprocess.Popen, log: Path) -> list[int]:
    """Wait until the child uploaded the checkpoint at KILL_AFTER_STEP, SIGKILL it; the steps it
    reported uploading."""
    uploaded = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = child.stdout.readline().decode()
            if not line:
                break
            if line.startswith("uploaded "):
                uploaded.append(int(line.split()[1]))
                if uploaded[-1] >= KILL_AFTER_STEP:
                    child.send_signal(signal.SIGKILL)
                    break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, (child.returncode, log.read_text()[-3000:])
    return uploaded


def test_a_killed_run_resumed_from_the_store_ends_like_the_straight_run(tmp_path):
    from test_sft_training import make_conversations, write_jsonl

    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin
    from tuneforge_builtin.sft import SFT

    spec = get_registry().base_model(CATALOG_ID)
    model_dir = make_standin(spec, tmp_path / "models", seed=0)
    rows = make_conversations(28, seed=1)
    data = (write_jsonl(tmp_path / "train.jsonl", rows[:24]), write_jsonl(tmp_path / "test.jsonl", rows[24:]))
    store = ArtifactStore(str(tmp_path / "artifacts"))

    # The run killed at step 4, in a subprocess, uploading as the worker does.
    args = dict(store=str(tmp_path / "artifacts"), ws=WS, job=JOB, model=CATALOG_ID, model_dir=str(model_dir),
                train=str(data[0]), test=str(data[1]), out=str(tmp_path / "killed"), kill_after=KILL_AFTER_STEP,
                hp={**HYPERPARAMETERS, "lora_target_modules": list(HYPERPARAMETERS["lora_target_modules"])})
    child = _start_child(args, tmp_path / "child.log")
    # meanwhile (a second core), the straight run
    straight_progress, resumed_progress = [], []
    straight = SFT.train(_context(spec, model_dir, data, tmp_path / "straight", straight_progress))
    assert _kill_after_checkpoint(child, tmp_path / "child.log") == [4]

    # A kill mid-upload: step 8's files partly there, no completion marker. And a checkpoint whose
    # marker says step 6 but whose bytes are not what was uploaded.
    good = w.checkpoint_key(WS, JOB, 1, 4)
    torn = w.checkpoint_key(WS, JOB, 1, 8)
    store.put_bytes(f"{torn}/trainer_state.json", store.get_bytes(f"{good}/trainer_state.json"))
    store.put_bytes(f"{torn}/adapter_model.safetensors", store.get_bytes(f"{good}/adapter_model.safetensors")[:100])
    corrupt = w.checkpoint_key(WS, JOB, 1, 6)
    for key in store.list(good):
        store.put_bytes(corrupt + key[len(good):], store.get_bytes(key))
    marker = json.loads(store.get_bytes(f"{corrupt}/{w.CHECKPOINT_MARKER}"))
    marker["step"] = 6
    store.put_bytes(f"{corrupt}/{w.CHECKPOINT_MARKER}", json.dumps(marker).encode())
    optimizer = f"{corrupt}/optimizer.pt"
    store.put_bytes(optimizer, bytes(b ^ 0xFF for b in store.get_bytes(optimizer)[:64]) + store.get_bytes(optimizer)[64:])

    # The worker's choice for attempt 2: the latest complete checkpoint that verifies.
    candidates = w.complete_checkpoints(store, WS, JOB, before_attempt=2)
    assert [(c.attempt, c.step) for c in candidates] == [(1, 6), (1, 4)]  # torn step 8: no marker
    assert w.complete_checkpoints(store, WS, JOB, before_attempt=1) == []
    with pytest.raises(w.CheckpointError, match="optimizer.pt differs"):
        w.download_checkpoint(store, candidates[0], tmp_path / "resume-6")
    resume_dir = w.download_checkpoint(store, candidates[1], tmp_path / "resume")
    assert json.loads((resume_dir / "trainer_state.json").read_text())["global_step"] == 4

    resumed = SFT.train(_context(spec, model_dir, data, tmp_path / "resumed", resumed_progress,
                                 resume_from=resume_dir))

    assert straight.steps == resumed.steps == 12 and not resumed.cancelled
    straight_losses, resumed_losses = _losses(straight_progress), _losses(resumed_progress)
    assert sorted(resumed_losses) == list(range(5, 13))  # continued after step 4, not from 0
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(straight_losses[step], rel=LOSS_TOLERANCE), step
    a, b = _weights(straight.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_TOLERANCE, worst
    # ... and training did move the weights (the comparison is not between two untouched inits).
    initial = _weights(resume_dir)
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-3


def test_attempt_numbers_survive_a_reset_delivery_count():
    assert w.next_attempt(1, []) == 1
    assert w.next_attempt(3, [1, 2]) == 3
    assert w.next_attempt(1, [1, 2]) == 3  # the consumer was recreated: JetStream counts from 1 again
    assert w.redelivery_backoff(60) == [60, 120, 240, 480]
    assert w.redelivery_backoff(400) == [400, 600, 600, 600]


# ---------------------------------------------------------------------------------------------
# fencing: a stale attempt's late events change nothing


def _conversations(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"fencing question {i}"},
                                              {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
    return path


async def test_a_stale_attempt_cannot_change_the_job(services, tmp_path):
    from conftest import ADMIN

    from tuneforge import sdk
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
    from tuneforge.core import subjects
    from tuneforge.core.client import Clients
    from tuneforge.quickstart import create_workspace

    endpoints, settings = services
    services.apps["trainer"].worker.stop()  # this test plays the workers' part itself
    await asyncio.sleep(1.5)  # its fetch loop ends within a second
    bus = services.apps["job-scheduler"].bus
    reply = await create_workspace(endpoints, ADMIN, common_pb2.PLAN_ENTERPRISE, "owner@example.com", "W")
    ws_id = reply.workspace.id
    clients = Clients.connect(endpoints, reply.api_key)
    watch = None
    try:
        await sdk.wait_until_authorised(clients)
        await sdk.import_file(clients, _conversations(tmp_path / "a.jsonl", 230))
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
            name="fenced", base_model="llama-3.2-1b", method="sft")))
        job_id = created.job.id
        seen: list = []
        watch = asyncio.create_task(sdk.watch_job(clients, job_id, seen.append, timeout=90))

        async def wait_for(predicate, what):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if predicate(seen):
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}: {[e.message for e in seen]}")

        await wait_for(lambda es: any(e.state == js.JOB_STATE_QUEUED for e in es), "QUEUED")

        def meta():
            return bus.meta(ws_id, job_id)

        def progress(attempt, step):
            return ev.TrainingRunProgress(meta=meta(), attempt=attempt,
                                          progress=common_pb2.TrainingProgress(step=step, total_steps=20))

        await bus.publish(subjects.TRAINING_RUN_STARTED, ev.TrainingRunStarted(meta=meta(), attempt=1, worker_id="w1"))
        await bus.publish(subjects.TRAINING_RUN_CHECKPOINT, ev.TrainingRunCheckpoint(
            meta=meta(), attempt=1, step=5, artifact_path=w.checkpoint_key(ws_id, job_id, 1, 5)))
        await bus.publish(subjects.TRAINING_RUN_STARTED, ev.TrainingRunStarted(
            meta=meta(), attempt=2, worker_id="w2", resumed_from_step=5))
        # attempt 1's worker was not dead after all: its late reports
        await bus.publish(subjects.TRAINING_RUN_PROGRESS, progress(1, 7))
        await bus.publish(subjects.TRAINING_RUN_CHECKPOINT, ev.TrainingRunCheckpoint(
            meta=meta(), attempt=1, step=8, artifact_path=w.checkpoint_key(ws_id, job_id, 1, 8)))
        await bus.publish(subjects.TRAINING_RUN_SUCCEEDED, ev.TrainingRunSucceeded(
            meta=meta(), attempt=1, adapter_path=f"{w.attempt_prefix(ws_id, job_id, 1)}/adapter",
            metrics=common_pb2.TrainingMetrics(steps=20)))
        await bus.publish(subjects.TRAINING_RUN_FAILED, ev.TrainingRunFailed(
            meta=meta(), attempt=1, reason="stale", failure_kind=common_pb2.FAILURE_KIND_SYSTEM))
        await bus.publish(subjects.TRAINING_RUN_PROGRESS, progress(2, 6))  # after the stale ones, in order
        await wait_for(lambda es: any("step 6/20" in e.message for e in es), "attempt 2's progress")
        await asyncio.sleep(0.3)

        history = [e.message for e in seen]
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job_id))).job
        assert job.state == js.JOB_STATE_TRAINING and job.attempt == 2, history
        assert any("attempt 2 on w2 resumed from step 5" in m for m in history), history
        assert not any("step 7/20" in m or "step 8" in m or "stale" in m for m in history), history
        assert not any(e.state in (js.JOB_STATE_REGISTERING, js.JOB_STATE_FAILED) for e in seen), history

        # attempt 2 finishes: its adapter (under its own prefix) is the one registered
        adapter = f"{w.attempt_prefix(ws_id, job_id, 2)}/adapter"
        store = ArtifactStore(settings.resolved_artifact_url())
        for attempt, fill in ((1, b"\1"), (2, b"\2")):  # what each attempt's worker wrote
            prefix = f"{w.attempt_prefix(ws_id, job_id, attempt)}/adapter"
            store.put_bytes(f"{prefix}/adapter_config.json", b'{"peft_type": "LORA"}')
            store.put_bytes(f"{prefix}/adapter_model.safetensors", fill * 16)
        await bus.publish(subjects.TRAINING_RUN_SUCCEEDED, ev.TrainingRunSucceeded(
            meta=meta(), attempt=2, adapter_path=adapter, metrics=common_pb2.TrainingMetrics(steps=20)))
        final = await asyncio.wait_for(watch, 60)
        assert final[-1].state == js.JOB_STATE_SUCCEEDED, [e.message for e in final]
        model = (await clients.model_registry.GetModel(mr.GetModelRequest(model="fenced"))).model
        assert store.get_bytes(f"{model.adapter_path}/adapter_model.safetensors") == b"\2" * 16  # attempt 2's
    finally:
        if watch is not None and not watch.done():
            watch.cancel()
        await clients.close()


# ---------------------------------------------------------------------------------------------
# the worker's own decisions (a stand-in method and a recording bus: no torch, no NATS)


class _RecordingBus:
    def __init__(self):
        self.published: list[tuple[str, object]] = []

    def meta(self, workspace_id, job_id=""):
        from tuneforge.api.events.v1 import events_pb2 as ev

        return ev.EventMeta(event_id=f"e{len(self.published)}", workspace_id=workspace_id, job_id=job_id)

    async def publish(self, subject, message, **_):
        self.published.append((subject, message))


class _FlakyResumeMethod:
    """Trains (writes an adapter) from scratch; raises if asked to resume, as a checkpoint that
    does not load would."""

    name = "flaky-resume-test"
    display_name = "test"
    dataset_kind = "conversations"

    def __init__(self):
        self.resumed_from: list = []

    def validate_options(self, options):
        return options

    def train(self, context):
        from tuneforge.training import TrainingResult

        self.resumed_from.append(context.resume_from)
        if context.resume_from is not None:
            raise RuntimeError("Error(s) in loading state_dict: size mismatch")
        adapter = Path(context.output_dir) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"weights")
        return TrainingResult(adapter_dir=adapter, steps=8, epochs=1.0, train_loss=1.0, eval_loss=None,
                              stopped_early=False)


@pytest.fixture
def worker_env(tmp_path):
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.core.settings import Settings
    from tuneforge.plugins import get_registry

    method = _FlakyResumeMethod()
    registry = get_registry()
    registry.methods[method.name] = method
    settings = Settings(data_dir=tmp_path / "state", model_store=tmp_path / "models", worker_id="w-test")
    (tmp_path / "models" / CATALOG_ID).mkdir(parents=True)
    (tmp_path / "models" / CATALOG_ID / "config.json").write_text("{}")
    (tmp_path / "models" / CATALOG_ID / "model.safetensors").write_bytes(b"")  # never loaded: the method is fake
    bus = _RecordingBus()
    trainer = w.TrainingWorker(settings, bus)
    trainer.store.put_bytes("datasets/ws/ds/train.jsonl", b"{}\n")
    request = ev.TrainingRunRequested(
        meta=ev.EventMeta(event_id="r", workspace_id=WS, job_id=JOB), base_model=CATALOG_ID, method=method.name,
        hyperparameters=common_pb2.Hyperparameters(), dataset=common_pb2.DatasetSummary(artifact_path="datasets/ws/ds"))
    try:
        yield trainer, bus, request, method
    finally:
        registry.methods.pop(method.name, None)


def _fake_checkpoint(store, attempt: int, step: int, tmp_path: Path) -> None:
    local = tmp_path / f"ckpt-{attempt}-{step}"
    local.mkdir()
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (local / "adapter_model.safetensors").write_bytes(b"x" * 32)
    assert w.upload_checkpoint(store, local, w.checkpoint_key(WS, JOB, attempt, step), step)


async def test_a_checkpoint_that_does_not_load_falls_back_to_step_0_and_says_so(worker_env, tmp_path):
    from tuneforge.core import subjects

    trainer, bus, request, method = worker_env
    _fake_checkpoint(trainer.store, 1, 4, tmp_path)
    trainer.store.put_bytes(f"{w.attempt_prefix(WS, JOB, 1)}/{w.ATTEMPT_MARKER}", b"{}")
    msg = WorkMsg(request, delivered=2)
    await trainer.handle(msg)
    assert msg.acks == 1
    assert [p is not None for p in method.resumed_from] == [True, False]  # step 4 failed to load, then 0
    started = [m.resumed_from_step for s, m in bus.published if s == subjects.TRAINING_RUN_STARTED]
    assert started == [4, 0]  # the job's events say both
    (subject, succeeded), = [(s, m) for s, m in bus.published if s != subjects.TRAINING_RUN_STARTED]
    assert subject == subjects.TRAINING_RUN_SUCCEEDED and succeeded.attempt == 2
    assert succeeded.adapter_path == f"{w.attempt_prefix(WS, JOB, 2)}/adapter"  # its own attempt's prefix
    assert w.started_attempts(trainer.store, WS, JOB) == [1, 2]

    # The ack was lost and the item comes back: the stored result goes out again, no training.
    again = WorkMsg(request, delivered=3)
    await trainer.handle(again)
    assert again.acks == 1 and len(method.resumed_from) == 2
    assert bus.published[-1] == (subjects.TRAINING_RUN_SUCCEEDED, succeeded)


async def test_the_delivery_after_the_last_attempt_fails_the_job_without_training(worker_env, tmp_path):
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.core import subjects

    trainer, bus, request, method = worker_env
    for attempt in range(1, w.MAX_ATTEMPTS + 1):  # every attempt started, none finished
        trainer.store.put_bytes(f"{w.attempt_prefix(WS, JOB, attempt)}/{w.ATTEMPT_MARKER}", b"{}")
    _fake_checkpoint(trainer.store, 2, 6, tmp_path)
    msg = WorkMsg(request, delivered=2)  # a recreated consumer counts deliveries from 1 again: still attempt 5
    await trainer.handle(msg)
    assert msg.acks == 1 and method.resumed_from == []
    (subject, failed), = bus.published
    assert subject == subjects.TRAINING_RUN_FAILED and failed.attempt == w.MAX_ATTEMPTS + 1
    assert failed.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
    assert failed.reason == f"the trainer stopped during {w.MAX_ATTEMPTS} attempts (last checkpoint at step 6); giving up"
