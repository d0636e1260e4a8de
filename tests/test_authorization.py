"""Authorization, enumerated (issue 8 item 5; README "Workspaces and API keys").

Every RPC of every service is found from the generated service descriptors (every
``tuneforge.api.*.*_service_pb2`` module), so a new RPC without a case here fails the test. Each is
called through a generic channel (``unary_unary`` / ``unary_stream`` / ``stream_unary`` /
``stream_stream`` with the descriptor's message classes) against the five services in-process:

* with no key, a revoked key, and the administrator token on a workspace RPC: UNAUTHENTICATED;
* admin-only RPCs with a valid workspace key: PERMISSION_DENIED;
* from workspace B with workspace A's ids and names: the same answer as for ids of the same shape
  that exist nowhere (same code, same message, same response once fresh ids and times are masked;
  NOT_FOUND where the RPC takes an object), and no answer to B ever holds one of A's ids or names
  (so List RPCs never show A's objects). A's objects are intact afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import secrets
import sys
import time
from collections.abc import Callable

import grpc
from google.protobuf import text_format
from google.protobuf.message_factory import GetMessageClass

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.api.trainer.v1 import trainer_service_pb2 as tr
from tuneforge.core import subjects
from tuneforge.core.client import Clients
from tuneforge.core.storage import ArtifactStore
from tuneforge.core.workspaces import hash_api_key
from conftest import ADMIN, REPO_ROOT, workspace

OK = grpc.StatusCode.OK
REVOCATION_BOUND_S = 10.0  # a revoked key is refused by every service within this


# -- every RPC, from the descriptors ------------------------------------------------------------------

def all_methods() -> dict[str, object]:
    import tuneforge.api

    methods = {}
    for info in pkgutil.walk_packages(tuneforge.api.__path__, "tuneforge.api."):
        if info.name.endswith("_service_pb2"):
            module = importlib.import_module(info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    methods[f"{service.name}/{method.name}"] = method
    return methods


def endpoint_of(method, endpoints: dict[str, str]) -> str:
    package = method.containing_service.full_name.split(".")[2]  # tuneforge.api.<service>.v1.X
    return endpoints[package.replace("_", "-")]


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: str  # text format of the response(s)


async def call(channels: dict[str, grpc.aio.Channel], method, request, token: str | None,
               timeout: float = 30.0) -> Outcome:
    """Call ``method`` generically: the path and message classes come from its descriptor."""
    channel = channels[method.containing_service.full_name]
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs = dict(request_serializer=GetMessageClass(method.input_type).SerializeToString,
                  response_deserializer=GetMessageClass(method.output_type).FromString)
    metadata = [("authorization", f"Bearer {token}")] if token else []

    async def one():
        yield request

    try:
        if method.client_streaming and method.server_streaming:
            replies = [r async for r in channel.stream_stream(path, **kwargs)(one(), metadata=metadata, timeout=timeout)]
        elif method.client_streaming:
            replies = [await channel.stream_unary(path, **kwargs)(one(), metadata=metadata, timeout=timeout)]
        elif method.server_streaming:
            replies = [r async for r in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=timeout)]
        else:
            replies = [await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=timeout)]
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "", "")
    return Outcome(OK, "", "\n".join(text_format.MessageToString(r) for r in replies))


# -- the cases: one per RPC -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Refs:
    """Identifiers of one workspace's objects (A's, or same-shaped ones that exist nowhere)."""

    workspace_id: str
    job_id: str
    job_name: str
    dataset_id: str
    example_ids: tuple[str, ...]
    topic: str
    model_id: str
    model_name: str
    agent_id: str
    key_id: str
    tag: str  # unique per call, so that requests that create something never collide

    def values(self) -> list[str]:
        return [self.workspace_id, self.job_id, self.job_name, self.dataset_id, *self.example_ids, self.topic,
                self.model_id, self.model_name, self.agent_id, self.key_id, self.tag]


def fake_refs(real: Refs) -> Refs:
    """Ids of the same shape as ``real``'s that exist in no workspace."""
    def like(value: str) -> str:
        head, _, tail = value.rpartition("_")
        return f"{head}_{secrets.token_hex(len(tail) // 2 + 1)[:len(tail)]}" if head else secrets.token_hex(6)
    return Refs(workspace_id=like(real.workspace_id), job_id=like(real.job_id), job_name="job-" + secrets.token_hex(4),
                dataset_id=like(real.dataset_id), example_ids=tuple(like(e) for e in real.example_ids),
                topic="topic-" + secrets.token_hex(4), model_id=like(real.model_id),
                model_name="model-" + secrets.token_hex(4), agent_id="agent-" + secrets.token_hex(4),
                key_id=like(real.key_id), tag=secrets.token_hex(4))


