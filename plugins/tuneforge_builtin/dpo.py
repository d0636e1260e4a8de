"""DPO method plugin: direct preference optimisation with LoRA, padding-free (TRL's loss and metrics).

Data: the dataset builder's preference snapshot, one pair a line:
``{"input": {"messages": [...], "tools": [...]?}, "preferred_output": [assistant messages],
"non_preferred_output": [assistant messages]}`` (``{"prompt", "chosen", "rejected"}`` with strings
or message lists is read too). Each pair is tokenised once, as TRL's ``DPOTrainer`` tokenises it
(:func:`tokenize_pair`, tested against it): the prompt with the base model's training chat template
and generation prompt, each output after it; the loss is on the two outputs only, so
``train_on_inputs`` does not apply.

Fast path (:mod:`tuneforge_builtin.packed`): a batch's prompt+chosen and prompt+rejected sequences
go through the model as one padding-free row with attention kept inside each sequence, and the LM
head runs only on output tokens. The loss is TRL's ``sigmoid`` DPO loss with TRL's metric names;
``tests/test_dpo_training.py`` checks loss, rewards and gradients equal ``DPOTrainer``'s on a batch.
The reference model is the base model with the adapter disabled (no second copy of the weights);
its log-probabilities are computed once, before training, for the train and test splits.
Every shared hyperparameter means what it means for SFT: the
learning-rate schedule, ``n_evals`` evaluations on the test split, early stopping on the eval
(DPO) loss, ``n_checkpoints``, ``batch_size`` = preference pairs per optimiser step, the LoRA shape
(``lora_dropout`` included), seed, ``max_epochs`` — see :mod:`tuneforge_builtin.trl_common`.

Options: ``beta`` (default 0.1, range (0, 10]): the strength of the implicit KL penalty that keeps
the tuned model near the reference; larger values stay closer to the base model. ``quantization``
(``"none"`` default, or ``"4bit"``: QLoRA, the base — also the reference, the adapter disabled — in
4-bit NF4 on a CUDA GPU with bitsandbytes). It trains as one process or as several
(``supports_distributed``: :mod:`tuneforge_builtin.distributed`; the loss is a mean over each rank's
pairs, which DDP's gradient average turns into the mean over the step's pairs).

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
import functools
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(pair: dict[str, Any], tokenizer, max_length: int | None) -> dict[str, list[int]] | None:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` of one pair, as TRL's ``DPOTrainer`` makes
    them: the prompt rendered with the generation prompt, each completion = the rendered prompt +
    completion after their common prefix with it; ``max_length`` cuts prompt + completion from the
    end (``keep_start``). None when the prompt alone fills ``max_length`` (nothing to learn)."""

    def ids(messages, **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tools=pair.get("tools") or None, tokenize=True,
                                            return_dict=True, **kwargs)
        return list(out["input_ids"])

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    chosen = ids(pair["prompt"] + pair["chosen"])
    rejected = ids(pair["prompt"] + pair["rejected"])
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt[:n], chosen[n:], rejected[n:]
    if max_length:
        if len(prompt_ids) >= max_length:
            return None
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def sequences(pairs: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """A batch of tokenised pairs as the sequences of one packed row: every pair's prompt + chosen,
    then every pair's prompt + rejected; labels only on the completions."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            prompt, completion = pair["prompt_ids"], pair[key]
            out.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return out


class PreferenceCollator:
    """Pairs (with ``ref_chosen_logps``/``ref_rejected_logps`` once precomputed) → one packed row."""

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from tuneforge_builtin import packed

        batch = packed.pack(sequences(pairs))
        if "ref_chosen_logps" in pairs[0]:
            batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32)
        return batch


def sequence_logps(model, batch):
    """Summed log-probabilities of each packed sequence's label tokens (``[n sequences]``), the LM
    head run on those positions only."""
    import torch

    from tuneforge_builtin import packed

    positions, targets = packed.loss_positions(batch["labels"])
    logits = packed.logits_at(model, batch, positions).float()
    token_logps = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    cu = batch["cu_seq_lens_q"].to(positions.device).long()
    which = torch.bucketize(positions, cu[1:], right=True)
    return torch.zeros(cu.numel() - 1, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, which, token_logps)


def precompute_reference(model, pairs: list[dict[str, Any]], batch_size: int, device) -> list[dict[str, Any]]:
    """The reference (base model: adapter disabled) log-probabilities of every pair, computed once,
    packed, without gradients."""
    import torch

    collate = PreferenceCollator()
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad(), model.disable_adapter():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(chunk).items()}
                logps = sequence_logps(model, batch).cpu().tolist()
                n = len(chunk)
                out += [{**p, "ref_chosen_logps": c, "ref_rejected_logps": r}
                        for p, c, r in zip(chunk, logps[:n], logps[n:], strict=True)]
    finally:
        model.train(was_training)
    return out


@functools.cache
def preference_trainer_class() -> type:
    """The packed trainer with the DPO (sigmoid) loss against precomputed reference log-probs,
    and TRL's metric names (``rewards/chosen``, ``rewards/accuracies``, ...)."""
    import collections

    import torch

    from tuneforge_builtin import packed

    class PackedDPOTrainer(packed.packed_trainer_class()):
        beta = 0.1
        max_tokens_per_forward = 0  # a row holds whole pairs (chosen and rejected): never cut
        # Several processes: the loss is each rank's mean over its pairs, which DDP's average makes
        # the step's mean only when every rank has as many pairs: accelerate's equal shards (an
        # epoch's partial last batch is filled up with pairs from its start).
        exact_global_batches = False

        def __init__(self, *args, beta: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta = beta
            self.model_accepts_loss_kwargs = False  # mean over pairs: the trainer scales for accumulation
            self._dpo_metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logps = sequence_logps(model, inputs)
            n = inputs["ref_chosen_logps"].numel()
            chosen, rejected = logps[:n], logps[n:]
            chosen_ratio = chosen - inputs["ref_chosen_logps"]
            rejected_ratio = rejected - inputs["ref_rejected_logps"]
            loss = -torch.nn.functional.logsigmoid(self.beta * (chosen_ratio - rejected_ratio)).mean()
            mode = "train" if model.training else "eval"
            if model.training:
                self.real_tokens_seen += int(inputs["input_ids"].numel())
            with torch.no_grad():
                chosen_rewards, rejected_rewards = self.beta * chosen_ratio, self.beta * rejected_ratio
                m = self._dpo_metrics[mode]
                m["rewards/chosen"].append(chosen_rewards.mean().item())
                m["rewards/rejected"].append(rejected_rewards.mean().item())
                m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
                m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
                m["logps/chosen"].append(chosen.mean().item())
                m["logps/rejected"].append(rejected.mean().item())
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            mode = "train" if self.model.training else "eval"
            prefix = "eval_" if mode == "eval" else ""
            # In place: the evaluation's callbacks and return value see the same dict (as TRL's).
            logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in self._dpo_metrics[mode].items() if v})
            self._dpo_metrics[mode].clear()
            return super().log(logs, *args, **kwargs)

    return PackedDPOTrainer


