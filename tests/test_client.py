"""The typed client `tuneforge.client`, against real gRPC servers on loopback: the five services
in-process (real NATS, SQLite) for typed errors, pagination, idempotency keys and discovery, and
a small scripted JobSchedulerService (a real grpc.aio server) for deadlines, retries and a
watch stream that breaks mid-way."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time

import grpc
import pytest
from conftest import ADMIN  # the fixture `services` lives in conftest too
from tuneforge import client as tc
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as js_grpc
from tuneforge.core import errors
from tuneforge.core.client import Clients
from tuneforge.core.nats_server import free_port

# -- a scripted job-scheduler -------------------------------------------------------------------
FAILURES = {  # ListCheckpoints(job_id) -> the error it answers with
    "invalid": errors.bad_request("invalid request", [("job_id", "not an id"), ("page_size", "too big")]),
    "missing": errors.not_found("job 'missing'"),
    "exists": errors.ServiceError(grpc.StatusCode.ALREADY_EXISTS, "exists"),
    "denied": errors.ServiceError(grpc.StatusCode.PERMISSION_DENIED, "administrators only"),
    "unauth": errors.ServiceError(grpc.StatusCode.UNAUTHENTICATED, "unknown key"),
    "precondition": errors.failed_precondition("job already SUCCEEDED"),
    "plan": errors.plan_required("assigning models to agents needs the Enterprise plan"),
    "in-use": errors.failed_precondition("model is assigned to agent a1", errors.MODEL_IN_USE),
    "has-model": errors.failed_precondition("agent a1 uses model m2", errors.AGENT_HAS_MODEL),
    "exhausted": errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls"),
    "internal": errors.ServiceError(grpc.StatusCode.INTERNAL, "boom"),
    "cancelled": errors.ServiceError(grpc.StatusCode.CANCELLED, "cancelled"),
}
EXPECTED = {
    "invalid": tc.InvalidArgument, "missing": tc.NotFound, "exists": tc.AlreadyExists,
    "denied": tc.PermissionDenied, "unauth": tc.Unauthenticated, "precondition": tc.FailedPrecondition,
    "plan": tc.PlanRequired, "in-use": tc.ModelInUse, "has-model": tc.AgentHasModel,
    "exhausted": tc.ResourceExhausted, "internal": tc.Internal, "cancelled": tc.Cancelled,
}
WATCH_EVENTS = 6


class Scripted(js_grpc.JobSchedulerServiceServicer):
    """Fails, stalls and breaks on purpose; counts what it was asked."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.keys: list[str | None] = []  # authorization metadata of each GetJob
        self.request_ids: list[str] = []
        self.watch_after: list[int] = []
        self.fail_get = 0  # the first this many GetJob calls answer UNAVAILABLE
        self.target = ""

    async def GetJob(self, request, context):
        self.calls["GetJob"] += 1
        self.keys.append(dict(context.invocation_metadata()).get("authorization"))
        if request.job_id == "slow":
            await asyncio.sleep(5)
        if request.job_id == "down" or self.calls["GetJob"] <= self.fail_get:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return js.GetJobResponse(job=js.Job(id=request.job_id, state=js.JOB_STATE_QUEUED))

    async def CancelJob(self, request, context):
        self.calls["CancelJob"] += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    async def CreateJob(self, request, context):
        self.calls["CreateJob"] += 1
        self.request_ids.append(request.request_id)
        if self.calls["CreateJob"] == 1:  # the job was made, the answer lost on the way
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return js.CreateJobResponse(job=js.Job(id="job_" + request.request_id[:12], spec=request.spec))

    async def ListCheckpoints(self, request, context):
        self.calls["ListCheckpoints"] += 1
        if request.job_id in FAILURES:
            await context.abort_with_status(FAILURES[request.job_id].to_status())
        return js.ListCheckpointsResponse(checkpoints=[js.Checkpoint(step=5), js.Checkpoint(step=10)])

    async def WatchJob(self, request, context):
        """Events 1..6; the first stream breaks after event 3, a reopened one resends the event at
        ``after_sequence`` (as a careless server or proxy might)."""
        self.calls["WatchJob"] += 1
        self.watch_after.append(request.after_sequence)
        if request.job_id == "missing":
            await context.abort_with_status(errors.not_found("job 'missing'").to_status())
        first = len(self.watch_after) == 1
        for seq in range(max(request.after_sequence, 1), WATCH_EVENTS + 1):
            state = js.JOB_STATE_SUCCEEDED if seq == WATCH_EVENTS else js.JOB_STATE_TRAINING
            yield js.WatchJobResponse(event=js.JobEvent(sequence=seq, kind="progress", state=state, message=f"e{seq}"))
            if first and seq == 3:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")


