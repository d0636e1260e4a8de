"""The model-registry's ResolveModel: what a serving engine (vLLM) needs to host an adapter, from
a model registered through the real registration event on a real nats-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import jinja2
import pytest
from conftest import workspace
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.core import subjects
from tuneforge.core.storage import ArtifactStore
from tuneforge.model_registry.service import serving_chat_template
from tuneforge.plugins import get_registry

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is my parcel?"},
    {"role": "assistant", "content": "It left the depot today."},
    {"role": "user", "content": "Thanks!"},
]


def _render_plain(template: str, add_generation_prompt: bool) -> str:
    # What vLLM does: a sandboxed Jinja environment without transformers' {% generation %} extension.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(jinja2.TemplateError(message))
    return env.from_string(template).render(messages=CONVERSATION, add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("model_id", sorted(get_registry().base_models))
def test_serving_template_renders_with_plain_jinja_exactly_as_training_did(model_id):
    from transformers.utils.chat_template_utils import render_jinja_template

    training = get_registry().base_model(model_id).training_chat_template
    with pytest.raises(jinja2.TemplateSyntaxError):  # the reason for the serving template
        ImmutableSandboxedEnvironment().from_string(training)
    serving = serving_chat_template(training)
    assert "generation %}" not in serving and "generation -%}" not in serving
    for add_generation_prompt in (True, False):
        expected = render_jinja_template([CONVERSATION], chat_template=training, bos_token="<s>", eos_token="</s>",
                                         add_generation_prompt=add_generation_prompt)[0][0]
        assert _render_plain(serving, add_generation_prompt) == expected
    assert "It left the depot today." in expected


async def _register(app, workspace_id: str, name: str, base_model: str, lora_rank: int) -> str:
    """Put an adapter where a trainer would, and publish the event the job-scheduler sends."""
    store = ArtifactStore(app.settings.resolved_artifact_url())
    source = f"jobs/{workspace_id}/job_{name}/adapter"
    store.put_bytes(f"{source}/adapter_config.json", json.dumps({"r": lora_rank}).encode())
    store.put_bytes(f"{source}/adapter_model.safetensors", b"weights of " + name.encode())
    await app.bus.publish(subjects.MODEL_REGISTRATION_REQUESTED, ev.ModelRegistrationRequested(
        meta=app.bus.meta(workspace_id, f"job_{name}"), model_name=name, base_model=base_model, method="sft",
        adapter_path=source, metrics=common_pb2.TrainingMetrics(steps=3, eval_loss=1.5),
        hyperparameters=common_pb2.Hyperparameters(lora_rank=lora_rank, lora_alpha=16),
    ))
    return source


async def _resolve_when_registered(clients, name: str) -> mr.ResolveModelResponse:
    for _ in range(200):
        try:
            return await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name=name))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"{name} was never registered")


async def test_resolve_model_gives_a_serving_engine_everything(services):
    endpoints, settings = services
    app = services.apps["model-registry"]
    clients = await workspace(endpoints)
    try:
        ws = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace
        await _register(app, ws.id, "support-bot", "llama-3.1-8b", lora_rank=16)
        resolved = await _resolve_when_registered(clients, "support-bot")
        model = (await clients.model_registry.GetModel(mr.GetModelRequest(model="support-bot"))).model
    finally:
        await clients.close()

    spec = get_registry().base_model("llama-3.1-8b")
    assert resolved.model_id == model.id and resolved.base_model == "llama-3.1-8b"
    assert resolved.base_model_source == spec.source == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolved.lora_rank == 16
    # The adapter's full URL in the artifact store, and the same directory on disk (local store).
    artifacts = (settings.data_dir / "artifacts").resolve()
    assert resolved.adapter_uri == f"file://{artifacts}/{model.adapter_path}"
    adapter_dir = Path(resolved.adapter_uri.removeprefix("file://"))
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == b"weights of support-bot"
    assert json.loads((adapter_dir / "adapter_config.json").read_text()) == {"r": 16}
    assert resolved.vllm_lora_module == f"support-bot={adapter_dir}"
    # The serving template: the family's training template without the generation markers.
    assert resolved.chat_template == serving_chat_template(spec.training_chat_template)
    assert "{% generation" not in resolved.chat_template and "{%- generation" not in resolved.chat_template
    rendered = _render_plain(resolved.chat_template, add_generation_prompt=True)
    assert "Where is my parcel?" in rendered and rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


async def test_resolve_model_outside_a_local_store_names_the_download_directory(services, tmp_path):
    """With an object store (any non-file fsspec URL) vLLM needs a local copy: the module names the
    directory a user downloads the adapter into."""
    endpoints, _ = services
    app = services.apps["model-registry"]
    clients = await workspace(endpoints)
    try:
        ws = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace
        await _register(app, ws.id, "remote-bot", "qwen-2.5-14b", lora_rank=8)
        await _resolve_when_registered(clients, "remote-bot")
        memory = ArtifactStore("memory://tuneforge-test-artifacts")
        local, app.store = app.store, memory
        try:
            resolved = await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name="remote-bot"))
        finally:
            app.store = local
    finally:
        await clients.close()
    assert resolved.adapter_uri == f"memory://tuneforge-test-artifacts/{resolved.adapter_path}"
    assert resolved.vllm_lora_module == "remote-bot=./remote-bot"
    assert resolved.base_model_source == "Qwen/Qwen2.5-14B-Instruct" and resolved.lora_rank == 8
    assert "<|im_start|>" in resolved.chat_template and "generation %}" not in resolved.chat_template
