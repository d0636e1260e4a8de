"""A stand-in for every catalog model: the real architecture class, the family's tokenizer, the
training template; made by `tuneforge models make-standin` as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneforge.plugins import get_registry

ARCHITECTURE_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}


@pytest.mark.parametrize("model_id", sorted(get_registry().base_models))
def test_every_catalog_model_has_a_working_standin(model_id, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.trainer.standin import is_standin, make_standin

    spec = get_registry().base_model(model_id)
    folder = make_standin(spec, tmp_path)
    assert is_standin(folder)
    marker = json.loads((folder / "tuneforge_standin.json").read_text())
    assert marker["catalog_id"] == model_id and marker["source_of_real_weights"] == spec.source
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert type(model).__name__ == ARCHITECTURE_CLASS[spec.standin.model_type]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == spec.standin.tokenizer.eos_token
    assert (folder / "chat_template.jinja").read_text() == spec.training_chat_template
    if spec.standin.model_type == "qwen2":  # Qwen2 keeps its q/k/v biases
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(spec.default_lora_target_modules) <= names
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(text, add_special_tokens=False)])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(tokenizer)


def test_make_standin_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "models", "make-standin", "deepseek-r1-distill-qwen-1.5b",
         "--store", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Deepseek R1 - Qwen 1.5B Distill" in result.stdout
    assert (tmp_path / "deepseek-r1-distill-qwen-1.5b" / "model.safetensors").is_file()
    unknown = subprocess.run([sys.executable, "-m", "tuneforge.cli", "models", "make-standin", "gpt-5",
                              "--store", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "qwen-2.5-14b" in unknown.stderr
