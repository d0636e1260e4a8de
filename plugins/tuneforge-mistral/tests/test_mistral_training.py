"""Real training runs on the tiny random stand-ins, through the built-in methods exactly as the
trainer worker calls them: SFT and DPO on the Mixtral stand-in (8 experts, top-2, LoRA on the
attention), SFT with tool calls and every LoRA module on the Mistral v0.3 stand-in.

Everything is built locally (no download); the file runs in under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tuneforge.core.hyperparameters import ResolvedHyperparameters
from tuneforge.training import TrainingContext

from mistral_fixtures import (  # noqa: F401 (fixtures are imported to be used)
    MISTRAL,
    MIXTRAL,
    mistral_specs,
    one_torch_thread,
    standin_dirs,
    standin_tokenizers,
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_MODULES = ATTENTION + ("gate_proj", "up_proj", "down_proj")
PEAK_LR = 2e-2  # a tiny random model needs a high rate to learn visibly in a few steps
WORDS = ("apple", "river", "green", "stone", "cloud", "music", "table", "light")
CITIES = ("Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# data


def conversations(n: int, seed: int) -> list[dict]:
    """Repetitive (learnable) conversations without tools; some with a system prompt, some two turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(WORDS)
        messages = [{"role": "user", "content": f"Repeat: {word}"},
                    {"role": "assistant", "content": f"{word} {word} {word}"}]
        if i % 3 == 1:
            messages.insert(0, {"role": "system", "content": "Answer in three words."})
        if i % 3 == 2:
            messages += [{"role": "user", "content": "Say hello."},
                         {"role": "assistant", "content": "Hello! Hello! Hello!"}]
        rows.append({"messages": messages})
    return rows


def tool_conversations(n: int, seed: int) -> list[dict]:
    """Universal-format tool-call conversations (arguments as JSON strings), half without tools."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        city, temp = rng.choice(CITIES), rng.randint(-5, 35)
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": f"Repeat: {city}"},
                                      {"role": "assistant", "content": f"{city} {city} {city}"}]})
            continue
        call = {"id": f"call{i:05d}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        rows.append({"messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ], "tools": [WEATHER_TOOL]})
    return rows


def preference_pairs(n: int, seed: int) -> list[dict]:
    """The dataset builder's preference format: the preferred output repeats the word, the other is junk."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        junk = " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(3, 6))) for _ in range(3))
        rows.append({
            "input": {"messages": [{"role": "user", "content": f"Repeat the word {word}."}]},
            "preferred_output": [{"role": "assistant", "content": f"{word} {word} {word}"}],
            "non_preferred_output": [{"role": "assistant", "content": junk}],
        })
    return rows