async def _serve(servicer: Scripted) -> grpc.aio.Server:
    server = grpc.aio.server()
    js_grpc.add_JobSchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.target = f"127.0.0.1:{port}"
    return server


@pytest.fixture
async def scripted():
    """The scripted server in this test's event loop."""
    servicer = Scripted()
    server = await _serve(servicer)
    yield servicer
    await server.stop(0)


@pytest.fixture
def threaded_scripted():
    """The scripted server on an event loop in another thread, for tests without a loop."""
    servicer = Scripted()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(_serve(servicer), loop).result(10)
    yield servicer
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


FAST = {"retry_backoff": 0.05, "retry_backoff_max": 0.2}


# -- deadlines and retries ------------------------------------------------------------------------
async def test_a_slow_call_raises_deadline_exceeded_at_its_deadline(scripted):
    async with tc.AsyncClient(scripted.target, api_key="k", timeout=0.5, **FAST) as client:
        started = time.monotonic()
        with pytest.raises(tc.DeadlineExceeded) as info:
            await client.get_job("slow")
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 1.5, elapsed
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # a per-call timeout overrides the client's default
        started = time.monotonic()
        with pytest.raises(tc.DeadlineExceeded):
            await client.job_scheduler.GetJob(js.GetJobRequest(job_id="slow"), timeout=0.2)
        assert time.monotonic() - started < 1.0
    assert scripted.calls["GetJob"] == 2  # a deadline is never retried


async def test_retries_stop_at_the_deadline(scripted):
    """A service that stays down: the retries end with the caller's deadline, not after it."""
    async with tc.AsyncClient(scripted.target, api_key="k", timeout=1.0, retries=50,
                              retry_backoff=0.2, retry_backoff_max=0.2) as client:
        started = time.monotonic()
        with pytest.raises(tc.Unavailable):
            await client.get_job("down")
        elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed  # 50 retries would take 5-10 s
    assert 3 <= scripted.calls["GetJob"] < 12


async def test_idempotent_call_is_retried_and_returns(scripted):
    scripted.fail_get = 2
    async with tc.AsyncClient(scripted.target, api_key="tfk_secret", **FAST) as client:
        job = await client.get_job("job_1")
    assert job.id == "job_1" and job.state == js.JOB_STATE_QUEUED
    assert scripted.calls["GetJob"] == 3  # 2 failures + the one that answered
    assert scripted.keys == ["Bearer tfk_secret"] * 3


async def test_retries_are_bounded(scripted):
    scripted.fail_get = 10
    async with tc.AsyncClient(scripted.target, api_key="k", retries=2, **FAST) as client:
        with pytest.raises(tc.Unavailable) as info:
            await client.get_job("job_1")
    assert scripted.calls["GetJob"] == 3 and info.value.message == "restarting"


async def test_non_idempotent_call_is_not_retried(scripted):
    async with tc.AsyncClient(scripted.target, api_key="k", **FAST) as client:
        with pytest.raises(tc.Unavailable):
            await client.cancel_job("job_1")
        with pytest.raises(tc.Unavailable):
            await client.job_scheduler.CancelJob(js.CancelJobRequest(job_id="job_1"))
    assert scripted.calls["CancelJob"] == 2