def conversation_line(r: Refs) -> bytes:
    return (json.dumps({"messages": [{"role": "user", "content": f"question about {r.topic} {r.tag}"},
                                     {"role": "assistant", "content": "an answer"}], "topics": [r.topic]}) + "\n").encode()


# kind: "admin" (administrator token only), "global" (no workspace data: the catalog), or
# "scoped" (takes the caller's objects: A's ids from B must be NOT_FOUND), "own" (acts on the
# caller's own workspace; A's ids in the request must change nothing in the answer).
@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    request: Callable[[Refs], object]


CASES: dict[str, Case] = {
    # dataset-builder
    "DatasetBuilderService/ImportExamples": Case("own", lambda r: dsb.ImportExamplesRequest(
        options=dsb.ImportOptions(source_name=f"{r.tag}.jsonl", topics=[r.topic]), chunk=conversation_line(r))),
    "DatasetBuilderService/ListTopics": Case("own", lambda r: dsb.ListTopicsRequest()),
    "DatasetBuilderService/SummarizeExamples": Case("own", lambda r: dsb.SummarizeExamplesRequest(topics=[r.topic])),
    "DatasetBuilderService/ListExamples": Case("own", lambda r: dsb.ListExamplesRequest(topic=r.topic)),
    "DatasetBuilderService/DeleteExamples": Case("own", lambda r: dsb.DeleteExamplesRequest(
        example_ids=list(r.example_ids), topics=[r.topic])),
    "DatasetBuilderService/BuildDataset": Case("own", lambda r: dsb.BuildDatasetRequest(
        topics=[r.topic], method="sft", base_model="llama-3.2-1b", test_fraction=0.2, seed=1)),
    "DatasetBuilderService/ListDatasets": Case("own", lambda r: dsb.ListDatasetsRequest()),
    "DatasetBuilderService/GetDataset": Case("scoped", lambda r: dsb.GetDatasetRequest(dataset_id=r.dataset_id)),
    "DatasetBuilderService/DownloadDataset": Case("scoped", lambda r: dsb.DownloadDatasetRequest(dataset_id=r.dataset_id)),
    # job-scheduler
    "JobSchedulerService/ListBaseModels": Case("global", lambda r: js.ListBaseModelsRequest()),
    "JobSchedulerService/ValidateJob": Case("own", lambda r: js.ValidateJobRequest(spec=js.JobSpec(
        name=r.job_name, base_model="llama-3.2-1b", method="sft", topics=[r.topic]))),
    "JobSchedulerService/CreateJob": Case("own", lambda r: js.CreateJobRequest(spec=js.JobSpec(
        name=r.job_name, base_model="llama-3.2-1b", method="sft", topics=[r.topic]))),
    "JobSchedulerService/GetJob": Case("scoped", lambda r: js.GetJobRequest(job_id=r.job_id)),
    "JobSchedulerService/ListJobs": Case("own", lambda r: js.ListJobsRequest()),
    "JobSchedulerService/CancelJob": Case("scoped", lambda r: js.CancelJobRequest(job_id=r.job_id)),
    "JobSchedulerService/WatchJob": Case("scoped", lambda r: js.WatchJobRequest(job_id=r.job_id)),
    "JobSchedulerService/ListCheckpoints": Case("scoped", lambda r: js.ListCheckpointsRequest(job_id=r.job_id)),
    "JobSchedulerService/CreateWorkspace": Case("admin", lambda r: js.CreateWorkspaceRequest(
        name=r.tag, plan=common_pb2.PLAN_STARTER, owner_email="x@example.com")),
    "JobSchedulerService/GetWorkspace": Case("own", lambda r: js.GetWorkspaceRequest()),
    "JobSchedulerService/CreateApiKey": Case("scoped", lambda r: js.CreateApiKeyRequest(
        workspace_id=r.workspace_id, label=r.tag)),
    "JobSchedulerService/ListApiKeys": Case("scoped", lambda r: js.ListApiKeysRequest(workspace_id=r.workspace_id)),
    "JobSchedulerService/RevokeApiKey": Case("scoped", lambda r: js.RevokeApiKeyRequest(key_id=r.key_id)),
    # trainer
    "TrainerService/ListBackends": Case("global", lambda r: tr.ListBackendsRequest()),
    "TrainerService/GetWorkerStatus": Case("own", lambda r: tr.GetWorkerStatusRequest()),
    # model-registry
    "ModelRegistryService/GetModel": Case("scoped", lambda r: mr.GetModelRequest(model=r.model_id)),
    "ModelRegistryService/ListModels": Case("own", lambda r: mr.ListModelsRequest()),
    "ModelRegistryService/ResolveModel": Case("scoped", lambda r: mr.ResolveModelRequest(name=r.model_name)),
    "ModelRegistryService/AssignModelToAgent": Case("scoped", lambda r: mr.AssignModelToAgentRequest(
        model=r.model_name, agent_id=r.tag)),
    "ModelRegistryService/UnassignModel": Case("scoped", lambda r: mr.UnassignModelRequest(
        model=r.model_id, agent_id=r.agent_id)),
    "ModelRegistryService/ListAssignments": Case("scoped", lambda r: mr.ListAssignmentsRequest(model=r.model_id)),
    "ModelRegistryService/DownloadModel": Case("scoped", lambda r: mr.DownloadModelRequest(model=r.model_name)),
    "ModelRegistryService/DeleteModel": Case("scoped", lambda r: mr.DeleteModelRequest(model=r.model_id)),
    # notifier
    "NotifierService/ListDeliveries": Case("own", lambda r: nt.ListDeliveriesRequest(job_id=r.job_id)),
    "NotifierService/SendTestNotification": Case("own", lambda r: nt.SendTestNotificationRequest()),
}
# RPCs that take the administrator token as well as a workspace key (job_scheduler/api_keys.py)
ADMIN_OR_WORKSPACE = {"JobSchedulerService/CreateApiKey", "JobSchedulerService/ListApiKeys",
                      "JobSchedulerService/RevokeApiKey"}

