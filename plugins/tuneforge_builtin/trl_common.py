"""Training code every TRL method shares, so that a method plugin is one module: data reading, the
product's schedule, progress reports, LoRA and device settings, the final adapter and the result.

The schedule is the product's, not TRL's: the learning rate follows
``tuneforge.core.hyperparameters.learning_rate_multiplier`` (:class:`ScheduledLearningRate`);
``n_evals`` evaluations and ``n_checkpoints`` checkpoints are spread evenly over the run (the last
of each at the final step); early stopping counts evaluations without improvement of the eval
loss; a cancel request stops the run at the end of the current step.

Checkpoints are complete trainer checkpoints (adapter, optimizer, scheduler, RNG, trainer state)
under ``output_dir/checkpoints/step-N`` so a run can resume from them; the final adapter goes to
``output_dir/adapter`` with ``base_model_name_or_path`` absolute.

A method builds its datasets and its TRL trainer (``trainer_arguments`` for the config,
``lora_config`` for the adapter, ``callbacks`` for the schedule) and hands it to
:func:`run_to_completion`. Heavy imports (torch, transformers, trl, peft) happen inside functions:
this module is imported by services that never load torch.
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

from tuneforge.core.hyperparameters import (  # noqa: F401  (spread, planned_total_steps: used by the methods too)
    ResolvedHyperparameters, learning_rate_multiplier, planned_total_steps, spread,
)
from tuneforge.training import (
    BaseModelSpec,
    CheckpointReport,
    ProgressReport,
    TrainingContext,
    TrainingResult,
    finite_metrics,
    template_row,
)

log = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
MAX_PROGRESS_LOGS = 500  # log (and report progress) at most about this many times per run


# ----------------------------------------------------------------------------------------------
# Pure helpers (no heavy imports).


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a universal-format JSONL file (blank lines skipped; a missing file reads as empty),
    ready for a chat template: tool-call arguments decoded to objects (``template_row``), so the
    family templates render calls as the models write them, as the dataset builder counts them."""
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
            rows.append(template_row(row))
    return rows


@dataclasses.dataclass
class RunState:
    """What the callbacks observed; read by :func:`run_to_completion` once the trainer returns."""

    total_steps: int = 0
    eval_steps: frozenset[int] = frozenset()
    checkpoint_steps: frozenset[int] = frozenset()
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    last_eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # of that evaluation
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    cancelled: bool = False
    training_done: bool = False
    final_eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # test split, last step
    checkpoints: list[CheckpointReport] = dataclasses.field(default_factory=list)
    start_step: int = 0
    start_time: float = 0.0
    tokens_per_second: float | None = None


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where one run reads and writes (absolute)."""

    model_dir: Path
    output_dir: Path
    checkpoint_root: Path
    adapter_dir: Path

    @classmethod
    def for_context(cls, context: TrainingContext) -> "RunPaths":
        output_dir = Path(context.output_dir).resolve()
        paths = cls(
            model_dir=Path(context.model_dir).resolve(),
            output_dir=output_dir,
            checkpoint_root=output_dir / CHECKPOINTS_DIRNAME,
            adapter_dir=output_dir / ADAPTER_DIRNAME,
        )
        paths.checkpoint_root.mkdir(parents=True, exist_ok=True)
        return paths


# ----------------------------------------------------------------------------------------------
# Device, model, LoRA and trainer arguments.


@dataclasses.dataclass(frozen=True)
class Device:
    use_cuda: bool
    bf16: bool  # only on a GPU that supports it; fp32 on CPU (bf16 there is slower, STACK-NOTES)

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32


def detect_device() -> Device:
    import torch

    use_cuda = torch.cuda.is_available()
    return Device(use_cuda=use_cuda, bf16=use_cuda and torch.cuda.is_bf16_supported())


def load_model_and_tokenizer(context: TrainingContext, paths: RunPaths, device: Device,
                             attn_implementation: str | None = None):
    """The base model and its tokenizer from the local model store, with the spec's training
    chat template. The seed is set before the model (and later the adapter) is built.
    ``attn_implementation``: e.g. ``packed.choose_attention(...)`` for padding-free training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from tuneforge.trainer.model_import import check_safe_model_dir

    # Safetensors only, never remote code: a folder with a pickle file is refused before loading
    # (UnsafeModelError: the job fails with that reason).
    check_safe_model_dir(paths.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.model_dir), trust_remote_code=False)
    if context.base_model.training_chat_template:
        tokenizer.chat_template = context.base_model.training_chat_template
    set_seed(context.seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(paths.model_dir), dtype=device.dtype, trust_remote_code=False,
                                                 use_safetensors=True, **extra)
    return model, tokenizer


