"""tuneforge plugin: Mistral 7B Instruct v0.3 and Mixtral 8x7B Instruct v0.1.

A separate distribution (``tuneforge-mistral``) registered under the ``tuneforge`` entry-point
group as ``mistral``: the core learns about these models only through ``register_base_models``.
Declarative, like the built-in families: a table of architectures (the published ``config.json``
numbers, parameter counts computed from them), a table of catalog entries, two training chat
templates, the stand-in shapes and the tokenizer recipes. No torch here: the light services
import this module to read the catalog.

LoRA targets
    Mistral is a dense Llama-like decoder: q/k/v/o and gate/up/down are ``nn.Linear`` modules,
    all selectable, attention selected by default. Mixtral's attention is the same, but in
    transformers 5 its feed-forward experts are no modules at all: each layer's
    ``mlp.experts`` (``MixtralExperts``) holds two fused 3-D parameters, ``gate_up_proj``
    ``[experts, 2 * intermediate, hidden]`` and ``down_proj`` ``[experts, hidden, intermediate]``,
    and the router ``mlp.gate`` (``MixtralTopKRouter``) is a bare weight. peft 0.21 reaches them
    only through ``LoraConfig(target_parameters=[...])`` (see ``MIXTRAL_EXPERT_PARAMETERS``), which
    the core's hyperparameters (``lora_target_modules`` → ``target_modules``) cannot express, so
    the catalog offers Mixtral's attention projections only.

Training templates (``MISTRAL_V3_TRAINING_TEMPLATE``, ``MIXTRAL_TRAINING_TEMPLATE``)
    Written after mistralai's published chat templates (Mistral-7B-Instruct-v0.3 and
    Mixtral-8x7B-Instruct-v0.1 ``tokenizer_config.json``). What they keep:

    * v0.3: ``<s>``, then per turn ``[INST] user[/INST]``, `` answer</s>``; tools as
      ``[AVAILABLE_TOOLS] [{"type": "function", "function": {...}}][/AVAILABLE_TOOLS]`` right
      before the last user turn; assistant tool calls as
      ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}]</s>``; tool results as
      ``[TOOL_RESULTS] {"content": ..., "call_id": ...}[/TOOL_RESULTS]``; the system prompt
      folded into the last user turn as ``system\\n\\nuser``.
    * v0.1: ``<s> [INST] user [/INST] answer</s> [INST] …`` (``[INST]`` is plain text in the
      32,000-token vocabulary; the space in front of it stands for SentencePiece's "▁"), the
      system prompt folded into the first user turn.

    What they change for training:

    * ``{% generation %}…{% endgeneration %}`` around each assistant message's output, its
      ``</s>`` included (and ``[TOOL_CALLS]``, which the model emits): assistant-only loss, and
      one generation block per assistant message so per-message ``weight`` works.
    * v0.3 folds the system prompt into the last *user* turn; the published template does so
      only when that turn is the conversation's last message, so for a training conversation
      (ending with the assistant) it silently dropped the system prompt.
    * No role-alternation checks and no requirement that tool-call ids be 9 alphanumeric
      characters (the published template raises on both; the dataset builder validates data).
      A call or result without an id is written without the ``"id"`` / ``"call_id"`` key.
    * Tool-call ``arguments`` may be an object (written with ``tojson``) or an encoded JSON
      string (written as is, never encoded twice). An assistant message with both text and tool
      calls keeps its text, before ``[TOOL_CALLS]``.
    * Tool results: objects and lists as JSON; a string that starts with ``{`` or ``[`` as is
      (as the published template writes every string); any other string as a JSON string (the
      published template would write invalid JSON, mistralai's own tokenizer library a string).
    * ``[AVAILABLE_TOOLS]``: every value is written with ``tojson`` (the published template
      pastes strings between quotes unescaped).
    * Content may be a string or a list of OpenAI text parts; assistant text is trimmed in both
      templates (v0.1's published one did not trim).
    * Mixtral v0.1 raises on tool messages and tool calls: the model has no tool format.

Stand-ins
    The real architecture classes (``MistralForCausalLM``, ``MixtralForCausalLM`` with 8 experts,
    top-2) at a tiny size, and a SentencePiece-style tokenizer (the core's ``"metaspace"`` recipe
    style): ``<unk>``, ``<s>``, ``</s>`` at ids 0–2 and, for v0.3, the control tokens
    ``[INST]`` … ``[/TOOL_RESULTS]`` at ids 3–9, as in the real vocabularies.
"""

from __future__ import annotations

import dataclasses

from tuneforge.hookspecs import hookimpl
from tuneforge.training import BaseModelSpec, StandinShape, TokenizerRecipe

CONTEXT_LENGTH = 32_768
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TOOL_CALLING = "tool_calling"

