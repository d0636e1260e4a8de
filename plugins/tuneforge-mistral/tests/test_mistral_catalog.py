"""The plugin's catalog, its registration through the entry point, the stand-in tokenizers and the
training templates under both renderers (transformers' and the dataset builder's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mistral_fixtures import (  # noqa: F401 (fixtures are imported to be used)
    MISTRAL,
    MIXTRAL,
    mistral_specs,
    standin_dirs,
    standin_tokenizers,
)
from tuneforge_mistral import MIXTRAL_EXPERT_PARAMETERS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
V3_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
              "[/TOOL_RESULTS]")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Current "weather" in a city.',
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TEXTS = (
    "Hello, world!",
    "What is the weather like in Paris today?",
    '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
    "def f(x):\n    return x ** 2\n",
    "café 東京 🙂 tabs\tand\r\nCRLF",
    "First line.\n\nSecond line.\n",
    "[INST] looks like a control token but is text here [/INST]",
)


# ---------------------------------------------------------------------------------------------
# catalog


def test_catalog_entries(mistral_specs):
    from tuneforge.training import ALL_LORA_MODULES

    assert set(mistral_specs) == {MISTRAL, MIXTRAL}
    mistral, mixtral = mistral_specs[MISTRAL], mistral_specs[MIXTRAL]

    assert mistral.display_name == "Mistral 7B Instruct"
    assert mistral.source == "mistralai/Mistral-7B-Instruct-v0.3"
    assert mistral.family == "mistral" and mistral.standin.model_type == "mistral"
    assert mistral.parameter_count == 7_248_023_552
    assert mistral.context_length == 32_768
    assert mistral.lora_target_modules == ATTENTION + MLP
    assert set(mistral.lora_target_modules) == set(ALL_LORA_MODULES)
    assert mistral.default_lora_target_modules == ATTENTION
    assert mistral.capabilities == ("tool_calling",)

    assert mixtral.display_name == "Mixtral 8x7B Instruct"
    assert mixtral.source == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert mixtral.family == "mixtral" and mixtral.standin.model_type == "mixtral"
    assert mixtral.parameter_count == 46_702_792_704
    assert mixtral.context_length == 32_768
    # attention by default; the experts (fused 3-D parameters, not modules) on request
    assert mixtral.default_lora_target_modules == ATTENTION
    assert mixtral.lora_target_modules == ATTENTION + MIXTRAL_EXPERT_PARAMETERS
    assert mixtral.lora_target_parameters == MIXTRAL_EXPERT_PARAMETERS == (
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert mistral.lora_target_parameters == ()
    assert mixtral.capabilities == ()
    assert mixtral.standin.config["num_local_experts"] == 8
    assert mixtral.standin.config["num_experts_per_tok"] == 2

    for spec in (mistral, mixtral):
        assert spec.standin.config["tie_word_embeddings"] is False
        assert spec.training_chat_template.count("{%- generation %}") == 1
        assert spec.training_chat_template.count("{%- endgeneration %}") == 1
        assert spec.standin.tokenizer.style == "metaspace"
    assert mistral.standin.tokenizer.leading_tokens == ("<unk>", "<s>", "</s>", *V3_CONTROL)
    assert mixtral.standin.tokenizer.leading_tokens == ("<unk>", "<s>", "</s>")


@pytest.mark.parametrize("model_id", [MISTRAL, MIXTRAL])
def test_parameter_count_matches_transformers_at_full_size(model_id, mistral_specs):
    """The published architecture, built by transformers on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import tuneforge_mistral

    arch = tuneforge_mistral.ARCHITECTURES[
        {MISTRAL: "mistral-7b-v0.3", MIXTRAL: "mixtral-8x7b-v0.1"}[model_id]]
    extra = {"num_local_experts": arch.num_local_experts, "num_experts_per_tok": arch.num_experts_per_tok} \
        if arch.num_local_experts else {}
    config = AutoConfig.for_model(
        arch.model_type, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings, **extra,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == {MISTRAL: "MistralForCausalLM", MIXTRAL: "MixtralForCausalLM"}[model_id]
    assert sum(p.numel() for p in model.parameters()) == mistral_specs[model_id].parameter_count


def test_registry_lists_both_models_from_the_entry_point():
    from importlib.metadata import entry_points

    from tuneforge.plugins import get_registry

    (ep,) = [ep for ep in entry_points(group="tuneforge") if ep.name == "mistral"]
    assert ep.value == "tuneforge_mistral" and ep.dist.name == "tuneforge-mistral"
    get_registry.cache_clear()
    try:
        registry = get_registry()
        assert "mistral" in registry.plugin_names
        for model_id in (MISTRAL, MIXTRAL):
            assert registry.model_plugins[model_id] == "mistral"
            assert registry.base_model(model_id).parameter_count > 7_000_000_000
        assert registry.base_model(MISTRAL).source == "mistralai/Mistral-7B-Instruct-v0.3"
    finally:
        get_registry.cache_clear()


def test_plugin_module_imports_no_heavy_stack():
    code = (
        "import sys, tuneforge_mistral\n"
        "assert len(tuneforge_mistral.specs()) == 2\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_hyperparameters_accept_only_the_models_modules(mistral_specs):
    from tuneforge.core.hyperparameters import HyperparameterError, resolve

    def resolved(model_id, modules):
        spec = mistral_specs[model_id]
        return resolve({"lora_target_modules": modules}, available_modules=spec.lora_target_modules,
                       default_modules=spec.default_lora_target_modules).lora_target_modules

    assert resolved(MISTRAL, ()) == ATTENTION
    assert resolved(MISTRAL, ("q_proj", "gate_proj", "down_proj")) == ("q_proj", "gate_proj", "down_proj")
    assert resolved(MIXTRAL, ()) == ATTENTION
    assert resolved(MIXTRAL, ("q_proj", "mlp.experts.gate_up_proj")) == ("q_proj", "mlp.experts.gate_up_proj")
    for expert in ("gate_proj", "gate_up_proj", "w1"):
        with pytest.raises(HyperparameterError, match=f"{expert} not in this model"):
            resolved(MIXTRAL, ("q_proj", expert))


# ---------------------------------------------------------------------------------------------
# stand-ins and their tokenizers


@pytest.mark.parametrize("model_id", [MISTRAL, MIXTRAL])
def test_standin_tokenizer_reloads_identically(model_id, standin_dirs, standin_tokenizers):
    """transformers 5 may rebuild a family class on load (it does for qwen2): for model_type
    mistral/mixtral it keeps the saved tokenizer, so the ids are those of tokenizer.json."""
    from tokenizers import Tokenizer

    path, tok = standin_dirs[model_id], standin_tokenizers[model_id]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {MISTRAL: "mistral", MIXTRAL: "mixtral"}[model_id]
    assert type(tok).__name__ == "TokenizersBackend"
    saved = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert json.loads(saved.to_str())["pre_tokenizer"] == {
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == saved.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("Hi")[:1] == [1]  # <s> in front of a plain encode, as the real tokenizers
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    control = V3_CONTROL if model_id == MISTRAL else ()
    assert tok.convert_ids_to_tokens(list(range(3, 3 + len(control)))) == list(control)
    first_byte = 3 + len(control)
    assert tok.convert_ids_to_tokens([first_byte, first_byte + 255]) == ["<0x00>", "<0xFF>"]
    for token in ("<s>", "</s>", *control):
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)], token
    if model_id == MIXTRAL:  # v0.1 has no control tokens: [INST] is plain text
        assert len(tok.encode("[INST]", add_special_tokens=False)) > 1


@pytest.mark.parametrize("model_id", [MISTRAL, MIXTRAL])
def test_standin_model_reloads(model_id, mistral_specs, standin_dirs, standin_tokenizers):
    import torch
    from transformers import AutoModelForCausalLM

    path, tok = standin_dirs[model_id], standin_tokenizers[model_id]
    marker = json.loads((path / "tuneforge_standin.json").read_text())
    assert marker["catalog_id"] == model_id and marker["standin"] is True
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert type(model).__name__ == {MISTRAL: "MistralForCausalLM", MIXTRAL: "MixtralForCausalLM"}[model_id]
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings is False
    assert model.config.bos_token_id == 1 and model.generation_config.eos_token_id == [2]
    if model_id == MIXTRAL:
        assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (8, 2)
        assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (8, 2 * 128, 64)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("Hello there")])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    assert (path / "chat_template.jinja").read_text() == mistral_specs[model_id].training_chat_template


