"""SFT method plugin: supervised fine-tuning with LoRA through TRL's ``SFTTrainer``.

Data: universal-format JSONL, one example a line: ``{"messages": [...], "tools": [...]?}``
(OpenAI chat format), ``{"prompt": ..., "completion": ...}`` (strings or message lists) or
``{"text": ...}``. Which tokens carry the loss follows ``train_on_inputs`` (see
:func:`resolve_loss_rule`).

The schedule is the product's, not TRL's: the learning rate follows
``tuneforge.core.hyperparameters.learning_rate_multiplier``; ``n_evals`` evaluations and
``n_checkpoints`` checkpoints are spread evenly over the run (the last of each at the final step);
early stopping counts evaluations without improvement of the eval loss.

Checkpoints are complete trainer checkpoints (adapter, optimizer, scheduler, RNG, trainer state)
under ``output_dir/checkpoints/step-N`` so a run can resume from them; the final adapter goes to
``output_dir/adapter``. Heavy imports (torch, transformers, trl, peft, datasets) happen inside
``train``: this module is imported by services that never load torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.core.hyperparameters import learning_rate_multiplier
from tuneforge.hookspecs import hookimpl
from tuneforge.training import (
    DATASET_KIND_CONVERSATIONS,
    CheckpointReport,
    ProgressReport,
    TrainingContext,
    TrainingResult,
)

log = logging.getLogger(__name__)

ROW_CONVERSATION = "conversation"  # {"messages": [...], "tools": [...]?}
ROW_PROMPT_COMPLETION = "prompt_completion"  # {"prompt": str, "completion": str}
ROW_CONVERSATIONAL_PROMPT_COMPLETION = "conversational_prompt_completion"  # lists of messages
ROW_TEXT = "text"  # {"text": str}

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
MAX_PROGRESS_LOGS = 500  # log (and report progress) at most about this many times per run


# ----------------------------------------------------------------------------------------------
# Pure helpers (no heavy imports): data reading, loss rule, schedules.


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); a missing file reads as empty."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            rows.append(row)
    return rows


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


def spread(n: int, total_steps: int) -> list[int]:
    """``n`` steps spread evenly over ``1..total_steps``, the last one at ``total_steps``."""
    if n <= 0 or total_steps <= 0:
        return []
    return sorted({max(1, -(-k * total_steps // n)) for k in range(1, n + 1)})


def planned_total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_examples / batch_size) * epochs


def has_assistant_turn(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


# ----------------------------------------------------------------------------------------------
# Dataset building (datasets imported lazily).


def _conversation_features():
    from datasets import Features, Json, List

    # Struct inference across rows corrupts tool calls (STACK-NOTES): keep messages and tools as
    # JSON values.
    return Features({"messages": List(Json()), "tools": List(Json())})


def build_dataset(rows: list[dict[str, Any]], kind: str):
    """A ``datasets.Dataset`` in the layout TRL expects for one homogeneous format."""
    from datasets import Dataset, Features, Json, List

    if kind == ROW_CONVERSATION:
        data = {"messages": [r["messages"] for r in rows], "tools": [r.get("tools") or None for r in rows]}
        return Dataset.from_dict(data, features=_conversation_features())
    if kind == ROW_CONVERSATIONAL_PROMPT_COMPLETION:
        features = Features({"prompt": List(Json()), "completion": List(Json()), "tools": List(Json())})
        data = {
            "prompt": [r["prompt"] for r in rows],
            "completion": [r["completion"] for r in rows],
            "tools": [r.get("tools") or None for r in rows],
        }
        return Dataset.from_dict(data, features=features)
    if kind == ROW_PROMPT_COMPLETION:
        return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]})
    if kind == ROW_TEXT:
        return Dataset.from_dict({"text": [r["text"] for r in rows]})
    raise ValueError(f"unknown row kind {kind!r}")


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


def pretokenized_dataset(rows: list[dict[str, Any]], kinds: list[str], tokenizer, rule: LossRule):
    from datasets import Dataset

    encoded = [tokenize_row(row, kind, tokenizer, rule) for row, kind in zip(rows, kinds, strict=True)]
    return Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in encoded],
        "labels": [e["labels"] for e in encoded],
    })


# ----------------------------------------------------------------------------------------------
# Trainer pieces (transformers/trl imported lazily, classes built once).


@dataclasses.dataclass
class _RunState:
    """What the callbacks observed; read by ``train`` once the trainer returns."""

    total_steps: int = 0
    eval_steps: frozenset[int] = frozenset()
    checkpoint_steps: frozenset[int] = frozenset()
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    cancelled: bool = False
    training_done: bool = False
    checkpoints: list[CheckpointReport] = dataclasses.field(default_factory=list)
    start_step: int = 0
    start_time: float = 0.0
    tokens_per_second: float | None = None


@functools.cache
def _trainer_classes():
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class ScheduledSFTTrainer(SFTTrainer):
        """``SFTTrainer`` whose learning rate follows the product's multiplier."""

        def __init__(self, *args, warmup_ratio: float, lr_peak_ratio: float, **kwargs):
            self._warmup_ratio = warmup_ratio
            self._lr_peak_ratio = lr_peak_ratio
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                optimizer = optimizer if optimizer is not None else self.optimizer
                warmup, peak = self._warmup_ratio, self._lr_peak_ratio

                def multiplier(step: int) -> float:
                    return learning_rate_multiplier(step, num_training_steps, warmup, peak)

                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class ScheduleCallback(TrainerCallback):
        """Evenly spread evaluations and checkpoints, early stopping, cancellation."""

        def __init__(self, run: _RunState, n_evals: int, n_checkpoints: int, patience: int,
                     checkpoint_root: Path, should_stop: Callable[[], bool],
                     report_checkpoint: Callable[[CheckpointReport], None]):
            self.run = run
            self.n_evals = n_evals
            self.n_checkpoints = n_checkpoints
            self.patience = patience
            self.checkpoint_root = checkpoint_root
            self.should_stop = should_stop
            self.report_checkpoint = report_checkpoint

        def on_train_begin(self, args, state, control, **kwargs):
            run = self.run
            run.total_steps = state.max_steps
            run.eval_steps = frozenset(spread(self.n_evals, state.max_steps))
            # The last checkpoint is the final adapter, written by ``train``.
            run.checkpoint_steps = frozenset(spread(self.n_checkpoints, state.max_steps)) - {state.max_steps}
            # Resuming: rebuild the early-stopping counters from the restored log history.
            for entry in state.log_history:
                if "eval_loss" in entry:
                    self._count(entry["eval_loss"], entry.get("step"))

        def _count(self, loss: float, step: int | None) -> None:
            run = self.run
            run.last_eval_loss, run.last_eval_step = loss, step
            if run.best_eval_loss is None or loss < run.best_eval_loss:
                run.best_eval_loss = loss
                run.evals_without_improvement = 0
            else:
                run.evals_without_improvement += 1

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.run.eval_steps:
                control.should_evaluate = True
            if state.global_step in self.run.checkpoint_steps:
                control.should_save = True
            if self.should_stop():
                self.run.cancelled = True
                control.should_training_stop = True
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.run.training_done or not metrics or "eval_loss" not in metrics:
                return control
            self._count(float(metrics["eval_loss"]), state.global_step)
            if (
                self.patience > 0
                and self.run.evals_without_improvement >= self.patience
                and state.global_step < state.max_steps
            ):
                log.info("early stopping at step %d: %d evaluations without improvement",
                         state.global_step, self.run.evals_without_improvement)
                self.run.stopped_early = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            saved = Path(args.output_dir) / f"checkpoint-{step}"
            if not saved.is_dir():
                return control
            target = self.checkpoint_root / f"step-{step}"
            if target.exists():
                shutil.rmtree(target)
            saved.rename(target)
            eval_loss = self.run.last_eval_loss if self.run.last_eval_step == step else None
            report = CheckpointReport(step=step, path=target, eval_loss=eval_loss)
            self.run.checkpoints.append(report)
            self.report_checkpoint(report)
            return control

    class ProgressCallback(TrainerCallback):
        """Turns the trainer's logs into ``ProgressReport``s."""

        def __init__(self, run: _RunState, report: Callable[[ProgressReport], None]):
            self.run = run
            self.report = report

        def on_train_begin(self, args, state, control, **kwargs):
            self.run.start_step = state.global_step
            self.run.start_time = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            train_loss = logs.get("loss")
            eval_loss = logs.get("eval_loss")
            if train_loss is None and eval_loss is None:
                return control  # the end-of-training summary
            run = self.run
            step, total = state.global_step, state.max_steps
            elapsed = time.monotonic() - run.start_time
            done = step - run.start_step
            eta = elapsed / done * max(0, total - step) if done > 0 else None
            if "num_tokens" in logs and elapsed > 0:
                run.tokens_per_second = float(logs["num_tokens"]) / elapsed
            if train_loss is not None:
                run.last_train_loss = float(train_loss)
            report = ProgressReport(
                step=step,
                total_steps=total,
                epoch=float(state.epoch or 0.0),
                train_loss=None if train_loss is None else float(train_loss),
                eval_loss=None if eval_loss is None else float(eval_loss),
                learning_rate=None if logs.get("learning_rate") is None else float(logs["learning_rate"]),
                tokens_per_second=run.tokens_per_second,
                eta_seconds=0.0 if run.training_done else eta,
            )
            try:
                self.report(report)
            except Exception:  # progress is best effort: never let a reporter kill the run
                log.exception("progress report failed")
            return control

    return ScheduledSFTTrainer, ScheduleCallback, ProgressCallback


