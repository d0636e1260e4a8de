"""The bounded-redelivery guard of every event consumer (core.bus.Consumer) and the outbox's
republish after a crash, against the real nats-server fixture (own streams per test: the server is
shared by the session)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import nats
import pytest
from nats.js import api

from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import subjects
from tuneforge.core.bus import DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, Bus, RedeliveryPolicy, derived_event_id
from tuneforge.core.db import Database
from tuneforge.core.outbox import Outbox, OutboxBase, OutboxRow

FAST = RedeliveryPolicy(max_deliver=3, backoff_base=0.05, backoff_max=0.2)


async def _bus(nats_server, policy=FAST) -> Bus:
    return await Bus.connect(nats_server.url, "test-redelivery", redelivery=policy)


def _event(bus: Bus, job_id: str) -> ev.DatasetBuildSucceeded:
    return ev.DatasetBuildSucceeded(meta=bus.meta("ws_test", job_id))


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _dead_letters(bus: Bus, durable: str) -> list:
    """Every record on the dead-letter stream for ``durable`` (read with an ephemeral consumer)."""
    psub = await bus.js.pull_subscribe(f"{DEAD_LETTER_PREFIX}.{durable}", stream=DEAD_LETTER_STREAM)
    out = []
    try:
        while True:
            try:
                out.extend(await psub.fetch(10, timeout=0.5))
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return out
    finally:
        await psub.unsubscribe()


def test_policy_backoff_is_exponential_and_capped():
    policy = RedeliveryPolicy(max_deliver=6, backoff_base=0.5, backoff_max=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.server_max_deliver > policy.max_deliver
    with pytest.raises(ValueError):
        RedeliveryPolicy(max_deliver=0)


def test_every_service_takes_the_bound_from_one_setting():
    from tuneforge.core.settings import Settings

    policy = RedeliveryPolicy.from_settings(Settings(event_max_deliver=7, event_retry_base_seconds=0.1,
                                                     event_retry_max_seconds=2.0, event_ack_wait_seconds=4))
    assert policy == RedeliveryPolicy(max_deliver=7, backoff_base=0.1, backoff_max=2.0, ack_wait=4.0)


async def test_a_handler_that_always_fails_is_delivered_the_bound_then_dead_lettered(nats_server, caplog):
    bus = await _bus(nats_server)
    durable = "redelivery-always-" + uuid.uuid4().hex[:8]
    deliveries: list[int] = []
    given_up: list[tuple[str, str, str]] = []

    async def handler(subject, message, msg):
        deliveries.append(msg.metadata.num_delivered)
        raise RuntimeError("disk on fire")

    async def on_dead_letter(subject, message, error):
        given_up.append((subject, message.meta.job_id, error))

    job_id = "job_" + uuid.uuid4().hex[:8]
    try:
        with caplog.at_level(logging.ERROR, logger="tuneforge.core.bus"):
            consumer = await bus.consume(durable, [subjects.DATASET_BUILD_SUCCEEDED], handler,
                                         on_dead_letter=on_dead_letter, deliver_policy=api.DeliverPolicy.NEW)
            event = _event(bus, job_id)
            await bus.publish(subjects.DATASET_BUILD_SUCCEEDED, event)
            await _wait_for(lambda: consumer.dead_lettered == 1)
            await asyncio.sleep(0.5)  # several back-off periods: nothing more may come
        assert deliveries == [1, 2, 3]
        assert given_up == [(subjects.DATASET_BUILD_SUCCEEDED, job_id, "RuntimeError: disk on fire")]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("dead letter" in m and event.meta.event_id in m and subjects.DATASET_BUILD_SUCCEEDED in m
                   and "after 3 deliveries" in m for m in errors), errors
        records = await _dead_letters(bus, durable)
        assert len(records) == 1
        record = records[0]
        assert ev.DatasetBuildSucceeded.FromString(record.data) == event  # the original payload
        assert record.headers["Tuneforge-Event-Id"] == event.meta.event_id
        assert record.headers["Tuneforge-Subject"] == subjects.DATASET_BUILD_SUCCEEDED
        assert record.headers["Tuneforge-Deliveries"] == "3"
        assert "disk on fire" in record.headers["Tuneforge-Error"]
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0  # terminated, not left hanging
    finally:
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, durable)
        await bus.close()


async def test_a_handler_that_fails_once_succeeds_on_redelivery(nats_server):
    bus = await _bus(nats_server)
    durable = "redelivery-once-" + uuid.uuid4().hex[:8]
    deliveries: list[int] = []
    handled: list[str] = []

    async def handler(subject, message, msg):
        deliveries.append(msg.metadata.num_delivered)
        if len(deliveries) == 1:
            raise ConnectionError("database restarting")
        handled.append(message.meta.job_id)

    async def on_dead_letter(subject, message, error):  # pragma: no cover - must not run
        raise AssertionError("dead-lettered a message that succeeded on redelivery")

    job_id = "job_" + uuid.uuid4().hex[:8]
    try:
        consumer = await bus.consume(durable, [subjects.DATASET_BUILD_SUCCEEDED], handler,
                                     on_dead_letter=on_dead_letter, deliver_policy=api.DeliverPolicy.NEW)
        await bus.publish(subjects.DATASET_BUILD_SUCCEEDED, _event(bus, job_id))
        await _wait_for(lambda: handled == [job_id])
        await asyncio.sleep(0.3)
        assert deliveries == [1, 2] and handled == [job_id] and consumer.dead_lettered == 0
        assert await _dead_letters(bus, durable) == []
    finally:
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, durable)
        await bus.close()


async def test_an_undecodable_message_is_dead_lettered_at_once(nats_server):
    bus = await _bus(nats_server)
    durable = "redelivery-poison-" + uuid.uuid4().hex[:8]
    calls: list[object] = []
    given_up: list[object] = []

    async def handler(subject, message, msg):  # pragma: no cover - never reached
        calls.append(message)

    async def on_dead_letter(subject, message, error):
        given_up.append(message)

    try:
        consumer = await bus.consume(durable, [subjects.DATASET_BUILD_SUCCEEDED], handler,
                                     on_dead_letter=on_dead_letter, deliver_policy=api.DeliverPolicy.NEW)
        await bus.js.publish(subjects.DATASET_BUILD_SUCCEEDED, b"\xff\xff not protobuf")
        await _wait_for(lambda: consumer.dead_lettered == 1)
        assert calls == [] and given_up == [None]
        records = await _dead_letters(bus, durable)
        assert len(records) == 1 and records[0].headers["Tuneforge-Deliveries"] == "1"
    finally:
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, durable)
        await bus.close()


async def test_a_failing_dead_letter_hook_keeps_the_message(nats_server):
    """A given-up message whose dead-lettering fails (its service's database away) is kept and
    dead-lettered on a later delivery, not dropped."""
    bus = await _bus(nats_server)
    durable = "redelivery-hook-" + uuid.uuid4().hex[:8]
    hook_calls: list[int] = []

    async def handler(subject, message, msg):
        raise RuntimeError("still broken")

    async def on_dead_letter(subject, message, error):
        hook_calls.append(1)
        if len(hook_calls) == 1:
            raise OSError("database away")

    try:
        consumer = await bus.consume(durable, [subjects.DATASET_BUILD_SUCCEEDED], handler,
                                     on_dead_letter=on_dead_letter, deliver_policy=api.DeliverPolicy.NEW)
        await bus.publish(subjects.DATASET_BUILD_SUCCEEDED, _event(bus, "job_x"))
        await _wait_for(lambda: consumer.dead_lettered == 1)
        assert len(hook_calls) == 2
        assert len(await _dead_letters(bus, durable)) == 1
    finally:
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, durable)
        await bus.close()


async def test_a_result_event_derived_from_its_cause_is_kept_once(nats_server):
    """Handling a redelivered request again publishes the same Nats-Msg-Id: JetStream keeps one."""
    bus = await _bus(nats_server)
    try:
        cause = uuid.uuid4().hex
        first = derived_event_id(cause, subjects.DATASET_BUILD_SUCCEEDED)
        assert first == derived_event_id(cause, subjects.DATASET_BUILD_SUCCEEDED)
        assert first != derived_event_id(cause, subjects.DATASET_BUILD_FAILED)
        assert first != derived_event_id(uuid.uuid4().hex, subjects.DATASET_BUILD_SUCCEEDED)
        acks = [
            await bus.publish(subjects.DATASET_BUILD_SUCCEEDED,
                              ev.DatasetBuildSucceeded(meta=bus.meta("ws_test", "job_d", event_id=first)))
            for _ in range(2)
        ]
        assert not acks[0].duplicate and acks[1].duplicate and acks[0].seq == acks[1].seq
    finally:
        await bus.close()


async def test_outbox_republishes_after_a_crash_between_commit_and_publish(nats_server, tmp_path):
    """An event committed but never published (crash) goes out on restart; one published but not
    yet deleted (crash after publish) goes out again with the same Nats-Msg-Id and is deduplicated."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'outbox.sqlite'}")
    await db.create_all(OutboxBase)
    bus = await _bus(nats_server)
    try:
        js, stream = bus.js, subjects.EVENTS_STREAM
        before = (await js.stream_info(stream)).state.messages
        outbox = Outbox(db, bus)
        event = ev.JobSucceeded(meta=bus.meta("ws_test", "job_o"), job_name="o")
        async with db.session() as session, session.begin():
            outbox.add(session, subjects.JOB_SUCCEEDED, event)
        # "crash" before publishing: nothing sent; a restarted relay finds the row
        assert (await js.stream_info(stream)).state.messages == before
        # crash after publishing, before the row was deleted: publish by hand, keep the row
        await bus.publish(subjects.JOB_SUCCEEDED, event)
        restarted = Outbox(db, bus)
        assert await restarted.flush() == 1
        async with db.session() as session:
            assert (await session.execute(OutboxRow.__table__.select())).all() == []
        info = await js.stream_info(stream)
        assert info.state.messages == before + 1  # the republish was recognised as the same event
        msg = await js.get_msg(stream, info.state.last_seq)
        assert msg.headers["Nats-Msg-Id"] == event.meta.event_id
    finally:
        await bus.close()
        await db.close()


