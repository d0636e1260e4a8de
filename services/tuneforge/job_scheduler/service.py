"""job-scheduler: validates and persists jobs, drives their state machine from events, streams
their history, and owns workspaces and API keys."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import uuid
from collections import defaultdict

import grpc
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as pb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as pb_grpc
from tuneforge.core import capabilities
from tuneforge.core import hyperparameters as hp
from tuneforge.core import pools, subjects, telemetry
from tuneforge.core.datasets import describe_counts
from tuneforge.core.db import TableReader, utcnow
from tuneforge.core.errors import ServiceError, bad_request, not_found
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.rpc import Page, timestamp
from tuneforge.core import validation as val
from tuneforge.core.service import BaseService
from tuneforge.core.workspaces import hash_api_key, new_api_key
from tuneforge.job_scheduler import api_keys, capability_check, plan
from tuneforge.job_scheduler import state_machine as sm
from tuneforge.job_scheduler.models import (
    CheckpointRow, JobEventRow, JobRow, ThroughputRow, TrainerWorkerRow, WorkspaceSecretRow,
)
from tuneforge.plugins import base_model_messages, get_registry
from tuneforge.training import ALL_LORA_MODULES

log = logging.getLogger(__name__)
S = pb.JobState
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobSchedulerService"].full_name
# The read RPCs (GetJob, ListJobs, WatchJob) read through these: one SELECT on the event loop
# (core.db.Database.fast_read), no session, no thread hop, no ORM objects.
JOBS = TableReader(JobRow.__table__)
JOB_EVENTS = TableReader(JobEventRow.__table__)
JOB_PROTO_CACHE = 4096  # jobs kept as built messages (JobSchedulerServicer._to_proto)
LIST_RESPONSE_CACHE = 1024  # ListJobs pages kept as built answers (JobSchedulerServicer.ListJobs)



class JobScheduler(BaseService):
    name = "job-scheduler"
    admin_methods = (f"/{SERVICE_NAME}/CreateWorkspace",)
    admin_or_workspace_methods = tuple(f"/{SERVICE_NAME}/{m}" for m in ("CreateApiKey", "ListApiKeys", "RevokeApiKey"))

    def __init__(self, settings):
        super().__init__(settings)
        self._changed: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.dataset_builder = capability_check.DatasetBuilderLine(settings)  # asked by _validate

    async def on_stop(self) -> None:
        await self.dataset_builder.close()

    def grpc_services(self):
        return [(pb_grpc.add_JobSchedulerServiceServicer_to_server, JobSchedulerServicer(self), SERVICE_NAME)]

    async def on_start(self) -> None:
        await api_keys.backfill(self.db)  # keys created before key records existed
        handlers = {
            subjects.DATASET_BUILD_SUCCEEDED: self.on_dataset_built,
            subjects.DATASET_BUILD_FAILED: self.on_dataset_failed,
            subjects.TRAINING_RUN_STARTED: self.on_training_started,
            subjects.TRAINING_RUN_PROGRESS: self.on_training_progress,
            subjects.TRAINING_RUN_CHECKPOINT: self.on_training_checkpoint,
            subjects.TRAINING_RUN_SUCCEEDED: self.on_training_succeeded_measured,
            subjects.TRAINING_RUN_FAILED: self.on_training_failed,
            subjects.TRAINING_RUN_CANCELLED: self.on_training_cancelled,
            subjects.MODEL_REGISTRATION_SUCCEEDED: self.on_model_registered,
            subjects.MODEL_REGISTRATION_FAILED: self.on_registration_failed,
            subjects.TRAINER_WORKER_SEEN: self.on_worker_seen,
        }

        async def dispatch(subject, message, _msg):
            await retry_stale(lambda: handlers[subject](message))

        await self.bus.consume("job-scheduler", list(handlers), dispatch, on_dead_letter=self.on_dead_letter)
        self.spawn(self._sweep_pools_forever(), "job-scheduler-pool-sweep")

    async def _sweep_pools_forever(self) -> None:
        while True:
            await asyncio.sleep(POOL_SWEEP_SECONDS)
            try:
                await self.sweep_waiting_pools(utcnow())
            except asyncio.CancelledError:
                raise
            except Exception:  # the database restarting, etc.: the next sweep tries again
                log.warning("the pool sweep failed; next in %ss", POOL_SWEEP_SECONDS, exc_info=True)

    async def sweep_waiting_pools(self, now: dt.datetime) -> list[str]:
        """QUEUED jobs whose pool has lost its last live worker (no announcement for
        ``plan.LIVE_PERIODS`` periods) get their waiting reason back, with a job event: the
        announcements only ever say that a worker is there, never that it left. Returns the ids
        of the jobs it marked. Idempotent (several scheduler replicas may sweep at once)."""
        async with self.db.session() as session:
            waiting = (await session.execute(select(JobRow.id, JobRow.pool).where(
                JobRow.state == S.JOB_STATE_QUEUED, JobRow.state_reason == "",
                JobRow.pool.in_(list(pools.POOLS_BY_NAME))))).all()
            if not waiting:
                return []
            workers = await self._workers(session)
        unserved = {pool for _id, pool in waiting if not plan.workers_serving(workers, pool, now)}
        marked = []
        for job_id, pool in waiting:
            if pool not in unserved:
                continue

            async def mark(job_id=job_id):
                async with self.db.session() as session, session.begin():
                    job = await session.get(JobRow, job_id)
                    if job is None or job.state != S.JOB_STATE_QUEUED or job.state_reason:
                        return False
                    job.state_reason = pools.waiting_reason(job.pool)
                    await self._add_event(session, job, "message", job.state_reason)
                    return True
            if await retry_stale(mark):
                marked.append(job_id)
                self._changed_now(job_id)
        if marked:
            log.warning("no live trainer of pool(s) %s: %d queued job(s) wait", ", ".join(sorted(unserved)), len(marked))
        return marked

    # Events whose loss would leave a job waiting forever: given up, they fail the job instead.
    _DECISIVE = frozenset({
        subjects.DATASET_BUILD_SUCCEEDED, subjects.DATASET_BUILD_FAILED, subjects.TRAINING_RUN_SUCCEEDED,
        subjects.TRAINING_RUN_FAILED, subjects.TRAINING_RUN_CANCELLED, subjects.MODEL_REGISTRATION_SUCCEEDED,
        subjects.MODEL_REGISTRATION_FAILED,
    })

    async def on_dead_letter(self, subject: str, message, error: str) -> None:
        """An event the handlers gave up on (core.bus.RedeliveryPolicy): when it decided the job's
        next state, the job fails as a system error rather than staying where it is forever.
        Progress, checkpoints and 'started' only inform; losing one leaves the job correct."""
        if message is None or subject not in self._DECISIVE or not message.meta.job_id:
            return
        reason = f"an internal event ({subject.rsplit('.', 2)[-2]} {subject.rsplit('.', 1)[-1]}) could not be " \
                 f"processed after {self.bus.redelivery.max_deliver} attempts: {error}"
        await retry_stale(lambda: self._fail_job(message.meta, reason, common_pb2.FAILURE_KIND_SYSTEM))

    # -- helpers ---------------------------------------------------------------------------
    async def _job_for_update(self, session: AsyncSession, meta: ev.EventMeta) -> JobRow | None:
        job = await session.get(JobRow, meta.job_id)
        if job is None or job.workspace_id != meta.workspace_id:
            log.warning("event %s for unknown job %s", meta.event_id, meta.job_id)
            return None
        return job

    async def _add_event(self, session: AsyncSession, job: JobRow, kind: str, message: str, progress=None) -> None:
        last = (
            await session.execute(select(func.max(JobEventRow.sequence)).where(JobEventRow.job_id == job.id))
        ).scalar()
        session.add(
            JobEventRow(
                job_id=job.id,
                sequence=(last or 0) + 1,
                kind=kind,
                state=job.state,
                message=message,
                progress=progress.SerializeToString() if progress is not None else None,
            )
        )
        job.updated_at = utcnow()

    async def _transition(self, session: AsyncSession, job: JobRow, new_state: int, message: str = "") -> bool:
        """Move the job to ``new_state`` if the state machine allows it; False when it does not
        (a redelivered or stale event)."""
        if job.state == new_state or not sm.can_transition(job.state, new_state):
            return False
        old = job.state
        job.state = new_state
        job.state_reason = ""  # it explained the state left
        await self._add_event(
            session, job, "state_changed", message or f"{sm.name(old)} -> {sm.name(new_state)}"
        )
        return True

    def _changed_now(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()
        self.outbox.notify()

    def _spec(self, job: JobRow) -> pb.JobSpec:
        return pb.JobSpec.FromString(job.spec)

    def _dataset(self, job: JobRow) -> common_pb2.DatasetSummary:
        return common_pb2.DatasetSummary.FromString(job.dataset) if job.dataset else common_pb2.DatasetSummary()

    def _fail(self, session: AsyncSession, job: JobRow, reason: str, kind: int):
        job.failure_reason = reason
        job.failure_kind = kind
        spec = self._spec(job)
        self.outbox.add(
            session,
            subjects.JOB_FAILED,
            ev.JobFailed(
                meta=self.bus.meta(job.workspace_id, job.id),
                job_name=job.name,
                owner_email=job.notify_email,
                reason=reason,
                failure_kind=kind,
                report_path=job.report_path or "",
                failed_in_state=pb.JobState.Name(job.state),
                base_model=spec.base_model,
                method=spec.method,
            ),
        )

    def _succeed(self, session: AsyncSession, job: JobRow) -> None:
        spec = self._spec(job)
        msg = ev.JobSucceeded(
            meta=self.bus.meta(job.workspace_id, job.id),
            job_name=job.name,
            owner_email=job.notify_email,
            dataset_only=job.dataset_only,
            dataset=self._dataset(job),
            model_name=job.model_name,
            model_id=job.model_id,
            base_model=spec.base_model,
            method=spec.method,
            report_path=job.report_path or "",
            hyperparameters=common_pb2.Hyperparameters.FromString(job.resolved_hyperparameters),
        )
        if job.metrics:
            msg.metrics.CopyFrom(common_pb2.TrainingMetrics.FromString(job.metrics))
        self.outbox.add(session, subjects.JOB_SUCCEEDED, msg)

    # -- trainer pools (core/pools.py) ----------------------------------------------------
    def size_job(self, spec: pb.JobSpec, resolved, dataset=None) -> pools.Sizing | None:
        """The pool the job's training needs (``resolved``: its hyperparameters, dataclass or
        proto; ``dataset``: its DatasetSummary when known); None for a base model no plugin has."""
        base = get_registry().base_models.get(spec.base_model)
        if base is None:
            return None
        return pools.pool_for(
            base, model_store=self.settings.resolved_model_store(), method=spec.method,
            method_options_json=spec.method_options_json or "{}", batch_size=resolved.batch_size,
            lora_rank=resolved.lora_rank, lora_modules=tuple(resolved.lora_target_modules), dataset=dataset)

    async def _workers(self, session: AsyncSession) -> list[plan.Worker]:
        rows = (await session.execute(select(TrainerWorkerRow))).scalars().all()
        return [_worker(w) for w in rows]

    # -- event handlers (idempotent: the state machine rejects repeats) --------------------
    async def on_dataset_built(self, event: ev.DatasetBuildSucceeded) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or job.state != S.JOB_STATE_BUILDING_DATASET:
                return
            job.dataset = event.dataset.SerializeToString()
            d = event.dataset
            await self._add_event(
                session, job, "dataset_built",
                f"dataset {d.dataset_id}: {d.train_count} train / {d.test_count} test examples",
            )
            resolved = common_pb2.Hyperparameters.FromString(job.resolved_hyperparameters)
            total = d.train_count + d.test_count
            if job.dataset_only:
                await self._transition(session, job, S.JOB_STATE_SUCCEEDED, "dataset ready for download")
                self._succeed(session, job)
            elif total < resolved.min_examples:
                reason = (
                    f"training needs at least {resolved.min_examples} examples (min_examples) but only {total} "
                    f"remain: {describe_dataset_counts(d, self._spec(job))}. Add data, widen the topic "
                    f"filter, or lower min_examples; the dataset itself is ready to download."
                )
                self._fail(session, job, reason, common_pb2.FAILURE_KIND_USER)
                await self._transition(session, job, S.JOB_STATE_FAILED, reason)
            else:
                spec = self._spec(job)
                sizing = self.size_job(spec, resolved, d)
                pool = sizing.pool.name if sizing else pools.SMALL.name  # no plugin: the worker says so
                job.pool = pool
                await self._transition(
                    session, job, S.JOB_STATE_QUEUED,
                    f"waiting for a trainer of pool {pool}" + (f" (~{sizing.need_gib:,.1f} GiB)" if sizing else ""))
                if sizing:
                    log.info("job %s goes to pool %s: %s", job.id, pool, sizing.basis)
                if not plan.workers_serving(await self._workers(session), pool, utcnow()):
                    job.state_reason = pools.waiting_reason(pool)
                    await self._add_event(session, job, "message", job.state_reason)
                self.outbox.add(
                    session,
                    pools.work_subject(pool),
                    ev.TrainingRunRequested(
                        meta=self.bus.meta(job.workspace_id, job.id),
                        base_model=spec.base_model,
                        method=spec.method,
                        method_options_json=spec.method_options_json or "{}",
                        hyperparameters=resolved,
                        dataset=d,
                        job_name=job.name,
                        pool=pool,
                    ),
                )
        self._changed_now(event.meta.job_id)

    async def on_dataset_failed(self, event: ev.DatasetBuildFailed) -> None:
        await self._fail_job(event.meta, event.reason, event.failure_kind)

    async def _fail_job(self, meta: ev.EventMeta, reason: str, kind: int, report_path: str = "") -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, meta)
            if job is None or not sm.can_transition(job.state, S.JOB_STATE_FAILED):
                return
            if report_path:
                job.report_path = report_path
            self._fail(session, job, reason, kind)
            await self._transition(session, job, S.JOB_STATE_FAILED, reason)
        self._changed_now(meta.job_id)

    async def on_training_started(self, event: ev.TrainingRunStarted) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or event.attempt < job.attempt:
                return
            job.attempt = event.attempt
            if job.state == S.JOB_STATE_CANCELLED or job.cancel_requested:
                # Cancelled while queued: tell the worker again.
                self.outbox.add(
                    session,
                    subjects.TRAINING_RUN_CANCEL_REQUESTED,
                    ev.TrainingRunCancelRequested(meta=self.bus.meta(job.workspace_id, job.id)),
                )
            elif job.state == S.JOB_STATE_TRAINING:
                await self._add_event(session, job, "message", f"attempt {event.attempt} on {event.worker_id}"
                                      f" resumed from step {event.resumed_from_step}")
            else:
                await self._transition(
                    session, job, S.JOB_STATE_TRAINING,
                    f"training on {event.worker_id} (attempt {event.attempt})",
                )
        self._changed_now(event.meta.job_id)

    async def on_training_progress(self, event: ev.TrainingRunProgress) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or job.state != S.JOB_STATE_TRAINING or event.attempt < job.attempt:
                return
            job.progress = event.progress.SerializeToString()
            p = event.progress
            parts = [f"step {p.step}/{p.total_steps}"]
            if p.HasField("train_loss"):
                parts.append(f"loss {p.train_loss:.4f}")
            if p.HasField("eval_loss"):
                parts.append(f"eval loss {p.eval_loss:.4f}")
            await self._add_event(session, job, "progress", ", ".join(parts), progress=p)
        self._changed_now(event.meta.job_id)

    async def on_training_checkpoint(self, event: ev.TrainingRunCheckpoint) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or event.attempt < job.attempt:
                return
            exists = (
                await session.execute(
                    select(CheckpointRow).where(CheckpointRow.job_id == job.id, CheckpointRow.step == event.step)
                )
            ).scalar_one_or_none()
            if exists is None:
                session.add(
                    CheckpointRow(
                        job_id=job.id,
                        step=event.step,
                        eval_loss=event.eval_loss if event.HasField("eval_loss") else None,
                        artifact_path=event.artifact_path,
                    )
                )
                await self._add_event(session, job, "checkpoint", f"checkpoint at step {event.step}")
        self._changed_now(event.meta.job_id)

    async def on_training_succeeded(self, event: ev.TrainingRunSucceeded) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or event.attempt < job.attempt:
                return
            if not await self._transition(session, job, S.JOB_STATE_REGISTERING, "registering the model"):
                return
            job.metrics = event.metrics.SerializeToString()
            job.adapter_path = event.adapter_path
            job.report_path = event.report_path
            spec = self._spec(job)
            self.outbox.add(
                session,
                subjects.MODEL_REGISTRATION_REQUESTED,
                ev.ModelRegistrationRequested(
                    meta=self.bus.meta(job.workspace_id, job.id),
                    model_name=job.name,
                    description=spec.description,
                    base_model=spec.base_model,
                    method=spec.method,
                    dataset=self._dataset(job),
                    adapter_path=event.adapter_path,
                    metrics=event.metrics,
                    hyperparameters=common_pb2.Hyperparameters.FromString(job.resolved_hyperparameters),
                ),
            )
        self._changed_now(event.meta.job_id)

    async def on_training_failed(self, event: ev.TrainingRunFailed) -> None:
        async with self.db.session() as session:
            job = await session.get(JobRow, event.meta.job_id)
            if job is not None and event.attempt < job.attempt:
                return
        await self._fail_job(event.meta, event.reason, event.failure_kind, report_path=event.report_path)

    async def on_training_cancelled(self, event: ev.TrainingRunCancelled) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None:
                return
            if await self._transition(session, job, S.JOB_STATE_CANCELLED, f"training stopped at step {event.step}"):
                self.outbox.add(
                    session,
                    subjects.JOB_CANCELLED,
                    ev.JobCancelled(meta=self.bus.meta(job.workspace_id, job.id), job_name=job.name,
                                    owner_email=job.notify_email),
                )
        self._changed_now(event.meta.job_id)

    async def on_training_succeeded_measured(self, event: ev.TrainingRunSucceeded) -> None:
        """The run's throughput first (idempotent on its own; best effort: a measurement that
        cannot be kept never holds up the job), then the job's next state."""
        try:
            await self.record_throughput(event)
        except Exception:
            log.exception("job %s: the run's throughput could not be recorded", event.meta.job_id)
        await self.on_training_succeeded(event)

    async def record_throughput(self, event: ev.TrainingRunSucceeded) -> None:
        """Keep the run's tokens per second for its base model and device class, for the wall-time
        estimates of later dry runs (``plan.wall_time_estimates``). One row per job and attempt,
        so a redelivered event counts once; a run that did not say what it trained on, where or
        for how long is no measurement."""
        seconds = event.metrics.train_seconds
        if not (event.device_class and event.trained_tokens > 0 and seconds > 0 and event.meta.job_id):
            return
        try:
            async with self.db.session() as session, session.begin():
                job = await self._job_for_update(session, event.meta)
                if job is None:
                    return
                known = (await session.execute(select(ThroughputRow.id).where(
                    ThroughputRow.job_id == job.id, ThroughputRow.attempt == event.attempt))).first()
                if known is not None:
                    return
                session.add(ThroughputRow(
                    job_id=job.id, attempt=event.attempt, base_model=self._spec(job).base_model,
                    device_class=event.device_class[:200], trained_tokens=event.trained_tokens,
                    train_seconds=seconds, tokens_per_second=event.trained_tokens / seconds))
        except IntegrityError:  # the same run recorded concurrently (another replica): kept once
            log.info("throughput of job %s attempt %d recorded already", event.meta.job_id, event.attempt)

    async def on_worker_seen(self, event: ev.TrainerWorkerSeen) -> None:
        """A trainer worker is alive: keep when it was last seen (the announcement's own time, so
        an old announcement replayed from the stream does not make a gone worker look alive)."""
        if not event.worker_id:
            return
        now = utcnow()
        seen = event.meta.occurred_at.ToDatetime(dt.timezone.utc) if event.meta.HasField("occurred_at") else now
        seen = min(seen, now)  # a worker clock ahead of ours
        served = ",".join(p for p in event.pools if p in pools.POOLS_BY_NAME)[:512]
        async with self.db.session() as session, session.begin():
            row = await session.get(TrainerWorkerRow, event.worker_id[:128])
            if row is None:
                session.add(TrainerWorkerRow(
                    worker_id=event.worker_id[:128], device_class=event.device_class[:200] or "cpu",
                    device_count=event.device_count, period_seconds=event.period_seconds or 60, last_seen_at=seen,
                    pools=served, device_memory_bytes=event.device_memory_bytes))
            elif seen >= row.last_seen_at:
                row.device_class = event.device_class[:200] or "cpu"
                row.device_count = event.device_count
                row.period_seconds = event.period_seconds or 60
                row.last_seen_at = seen
                row.pools = served
                row.device_memory_bytes = event.device_memory_bytes
        if served and now - seen <= dt.timedelta(seconds=plan.LIVE_PERIODS * max(1, event.period_seconds or 60)):
            await self._pool_now_served(served.split(","), event.worker_id)

    async def _pool_now_served(self, served: list[str], worker_id: str) -> None:
        """A worker of these pools is alive: the QUEUED jobs that waited for one no longer do."""
        async with self.db.session() as session:
            waiting = (await session.execute(select(JobRow.id).where(
                JobRow.state == S.JOB_STATE_QUEUED, JobRow.pool.in_(served), JobRow.state_reason != ""))).scalars().all()
        for job_id in waiting:
            async def clear(job_id=job_id):
                async with self.db.session() as session, session.begin():
                    job = await session.get(JobRow, job_id)
                    if job is None or job.state != S.JOB_STATE_QUEUED or not job.state_reason:
                        return
                    job.state_reason = ""
                    await self._add_event(session, job, "message",
                                          f"a trainer of pool {job.pool} is registered ({worker_id[:128]})")
            await retry_stale(clear)
            self._changed_now(job_id)

    async def trainer_hardware(self, base_model: str) -> tuple[list[plan.Worker], list[plan.Measurement]]:
        """The workers seen and the recent measured runs of ``base_model`` (``plan.MEASURED_RUNS``
        per device class, newest first)."""
        async with self.db.session() as session:
            workers = (await session.execute(select(TrainerWorkerRow))).scalars().all()
            rows = (await session.execute(
                select(ThroughputRow.device_class, ThroughputRow.tokens_per_second)
                .where(ThroughputRow.base_model == base_model)
                .order_by(ThroughputRow.created_at.desc(), ThroughputRow.id.desc())
                .limit(plan.MEASURED_RUNS * 40)  # recent runs are enough, however many there were
            )).all()
        per_class: dict[str, int] = defaultdict(int)
        measurements = []
        for device_class, rate in rows:
            per_class[device_class] += 1
            if per_class[device_class] <= plan.MEASURED_RUNS:
                measurements.append(plan.Measurement(base_model, device_class, rate))
        return [_worker(w) for w in workers], measurements

    async def on_model_registered(self, event: ev.ModelRegistrationSucceeded) -> None:
        async with self.db.session() as session, session.begin():
            job = await self._job_for_update(session, event.meta)
            if job is None or job.state != S.JOB_STATE_REGISTERING:
                return
            job.model_name = event.model_name
            job.model_id = event.model_id
            await self._transition(session, job, S.JOB_STATE_SUCCEEDED, f"model {event.model_name} registered")
            self._succeed(session, job)
        self._changed_now(event.meta.job_id)

    async def on_registration_failed(self, event: ev.ModelRegistrationFailed) -> None:
        await self._fail_job(event.meta, event.reason, event.failure_kind)

    # -- workspaces --------------------------------------------------------------------------
    async def publish_workspace(self, session: AsyncSession, row: WorkspaceSecretRow) -> ev.WorkspaceUpdated:
        update = ev.WorkspaceUpdated(
            meta=self.bus.meta(row.id),
            workspace_id=row.id,
            name=row.name,
            plan=row.plan,
            owner_email=row.owner_email,
            api_key_hashes=[h for h in row.api_key_hashes.split(",") if h],
            revision=row.revision,
        )
        self.outbox.add(session, subjects.WORKSPACE_UPDATED, update)
        return update


