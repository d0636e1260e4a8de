"""Two job-scheduler replicas behind one address: separate `tuneforge serve job-scheduler`
processes bound to the same port (SO_REUSEPORT), sharing the SQLite database and the durable NATS
consumers. Both accept connections and answer calls, jobs created through either end once, and
the survivor keeps serving when one replica stops."""

from __future__ import annotations

import asyncio
import signal

import grpc
import psutil
import pytest

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as js_grpc
from tuneforge.core.client import Clients, channel
from tuneforge.core.nats_server import free_port
from tuneforge.quickstart import EXAMPLES, create_workspace
from tuneforge.stack import Stack

pytestmark = pytest.mark.integration

CONNECTIONS = 12
JOBS = 6


def _accepted(pid: int, port: int) -> int:
    """Established connections that process ``pid`` accepted on ``port``."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def _drive(stack: Stack, tmp_path) -> None:
    target = stack.endpoints["job-scheduler"]
    port = int(target.rsplit(":", 1)[1])
    ws = await create_workspace(stack.endpoints, stack.admin_token, common_pb2.PLAN_PRO, "owner@example.com", "R")
    clients = Clients.connect(stack.endpoints, ws.api_key)
    # Separate connections (a channel each, no shared subchannel): the kernel spreads them.
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]
    md = (("authorization", f"Bearer {ws.api_key}"),)
    try:
        await sdk.wait_until_authorised(clients)
        sample = tmp_path / "sample.jsonl"
        sample.write_bytes(b"\n".join(EXAMPLES.read_bytes().splitlines()[:40]) + b"\n")
        await sdk.import_file(clients, sample)
        stubs = [js_grpc.JobSchedulerServiceStub(ch) for ch in channels]
        # Every connection answers, whichever replica took it.
        replies = await asyncio.gather(*(s.GetWorkspace(js.GetWorkspaceRequest(), metadata=md, timeout=10)
                                         for s in stubs))
        assert {r.workspace.id for r in replies} == {ws.workspace.id}
        pids = {name: stack.pid(name) for name in ("job-scheduler", "job-scheduler#2")}
        accepted = {name: _accepted(pid, port) for name, pid in pids.items()}
        assert sum(accepted.values()) >= CONNECTIONS, accepted
        assert all(n > 0 for n in accepted.values()), f"one replica took every connection: {accepted}"

        # Jobs created through both replicas; events handled by whichever replica fetched them.
        created = await asyncio.gather(*(
            stubs[i % len(stubs)].CreateJob(js.CreateJobRequest(spec=js.JobSpec(
                name=f"replica-job-{i}", topics=["billing"], base_model="llama-3.1-8b", method="sft")),
                metadata=md, timeout=30)
            for i in range(JOBS)))
        ids = [c.job.id for c in created]
        events = await asyncio.gather(*(sdk.watch_job(clients, job_id, timeout=60) for job_id in ids))
        for job_id, history in zip(ids, events):
            job = (await stubs[0].GetJob(js.GetJobRequest(job_id=job_id), metadata=md, timeout=10)).job
            assert job.state == js.JOB_STATE_SUCCEEDED, (job_id, job.failure_reason)
            assert [e.sequence for e in history] == list(range(1, len(history) + 1))
            states = [e.state for e in history if e.kind == "state_changed"]
            assert states == [js.JOB_STATE_VALIDATING, js.JOB_STATE_BUILDING_DATASET, js.JOB_STATE_SUCCEEDED]
        listed = await stubs[-1].ListJobs(js.ListJobsRequest(page_size=50), metadata=md, timeout=10)
        assert sorted(j.id for j in listed.jobs) == sorted(ids)

        # One replica stops: new connections go to the survivor, which answers.
        stack.kill("job-scheduler#2", signal.SIGTERM)
        stack.processes["job-scheduler#2"].wait(timeout=20)
        async with channel(target, ws.api_key, timeout=10) as again:
            stub = js_grpc.JobSchedulerServiceStub(again)
            for job_id in ids:
                assert (await stub.GetJob(js.GetJobRequest(job_id=job_id))).job.state == js.JOB_STATE_SUCCEEDED
    finally:
        for ch in channels:
            await ch.close()
        await clients.close()


def test_two_job_scheduler_replicas_share_one_port(tmp_path):
    port = free_port()
    with Stack(tmp_path / "state", ports={"job-scheduler": port}, extra_env={"OMP_NUM_THREADS": "1"}) as stack:
        name = stack.add_replica("job-scheduler")
        assert name == "job-scheduler#2" and stack.pid(name) != stack.pid("job-scheduler")
        asyncio.run(_drive(stack, tmp_path))
        assert stack.processes["job-scheduler"].poll() is None
        log = stack.log_tail("job-scheduler#2", 400) + stack.log_tail("job-scheduler", 400)
        assert "Traceback" not in log, log


async def test_fast_read_gives_what_the_orm_gives(tmp_path):
    """The read RPCs' fast path (plain sqlite3 on the event loop) returns the ORM's values and
    types, sees another connection's commit at once, and is absent for in-memory databases."""
    import datetime as dt

    from tuneforge.core.db import Database
    from tuneforge.job_scheduler.models import Base, JobRow
    from tuneforge.job_scheduler.service import JOBS

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'js.sqlite'}")
    try:
        await db.create_all(Base)
        assert db.fast_read(JOBS, "id = ?", ("job_1",)) == []
        async with db.session() as session, session.begin():
            session.add(JobRow(id="job_1", workspace_id="ws_1", name="n", spec=b"\x01", resolved_hyperparameters=b"",
                               state=3, dataset_only=True, notify_email="a@b.cd"))
        [fast] = db.fast_read(JOBS, "id = ?", ("job_1",))
        async with db.session() as session:
            orm = await session.get(JobRow, "job_1")
        for column in JobRow.__table__.columns:
            assert getattr(fast, column.key) == getattr(orm, column.key), column.key
        assert fast.dataset_only is True and fast.cancel_requested is False
        assert fast.created_at.tzinfo == dt.timezone.utc and fast.spec == b"\x01"
        async with db.session() as session, session.begin():
            (await session.get(JobRow, "job_1")).state = 4
        assert db.fast_read(JOBS, "id = ?", ("job_1",))[0].state == 4
    finally:
        await db.close()
    memory = Database("sqlite+aiosqlite:///:memory:")
    assert memory.fast_read(JOBS, "id = ?", ("job_1",)) is None
    await memory.close()