async def test_a_slow_handler_is_kept_in_progress_not_redelivered(nats_server):
    """A handler slower than ack_wait is not handed out again meanwhile (the consumer heartbeats)."""
    bus = await _bus(nats_server, RedeliveryPolicy(max_deliver=3, backoff_base=0.05, backoff_max=0.2, ack_wait=0.6))
    durable = "redelivery-slow-" + uuid.uuid4().hex[:8]
    deliveries: list[int] = []

    async def handler(subject, message, msg):
        deliveries.append(msg.metadata.num_delivered)
        await asyncio.sleep(1.5)

    try:
        await bus.consume(durable, [subjects.DATASET_BUILD_SUCCEEDED], handler, deliver_policy=api.DeliverPolicy.NEW)
        await bus.publish(subjects.DATASET_BUILD_SUCCEEDED, _event(bus, "job_slow"))
        await _wait_for(lambda: deliveries)
        await asyncio.sleep(2.0)
        assert deliveries == [1]
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    finally:
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, durable)
        await bus.close()


# -- every service's handlers: a redelivered event has exactly one effect --------------------------

async def _published(bus: Bus, subject: str, job_id: str) -> list:
    """The events on ``subject`` about ``job_id`` that the events stream holds."""
    psub = await bus.js.pull_subscribe(subject, stream=subjects.EVENTS_STREAM)
    found = []
    try:
        while True:
            try:
                msgs = await psub.fetch(50, timeout=0.5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return found
            for msg in msgs:
                event = subjects.MESSAGE_TYPES[subject].FromString(msg.data)
                if event.meta.job_id == job_id:
                    found.append(event)
                await msg.ack()
    finally:
        await psub.unsubscribe()


async def _last_event(bus: Bus, subject: str, job_id: str):
    events = await _published(bus, subject, job_id)
    assert events, f"no {subject} for {job_id}"
    return events[-1]


async def test_redelivered_events_have_one_effect_in_every_service(services, tmp_path):
    """Each handler run again on the same event (what a redelivery after a crash between 'did the
    work' and 'acked' does): one dataset result, one job transition, one model, one email."""
    from conftest import workspace

    from tuneforge import sdk
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
    from tuneforge.core.storage import ArtifactStore
    from tuneforge.model_registry.models import ModelRow
    from tuneforge.notifier.models import DeliveryRow
    from sqlalchemy import select

    endpoints, settings = services
    apps = services.apps
    clients = await workspace(endpoints, common_pb2.PLAN_PRO, "pro@example.com")
    try:
        path = tmp_path / "a.jsonl"
        path.write_text("".join(
            '{"messages": [{"role": "user", "content": "q %d"}, {"role": "assistant", "content": "a %d"}]}\n'
            % (i, i) for i in range(30)))
        await sdk.import_file(clients, path)
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(
            spec=js.JobSpec(name="once", base_model="llama-3.2-1b", method="sft")))
        job_id = created.job.id
        await sdk.watch_job(clients, job_id, timeout=30)

        # dataset-builder: the build request handled twice more -> still one result event
        builder, scheduler = apps["dataset-builder"], apps["job-scheduler"]
        request = await _last_event(builder.bus, subjects.DATASET_BUILD_REQUESTED, job_id)
        for _ in range(2):
            await builder.on_build_requested(subjects.DATASET_BUILD_REQUESTED, request, None)
        await builder.outbox.flush()
        built = await _published(builder.bus, subjects.DATASET_BUILD_SUCCEEDED, job_id)
        assert len(built) == 1

        # job-scheduler: the result handled twice more -> one terminal transition, one JobSucceeded
        for _ in range(2):
            await scheduler.on_dataset_built(built[0])
        await scheduler.outbox.flush()
        events = await sdk.watch_job(clients, job_id, timeout=10)
        assert [e.state for e in events if e.kind == "state_changed"] == [
            js.JOB_STATE_VALIDATING, js.JOB_STATE_BUILDING_DATASET, js.JOB_STATE_SUCCEEDED]
        succeeded = await _published(scheduler.bus, subjects.JOB_SUCCEEDED, job_id)
        assert len(succeeded) == 1

        # notifier: the same event again, and a second event announcing the same state (a
        # republished outbox row outside JetStream's dedupe window) -> one delivery, one email
        notifier = apps["notifier"]
        twin = ev.JobSucceeded()
        twin.CopyFrom(succeeded[0])
        twin.meta.event_id = uuid.uuid4().hex
        for event in (succeeded[0], twin):
            await notifier.on_job_event(subjects.JOB_SUCCEEDED, event, None)
        async with notifier.db.session() as session:
            rows = (await session.execute(select(DeliveryRow).where(DeliveryRow.job_id == job_id))).scalars().all()
        await _wait_for(lambda: any(p.read_text().count(job_id) for p in settings.resolved_outbox_dir().glob("*.eml")))
        emails = [p for p in settings.resolved_outbox_dir().glob("*.eml") if f"X-Tuneforge-Job: {job_id}" in p.read_text()]
        assert len(rows) == 1 and len(emails) == 1, (rows, emails)

        # model-registry: one registration request handled three times, once as a new event
        registry = apps["model-registry"]
        source = f"jobs/{created.job.id}/adapter"
        store = ArtifactStore(settings.resolved_artifact_url())
        store.put_bytes(f"{source}/adapter_config.json", b"{}")
        store.put_bytes(f"{source}/adapter_model.safetensors", b"weights")
        ws_id = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace.id
        reg = ev.ModelRegistrationRequested(meta=registry.bus.meta(ws_id, "job_registered_once"), model_name="once-m",
                                            base_model="llama-3.2-1b", method="sft", adapter_path=source)
        again = ev.ModelRegistrationRequested()
        again.CopyFrom(reg)
        again.meta.event_id = uuid.uuid4().hex
        for event in (reg, reg, again):
            await registry.on_registration_requested(subjects.MODEL_REGISTRATION_REQUESTED, event, None)
        await registry.outbox.flush()
        async with registry.db.session() as session:
            models = (await session.execute(
                select(ModelRow).where(ModelRow.job_id == "job_registered_once"))).scalars().all()
        assert len(models) == 1
        answers = await _published(registry.bus, subjects.MODEL_REGISTRATION_SUCCEEDED, "job_registered_once")
        assert len(answers) == 2 and {a.model_id for a in answers} == {models[0].id}  # one per distinct request
    finally:
        await clients.close()


