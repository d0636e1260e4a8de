"""Base-model capabilities enforced before training (core.capabilities): what an example needs,
the refusal that names the models that can take the data; then through the real services:
SummarizeExamples, ValidateJob and CreateJob refusing tool-call and reasoning data on a model
without the capability, the topic filter that leaves it out, the warning when the dataset-builder
cannot be asked, the build-time refusal (a USER failure), and dataset-only plans."""

from __future__ import annotations

import json

import grpc
import pytest

from conftest import workspace
from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core import capabilities
from tuneforge.core.capabilities import REASONING, TOOL_CALLING, DataNeeds
from tuneforge.core.errors import field_violations
from tuneforge.core.nats_server import free_port
from tuneforge.core.settings import Settings
from tuneforge.dataset_builder import formats
from tuneforge.job_scheduler.capability_check import DatasetBuilderLine
from tuneforge.plugins import get_registry

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def plain(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def tool_call(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Weather in city {i}?"},
                         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                             "name": "get_weather", "arguments": {"city": f"C{i}"}}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": f"{i} degrees"},
                         {"role": "assistant", "content": f"It is {i} degrees."}], "tools": TOOLS}


def reasoning(i: int) -> dict:
    if i % 2:
        return {"messages": [{"role": "user", "content": f"What is 6 x {i}?"},
                             {"role": "assistant", "content": str(6 * i), "reasoning": f"6 times {i} is {6 * i}"}]}
    return {"messages": [{"role": "user", "content": f"What is 7 x {i}?"},
                         {"role": "assistant", "content": f"<think>7 times {i}</think>{7 * i}"}]}


def body(obj: dict) -> dict:
    """The universal form, as stored."""
    example, errors = formats.parse_line(json.dumps(obj).encode(), 1)
    assert not errors, errors
    return example.body


def canonical(obj: dict) -> str:
    return formats.parse_line(json.dumps(obj).encode(), 1)[0].canonical_json


# ====================================================================================================
# pure: what an example needs
# ====================================================================================================

NEEDS_CASES = [
    ("plain", plain(1), set()),
    ("text", {"text": "plain text with <think>x</think> in it"}, set()),
    ("instruction", {"prompt": "p", "completion": "c"}, set()),
    ("tool-call", tool_call(1), {TOOL_CALLING}),
    ("tools-declared-only", {**plain(1), "tools": TOOLS}, {TOOL_CALLING}),
    ("assistant-tool-calls-in-preferred-output", {
        "input": {"messages": [U], "tools": TOOLS},
        "preferred_output": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": "{}"}}]}],
        "non_preferred_output": [A]}, {TOOL_CALLING}),
    ("reasoning-field", reasoning(1), {REASONING}),
    ("think-block", reasoning(2), {REASONING}),
    ("think-block-multiline-in-preference", {"prompt": "q", "chosen": "<think>\nstep 1\nstep 2\n</think>\nyes",
                                             "rejected": "no"}, {REASONING}),
    ("empty-reasoning-field", {"messages": [U, {**A, "reasoning": "  "}]}, set()),
    ("think-in-user-content-only", {"messages": [{"role": "user", "content": "what does <think>x</think> mean?"}, A]},
     set()),
    ("unclosed-think", {"messages": [U, {"role": "assistant", "content": "I <think> so"}]}, set()),
    ("close-tag-only", {"messages": [U, {"role": "assistant", "content": "tags like </think> close a block"}]}, set()),
    ("both", {"messages": [U, {"role": "assistant", "content": "<think>look it up</think>",
                               "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": {}}}]},
                           {"role": "tool", "tool_call_id": "c", "content": "sunny"}, A], "tools": TOOLS},
     {TOOL_CALLING, REASONING}),
]


@pytest.mark.parametrize("obj,expected", [c[1:] for c in NEEDS_CASES], ids=[c[0] for c in NEEDS_CASES])
def test_what_an_example_needs(obj, expected):
    b = body(obj)
    assert capabilities.needs(b) == expected
    # the prefilter never misses an example that needs a capability
    text = canonical(obj)
    for capability in expected:
        assert capabilities.is_candidate(text, capability), (capability, text)