def write_split(root: Path, rows: list[dict], n_test: int) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for name, part in (("train.jsonl", rows[:-n_test]), ("test.jsonl", rows[-n_test:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        files.append(root / name)
    return files[0], files[1]


def context(spec, model_dir, files, output_dir, *, modules=ATTENTION, options=None, **overrides) -> TrainingContext:
    values = dict(learning_rate=PEAK_LR, batch_size=4, max_epochs=2, n_evals=2, n_checkpoints=1, lora_rank=8,
                  lora_alpha=16.0, lora_dropout=0.0, early_stopping_patience=0, seed=0, lora_target_modules=modules)
    values.update(overrides)
    hp = ResolvedHyperparameters(**values)
    return TrainingContext(job_id=f"job-{spec.id}", base_model=spec, model_dir=model_dir, train_file=files[0],
                           test_file=files[1], output_dir=output_dir, hyperparameters=hp, seed=hp.seed,
                           method_options=options or {})


def load_adapter(model_dir: Path, adapter_dir: Path):
    """(base model, the same base with the adapter) — the adapter loaded by peft from disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir))
    return base, tuned.eval()


def check_adapter(adapter_dir: Path, model_dir: Path, modules: tuple[str, ...], parameters: tuple[str, ...] = ()) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    assert sorted(config["target_modules"]) == sorted(modules)
    assert sorted(config.get("target_parameters") or ()) == sorted(parameters)  # Mixtral's fused experts


# ---------------------------------------------------------------------------------------------
# Mixtral


def test_mixtral_sft_trains_and_its_adapter_loads(mistral_specs, standin_dirs, standin_tokenizers, tmp_path):
    import torch

    from tuneforge_builtin.sft import SFT

    spec, model_dir, tok = mistral_specs[MIXTRAL], standin_dirs[MIXTRAL], standin_tokenizers[MIXTRAL]
    files = write_split(tmp_path / "data", conversations(24, seed=1), n_test=4)
    progress = []
    ctx = context(spec, model_dir, files, tmp_path / "run")
    ctx.report_progress = progress.append
    result = SFT.train(ctx)

    assert result.steps == 10 and not result.cancelled  # 20 examples / batch 4 × 2 epochs
    assert result.metrics["loss_on_inputs"] == 0.0  # conversations: assistant turns only
    evals = [p.eval_loss for p in progress if p.eval_loss is not None]
    assert len(evals) == 2 and all(math.isfinite(e) for e in evals)
    assert evals[-1] < evals[0] < math.log(len(tok))  # a repetitive task: it learns
    check_adapter(result.adapter_dir, model_dir, ATTENTION)

    base, tuned = load_adapter(model_dir, result.adapter_dir)
    assert type(tuned.get_base_model()).__name__ == "MixtralForCausalLM"
    assert tuned.get_base_model().config.num_local_experts == 8
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Repeat: river"}],
                                                tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        base_logits, tuned_logits = base(ids).logits, tuned(ids).logits
    assert torch.isfinite(tuned_logits).all()
    assert not torch.allclose(base_logits, tuned_logits)  # the trained adapter changes the model
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * len(ATTENTION) and all(p.abs().sum() > 0 for p in lora_b)


def test_mixtral_dpo_trains_and_its_adapter_loads(mistral_specs, standin_dirs, tmp_path):
    import torch

    from tuneforge.plugins import get_registry

    dpo = get_registry().method("dpo")
    assert dpo.dataset_kind == "preferences"
    spec, model_dir = mistral_specs[MIXTRAL], standin_dirs[MIXTRAL]
    files = write_split(tmp_path / "data", preference_pairs(20, seed=2), n_test=4)
    result = dpo.train(context(spec, model_dir, files, tmp_path / "run", options={"beta": 0.2}))

    assert result.steps == 8 and not result.cancelled  # 16 pairs / batch 4 × 2 epochs
    assert result.metrics["beta"] == 0.2
    assert math.isfinite(result.eval_loss)
    # trained towards the preferred outputs: the test pairs' preferred side wins
    assert result.metrics["eval_reward_accuracy"] >= 0.75
    assert result.metrics["eval_reward_margin"] > 0
    check_adapter(result.adapter_dir, model_dir, ATTENTION)
    base, tuned = load_adapter(model_dir, result.adapter_dir)
    assert type(tuned.get_base_model()).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


def test_mixtral_lora_on_the_experts_on_request(mistral_specs, standin_dirs, tmp_path):
    """The experts' fused weights are selectable by name (never by default): they go to peft's
    target_parameters, train, and the saved adapter loads and changes the experts' output."""
    import torch

    from tuneforge.core.hyperparameters import resolve
    from tuneforge_builtin.sft import SFT
    from tuneforge_mistral import MIXTRAL_EXPERT_PARAMETERS

    spec, model_dir = mistral_specs[MIXTRAL], standin_dirs[MIXTRAL]
    chosen = resolve({"lora_target_modules": ("q_proj", "v_proj", *MIXTRAL_EXPERT_PARAMETERS)},
                     available_modules=spec.lora_target_modules,
                     default_modules=spec.default_lora_target_modules).lora_target_modules
    files = write_split(tmp_path / "data", conversations(12, seed=4), n_test=4)
    result = SFT.train(context(spec, model_dir, files, tmp_path / "run", modules=chosen, max_epochs=1, n_evals=1))
    assert result.steps == 2 and math.isfinite(result.eval_loss)
    check_adapter(result.adapter_dir, model_dir, ("q_proj", "v_proj"), MIXTRAL_EXPERT_PARAMETERS)
    base, tuned = load_adapter(model_dir, result.adapter_dir)
    expert_lora = [n for n, p in tuned.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(expert_lora) == 2 * base.config.num_hidden_layers  # gate_up and down in every layer
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


# ---------------------------------------------------------------------------------------------
# Mistral v0.3


def test_mistral_sft_with_tool_calls_on_every_module(mistral_specs, standin_dirs, tmp_path):
    """TRL's own assistant-only path (one format, no weights) on the v0.3 template with tools."""
    from tuneforge_builtin.sft import SFT

    spec, model_dir = mistral_specs[MISTRAL], standin_dirs[MISTRAL]
    files = write_split(tmp_path / "data", tool_conversations(10, seed=3), n_test=2)
    result = SFT.train(context(spec, model_dir, files, tmp_path / "run", modules=ALL_MODULES,
                               max_epochs=1, n_evals=1))
    assert result.steps == 2 and math.isfinite(result.eval_loss)
    assert result.metrics["loss_on_inputs"] == 0.0
    check_adapter(result.adapter_dir, model_dir, ALL_MODULES)
    _, tuned = load_adapter(model_dir, result.adapter_dir)
    assert type(tuned.get_base_model()).__name__ == "MistralForCausalLM"
    assert {n.split(".")[-4] for n, _ in tuned.named_parameters() if "lora_A" in n} == set(ALL_MODULES)
