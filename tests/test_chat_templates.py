"""Which tokens carry the loss, pinned per family template: Llama 3, Qwen 2.5, the DeepSeek R1
distills on Llama and on Qwen, and SmolLM2 (Mistral v0.3 has the same tests in its own plugin).

Each case is written out by hand as the published format renders it, with the family's real
special tokens, split into segments that carry loss or not. The expected ids are the segments'
ids, the expected labels those of the trained segments; both are compared with what the trainer
produces (``tokenize_row`` under the resolved ``train_on_inputs`` rule) on a stand-in whose
tokenizer follows the family's recipe. A wrong template, marker or special token fails them.
Segments are cut only where the tokenizer itself splits (at special tokens, before a word after a
newline), so encoding them one by one gives the ids of the whole text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.plugins import get_registry
from tuneforge.training import template_row

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# -- conversations, in the universal (stored) form: tool-call arguments as JSON strings ----------

PLAIN = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]}
WEIGHTED = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Draft answer.", "weight": 0},
    {"role": "user", "content": "Better?"},
    {"role": "assistant", "content": "Final answer.", "weight": 1},
]}
TOOL_CALL = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": [WEATHER_TOOL],
}
REASONING_FIELD = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning": "Two plus two is four."},
]}
REASONING_INLINE = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo plus two is four.\n</think>\n\n4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]}

# -- the published renderings, as (text, carries loss) segments -----------------------------------

LLAMA_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
LLAMA_TOOLS = ("Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
               "You have access to the following functions. To call a function, please respond with JSON for a "
               'function call.Respond in the format {"name": function name, "parameters": dictionary of argument '
               "name and its value}.Do not use variables.\n\n" + json.dumps(WEATHER_TOOL, indent=4) + "\n\n")


def llama_turn(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"


ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA = {
    "plain": [(LLAMA_SYSTEM + "<|eot_id|>" + llama_turn("user", "What is 2+2?") + ASSISTANT, False),
              ("4.<|eot_id|>", True)],
    "multi_turn": [(LLAMA_SYSTEM + "Be brief.<|eot_id|>" + llama_turn("user", "Hi") + ASSISTANT, False),
                   ("Hello!<|eot_id|>", True),
                   (llama_turn("user", "Bye") + ASSISTANT, False),
                   ("Goodbye.<|eot_id|>", True)],
    "weighted": [(LLAMA_SYSTEM + "<|eot_id|>" + llama_turn("user", "Hi") + ASSISTANT, False),
                 ("Draft answer.<|eot_id|>", "weight0"),
                 (llama_turn("user", "Better?") + ASSISTANT, False),
                 ("Final answer.<|eot_id|>", True)],
    "tool_call": [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA_TOOLS
                   + "You are a helpful assistant.<|eot_id|>" + llama_turn("user", "Weather in Paris?") + ASSISTANT,
                   False),
                  ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', True),
                  (llama_turn("ipython", '{"temperature": 21}') + ASSISTANT, False),
                  ("It is 21 degrees.<|eot_id|>", True)],
}

QWEN_DEFAULT_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
QWEN_TOOLS_SYSTEM = (
    "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
    "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER_TOOL)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)


def im(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


QWEN = {
    "plain": [(QWEN_DEFAULT_SYSTEM + im("user", "What is 2+2?") + "<|im_start|>assistant\n", False),
              ("4.<|im_end|>", True), ("\n", False)],
    "multi_turn": [(im("system", "Be brief.") + im("user", "Hi") + "<|im_start|>assistant\n", False),
                   ("Hello!<|im_end|>", True),
                   ("\n" + im("user", "Bye") + "<|im_start|>assistant\n", False),
                   ("Goodbye.<|im_end|>", True), ("\n", False)],
    "weighted": [(QWEN_DEFAULT_SYSTEM + im("user", "Hi") + "<|im_start|>assistant\n", False),
                 ("Draft answer.<|im_end|>", "weight0"),
                 ("\n" + im("user", "Better?") + "<|im_start|>assistant\n", False),
                 ("Final answer.<|im_end|>", True), ("\n", False)],
    "tool_call": [(QWEN_TOOLS_SYSTEM + im("user", "Weather in Paris?") + "<|im_start|>assistant\n", False),
                  ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', True),
                  ("\n<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>\n"
                   "<|im_start|>assistant\n", False),
                  ("It is 21 degrees.<|im_end|>", True), ("\n", False)],
}

SMOLLM2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SMOLLM2 = {  # ChatML as SmolLM2 publishes it: no tool-call format
    "plain": [(SMOLLM2_DEFAULT_SYSTEM + im("user", "What is 2+2?") + "<|im_start|>assistant\n", False),
              ("4.<|im_end|>", True), ("\n", False)],
    "multi_turn": [(im("system", "Be brief.") + im("user", "Hi") + "<|im_start|>assistant\n", False),
                   ("Hello!<|im_end|>", True),
                   ("\n" + im("user", "Bye") + "<|im_start|>assistant\n", False),
                   ("Goodbye.<|im_end|>", True), ("\n", False)],
    "weighted": [(SMOLLM2_DEFAULT_SYSTEM + im("user", "Hi") + "<|im_start|>assistant\n", False),
                 ("Draft answer.<|im_end|>", "weight0"),
                 ("\n" + im("user", "Better?") + "<|im_start|>assistant\n", False),
                 ("Final answer.<|im_end|>", True), ("\n", False)],
}

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1 = {
    "plain": [(BOS + "<｜User｜>What is 2+2?<｜Assistant｜>", False), ("4." + EOS, True)],
    "multi_turn": [(BOS + "Be brief.<｜User｜>Hi<｜Assistant｜>", False), ("Hello!" + EOS, True),
                   ("<｜User｜>Bye<｜Assistant｜>", False), ("Goodbye." + EOS, True)],
    "weighted": [(BOS + "<｜User｜>Hi<｜Assistant｜>", False), ("Draft answer." + EOS, "weight0"),
                 ("<｜User｜>Better?<｜Assistant｜>", False), ("Final answer." + EOS, True)],
    # the reasoning field is kept in the trained turn, as R1 writes it
    "reasoning_field": [(BOS + "<｜User｜>What is 2+2?<｜Assistant｜>", False),
                        ("<think>\nTwo plus two is four.\n</think>\n\n4." + EOS, True)],
    # a <think> block in the content stays in an earlier turn too (the published template strips
    # it there); a turn without reasoning gets no empty think block
    "reasoning_inline": [(BOS + "<｜User｜>What is 2+2?<｜Assistant｜>", False),
                         ("<think>\nTwo plus two is four.\n</think>\n\n4." + EOS, True),
                         ("<｜User｜>And 3+3?<｜Assistant｜>", False), ("6." + EOS, True)],
}

CONVERSATIONS = {"plain": PLAIN, "multi_turn": MULTI_TURN, "weighted": WEIGHTED, "tool_call": TOOL_CALL,
                 "reasoning_field": REASONING_FIELD, "reasoning_inline": REASONING_INLINE}
FAMILIES = {  # family -> (catalog id of its stand-in, expected renderings)
    "llama3": ("llama-3.1-8b", LLAMA),
    "qwen2.5": ("qwen-2.5-14b", QWEN),
    "r1-llama": ("deepseek-r1-distill-llama-70b", R1),
    "r1-qwen": ("deepseek-r1-distill-qwen-1.5b", R1),
    "smollm2": ("smollm2-135m", SMOLLM2),
}
CASES = [(family, case) for family, (_, expected) in FAMILIES.items() for case in expected]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tokenizers(store):
    from transformers import AutoTokenizer

    from tuneforge.trainer.standin import make_standin

    out = {}
    for family, (model_id, _) in FAMILIES.items():
        folder = make_standin(get_registry().base_model(model_id), store)
        out[family] = AutoTokenizer.from_pretrained(str(folder))
    return out


def expected_ids_and_labels(tokenizer, segments, train_on_inputs: str) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        carries = train_on_inputs == "true" or trained is True
        labels += piece if carries else [-100] * len(piece)
    return ids, labels


@pytest.mark.parametrize("train_on_inputs", ["auto", "true", "false"])
@pytest.mark.parametrize("family,case", CASES)
def test_loss_mask_is_exactly_the_trained_turns(tokenizers, family, case, train_on_inputs):
    from tuneforge_builtin.sft import ROW_CONVERSATION, resolve_loss_rule, tokenize_row

    tokenizer = tokenizers[family]
    segments = FAMILIES[family][1][case]
    row = template_row(CONVERSATIONS[case])
    rule = resolve_loss_rule(train_on_inputs, {ROW_CONVERSATION})
    got = tokenize_row(row, ROW_CONVERSATION, tokenizer, rule)
    ids, labels = expected_ids_and_labels(tokenizer, segments, train_on_inputs)
    assert tokenizer.decode(got["input_ids"]) == "".join(text for text, _ in segments)
    assert got["input_ids"] == ids
    assert got["labels"] == labels
    if train_on_inputs != "true":  # the end-of-turn token of every trained turn carries loss
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        trained_turns = sum(1 for _, trained in segments if trained is True)
        assert sum(1 for label in got["labels"] if label == eos) == trained_turns


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_tokens_are_single_ids(tokenizers, family):
    tokenizer = tokenizers[family]
    specials = {
        "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "qwen2.5": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"],
        "r1-llama": [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
        "r1-qwen": [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
        "smollm2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"],
    }[family]
    for token in specials:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.eos_token == {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>"}.get(family, EOS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_prompt_ends_where_the_mask_starts(tokenizers, family):
    """What a served model is prompted with is exactly the untrained prefix of the trained turn."""
    tokenizer = tokenizers[family]
    text = tokenizer.apply_chat_template(PLAIN["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert text == FAMILIES[family][1]["plain"][0][0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dataset_builder_renders_and_counts_like_the_trainer(tokenizers, store, family):
    """The dataset builder (jinja2 + tokenizers, no transformers) counts the trainer's tokens."""
    from tuneforge.dataset_builder.tokens import TokenCounter

    model_id, expected = FAMILIES[family]
    spec = get_registry().base_model(model_id)
    counter = TokenCounter.for_model(store, model_id, spec.training_chat_template)
    tokenizer = tokenizers[family]
    rows = [CONVERSATIONS[case] for case in expected]
    for row, n in zip(rows, counter.count(rows)):
        ready = template_row(row)
        text = tokenizer.apply_chat_template(ready["messages"], tools=ready.get("tools"), tokenize=False)
        assert counter.texts(row) == [text]
        assert n == len(tokenizer.apply_chat_template(ready["messages"], tools=ready.get("tools"),
                                                      tokenize=True, return_dict=True)["input_ids"])