def load_for_packed_training(context: TrainingContext, paths: RunPaths):
    """``(device, speed, model, tokenizer)`` for a method that trains padding-free: the device's
    settings (:class:`packed.SpeedSettings`) and the model loaded with the attention they chose."""
    from tuneforge_builtin import packed

    device = detect_device()
    speed = packed.SpeedSettings(attention=packed.choose_attention(device.use_cuda), bf16=device.bf16)
    model, tokenizer = load_model_and_tokenizer(context, paths, device, attn_implementation=speed.attention)
    log.info("job %s: %s", context.job_id, speed.describe())
    return device, speed, model, tokenizer


def packed_training_arguments(hp: ResolvedHyperparameters, seed: int, paths: RunPaths, device: Device,
                              total_steps: int):
    """``TrainingArguments`` for the packed trainer: :func:`trainer_arguments`, the collator taking
    the dataset's columns as they are, and loss-only evaluation."""
    from transformers import TrainingArguments

    return TrainingArguments(**trainer_arguments(hp, seed, paths, device, total_steps),
                             remove_unused_columns=False, prediction_loss_only=True)


def max_sequence_length(model, spec: BaseModelSpec) -> int:
    max_positions = getattr(model.config, "max_position_embeddings", None) or spec.context_length
    return min(spec.context_length, max_positions)


def lora_config(hp: ResolvedHyperparameters, spec: BaseModelSpec):
    from peft import LoraConfig

    chosen = list(hp.lora_target_modules or spec.default_lora_target_modules)
    parameters = [name for name in chosen if name in spec.lora_target_parameters]
    modules = [name for name in chosen if name not in spec.lora_target_parameters]
    return LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,  # e.g. a mixture of experts' fused weights
        task_type="CAUSAL_LM",
    )


def trainer_arguments(hp: ResolvedHyperparameters, seed: int, paths: RunPaths, device: Device,
                      total_steps: int) -> dict[str, Any]:
    """The ``TrainingArguments`` every method sets, with the product's values (never TRL's
    defaults). Evaluations, checkpoints and the learning-rate schedule are driven by the
    callbacks and :class:`ScheduledLearningRate`, so the trainer's own strategies are off."""
    return dict(
        output_dir=str(paths.checkpoint_root),
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
        bf16=device.bf16,
        fp16=False,
        use_cpu=not device.use_cuda,
        disable_tqdm=True,
    )


# ----------------------------------------------------------------------------------------------
# Trainer pieces (transformers imported lazily, classes built once).


class ScheduledLearningRate:
    """Mixin for a ``transformers.Trainer`` subclass: the learning rate follows the product's
    multiplier (warmup, ``lr_peak_ratio`` cosine) instead of the trainer's scheduler."""

    def __init__(self, *args, warmup_ratio: float, lr_peak_ratio: float, **kwargs):
        self._warmup_ratio = warmup_ratio
        self._lr_peak_ratio = lr_peak_ratio
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        import torch

        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup, peak = self._warmup_ratio, self._lr_peak_ratio

            def multiplier(step: int) -> float:
                return learning_rate_multiplier(step, num_training_steps, warmup, peak)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
            self._created_lr_scheduler = True
        return self.lr_scheduler


@functools.cache
def scheduled_trainer_class(base: type) -> type:
    """``base`` (e.g. ``packed.packed_trainer_class()``) with the product's learning-rate schedule."""
    return type(f"Scheduled{base.__name__}", (ScheduledLearningRate, base), {
        "__doc__": f"``{base.__name__}`` whose learning rate follows the product's multiplier.",
        "__module__": __name__,
    })