_FRESH = [
    (re.compile(r"\b(?:ws|job|ds|ex|mdl|key|dlv|evt|del)_[0-9a-f]{8,40}\b"), "<id>"),
    (re.compile(r"tfk_[A-Za-z0-9_-]+"), "<api key>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<hash>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<uuid>"),  # event ids
    (re.compile(r"(seconds|nanos): \d+"), r"\1: <t>"),
    (re.compile(r"\d{8}T\d{6,}Z"), "<t>"),  # times in file names (a delivery's .eml)
    (re.compile(r"worker_id: \"[^\"]*\""), "worker_id: <w>"),
]


def masked(text: str, *refs: Refs) -> str:
    """``text`` with the identifiers of ``refs``, fresh ids and times masked."""
    for value in sorted((v for r in refs for v in r.values()), key=len, reverse=True):
        text = text.replace(value, "<ref>")
    for pattern, replacement in _FRESH:
        text = pattern.sub(replacement, text)
    return text


def test_every_rpc_has_a_case():
    methods = set(all_methods())
    assert len(methods) >= 30
    assert not methods - set(CASES), f"RPCs without an authorization case: {sorted(methods - set(CASES))}"
    assert not set(CASES) - methods, f"cases for RPCs that do not exist: {sorted(set(CASES) - methods)}"


# -- the sweep ------------------------------------------------------------------------------------------

