"""SFT method plugin: supervised fine-tuning with LoRA, padding-free (:mod:`tuneforge_builtin.packed`).

Data: universal-format JSONL, one example a line: ``{"messages": [...], "tools": [...]?}``
(OpenAI chat format), ``{"prompt": ..., "completion": ...}`` (strings or message lists) or
``{"text": ...}``. Which tokens carry the loss follows ``train_on_inputs`` (see
:func:`resolve_loss_rule`).

The schedule (learning rate, evaluations, checkpoints, early stopping, cancellation), progress
reports, checkpoints and the final adapter are the shared ones of
:mod:`tuneforge_builtin.trl_common`. Heavy imports (torch, transformers, trl, peft, datasets)
happen inside functions: this module is imported by services that never load torch.

Options: ``quantization`` (``"none"`` default, or ``"4bit"``: QLoRA, the base model in 4-bit NF4 on
a CUDA GPU with bitsandbytes; see ``trl_common.load_model_and_tokenizer``). It trains as one
process or as several (``supports_distributed``: :mod:`tuneforge_builtin.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tuneforge.hookspecs import hookimpl
from tuneforge.training import DATASET_KIND_CONVERSATIONS, TrainingContext, TrainingResult
from tuneforge_builtin import evaluation, packed, trl_common
from tuneforge_builtin.trl_common import planned_total_steps, read_jsonl

log = logging.getLogger(__name__)

ROW_CONVERSATION = "conversation"  # {"messages": [...], "tools": [...]?}
ROW_PROMPT_COMPLETION = "prompt_completion"  # {"prompt": str, "completion": str}
ROW_CONVERSATIONAL_PROMPT_COMPLETION = "conversational_prompt_completion"  # lists of messages
ROW_TEXT = "text"  # {"text": str}


# ----------------------------------------------------------------------------------------------
# Pure helpers (no heavy imports): example kinds, loss rule.


def row_kind(row: dict[str, Any]) -> str:
    if "messages" in row:
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise ValueError("'messages' must be a non-empty list of messages")
        return ROW_CONVERSATION
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list) and isinstance(row["completion"], list):
            return ROW_CONVERSATIONAL_PROMPT_COMPLETION
        if isinstance(row["prompt"], str) and isinstance(row["completion"], str):
            return ROW_PROMPT_COMPLETION
        raise ValueError("'prompt' and 'completion' must both be strings or both lists of messages")
    if "text" in row and isinstance(row["text"], str):
        return ROW_TEXT
    raise ValueError(f"unrecognised example (keys {sorted(row)}): expected messages, prompt/completion or text")


def classify(rows: list[dict[str, Any]], source: str) -> list[str]:
    kinds = []
    for number, row in enumerate(rows, 1):
        try:
            kinds.append(row_kind(row))
        except ValueError as exc:
            raise ValueError(f"{source} example {number}: {exc}") from None
    return kinds


@dataclasses.dataclass(frozen=True)
class LossRule:
    """Which tokens carry the loss, resolved from ``train_on_inputs`` and the data's format."""

    assistant_only: bool  # conversations: only assistant turns (content + end-of-turn token)
    completion_only: bool  # prompt/completion: only the completion
    description: str

    @property
    def loss_on_inputs(self) -> bool:
        return not (self.assistant_only or self.completion_only)


def resolve_loss_rule(train_on_inputs: str, kinds: set[str]) -> LossRule:
    """``auto``: conversations → assistant turns, prompt/completion → completion, text → all
    tokens. ``true``: every token. ``false``: like auto (plain text has no inputs: all tokens)."""
    toi = (train_on_inputs or "auto").lower()
    if toi not in ("auto", "true", "false"):
        raise ValueError(f"train_on_inputs must be auto, true or false, got {train_on_inputs!r}")
    if toi == "true":
        return LossRule(False, False, "loss on all tokens (train_on_inputs=true)")
    conversational = bool(kinds & {ROW_CONVERSATION})
    prompt_completion = bool(kinds & {ROW_PROMPT_COMPLETION, ROW_CONVERSATIONAL_PROMPT_COMPLETION})
    parts = []
    if conversational:
        parts.append("conversations: assistant turns only")
    if prompt_completion:
        parts.append("prompt/completion: completion only")
    if ROW_TEXT in kinds:
        parts.append("text: all tokens")
    return LossRule(conversational, prompt_completion, f"{'; '.join(parts)} (train_on_inputs={toi})")


