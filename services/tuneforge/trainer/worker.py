"""The training worker: pulls ``training.run.requested`` from the work queue, runs the job's
method with heartbeats, reports progress, writes the adapter, and acks only when done.

A worker that dies leaves its message un-acked: JetStream redelivers it to another worker with a
higher attempt number, and the scheduler ignores the older attempt's reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import threading
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import hyperparameters as hp
from tuneforge.core import subjects
from tuneforge.core.bus import Bus
from tuneforge.core.settings import Settings
from tuneforge.core.storage import ArtifactStore
from tuneforge.plugins import get_registry
from tuneforge.training import CheckpointReport, ProgressReport, TrainingContext, TrainingResult
from tuneforge.training import finite_metrics as extra_metrics  # a result's metrics as TrainingMetrics.extra

log = logging.getLogger(__name__)
WORK_CONSUMER = "trainers"
MAX_DELIVER = 5
PROGRESS_MIN_INTERVAL = 0.5


SAMPLE_FIELDS = ("prompt_json", "prompt", "reference", "base_answer", "tuned_answer")


def training_metrics(result: TrainingResult, train_seconds: float) -> common_pb2.TrainingMetrics:
    """A method's result as the ``TrainingMetrics`` that reach the scheduler, the registry and the
    email: losses, the comparison with the base model (non-finite values left out), the samples."""
    metrics = common_pb2.TrainingMetrics(steps=result.steps, epochs=result.epochs,
                                         stopped_early=result.stopped_early, train_seconds=train_seconds)
    for field in ("train_loss", "eval_loss", "base_eval_loss", "tool_call_accuracy", "base_tool_call_accuracy"):
        value = getattr(result, field)
        if value is not None and math.isfinite(value):
            setattr(metrics, field, float(value))
    metrics.extra.update(extra_metrics(result.metrics))
    for sample in result.samples:
        metrics.samples.add(**{name: str(sample.get(name) or "") for name in SAMPLE_FIELDS})
    return metrics


class UserDataError(Exception):
    """The job cannot train because of its data or settings."""


@dataclasses.dataclass
class WorkerStatus:
    worker_id: str
    start_time: float
    current_job_id: str = ""
    current_attempt: int = 0
    current_step: int = 0
    runs_completed: int = 0


class TrainingWorker:
    def __init__(self, settings: Settings, bus: Bus):
        self.settings = settings
        self.bus = bus
        self.store = ArtifactStore(settings.resolved_artifact_url())
        self.model_store = settings.resolved_model_store()
        self.work_root = (settings.data_dir / "trainer-work").resolve()
        self.status = WorkerStatus(worker_id=settings.worker_id or f"{socket.gethostname()}-{os.getpid()}",
                                   start_time=time.time())
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        js = self.bus.js
        await js.add_consumer(
            subjects.WORK_STREAM,
            api.ConsumerConfig(
                durable_name=WORK_CONSUMER,
                ack_policy=api.AckPolicy.EXPLICIT,
                filter_subject=subjects.TRAINING_RUN_REQUESTED,
                ack_wait=self.settings.training_ack_wait_seconds,
                max_deliver=MAX_DELIVER,
                max_ack_pending=1000,
            ),
        )
        cancel_sub = await self.bus.nc.subscribe(subjects.TRAINING_RUN_CANCEL_REQUESTED, cb=self._on_cancel)
        psub = await js.pull_subscribe_bind(durable=WORK_CONSUMER, stream=subjects.WORK_STREAM)
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                for msg in msgs:
                    await self.handle(msg)
        finally:
            await cancel_sub.unsubscribe()
            try:
                await psub.unsubscribe()
            except Exception:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            event = ev.TrainingRunCancelRequested.FromString(msg.data)
        except Exception:
            return
        with self._cancel_lock:
            self._cancelled.add(event.meta.job_id)

    def _is_cancelled(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancelled

    async def handle(self, msg: Msg) -> None:
        try:
            request = ev.TrainingRunRequested.FromString(msg.data)
        except Exception:
            log.exception("undecodable work item; terminating it")
            await msg.term()
            return
        meta = request.meta
        attempt = msg.metadata.num_delivered if msg.metadata else 1
        job_id, workspace_id = meta.job_id, meta.workspace_id
        self.status.current_job_id, self.status.current_attempt, self.status.current_step = job_id, attempt, 0
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            await self.bus.publish(subjects.TRAINING_RUN_STARTED, ev.TrainingRunStarted(
                meta=self.bus.meta(workspace_id, job_id), attempt=attempt, worker_id=self.status.worker_id))
            result_event = await self._train(request, attempt)
            await self.bus.publish(
                subjects.TRAINING_RUN_CANCELLED if isinstance(result_event, ev.TrainingRunCancelled)
                else subjects.TRAINING_RUN_SUCCEEDED,
                result_event,
            )
        except UserDataError as exc:
            await self._report_failure(workspace_id, job_id, attempt, str(exc), common_pb2.FAILURE_KIND_USER)
        except Exception as exc:
            log.exception("training %s (attempt %s) failed", job_id, attempt)
            await self._report_failure(workspace_id, job_id, attempt, f"training failed: {type(exc).__name__}: {exc}",
                                       common_pb2.FAILURE_KIND_SYSTEM)
        finally:
            heartbeat.cancel()
            self.status.current_job_id, self.status.current_attempt = "", 0
            self.status.runs_completed += 1
        await msg.ack()

    async def _report_failure(self, workspace_id, job_id, attempt, reason, kind) -> None:
        await self.bus.publish(subjects.TRAINING_RUN_FAILED, ev.TrainingRunFailed(
            meta=self.bus.meta(workspace_id, job_id), attempt=attempt, reason=reason, failure_kind=kind))

    async def _heartbeat(self, msg: Msg) -> None:
        interval = max(0.2, min(self.settings.training_heartbeat_seconds, self.settings.training_ack_wait_seconds / 3))
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    async def _train(self, request: ev.TrainingRunRequested, attempt: int):
        meta = request.meta
        job_id, workspace_id = meta.job_id, meta.workspace_id
        registry = get_registry()
        spec = registry.base_models.get(request.base_model)
        method = registry.methods.get(request.method)
        if spec is None or method is None:
            raise UserDataError(f"this worker has no plugin for base model {request.base_model!r} / method {request.method!r}")
        model_dir = self.model_store / spec.id
        if not (model_dir / "config.json").exists():
            raise RuntimeError(
                f"no weights for {spec.id} in the model store {self.model_store} "
                f"(place them there, or `tuneforge models make-standin {spec.id}` for a tiny stand-in)"
            )
        try:
            options = method.validate_options(json.loads(request.method_options_json or "{}"))
        except ValueError as exc:
            raise UserDataError(f"invalid method options: {exc}") from exc
        resolved = hp.resolve(
            hp.from_proto(request.hyperparameters),
            available_modules=spec.lora_target_modules,
            default_modules=spec.default_lora_target_modules,
        )
        work = self.work_root / job_id / f"attempt-{attempt}"
        if work.exists():
            shutil.rmtree(work)
        data_dir = work / "data"
        dataset_prefix = request.dataset.artifact_path
        await asyncio.to_thread(self.store.get_dir, dataset_prefix, data_dir)
        loop = asyncio.get_running_loop()
        last_sent = [0.0]

        def publish_threadsafe(subject, message) -> None:
            asyncio.run_coroutine_threadsafe(self.bus.publish(subject, message), loop).result(timeout=30)

        def on_progress(report: ProgressReport) -> None:
            self.status.current_step = report.step
            now = time.monotonic()
            final = report.step >= report.total_steps
            if report.eval_loss is None and not final and now - last_sent[0] < PROGRESS_MIN_INTERVAL:
                return
            last_sent[0] = now
            progress = common_pb2.TrainingProgress(step=report.step, total_steps=report.total_steps, epoch=report.epoch)
            for field in ("train_loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds"):
                value = getattr(report, field)
                if value is not None:
                    setattr(progress, field, float(value))
            publish_threadsafe(subjects.TRAINING_RUN_PROGRESS, ev.TrainingRunProgress(
                meta=self.bus.meta(workspace_id, job_id), attempt=attempt, progress=progress))

        def on_checkpoint(report: CheckpointReport) -> None:
            key = f"runs/{workspace_id}/{job_id}/attempt-{attempt}/checkpoints/step-{report.step}"
            self.store.put_dir(report.path, key)
            event = ev.TrainingRunCheckpoint(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                             step=report.step, artifact_path=key)
            if report.eval_loss is not None:
                event.eval_loss = report.eval_loss
            publish_threadsafe(subjects.TRAINING_RUN_CHECKPOINT, event)

        context = TrainingContext(
            job_id=job_id,
            base_model=spec,
            model_dir=model_dir,
            train_file=data_dir / "train.jsonl",
            test_file=data_dir / "test.jsonl",
            output_dir=work / "output",
            hyperparameters=resolved,
            method_options=options,
            seed=resolved.seed,
            report_progress=on_progress,
            report_checkpoint=on_checkpoint,
            should_stop=lambda: self._is_cancelled(job_id),
        )
        started = time.monotonic()
        result = await asyncio.to_thread(method.train, context)
        elapsed = time.monotonic() - started
        adapter_key = f"runs/{workspace_id}/{job_id}/attempt-{attempt}/adapter"
        await asyncio.to_thread(self.store.put_dir, result.adapter_dir, adapter_key)
        # Checkpoints and the adapter are in the artifact store now: the local copy can go.
        await asyncio.to_thread(shutil.rmtree, work, True)
        if result.cancelled:
            return ev.TrainingRunCancelled(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                           adapter_path=adapter_key, step=result.steps)
        metrics = training_metrics(result, elapsed)
        return ev.TrainingRunSucceeded(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                       adapter_path=adapter_key, metrics=metrics)