async def _wait(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _workspace_a(services, tmp_path) -> tuple[Clients, Refs, str]:
    """Workspace A with examples, a job (failed: too few examples) and its dataset, a delivery,
    a registered model assigned to an agent, and a second API key. Returns the clients, A's refs
    and A's first key."""
    endpoints, settings = services
    admin = Clients.connect(endpoints, ADMIN)
    created = await admin.job_scheduler.CreateWorkspace(js.CreateWorkspaceRequest(
        name="A", plan=common_pb2.PLAN_ENTERPRISE, owner_email="owner-a@example.com"))
    await admin.close()
    a = Clients.connect(endpoints, created.api_key)
    await sdk.wait_until_authorised(a)
    topic = "secret-topic-" + secrets.token_hex(3)
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"private question {i}"},
                                                     {"role": "assistant", "content": f"private answer {i}"}],
                                        "topics": [topic]}) + "\n" for i in range(12)))
    assert (await sdk.import_file(a, data)).imported == 12
    examples = (await a.dataset_builder.ListExamples(dsb.ListExamplesRequest(topic=topic))).examples
    job_name = "a-private-job"
    job = (await a.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
        name=job_name, base_model="llama-3.2-1b", method="sft", topics=[topic])))).job
    job = await _wait(lambda: _terminal(a, job.id), what="A's job to end")
    assert job.dataset.dataset_id
    await _wait(lambda: _deliveries(a, job.id), what="A's email")
    # A registered model: the registry's own event, with an adapter in the artifact store.
    store = ArtifactStore(settings.resolved_artifact_url())
    adapter = f"runs/{created.workspace.id}/{job.id}/attempt-1/adapter"
    store.put_bytes(f"{adapter}/adapter_config.json", b'{"r": 8}')
    store.put_bytes(f"{adapter}/adapter_model.safetensors", b"\0" * 64)
    model_name = "a-private-model"
    bus = services.apps["job-scheduler"].bus
    await bus.publish(subjects.MODEL_REGISTRATION_REQUESTED, ev.ModelRegistrationRequested(
        meta=bus.meta(created.workspace.id, job.id), model_name=model_name, base_model="llama-3.2-1b",
        method="sft", adapter_path=adapter, dataset=job.dataset))
    models = await _wait(lambda: _models(a), what="A's model")
    agent = "agent-a-" + secrets.token_hex(3)
    await a.model_registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model=model_name, agent_id=agent))
    second = await a.job_scheduler.CreateApiKey(js.CreateApiKeyRequest(label="second"))
    refs = Refs(workspace_id=created.workspace.id, job_id=job.id, job_name=job_name,
                dataset_id=job.dataset.dataset_id, example_ids=tuple(e.example_id for e in examples[:3]), topic=topic,
                model_id=models[0].id, model_name=model_name, agent_id=agent, key_id=second.key.id,
                tag=secrets.token_hex(4))
    return a, refs, created.api_key


async def _terminal(clients, job_id):
    job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job_id))).job
    return job if job.state in (js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED, js.JOB_STATE_CANCELLED) else None


async def _deliveries(clients, job_id):
    return list((await clients.notifier.ListDeliveries(nt.ListDeliveriesRequest(job_id=job_id))).deliveries)


async def _models(clients):
    return list((await clients.model_registry.ListModels(mr.ListModelsRequest())).models)


async def _refused_everywhere(channels, methods, token) -> bool:
    probes = ["DatasetBuilderService/ListTopics", "JobSchedulerService/GetWorkspace", "TrainerService/ListBackends",
              "ModelRegistryService/ListModels", "NotifierService/ListDeliveries"]
    for name in probes:
        outcome = await call(channels, methods[name], GetMessageClass(methods[name].input_type)(), token)
        if outcome.code != grpc.StatusCode.UNAUTHENTICATED:
            return False
    return True