def has_assistant_turn(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


# ----------------------------------------------------------------------------------------------
# Tokenisation (datasets imported lazily).


def has_message_weights(rows: list[dict[str, Any]]) -> bool:
    return any("weight" in m for r in rows for m in (r.get("messages") or []) if isinstance(m, dict))


def apply_message_weights(mask: list[int], messages: list[dict[str, Any]]) -> list[int]:
    """Zero the assistant-token mask of messages with ``weight`` 0. The chat template wraps each
    assistant message in its own generation block, separated by header tokens, so the k-th run of
    marked tokens is the k-th assistant message."""
    weights = [m.get("weight", 1) for m in messages if m.get("role") == "assistant"]
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    if len(runs) != len(weights):
        raise ValueError(f"{len(runs)} assistant spans for {len(weights)} assistant messages: the chat "
                         "template must put each assistant message in its own generation block")
    out = list(mask)
    for (start, end), weight in zip(runs, weights):
        if not weight:
            out[start:end] = [0] * (end - start)
    return out


def tokenize_row(row: dict[str, Any], kind: str, tokenizer, rule: LossRule) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one example, with TRL's conventions (used for files that
    mix formats, which TRL cannot take in one dataset)."""
    eos = tokenizer.eos_token

    def chat(messages, **kwargs):
        return tokenizer.apply_chat_template(
            messages, tools=row.get("tools") or None, tokenize=True, return_dict=True, **kwargs
        )

    if kind == ROW_CONVERSATION:
        out = chat(row["messages"], return_assistant_tokens_mask=rule.assistant_only)
        ids = list(out["input_ids"])
        mask = out["assistant_masks"] if rule.assistant_only else [1] * len(ids)
        if rule.assistant_only:
            mask = apply_message_weights(list(mask), row["messages"])
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]}
    if kind == ROW_TEXT:
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = list(tokenizer(text)["input_ids"])
        return {"input_ids": ids, "labels": list(ids)}
    if kind == ROW_PROMPT_COMPLETION:
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = list(tokenizer(row["prompt"] + completion)["input_ids"])
    elif kind == ROW_CONVERSATIONAL_PROMPT_COMPLETION:
        prompt_ids = chat(row["prompt"], add_generation_prompt=True)["input_ids"]
        ids = list(chat(row["prompt"] + row["completion"])["input_ids"])
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    prefix = 0
    for a, b in zip(prompt_ids, ids, strict=False):
        if a != b:
            break
        prefix += 1
    if not rule.completion_only:
        prefix = 0
    return {"input_ids": ids, "labels": [-100] * prefix + ids[prefix:]}


def pretokenized_dataset(rows: list[dict[str, Any]], kinds: list[str], tokenizer, rule: LossRule,
                         max_length: int | None = None):
    """``input_ids``/``labels`` of every example, tokenised once; longer than ``max_length``
    tokens: cut to it (the dataset builder drops over-length examples before, so this is a guard)."""
    from datasets import Dataset

    encoded = [tokenize_row(row, kind, tokenizer, rule) for row, kind in zip(rows, kinds, strict=True)]
    if max_length:
        encoded = [{k: v[:max_length] for k, v in e.items()} for e in encoded]
    return Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in encoded],
        "labels": [e["labels"] for e in encoded],
    })


# ----------------------------------------------------------------------------------------------


class SupervisedFineTuning:
    """The ``sft`` training method."""

    name = "sft"
    display_name = "Supervised fine-tuning"
    dataset_kind = DATASET_KIND_CONVERSATIONS
    option_names: tuple[str, ...] = trl_common.SHARED_OPTIONS
    supports_distributed = True  # every rank runs ``train`` (tuneforge_builtin.distributed)

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options as given, normalised (defaults are not added: ``quantization`` none,
        ``gradient_checkpointing`` the worker's choice)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(f"unknown SFT option(s): {', '.join(unknown)}; valid options: "
                             f"{trl_common.SHARED_OPTIONS_TEXT}")
        trl_common.validate_shared_options(options, options)
        return options

    def check_runtime(self, options: dict[str, Any]) -> None:
        """Before training, on the worker: ValueError (for the job's owner) when this machine cannot
        run the options (4bit without CUDA or without bitsandbytes)."""
        trl_common.check_quantization_runtime(options.get(trl_common.QUANTIZATION_OPTION) or "none")

    def train(self, context: TrainingContext) -> TrainingResult:
        prepared, rule = self.prepare(context)
        result = trl_common.run_to_completion(prepared, context)
        metrics = {**result.metrics, "loss_on_inputs": 1.0 if rule.loss_on_inputs else 0.0}
        return dataclasses.replace(result, metrics=metrics)

    def prepare(self, context: TrainingContext) -> tuple[trl_common.PreparedRun, LossRule]:
        """Data, model and a ready trainer for ``context`` (nothing trained yet): padding-free
        batches (:mod:`tuneforge_builtin.packed`) of examples tokenised once here."""
        self.validate_options(context.method_options)
        hp = context.hyperparameters
        paths = trl_common.RunPaths.for_context(context)

        # --- data
        train_rows = read_jsonl(context.train_file)
        test_rows = read_jsonl(context.test_file)
        train_kinds = classify(train_rows, "train")
        test_kinds = classify(test_rows, "test")
        kinds = set(train_kinds) | set(test_kinds)
        rule = resolve_loss_rule(hp.train_on_inputs, kinds)
        log.info("job %s: %s", context.job_id, rule.description)
        if rule.assistant_only:
            # An example without an assistant turn has nothing to learn from (TRL would raise).
            def keep(rows, kinds_):
                pairs = [(r, k) for r, k in zip(rows, kinds_, strict=True)
                         if k != ROW_CONVERSATION or has_assistant_turn(r["messages"])]
                return [r for r, _ in pairs], [k for _, k in pairs]

            before = len(train_rows) + len(test_rows)
            train_rows, train_kinds = keep(train_rows, train_kinds)
            test_rows, test_kinds = keep(test_rows, test_kinds)
            if dropped := before - len(train_rows) - len(test_rows):
                log.warning("job %s: skipped %d conversations without an assistant turn", context.job_id, dropped)
        if not train_rows:
            raise ValueError("the training split has no usable examples")

        # --- model and tokenizer
        device, speed, model, tokenizer = trl_common.load_for_packed_training(context, paths)
        max_length = trl_common.max_sequence_length(model, context.base_model)

        # --- tokenised once, here: input ids and labels (-100 where no loss), the same tokens and
        # masks TRL's SFTTrainer would make (tests/test_packed.py)
        weighted = rule.assistant_only and has_message_weights(train_rows + test_rows)
        if weighted:
            log.info("job %s: assistant messages weighted by their `weight` (0 or 1)", context.job_id)
        train_dataset = pretokenized_dataset(train_rows, train_kinds, tokenizer, rule, max_length)
        eval_dataset = pretokenized_dataset(test_rows, test_kinds, tokenizer, rule, max_length) if test_rows else None
        n_evals = hp.n_evals if eval_dataset is not None else 0

        total_steps = planned_total_steps(len(train_dataset), hp.batch_size, hp.max_epochs)
        config = trl_common.packed_training_arguments(hp, context.seed, paths, device, total_steps)
        prepared = trl_common.prepare_trainer(
            packed.packed_trainer_class(), context, paths, model=model, tokenizer=tokenizer, config=config,
            train_dataset=train_dataset, eval_dataset=eval_dataset, n_evals=n_evals,
            data_collator=packed.PackedCollator(), speed=speed,
            evaluation_set=evaluation.conversation_evaluation_set(test_rows), evaluate_base_loss=True)
        return prepared, rule


SFT = SupervisedFineTuning()


@hookimpl
def register_training_methods(register):
    register(SFT)