def test_content_parts_are_checked_after_joining():
    """A <think> block split over text parts is one block once the parts are joined."""
    obj = {"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "<thi"},
                                                             {"type": "text", "text": "nk>hmm</think>ok"}]}]}
    assert capabilities.needs(body(obj)) == {REASONING}
    assert capabilities.is_candidate(canonical(obj), REASONING)


def test_summarize_counts_each_example_once():
    bodies = [body(o) for o in [plain(1), tool_call(1), tool_call(2), reasoning(1), NEEDS_CASES[-1][1]]]
    assert capabilities.summarize(bodies) == DataNeeds(example_count=5, tool_call_example_count=3,
                                                       reasoning_example_count=2)
    # a prefiltered subset counted against the whole
    assert capabilities.summarize(bodies[1:3], example_count=100) == DataNeeds(100, 2, 0)
    assert DataNeeds(10, 0, 0).required == () and DataNeeds(10, 1, 2).required == (TOOL_CALLING, REASONING)


# ====================================================================================================
# pure: the refusal and the models it names
# ====================================================================================================

CATALOG = {"small": (), "tools-b": (TOOL_CALLING, "planning"), "tools-a": (TOOL_CALLING,),
           "thinker": (REASONING,)}


def test_refusal_says_how_many_need_what_and_names_the_capable_models_sorted():
    message = capabilities.refusal("small", (), DataNeeds(40, 6, 0), CATALOG)
    assert message.startswith("small cannot be fine-tuned on this data: 6 of 40 examples have tool calls")
    assert "need tool_calling" in message and "small does not have tool_calling" in message
    assert "Base models that can take this data: tools-a, tools-b." in message
    assert "topic filter" in message
    # a model with the capability takes the data; data that needs nothing suits any model
    assert capabilities.refusal("tools-a", CATALOG["tools-a"], DataNeeds(40, 6, 0), CATALOG) is None
    assert capabilities.refusal("small", (), DataNeeds(40, 0, 0), CATALOG) is None
    message = capabilities.refusal("tools-b", CATALOG["tools-b"], DataNeeds(40, 0, 3), CATALOG)
    assert "3 of 40 examples have reasoning traces" in message and "Base models that can take this data: thinker." \
        in message and "tool calls" not in message


def test_refusal_when_no_model_takes_all_of_the_data():
    message = capabilities.refusal("tools-a", CATALOG["tools-a"], DataNeeds(40, 6, 3), CATALOG)
    assert "3 of 40 examples have reasoning traces" in message and "6 of 40" not in message  # only what is missing
    assert "No base model in the catalog has tool_calling and reasoning together" in message
    assert "tool_calling: tools-a, tools-b; reasoning: thinker" in message
    message = capabilities.refusal("small", (), DataNeeds(40, 6, 3), {"small": ()})
    assert "6 of 40 examples have tool calls" in message and "3 of 40 examples have reasoning" in message
    assert "tool_calling: none; reasoning: none" in message


def test_the_catalog_from_the_registry():
    catalog = capabilities.catalog_of(get_registry().base_models)
    assert catalog["llama-3.2-1b"] == ()
    tool_models = capabilities.capable_models(catalog, [TOOL_CALLING])
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b"} <= set(tool_models)
    assert "llama-3.2-1b" not in tool_models and tool_models == sorted(tool_models)


# ====================================================================================================
# through the services
# ====================================================================================================

def write(path, objs, topic):
    path.write_text("".join(json.dumps({**o, "topics": [topic]}) + "\n" for o in objs))
    return path


def job(**kw) -> js.JobSpec:
    return js.JobSpec(**{"name": "cap-job", "base_model": "llama-3.2-1b", "method": "sft", **kw})


async def summarize(clients, topics=(), kind="conversations") -> tuple[int, int, int]:
    r = await clients.dataset_builder.SummarizeExamples(dsb.SummarizeExamplesRequest(topics=list(topics),
                                                                                     dataset_kind=kind))
    return r.example_count, r.tool_call_example_count, r.reasoning_example_count