async def test_every_rpc_refuses_and_hides_across_workspaces(services, tmp_path):
    endpoints, _ = services
    methods = all_methods()
    assert set(methods) == set(CASES), "test_every_rpc_has_a_case lists the difference"
    channels = {m.containing_service.full_name: grpc.aio.insecure_channel(endpoint_of(m, endpoints))
                for m in methods.values()}
    a, refs, a_key = await _workspace_a(services, tmp_path)
    b = await workspace(endpoints)  # Enterprise too: plan checks must not answer before ownership
    b_key = (await b.job_scheduler.CreateApiKey(js.CreateApiKeyRequest(label="b"))).api_key
    try:
        # A revokes its second key; every service refuses it within the bound.
        second = await a.job_scheduler.CreateApiKey(js.CreateApiKeyRequest(label="to revoke"))
        revoked = second.api_key
        async with Clients.connect(endpoints, revoked) as check:
            await sdk.wait_until_authorised(check)
        started = time.monotonic()
        await a.job_scheduler.RevokeApiKey(js.RevokeApiKeyRequest(key_id=second.key.id))
        await _wait(lambda: _refused_everywhere(channels, methods, revoked), timeout=REVOCATION_BOUND_S,
                    what="the revoked key to be refused by every service")
        print(f"revocation reached every service in {time.monotonic() - started:.2f} s")

        # The trainer's first ListBackends imports torch (seconds on a busy machine): not in the sweep.
        await b.trainer.ListBackends(tr.ListBackendsRequest(), timeout=180)
        a_before = await _snapshot(a, refs)
        # A's ids: B can never come by them; A's names: B may use the same names for its own objects
        a_ids = [refs.workspace_id, refs.job_id, refs.dataset_id, *refs.example_ids, refs.model_id, refs.key_id,
                 a_key, hash_api_key(a_key)]
        a_names = [refs.job_name, refs.topic, refs.model_name, refs.agent_id]
        decoy = fake_refs(refs)  # one for the sweep: what B does with A's names it also does with these
        sent_by_b = ""
        for name, case in CASES.items():
            method = methods[name]
            request = case.request(refs)
            for token, label in ((None, "no key"), (revoked, "a revoked key"), ("tfk_" + secrets.token_urlsafe(32),
                                                                               "an unknown key")):
                outcome = await call(channels, method, request, token)
                assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (name, label, outcome)
            if name not in ADMIN_OR_WORKSPACE and case.kind != "admin":
                outcome = await call(channels, method, request, ADMIN)
                assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (name, "admin token", outcome)
            if case.kind == "admin":
                outcome = await call(channels, method, request, b_key)
                assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, (name, outcome)
                assert outcome.details == "administrator token required"
                continue
            # B with A's ids vs B with ids that exist nowhere: indistinguishable.
            with_a = await call(channels, method, request, b_key)
            with_decoy = await call(channels, method, case.request(decoy), b_key)
            if case.kind == "scoped":
                assert with_a.code == grpc.StatusCode.NOT_FOUND, (name, with_a)
            if name == "JobSchedulerService/CreateJob":  # B's two jobs end alike: A's examples are not B's
                assert with_a.code == OK, with_a
                with_a.response += await _ending(b, with_a.response)
                with_decoy.response += await _ending(b, with_decoy.response)
            assert with_a.code == with_decoy.code, (name, with_a, with_decoy)
            assert masked(with_a.details, refs, decoy) == masked(with_decoy.details, refs, decoy), (name, with_a, with_decoy)
            assert masked(with_a.response, refs, decoy) == masked(with_decoy.response, refs, decoy), \
                (name, with_a, with_decoy)
            sent = text_format.MessageToString(request)
            sent_by_b += sent
            answer = with_a.response + with_a.details
            for secret in a_ids:  # never, unless echoing B's own request
                assert secret in sent or secret not in answer, (name, secret, with_a)
            for secret in a_names:  # never, unless B has used the name for its own objects
                assert secret in sent_by_b or secret not in answer, (name, secret, with_a)
        assert await _snapshot(a, refs) == a_before, "B's calls changed workspace A"
        # A itself still reaches what B could not (the refusals above were about B, not the ids).
        assert (await a.job_scheduler.GetJob(js.GetJobRequest(job_id=refs.job_id))).job.id == refs.job_id
        assert (await a.model_registry.GetModel(mr.GetModelRequest(model=refs.model_id))).model.agent_ids == [refs.agent_id]
    finally:
        await a.close()
        await b.close()
        for channel in channels.values():
            await channel.close()


async def _ending(clients: Clients, created: str) -> str:
    """The final state and failure reason of the job in a CreateJob response (text format)."""
    job_id = re.search(r'id: "(job_[0-9a-f]+)"', created).group(1)
    job = await _wait(lambda: _terminal(clients, job_id), what="B's job to end")
    return f"\nended {js.JobState.Name(job.state)}: {job.failure_reason}"


async def _snapshot(a: Clients, refs: Refs) -> str:
    """What A has, to compare before and after B's calls."""
    parts = [
        await a.dataset_builder.ListTopics(dsb.ListTopicsRequest()),
        await a.dataset_builder.ListExamples(dsb.ListExamplesRequest(page_size=1000)),
        await a.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=refs.dataset_id)),
        await a.job_scheduler.GetJob(js.GetJobRequest(job_id=refs.job_id)),
        await a.model_registry.ListModels(mr.ListModelsRequest()),
        await a.job_scheduler.ListApiKeys(js.ListApiKeysRequest()),
    ]
    return "\n".join(text_format.MessageToString(p) for p in parts)


