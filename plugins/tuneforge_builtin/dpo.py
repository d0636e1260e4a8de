"""DPO method plugin: direct preference optimisation with LoRA through TRL's ``DPOTrainer``.

Data: the dataset builder's preference snapshot, one pair a line:
``{"input": {"messages": [...], "tools": [...]?}, "preferred_output": [assistant messages],
"non_preferred_output": [assistant messages]}`` (``{"prompt", "chosen", "rejected"}`` with strings
or message lists is read too). Each pair becomes TRL's conversational ``prompt`` / ``chosen`` /
``rejected`` (+ ``tools``), rendered with the base model's training chat template; the loss is on
the two completions only, so ``train_on_inputs`` does not apply.

The reference model is the base model with the adapter disabled (no second copy of the weights);
its log-probabilities are computed once, before training, for the train and test splits
(``precompute_ref_log_probs``). Every shared hyperparameter means what it means for SFT: the
learning-rate schedule, ``n_evals`` evaluations on the test split, early stopping on the eval
(DPO) loss, ``n_checkpoints``, ``batch_size`` = preference pairs per optimiser step, the LoRA shape
(``lora_dropout`` included: TRL's ``disable_dropout`` is turned off so it is not silently
zeroed), seed, ``max_epochs`` — see :mod:`tuneforge_builtin.trl_common`.

Options: ``beta`` (default 0.1, range (0, 10]): the strength of the implicit KL penalty that keeps
the tuned model near the reference; larger values stay closer to the base model.

Metrics on the test split at the end: ``eval_loss``, ``eval_reward_accuracy`` (share of pairs
whose preferred output gets the higher implicit reward), ``eval_reward_margin`` (mean reward of the
preferred minus the non-preferred output), ``eval_reward_chosen`` / ``eval_reward_rejected``, and
``beta``. After training, greedy samples of the base model (adapter disabled) and the tuned one
on the first test prompts, and tool-call accuracy of both where the preferred outputs call tools
(:mod:`tuneforge_builtin.evaluation`); no base eval loss: the base's DPO loss against itself as
the reference is ln 2 by construction. Heavy imports happen inside functions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from tuneforge.core.hyperparameters import Param
from tuneforge.hookspecs import hookimpl
from tuneforge.training import DATASET_KIND_PREFERENCES, TrainingContext, TrainingResult
from tuneforge_builtin import evaluation, trl_common
from tuneforge_builtin.trl_common import planned_total_steps, read_jsonl

log = logging.getLogger(__name__)

OPTIONS: tuple[Param, ...] = (
    Param("beta", 0.1, float, 0.0, 10.0, False, True,
          "Strength of the KL penalty towards the reference (base) model: larger stays closer to it. "
          "Usual values are 0.01-0.5."),
)
OPTIONS_BY_NAME = {p.name: p for p in OPTIONS}

# TRL's evaluation metric -> ours (TrainingResult.metrics, TrainingMetrics.extra)
EVAL_METRICS = {
    "eval_loss": "eval_loss",
    "eval_rewards/accuracies": "eval_reward_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_rewards/chosen": "eval_reward_chosen",
    "eval_rewards/rejected": "eval_reward_rejected",
}


# ----------------------------------------------------------------------------------------------
# Options and data (no heavy imports).


def validate_option(param: Param, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"{param.name} must be a number in {param.range_text()}, got {raw!r}. {param.help}")
    value = float(raw)
    low_ok = value >= param.low if param.low_inclusive else value > param.low
    high_ok = value <= param.high if param.high_inclusive else value < param.high
    if not math.isfinite(value) or not (low_ok and high_ok):
        raise ValueError(f"{param.name} must be in {param.range_text()}, got {raw!r}. {param.help}")
    return value


def _messages(value: Any, role: str, where: str) -> list[dict[str, Any]]:
    """A string as one message of ``role``, or a non-empty list of message objects."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and m.get("role") for m in value):
        raise ValueError(f"{where} must be a non-empty list of messages")
    return value


def preference_pair(row: dict[str, Any], where: str) -> dict[str, Any]:
    """TRL's conversational preference example (``prompt``, ``chosen``, ``rejected``, ``tools``)
    of one universal-format row."""
    if "input" in row:
        inp = row["input"]
        if not isinstance(inp, dict):
            raise ValueError(f'{where}: input must be {{"messages": [...]}}')
        prompt = _messages(inp.get("messages"), "user", f"{where}: input.messages")
        tools = inp.get("tools") or None
        chosen, rejected = row.get("preferred_output"), row.get("non_preferred_output")
        names = ("preferred_output", "non_preferred_output")
    elif "chosen" in row and "rejected" in row:
        prompt = _messages(row.get("prompt"), "user", f"{where}: prompt")
        tools = row.get("tools") or None
        chosen, rejected = row["chosen"], row["rejected"]
        names = ("chosen", "rejected")
    else:
        raise ValueError(f"{where}: not a preference pair (keys {sorted(row)}): expected input, "
                         "preferred_output and non_preferred_output")
    chosen = _messages(chosen, "assistant", f"{where}: {names[0]}")
    rejected = _messages(rejected, "assistant", f"{where}: {names[1]}")
    for name, output in zip(names, (chosen, rejected), strict=True):
        if any(m["role"] != "assistant" for m in output):
            raise ValueError(f"{where}: {name} must hold assistant messages only")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools}