@functools.cache
def callback_classes() -> tuple[type, type]:
    """``(ScheduleCallback, ProgressCallback)``."""
    from transformers import TrainerCallback

    class ScheduleCallback(TrainerCallback):
        """Evenly spread evaluations and checkpoints, early stopping, cancellation."""

        def __init__(self, run: RunState, n_evals: int, n_checkpoints: int, patience: int,
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
            # The last checkpoint is the final adapter, written by ``run_to_completion``.
            run.checkpoint_steps = frozenset(spread(self.n_checkpoints, state.max_steps)) - {state.max_steps}
            # Resuming: rebuild the early-stopping counters from the restored log history.
            for entry in state.log_history:
                if "eval_loss" in entry:
                    self._count(entry["eval_loss"], entry.get("step"), entry)

        def _count(self, loss: float, step: int | None, metrics: dict[str, Any]) -> None:
            run = self.run
            run.last_eval_loss, run.last_eval_step = loss, step
            run.last_eval_metrics = finite_metrics(metrics)
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
            self._count(float(metrics["eval_loss"]), state.global_step, metrics)
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

        def __init__(self, run: RunState, report: Callable[[ProgressReport], None]):
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

    return ScheduleCallback, ProgressCallback


def callbacks(run: RunState, context: TrainingContext, paths: RunPaths, n_evals: int) -> list:
    """The schedule and progress callbacks of one run."""
    schedule_cls, progress_cls = callback_classes()
    hp = context.hyperparameters
    return [
        schedule_cls(run, n_evals, hp.n_checkpoints, hp.early_stopping_patience, paths.checkpoint_root,
                     context.should_stop, context.report_checkpoint),
        progress_cls(run, context.report_progress),
    ]


# ----------------------------------------------------------------------------------------------
# Running a prepared trainer to the end.


@dataclasses.dataclass
class PreparedRun:
    """A trainer ready to run, with what :func:`run_to_completion` needs around it."""

    trainer: Any  # a ScheduledLearningRate trainer built with ``callbacks(run, ...)``
    tokenizer: Any
    run: RunState
    paths: RunPaths
    n_evals: int  # 0 when there is no test split
    # What to generate after training to compare with the base model (None: no comparison).
    evaluation_set: Any = None  # an ``evaluation.EvaluationSet``
    evaluate_base_loss: bool = False  # also the base model's eval loss (SFT; DPO's would be ln 2)
    speed: Any = None  # a ``packed.SpeedSettings`` when the method trains padding-free


def prepare_trainer(trainer_base: type, context: TrainingContext, paths: RunPaths, *, model, tokenizer, config,
                    train_dataset, eval_dataset, n_evals: int, evaluation_set=None, evaluate_base_loss: bool = False,
                    speed=None, **trainer_kwargs) -> PreparedRun:
    """A trainer of ``trainer_base`` (a ``transformers.Trainer``, e.g. ``packed.packed_trainer_class()``)
    with the product's learning rate schedule, the LoRA adapter from the hyperparameters (added here
    unless ``model`` is a ``PeftModel`` already), the schedule/progress callbacks, no console output
    and the adapter anchored to the base model's absolute path. ``evaluation_set`` and
    ``evaluate_base_loss``: the comparison with the base model after training
    (:mod:`tuneforge_builtin.evaluation`); ``speed``: the ``packed.SpeedSettings`` used."""
    from peft import PeftModel, get_peft_model

    hp = context.hyperparameters
    run = RunState()
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, lora_config(hp, context.base_model))
    trainer = scheduled_trainer_class(trainer_base)(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        warmup_ratio=hp.warmup_ratio,
        lr_peak_ratio=hp.lr_peak_ratio,
        callbacks=callbacks(run, context, paths, n_evals),
        **trainer_kwargs,
    )
    quiet_and_anchor(trainer, paths)
    return PreparedRun(trainer, tokenizer, run, paths, n_evals, evaluation_set, evaluate_base_loss, speed)