async def test_worker_status_shows_the_current_job_to_its_workspace_only(services):
    endpoints, _ = services
    a = await workspace(endpoints)
    b = await workspace(endpoints)
    a_id = (await a.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace.id
    status = services.apps["trainer"].worker.status
    status.current_job_id, status.current_workspace_id, status.current_step = "job_0123456789abcdef0123", a_id, 7
    try:
        seen_by_a = await a.trainer.GetWorkerStatus(tr.GetWorkerStatusRequest())
        seen_by_b = await b.trainer.GetWorkerStatus(tr.GetWorkerStatusRequest())
        assert (seen_by_a.current_job_id, seen_by_a.current_step) == ("job_0123456789abcdef0123", 7)
        assert (seen_by_b.current_job_id, seen_by_b.current_step) == ("", 0)
    finally:
        status.current_job_id, status.current_workspace_id, status.current_step = "", "", 0
        await a.close()
        await b.close()


# -- API keys: the rules ----------------------------------------------------------------------------------

async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


async def test_api_key_rules_and_cli(services, tmp_path):
    endpoints, _ = services
    admin = Clients.connect(endpoints, ADMIN)
    created = await admin.job_scheduler.CreateWorkspace(js.CreateWorkspaceRequest(
        name="K", plan=common_pb2.PLAN_STARTER, owner_email="k@example.com"))
    ws_id, first = created.workspace.id, created.api_key
    owner = Clients.connect(endpoints, first)
    await sdk.wait_until_authorised(owner)
    try:
        listed = (await owner.job_scheduler.ListApiKeys(js.ListApiKeysRequest())).keys
        assert [(k.prefix, k.label) for k in listed] == [(first[:12], "first key")]
        # a second key: listed by prefix; the listing never holds a secret or a hash
        ci = await owner.job_scheduler.CreateApiKey(js.CreateApiKeyRequest(label="ci"))
        assert ci.api_key.startswith("tfk_") and ci.key.prefix == ci.api_key[:12] and ci.key.id.startswith("key_")
        reply = await owner.job_scheduler.ListApiKeys(js.ListApiKeysRequest(workspace_id=ws_id))
        assert [k.label for k in reply.keys] == ["first key", "ci"]
        raw = reply.SerializeToString()
        for secret in (first, ci.api_key, hash_api_key(first), hash_api_key(ci.api_key)):
            assert secret.encode() not in raw
        # the owner revokes the first key by its prefix; it cannot revoke the last one
        assert (await owner.job_scheduler.RevokeApiKey(js.RevokeApiKeyRequest(key_id=first[:12]))).key.label == \
            "first key"
        ci_clients = Clients.connect(endpoints, ci.api_key)
        assert await _code(ci_clients.job_scheduler.RevokeApiKey(js.RevokeApiKeyRequest(key_id=ci.key.id))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert await _code(ci_clients.job_scheduler.RevokeApiKey(js.RevokeApiKeyRequest(key_id=first[:12]))) == \
            grpc.StatusCode.NOT_FOUND  # already revoked
        # the administrator: workspace_id required; may revoke the last key, and recovers the workspace
        assert await _code(admin.job_scheduler.ListApiKeys(js.ListApiKeysRequest())) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert await _code(admin.job_scheduler.ListApiKeys(js.ListApiKeysRequest(workspace_id="ws_nope"))) == \
            grpc.StatusCode.NOT_FOUND
        await admin.job_scheduler.RevokeApiKey(js.RevokeApiKeyRequest(workspace_id=ws_id, key_id=ci.key.id))
        assert await _code(ci_clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())) == \
            grpc.StatusCode.UNAUTHENTICATED  # the job-scheduler applies the change at once
        assert (await admin.job_scheduler.ListApiKeys(js.ListApiKeysRequest(workspace_id=ws_id))).keys == []
        await ci_clients.close()

        # the CLI (a real process): the administrator recovers the workspace, the owner lists and revokes
        data_dir = tmp_path / "cli"
        data_dir.mkdir()
        (data_dir / "stack.json").write_text(json.dumps({"endpoints": endpoints}))
        (data_dir / "admin_token").write_text(ADMIN)
        out = await _cli(data_dir, None, "workspaces", "keys", "create", "--workspace", ws_id, "--label", "recovery")
        recovered = re.search(r"API key \(shown once\): (tfk_\S+)", out).group(1)
        out = await _cli(data_dir, recovered, "workspaces", "keys", "create", "--label", "laptop")
        laptop = re.search(r"API key \(shown once\): (tfk_\S+)", out).group(1)
        out = await _cli(data_dir, recovered, "workspaces", "keys", "list")
        assert laptop[:12] in out and recovered[:12] in out and "laptop" in out
        assert laptop not in out and recovered not in out
        listing = json.loads(await _cli(data_dir, laptop, "workspaces", "keys", "list", "--json"))
        assert [k["label"] for k in listing["keys"]] == ["recovery", "laptop"]
        await _cli(data_dir, laptop, "workspaces", "keys", "revoke", recovered[:12])
        out = await _cli(data_dir, laptop, "workspaces", "keys", "revoke", laptop[:12], code=1)
        assert out.startswith("tuneforge: error: FAILED_PRECONDITION: this is the workspace's last API key")
    finally:
        await owner.close()
        await admin.close()


async def _cli(data_dir, api_key, *args, code=0) -> str:
    env = {**os.environ, "TUNEFORGE_DATA_DIR": str(data_dir)}
    env.pop("TUNEFORGE_API_KEY", None)
    env.pop("TUNEFORGE_ADMIN_TOKEN", None)
    argv = [sys.executable, "-m", "tuneforge.cli", *(["--api-key", api_key] if api_key else []), *args]
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = out.decode()
    assert proc.returncode == code, (args, text)
    assert "Traceback" not in text
    return text



async def test_keys_from_before_key_records_are_backfilled(tmp_path):
    """A workspace created by an older release has key hashes but no key records: the job-scheduler
    gives them records at start (listed without a prefix, revocable by id), once."""
    from sqlalchemy import select

    from tuneforge.core.db import Database
    from tuneforge.job_scheduler import api_keys
    from tuneforge.job_scheduler.models import ApiKeyRecordRow, Base, WorkspaceSecretRow

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'js.db'}")
    try:
        await db.create_all(Base)
        async with db.session() as session, session.begin():
            session.add(WorkspaceSecretRow(id="ws_old", name="old", plan=common_pb2.PLAN_PRO, owner_email="o@x.io",
                                           revision=3, api_key_hashes=hash_api_key("tfk_old")))
        assert await api_keys.backfill(db) == 1
        assert await api_keys.backfill(db) == 0
        async with db.session() as session:
            rows = (await session.execute(select(ApiKeyRecordRow))).scalars().all()
        assert [(r.workspace_id, r.key_hash, r.prefix, r.label, r.revoked_at) for r in rows] == [
            ("ws_old", hash_api_key("tfk_old"), "", api_keys.LEGACY_LABEL, None)]
    finally:
        await db.close()