# ----------------------------------------------------------------------------------------------


class SupervisedFineTuning:
    """The ``sft`` training method."""

    name = "sft"
    display_name = "Supervised fine-tuning"
    dataset_kind = DATASET_KIND_CONVERSATIONS
    option_names: tuple[str, ...] = ()  # SFT has no method options yet

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(f"unknown SFT option(s): {', '.join(unknown)} (SFT takes no options)")
        return options

    def train(self, context: TrainingContext) -> TrainingResult:
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
        from transformers import ProgressCallback as TqdmCallback
        from trl import SFTConfig

        self.validate_options(context.method_options)
        hp = context.hyperparameters
        seed = context.seed
        model_dir = Path(context.model_dir).resolve()
        output_dir = Path(context.output_dir).resolve()
        checkpoint_root = output_dir / CHECKPOINTS_DIRNAME
        adapter_dir = output_dir / ADAPTER_DIRNAME
        checkpoint_root.mkdir(parents=True, exist_ok=True)

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
        use_cuda = torch.cuda.is_available()
        use_bf16 = use_cuda and torch.cuda.is_bf16_supported()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        if context.base_model.training_chat_template:
            tokenizer.chat_template = context.base_model.training_chat_template
        set_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.bfloat16 if use_bf16 else torch.float32, trust_remote_code=False
        )
        max_positions = getattr(model.config, "max_position_embeddings", None) or context.base_model.context_length
        max_length = min(context.base_model.context_length, max_positions)

        weighted = rule.assistant_only and has_message_weights(train_rows + test_rows)
        if weighted:
            log.info("job %s: assistant messages weighted by their `weight` (0 or 1)", context.job_id)
        if len(kinds) == 1 and not weighted:
            (kind,) = kinds
            train_dataset = build_dataset(train_rows, kind)
            eval_dataset = build_dataset(test_rows, kind) if test_rows else None
            assistant_only_loss = rule.assistant_only and kind == ROW_CONVERSATION
            completion_only_loss = rule.completion_only if kind != ROW_CONVERSATION and kind != ROW_TEXT else None
        else:
            log.info("job %s: %s, tokenising per example", context.job_id,
                     "message weights" if weighted else f"mixed example formats {sorted(kinds)}")
            train_dataset = pretokenized_dataset(train_rows, train_kinds, tokenizer, rule)
            eval_dataset = pretokenized_dataset(test_rows, test_kinds, tokenizer, rule) if test_rows else None
            assistant_only_loss, completion_only_loss = False, False
        n_evals = hp.n_evals if eval_dataset is not None else 0

        total_steps = planned_total_steps(len(train_dataset), hp.batch_size, hp.max_epochs)
        config = SFTConfig(
            output_dir=str(checkpoint_root),
            learning_rate=hp.learning_rate,
            per_device_train_batch_size=hp.batch_size,
            per_device_eval_batch_size=hp.batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=hp.max_epochs,
            seed=seed,
            data_seed=seed,
            lr_scheduler_type="constant",  # replaced by create_scheduler
            warmup_steps=0,
            # TRL defaults `gradient_checkpointing=True`; transformers 5.24 copies that deprecated alias
            # into `activation_checkpointing` unless the new name is given. Small models: off.
            activation_checkpointing=False,
            dataloader_pin_memory=False,
            report_to=[],
            logging_strategy="steps",
            logging_steps=max(1, math.ceil(total_steps / MAX_PROGRESS_LOGS)),
            eval_strategy="no",  # evaluations are scheduled by ScheduleCallback
            save_strategy="no",  # so are checkpoints
            bf16=use_bf16,
            fp16=False,
            use_cpu=not use_cuda,
            max_length=max_length,
            packing=False,
            assistant_only_loss=assistant_only_loss,
            completion_only_loss=completion_only_loss,
            disable_tqdm=True,
        )
        peft_config = LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=list(hp.lora_target_modules or context.base_model.default_lora_target_modules),
            task_type="CAUSAL_LM",
        )

        trainer_cls, schedule_cls, progress_cls = _trainer_classes()
        run = _RunState()
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            warmup_ratio=hp.warmup_ratio,
            lr_peak_ratio=hp.lr_peak_ratio,
            callbacks=[
                schedule_cls(run, n_evals, hp.n_checkpoints, hp.early_stopping_patience, checkpoint_root,
                             context.should_stop, context.report_checkpoint),
                progress_cls(run, context.report_progress),
            ],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(TqdmCallback)
        # adapter_config.json must name the base by absolute path
        for cfg in trainer.model.peft_config.values():
            cfg.base_model_name_or_path = str(model_dir)

        resume = str(Path(context.resume_from).resolve()) if context.resume_from else None
        output = trainer.train(resume_from_checkpoint=resume)
        state = trainer.state
        run.training_done = True

        eval_loss = run.last_eval_loss
        if n_evals > 0 and run.last_eval_step != state.global_step:
            eval_loss = float(trainer.evaluate()["eval_loss"])

        trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))
        final = CheckpointReport(step=state.global_step, path=adapter_dir, eval_loss=eval_loss)
        context.report_checkpoint(final)

        metrics = {
            "total_steps": float(state.max_steps),
            "train_loss_mean": float(output.training_loss),
            "train_runtime_seconds": float(output.metrics.get("train_runtime", 0.0)),
            "loss_on_inputs": 1.0 if rule.loss_on_inputs else 0.0,
        }
        if run.best_eval_loss is not None:
            metrics["best_eval_loss"] = min(run.best_eval_loss, eval_loss if eval_loss is not None else math.inf)
        if run.tokens_per_second is not None:
            metrics["tokens_per_second"] = run.tokens_per_second
        return TrainingResult(
            adapter_dir=adapter_dir,
            steps=state.global_step,
            epochs=float(state.epoch or 0.0),
            train_loss=run.last_train_loss if run.last_train_loss is not None else float(output.training_loss),
            eval_loss=eval_loss,
            stopped_early=run.stopped_early,
            cancelled=run.cancelled,
            checkpoints=(*run.checkpoints, final),
            metrics=metrics,
        )


SFT = SupervisedFineTuning()


@hookimpl
def register_training_methods(register):
    register(SFT)