def test_capabilities_and_catalog_numbers():
    registry = get_registry()
    builtin = {"llama", "qwen", "deepseek"}
    ours = {mid: spec for mid, spec in registry.base_models.items() if registry.model_plugins[mid] in builtin}
    assert sorted(ours) == [
        "deepseek-r1-distill-llama-70b", "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-14b",
        "llama-3.1-70b", "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b",
        "qwen-2.5-14b", "qwen-2.5-72b",
    ]
    # parameter counts computed from the published configs (they match the safetensors totals)
    assert ours["qwen-2.5-14b"].parameter_count == 14_770_033_664
    assert ours["qwen-2.5-72b"].parameter_count == 72_706_203_648
    assert ours["deepseek-r1-distill-qwen-1.5b"].parameter_count == 1_777_088_000
    assert ours["deepseek-r1-distill-qwen-14b"].parameter_count == 14_770_033_664
    assert ours["deepseek-r1-distill-llama-70b"].parameter_count == 70_553_706_496
    assert ours["qwen-2.5-14b"].context_length == 32_768
    assert all(ours[m].context_length == 131_072 for m in ours if m.startswith("deepseek"))
    for mid, spec in ours.items():
        assert ("tool_calling" in spec.capabilities) == (mid.startswith(("llama-3.1", "llama-3.3", "qwen")))
        assert ("reasoning" in spec.capabilities) == mid.startswith("deepseek")
        assert spec.standin.model_type == ("qwen2" if "qwen" in mid else "llama")
        assert spec.standin.tokenizer is not None
    assert ours["qwen-2.5-72b"].source == "Qwen/Qwen2.5-72B-Instruct"
    assert ours["deepseek-r1-distill-qwen-1.5b"].source == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert ours["deepseek-r1-distill-llama-70b"].display_name == "Deepseek R1 - Llama 3.3 70B Distil"