async def test_the_notifier_sends_a_delivery_once_when_two_senders_race(services):
    """The event handler and the retry loop may pick the same pending delivery at once: the claim
    lets exactly one of them send."""
    notifier = services.apps["notifier"]
    settings = services[1]
    meta = notifier.bus.meta("ws_race", "job_race")
    row = await notifier.record(meta, "race@example.com", "race", "body")
    results = await asyncio.gather(*(notifier.attempt(row.id) for _ in range(4)))
    assert sum(1 for r in results if r.attempts == 1) >= 1
    emails = [p for p in settings.resolved_outbox_dir().glob("*.eml") if "X-Tuneforge-Job: job_race" in p.read_text()]
    assert len(emails) == 1


async def test_an_unpublishable_outbox_event_is_set_aside_and_the_rest_go_out(nats_server, tmp_path):
    """An event NATS can never take (over max_payload) must not hold back the events behind it."""
    from tuneforge.core.outbox import OutboxDeadRow

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'outbox.sqlite'}")
    await db.create_all(OutboxBase)
    bus = await _bus(nats_server)
    try:
        outbox = Outbox(db, bus)
        huge = ev.JobSucceeded(meta=bus.meta("ws_test", "job_huge"), job_name="x" * (2 * 2**20))
        fine = ev.JobSucceeded(meta=bus.meta("ws_test", "job_fine"), job_name="fine")
        async with db.session() as session, session.begin():
            outbox.add(session, subjects.JOB_SUCCEEDED, huge)
            outbox.add(session, subjects.JOB_SUCCEEDED, fine)
        assert await outbox.flush() == 1
        async with db.session() as session:
            assert (await session.execute(OutboxRow.__table__.select())).all() == []
            aside = (await session.execute(OutboxDeadRow.__table__.select())).all()
        assert len(aside) == 1 and "MaxPayload" in aside[0].error
        assert [e.job_name for e in await _published(bus, subjects.JOB_SUCCEEDED, "job_fine")] == ["fine"]
    finally:
        await bus.close()
        await db.close()


