"""Schema migrations (tuneforge.core.migrations): one Alembic history per service, on SQLite and
PostgreSQL, each test in a fresh database (the ``database_url`` fixture of test_databases.py).

* an empty database migrated to head is exactly what the models describe (Alembic's
  compare_metadata finds nothing): a model changed without a migration fails here;
* the job-scheduler's 0001 -> 0002 upgrade keeps real rows and fills the new columns;
* a database made before migrations (tables, no version table) is adopted: brought to the
  baseline, stamped, upgraded, its data intact;
* two processes migrating one database together: both succeed, the schema is applied once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa
from test_databases import database_url  # noqa: F401  (the sqlite / postgresql fixture)
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core import migrations
from tuneforge.core.db import Database
from tuneforge.core.outbox import OutboxRow
from tuneforge.core.workspaces import WorkspaceRow
from tuneforge.job_scheduler.models import JobEventRow, JobRow, TrainerWorkerRow

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
SPEC = js.JobSpec(name="support-bot", base_model="llama-3.1-8b", method="sft", topics=["billing"],
                  hyperparameters=common_pb2.Hyperparameters(learning_rate=2e-4, lora_rank=16),
                  notify_email="a@b.co")
HYPER = common_pb2.Hyperparameters(learning_rate=2e-4, lora_rank=16, lora_alpha=32, seed=7)
PROGRESS = common_pb2.TrainingProgress(step=40, total_steps=100, train_loss=1.25)


async def _differences(db: Database, service: str) -> list:
    async with db.engine.connect() as conn:
        return await conn.run_sync(migrations.schema_differences, service)


async def _version_rows(db: Database, service: str) -> list[str]:
    async with db.engine.connect() as conn:
        result = await conn.execute(sa.text(f"SELECT version_num FROM {migrations.version_table(service)}"))
        return [row[0] for row in result]


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


def test_names_and_lock_keys_are_stable():
    assert migrations.version_table("job-scheduler") == "alembic_version_job_scheduler"
    keys = {migrations.lock_key(s) for s in migrations.SERVICES}
    assert len(keys) == len(migrations.SERVICES) and all(-2**63 <= k < 2**63 for k in keys)
    # A literal: a replica of another version must compute the same key.
    assert migrations.lock_key("job-scheduler") == migrations.lock_key("job-scheduler") == -1492006112370137026
    with pytest.raises(ValueError, match="no migration history"):
        migrations.history_package("gateway")


@pytest.mark.parametrize("service", migrations.SERVICES)
async def test_an_empty_database_migrates_to_exactly_the_models(database_url, service):  # noqa: F811
    db = Database(database_url)
    try:
        done = await db.migrate(service)
        history = [s.revision for s in reversed(list(migrations.script_directory(service).walk_revisions()))]
        assert (done.before, done.after, done.applied, done.adopted) == (None, history[-1], tuple(history), False)
        assert await _differences(db, service) == []
        expected = set(migrations.service_metadata(service).tables) | {migrations.version_table(service)}
        assert await _tables(db) == expected
        assert await _version_rows(db, service) == [history[-1]]
        again = await db.migrate(service)  # the next start: nothing to do
        assert (again.before, again.after, again.applied) == (history[-1], history[-1], ())
    finally:
        await db.close()


async def test_a_model_change_without_a_migration_is_a_difference(database_url):  # noqa: F811
    """What keeps the migrations honest: the job-scheduler's database at 0001 against today's
    models lacks exactly the four columns 0002 adds."""
    db = Database(database_url)
    try:
        await db.migrate("job-scheduler", target="0001")
        missing = sorted((d[2], d[3].name) for d in await _differences(db, "job-scheduler") if d[0] == "add_column")
        assert missing == [("jobs", "pool"), ("jobs", "state_reason"),
                           ("trainer_workers", "device_memory_bytes"), ("trainer_workers", "pools")]
        assert len(await _differences(db, "job-scheduler")) == 4
        # An expression index that is not there is a difference too (on SQLite by its CREATE INDEX).
        async with db.engine.begin() as conn:
            await conn.execute(sa.text("DROP INDEX ix_jobs_workspace_created"))
        assert any("ix_jobs_workspace_created" in repr(d) for d in await _differences(db, "job-scheduler"))
    finally:
        await db.close()


async def _insert_jobs_at_0001(db: Database) -> None:
    """Real rows of the release before 0002: jobs queued, training and done, their events, a worker."""
    async with db.engine.begin() as conn:
        meta = sa.MetaData()
        await conn.run_sync(lambda c: meta.reflect(c, only=["jobs", "job_events", "trainer_workers"]))
        jobs = [{"id": f"job_{state}", "workspace_id": "ws_1", "request_id": f"req-{state}", "name": f"run-{state}",
                 "spec": SPEC.SerializeToString(), "resolved_hyperparameters": HYPER.SerializeToString(),
                 "state": state, "failure_reason": "", "failure_kind": 0, "dataset_only": False, "dataset": None,
                 "progress": PROGRESS.SerializeToString() if state == js.JOB_STATE_TRAINING else None,
                 "metrics": None, "adapter_path": "", "report_path": "", "model_name": "", "model_id": "",
                 "notify_email": "a@b.co", "attempt": 1, "cancel_requested": False, "created_at": T0,
                 "updated_at": T0, "version": 3}
                for state in (js.JOB_STATE_QUEUED, js.JOB_STATE_TRAINING, js.JOB_STATE_SUCCEEDED)]
        await conn.execute(meta.tables["jobs"].insert(), jobs)
        await conn.execute(meta.tables["job_events"].insert(), [
            {"job_id": "job_4", "sequence": 1, "time": T0, "kind": "state", "state": js.JOB_STATE_TRAINING,
             "message": "training", "progress": PROGRESS.SerializeToString()}])
        await conn.execute(meta.tables["trainer_workers"].insert(), [
            {"worker_id": "worker-a", "device_class": "NVIDIA H100 80GB HBM3", "device_count": 8,
             "period_seconds": 30, "last_seen_at": T0}])


async def _assert_jobs_intact(db: Database) -> None:
    async with db.session() as session:
        rows = {r.id: r for r in (await session.execute(sa.select(JobRow))).scalars()}
        events = (await session.execute(sa.select(JobEventRow))).scalars().all()
        worker = await session.get(TrainerWorkerRow, "worker-a")
    assert sorted(rows) == ["job_3", "job_4", "job_6"]
    for job in rows.values():
        assert js.JobSpec.FromString(job.spec) == SPEC
        assert common_pb2.Hyperparameters.FromString(job.resolved_hyperparameters) == HYPER
        assert (job.version, job.attempt, job.notify_email, job.created_at) == (3, 1, "a@b.co", T0)
        assert job.state_reason == ""
    # Queued or training under the previous release: routed on the bare subject, "legacy".
    assert {i: r.pool for i, r in rows.items()} == {"job_3": "legacy", "job_4": "legacy", "job_6": ""}
    assert common_pb2.TrainingProgress.FromString(rows["job_4"].progress) == PROGRESS
    assert [(e.job_id, e.message, common_pb2.TrainingProgress.FromString(e.progress)) for e in events] == [
        ("job_4", "training", PROGRESS)]
    assert (worker.device_class, worker.device_count, worker.pools, worker.device_memory_bytes) == (
        "NVIDIA H100 80GB HBM3", 8, "", 0)
    # The upgraded rows work with today's models: an update (optimistic version) and the new columns.
    async with db.session() as session, session.begin():
        job = await session.get(JobRow, "job_3")
        job.pool, job.state_reason = "gpu-80g", "waiting for a trainer of pool gpu-80g"
        (await session.get(TrainerWorkerRow, "worker-a")).device_memory_bytes = 80 * 2**30
    async with db.session() as session:
        job = await session.get(JobRow, "job_3")
        assert (job.pool, job.version) == ("gpu-80g", 4)
        assert (await session.get(TrainerWorkerRow, "worker-a")).device_memory_bytes == 80 * 2**30


async def test_the_job_scheduler_upgrade_keeps_its_rows(database_url):  # noqa: F811
    db = Database(database_url)
    try:
        await db.migrate("job-scheduler", target="0001")
        await _insert_jobs_at_0001(db)
        done = await db.migrate("job-scheduler")
        assert (done.before, done.after, done.applied, done.adopted) == ("0001", "0002", ("0002",), False)
        assert done.describe() == "job-scheduler: migrated 0001 -> 0002 (applied 0002)"
        await _assert_jobs_intact(db)
        assert await _differences(db, "job-scheduler") == []
    finally:
        await db.close()


async def _drop_version_table(db: Database, service: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(sa.text(f"DROP TABLE {migrations.version_table(service)}"))


async def test_a_job_scheduler_database_from_before_migrations_is_adopted(database_url):  # noqa: F811
    """A database an older release made with create_all: no version table, an outbox without
    ``trace_context``, no worker tables yet, the list index missing; with rows. It is adopted
    (brought to the baseline, stamped 0001) and upgraded to head, its rows intact."""
    db = Database(database_url)
    try:
        await db.migrate("job-scheduler", target="0001")
        await _insert_jobs_at_0001(db)
        await _drop_version_table(db, "job-scheduler")
        async with db.engine.begin() as conn:
            for sql in ("DROP TABLE training_throughput", "DROP INDEX ix_jobs_workspace_created",
                        "DROP TABLE event_outbox",
                        "CREATE TABLE event_outbox (id INTEGER NOT NULL PRIMARY KEY, subject VARCHAR(128) NOT NULL, "
                        "payload BLOB NOT NULL, created_at DATETIME NOT NULL)" if db.sqlite_path else
                        "CREATE TABLE event_outbox (id SERIAL PRIMARY KEY, subject VARCHAR(128) NOT NULL, "
                        "payload BYTEA NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL)"):
                await conn.execute(sa.text(sql))
            await conn.execute(sa.text("INSERT INTO event_outbox (id, subject, payload, created_at) "
                                       "VALUES (1, 'tuneforge.job.queued', :p, :t)"), {"p": b"\x0a\x03abc", "t": T0})
            await conn.execute(sa.text("INSERT INTO workspaces (id, name, plan, owner_email, revision) "
                                       "VALUES ('ws_1', 'Acme', 4, 'a@b.co', 2)"))
        assert migrations.version_table("job-scheduler") not in await _tables(db)

        done = await db.migrate("job-scheduler")
        assert (done.before, done.after, done.applied, done.adopted) == (None, "0002", ("0002",), True)
        assert await _version_rows(db, "job-scheduler") == ["0002"]
        assert await _differences(db, "job-scheduler") == []
        await _assert_jobs_intact(db)
        async with db.session() as session:
            outbox = (await session.execute(sa.select(OutboxRow))).scalars().one()
            workspace = await session.get(WorkspaceRow, "ws_1")
        assert (outbox.payload, outbox.trace_context, outbox.created_at) == (b"\x0a\x03abc", None, T0)
        assert (workspace.name, workspace.revision) == ("Acme", 2)
        again = await db.migrate("job-scheduler")
        assert (again.applied, again.adopted) == ((), False)
    finally:
        await db.close()


@pytest.mark.parametrize("service", ["dataset-builder", "model-registry", "notifier", "trainer"])
async def test_every_services_database_from_before_migrations_is_adopted(database_url, service):  # noqa: F811
    db = Database(database_url)
    try:
        await db.migrate(service)
        async with db.engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO workspaces (id, name, plan, owner_email, revision) "
                                       "VALUES ('ws_1', 'Acme', 4, 'a@b.co', 2)"))
        await _drop_version_table(db, service)
        done = await db.migrate(service)
        assert (done.before, done.after, done.adopted) == (None, migrations.head(service), True)
        assert await _differences(db, service) == []
        async with db.session() as session:
            assert (await session.get(WorkspaceRow, "ws_1")).name == "Acme"
    finally:
        await db.close()


_MIGRATE_IN_A_PROCESS = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from tuneforge.core import migrations
    from tuneforge.core.db import Database

    url, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
    inner = migrations._migrate_sync

    def slow(conn, service, target):  # holds the lock a while: the other process must wait
        time.sleep(1.0)
        return inner(conn, service, target)

    migrations._migrate_sync = slow

    async def main():
        db = Database(url)
        open(ready, "w").close()
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
        began = time.time()
        done = await db.migrate("job-scheduler")
        ended = time.time()
        await db.close()
        print(json.dumps({"applied": done.applied, "before": done.before, "began": began, "ended": ended}))

    asyncio.run(main())
""")


