"""SFT with LoRA on a tiny random Llama 3 stand-in: template, masks, a real run, schedule, registry.

Everything is built locally (no download). The whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.core.hyperparameters import ResolvedHyperparameters, learning_rate_multiplier
from tuneforge.training import TrainingContext

CATALOG_ID = "llama-3.2-1b"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PEAK_LR = 2e-2  # high enough for a tiny random model to learn visibly in 10 steps

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_web",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"],
        },
    },
}
CITIES = ("Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo")
WORDS = ("apple", "river", "green", "stone", "cloud", "music", "table", "light")


# ---------------------------------------------------------------------------------------------
# helpers


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_conversation(city: str, temp: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None,
             "tool_calls": [tool_call("call_1", "get_weather", {"city": city, "unit": "celsius"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ],
        "tools": [WEATHER_TOOL],
    }


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    """Small, repetitive (learnable) conversations; every fourth one calls a tool."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 4 == 0:
            rows.append(tool_conversation(rng.choice(CITIES), rng.randint(-5, 35)))
        elif i % 4 == 1:
            word = rng.choice(WORDS)
            rows.append({"messages": [
                {"role": "user", "content": f"Repeat: {word}"},
                {"role": "assistant", "content": f"{word} {word} {word}"},
            ]})
        elif i % 4 == 2:
            rows.append({"messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello! Hello! Hello!"},
            ]})
        else:
            query = rng.choice(WORDS)
            rows.append({
                "messages": [
                    {"role": "user", "content": f"Find pages about {query}."},
                    {"role": "assistant", "content": "",
                     "tool_calls": [tool_call("c9", "search_web", {"query": query, "limit": 3})]},
                ],
                "tools": [SEARCH_TOOL],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hyperparameters(**overrides) -> ResolvedHyperparameters:
    values = dict(
        learning_rate=PEAK_LR, batch_size=8, max_epochs=2, n_evals=2, n_checkpoints=2,
        lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, early_stopping_patience=0,
        warmup_ratio=0.0, lr_peak_ratio=0.0, seed=0, lora_target_modules=ATTENTION,
    )
    values.update(overrides)
    return ResolvedHyperparameters(**values)


def masked_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this module trains: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def spec():
    from tuneforge_builtin import llama

    return {s.id: s for s in llama.specs()}[CATALOG_ID]


@pytest.fixture(scope="module")
def standin_dir(spec, tmp_path_factory) -> Path:
    from tuneforge.trainer.standin import make_standin

    return make_standin(spec, tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(standin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(standin_dir))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = make_conversations(48, seed=1)
    return write_jsonl(root / "train.jsonl", rows[:40]), write_jsonl(root / "test.jsonl", rows[40:])


def make_context(spec, standin_dir, data_files, output_dir, **kwargs) -> TrainingContext:
    train_file, test_file = data_files
    hp = kwargs.pop("hyperparameters", None) or hyperparameters()
    return TrainingContext(
        job_id="job-test", base_model=spec, model_dir=standin_dir, train_file=train_file,
        test_file=test_file, output_dir=output_dir, hyperparameters=hp, seed=hp.seed, **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# catalog and plugin wiring


def test_registry_finds_llama_specs_and_sft_method():
    from tuneforge.plugins import get_registry
    from tuneforge.training import ALL_LORA_MODULES, DATASET_KIND_CONVERSATIONS

    get_registry.cache_clear()
    registry = get_registry()
    expected = {
        "llama-3.1-8b": 8_030_261_248,
        "llama-3.1-70b": 70_553_706_496,
        "llama-3.2-1b": 1_235_814_400,
        "llama-3.2-3b": 3_212_749_824,
        "llama-3.3-70b": 70_553_706_496,
    }
    for model_id, parameters in expected.items():
        spec = registry.base_model(model_id)
        assert spec.family == "llama" and spec.parameter_count == parameters
        assert spec.context_length == 131_072
        assert spec.lora_target_modules == ALL_LORA_MODULES
        assert spec.default_lora_target_modules == ATTENTION
        assert "{%- generation %}" in spec.training_chat_template
        assert "{%- endgeneration %}" in spec.training_chat_template
        tools = "tool_calling" in spec.capabilities and "planning" in spec.capabilities
        assert tools == (model_id.startswith("llama-3.1") or model_id.startswith("llama-3.3"))
        assert spec.standin.model_type == "llama"
        assert spec.standin.config["tie_word_embeddings"] == model_id.startswith("llama-3.2")
    assert registry.base_model("llama-3.2-1b").source == "meta-llama/Llama-3.2-1B-Instruct"
    method = registry.method("sft")
    assert method.display_name == "Supervised fine-tuning"
    assert method.dataset_kind == DATASET_KIND_CONVERSATIONS
    assert method.validate_options({}) == {}
    with pytest.raises(ValueError, match="unknown SFT option"):
        method.validate_options({"packing": True})


def test_plugin_modules_do_not_import_torch():
    code = (
        "import sys, tuneforge.trainer.standin\n"
        "import tuneforge_builtin.llama, tuneforge_builtin.qwen, tuneforge_builtin.deepseek, tuneforge_builtin.catalog\n"
        "import tuneforge_builtin.sft, tuneforge_builtin.dpo, tuneforge_builtin.trl_common\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# (a) stand-in, template, tokenizer


def test_standin_reloads_and_renders_tool_calls(spec, standin_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    marker = json.loads((standin_dir / "tuneforge_standin.json").read_text())
    assert marker["catalog_id"] == CATALOG_ID and marker["family"] == "llama"
    assert "not real weights" in marker["note"]
    assert (standin_dir / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(str(standin_dir))
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert 2000 <= len(tokenizer) <= 4100
    assert model.config.tie_word_embeddings is True
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    for token in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|eom_id|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("Hello there")])).logits
    assert logits.shape[-1] == len(tokenizer)

    for text in ("Hello, world!\n\n", "café 東京 🙂  tabs\tand\r\nCRLF", '{"city": "Paris", "n": [1, 2]}',
                 "def f(x):\n    return x ** 2\n"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id  # BOS on plain encode, as Llama 3

    row = tool_conversation("Paris", 21)
    text = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert '"name": "get_weather"' in text  # the tool list, as JSON, in the system prompt
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n"
            '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>') in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21}<|eot_id|>' in text
    assert text.endswith("It is 21 degrees in Paris.<|eot_id|>")
    assert "You are a helpful assistant.<|eot_id|>" in text
    prompt = tokenizer.apply_chat_template(row["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Environment: ipython" not in prompt  # no tools, no tool preamble
    # arguments given as an encoded JSON string are not encoded twice
    string_args = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    assert '{"name": "f", "parameters": {"a": 1}}<|eot_id|>' in tokenizer.apply_chat_template(string_args, tokenize=False)
    assert (standin_dir / "chat_template.jinja").read_text() == spec.training_chat_template


def test_standin_is_deterministic(spec, tmp_path):
    from tuneforge.trainer.standin import make_standin

    a = make_standin(spec, tmp_path / "a", seed=3)
    b = make_standin(spec, tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# (b) assistant-only mask


def test_assistant_mask_covers_exactly_assistant_output(tokenizer):
    row = tool_conversation("Oslo", 4)
    row["messages"].insert(2, {"role": "assistant", "content": "Let me check."})
    row["messages"].insert(3, {"role": "user", "content": "Please do."})
    out = tokenizer.apply_chat_template(
        row["messages"], tools=row["tools"], return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    expected = [
        "Let me check.",
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
        "It is 4 degrees in Oslo.",
    ]
    runs = masked_runs(mask)
    assert [ids[a:b] for a, b in runs] == [
        tokenizer.encode(text, add_special_tokens=False) + [eot] for text in expected
    ]
    for start, _ in runs:
        assert tokenizer.decode(ids[:start]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert sum(mask) == sum(b - a for a, b in runs)


def test_mixed_formats_are_tokenised_per_example(tokenizer):
    from tuneforge_builtin.sft import classify, resolve_loss_rule, tokenize_row

    rows = [make_conversations(2)[1], {"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"text": "Plain text."}]
    kinds = classify(rows, "train")
    rule = resolve_loss_rule("auto", set(kinds))
    assert rule.assistant_only and rule.completion_only
    conv, pc, text = (tokenize_row(r, k, tokenizer, rule) for r, k in zip(rows, kinds))
    eot = tokenizer.eos_token_id
    word = rows[0]["messages"][1]["content"]
    assert [t for t in conv["labels"] if t != -100] == tokenizer.encode(word, add_special_tokens=False) + [eot]
    assert [t for t in pc["labels"] if t != -100] == tokenizer.encode(" 4", add_special_tokens=False) + [eot]
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == eot
    everything = resolve_loss_rule("true", set(kinds))
    assert tokenize_row(rows[0], kinds[0], tokenizer, everything)["labels"] == conv["input_ids"]


def test_message_weights_choose_the_assistant_turns_that_carry_loss(tokenizer):
    """auto + `weight`: an assistant message with weight 0 carries no loss, weight 1 does; the
    string form of tool-call arguments (the universal format's) renders as is."""
    from tuneforge_builtin.sft import ROW_CONVERSATION, resolve_loss_rule, tokenize_row

    row = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Draft answer.", "weight": 0},
        {"role": "user", "content": "Better?"},
        {"role": "assistant", "content": "Final answer.", "weight": 1},
    ]}
    rule = resolve_loss_rule("auto", {ROW_CONVERSATION})
    labels = tokenize_row(row, ROW_CONVERSATION, tokenizer, rule)["labels"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert [t for t in labels if t != -100] == tokenizer.encode("Final answer.", add_special_tokens=False) + [eot]
    row["messages"][1]["weight"] = 1
    labels = tokenize_row(row, ROW_CONVERSATION, tokenizer, rule)["labels"]
    both = [t for t in labels if t != -100]
    assert both == (tokenizer.encode("Draft answer.", add_special_tokens=False) + [eot]
                    + tokenizer.encode("Final answer.", add_special_tokens=False) + [eot])


def test_loss_rule_resolution():
    from tuneforge_builtin.sft import ROW_CONVERSATION, ROW_PROMPT_COMPLETION, ROW_TEXT, resolve_loss_rule

    assert resolve_loss_rule("auto", {ROW_CONVERSATION}).assistant_only
    assert resolve_loss_rule("false", {ROW_CONVERSATION}).assistant_only
    assert resolve_loss_rule("true", {ROW_CONVERSATION}).loss_on_inputs
    assert resolve_loss_rule("auto", {ROW_TEXT}).loss_on_inputs
    assert resolve_loss_rule("auto", {ROW_PROMPT_COMPLETION}).completion_only
    assert resolve_loss_rule("true", {ROW_PROMPT_COMPLETION}).loss_on_inputs
    with pytest.raises(ValueError):
        resolve_loss_rule("maybe", {ROW_TEXT})


# ---------------------------------------------------------------------------------------------
# (c) + (f) a real run


@pytest.fixture(scope="module")
def sft_run(spec, standin_dir, data_files, tmp_path_factory):
    from tuneforge_builtin.sft import SFT

    progress, checkpoints = [], []
    hp = hyperparameters(warmup_ratio=0.2, lr_peak_ratio=0.1)
    context = make_context(
        spec, standin_dir, data_files, tmp_path_factory.mktemp("run"), hyperparameters=hp,
        report_progress=progress.append, report_checkpoint=checkpoints.append,
    )
    return context, SFT.train(context), progress, checkpoints


def test_sft_run_reports_progress_and_checkpoints(sft_run, standin_dir):
    context, result, progress, checkpoints = sft_run
    total = 10  # 40 examples / batch 8 × 2 epochs
    assert result.steps == total and not result.cancelled and not result.stopped_early
    train_steps = [p.step for p in progress if p.train_loss is not None]
    assert train_steps == list(range(1, total + 1))
    assert all(p.total_steps == total for p in progress)
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in progress if p.train_loss is not None)
    assert all(p.eta_seconds is not None and p.eta_seconds >= 0 for p in progress)
    assert progress[-1].step == total and progress[-1].eta_seconds == 0.0
    evals = [(p.step, p.eval_loss) for p in progress if p.eval_loss is not None]
    assert [step for step, _ in evals] == [5, 10]  # n_evals=2, spread evenly
    assert result.eval_loss == evals[-1][1]
    assert result.train_loss is not None and math.isfinite(result.train_loss)

    # n_checkpoints=2: one full checkpoint halfway, then the final adapter
    assert [c.step for c in checkpoints] == [5, 10]
    assert result.checkpoints == tuple(checkpoints)
    middle = checkpoints[0].path
    assert middle == context.output_dir.resolve() / "checkpoints" / "step-5"
    assert (middle / "adapter_model.safetensors").is_file()
    assert (middle / "optimizer.pt").is_file() and (middle / "trainer_state.json").is_file()
    assert checkpoints[0].eval_loss == evals[0][1]

    adapter = result.adapter_dir
    assert checkpoints[-1].path == adapter
    assert (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(standin_dir.resolve())
    assert Path(adapter_config["base_model_name_or_path"]).is_absolute()
    assert sorted(adapter_config["target_modules"]) == sorted(ATTENTION)
    assert (adapter / "tokenizer.json").is_file()


def test_sft_adapter_loads_and_learned(sft_run, standin_dir, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result, progress, _ = sft_run
    base = AutoModelForCausalLM.from_pretrained(str(standin_dir))
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    with torch.no_grad():
        out = model(torch.tensor([tokenizer.encode("Say hello.")]))
    assert torch.isfinite(out.logits).all()

    # a repetitive task at a high learning rate: eval loss falls well below chance (ln V) and keeps falling
    evals = [p.eval_loss for p in progress if p.eval_loss is not None]
    assert evals[-1] < evals[0] < math.log(len(tokenizer))
    assert evals[-1] < math.log(len(tokenizer)) - 1.0


def test_trainer_learning_rate_follows_multiplier(sft_run):
    _, result, progress, _ = sft_run
    lrs = {p.step: p.learning_rate for p in progress if p.train_loss is not None}
    total = result.steps
    for step, lr in lrs.items():  # the rate logged at step s (1-based) is the one that step used
        assert lr == pytest.approx(PEAK_LR * learning_rate_multiplier(step - 1, total, 0.2, 0.1), rel=1e-6)
    assert lrs[1] == pytest.approx(PEAK_LR * 0.1)  # starts at r × peak
    assert lrs[3] == pytest.approx(PEAK_LR)  # peak after the 2 warmup steps
    assert lrs[total] == pytest.approx(PEAK_LR * 0.1)  # cosine back down to r × peak


def test_resume_from_checkpoint_reproduces_the_run(sft_run, spec, standin_dir, data_files, tmp_path):
    from tuneforge_builtin.sft import SFT

    uninterrupted_context, uninterrupted, _, _ = sft_run
    progress = []
    hp = uninterrupted_context.hyperparameters
    interrupted = SFT.train(make_context(
        spec, standin_dir, data_files, tmp_path / "run", hyperparameters=hp,
        report_progress=progress.append, should_stop=lambda: bool(progress) and progress[-1].step >= 5,
    ))
    assert interrupted.cancelled and interrupted.steps == 6
    checkpoint = interrupted.checkpoints[0]
    assert checkpoint.step == 5 and checkpoint.path.name == "step-5"
    resumed_progress = []
    resumed = SFT.train(make_context(
        spec, standin_dir, data_files, tmp_path / "run", hyperparameters=hp,
        report_progress=resumed_progress.append, resume_from=checkpoint.path,
    ))
    assert not resumed.cancelled and resumed.steps == 10
    assert [p.step for p in resumed_progress if p.train_loss is not None] == [6, 7, 8, 9, 10]
    assert resumed.eval_loss == pytest.approx(uninterrupted.eval_loss, rel=1e-5)


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "mixed"])
def test_other_formats_train(fmt, spec, standin_dir, tmp_path):
    from tuneforge_builtin.sft import SFT

    prompt_completion = [{"prompt": f"Q: {i} + 1?\nA:", "completion": f" {i + 1}"} for i in range(12)]
    text = [{"text": f"Line {i}: the quick brown fox jumps."} for i in range(12)]
    conversations = make_conversations(12)
    rows = {
        "prompt_completion": prompt_completion,
        "text": text,
        "mixed": [r for triple in zip(prompt_completion, text, conversations) for r in triple][:12],
    }[fmt]
    files = (write_jsonl(tmp_path / "train.jsonl", rows[:8]), write_jsonl(tmp_path / "test.jsonl", rows[8:]))
    hp = hyperparameters(max_epochs=1, batch_size=4, n_evals=1, n_checkpoints=1)
    result = SFT.train(make_context(spec, standin_dir, files, tmp_path / "run", hyperparameters=hp))
    assert result.steps == 2 and math.isfinite(result.eval_loss)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.metrics["loss_on_inputs"] == (1.0 if fmt == "text" else 0.0)


# ---------------------------------------------------------------------------------------------
# (d) cancellation, early stopping


def test_cancellation_stops_and_saves_adapter(spec, standin_dir, data_files, tmp_path):
    from tuneforge_builtin.sft import SFT

    progress = []
    context = make_context(
        spec, standin_dir, data_files, tmp_path / "run",
        hyperparameters=hyperparameters(n_evals=0, n_checkpoints=1, max_epochs=5),
        report_progress=progress.append,
        should_stop=lambda: bool(progress) and progress[-1].step >= 2,
    )
    result = SFT.train(context)
    assert result.cancelled and result.steps == 3  # asked after step 2's report: stops at the next step
    assert result.eval_loss is None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [c.path for c in result.checkpoints] == [result.adapter_dir]


def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
    from transformers import TrainerControl, TrainerState

    from tuneforge_builtin.trl_common import RunState, callback_classes

    schedule_cls, _ = callback_classes()
    run = RunState()
    callback = schedule_cls(run, 10, 1, 2, tmp_path, lambda: False, lambda report: None)
    state = TrainerState(max_steps=100)
    control = TrainerControl()
    callback.on_train_begin(None, state, control)
    assert run.eval_steps == frozenset(range(10, 101, 10))
    for step, loss in [(10, 3.0), (20, 2.0), (30, 2.5)]:
        state.global_step = step
        callback.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        assert not control.should_training_stop
    state.global_step = 40
    callback.on_evaluate(None, state, control, metrics={"eval_loss": 2.0})  # equal is no improvement
    assert control.should_training_stop and run.stopped_early and run.best_eval_loss == 2.0


# ---------------------------------------------------------------------------------------------
# (e) learning-rate multiplier and schedules (no torch)


def test_learning_rate_multiplier_shape():
    total = 100
    constant = [learning_rate_multiplier(s, total, 0.0, 0.0) for s in range(total)]
    assert constant == [1.0] * total
    warm = [learning_rate_multiplier(s, total, 0.1, 0.0) for s in range(total)]
    assert all(a < b for a, b in zip(warm[:10], warm[1:11])) and warm[10:] == [1.0] * 90
    r = 0.2
    curve = [learning_rate_multiplier(s, total, 0.1, r) for s in range(total)]
    assert curve[0] == pytest.approx(r)
    assert all(a < b for a, b in zip(curve[:10], curve[1:11]))  # linear warmup r → 1
    assert curve[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(curve[10:-1], curve[11:]))  # cosine down
    assert curve[-1] == pytest.approx(r)
    midpoint = 10 + (total - 1 - 10) / 2
    assert learning_rate_multiplier(int(midpoint), total, 0.1, r) == pytest.approx((1 + r) / 2, abs=0.02)
    assert learning_rate_multiplier(0, 10, 0.0, r) == pytest.approx(1.0)  # no warmup: starts at the peak


def test_spread_schedule():
    from tuneforge_builtin.trl_common import spread

    assert spread(2, 10) == [5, 10]
    assert spread(3, 10) == [4, 7, 10]
    assert spread(1, 7) == [7]
    assert spread(20, 5) == [1, 2, 3, 4, 5]
    assert spread(0, 10) == []


# ---------------------------------------------------------------------------------------------
# (f) gradient checkpointing (the default for jobs sized for a GPU pool, core.pools)


def test_gradient_checkpointing_option_recomputes_and_gives_the_same_losses(spec, standin_dir, data_files, tmp_path):
    """``gradient_checkpointing=true`` turns on non-reentrant activation checkpointing in the
    trainer's arguments and trains the same run: per-step losses equal to the run without it
    (same data order, no dropout). Its memory saving is measured on a GPU
    (benchmarks/gpu_distributed_check.py --gradient-checkpointing)."""
    from tuneforge.core import pools
    from tuneforge_builtin.sft import SFT

    hp = hyperparameters(max_epochs=1, n_evals=1, n_checkpoints=1)
    runs = {}
    for flag in (False, True):
        progress = []
        context = make_context(spec, standin_dir, data_files, tmp_path / str(flag), hyperparameters=hp,
                               method_options={"gradient_checkpointing": flag}, report_progress=progress.append)
        prepared, _rule = SFT.prepare(context)
        assert prepared.trainer.args.activation_checkpointing is flag
        result = SFT.train(context)
        runs[flag] = ({p.step: p.train_loss for p in progress if p.train_loss is not None}, result.eval_loss)
    (off, off_eval), (on, on_eval) = runs[False], runs[True]
    assert off and off.keys() == on.keys()
    for step in off:
        assert on[step] == pytest.approx(off[step], rel=1e-5), step
    assert on_eval == pytest.approx(off_eval, rel=1e-5)
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        SFT.validate_options({"gradient_checkpointing": "yes"})
    # The worker's default: on for every GPU pool, off for small / unsized / legacy items.
    assert [pools.needs_gradient_checkpointing(p) for p in ("small", "", "legacy", "gpu-24g", "gpu-4x80g")] == [
        False, False, False, True, True]
