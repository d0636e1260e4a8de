"""A training run's report (trainer/report.py): loss.png and report.json from a run's history.

1. From a synthetic history: the PNG is a real 800x500 PNG, report.json holds the figures, the best
   checkpoint is the kept one with the lowest eval loss; the history merges a step's train log and
   its evaluation, and skips what a resumed run must not count twice.
2. Through the worker, with real training: attempt 1 is stopped right after its checkpoint is
   uploaded, attempt 2 resumes from it; attempt 2's report still starts at step 1 and holds every
   step once (HF Trainer saved the earlier steps' log history in the checkpoint's trainer state).
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest

from tuneforge.api.common.v1 import common_pb2
from tuneforge.core.storage import ArtifactStore
from tuneforge.trainer import report as r
from conftest import WorkMsg


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_device() -> tuple[str, int]:
    """What the worker must report here: the methods train on CUDA whenever it is available."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}", torch.cuda.device_count()
    return "cpu", 1


def _synthetic_history() -> r.RunHistory:
    """12 steps: train loss every step, evaluations at 4, 8 and 12 (best at 8), a warmup then decay."""
    history = r.RunHistory()
    for step in range(1, 13):
        history.add(step, epoch=step / 6, train_loss=2.0 - 0.1 * step, learning_rate=1e-4 * min(1.0, step / 3))
    for step, loss in ((4, 1.9), (8, 1.5), (12, 1.7)):
        history.add(step, epoch=step / 6, eval_loss=loss)  # a separate log entry at the same step
    return history


def _metrics() -> common_pb2.TrainingMetrics:
    m = common_pb2.TrainingMetrics(steps=12, epochs=2.0, train_loss=0.8, eval_loss=1.7, base_eval_loss=2.4,
                                   tool_call_accuracy=0.5, base_tool_call_accuracy=0.25, train_seconds=30.0)
    m.extra.update({"tokens_per_second": 120.5, "best_eval_loss": 1.5})
    m.samples.add(prompt="Where is my parcel?", reference="In transit.", base_answer="?", tuned_answer="In transit.")
    return m


