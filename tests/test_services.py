"""The services in one event loop against a real nats-server and real gRPC on loopback:
authentication, workspace isolation, validation errors with field violations, plans, the dataset
flow, min_examples and cancellation."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.api.trainer.v1 import trainer_service_pb2 as tr
from tuneforge.core.client import Clients
from tuneforge.core.errors import field_violations
from conftest import ADMIN, workspace  # noqa: F401  (fixture `services` lives in conftest)

def conversations(path, n, topic):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{topic} question {i}"},
                                              {"role": "assistant", "content": f"answer {i}"}],
                                 "topics": [topic]}) + "\n")
    return path


def spec(**kw) -> js.JobSpec:
    base = dict(name="job-a", base_model="llama-3.2-1b", method="sft")
    base.update(kw)
    return js.JobSpec(**base)


async def test_every_rpc_needs_a_key(services):
    endpoints, _ = services
    anonymous = Clients.connect(endpoints, None)
    wrong = Clients.connect(endpoints, "tfk_not-a-real-key")
    try:
        for clients in (anonymous, wrong):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await clients.job_scheduler.ListJobs(js.ListJobsRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await clients.trainer.ListBackends(tr.ListBackendsRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await wrong.job_scheduler.CreateWorkspace(js.CreateWorkspaceRequest(
                name="x", plan=common_pb2.PLAN_STARTER, owner_email="a@b.co"))
        # an unknown key is no credential at all; a valid workspace key gets PERMISSION_DENIED
        # (tests/test_authorization.py)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await anonymous.close()
        await wrong.close()


async def test_invalid_job_lists_every_field(services):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        bad = spec(name="bad name!", base_model="gpt-5", method="rlhf",
                   hyperparameters=common_pb2.Hyperparameters(learning_rate=2.0, batch_size=0))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [f for f, _ in field_violations(info.value)]
        assert fields == ["spec.name", "spec.base_model", "spec.method",
                          "spec.hyperparameters.learning_rate", "spec.hyperparameters.batch_size"]
        check = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(
            spec=spec(hyperparameters=common_pb2.Hyperparameters(learning_rate=5e-3)))
        )
        assert check.resolved_hyperparameters.n_evals == 20 and not check.dataset_only
        assert any("unstable" in w for w in check.warnings)
        models = await clients.job_scheduler.ListBaseModels(js.ListBaseModelsRequest())
        assert "llama-3.2-1b" in [m.id for m in models.base_models] and "sft" in models.methods
    finally:
        await clients.close()


async def test_dataset_only_plan_and_isolation(services, tmp_path):
    endpoints, settings = services
    starter = await workspace(endpoints, common_pb2.PLAN_STARTER, "starter@example.com")
    other = await workspace(endpoints)
    try:
        reply = await sdk.import_file(starter, conversations(tmp_path / "a.jsonl", 50, "alpha"))
        assert (reply.imported, reply.rejected) == (50, 0)
        created = await starter.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec(), request_id="r1"))
        assert created.job.dataset_only and any("dataset only" in w for w in created.warnings)
        again = await starter.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec(), request_id="r1"))
        assert again.job.id == created.job.id  # idempotent retry
        events = await sdk.watch_job(starter, created.job.id, timeout=30)
        assert [e.state for e in events if e.kind == "state_changed"] == [
            js.JOB_STATE_VALIDATING, js.JOB_STATE_BUILDING_DATASET, js.JOB_STATE_SUCCEEDED]
        job = (await starter.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert (job.dataset.train_count, job.dataset.test_count) == (45, 5)  # below min_examples is fine here
        # another workspace sees nothing of it
        for call in (
            other.job_scheduler.GetJob(js.GetJobRequest(job_id=job.id)),
            other.dataset_builder.GetDataset(__import__("tuneforge.api.dataset_builder.v1.dataset_builder_service_pb2",
                                                        fromlist=["x"]).GetDatasetRequest(dataset_id=job.dataset.dataset_id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Enterprise-only actions are refused by the server on a Starter workspace
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await starter.model_registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="x", agent_id="a1"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for _ in range(50):
            deliveries = (await starter.notifier.ListDeliveries(nt.ListDeliveriesRequest(job_id=job.id))).deliveries
            if deliveries and deliveries[0].state == nt.DELIVERY_STATE_SENT:
                break
            await asyncio.sleep(0.1)
        assert len(deliveries) == 1 and deliveries[0].recipient == "starter@example.com"
        eml = open(deliveries[0].destination).read()
        assert "job-a" in eml and job.dataset.dataset_id in eml
    finally:
        await starter.close()
        await other.close()


async def test_min_examples_refusal_says_how_many_each_step_left(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, conversations(tmp_path / "a.jsonl", 120, "alpha"))
        await sdk.import_file(clients, conversations(tmp_path / "b.jsonl", 150, "beta"))
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec(topics=["alpha"])))
        events = await sdk.watch_job(clients, created.job.id, timeout=30)
        assert events[-1].state == js.JOB_STATE_FAILED
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert job.failure_kind == common_pb2.FAILURE_KIND_USER
        assert "at least 200 examples (min_examples) but only 120 remain" in job.failure_reason
        assert ("270 examples in the workspace -> 120 conversations examples in alpha -> 120 after removing "
                "duplicates -> 108 train / 12 test") in job.failure_reason
    finally:
        await clients.close()


async def test_cancel_before_training(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec()))
        cancelled = await clients.job_scheduler.CancelJob(js.CancelJobRequest(job_id=created.job.id))
        assert cancelled.job.state == js.JOB_STATE_CANCELLED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await clients.job_scheduler.CancelJob(js.CancelJobRequest(job_id=created.job.id))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        events = await sdk.watch_job(clients, created.job.id, timeout=10)
        assert events[-1].state == js.JOB_STATE_CANCELLED
        # The dataset build that was already requested does not resurrect the job.
        await asyncio.sleep(0.5)
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert job.state == js.JOB_STATE_CANCELLED
    finally:
        await clients.close()


async def test_a_build_that_keeps_failing_fails_the_job_as_a_system_error(services, tmp_path):
    """A system fault is retried with back-off, then the job FAILS (it never hangs in BUILDING_DATASET)."""
    endpoints, _ = services
    builder = services.apps["dataset-builder"]
    attempts = []

    def broken_write(*args):
        attempts.append(1)
        raise OSError("artifact store unavailable")

    builder._write = broken_write
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, conversations(tmp_path / "a.jsonl", 30, "alpha"))
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec()))
        events = await sdk.watch_job(clients, created.job.id, timeout=60)
        assert events[-1].state == js.JOB_STATE_FAILED
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert job.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
        assert "after 5 attempts" in job.failure_reason and "artifact store unavailable" in job.failure_reason
        assert len(attempts) == 5
    finally:
        await clients.close()


async def test_health_and_reflection_on_every_service(services):
    """Every service answers health checks (no key needed) and lists its API by reflection."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    endpoints, _ = services
    expected = {
        "dataset-builder": "tuneforge.api.dataset_builder.v1.DatasetBuilderService",
        "job-scheduler": "tuneforge.api.job_scheduler.v1.JobSchedulerService",
        "trainer": "tuneforge.api.trainer.v1.TrainerService",
        "model-registry": "tuneforge.api.model_registry.v1.ModelRegistryService",
        "notifier": "tuneforge.api.notifier.v1.NotifierService",
    }
    for name, target in endpoints.items():
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=expected[name]), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def one_request():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for response in stub.ServerReflectionInfo(one_request(), timeout=5):
                listed = {s.name for s in response.list_services_response.service}
                assert expected[name] in listed and "grpc.health.v1.Health" in listed
                break
    # Shutting a service down flips its health to NOT_SERVING before the port closes.
    app = services.apps["notifier"]
    await app._health.enter_graceful_shutdown()
    async with grpc.aio.insecure_channel(endpoints["notifier"]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