# ----------------------------------------------------------------------------------------------


class DirectPreferenceOptimisation:
    """The ``dpo`` training method."""

    name = "dpo"
    display_name = "Direct preference optimisation"
    dataset_kind = DATASET_KIND_PREFERENCES
    option_names: tuple[str, ...] = (*OPTIONS_BY_NAME, *trl_common.SHARED_OPTIONS)
    supports_distributed = True  # every rank runs ``train`` (tuneforge_builtin.distributed)

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every numeric option with its default filled in; the shared options (``quantization``,
        ``gradient_checkpointing``) normalised when given (their defaults are not added)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            valid = ", ".join(f"{p.name} (default {p.default:g}, range {p.range_text()})" for p in OPTIONS)
            valid += f", {trl_common.SHARED_OPTIONS_TEXT}"
            raise ValueError(f"unknown DPO option(s): {', '.join(unknown)}; valid options: {valid}")
        out = {p.name: p.default if options.get(p.name) is None else validate_option(p, options[p.name])
               for p in OPTIONS}
        trl_common.validate_shared_options(options, out)
        return out

    def check_runtime(self, options: dict[str, Any]) -> None:
        """Before training, on the worker: ValueError (for the job's owner) when this machine cannot
        run the options (4bit without CUDA or without bitsandbytes)."""
        trl_common.check_quantization_runtime(options.get(trl_common.QUANTIZATION_OPTION) or "none")

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
        """Data, model and a ready trainer for ``context`` (nothing trained yet; the reference
        log-probabilities are computed already): pairs tokenised once, packed without padding
        (:mod:`tuneforge_builtin.packed`), the LM head only on completion tokens."""
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

        device, speed, model, tokenizer = trl_common.load_for_packed_training(context, paths)
        max_length = trl_common.max_sequence_length(model, context.base_model)

        def tokenized(pairs, split):
            out = [t for t in (tokenize_pair(p, tokenizer, max_length) for p in pairs) if t is not None]
            if len(out) < len(pairs):
                log.warning("job %s: %d %s pairs skipped: the prompt alone fills max_length %d",
                            context.job_id, len(pairs) - len(out), split, max_length)
            return out

        train_dataset = tokenized(train_pairs, "train")
        eval_dataset = tokenized(test_pairs, "test") or None
        if not train_dataset:
            raise ValueError(f"no training pair fits max_length {max_length}")
        n_evals = hp.n_evals if eval_dataset is not None else 0

        total_steps = planned_total_steps(len(train_dataset), hp.batch_size, hp.max_epochs)
        config = trl_common.packed_training_arguments(hp, context.seed, paths, device, total_steps)
        prepared = trl_common.prepare_trainer(
            preference_trainer_class(), context, paths, model=model, tokenizer=tokenizer, config=config,
            train_dataset=train_dataset, eval_dataset=eval_dataset, n_evals=n_evals,
            data_collator=PreferenceCollator(), speed=speed, beta=options["beta"],
            # The base's DPO loss against itself is ln 2: compare greedy samples, not losses.
            evaluation_set=evaluation.preference_evaluation_set(test_pairs), evaluate_base_loss=False,
        )
        trainer = prepared.trainer
        reference_batch = max(hp.batch_size, 8)
        trainer.train_dataset = precompute_reference(trainer.model, train_dataset, reference_batch, trainer.args.device)
        if eval_dataset is not None:
            trainer.eval_dataset = precompute_reference(trainer.model, eval_dataset, reference_batch,
                                                        trainer.args.device)
        log.info("job %s: reference log-probabilities computed once (%d train, %d test pairs)", context.job_id,
                 len(train_dataset), len(eval_dataset or ()))
        return prepared, options


DPO = DirectPreferenceOptimisation()


@hookimpl
def register_training_methods(register):
    register(DPO)