class JobSchedulerServicer(pb_grpc.JobSchedulerServiceServicer):
    def __init__(self, app: JobScheduler):
        self.app = app
        # (job id, row version) -> pb.Job: every change of a job row bumps its version
        # (models.JobRow.version), so an entry never goes stale; bounded, oldest out first.
        self._protos: dict[tuple[str, int], pb.Job] = {}
        self._get_responses: dict[tuple[str, int], pb.GetJobResponse] = {}  # (id, version) -> answer
        self._list_responses: dict[tuple, pb.ListJobsResponse] = {}  # (next token, *(id, version)) -> answer

    # -- catalog and validation --------------------------------------------------------------
    async def ListBaseModels(self, request, context):
        current_workspace()
        registry = get_registry()
        return pb.ListBaseModelsResponse(
            base_models=base_model_messages(),
            methods=sorted(registry.methods),
        )

    async def _validate(self, spec: pb.JobSpec, workspace, context) -> tuple[hp.ResolvedHyperparameters, list[str]]:
        registry = get_registry()
        _check_spec_bounds(spec)  # lengths, sizes, enums, control characters: before anything is looked up
        violations = val.Violations()
        if not NAME_RE.fullmatch(spec.name):
            violations.append(("spec.name", "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"))
        if len(spec.description) > 2000:
            violations.append(("spec.description", "at most 2000 characters"))
        for i, topic in enumerate(spec.topics):
            if not topic.strip() or len(topic) > 100:
                violations.append((f"spec.topics[{i}]", "a topic is 1-100 characters"))
        base = registry.base_models.get(spec.base_model)
        if base is None:
            violations.append(("spec.base_model", f"unknown base model {val.clip(spec.base_model)!r}; "
                               f"choose one of {', '.join(sorted(registry.base_models))}"))
        method = registry.methods.get(spec.method)
        if method is None:
            violations.append(("spec.method", f"unknown method {val.clip(spec.method)!r}; choose one of {', '.join(sorted(registry.methods))}"))
        else:
            options = val.json_object(violations, "spec.method_options_json", spec.method_options_json)
            try:
                if options is not None:
                    method.validate_options(options)
            except (ValueError, TypeError, ArithmeticError) as exc:  # a plugin's check, whatever the value
                violations.append(("spec.method_options_json", str(exc)))
        val.email(violations, "spec.notify_email", spec.notify_email, required=False)
        findings = capability_check.Findings()
        if base is not None and method is not None:  # can the base model take the data? (core.capabilities)
            findings = await capability_check.check(
                self.app.dataset_builder, base, list(spec.topics), method.dataset_kind,
                capabilities.catalog_of(registry.base_models), trains=workspace.can_train,
                metadata=capability_check.caller_authorization(context))
            if findings.violation:
                violations.append(("spec.base_model", findings.violation))
        resolved = None
        try:
            resolved = hp.resolve(
                hp.from_proto(spec.hyperparameters),
                available_modules=base.lora_target_modules if base else ALL_LORA_MODULES,
                default_modules=base.default_lora_target_modules if base else (),
            )
        except hp.HyperparameterError as exc:
            violations.extend((f"spec.hyperparameters.{v.field}", v.description) for v in exc.violations)
        if violations:
            raise bad_request("invalid job: " + "; ".join(f"{f}: {d}" for f, d in violations), violations)
        warnings = []
        if resolved.learning_rate > 1e-3:
            warnings.append("learning rate above 1e-3 may make training unstable or forget the base model's "
                            "knowledge; if training is unstable, reduce it 10x")
        if resolved.lora_alpha / resolved.lora_rank > 4:
            warnings.append("lora_alpha far above lora_rank gives the adapter a strong influence")
        if not workspace.can_train:
            warnings.append(f"the {workspace.plan_name} plan builds the dataset only; fine-tuning needs Enterprise")
        warnings.extend(findings.warnings)
        return resolved, warnings

    async def ValidateJob(self, request, context):
        """The resolved settings and warnings, and a dry run: the dataset the job would be built
        from now (``BuildDataset(dry_run)``, nothing stored), what training would do with it and
        how long it would take (job_scheduler/plan.py). When the dataset-builder cannot be asked
        the answer comes without the plans, with a warning saying so."""
        workspace = current_workspace()
        spec = request.spec
        resolved, warnings = await self._validate(spec, workspace, context)
        response = pb.ValidateJobResponse(
            resolved_hyperparameters=hp.to_proto(resolved),
            dataset_only=not workspace.can_train,
        )
        remaining = context.time_remaining() if context is not None else None
        summary, why_not = await plan.dry_run_dataset(
            self.app.dataset_builder, spec, resolved, capability_check.caller_authorization(context),
            deadline=None if remaining is None else remaining - 0.5)
        if workspace.can_train:  # where it would train: sized from the dry run's token counts when there are any
            await self._plan_pool(response, spec, resolved, summary)
        if summary is None:
            warnings.append(why_not)
            response.warnings.extend(warnings)
            return response
        response.dataset_plan.CopyFrom(plan.dataset_plan(summary))
        warnings.extend([w for w in summary.warnings if w not in warnings])  # what the build would warn about
        if workspace.can_train:
            refusal = plan.refusal_warning(resolved, summary, describe_dataset_counts(summary, spec))
            if refusal:
                warnings.append(refusal)
            if summary.train_count:
                training = plan.training_plan(resolved, summary.train_count, summary.test_count,
                                              summary.train_tokens.total)
                if summary.tokenizer:
                    base = get_registry().base_model(spec.base_model)
                    workers, measurements = await self.app.trainer_hardware(spec.base_model)
                    training.wall_time_estimates.extend(plan.wall_time_estimates(
                        training.total_training_tokens, spec.base_model, base.parameter_count, workers,
                        measurements, utcnow()))
                else:
                    warnings.append(f"no tokenizer for {spec.base_model} in the model store: the training tokens "
                                    "and the wall time cannot be estimated")
                response.training_plan.CopyFrom(training)
        response.warnings.extend(warnings)
        return response

    async def _plan_pool(self, response, spec, resolved, summary) -> None:
        sizing = await asyncio.to_thread(self.app.size_job, spec, resolved, summary)
        if sizing is None:
            return
        async with self.app.db.session() as session:
            workers = await self.app._workers(session)
        # No warning when no worker serves it (pool_plan.workers_registered says so; the CLI
        # words it): a worker's first announcement may simply not have arrived yet.
        response.pool_plan.CopyFrom(plan.pool_plan(sizing, workers, utcnow()))

    # -- jobs --------------------------------------------------------------------------------
    def _to_proto(self, job: JobRow) -> pb.Job:
        """The job as its message (shared: callers copy it into their response, never change it)."""
        key = (job.id, job.version)
        cached = self._protos.get(key)
        if cached is None:
            cached = self._protos[key] = self._build_proto(job)
            if len(self._protos) > JOB_PROTO_CACHE:
                del self._protos[next(iter(self._protos))]
        return cached

    def _build_proto(self, job: JobRow) -> pb.Job:
        out = pb.Job(
            id=job.id,
            spec=pb.JobSpec.FromString(job.spec),
            resolved_hyperparameters=common_pb2.Hyperparameters.FromString(job.resolved_hyperparameters),
            state=job.state,
            failure_reason=job.failure_reason,
            failure_kind=job.failure_kind,
            dataset_only=job.dataset_only,
            model_name=job.model_name,
            model_id=job.model_id,
            notify_email=job.notify_email,
            create_time=timestamp(job.created_at),
            update_time=timestamp(job.updated_at),
            attempt=job.attempt,
            report_path=job.report_path or "",
            pool=job.pool or "",
            state_reason=job.state_reason or "",
        )
        if job.dataset:
            out.dataset.ParseFromString(job.dataset)
        if job.progress:
            out.progress.ParseFromString(job.progress)
        if job.metrics:
            out.metrics.ParseFromString(job.metrics)
        return out

    async def _get_job(self, session: AsyncSession, job_id: str, workspace_id: str) -> JobRow:
        val.check("invalid request", lambda v: val.identifier(v, "job_id", job_id))
        job = await session.get(JobRow, job_id) if job_id else None
        if job is None or job.workspace_id != workspace_id:
            raise not_found(f"job {job_id!r}")
        return job

    async def _read_job(self, job_id: str, workspace_id: str):
        """The caller's job for a read-only answer (attributes as on ``JobRow``): a fast read when
        the database allows one, else through a session."""
        val.check("invalid request", lambda v: val.identifier(v, "job_id", job_id))
        rows = self.app.db.fast_read(JOBS, "id = ?", (job_id,)) if job_id else []
        if rows is None:
            async with self.app.db.session() as session:
                return await self._get_job(session, job_id, workspace_id)
        if not rows or rows[0].workspace_id != workspace_id:
            raise not_found(f"job {job_id!r}")
        return rows[0]

    async def CreateJob(self, request, context):
        workspace = current_workspace()
        app = self.app
        spec = request.spec
        val.check("invalid job", lambda v: val.text(v, "request_id", request.request_id, max_len=val.MAX_ID))
        if request.request_id:
            found = app.db.fast_read(JOBS, "workspace_id = ? AND request_id = ?", (workspace.id, request.request_id))
            if found is None:
                async with app.db.session() as session:
                    found = (
                        await session.execute(select(JobRow).where(
                            JobRow.workspace_id == workspace.id, JobRow.request_id == request.request_id))
                    ).scalars().all()
            if found:
                return pb.CreateJobResponse(job=self._to_proto(found[0]))
        resolved, warnings = await self._validate(spec, workspace, context)
        registry = get_registry()
        method = registry.method(spec.method)
        job_id = "job_" + uuid.uuid4().hex[:20]
        telemetry.set_log_context(job_id=job_id)  # this RPC's log lines and span name the job
        async with app.db.session() as session, session.begin():
            clash = (
                await session.execute(
                    select(JobRow.id).where(
                        JobRow.workspace_id == workspace.id,
                        JobRow.name == spec.name,
                        JobRow.state.not_in([S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED]),
                    )
                )
            ).first()
            if clash:
                raise ServiceError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"a job named {spec.name!r} already exists (it names the fine-tuned model); choose another name",
                    [("spec.name", "already used by another job in this workspace")],
                )
            job = JobRow(
                id=job_id,
                workspace_id=workspace.id,
                request_id=request.request_id or None,
                name=spec.name,
                spec=spec.SerializeToString(),
                resolved_hyperparameters=hp.to_proto(resolved).SerializeToString(),
                state=S.JOB_STATE_VALIDATING,
                dataset_only=not workspace.can_train,
                notify_email=spec.notify_email or workspace.owner_email,
            )
            session.add(job)
            await session.flush()  # the jobs row first: job_events references it
            # A new job's first events, numbered here: no max(sequence) look-up per event.
            first = [("state_changed", S.JOB_STATE_VALIDATING, "job accepted; validating")]
            first += [("message", S.JOB_STATE_VALIDATING, f"warning: {warning}") for warning in warnings]
            first.append(("state_changed", S.JOB_STATE_BUILDING_DATASET, "building the dataset"))
            session.add_all(JobEventRow(job_id=job_id, sequence=n, kind=kind, state=state, message=message)
                            for n, (kind, state, message) in enumerate(first, 1))
            job.state = S.JOB_STATE_BUILDING_DATASET
            job.updated_at = utcnow()
            app.outbox.add(
                session,
                subjects.DATASET_BUILD_REQUESTED,
                ev.DatasetBuildRequested(
                    meta=app.bus.meta(workspace.id, job_id),
                    topics=list(spec.topics),
                    method=spec.method,
                    dataset_kind=method.dataset_kind,
                    base_model=spec.base_model,
                    test_fraction=resolved.test_fraction,
                    seed=resolved.seed,
                    train_on_inputs=resolved.train_on_inputs,
                    overlength_policy=spec.overlength_policy,
                    max_epochs=resolved.max_epochs,
                ),
            )
        app._changed_now(job_id)
        job = await self._read_job(job_id, workspace.id)
        return pb.CreateJobResponse(job=self._to_proto(job), warnings=warnings)

    async def GetJob(self, request, context):
        workspace = current_workspace()
        _shed_if_expired(context)
        job = await self._read_job(request.job_id, workspace.id)
        # The answer itself is kept (no copy of the job into a new response per call); shared
        # like the job messages: grpc only serializes it.
        key = (job.id, job.version)
        response = self._get_responses.get(key)
        if response is None:
            response = self._get_responses[key] = pb.GetJobResponse(job=self._to_proto(job))
            if len(self._get_responses) > JOB_PROTO_CACHE:
                del self._get_responses[next(iter(self._get_responses))]
        return response

    async def ListJobs(self, request, context):
        workspace = current_workspace()
        _shed_if_expired(context)
        val.check("invalid request", lambda v: val.page(v, request))
        page = Page.of(request, default=50, maximum=200)
        size, offset = page.size, page.offset
        # Newest first; index ix_jobs_workspace_created serves the order (models.JobRow).
        rows = self.app.db.fast_read(JOBS, "workspace_id = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                                     (workspace.id, size + 1, offset))
        if rows is None:
            async with self.app.db.session() as session:
                rows = (
                    await session.execute(
                        select(JobRow)
                        .where(JobRow.workspace_id == workspace.id)
                        .order_by(JobRow.created_at.desc(), JobRow.id)
                        .offset(offset)
                        .limit(size + 1)
                    )
                ).scalars().all()
        # A page of the same jobs at the same versions is the same answer: kept, shared (grpc
        # only serializes it), as the job messages are. Job ids are unique across workspaces.
        token = page.next_token(len(rows))
        key = (token, *[(j.id, j.version) for j in rows[:size]])
        response = self._list_responses.get(key)
        if response is None:
            response = self._list_responses[key] = pb.ListJobsResponse(
                jobs=[self._to_proto(j) for j in rows[:size]], next_page_token=token)
            if len(self._list_responses) > LIST_RESPONSE_CACHE:
                del self._list_responses[next(iter(self._list_responses))]
        return response

    async def CancelJob(self, request, context):
        return await retry_stale(lambda: self._cancel(request))

    async def _cancel(self, request):
        workspace = current_workspace()
        app = self.app
        async with app.db.session() as session, session.begin():
            job = await self._get_job(session, request.job_id, workspace.id)
            if sm.is_terminal(job.state):
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"job already {sm.name(job.state)}")
            if job.state == S.JOB_STATE_REGISTERING:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "training has finished; the model is being registered")
            job.cancel_requested = True
            if job.state == S.JOB_STATE_TRAINING:
                await app._add_event(session, job, "message", "cancel requested; stopping at the next step")
            else:
                await app._transition(session, job, S.JOB_STATE_CANCELLED, "cancelled before training")
                app.outbox.add(
                    session,
                    subjects.JOB_CANCELLED,
                    ev.JobCancelled(meta=app.bus.meta(job.workspace_id, job.id), job_name=job.name,
                                    owner_email=job.notify_email),
                )
            app.outbox.add(
                session,
                subjects.TRAINING_RUN_CANCEL_REQUESTED,
                ev.TrainingRunCancelRequested(meta=app.bus.meta(job.workspace_id, job.id)),
            )
        app._changed_now(job.id)
        async with app.db.session() as session:
            return pb.CancelJobResponse(job=self._to_proto(await session.get(JobRow, job.id)))

    async def WatchJob(self, request, context):
        workspace = current_workspace()
        val.check("invalid request", lambda v: val.identifier(v, "job_id", request.job_id))
        app = self.app
        after = request.after_sequence
        job = await self._read_job(request.job_id, workspace.id)  # before a wake-up is registered
        while True:
            changed = app._changed[job.id]  # register before reading: no missed wake-up
            job = await self._read_job(job.id, workspace.id)
            rows = app.db.fast_read(JOB_EVENTS, "job_id = ? AND sequence > ? ORDER BY sequence", (job.id, after))
            if rows is None:
                async with app.db.session() as session:
                    rows = (
                        await session.execute(
                            select(JobEventRow)
                            .where(JobEventRow.job_id == job.id, JobEventRow.sequence > after)
                            .order_by(JobEventRow.sequence)
                        )
                    ).scalars().all()
            terminal = sm.is_terminal(job.state)
            if terminal:
                app._changed.pop(job.id, None)  # no change will come to pop it
            for row in rows:
                event = pb.JobEvent(
                    sequence=row.sequence, time=timestamp(row.time), kind=row.kind, state=row.state, message=row.message
                )
                if row.progress:
                    event.progress.ParseFromString(row.progress)
                yield pb.WatchJobResponse(event=event)
                after = row.sequence
            if terminal or request.history_only:
                return
            try:
                await asyncio.wait_for(changed.wait(), timeout=1.0)  # also polls: other replicas
            except asyncio.TimeoutError:
                pass

    async def ListCheckpoints(self, request, context):
        workspace = current_workspace()
        async with self.app.db.session() as session:
            job = await self._get_job(session, request.job_id, workspace.id)
            rows = (
                await session.execute(
                    select(CheckpointRow).where(CheckpointRow.job_id == job.id).order_by(CheckpointRow.step)
                )
            ).scalars().all()
        out = pb.ListCheckpointsResponse()
        for r in rows:
            cp = out.checkpoints.add(step=r.step, artifact_path=r.artifact_path, create_time=timestamp(r.created_at))
            if r.eval_loss is not None:
                cp.eval_loss = r.eval_loss
        return out

    # -- workspaces --------------------------------------------------------------------------
    async def CreateWorkspace(self, request, context):
        violations = val.Violations()
        if not request.name.strip() or len(request.name) > 200:
            violations.append(("name", "1-200 characters"))
        else:
            val.text(violations, "name", request.name, max_len=val.MAX_DISPLAY_NAME)
        if request.plan == common_pb2.PLAN_UNSPECIFIED or request.plan not in common_pb2.Plan.values():
            violations.append(("plan", "one of starter, pro, business, enterprise"))
        val.email(violations, "owner_email", request.owner_email)
        if violations:
            raise bad_request("invalid workspace", violations)
        api_key = new_api_key()
        app = self.app
        async with app.db.session() as session, session.begin():
            row = WorkspaceSecretRow(
                id="ws_" + uuid.uuid4().hex[:20],
                name=request.name,
                plan=request.plan,
                owner_email=request.owner_email,
                revision=1,
                api_key_hashes=hash_api_key(api_key),
            )
            session.add(row)
            await session.flush()
            session.add(api_keys.new_record(row.id, api_key, "first key"))
            update = await app.publish_workspace(session, row)
        await app.directory.apply(update)  # this service authenticates the key at once
        app.outbox.notify()
        return pb.CreateWorkspaceResponse(
            workspace=pb.Workspace(id=row.id, name=row.name, plan=row.plan, owner_email=row.owner_email),
            api_key=api_key,
        )

    async def GetWorkspace(self, request, context):
        ws = current_workspace()
        return pb.GetWorkspaceResponse(
            workspace=pb.Workspace(id=ws.id, name=ws.name, plan=ws.plan, owner_email=ws.owner_email)
        )

    # -- API keys (job_scheduler/api_keys.py: the rules) -------------------------------------------
    async def CreateApiKey(self, request, context):
        return await api_keys.ApiKeys(self.app).create(request)

    async def ListApiKeys(self, request, context):
        return await api_keys.ApiKeys(self.app).list(request)

    async def RevokeApiKey(self, request, context):
        return await api_keys.ApiKeys(self.app).revoke(request)