def test_report_json_has_the_figures_and_the_png_is_800x500(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    dataset = common_pb2.DatasetSummary(dataset_id="ds_1", train_count=45, test_count=5, deduplicated_count=50)
    dataset.topic_counts.update({"billing": 30, "shipping": 20})
    checkpoints = [r.CheckpointMark(4, 1.9), r.CheckpointMark(8, 1.5), r.CheckpointMark(12, 1.7, adapter=True)]
    content = r.build_report(
        job_id="job_1", workspace_id="ws_1", attempt=1, outcome="succeeded", base_model="llama-3.2-1b", method="sft",
        hyperparameters={"learning_rate": 1e-4, "lora_target_modules": ("q_proj", "v_proj")}, dataset=dataset,
        history=_synthetic_history(), checkpoints=checkpoints, metrics=_metrics(), device_class="cpu",
        trained_tokens=3600, train_seconds=30.0)
    prefix = r.write_report(store, "runs/ws_1/job_1/attempt-1/report", content, job_name="support")

    png = store.get_bytes(f"{prefix}/{r.LOSS_PNG}")
    assert _png_size(png) == (800, 500)
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.verify()  # decodes: every chunk's CRC, the image data

    stored = json.loads(store.get_bytes(f"{prefix}/{r.REPORT_JSON}"))
    assert stored == json.loads(json.dumps(content))
    assert (stored["job_id"], stored["base_model"], stored["method"], stored["outcome"]) == (
        "job_1", "llama-3.2-1b", "sft", "succeeded")
    assert stored["hyperparameters"] == {"learning_rate": 1e-4, "lora_target_modules": ["q_proj", "v_proj"]}
    assert (stored["dataset"]["train_count"], stored["dataset"]["test_count"]) == (45, 5)
    assert stored["dataset"]["topic_counts"] == {"billing": 30, "shipping": 20}
    history = stored["history"]
    assert [p["step"] for p in history] == list(range(1, 13))
    assert history[7] == {"step": 8, "epoch": 8 / 6, "train_loss": 2.0 - 0.8, "eval_loss": 1.5,
                          "learning_rate": 1e-4}
    assert [p["step"] for p in history if p["eval_loss"] is not None] == [4, 8, 12]
    assert stored["checkpoints"] == [
        {"step": 4, "eval_loss": 1.9, "best": False, "adapter": False},
        {"step": 8, "eval_loss": 1.5, "best": True, "adapter": False},
        {"step": 12, "eval_loss": 1.7, "best": False, "adapter": True},
    ]
    assert stored["best_checkpoint"] == {"step": 8, "eval_loss": 1.5}
    metrics = stored["metrics"]
    assert (metrics["steps"], metrics["eval_loss"], metrics["base_eval_loss"]) == (12, 1.7, 2.4)
    assert (metrics["tool_call_accuracy"], metrics["base_tool_call_accuracy"]) == (0.5, 0.25)
    assert metrics["samples"][0]["tuned_answer"] == "In transit."
    assert (stored["device_class"], stored["trained_tokens"], stored["train_seconds"]) == ("cpu", 3600, 30.0)
    assert stored["tokens_per_second"] == 120.5  # measured over the training loop, not the whole attempt


def test_best_checkpoint_is_the_lowest_eval_loss_among_the_kept_ones() -> None:
    marks = [r.CheckpointMark(3, 0.9), r.CheckpointMark(6, None), r.CheckpointMark(9, 0.7),
             r.CheckpointMark(12, 0.7, adapter=True)]
    assert r.best_checkpoint(marks) == r.CheckpointMark(9, 0.7)  # the earliest on a tie
    assert r.best_checkpoint([r.CheckpointMark(5, None), r.CheckpointMark(6, math.nan)]) is None
    assert r.best_checkpoint([]) is None


def test_history_merges_steps_and_skips_what_a_resume_would_count_twice() -> None:
    history = r.RunHistory()
    history.add_log_entries([
        {"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.5, "step": 1, "num_tokens": 100.0},
        {"eval_loss": 1.8, "epoch": 0.5, "step": 1},
        {"loss": float("nan"), "learning_rate": 1e-4, "epoch": 1.0, "step": 2},
        {"loss": 1.5, "epoch": 1.5, "step": 3},  # after the checkpoint: the resumed run logs it again
        {"train_runtime": 3.0, "train_loss": 1.7, "step": 2},  # the end-of-training summary
        "not an entry",
    ], up_to_step=2)
    assert [(p.step, p.train_loss, p.eval_loss, p.learning_rate) for p in history.points()] == [
        (1, 2.0, 1.8, 1e-4), (2, None, None, 1e-4)]
    assert history.eval_loss_at(1) == 1.8 and history.eval_loss_at(2) is None
    assert history.has_losses()
    history.clear()
    assert not history.has_losses() and history.points() == []


def test_a_report_without_losses_still_renders(tmp_path: Path) -> None:
    content = r.build_report(job_id="j", workspace_id="w", attempt=1, outcome="failed", base_model="b", method="dpo",
                             hyperparameters={}, dataset=None, history=r.RunHistory(), checkpoints=[],
                             reason="boom")
    assert content["best_checkpoint"] is None and content["history"] == [] and content["reason"] == "boom"
    assert _png_size(r.render_loss_png(content)) == (800, 500)
    assert r.plot_title(content) == "job j: DPO on b (failed)"


# ----------------------------------------------------------------------------------------------
# A resumed run's report, through the worker and real training.

WS, JOB = "ws-report", "job-report"
CATALOG_ID = "llama-3.2-1b"
STOP_AFTER_STEP = 3  # attempt 1 stops once this checkpoint is uploaded
HYPERPARAMETERS = dict(learning_rate=2e-2, batch_size=4, max_epochs=1, n_evals=2, n_checkpoints=2, lora_rank=4,
                       lora_alpha=8.0, early_stopping_patience=0, seed=5, min_examples=1)


@pytest.fixture(scope="module")
def standin_store(tmp_path_factory) -> Path:
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(CATALOG_ID), store)
    return store


class _RecordingBus:
    def __init__(self):
        self.published = []

    def meta(self, workspace_id, job_id="", *, event_id=""):
        from tuneforge.api.events.v1 import events_pb2 as ev

        return ev.EventMeta(event_id=event_id or "e", workspace_id=workspace_id, job_id=job_id)

    async def publish(self, subject, message):
        self.published.append((subject, message))


class _Stop(Exception):
    """Attempt 1 stops here, as a crashed worker would (its checkpoint is uploaded already)."""


def _rows(n: int) -> bytes:
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": f"Where is parcel {i}?"},
        {"role": "assistant", "content": f"Parcel {i} is in transit and arrives on day {i % 7 + 1}."}]}).encode() + b"\n"
        for i in range(n))