def quiet_and_anchor(trainer, paths: RunPaths) -> None:
    """No console printing from the trainer; ``adapter_config.json`` names the base model by
    absolute path (it stores the path as given, STACK-NOTES)."""
    from transformers import PrinterCallback
    from transformers import ProgressCallback as TqdmCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(TqdmCallback)
    for cfg in trainer.model.peft_config.values():
        cfg.base_model_name_or_path = str(paths.model_dir)


def run_to_completion(prepared: PreparedRun, context: TrainingContext) -> TrainingResult:
    """Train (resuming from ``context.resume_from`` when given), evaluate on the test split at
    the last step if the schedule did not, save the final adapter, compare with the base model
    (unless cancelled: :func:`compare_with_base`) and report the adapter as the last checkpoint.
    ``RunState.final_eval_metrics`` holds that last evaluation's metrics."""
    trainer, run, paths = prepared.trainer, prepared.run, prepared.paths
    resume = str(Path(context.resume_from).resolve()) if context.resume_from else None
    output = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    run.training_done = True

    eval_loss = run.last_eval_loss
    if prepared.n_evals > 0:
        if run.last_eval_step == state.global_step:
            run.final_eval_metrics = dict(run.last_eval_metrics)
        else:
            evaluated = trainer.evaluate()
            run.final_eval_metrics = finite_metrics(evaluated)
            eval_loss = float(evaluated["eval_loss"])

    trainer.model.save_pretrained(str(paths.adapter_dir), safe_serialization=True)
    prepared.tokenizer.save_pretrained(str(paths.adapter_dir))
    comparison = None if run.cancelled else compare_with_base(prepared, context)
    final = CheckpointReport(step=state.global_step, path=paths.adapter_dir, eval_loss=eval_loss)
    context.report_checkpoint(final)

    metrics = {
        "total_steps": float(state.max_steps),
        "train_loss_mean": float(output.training_loss),
        "train_runtime_seconds": float(output.metrics.get("train_runtime", 0.0)),
    }
    if run.best_eval_loss is not None:
        metrics["best_eval_loss"] = min(run.best_eval_loss, eval_loss if eval_loss is not None else math.inf)
    if run.tokens_per_second is not None:
        metrics["tokens_per_second"] = run.tokens_per_second
    if prepared.speed is not None:
        metrics.update(prepared.speed.metrics())
    if comparison is not None:
        metrics.update(comparison.metrics)
    return TrainingResult(
        adapter_dir=paths.adapter_dir,
        steps=state.global_step,
        epochs=float(state.epoch or 0.0),
        train_loss=run.last_train_loss if run.last_train_loss is not None else float(output.training_loss),
        eval_loss=eval_loss,
        stopped_early=run.stopped_early,
        cancelled=run.cancelled,
        checkpoints=(*run.checkpoints, final),
        metrics=metrics,
        base_eval_loss=comparison.base_eval_loss if comparison else None,
        tool_call_accuracy=comparison.tool_call_accuracy if comparison else None,
        base_tool_call_accuracy=comparison.base_tool_call_accuracy if comparison else None,
        samples=list(comparison.samples) if comparison else [],
        # The packed trainers count real tokens (packed.packed_trainer_class); others: not counted.
        trained_tokens=(int(trainer.real_tokens_seen) if hasattr(trainer, "real_tokens_seen") else None),
    )


def compare_with_base(prepared: PreparedRun, context: TrainingContext):
    """The trained model against its base on the test split (an ``evaluation.Evaluation``, or None
    when there is nothing to compare); the samples also go to ``samples.jsonl`` in the adapter
    directory. Best effort: the adapter is saved already, so a failure here is logged and the job
    still succeeds, without the comparison."""
    from tuneforge_builtin import evaluation

    cases = prepared.evaluation_set
    if cases is None or prepared.n_evals == 0:
        return None
    try:
        result = evaluation.evaluate_against_base(
            prepared.trainer, prepared.tokenizer, cases,
            max_length=max_sequence_length(prepared.trainer.model, context.base_model),
            base_eval_loss=prepared.evaluate_base_loss, job_id=context.job_id)
    except Exception:
        log.exception("job %s: comparison with the base model failed; the adapter is kept", context.job_id)
        return None
    if result.samples:
        evaluation.write_samples(result.samples, prepared.paths.adapter_dir)
    return result