# ---------------------------------------------------------------------------------------------
# training templates


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


V3_CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "system_multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello!\n"},
        {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Fine."}]},
    ],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("abcdefgh1", "get_weather", {"city": "Paris"}),
            call("c2", "get_weather", '{"city": "Lyon"}')]},
        {"role": "tool", "tool_call_id": "abcdefgh1", "content": '{"temperature": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
        {"role": "user", "content": "And Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": {"temperature": -3}},
        {"role": "assistant", "content": "Paris 21, Lyon sunny, Oslo -3."},
    ],
}


def render_both(tokenizer, template: str, messages, tools=None) -> tuple[str, str]:
    """(transformers' rendering, the dataset builder's rendering) of one conversation."""
    from tuneforge.dataset_builder.tokens import compile_template

    theirs = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)
    ours = compile_template(template).render(messages=messages, tools=tools, bos_token=tokenizer.bos_token,
                                             eos_token=tokenizer.eos_token, add_generation_prompt=False)
    return theirs, ours


@pytest.mark.parametrize("name", sorted(V3_CONVERSATIONS))
def test_mistral_template_renders_alike_in_both_environments(name, mistral_specs, standin_tokenizers):
    template = mistral_specs[MISTRAL].training_chat_template
    tools = [WEATHER_TOOL] if name == "tools" else None
    tok = standin_tokenizers[MISTRAL]
    theirs, ours = render_both(tok, template, V3_CONVERSATIONS[name], tools)
    assert theirs == ours
    assert theirs.startswith("<s>") and theirs.endswith("</s>")
    assert tok.apply_chat_template(V3_CONVERSATIONS[name], tools=tools, tokenize=False) == theirs  # saved template