def _check_spec_bounds(spec: pb.JobSpec) -> None:
    """The limits of a JobSpec that need no catalog: INVALID_ARGUMENT at once when one is broken
    (so nothing oversized is looked up or quoted back)."""
    hyper = spec.hyperparameters
    val.check(
        "invalid job",
        lambda v: val.text(v, "spec.name", spec.name, max_len=val.MAX_NAME),
        lambda v: val.text(v, "spec.description", spec.description, max_len=val.MAX_DESCRIPTION, multiline=True),
        lambda v: val.topics(v, "spec.topics", spec.topics),
        lambda v: val.keyword(v, "spec.base_model", spec.base_model),
        lambda v: val.keyword(v, "spec.method", spec.method),
        lambda v: len(spec.method_options_json) <= val.MAX_OPTIONS_JSON
        or v.add("spec.method_options_json", f"at most {val.MAX_OPTIONS_JSON} characters"),
        lambda v: val.text(v, "spec.notify_email", spec.notify_email, max_len=val.MAX_EMAIL),
        lambda v: val.enum(v, "spec.overlength_policy", spec.overlength_policy, common_pb2.OverlengthPolicy),
        lambda v: val.repeated(v, "spec.hyperparameters.lora_target_modules", hyper.lora_target_modules,
                               max_items=val.MAX_MODULES, each=lambda v2, f, m: val.keyword(v2, f, m, required=True)),
        lambda v: val.keyword(v, "spec.hyperparameters.train_on_inputs", hyper.train_on_inputs),
    )


