"""Every built-in family trains: SFT and DPO with LoRA on the Qwen 2.5 and both R1 distill
stand-ins (Llama's own runs are in test_sft_training / test_dpo_training), on data of the kind
each family takes (tool calls for Qwen, reasoning for R1), and the adapters load with peft."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tuneforge.core.hyperparameters import ResolvedHyperparameters
from tuneforge.plugins import get_registry
from tuneforge.training import TrainingContext

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = ("Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo")


def tool_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        city, temp = rng.choice(CITIES), rng.randint(-5, 35)
        rows.append({"messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city}, separators=(",", ":"))}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temperature": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ], "tools": [WEATHER_TOOL]})
    return rows


def reasoning_rows(n: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        answer = {"role": "assistant", "content": f"{a + b}."}
        if i % 2:
            answer["reasoning"] = f"{a} plus {b} is {a + b}."
        else:
            answer["content"] = f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\n{a + b}."
        rows.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?"}, answer]})
    return rows


def preference_rows(n: int) -> list[dict]:
    rng = random.Random(2)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"input": {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}]},
                     "preferred_output": [{"role": "assistant", "content": f"{a + b}."}],
                     "non_preferred_output": [{"role": "assistant", "content": "I do not know, sorry!"}]})
    return rows


DATA = {"qwen-2.5-14b": tool_rows, "deepseek-r1-distill-qwen-1.5b": reasoning_rows,
        "deepseek-r1-distill-llama-70b": reasoning_rows}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this module trains: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from tuneforge.trainer.standin import make_standin

    root = tmp_path_factory.mktemp("models")
    for model_id in DATA:
        make_standin(get_registry().base_model(model_id), root)
    return root


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(method: str, model_id: str, rows: list[dict], store: Path, tmp_path: Path, **options):
    spec = get_registry().base_model(model_id)
    hp = ResolvedHyperparameters(
        learning_rate=1e-2, batch_size=4, max_epochs=1, n_evals=1, n_checkpoints=1, lora_rank=4,
        lora_alpha=8.0, lora_dropout=0.0, early_stopping_patience=0, warmup_ratio=0.0, lr_peak_ratio=0.0,
        seed=0, lora_target_modules=spec.default_lora_target_modules)
    context = TrainingContext(
        job_id=f"job-{method}-{model_id}", base_model=spec, model_dir=store / model_id,
        train_file=write(tmp_path / "train.jsonl", rows[:8]), test_file=write(tmp_path / "test.jsonl", rows[8:]),
        output_dir=tmp_path / "run", hyperparameters=hp, method_options=options, seed=0)
    return get_registry().method(method).train(context)


def assert_adapter_loads(result, store: Path, model_id: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((store / model_id).resolve())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(store / model_id)), str(result.adapter_dir))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("model_id", list(DATA))
def test_sft_trains_each_family(model_id, store, tmp_path):
    result = run("sft", model_id, DATA[model_id](12), store, tmp_path)
    assert result.steps == 2 and not result.cancelled
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    assert_adapter_loads(result, store, model_id)


@pytest.mark.parametrize("model_id", ["qwen-2.5-14b", "deepseek-r1-distill-llama-70b"])
def test_dpo_trains_each_family(model_id, store, tmp_path):
    result = run("dpo", model_id, preference_rows(12), store, tmp_path, beta=0.1)
    assert result.steps == 2 and not result.cancelled
    for name in ("eval_reward_accuracy", "eval_reward_margin"):
        assert math.isfinite(result.metrics[name]), name
    assert_adapter_loads(result, store, model_id)