@pytest.mark.parametrize("model_id", ["qwen-2.5-14b", "deepseek-r1-distill-qwen-1.5b"])
def test_qwen2_standin_tokenizer_survives_reload(tokenizers, store, model_id):
    """AutoTokenizer rebuilds a Qwen2Tokenizer for model_type qwen2 (STACK-NOTES): the recipe
    trains exactly that pipeline, so ids equal the saved tokenizer.json's."""
    from tokenizers import Tokenizer

    family = "qwen2.5" if model_id.startswith("qwen") else "r1-qwen"
    tokenizer = tokenizers[family]
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    saved = Tokenizer.from_file(str(store / model_id / "tokenizer.json"))
    for text in ("Hello, world!\n\n", "café 東京 🙂  tabs\tand\r\nCRLF 12345", "Cafe\u0301 ﬁ",
                 '{"city": "Paris", "n": [1, 2]}', "def f(x):\n    return x ** 2\n"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == saved.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == saved.decode(ids)


def test_smollm2_catalog_entry():
    """The local real model (DESIGN §2): its numbers are SmolLM2-135M-Instruct's config.json's;
    the parameter count equals the real checkpoint's numel (tests/test_model_import.py loads it)."""
    registry = get_registry()
    spec = registry.base_model("smollm2-135m")
    assert registry.model_plugins["smollm2-135m"] == "smollm"
    assert (spec.display_name, spec.source) == ("SmolLM2 135M Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec.parameter_count == 134_515_008 and spec.context_length == 8_192
    assert spec.capabilities == ()
    assert spec.default_lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(spec.lora_target_modules) == 7
    assert spec.standin.model_type == "llama"
    assert spec.standin.tokenizer.leading_tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