async def refused(call) -> tuple[grpc.aio.AioRpcError, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = dict(field_violations(err))
    assert list(violations) == ["spec.base_model"]
    return err, violations["spec.base_model"]


def expected_refusal(model: str, data: DataNeeds) -> str:
    registry = get_registry()
    return capabilities.refusal(model, registry.base_model(model).capabilities, data,
                                capabilities.catalog_of(registry.base_models))


async def test_summarize_examples_filters_deduplicates_and_confirms(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    other = await workspace(endpoints, email="other@example.com")
    try:
        await sdk.import_file(clients, write(tmp_path / "p.jsonl", [plain(i) for i in range(20)], "plain"))
        await sdk.import_file(clients, write(tmp_path / "t.jsonl", [tool_call(i) for i in range(6)], "tools"))
        await sdk.import_file(clients, write(tmp_path / "r.jsonl", [reasoning(i) for i in range(4)], "thinking"))
        # the same tool-call examples again under a second topic: still 6 examples, not 12
        await sdk.import_file(clients, write(tmp_path / "t2.jsonl", [tool_call(i) for i in range(6)], "weather"))
        # candidates that the parse rejects: <think> in a user message, </think> alone in an answer
        decoys = [{"messages": [{"role": "user", "content": f"what does <think>{i}</think> mean?"},
                                {"role": "assistant", "content": "a tag some models use; </think> closes it"}]}
                  for i in range(3)]
        await sdk.import_file(clients, write(tmp_path / "d.jsonl", decoys, "plain"))
        await sdk.import_file(clients, write(tmp_path / "pp.jsonl", [
            {"prompt": f"q{i}", "chosen": f"<think>hm</think>yes {i}", "rejected": f"no {i}"} for i in range(5)], "prefs"))

        assert await summarize(clients, kind="") == (38, 6, 9)
        assert await summarize(clients) == (33, 6, 4)
        assert await summarize(clients, kind="preferences") == (5, 0, 5)
        assert await summarize(clients, ["tools", "weather"]) == (6, 6, 0)
        assert await summarize(clients, ["plain"]) == (23, 0, 0)
        assert await summarize(clients, ["plain", "thinking"]) == (27, 0, 4)
        assert await summarize(clients, ["nope"]) == (0, 0, 0)
        assert await summarize(other) == (0, 0, 0)  # workspace-scoped
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await summarize(clients, kind="images")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await clients.close()
        await other.close()


async def test_data_the_base_model_cannot_take_is_refused_at_validate_and_create(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, write(tmp_path / "p.jsonl", [plain(i) for i in range(30)], "plain"))
        await sdk.import_file(clients, write(tmp_path / "t.jsonl", [tool_call(i) for i in range(6)], "tools"))
        await sdk.import_file(clients, write(tmp_path / "r.jsonl", [reasoning(i) for i in range(4)], "thinking"))
        catalog = capabilities.catalog_of(get_registry().base_models)

        # tool calls on llama-3.2-1b (no tool_calling): refused by both, naming the models that can
        spec = job(topics=["plain", "tools"])
        _, message = await refused(clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=spec)))
        assert message == expected_refusal("llama-3.2-1b", DataNeeds(36, 6, 0))
        assert "6 of 36 examples have tool calls" in message and "tool_calling" in message
        assert "llama-3.1-8b" in message
        assert ", ".join(capabilities.capable_models(catalog, [TOOL_CALLING])) in message
        _, again = await refused(clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec)))
        assert again == message
        assert not (await clients.job_scheduler.ListJobs(js.ListJobsRequest())).jobs  # nothing was created

        # the same data on llama-3.1-8b (tool_calling) is accepted
        ok = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job(topics=["plain", "tools"],
                                                                                     base_model="llama-3.1-8b")))
        assert not any("tool call" in w or "tool_calling" in w or "dataset-builder" in w for w in ok.warnings), ok.warnings
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(
            spec=job(name="on-8b", topics=["plain", "tools"], base_model="llama-3.1-8b")))
        assert created.job.id and created.job.state == js.JOB_STATE_BUILDING_DATASET

        # a topic filter that leaves the tool calls out is accepted on llama-3.2-1b
        ok = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job(topics=["plain"])))
        assert not any("tool call" in w or "tool_calling" in w or "dataset-builder" in w for w in ok.warnings), ok.warnings

        # reasoning traces on a Llama model: refused, naming the models that have reasoning
        reasoners = capabilities.capable_models(catalog, [REASONING])
        for model in ("llama-3.2-1b", "llama-3.1-8b"):
            _, message = await refused(clients.job_scheduler.ValidateJob(js.ValidateJobRequest(
                spec=job(topics=["thinking", "plain"], base_model=model))))
            assert message == expected_refusal(model, DataNeeds(34, 0, 4))
            assert "4 of 34 examples have reasoning traces" in message and "tool calls" not in message
            if reasoners:  # e.g. the DeepSeek R1 distills
                assert f"Base models that can take this data: {', '.join(reasoners)}." in message
            else:
                assert "reasoning: none" in message

        # everything at once (no topic filter): the missing capabilities and their counts
        _, message = await refused(clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job())))
        assert "6 of 40 examples have tool calls" in message and "4 of 40 examples have reasoning" in message
        # other violations are reported with it
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job(name="bad name!")))
        assert [f for f, _ in field_violations(info.value)] == ["spec.name", "spec.base_model"]
    finally:
        await clients.close()