async def test_a_resumed_runs_report_starts_at_step_1(tmp_path: Path, standin_store: Path, one_torch_thread) -> None:
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.core import hyperparameters as hp
    from tuneforge.core import subjects
    from tuneforge.core.settings import Settings
    from tuneforge.plugins import get_registry
    from tuneforge.trainer import worker as w
    from tuneforge.training import TrainingContext

    settings = Settings(data_dir=tmp_path / "state", model_store=standin_store, worker_id="w-report")
    bus = _RecordingBus()
    trainer = w.TrainingWorker(settings, bus)
    trainer.store.put_bytes("datasets/ws/ds/train.jsonl", _rows(24))  # batch 4: 6 steps, a checkpoint at 3
    trainer.store.put_bytes("datasets/ws/ds/test.jsonl", _rows(2))
    request = ev.TrainingRunRequested(
        meta=ev.EventMeta(event_id="r", workspace_id=WS, job_id=JOB), base_model=CATALOG_ID, method="sft",
        hyperparameters=hp.to_proto(hp.ResolvedHyperparameters(**HYPERPARAMETERS)),
        dataset=common_pb2.DatasetSummary(dataset_id="ds", artifact_path="datasets/ws/ds", train_count=24,
                                          test_count=2))

    # Attempt 1 trains to the checkpoint at step 3, uploads it as the worker does, and stops.
    registry = get_registry()
    spec, method = registry.base_model(CATALOG_ID), registry.methods["sft"]
    resolved = hp.ResolvedHyperparameters(**HYPERPARAMETERS)
    data = tmp_path / "data"
    trainer.store.get_dir("datasets/ws/ds", data)
    trainer.store.put_bytes(f"{w.attempt_prefix(WS, JOB, 1)}/{w.ATTEMPT_MARKER}", b"{}")

    def upload_then_stop(report):
        if w.upload_checkpoint(trainer.store, report.path, w.checkpoint_key(WS, JOB, 1, report.step), report.step):
            raise _Stop(report.step)

    with pytest.raises(_Stop):
        method.train(TrainingContext(
            job_id=JOB, base_model=spec, model_dir=standin_store / CATALOG_ID, train_file=data / "train.jsonl",
            test_file=data / "test.jsonl", output_dir=tmp_path / "attempt-1", hyperparameters=resolved,
            seed=resolved.seed, report_checkpoint=upload_then_stop))
    assert [c.step for c in w.complete_checkpoints(trainer.store, WS, JOB)] == [STOP_AFTER_STEP]

    # Attempt 2 (the redelivery) resumes from it through the worker.
    msg = WorkMsg(request, delivered=2)
    await trainer.handle(msg)
    assert msg.acks == 1
    started = [m for s, m in bus.published if s == subjects.TRAINING_RUN_STARTED]
    assert [m.resumed_from_step for m in started] == [STOP_AFTER_STEP]
    (succeeded,) = [m for s, m in bus.published if s == subjects.TRAINING_RUN_SUCCEEDED]
    assert succeeded.report_path == f"{w.attempt_prefix(WS, JOB, 2)}/report"
    assert succeeded.device_class == expected_device()[0]
    # Real tokens of the steps attempt 2 trained (4 to 6), none of them padding.
    assert 0 < succeeded.trained_tokens < 24 * 40

    stored = json.loads(trainer.store.get_bytes(f"{succeeded.report_path}/{r.REPORT_JSON}"))
    steps = [p["step"] for p in stored["history"]]
    assert steps == list(range(1, 7)), steps  # from step 1, each step once
    assert all(p["train_loss"] is not None for p in stored["history"])
    assert stored["resumed_from_step"] == STOP_AFTER_STEP and stored["attempt"] == 2
    # Evaluations at 3 (attempt 1, from the checkpoint's trainer state) and 6 (attempt 2).
    assert [p["step"] for p in stored["history"] if p["eval_loss"] is not None] == [3, 6]
    assert [(c["step"], c["adapter"]) for c in stored["checkpoints"]] == [(3, False), (6, True)]
    assert stored["checkpoints"][0]["eval_loss"] == stored["history"][2]["eval_loss"]
    best = min(stored["checkpoints"], key=lambda c: c["eval_loss"])
    assert [c["best"] for c in stored["checkpoints"]] == [c is best for c in stored["checkpoints"]]
    assert stored["metrics"]["steps"] == 6 and stored["metrics"]["eval_loss"] == succeeded.metrics.eval_loss
    assert stored["trained_tokens"] == succeeded.trained_tokens
    assert stored["hyperparameters"]["batch_size"] == 4
    assert _png_size(trainer.store.get_bytes(f"{succeeded.report_path}/{r.LOSS_PNG}")) == (800, 500)