async def test_a_lookup_racing_a_revocation_is_not_cached(tmp_path):
    """WorkspaceDirectory: a key look-up that read the database just before a revocation was
    applied must not put the revoked key into the cache (it would then work until the next update)."""
    import contextlib

    from tuneforge.core.db import Database
    from tuneforge.core.workspaces import DirectoryBase, WorkspaceDirectory

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'dir.db'}")
    await db.create_all(DirectoryBase)
    directory = WorkspaceDirectory(db)
    key = "tfk_" + secrets.token_urlsafe(32)

    def update(revision: int, *keys: str) -> ev.WorkspaceUpdated:
        return ev.WorkspaceUpdated(workspace_id="ws_race", name="race", plan=common_pb2.PLAN_PRO,
                                   owner_email="r@x.io", revision=revision, api_key_hashes=[hash_api_key(k) for k in keys])

    try:
        assert await directory.apply(update(1, key))
        read_done, release = asyncio.Event(), asyncio.Event()
        plain_session = db.session

        @contextlib.asynccontextmanager
        async def paused_session():  # the look-up's session: hold it open after the read
            async with plain_session() as session:
                yield session
            read_done.set()
            await release.wait()

        db.session = paused_session
        lookup = asyncio.create_task(directory.authenticate(key))
        await read_done.wait()
        db.session = plain_session
        assert await directory.apply(update(2))  # the key is revoked while the look-up is in flight
        release.set()
        assert (await lookup) is not None  # read before the revocation: this call may still pass ...
        assert await directory.authenticate(key) is None  # ... but the next one is refused
    finally:
        await db.close()
