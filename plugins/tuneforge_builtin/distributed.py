"""Multi-process (data-parallel) training: one job as N processes on one machine.

A model too large for one GPU (the 70B/72B catalog entries) trains as several processes, one per
GPU, under FSDP with LoRA; on CPU the same path runs as DDP over ``gloo`` (the test that the
distributed run gives the same adapter and losses as a one-process run: tests/test_distributed.py).

The worker writes a job spec (JSON, :class:`JobSpec`), builds the command with
:func:`launch_command` (``accelerate launch`` on GPUs, ``torch.distributed.run`` on CPU) and
starts it; every launched process runs :func:`main` on the same spec. Each rank prepares the same
trainer through the method's own ``prepare`` (the data, the model, the LoRA adapter, the schedule:
nothing here differs from one process) and trains its share of every optimiser step; rank 0 alone
reports progress (JSON lines in ``progress_file``), saves the adapter and writes ``result_file``.
Not yet safe: intermediate checkpoints (``n_checkpoints`` > 1) — ``trl_common.ScheduleCallback.on_save``
renames the checkpoint on every rank without a barrier (measured: rank 1's ``rng_state_1.pth`` lost).

The product's ``batch_size`` is examples per optimiser step, so each of N ranks gets
``batch_size / N`` examples per step (:func:`split_batch`): the global batch, the number of steps and
the learning-rate schedule stay those of one process. accelerate shards the one shuffled order of
batches over the ranks, so step ``i`` sees the same examples as the one-process run's step ``i``.

The loss of a step is the sum of the token losses of all ranks divided by the loss tokens of the
whole step (transformers gathers that count across ranks: ``average_tokens_across_devices``). DDP
averages gradients over ranks, so each rank's loss must be multiplied by the number of ranks for the
gradient and the logged loss to be the one-process values; transformers' own ``compute_loss`` does
this, ``packed.PackedTrainer.compute_loss`` (which replaces it) must too:
:func:`scale_loss_for_ranks` applies it where the trainer does not (``scales_loss_across_ranks``).

torch/transformers are imported inside functions: the worker imports this module for
:func:`launch_command` without loading torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRY_MODULE = "tuneforge_builtin.distributed"


# ----------------------------------------------------------------------------------------------
# The job spec and the launch command (no heavy imports).


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every launched process needs to rebuild the job's ``TrainingContext`` (paths absolute)."""

    job_id: str
    method: str  # a registered training method with ``prepare`` (``sft``)
    base_model: str  # catalog id, resolved through the plugin registry
    model_dir: str
    train_file: str
    test_file: str
    output_dir: str
    hyperparameters: dict[str, Any]  # ``ResolvedHyperparameters.to_dict()``
    seed: int = 42
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    resume_from: str | None = None
    progress_file: str | None = None  # rank 0 appends one JSON object per progress report
    result_file: str | None = None  # rank 0 writes the run's result here (JSON) at the end
    stop_file: str | None = None  # cancel: every rank stops at the end of the step once this exists

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job spec is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown job spec field(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if missing:
            raise ValueError(f"{path}: job spec lacks {', '.join(missing)}")
        return cls(**data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(spec_file: Path, num_processes: int, *, cpu: bool, fsdp: bool = False,
                   main_process_port: int | None = None, python: str | None = None) -> list[str]:
    """The command that runs :func:`main` on ``spec_file`` as ``num_processes`` processes on this
    machine. On GPUs: ``accelerate launch``, one process per GPU, ``fsdp`` sharding the base model
    (FSDP2, one unit per decoder layer, the LoRA weights the only trainable ones). On CPU
    (``cpu``): DDP over gloo, started with ``torch.distributed.run`` — accelerate 1.15's
    ``launch --cpu --num_processes N`` goes to its "simple" launcher, which starts ONE process unless
    an MPI hostfile is given (measured: world size 1, no error). The rendezvous port is chosen
    here when not given, so two jobs on one machine do not collide on the default 29500."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    if cpu and fsdp:
        raise ValueError("FSDP is the GPU path; on CPU the distributed run is DDP over gloo")
    port = str(main_process_port or free_port())
    python = python or sys.executable
    if cpu:
        command = [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_processes),
                   "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        command = [python, "-m", "accelerate.commands.launch",
                   "--num_processes", str(num_processes), "--num_machines", "1", "--machine_rank", "0",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--mixed_precision", "no", "--dynamo_backend", "no"]
        if fsdp:
            command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                        "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true",
                        "--fsdp_reshard_after_forward", "true"]
        elif num_processes > 1:
            command += ["--multi_gpu"]
    return [*command, "-m", ENTRY_MODULE, str(Path(spec_file).resolve())]


def launch_environment(threads_per_process: int = 1) -> dict[str, str]:
    """The environment for the launched processes: this one, with the intra-op threads of each
    process bounded (N processes × all cores each oversubscribes the CPU)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads_per_process)
    return env


def split_batch(batch_size: int, world_size: int) -> int:
    """Examples per rank per step: the product's ``batch_size`` is per optimiser step, for all ranks."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not divide over {world_size} processes: "
                         f"choose a multiple of {world_size}")
    return batch_size // world_size


# ----------------------------------------------------------------------------------------------
# Inside a launched process.


def scale_loss_for_ranks(trainer) -> None:
    """Multiply the trainer's loss (training and evaluation) by the number of ranks when the loss is divided by the
    step's global loss-token count (what transformers' ``compute_loss`` does and a subclass that
    replaces it must repeat): DDP averages the ranks' gradients, so without it the gradients and the
    logged losses are the one-process values divided by the number of ranks (measured: 4.0908 vs
    8.1815 at step 1). A trainer class that does it itself says so with
    ``scales_loss_across_ranks = True``; then nothing changes here."""
    world = trainer.accelerator.num_processes
    if world <= 1 or getattr(trainer, "scales_loss_across_ranks", False):
        return
    if not trainer.args.average_tokens_across_devices:
        raise ValueError("distributed packed training needs average_tokens_across_devices=True "
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


def context_from_spec(spec: JobSpec, *, is_main: bool):
    """The ``TrainingContext`` of ``spec``; progress and checkpoints are reported by rank 0 only."""
    from tuneforge.core.hyperparameters import ResolvedHyperparameters
    from tuneforge.plugins import get_registry
    from tuneforge.training import TrainingContext

    registry = get_registry()
    progress = Path(spec.progress_file) if (spec.progress_file and is_main) else None

    def report_progress(report) -> None:
        if progress is None:
            return
        with progress.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in dataclasses.asdict(report).items()}) + "\n")

    stop = Path(spec.stop_file) if spec.stop_file else None

    def should_stop() -> bool:
        """The stop file, agreed over all ranks (MAX all-reduce): a rank that stopped alone would
        leave the others waiting in the next step's gradient all-reduce. Called by every rank at
        every step end (``ScheduleCallback.on_step_end``), so the collective always matches."""
        requested = stop is not None and stop.exists()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return requested
        import torch
        from accelerate import PartialState

        flag = torch.tensor([1 if requested else 0], device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return TrainingContext(
        job_id=spec.job_id,
        base_model=registry.base_model(spec.base_model),
        model_dir=Path(spec.model_dir),
        train_file=Path(spec.train_file),
        test_file=Path(spec.test_file),
        output_dir=Path(spec.output_dir),
        hyperparameters=ResolvedHyperparameters.from_dict(spec.hyperparameters),
        method_options=dict(spec.method_options),
        seed=spec.seed,
        report_progress=report_progress,
        should_stop=should_stop,
        resume_from=Path(spec.resume_from) if spec.resume_from else None,
    )


def train(spec: JobSpec) -> dict[str, Any] | None:
    """Run ``spec`` as this process's rank; rank 0 returns (and writes) the result, others None."""
    from tuneforge.plugins import get_registry

    method = get_registry().method(spec.method)
    if not hasattr(method, "prepare"):
        raise ValueError(f"method {spec.method!r} cannot train distributed (it has no prepare step)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    context = context_from_spec(spec, is_main=is_main)
    per_rank = split_batch(context.hyperparameters.batch_size, world)

    prepared, _ = method.prepare(context)
    trainer = prepared.trainer
    # The global batch is the product's batch_size: each rank takes its share. The train
    # dataloader is built in ``train()``, from ``_train_batch_size``.
    trainer.args.per_device_train_batch_size = per_rank
    trainer.args.per_device_eval_batch_size = per_rank
    trainer._train_batch_size = per_rank
    scale_loss_for_ranks(trainer)

    resume = str(Path(spec.resume_from).resolve()) if spec.resume_from else None
    output = trainer.train(resume_from_checkpoint=resume)
    run = prepared.run
    run.training_done = True
    eval_loss = run.last_eval_loss
    if prepared.n_evals > 0 and run.last_eval_step != trainer.state.global_step:
        eval_loss = float(trainer.evaluate()["eval_loss"])  # collective: every rank evaluates its share
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(prepared.paths.adapter_dir),
                                                                    safe_serialization=True)
    prepared.tokenizer.save_pretrained(str(prepared.paths.adapter_dir))
    log.info("job %s: rank 0 saved the adapter to %s (%d processes)", spec.job_id, prepared.paths.adapter_dir, world)
    history = trainer.state.log_history
    kind = trainer.accelerator.distributed_type
    result = {
        "adapter_dir": str(prepared.paths.adapter_dir),
        "world_size": world,
        "distributed_type": getattr(kind, "value", str(kind)),
        "backend": _backend(),
        "steps": trainer.state.global_step,
        "train_loss": run.last_train_loss,
        "train_loss_mean": float(output.training_loss),
        "eval_loss": eval_loss,
        "cancelled": run.cancelled,
        "stopped_early": run.stopped_early,
        "losses": [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e],
        "eval_losses": [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in history if "eval_loss" in e],
    }
    if spec.result_file:
        Path(spec.result_file).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of a launched process: ``python -m tuneforge_builtin.distributed SPEC.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuneforge_builtin.distributed JOB_SPEC.json", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    train(JobSpec.read(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