def test_mistral_template_text(standin_tokenizers):
    import tuneforge_mistral

    template = tuneforge_mistral.MISTRAL_V3_TRAINING_TEMPLATE
    tok = standin_tokenizers[MISTRAL]
    text, _ = render_both(tok, template, V3_CONVERSATIONS["system_multi_turn"])
    # the system prompt goes into the last user turn (the published template dropped it here)
    assert text == "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nHow are you?[/INST] Fine.</s>"
    text, _ = render_both(tok, template, V3_CONVERSATIONS["tools"], [WEATHER_TOOL])
    tools_json = ('[{"type": "function", "function": {"name": "get_weather", "description": '
                  '"Current \\"weather\\" in a city.", "parameters": {"type": "object", "properties": '
                  '{"city": {"type": "string"}}, "required": ["city"]}}}]')
    assert text == (
        "<s>[INST] Weather in Paris and Lyon?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefgh1"}, '
        '{"name": "get_weather", "arguments": {"city": "Lyon"}, "id": "c2"}]</s>'
        '[TOOL_RESULTS] {"content": {"temperature": 21}, "call_id": "abcdefgh1"}[/TOOL_RESULTS]'
        '[TOOL_RESULTS] {"content": "sunny", "call_id": "c2"}[/TOOL_RESULTS]'
        f"[AVAILABLE_TOOLS] {tools_json}[/AVAILABLE_TOOLS]"
        "[INST] Use tools.\n\nAnd Oslo?[/INST]"
        ' Checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]</s>'
        '[TOOL_RESULTS] {"content": {"temperature": -3}}[/TOOL_RESULTS]'
        " Paris 21, Lyon sunny, Oslo -3.</s>"
    )
    with pytest.raises(Exception, match="unsupported role"):
        render_both(tok, template, [{"role": "critic", "content": "x"}])


def test_mixtral_template_text_and_both_environments(mistral_specs, standin_tokenizers):
    template = mistral_specs[MIXTRAL].training_chat_template
    messages = V3_CONVERSATIONS["system_multi_turn"]
    tok = standin_tokenizers[MIXTRAL]
    theirs, ours = render_both(tok, template, messages)
    # the system prompt goes into the first user turn, as in the published v0.1 template
    assert theirs == ours == "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] How are you? [/INST] Fine.</s>"
    assert tok.apply_chat_template(messages, tokenize=False) == theirs
    plain, _ = render_both(tok, template, V3_CONVERSATIONS["plain"])
    assert plain == "<s> [INST] Hi [/INST] Hello!</s>"
    with pytest.raises(Exception, match="no tool format"):
        render_both(tok, template, V3_CONVERSATIONS["tools"], [WEATHER_TOOL])