async def test_two_replicas_migrating_together_apply_the_schema_once(database_url, tmp_path):  # noqa: F811
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _MIGRATE_IN_A_PROCESS, database_url,
                                                  str(ready[n]), str(go), stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
             for n in range(2)]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # both imported (about 1 s each here) and waiting
        assert time.monotonic() < deadline and all(p.returncode is None for p in procs)
        await asyncio.sleep(0.02)
    go.touch()
    results = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    first, second = sorted(results, key=lambda r: r["ended"])
    assert (first["before"], first["applied"]) == (None, ["0001", "0002"])
    assert (second["before"], second["applied"]) == ("0002", [])  # it waited, then found head
    assert abs(first["began"] - second["began"]) < 0.8  # they really started together
    assert second["ended"] - first["ended"] >= 0.9  # serialized: its own 1 s inside the lock after
    db = Database(database_url)
    try:
        assert await _version_rows(db, "job-scheduler") == ["0002"]
        assert await _differences(db, "job-scheduler") == []
    finally:
        await db.close()


async def test_two_engines_in_one_process_migrate_together(database_url):  # noqa: F811
    """Two services' or replicas' engines starting in one event loop: Alembic's ``op`` is process
    wide, so their migrations take turns; both succeed."""
    dbs = [Database(database_url) for _ in range(2)]
    try:
        done = await asyncio.gather(*(db.migrate("job-scheduler") for db in dbs))
        assert sorted(d.applied for d in done) == [(), ("0001", "0002")]
        assert await _version_rows(dbs[0], "job-scheduler") == ["0002"]
    finally:
        for db in dbs:
            await db.close()
