"""DPO with LoRA on a tiny random Llama 3 stand-in: options, data conversion, the reference model,
a real run on a learnable preference set, progress and checkpoints, metrics, cancellation.

Everything is built locally (no download); the file runs in about half a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tuneforge.core.hyperparameters import ResolvedHyperparameters, learning_rate_multiplier
from tuneforge.training import TrainingContext

CATALOG_ID = "llama-3.2-1b"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PEAK_LR = 2e-2  # a tiny random model needs a high rate to learn visibly in a dozen steps
BETA = 0.2  # not the default, so the metrics show it was passed through
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
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_web",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
    },
}


# ---------------------------------------------------------------------------------------------
# helpers


def junk(rng: random.Random) -> str:
    """Random letter soup: the non-preferred output, unlike anything the preferred one says."""
    return " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(3, 6))) for _ in range(4))


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference set in the dataset builder's universal format (one in four in the
    ``prompt``/``chosen``/``rejected`` form): the preferred output always follows a fixed pattern
    (repeat the word three times; call the weather tool for the city), the other is junk."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 4 == 0:
            city = rng.choice(CITIES)
            call = {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
            rows.append({
                "input": {"messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
                          "tools": [WEATHER_TOOL]},
                "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]}],
                "non_preferred_output": [{"role": "assistant", "content": junk(rng)}],
            })
        elif i % 4 == 3:
            word = rng.choice(WORDS)
            rows.append({"prompt": f"Repeat the word {word}.", "chosen": f"{word} {word} {word}",
                         "rejected": junk(rng)})
        else:
            word = rng.choice(WORDS)
            rows.append({
                "input": {"messages": [{"role": "user", "content": f"Repeat the word {word}."}]},
                "preferred_output": [{"role": "assistant", "content": f"{word} {word} {word}"}],
                "non_preferred_output": [{"role": "assistant", "content": junk(rng)}],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hyperparameters(**overrides) -> ResolvedHyperparameters:
    values = dict(
        learning_rate=PEAK_LR, batch_size=8, max_epochs=2, n_evals=2, n_checkpoints=2,
        lora_rank=8, lora_alpha=16.0, lora_dropout=0.1, early_stopping_patience=0,
        warmup_ratio=0.0, lr_peak_ratio=0.0, seed=0, lora_target_modules=ATTENTION,
    )
    values.update(overrides)
    return ResolvedHyperparameters(**values)


def completion_logps(model, tokenizer, pairs: list[dict]) -> list[tuple[float, float]]:
    """Sum of the log-probabilities of the chosen and the rejected completion after the prompt,
    computed here from the chat template (independently of TRL's code path)."""
    import torch

    out = []
    for pair in pairs:
        def encode(messages, **kwargs):
            return list(tokenizer.apply_chat_template(
                messages, tools=pair["tools"], tokenize=True, return_dict=True, **kwargs)["input_ids"])

        prompt = encode(pair["prompt"], add_generation_prompt=True)
        logps = []
        for key in ("chosen", "rejected"):
            ids = encode(pair["prompt"] + pair[key])
            start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), len(prompt))
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            per_token = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logps.append(float(per_token[start - 1:].sum()))
        out.append((logps[0], logps[1]))
    return out


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
def tokenizer(standin_dir, spec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(standin_dir))
    tok.chat_template = spec.training_chat_template
    return tok


@pytest.fixture(scope="module")
def pair_rows() -> list[dict]:
    return make_pairs(56, seed=1)


@pytest.fixture(scope="module")
def data_files(pair_rows, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "train.jsonl", pair_rows[:48]), write_jsonl(root / "test.jsonl", pair_rows[48:])