async def test_create_job_is_retried_with_the_same_key(scripted):
    async with tc.AsyncClient(scripted.target, api_key="k", **FAST) as client:
        created = await client.create_job({"name": "bot", "base_model": "llama-3.2-1b", "method": "sft"})
        assert created.job.spec.name == "bot"
        key = scripted.request_ids[0]
        assert scripted.request_ids == [key, key] and len(key) >= 16
        assert created.job.id == "job_" + key[:12]
        # the caller's own key is sent as given; the raw stub gets a key made up when it has none
        scripted.request_ids.clear()
        await client.create_job(js.JobSpec(name="bot2"), idempotency_key="my-key-1")
        assert scripted.request_ids == ["my-key-1"]
        request = js.CreateJobRequest(spec=js.JobSpec(name="bot3"))
        await client.job_scheduler.CreateJob(request)
        assert scripted.request_ids[-1] and not request.request_id  # the caller's message is untouched
        with pytest.raises(TypeError):
            await client.create_job(["not", "a", "spec"])


@pytest.mark.parametrize("job_id", sorted(FAILURES))
async def test_each_typed_error(scripted, job_id):
    async with tc.AsyncClient(scripted.target, api_key="k", **FAST) as client:
        with pytest.raises(tc.TuneforgeError) as info:
            await client.list_checkpoints(job_id)
    error = info.value
    assert type(error) is EXPECTED[job_id]
    assert error.code == FAILURES[job_id].code and error.message == FAILURES[job_id].message
    assert scripted.calls["ListCheckpoints"] == 1  # none of these is retried
    if job_id == "invalid":
        assert error.field_violations == [("job_id", "not an id"), ("page_size", "too big")]
        assert "job_id: not an id" in str(error) and error.details
    if job_id in ("plan", "in-use", "has-model"):
        assert isinstance(error, tc.FailedPrecondition) and error.reason == FAILURES[job_id].reason


async def test_unavailable_when_nothing_listens():
    async with tc.AsyncClient(f"127.0.0.1:{free_port('127.0.0.1')}", api_key="k", retries=2, **FAST) as client:
        started = time.monotonic()
        with pytest.raises(tc.Unavailable):
            await client.get_job("job_1")
        with pytest.raises(tc.Unavailable):
            async for _ in client.watch_job("job_1"):
                pass
    assert time.monotonic() - started < 10


# -- watch_job ------------------------------------------------------------------------------------
async def test_watch_job_resumes_after_a_break_without_duplicates(scripted):
    async with tc.AsyncClient(scripted.target, api_key="k", **FAST) as client:
        events = [e async for e in client.watch_job("job_1")]
    assert [e.sequence for e in events] == list(range(1, WATCH_EVENTS + 1))
    assert events[-1].state == js.JOB_STATE_SUCCEEDED
    assert scripted.watch_after == [0, 3]  # reopened from the last event seen


async def test_watch_job_from_a_sequence_and_its_errors(scripted):
    async with tc.AsyncClient(scripted.target, api_key="k", **FAST) as client:
        events = [e.sequence async for e in client.watch_job("job_1", after_sequence=4)]
        assert events == [5, 6]  # the first stream's break is after event 3: not reached
        with pytest.raises(tc.NotFound):
            async for _ in client.watch_job("missing"):
                pass
        with pytest.raises(tc.NotFound):  # typed errors from the raw streaming stub too
            async for _ in client.job_scheduler.WatchJob(js.WatchJobRequest(job_id="missing")):
                pass
        # the raw stub streams as generated (no resumption): the break surfaces after event 3
        scripted.watch_after.clear()
        seen = []
        with pytest.raises(tc.Unavailable):
            async for response in client.job_scheduler.WatchJob(js.WatchJobRequest(job_id="job_1")):
                seen.append(response.event.sequence)
        assert seen == [1, 2, 3] and scripted.watch_after == [0]


