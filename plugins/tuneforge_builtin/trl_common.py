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

Several processes (:mod:`tuneforge_builtin.distributed`: every rank runs the method's ``train``):
the product's ``batch_size`` stays the examples of one optimiser step over all ranks
(:func:`per_device_batch`); checkpoints are renamed and reported by rank 0 after a barrier; the
final adapter is written once (LoRA weights gathered first when FSDP shards them); the comparison
with the base model evaluates the base loss on every rank (a collective) and generates on rank 0.
With one process every one of these is what it always was.

QLoRA: the method option ``quantization`` (:data:`QUANTIZATION_CHOICES`, default ``"none"``);
``"4bit"`` loads the base model in 4-bit NF4 (bitsandbytes, CUDA only) under the LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
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
QUANTIZATION_OPTION = "quantization"  # method option of sft and dpo (also read by the pool sizing)
QUANTIZATION_CHOICES = ("none", "4bit")
QLORA_EXTRA = "tuneforge[qlora]"  # the extra that installs bitsandbytes


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


def world_size() -> int:
    """Processes training this run together (``WORLD_SIZE``, set by torchrun / accelerate launch)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class BatchSplitError(ValueError):
    """The product's batch does not divide over the training processes."""


def per_device_batch(batch_size: int, world: int, gradient_accumulation: int = 1) -> int:
    """Examples per process per forward: the product's ``batch_size`` is the examples of one
    optimiser step over all processes, so each of ``world`` processes takes
    ``batch_size / world / gradient_accumulation``. Raises :class:`BatchSplitError` (a message for
    the job's owner) when that is not a whole number."""
    if world < 1 or gradient_accumulation < 1:
        raise ValueError(f"world size and gradient accumulation must be at least 1, got {world}, "
                         f"{gradient_accumulation}")
    parts = world * gradient_accumulation
    if batch_size < parts or batch_size % parts:
        where = f"{world} training processes" if world > 1 else "1 training process"
        if gradient_accumulation > 1:
            where += f" × {gradient_accumulation} accumulation steps"
        raise BatchSplitError(f"batch_size {batch_size} does not divide over {where}: choose a multiple of {parts}")
    return batch_size // parts


def validate_quantization(value: Any) -> str:
    """The ``quantization`` option's value (``"none"`` or ``"4bit"``), or ValueError naming the choices."""
    if value is None:
        return "none"
    if not isinstance(value, str) or value.strip().lower() not in QUANTIZATION_CHOICES:
        raise ValueError(f"{QUANTIZATION_OPTION} must be one of {', '.join(QUANTIZATION_CHOICES)} "
                         f"(4bit: QLoRA, the base model in 4-bit NF4 on a CUDA GPU), got {value!r}")
    return value.strip().lower()


GRADIENT_CHECKPOINTING_OPTION = "gradient_checkpointing"  # method option of sft and dpo


def validate_gradient_checkpointing(value: Any) -> bool:
    """The ``gradient_checkpointing`` option (true/false; default false, which the trainer worker
    turns to true for a job sized for a GPU pool: ``core.pools`` sizes activations with it on)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{GRADIENT_CHECKPOINTING_OPTION} must be true or false, got {value!r}")
    return value


SHARED_OPTIONS = (QUANTIZATION_OPTION, GRADIENT_CHECKPOINTING_OPTION)  # sft's and dpo's, beside dpo's own
SHARED_OPTIONS_TEXT = (f"{QUANTIZATION_OPTION} ({' or '.join(QUANTIZATION_CHOICES)}, default none), "
                       f"{GRADIENT_CHECKPOINTING_OPTION} (true or false)")


def validate_shared_options(options: dict[str, Any], out: dict[str, Any]) -> None:
    """Normalise the options every built-in method takes (those given only: defaults are not
    added) from ``options`` into ``out``."""
    if QUANTIZATION_OPTION in options:
        out[QUANTIZATION_OPTION] = validate_quantization(options[QUANTIZATION_OPTION])
    if GRADIENT_CHECKPOINTING_OPTION in options:
        out[GRADIENT_CHECKPOINTING_OPTION] = validate_gradient_checkpointing(options[GRADIENT_CHECKPOINTING_OPTION])


def apply_gradient_checkpointing(config, context: TrainingContext) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (non-reentrant, so the frozen base needs no input gradients) when the job's options ask for
    it: less memory for long sequences and large models, ~30 % more compute."""
    if validate_gradient_checkpointing((context.method_options or {}).get(GRADIENT_CHECKPOINTING_OPTION)):
        config.activation_checkpointing = True
        config.activation_checkpointing_kwargs = {"use_reentrant": False}


class QuantizationUnavailable(ValueError):
    """The worker lacks what the chosen quantization needs (a message for the job's owner)."""


def check_quantization_runtime(quantization: str) -> None:
    """Raise :class:`QuantizationUnavailable` when this machine cannot train with ``quantization``:
    4bit needs a CUDA GPU and the bitsandbytes package. Imports torch (the trainer only)."""
    if validate_quantization(quantization) == "none":
        return
    import torch

    if not torch.cuda.is_available():
        raise QuantizationUnavailable(
            f"{QUANTIZATION_OPTION}=4bit (QLoRA) needs a CUDA GPU and this trainer worker has none: "
            f"run the job on a GPU worker, or set {QUANTIZATION_OPTION} to none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"{QUANTIZATION_OPTION}=4bit (QLoRA) needs the bitsandbytes package, which is not installed on "
            f"this trainer worker (pip install '{QLORA_EXTRA}'), or set {QUANTIZATION_OPTION} to none")


def quantization_of(context: TrainingContext) -> str:
    return validate_quantization((context.method_options or {}).get(QUANTIZATION_OPTION))


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
                             attn_implementation: str | None = None, quantization: str = "none"):
    """The base model and its tokenizer from the local model store, with the spec's training
    chat template. The seed is set before the model (and later the adapter) is built.
    ``attn_implementation``: e.g. ``packed.choose_attention(...)`` for padding-free training.
    ``quantization="4bit"``: QLoRA — the base in 4-bit NF4 (double quantisation, bf16 compute) on
    this process's GPU, prepared for k-bit training (:func:`check_quantization_runtime` first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from tuneforge.trainer.model_import import check_safe_model_dir

    quantization = validate_quantization(quantization)
    if quantization != "none":
        check_quantization_runtime(quantization)
    # Safetensors only, never remote code: a folder with a pickle file is refused before loading
    # (UnsafeModelError: the job fails with that reason).
    check_safe_model_dir(paths.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.model_dir), trust_remote_code=False)
    if context.base_model.training_chat_template:
        tokenizer.chat_template = context.base_model.training_chat_template
    set_seed(context.seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization == "4bit":
        import torch
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # this process's GPU
    model = AutoModelForCausalLM.from_pretrained(str(paths.model_dir), dtype=device.dtype, trust_remote_code=False,
                                                 use_safetensors=True, **extra)
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing stays as the trainer arguments set it (off).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def load_for_packed_training(context: TrainingContext, paths: RunPaths):
    """``(device, speed, model, tokenizer)`` for a method that trains padding-free: the device's
    settings (:class:`packed.SpeedSettings`) and the model loaded with the attention they chose."""
    from tuneforge_builtin import packed

    device = detect_device()
    speed = packed.SpeedSettings(attention=packed.choose_attention(device.use_cuda), bf16=device.bf16)
    quantization = quantization_of(context)
    model, tokenizer = load_model_and_tokenizer(context, paths, device, attn_implementation=speed.attention,
                                                quantization=quantization)
    log.info("job %s: %s%s", context.job_id, speed.describe(),
             ", base model in 4-bit NF4 (QLoRA)" if quantization == "4bit" else "")
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
    callbacks and :class:`ScheduledLearningRate`, so the trainer's own strategies are off. With
    several processes each takes its share of the step's ``batch_size`` (:func:`per_device_batch`)."""
    per_device = per_device_batch(hp.batch_size, world_size())
    return dict(
        output_dir=str(paths.checkpoint_root),
        learning_rate=hp.learning_rate,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
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
            target = self.checkpoint_root / f"step-{step}"
            # Several processes: every rank writes its part (rng_state_<rank>.pth, FSDP shards);
            # rank 0 renames once all have, and only rank 0 reports (uploads) the checkpoint.
            barrier()
            if state.is_world_process_zero and saved.is_dir():
                if target.exists():
                    shutil.rmtree(target)
                saved.rename(target)
            barrier()
            if not target.is_dir():
                return control
            eval_loss = self.run.last_eval_loss if self.run.last_eval_step == step else None
            report = CheckpointReport(step=step, path=target, eval_loss=eval_loss)
            self.run.checkpoints.append(report)
            if state.is_world_process_zero:
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
# Several processes (nothing happens with one).


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank of a multi-process run; nothing with one process."""
    if _distributed():
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def is_sharded(model) -> bool:
    """Whether FSDP shards the model's parameters (DTensors): gathering them is a collective."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (torch without distributed)
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def scale_loss_for_ranks(trainer) -> None:
    """Multiply the trainer's loss (training and evaluation) by the number of ranks when the loss is
    divided by the step's global loss-token count (what transformers' ``compute_loss`` does and a
    subclass that replaces it must repeat): DDP averages the ranks' gradients, so without it the
    gradients and the logged losses are the one-process values divided by the number of ranks
    (measured: 4.0908 vs 8.1815 at step 1). A trainer class that does it itself says so with
    ``scales_loss_across_ranks = True`` (``packed.PackedTrainer`` and the DPO trainer built on it,
    whose per-rank mean over pairs is already right under DDP's average); then nothing changes."""
    world = trainer.accelerator.num_processes
    if world <= 1 or getattr(trainer, "scales_loss_across_ranks", False):
        return
    if not trainer.args.average_tokens_across_devices:
        raise ValueError("distributed training needs average_tokens_across_devices=True "
                         "(the loss divides by the whole step's loss tokens)")
    compute_loss = trainer.compute_loss

    def scaled(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:  # divided by this rank's own count: already a mean
            return out
        if return_outputs:
            loss, outputs = out
            return loss * world, outputs
        return out * world

    trainer.compute_loss = scaled
    trainer.scales_loss_across_ranks = True


def adapter_state_dict(model) -> dict | None:
    """The LoRA weights of an FSDP-sharded peft model, gathered whole onto the CPU (a collective:
    every rank calls it, in the same order), keyed as ``model.state_dict()``; None when the model
    is not sharded (peft reads its own weights). Only the adapter is gathered, never the base."""
    if not is_sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().to("cpu")
    return out


def save_adapter(trainer, tokenizer, adapter_dir: Path) -> None:
    """The trained adapter and the tokenizer, written once (rank 0) in peft's format; with FSDP
    the adapter's shards are gathered first by every rank."""
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    state_dict = adapter_state_dict(model)
    if accelerator.is_main_process:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(adapter_dir), safe_serialization=True, **extra)
        tokenizer.save_pretrained(str(adapter_dir))
    barrier()


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
    apply_gradient_checkpointing(config, context)
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
    ``RunState.final_eval_metrics`` holds that last evaluation's metrics. Several processes: every
    rank calls it; rank 0's result is the run's (the others' lack the comparison)."""
    trainer, run, paths = prepared.trainer, prepared.run, prepared.paths
    scale_loss_for_ranks(trainer)  # several processes, a trainer that does not scale itself
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

    save_adapter(trainer, prepared.tokenizer, paths.adapter_dir)
    # The packed trainers count real tokens (packed.packed_trainer_class): all ranks' (a collective).
    trained_tokens = None
    if hasattr(trainer, "real_tokens_seen"):
        from tuneforge_builtin import packed

        trained_tokens = packed.all_ranks_sum(trainer.real_tokens_seen)
    comparison = None if run.cancelled else compare_with_base(prepared, context)
    final = CheckpointReport(step=state.global_step, path=paths.adapter_dir, eval_loss=eval_loss)
    if trainer.is_world_process_zero():
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
        trained_tokens=trained_tokens,  # None: the trainer does not count them
    )


def compare_with_base(prepared: PreparedRun, context: TrainingContext):
    """The trained model against its base on the test split (an ``evaluation.Evaluation``, or None
    when there is nothing to compare); the samples also go to ``samples.jsonl`` in the adapter
    directory. Best effort: the adapter is saved already, so a failure here is logged and the job
    still succeeds, without the comparison. Several processes: :func:`_compare_distributed`."""
    from tuneforge_builtin import evaluation

    cases = prepared.evaluation_set
    if cases is None or prepared.n_evals == 0:
        return None
    if prepared.trainer.accelerator.num_processes > 1:
        return _compare_distributed(prepared, context)
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


def _compare_distributed(prepared: PreparedRun, context: TrainingContext):
    """:func:`compare_with_base` with several processes: the base model's eval loss on every rank
    (the evaluation is a collective: each rank its share of the test split), the greedy
    generations on rank 0 alone with the unwrapped model (DDP: every rank holds it whole). With
    FSDP the model is sharded and a generation on one rank would wait for the others: no samples
    (the base eval loss still). Returns rank 0's comparison; None on the other ranks."""
    from tuneforge_builtin import evaluation

    trainer = prepared.trainer
    accelerator = trainer.accelerator
    model = trainer.model
    base_eval_loss = None
    if prepared.evaluate_base_loss and trainer.eval_dataset is not None and hasattr(model, "disable_adapter"):
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                # A prefix other than "eval": the progress callback must not report it as the run's.
                value = trainer.evaluate(metric_key_prefix="base_eval").get("base_eval_loss")
            if value is not None and math.isfinite(value):
                base_eval_loss = float(value)
        finally:
            model.train(was_training)
    if not accelerator.is_main_process:
        return None
    if is_sharded(model):
        log.info("job %s: the model is sharded over %d processes: no greedy samples (base eval loss only)",
                 context.job_id, accelerator.num_processes)
        result = evaluation.Evaluation()
    else:
        try:
            result = evaluation.evaluate_against_base(
                trainer, prepared.tokenizer, prepared.evaluation_set,
                max_length=max_sequence_length(model, context.base_model), base_eval_loss=False,
                job_id=context.job_id)
        except Exception:
            log.exception("job %s: comparison with the base model failed; the adapter is kept", context.job_id)
            return None
    result.base_eval_loss = base_eval_loss
    if result.samples:
        evaluation.write_samples(result.samples, prepared.paths.adapter_dir)
    return result