# Mixtral's experts as peft 0.21 can target them: fused 3-D parameters of ``MixtralExperts``
# (gate and up projections of all 8 experts in one, down in the other), reached through
# ``LoraConfig(target_parameters=...)``. Optional: selectable in ``lora_target_modules`` by these
# names (the spec's ``lora_target_parameters``), never selected by default.
MIXTRAL_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The shape of a real checkpoint (from its config.json)."""

    model_type: str  # transformers model_type: "mistral" or "mixtral"
    hidden_size: int
    intermediate_size: int  # of one expert, for a mixture of experts
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_local_experts: int = 0  # 0: a dense feed-forward
    num_experts_per_tok: int = 0

    @property
    def parameter_count(self) -> int:
        h = self.hidden_size
        kv_dim = h // self.num_attention_heads * self.num_key_value_heads
        attention = 2 * h * h + 2 * h * kv_dim  # q, o + k, v (no biases)
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        if self.num_local_experts:
            mlp = self.num_local_experts * mlp + self.num_local_experts * h  # experts + router
        norms = 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attention + mlp + norms) + embeddings + h  # + final norm


ARCHITECTURES: dict[str, Architecture] = {
    "mistral-7b-v0.3": Architecture("mistral", 4096, 14336, 32, 32, 8, vocab_size=32_768),
    "mixtral-8x7b-v0.1": Architecture("mixtral", 4096, 14336, 32, 32, 8, vocab_size=32_000,
                                      num_local_experts=8, num_experts_per_tok=2),
}

# SentencePiece vocabularies start with these, in this order (ids 0, 1, 2).
SENTENCEPIECE_HEAD = ("<unk>", "<s>", "</s>")
# Mistral v0.3's control tokens (ids 3–9 of the real 32,768-token vocabulary).
V3_CONTROL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


def tokenizer_recipe(leading_tokens: tuple[str, ...]) -> TokenizerRecipe:
    """A SentencePiece-style (metaspace) BPE with ``leading_tokens`` at the first ids. The real
    tokenizers have no pad token (TRL then pads with ``</s>``); the stand-in pads with ``<unk>``."""
    return TokenizerRecipe(
        split_pattern="",
        style="metaspace",
        leading_tokens=leading_tokens,
        special_tokens=(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        unk_token="<unk>",
        stop_tokens=("</s>",),
        prepend_bos=True,
    )


MISTRAL_V3_TOKENIZER = tokenizer_recipe((*SENTENCEPIECE_HEAD, *V3_CONTROL_TOKENS))
MIXTRAL_V1_TOKENIZER = tokenizer_recipe(SENTENCEPIECE_HEAD)

# The stand-ins keep the real architecture classes, untied embeddings and full attention
# (sliding_window null, as in both published configs), at a tiny size.
STANDIN_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": False,
    # 1/sqrt(hidden_size), as for the Llama stand-in: 0.02 at width 64 leaves logits that LoRA
    # can barely move.
    "initializer_range": 0.125,
}


_TEXT_MACRO = r"""
{%- macro render_text(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
"""

MISTRAL_V3_TRAINING_TEMPLATE = r"""{#- tuneforge training template for Mistral 7B Instruct v0.3, after
    mistralai's published v0.3 template; what differs and why: the docstring of tuneforge_mistral. -#}
""" + _TEXT_MACRO + r"""
{%- macro render_tool_result(content) -%}
    {%- if content is mapping or (content is sequence and content is not string
            and not (content and content[0] is mapping and content[0]['type'] == 'text')) -%}
        {{- content | tojson -}}
    {%- else -%}
        {%- set text = render_text(content) -%}
        {%- if (text | trim)[:1] in ['{', '['] -%}
            {{- text -}}
        {%- else -%}
            {{- text | tojson -}}
        {%- endif -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = render_text(messages[0]['content']) %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools and loop.index0 == ns.last_user %}
            {{- '[AVAILABLE_TOOLS] [' }}
            {%- for tool in tools %}
                {%- if tool['function'] is defined %}
                    {%- set tool = tool['function'] %}
                {%- endif %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != 'return' %}
                    {{- key | tojson + ': ' + val | tojson }}
                    {%- if not loop.last %}
                        {{- ', ' }}
                    {%- endif %}
                {%- endfor %}
                {{- '}}' }}
                {%- if not loop.last %}
                    {{- ', ' }}
                {%- endif %}
            {%- endfor %}
            {{- '][/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.index0 == ns.last_user and system_message %}
            {{- '[INST] ' + system_message + '\n\n' + render_text(message['content']) + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + render_text(message['content']) + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- generation %}
        {%- set text = render_text(message['content']) | trim %}
        {%- if message['tool_calls'] %}
            {%- if text %}
                {{- ' ' + text }}
            {%- endif %}
            {{- '[TOOL_CALLS] [' }}
            {%- for tool_call in message['tool_calls'] %}
                {%- if tool_call['function'] is defined %}
                    {%- set call = tool_call['function'] %}
                {%- else %}
                    {%- set call = tool_call %}
                {%- endif %}
                {{- '{"name": ' + call['name'] | tojson + ', "arguments": ' }}
                {%- if call['arguments'] is string %}
                    {{- call['arguments'] }}
                {%- else %}
                    {{- call['arguments'] | tojson }}
                {%- endif %}
                {%- if tool_call['id'] %}
                    {{- ', "id": ' + tool_call['id'] | tojson }}
                {%- endif %}
                {{- '}' }}
                {%- if not loop.last %}
                    {{- ', ' }}
                {%- endif %}
            {%- endfor %}
            {{- ']' + eos_token }}
        {%- else %}
            {{- ' ' + text + eos_token }}
        {%- endif %}
        {%- endgeneration %}
    {%- elif message['role'] == 'tool' or message['role'] == 'tool_results' %}
        {{- '[TOOL_RESULTS] {"content": ' + render_tool_result(message['content']) }}
        {%- if message['tool_call_id'] %}
            {{- ', "call_id": ' + message['tool_call_id'] | tojson }}
        {%- endif %}
        {{- '}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Mistral v0.3: unsupported role ' + message['role'] | string
                            + ' (system first, then user, assistant and tool)') }}
    {%- endif %}
{%- endfor %}
"""

MIXTRAL_TRAINING_TEMPLATE = r"""{#- tuneforge training template for Mixtral 8x7B Instruct v0.1, after
    mistralai's published template; what differs and why: the docstring of tuneforge_mistral. -#}
""" + _TEXT_MACRO + r"""
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = render_text(messages[0]['content']) %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(first_user=true) %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if ns.first_user and system_message %}
            {{- ' [INST] ' + system_message + '\n\n' + render_text(message['content']) + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + render_text(message['content']) + ' [/INST]' }}
        {%- endif %}
        {%- set ns.first_user = false %}
    {%- elif message['role'] == 'assistant' and not message['tool_calls'] %}
        {%- generation %}
        {{- ' ' + render_text(message['content']) | trim + eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- raise_exception('Mixtral 8x7B Instruct v0.1 has no tool format: '
                            + 'system, user and assistant messages only') }}
    {%- endif %}
{%- endfor %}
"""


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    id: str
    display_name: str
    source: str
    architecture: str  # key of ARCHITECTURES
    lora_target_modules: tuple[str, ...]
    default_lora_target_modules: tuple[str, ...]
    capabilities: tuple[str, ...]
    template: str
    tokenizer: TokenizerRecipe
    description: str
    lora_target_parameters: tuple[str, ...] = ()  # entries of lora_target_modules that are parameters


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "mistral-7b-instruct", "Mistral 7B Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3",
        ATTENTION_MODULES + MLP_MODULES, ATTENTION_MODULES, (TOOL_CALLING,),
        MISTRAL_V3_TRAINING_TEMPLATE, MISTRAL_V3_TOKENIZER,
        "Mistral 7B Instruct v0.3: 7B chat model with function calling, 32k context, Apache-2.0.",
    ),
    CatalogEntry(
        "mixtral-8x7b-instruct", "Mixtral 8x7B Instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "mixtral-8x7b-v0.1", ATTENTION_MODULES + MIXTRAL_EXPERT_PARAMETERS, ATTENTION_MODULES, (),
        MIXTRAL_TRAINING_TEMPLATE, MIXTRAL_V1_TOKENIZER,
        "Mixtral 8x7B Instruct v0.1: sparse mixture of 8 experts (2 active per token, ~13B of 47B "
        "parameters), 32k context, Apache-2.0. LoRA on the attention projections; the experts "
        "(mlp.experts.gate_up_proj, mlp.experts.down_proj) on request.",
        lora_target_parameters=MIXTRAL_EXPERT_PARAMETERS,
    ),
)


def standin_shape(entry: CatalogEntry) -> StandinShape:
    arch = ARCHITECTURES[entry.architecture]
    config = dict(STANDIN_BASE_CONFIG, tie_word_embeddings=arch.tie_word_embeddings)
    if arch.num_local_experts:
        config.update(num_local_experts=arch.num_local_experts, num_experts_per_tok=arch.num_experts_per_tok)
    return StandinShape(arch.model_type, config, tokenizer=entry.tokenizer)


def build_spec(entry: CatalogEntry) -> BaseModelSpec:
    arch = ARCHITECTURES[entry.architecture]
    return BaseModelSpec(
        id=entry.id,
        display_name=entry.display_name,
        description=entry.description,
        family=arch.model_type,
        source=entry.source,
        parameter_count=arch.parameter_count,
        context_length=CONTEXT_LENGTH,
        lora_target_modules=entry.lora_target_modules,
        default_lora_target_modules=entry.default_lora_target_modules,
        training_chat_template=entry.template,
        capabilities=entry.capabilities,
        standin=standin_shape(entry),
        lora_target_parameters=entry.lora_target_parameters,
    )


def specs() -> list[BaseModelSpec]:
    return [build_spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