# -- the blocking client ----------------------------------------------------------------------------
def test_sync_client_without_an_event_loop(threaded_scripted):
    """Plain code without a loop: results, retries, typed errors, a resumed watch, iterators."""
    server = threaded_scripted
    server.fail_get = 1
    with tc.Client(server.target, api_key="k", timeout=0.5, **FAST) as client:
        assert client.get_job("job_1").id == "job_1"
        assert server.calls["GetJob"] == 2
        assert [c.step for c in client.list_checkpoints("job_1")] == [5, 10]
        assert client.job_scheduler.GetJob(js.GetJobRequest(job_id="job_2")).job.id == "job_2"
        with pytest.raises(tc.PlanRequired):
            client.list_checkpoints("plan")
        with pytest.raises(tc.InvalidArgument) as info:
            client.job_scheduler.ListCheckpoints(js.ListCheckpointsRequest(job_id="invalid"))
        assert info.value.field_violations[0] == ("job_id", "not an id")
        started = time.monotonic()
        with pytest.raises(tc.DeadlineExceeded):
            client.get_job("slow")
        assert time.monotonic() - started < 1.5
        with pytest.raises(tc.Unavailable):
            client.cancel_job("job_1")
        assert server.calls["CancelJob"] == 1
        assert [e.sequence for e in client.watch_job("job_1")] == list(range(1, WATCH_EVENTS + 1))
        assert server.watch_after == [0, 3]
        # a stream left early is closed, and the client keeps working
        for response in client.job_scheduler.WatchJob(js.WatchJobRequest(job_id="job_1")):
            break
        assert client.get_job("job_3").id == "job_3"
    with pytest.raises(RuntimeError):
        client.get_job("job_1")  # closed


async def test_sync_client_in_a_thread_while_a_loop_runs(scripted):
    """The blocking client used from a worker thread while this test's loop serves the calls."""
    scripted.fail_get = 1

    def work():
        with tc.Client(scripted.target, api_key="k", **FAST) as client:
            job = client.get_job("job_1")
            created = client.create_job(js.JobSpec(name="bot"))
            with pytest.raises(tc.ModelInUse):
                client.list_checkpoints("in-use")
            return job, created.job, [e.sequence for e in client.watch_job("job_1")]

    job, created, sequences = await asyncio.to_thread(work)
    assert job.id == "job_1" and scripted.calls["GetJob"] == 2
    assert len(scripted.request_ids) == 2 and len(set(scripted.request_ids)) == 1
    assert created.id == "job_" + scripted.request_ids[0][:12]
    assert sequences == list(range(1, WATCH_EVENTS + 1))


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="unknown service"):
        tc.AsyncClient({"job-schedular": "127.0.0.1:1"})
    with pytest.raises(ValueError):
        tc.AsyncClient("")
    with pytest.raises(ValueError):
        tc.Client("127.0.0.1:1", timeout=0)
    with pytest.raises(FileNotFoundError, match="tuneforge up"):
        tc.Client.discover("/nonexistent/tuneforge-data", api_key="k")


# -- against the real services ----------------------------------------------------------------------
async def _workspace_key(endpoints: dict, plan: int, email: str) -> str:
    from tuneforge import sdk
    from tuneforge.quickstart import create_workspace

    reply = await create_workspace(endpoints, ADMIN, plan, email, "W")
    async with Clients.connect(endpoints, reply.api_key) as clients:
        await sdk.wait_until_authorised(clients)
    return reply.api_key