class _FailsAtStep4:
    """A method that logs three steps (an evaluation at 2), then fails as a broken run would."""

    name = "fails-at-step-4-test"
    display_name = "test"
    dataset_kind = "conversations"

    def validate_options(self, options):
        return options

    def train(self, context):
        from tuneforge.training import ProgressReport

        for step in (1, 2, 3):
            context.report_progress(ProgressReport(step=step, total_steps=6, epoch=step / 6, train_loss=3.0 - step / 2,
                                                   learning_rate=1e-4))
        context.report_progress(ProgressReport(step=2, total_steps=6, epoch=2 / 6, eval_loss=2.9))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_a_run_that_fails_after_logging_losses_keeps_its_report(tmp_path: Path) -> None:
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.core import subjects
    from tuneforge.core.settings import Settings
    from tuneforge.plugins import get_registry
    from tuneforge.trainer import worker as w

    method = _FailsAtStep4()
    registry = get_registry()
    registry.methods[method.name] = method
    try:
        settings = Settings(data_dir=tmp_path / "state", model_store=tmp_path / "models", worker_id="w-fail")
        (tmp_path / "models" / CATALOG_ID).mkdir(parents=True)
        (tmp_path / "models" / CATALOG_ID / "config.json").write_text("{}")  # never loaded: the method fails first
        (tmp_path / "models" / CATALOG_ID / "model.safetensors").write_bytes(b"")
        bus = _RecordingBus()
        trainer = w.TrainingWorker(settings, bus)
        trainer.store.put_bytes("datasets/ws/ds/train.jsonl", b"{}\n")
        request = ev.TrainingRunRequested(
            meta=ev.EventMeta(event_id="r", workspace_id=WS, job_id="job-fails"), base_model=CATALOG_ID,
            method=method.name, hyperparameters=common_pb2.Hyperparameters(batch_size=2),
            dataset=common_pb2.DatasetSummary(artifact_path="datasets/ws/ds", train_count=12))
        msg = WorkMsg(request, delivered=1)
        await trainer.handle(msg)
    finally:
        registry.methods.pop(method.name, None)
    assert msg.acks == 1
    (failed,) = [m for s, m in bus.published if s == subjects.TRAINING_RUN_FAILED]
    assert failed.failure_kind == common_pb2.FAILURE_KIND_SYSTEM and "illegal memory access" in failed.reason
    assert failed.report_path == f"{w.attempt_prefix(WS, 'job-fails', 1)}/report"
    stored = json.loads(trainer.store.get_bytes(f"{failed.report_path}/{r.REPORT_JSON}"))
    assert (stored["outcome"], stored["reason"]) == ("failed", failed.reason)
    assert [(p["step"], p["train_loss"], p["eval_loss"]) for p in stored["history"]] == [
        (1, 2.5, None), (2, 2.0, 2.9), (3, 1.5, None)]
    assert stored["metrics"] == {} and stored["checkpoints"] == [] and stored["best_checkpoint"] is None
    assert stored["hyperparameters"]["batch_size"] == 2  # resolved: every field
    assert stored["hyperparameters"]["learning_rate"] == 1e-4
    assert _png_size(trainer.store.get_bytes(f"{failed.report_path}/{r.LOSS_PNG}")) == (800, 500)