def make_context(spec, standin_dir, data_files, output_dir, **kwargs) -> TrainingContext:
    train_file, test_file = data_files
    hp = kwargs.pop("hyperparameters", None) or hyperparameters()
    return TrainingContext(
        job_id="job-dpo", base_model=spec, model_dir=standin_dir, train_file=train_file, test_file=test_file,
        output_dir=output_dir, hyperparameters=hp, seed=hp.seed, method_options={"beta": BETA}, **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# plugin wiring and options (no torch)


def test_registry_finds_the_dpo_method():
    from tuneforge.plugins import get_registry
    from tuneforge.training import DATASET_KIND_PREFERENCES

    get_registry.cache_clear()
    registry = get_registry()
    method = registry.method("dpo")
    assert method.name == "dpo" and method.display_name == "Direct preference optimisation"
    assert method.dataset_kind == DATASET_KIND_PREFERENCES
    assert registry.method_plugins["dpo"] == "dpo"  # its own entry point
    assert registry.method("sft").dataset_kind != DATASET_KIND_PREFERENCES


def test_beta_option_is_validated():
    from tuneforge_builtin.dpo import DPO

    assert DPO.validate_options({}) == {"beta": 0.1}
    assert DPO.validate_options(None) == {"beta": 0.1}
    assert DPO.validate_options({"beta": 0.5}) == {"beta": 0.5}
    assert DPO.validate_options({"beta": 10}) == {"beta": 10.0}  # the top of (0, 10]
    assert isinstance(DPO.validate_options({"beta": 1})["beta"], float)
    for bad in ("0.1", True, [0.1], float("nan"), float("inf"), -0.1, 0, 0.0, 10.5, 1e9):
        with pytest.raises(ValueError, match=r"beta must .*\(0, 10\]"):
            DPO.validate_options({"beta": bad})
    with pytest.raises(ValueError, match=r"unknown DPO option\(s\): gamma, packing; valid options: beta"):
        DPO.validate_options({"beta": 0.1, "packing": True, "gamma": 1})


def test_success_email_shows_extra_metrics():
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.notifier import messages

    event = ev.JobSucceeded(job_name="prefs", model_name="prefs", method="dpo", base_model=CATALOG_ID)
    event.metrics.steps = 25
    event.metrics.eval_loss = 0.25
    event.metrics.extra.update({"eval_reward_accuracy": 0.875, "eval_reward_margin": 1.5, "beta": 0.1,
                                "eval_loss": 0.25, "total_steps": 25, "custom_score": 3.25})
    _, body = messages.job_succeeded(event)
    assert "Reward accuracy on the test split (preferred output scored higher): 87.5%" in body
    assert "Mean reward margin on the test split (preferred minus non-preferred): 1.5000" in body
    assert "DPO beta: 0.1" in body and "custom_score: 3.25" in body
    assert "total_steps" not in body  # already on the Training line
    event.metrics.extra.clear()
    assert "Metrics:" not in messages.job_succeeded(event)[1]  # an SFT run without extras


def test_worker_keeps_finite_metrics_only():
    from tuneforge.trainer.worker import extra_metrics

    assert extra_metrics({"eval_reward_accuracy": 0.75, "steps": 3, "beta": 0.1, "bad": float("nan"),
                          "worse": float("inf"), "flag": True, "text": "x"}) == {
        "eval_reward_accuracy": 0.75, "steps": 3.0, "beta": 0.1}


# ---------------------------------------------------------------------------------------------
# data


def test_pairs_convert_to_trl_conversational_format():
    from tuneforge.training import template_row
    from tuneforge_builtin.dpo import preference_pair

    universal, _, _, legacy = make_pairs(4)
    pair = preference_pair(universal, "train example 1")
    assert pair["prompt"] == universal["input"]["messages"]
    assert pair["chosen"] == universal["preferred_output"]
    assert pair["rejected"] == universal["non_preferred_output"]
    assert pair["tools"] == [WEATHER_TOOL]
    pair = preference_pair(legacy, "x")
    assert pair["prompt"] == [{"role": "user", "content": legacy["prompt"]}]
    assert pair["chosen"] == [{"role": "assistant", "content": legacy["chosen"]}]
    assert pair["rejected"] == [{"role": "assistant", "content": legacy["rejected"]}]
    assert pair["tools"] is None

    bad = {"input": {"messages": []}, "preferred_output": "a", "non_preferred_output": "b"}
    with pytest.raises(ValueError, match="train example 7: input.messages must be a non-empty list"):
        preference_pair(bad, "train example 7")
    with pytest.raises(ValueError, match="non_preferred_output must hold assistant messages only"):
        preference_pair({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "a",
                         "non_preferred_output": [{"role": "user", "content": "b"}]}, "x")
    with pytest.raises(ValueError, match="not a preference pair"):
        preference_pair({"messages": [{"role": "user", "content": "q"}]}, "x")

    # Two different tools across rows: each pair renders its own tools and calls.
    search_call = {"id": "c9", "type": "function",
                   "function": {"name": "search_web", "arguments": json.dumps({"query": "q", "limit": 3})}}
    search = {"input": {"messages": [{"role": "user", "content": "Find q."}], "tools": [SEARCH_TOOL]},
              "preferred_output": [{"role": "assistant", "content": "", "tool_calls": [search_call]}],
              "non_preferred_output": "no"}
    pairs = [preference_pair(template_row(r), "x") for r in (legacy, universal, search)]
    assert pairs[2]["tools"] == [SEARCH_TOOL] and pairs[1]["tools"] == [WEATHER_TOOL]


def test_pairs_tokenise_like_trl(spec, standin_dir, data_files, tokenizer, tmp_path):
    """TRL's DPOTrainer dataset processing against ``tokenize_pair`` (prompt, chosen and rejected
    ids of every training pair)."""
    from datasets import Dataset, Features, Json, List
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneforge_builtin.dpo import read_pairs, tokenize_pair

    pairs = read_pairs(data_files[0], "train")
    features = Features({k: List(Json()) for k in ("prompt", "chosen", "rejected", "tools")})
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected", "tools")},
                                features=features)
    model = AutoModelForCausalLM.from_pretrained(str(standin_dir))
    trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None))
    ours = [tokenize_pair(p, tokenizer, None) for p in pairs]
    theirs = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]
    assert ours == theirs
    assert any('"name": "get_weather"' in tokenizer.decode(o["prompt_ids"]) for o in ours)