async def test_a_given_up_decisive_event_fails_its_job_instead_of_leaving_it_waiting(services):
    """The job-scheduler's dead-letter hook: a job whose next-state event was given up FAILS as a
    system error (with the reason); a given-up progress event changes nothing."""
    from conftest import workspace

    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    endpoints, _ = services
    scheduler = services.apps["job-scheduler"]
    for consumer in services.apps["dataset-builder"].bus._consumers:
        if consumer.durable == "dataset-builder":
            await consumer.stop()  # nobody builds: the job waits in BUILDING_DATASET
    clients = await workspace(endpoints, common_pb2.PLAN_PRO, "pro@example.com")
    try:
        job = (await clients.job_scheduler.CreateJob(js.CreateJobRequest(
            spec=js.JobSpec(name="stuck", base_model="llama-3.2-1b", method="sft")))).job
        ws_id = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace.id
        meta = scheduler.bus.meta(ws_id, job.id)
        await scheduler.on_dead_letter(subjects.TRAINING_RUN_PROGRESS, ev.TrainingRunProgress(meta=meta), "x")
        assert (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job.id))).job.state == \
            js.JOB_STATE_BUILDING_DATASET
        await scheduler.on_dead_letter(subjects.DATASET_BUILD_SUCCEEDED, ev.DatasetBuildSucceeded(meta=meta),
                                       "OperationalError: database is locked")
        failed = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job.id))).job
        assert failed.state == js.JOB_STATE_FAILED and failed.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
        assert "could not be processed after 5 attempts" in failed.failure_reason
        assert "database is locked" in failed.failure_reason
    finally:
        await clients.close()