def read_pairs(path, split: str) -> list[dict[str, Any]]:
    return [preference_pair(row, f"{split} example {n}") for n, row in enumerate(read_jsonl(path), 1)]


def preference_dataset(pairs: list[dict[str, Any]]):
    """A ``datasets.Dataset`` of conversational pairs. Messages and tools are JSON values: struct
    inference across rows corrupts tool calls (STACK-NOTES)."""
    from datasets import Dataset, Features, Json, List

    features = Features({"prompt": List(Json()), "chosen": List(Json()), "rejected": List(Json()),
                         "tools": List(Json())})
    columns = {key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected", "tools")}
    return Dataset.from_dict(columns, features=features)


# ----------------------------------------------------------------------------------------------


class DirectPreferenceOptimisation:
    """The ``dpo`` training method."""

    name = "dpo"
    display_name = "Direct preference optimisation"
    dataset_kind = DATASET_KIND_PREFERENCES
    option_names: tuple[str, ...] = tuple(OPTIONS_BY_NAME)

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            valid = ", ".join(f"{p.name} (default {p.default:g}, range {p.range_text()})" for p in OPTIONS)
            raise ValueError(f"unknown DPO option(s): {', '.join(unknown)}; valid options: {valid}")
        return {p.name: p.default if options.get(p.name) is None else validate_option(p, options[p.name])
                for p in OPTIONS}

    def train(self, context: TrainingContext) -> TrainingResult:
        prepared, options = self.prepare(context)
        result = trl_common.run_to_completion(prepared, context)
        metrics = dict(result.metrics)
        for theirs, ours in EVAL_METRICS.items():
            if theirs in prepared.run.final_eval_metrics:
                metrics[ours] = prepared.run.final_eval_metrics[theirs]
        metrics["beta"] = options["beta"]
        return dataclasses.replace(result, metrics=metrics)

    def prepare(self, context: TrainingContext) -> tuple[trl_common.PreparedRun, dict[str, Any]]:
        """Data, model and a ready ``DPOTrainer`` for ``context`` (nothing trained yet; the
        reference log-probabilities are computed already)."""
        from trl import DPOConfig, DPOTrainer

        options = self.validate_options(context.method_options)
        hp = context.hyperparameters
        paths = trl_common.RunPaths.for_context(context)
        if hp.train_on_inputs == "true":
            log.info("job %s: train_on_inputs=true does not apply to DPO (the loss is on the outputs)",
                     context.job_id)

        train_pairs = read_pairs(context.train_file, "train")
        test_pairs = read_pairs(context.test_file, "test")
        if not train_pairs:
            raise ValueError("the training split has no preference pairs")

        device = trl_common.detect_device()
        model, tokenizer = trl_common.load_model_and_tokenizer(context, paths, device)
        max_length = trl_common.max_sequence_length(model, context.base_model)
        train_dataset = preference_dataset(train_pairs)
        eval_dataset = preference_dataset(test_pairs) if test_pairs else None
        n_evals = hp.n_evals if eval_dataset is not None else 0

        total_steps = planned_total_steps(len(train_dataset), hp.batch_size, hp.max_epochs)
        config = DPOConfig(
            **trl_common.trainer_arguments(hp, context.seed, paths, device, total_steps),
            beta=options["beta"],
            loss_type=["sigmoid"],  # the DPO paper's loss
            max_length=max_length,
            truncation_mode="keep_start",
            padding_free=False,
            precompute_ref_log_probs=True,  # one reference pass before training (same losses, faster)
            disable_dropout=False,  # keep lora_dropout as given (the base models have no dropout)
        )
        prepared = trl_common.prepare_trainer(
            DPOTrainer, context, paths, model=model, tokenizer=tokenizer, config=config,
            train_dataset=train_dataset, eval_dataset=eval_dataset, n_evals=n_evals,
            ref_model=None,  # with a peft_config: the base with the adapter disabled
            # The base's DPO loss against itself is ln 2: compare greedy samples, not losses.
            evaluation_set=evaluation.preference_evaluation_set(test_pairs), evaluate_base_loss=False,
        )
        return prepared, options


DPO = DirectPreferenceOptimisation()


@hookimpl
def register_training_methods(register):
    register(DPO)