def _shed_if_expired(context) -> None:
    """Overloaded, a server starts calls late: one whose deadline has passed while it waited gets
    DEADLINE_EXCEEDED without doing the work nobody will read (so a backlog drains instead of
    growing)."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None and remaining <= 0:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it started")


def _worker(row: TrainerWorkerRow) -> plan.Worker:
    return plan.Worker(row.worker_id, row.device_class, row.last_seen_at, row.period_seconds,
                       tuple(p for p in (row.pools or "").split(",") if p))


# How often the job-scheduler looks for queued jobs whose pool lost its last live worker.
POOL_SWEEP_SECONDS = 5.0


async def retry_stale(operation, attempts: int = 5):
    """Run a read-modify-write again when another writer changed the job in between."""
    for attempt in range(attempts):
        try:
            return await operation()
        except StaleDataError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))


def describe_dataset_counts(d: common_pb2.DatasetSummary, spec: pb.JobSpec) -> str:
    """What each step of the dataset build left, from the snapshot's summary."""
    dropped = d.overlength_count if d.overlength_policy != common_pb2.OVERLENGTH_POLICY_TRUNCATE else 0
    return describe_counts(
        workspace=d.workspace_example_count, filtered=d.filtered_count, deduplicated=d.deduplicated_count,
        kept=d.train_count + d.test_count, overlength_dropped=dropped, train=d.train_count, test=d.test_count,
        kind=d.kind, topics=spec.topics,
    )