async def test_unreachable_builder_warns_and_the_build_refuses_as_a_user_failure(services, tmp_path):
    """When the job-scheduler cannot ask the dataset-builder, CreateJob goes on with a warning;
    the dataset-builder's build for the job is the authoritative check and fails the job."""
    endpoints, _ = services
    scheduler = services.apps["job-scheduler"]
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, write(tmp_path / "p.jsonl", [plain(i) for i in range(30)], "plain"))
        await sdk.import_file(clients, write(tmp_path / "t.jsonl", [tool_call(i) for i in range(6)], "tools"))
        await scheduler.dataset_builder.close()
        scheduler.dataset_builder = DatasetBuilderLine(Settings(dataset_builder_port=free_port()))  # nothing there

        check = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job()))
        warning = [w for w in check.warnings if "dataset-builder could not be asked" in w]
        assert len(warning) == 1 and "UNAVAILABLE" in warning[0] and "checked when the dataset is built" in warning[0]
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=job()))
        assert any("dataset-builder could not be asked" in w for w in created.warnings)

        events = await sdk.watch_job(clients, created.job.id, timeout=60)
        assert events[-1].state == js.JOB_STATE_FAILED
        failed = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert failed.failure_kind == common_pb2.FAILURE_KIND_USER
        assert failed.failure_reason == expected_refusal("llama-3.2-1b", DataNeeds(36, 6, 0))
        assert not failed.dataset.dataset_id  # refused before a dataset was written
    finally:
        await clients.close()


async def test_dataset_only_plans_get_the_dataset_with_a_warning(services, tmp_path):
    """Capabilities guard training: a dataset-only plan's job is not refused (as min_examples
    does not refuse it); its dataset and the job say what fine-tuning would refuse."""
    endpoints, _ = services
    starter = await workspace(endpoints, common_pb2.PLAN_STARTER, "starter@example.com")
    try:
        await sdk.import_file(starter, write(tmp_path / "p.jsonl", [plain(i) for i in range(30)], "plain"))
        await sdk.import_file(starter, write(tmp_path / "t.jsonl", [tool_call(i) for i in range(6)], "tools"))
        message = expected_refusal("llama-3.2-1b", DataNeeds(36, 6, 0))
        check = await starter.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=job()))
        assert any(w.startswith(message) and "dataset only" in w for w in check.warnings), check.warnings
        created = await starter.job_scheduler.CreateJob(js.CreateJobRequest(spec=job()))
        events = await sdk.watch_job(starter, created.job.id, timeout=60)
        assert events[-1].state == js.JOB_STATE_SUCCEEDED
        done = (await starter.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert done.dataset.train_count + done.dataset.test_count == 36
        assert any(w.startswith(message) and "is refused" in w for w in done.dataset.warnings)
        # BuildDataset (no job) warns the same way
        built = await starter.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(
            base_model="llama-3.2-1b", topics=["tools"], seed=3))
        assert any(w.startswith(expected_refusal("llama-3.2-1b", DataNeeds(6, 6, 0))) for w in built.dataset.warnings)
    finally:
        await starter.close()