def test_packed_dpo_loss_equals_trl(spec, standin_dir, data_files, tokenizer, tmp_path):
    """One batch through TRL's DPOTrainer (padded, reference forward with the adapter disabled) and
    through the packed trainer (reference precomputed, LM head on completion tokens only): the same
    loss, rewards and gradients. The adapter starts non-zero so that policy and reference differ."""
    import torch
    from datasets import Dataset, Features, Json, List
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainingArguments
    from trl import DPOConfig, DPOTrainer

    from tuneforge_builtin import packed
    from tuneforge_builtin.dpo import (
        PreferenceCollator,
        precompute_reference,
        preference_trainer_class,
        read_pairs,
        tokenize_pair,
    )

    pairs = read_pairs(data_files[0], "train")[:6]
    features = Features({k: List(Json()) for k in ("prompt", "chosen", "rejected", "tools")})
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected", "tools")},
                                features=features)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=list(ATTENTION),
                task_type="CAUSAL_LM")

    def trl_side():
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_pretrained(str(standin_dir))
        trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                             peft_config=LoraConfig(**lora),
                             args=DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[],
                                            max_length=None, beta=BETA, loss_type=["sigmoid"]))
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return loss.detach(), trainer._metrics["train"]["rewards/margins"][-1], grads, weights

    def packed_side(weights):
        from peft import get_peft_model

        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_pretrained(str(standin_dir), attn_implementation=packed.register_attention())
        model = get_peft_model(model, LoraConfig(**lora))
        with torch.no_grad():  # the same adapter as TRL's side
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[n])
        trainer = preference_trainer_class()(
            model=model, args=TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to=[],
                                                remove_unused_columns=False),
            data_collator=PreferenceCollator(), beta=BETA)
        rows = precompute_reference(model, [tokenize_pair(p, tokenizer, None) for p in pairs], 4, "cpu")
        model.train()
        loss = trainer.compute_loss(model, PreferenceCollator()(rows))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), trainer._dpo_metrics["train"]["rewards/margins"][-1], grads

    trl_loss, trl_margin, trl_grads, weights = trl_side()
    our_loss, our_margin, our_grads = packed_side(weights)
    assert abs(float(trl_loss) - math.log(2)) > 1e-3  # the policy really differs from the reference
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-4, atol=1e-5)
    assert our_margin == pytest.approx(trl_margin, rel=1e-3, abs=1e-5)
    assert trl_grads.keys() == our_grads.keys() and trl_grads
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_prepared_trainer_uses_the_base_model_as_reference(spec, standin_dir, data_files, tokenizer, tmp_path):
    """No second copy of the weights: the reference is the base with the adapter disabled, its
    log-probabilities precomputed for both splits; the product's settings, not TRL's defaults."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge_builtin.dpo import DPO, preference_pair

    hp = hyperparameters(learning_rate=3e-3, batch_size=4)
    prepared, options = DPO.prepare(make_context(spec, standin_dir, data_files, tmp_path / "run", hyperparameters=hp))
    trainer = prepared.trainer
    assert options == {"beta": BETA} and trainer.beta == BETA
    assert isinstance(trainer.model, PeftModel) and list(trainer.model.peft_config) == ["default"]
    base = AutoModelForCausalLM.from_pretrained(str(standin_dir))
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert lora > 0
    assert sum(p.numel() for p in trainer.model.parameters()) == sum(p.numel() for p in base.parameters()) + lora

    args = trainer.args
    assert args.learning_rate == 3e-3  # TRL's DPO default rate is 1e-6
    assert args.per_device_train_batch_size == 4  # preference pairs per step
    assert not args.bf16
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.lora_dropout["default"].p == 0.1  # lora_dropout is not zeroed by TRL
    assert q_proj.r["default"] == 8 and q_proj.scaling["default"] == 2.0  # alpha 16 / rank 8

    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        assert all({"ref_chosen_logps", "ref_rejected_logps"} <= set(row) for row in dataset)
    # The tool-call pair: tools rendered into the prompt, the call as the chosen completion.
    first = trainer.train_dataset[0]
    assert '"name": "get_weather"' in tokenizer.decode(first["prompt_ids"])
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(first["chosen_ids"]).startswith('{"name": "get_weather", "parameters": {"city": ')
    assert tokenizer.decode(first["chosen_ids"]).endswith("<|eot_id|>")
    # The reference log-probabilities are the base model's.
    rows = [json.loads(line) for line in data_files[0].read_text().splitlines()[:3]]
    base.eval()
    expected = completion_logps(base, tokenizer, [preference_pair(r, "x") for r in rows])
    for i, (chosen, rejected) in enumerate(expected):
        assert trainer.train_dataset[i]["ref_chosen_logps"] == pytest.approx(chosen, rel=1e-4)
        assert trainer.train_dataset[i]["ref_rejected_logps"] == pytest.approx(rejected, rel=1e-4)
    assert torch.isfinite(torch.tensor([row["ref_rejected_logps"] for row in trainer.train_dataset])).all()


# ---------------------------------------------------------------------------------------------
# a real run


@pytest.fixture(scope="module")
def dpo_run(spec, standin_dir, data_files, tmp_path_factory):
    from tuneforge_builtin.dpo import DPO

    progress, checkpoints = [], []
    hp = hyperparameters(warmup_ratio=0.2, lr_peak_ratio=0.1)
    context = make_context(
        spec, standin_dir, data_files, tmp_path_factory.mktemp("run"), hyperparameters=hp,
        report_progress=progress.append, report_checkpoint=checkpoints.append,
    )
    return context, DPO.train(context), progress, checkpoints


def test_dpo_run_reports_progress_and_checkpoints(dpo_run, standin_dir):
    context, result, progress, checkpoints = dpo_run
    total = 12  # 48 pairs / 8 per step × 2 epochs
    assert result.steps == total and not result.cancelled and not result.stopped_early
    assert [p.step for p in progress if p.train_loss is not None] == list(range(1, total + 1))
    assert all(p.total_steps == total for p in progress)
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in progress if p.train_loss is not None)
    assert progress[0].train_loss == pytest.approx(math.log(2), rel=1e-4)  # adapter starts as the identity
    assert progress[-1].step == total and progress[-1].eta_seconds == 0.0
    evals = [(p.step, p.eval_loss) for p in progress if p.eval_loss is not None]
    assert [step for step, _ in evals] == [6, 12]  # n_evals=2, spread evenly
    assert result.eval_loss == evals[-1][1]

    # The product's schedule: warmup from 0.1 × peak to the peak, cosine back down (not TRL's 1e-6).
    lrs = {p.step: p.learning_rate for p in progress if p.train_loss is not None}
    for step, lr in lrs.items():
        assert lr == pytest.approx(PEAK_LR * learning_rate_multiplier(step - 1, total, 0.2, 0.1), rel=1e-6)
    assert max(lrs.values()) == pytest.approx(PEAK_LR)

    # n_checkpoints=2: a full checkpoint halfway, then the final adapter.
    assert [c.step for c in checkpoints] == [6, 12]
    assert result.checkpoints == tuple(checkpoints)
    middle = checkpoints[0].path
    assert middle == context.output_dir.resolve() / "checkpoints" / "step-6"
    assert (middle / "adapter_model.safetensors").is_file() and (middle / "optimizer.pt").is_file()
    assert checkpoints[0].eval_loss == evals[0][1]
    adapter = result.adapter_dir
    assert checkpoints[-1].path == adapter and (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(standin_dir.resolve())
    assert sorted(adapter_config["target_modules"]) == sorted(ATTENTION)


def test_dpo_metrics_on_the_test_split(dpo_run):
    _, result, progress, _ = dpo_run
    metrics = result.metrics
    for name in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "beta"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["beta"] == BETA
    assert metrics["eval_loss"] == result.eval_loss
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0
    # learned: the test pairs follow the same pattern
    assert metrics["eval_loss"] < math.log(2)
    assert metrics["eval_reward_accuracy"] > 0.5 and metrics["eval_reward_margin"] > 0
    assert metrics["eval_reward_chosen"] > metrics["eval_reward_rejected"]


def test_dpo_adapter_loads_and_prefers_the_chosen_outputs(dpo_run, data_files, standin_dir, tokenizer):
    """Reward accuracy on the training pairs, computed here from the saved adapter: the implicit
    reward beta × (log p_tuned − log p_base) of the chosen output beats the rejected one's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge_builtin.dpo import read_pairs

    _, result, _, _ = dpo_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(standin_dir)), str(result.adapter_dir))
    model.eval()
    pairs = read_pairs(data_files[0], "train")
    tuned = completion_logps(model, tokenizer, pairs)
    with model.disable_adapter():
        base = completion_logps(model, tokenizer, pairs)
    margins = [BETA * ((tc - bc) - (tr - br)) for (tc, tr), (bc, br) in zip(tuned, base)]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    print(f"reward accuracy on the {len(pairs)} training pairs: {accuracy:.3f}, "
          f"mean margin {sum(margins) / len(margins):.3f}")
    assert accuracy > 0.9
    assert sum(margins) / len(margins) > 0


# ---------------------------------------------------------------------------------------------
# cancellation


def test_cancellation_stops_within_one_step(spec, standin_dir, data_files, tmp_path):
    from tuneforge_builtin.dpo import DPO

    progress = []
    context = make_context(
        spec, standin_dir, data_files, tmp_path / "run",
        hyperparameters=hyperparameters(n_evals=0, n_checkpoints=1, max_epochs=5),
        report_progress=progress.append,
        should_stop=lambda: bool(progress) and progress[-1].step >= 2,
    )
    result = DPO.train(context)
    assert result.cancelled and result.steps == 3  # asked after step 2's report: stops at the next step
    assert result.eval_loss is None and "eval_reward_accuracy" not in result.metrics
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [c.path for c in result.checkpoints] == [result.adapter_dir]