def _conversations(path, n: int, topic: str):
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"messages": [{"role": "user", "content": f"{topic} question {i}"},
                                               {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                      for i in range(n))
    return path


async def test_real_services_typed_errors_keys_and_pages(services, tmp_path):
    endpoints, _ = services
    key = await _workspace_key(endpoints, common_pb2.PLAN_ENTERPRISE, "ent@example.com")
    starter_key = await _workspace_key(endpoints, common_pb2.PLAN_STARTER, "starter@example.com")
    spec = {"name": "bot-a", "base_model": "llama-3.2-1b", "method": "sft"}
    async with tc.AsyncClient(endpoints, api_key=key) as client:
        assert (await client.get_workspace()).plan == common_pb2.PLAN_ENTERPRISE
        catalog = await client.list_base_models()
        assert "llama-3.2-1b" in [m.id for m in catalog.base_models] and "sft" in catalog.methods
        with pytest.raises(tc.InvalidArgument) as info:
            await client.create_job({"name": "bad name!", "base_model": "gpt-5", "method": "sft"})
        assert [f for f, _ in info.value.field_violations] == ["spec.name", "spec.base_model"]
        with pytest.raises(tc.InvalidArgument):
            await client.validate_job(js.JobSpec(name="x", base_model="llama-3.2-1b", method="rlhf"))
        check = await client.validate_job(spec)
        assert check.resolved_hyperparameters.n_evals > 0
        with pytest.raises(tc.NotFound):
            await client.get_job("job_doesnotexist")
        with pytest.raises(tc.NotFound):
            await client.resolve_model("support-bot")
        first = await client.create_job(spec, idempotency_key="same-key")
        again = await client.create_job(spec, idempotency_key="same-key")
        assert again.job.id == first.job.id  # the server's idempotency, through the client
        second = await client.create_job(dict(spec, name="bot-b"))
        listed = [job.id async for job in client.list_jobs(page_size=1)]  # one page per job
        assert listed == [second.job.id, first.job.id]
    async with tc.AsyncClient(endpoints, api_key=starter_key) as starter:
        with pytest.raises(tc.PlanRequired) as info:
            await starter.assign_model("support-bot", "agent-1")
        assert isinstance(info.value, tc.FailedPrecondition) and "Enterprise" in info.value.message
    async with tc.AsyncClient(endpoints, api_key="tfk_not-a-real-key") as wrong:
        with pytest.raises(tc.Unauthenticated):
            await wrong.get_workspace()
        with pytest.raises(tc.Unauthenticated):
            await wrong.list_topics()

    # the blocking client, discovered from a data directory, in a thread beside this loop
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "stack.json").write_text(json.dumps({"endpoints": endpoints}))

    def blocking():
        with tc.Client.discover(data_dir, api_key=key) as client:
            assert client.endpoints == endpoints
            jobs = [job.id for job in client.list_jobs(page_size=1)]
            with pytest.raises(tc.NotFound):
                client.get_model("support-bot")
            return jobs, client.get_job(first.job.id).spec.name

    assert await asyncio.to_thread(blocking) == ([second.job.id, first.job.id], "bot-a")


async def test_real_services_data_flow_and_watch(services, tmp_path):
    """A Starter workspace: import, topics, a dataset-only job watched to the end, its dataset
    fetched and downloaded, all through the client."""
    endpoints, _ = services
    key = await _workspace_key(endpoints, common_pb2.PLAN_STARTER, "flow@example.com")
    async with tc.AsyncClient(endpoints, api_key=key) as client:
        reply = await client.import_file(_conversations(tmp_path / "a.jsonl", 40, "alpha"), ["alpha"])
        assert (reply.imported, reply.rejected) == (40, 0)
        topics = await client.list_topics()
        assert [(t.topic, t.example_count) for t in topics.topics] == [("alpha", 40)]
        created = await client.create_job({"name": "flow", "base_model": "llama-3.2-1b", "method": "sft"})
        assert created.job.dataset_only
        events = [e async for e in client.watch_job(created.job.id)]
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences)) and events[-1].state == js.JOB_STATE_SUCCEEDED
        # resuming after the last event: nothing new, the job is over
        assert [e async for e in client.watch_job(created.job.id, after_sequence=sequences[-1])] == []
        job = await client.get_job(created.job.id)
        dataset = await client.get_dataset(job.dataset.dataset_id)
        assert (dataset.dataset.train_count, dataset.dataset.test_count) == (36, 4)
        files = await client.download_dataset(job.dataset.dataset_id, tmp_path / "out")
        names = {p.name for p in files}
        assert {"train.jsonl", "test.jsonl"} <= names
        assert len((tmp_path / "out" / "train.jsonl").read_text().splitlines()) == 36
        with pytest.raises(FileNotFoundError):
            await client.import_file(tmp_path / "missing.jsonl")
