"""Multi-process (data-parallel) training: one job as N processes on one machine.

A model too large for one GPU (the 70B/72B catalog entries) trains as several processes, one per
GPU, under FSDP with LoRA; more processes than the model needs train data-parallel (DDP); on CPU
the same path runs as DDP over ``gloo`` (tests/test_distributed.py: the distributed run gives the
same adapter and losses as a one-process run; tests/test_distributed_worker.py: through the worker).

The worker (``tuneforge.trainer.worker``) writes a job spec (JSON, :class:`JobSpec`), builds the
command with :func:`launch_command` (``accelerate launch`` on GPUs, ``torch.distributed.run`` on
CPU) and starts it; every launched process runs :func:`main` on the same spec, which runs the
method's own ``train`` (the data, the model, the LoRA adapter, the schedule, the final evaluation
and the comparison with the base model: nothing differs from one process; the multi-process parts
are in ``trl_common``). Rank 0 alone reports: one JSON object a line in ``progress_file``
(:func:`progress_record`: ``{"kind": "progress", ...ProgressReport}`` or ``{"kind": "checkpoint",
"step", "path", "eval_loss"}``, the worker uploads the checkpoint), and at the end the
``TrainingResult`` in ``result_file`` (:func:`result_record` / :func:`result_from_record`). A rank
that raises writes ``error_file`` (the first one wins); a cancel is the ``stop_file``, agreed over
all ranks at every step end.

The product's ``batch_size`` is examples per optimiser step, so each of N ranks gets
``batch_size / N`` examples per step (``trl_common.per_device_batch``): the global batch, the number of
steps and the learning-rate schedule stay those of one process. accelerate shards the one shuffled
order of batches over the ranks, so step ``i`` sees the same examples as the one-process run's step ``i``.

The loss of a step is the sum of the token losses of all ranks divided by the loss tokens of the
whole step (transformers gathers that count across ranks: ``average_tokens_across_devices``). DDP
averages gradients over ranks, so each rank's loss must be multiplied by the number of ranks for the
gradient and the logged loss to be the one-process values; transformers' own ``compute_loss`` does
this, ``packed.PackedTrainer.compute_loss`` (which replaces it) does too
(``scales_loss_across_ranks``); ``trl_common.scale_loss_for_ranks`` wraps any other trainer.

Test-only fault injection: ``TUNEFORGE_TEST_CRASH_RANK=RANK:STEP`` makes that rank ``os._exit`` at
its STEP-th step end (a crashed GPU process); never set it in a deployment.

torch/transformers are imported inside functions: the worker imports this module for
:func:`launch_command` without loading torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRY_MODULE = "tuneforge_builtin.distributed"
TEST_CRASH_RANK_ENV = "TUNEFORGE_TEST_CRASH_RANK"  # "RANK:STEP", tests only (module docstring)
TEST_CRASH_EXIT_CODE = 71
PARENT_PID_ENV = "TUNEFORGE_TRAINER_PARENT_PID"  # the worker that launched the run (see _watch_parent)
PARENT_POLL_SECONDS = 2.0
RECORD_PROGRESS = "progress"
RECORD_CHECKPOINT = "checkpoint"
# The built-in plugins (pyproject's entry points), for a source checkout without them installed.
BUILTIN_PLUGINS = ("llama", "qwen", "deepseek", "smollm", "sft", "dpo")


# ----------------------------------------------------------------------------------------------
# The job spec and the launch command (no heavy imports).


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every launched process needs to rebuild the job's ``TrainingContext`` (paths absolute)."""

    job_id: str
    method: str  # a registered training method with ``supports_distributed`` (``sft``, ``dpo``)
    base_model: str  # catalog id, resolved through the plugin registry
    model_dir: str
    train_file: str
    test_file: str
    output_dir: str
    hyperparameters: dict[str, Any]  # ``ResolvedHyperparameters.to_dict()``
    seed: int = 42
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    resume_from: str | None = None
    progress_file: str | None = None  # rank 0 appends one JSON line per progress / checkpoint report
    result_file: str | None = None  # rank 0 writes the run's result here (JSON) at the end
    stop_file: str | None = None  # cancel: every rank stops at the end of the step once this exists
    error_file: str | None = None  # the first rank that raises writes "Type: message" here

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
    """Examples per rank per step: the product's ``batch_size`` is per optimiser step, for all ranks
    (``trl_common.per_device_batch``; ValueError with "choose a multiple of N" when it does not divide)."""
    from tuneforge_builtin import trl_common

    return trl_common.per_device_batch(batch_size, world_size)


def scale_loss_for_ranks(trainer) -> None:
    """``trl_common.scale_loss_for_ranks`` (``trl_common.run_to_completion`` applies it)."""
    from tuneforge_builtin import trl_common

    trl_common.scale_loss_for_ranks(trainer)


@functools.cache
def registry():
    """The plugin registry (``tuneforge.plugins.get_registry``). A source checkout that is not
    installed (``PYTHONPATH=services:plugins``: no entry points, e.g. a GPU machine running
    benchmarks/gpu_distributed_check.py) registers the built-in plugins directly."""
    from tuneforge.plugins import collect, get_registry, make_plugin_manager

    found = get_registry()
    if found.methods:
        return found
    manager = make_plugin_manager(load_entry_points=False)
    for name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(f"tuneforge_builtin.{name}"), name=name)
    return collect(manager)


# ----------------------------------------------------------------------------------------------
# What rank 0 reports, and how the worker reads it back (no heavy imports).


def progress_record(report) -> dict[str, Any]:
    """A ``ProgressReport`` or ``CheckpointReport`` as one line of ``progress_file``."""
    from tuneforge.training import CheckpointReport

    if isinstance(report, CheckpointReport):
        return {"kind": RECORD_CHECKPOINT, "step": report.step, "path": str(report.path), "eval_loss": report.eval_loss}
    return {"kind": RECORD_PROGRESS, **dataclasses.asdict(report)}


def report_from_record(record: dict[str, Any]):
    """The ``ProgressReport`` / ``CheckpointReport`` of a ``progress_file`` line."""
    from tuneforge.training import CheckpointReport, ProgressReport

    kind = record.get("kind", RECORD_PROGRESS)
    if kind == RECORD_CHECKPOINT:
        return CheckpointReport(step=int(record["step"]), path=Path(record["path"]), eval_loss=record.get("eval_loss"))
    if kind != RECORD_PROGRESS:
        raise ValueError(f"unknown progress record kind {kind!r}")
    names = {f.name for f in dataclasses.fields(ProgressReport)}
    return ProgressReport(**{k: v for k, v in record.items() if k in names})


def result_record(result, **extra: Any) -> dict[str, Any]:
    """A ``TrainingResult`` as JSON-ready data (paths as strings), with ``extra`` keys beside it."""
    data = dataclasses.asdict(result)
    data["adapter_dir"] = str(result.adapter_dir)
    data["checkpoints"] = [{"step": c.step, "path": str(c.path), "eval_loss": c.eval_loss} for c in result.checkpoints]
    return {**data, **extra}


def result_from_record(record: dict[str, Any]):
    """The ``TrainingResult`` that :func:`result_record` wrote (extra keys ignored)."""
    from tuneforge.training import CheckpointReport, TrainingResult

    names = {f.name for f in dataclasses.fields(TrainingResult)}
    data = {k: v for k, v in record.items() if k in names}
    data["adapter_dir"] = Path(data["adapter_dir"])
    data["checkpoints"] = tuple(CheckpointReport(step=int(c["step"]), path=Path(c["path"]), eval_loss=c.get("eval_loss"))
                                for c in data.get("checkpoints") or ())
    data["metrics"] = {str(k): float(v) for k, v in (data.get("metrics") or {}).items()}
    data["samples"] = list(data.get("samples") or [])
    return TrainingResult(**data)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, in one write: a reader never sees half a record as a whole line."""
    line = json.dumps(record) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Inside a launched process.


def _test_crash_step(rank: int) -> int | None:
    raw = os.environ.get(TEST_CRASH_RANK_ENV, "").strip()
    if not raw:
        return None
    which, _, step = raw.partition(":")
    return int(step or 1) if int(which) == rank else None


def context_from_spec(spec: JobSpec, *, is_main: bool, reported: list | None = None):
    """The ``TrainingContext`` of ``spec``; progress and checkpoints are reported by rank 0 only
    (lines of ``progress_file``, and appended to ``reported`` when given)."""
    from tuneforge.core.hyperparameters import ResolvedHyperparameters
    from tuneforge.training import TrainingContext

    progress = Path(spec.progress_file) if (spec.progress_file and is_main) else None

    def report(item) -> None:
        if not is_main:
            return
        if reported is not None:
            reported.append(item)
        if progress is not None:
            _append_line(progress, progress_record(item))

    stop = Path(spec.stop_file) if spec.stop_file else None
    crash_at = _test_crash_step(int(os.environ.get("RANK", "0")))
    step_ends = [0]

    def should_stop() -> bool:
        """The stop file, agreed over all ranks (MAX all-reduce): a rank that stopped alone would
        leave the others waiting in the next step's gradient all-reduce. Called by every rank at
        every step end (``ScheduleCallback.on_step_end``), so the collective always matches."""
        step_ends[0] += 1
        if crash_at is not None and step_ends[0] >= crash_at:
            log.error("test-only %s: rank %s exits at its step end %d", TEST_CRASH_RANK_ENV,
                      os.environ.get("RANK", "0"), step_ends[0])
            os._exit(TEST_CRASH_EXIT_CODE)
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
        base_model=registry().base_model(spec.base_model),
        model_dir=Path(spec.model_dir),
        train_file=Path(spec.train_file),
        test_file=Path(spec.test_file),
        output_dir=Path(spec.output_dir),
        hyperparameters=ResolvedHyperparameters.from_dict(spec.hyperparameters),
        method_options=dict(spec.method_options),
        seed=spec.seed,
        report_progress=report,
        report_checkpoint=report,
        should_stop=should_stop,
        resume_from=Path(spec.resume_from) if spec.resume_from else None,
    )


def train(spec: JobSpec) -> dict[str, Any] | None:
    """Run ``spec`` as this process's rank: the method's own ``train`` on every rank (its
    multi-process parts are in ``trl_common``); rank 0 returns (and writes) the result record,
    the others None."""
    from tuneforge.training import CheckpointReport, ProgressReport

    method = registry().method(spec.method)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not getattr(method, "supports_distributed", False):
        raise ValueError(f"method {spec.method!r} cannot train as several processes")
    is_main = int(os.environ.get("RANK", "0")) == 0
    reported: list = []
    context = context_from_spec(spec, is_main=is_main, reported=reported)
    result = method.train(context)
    if not is_main:
        return None
    log.info("job %s: rank 0 saved the adapter to %s (%d processes)", spec.job_id, result.adapter_dir, world)
    from accelerate import PartialState

    kind = PartialState().distributed_type
    progress = [r for r in reported if isinstance(r, ProgressReport)]
    record = result_record(
        result,
        world_size=world,
        distributed_type=getattr(kind, "value", str(kind)),
        backend=_backend(),
        losses=[{"step": r.step, "loss": r.train_loss} for r in progress if r.train_loss is not None],
        eval_losses=[{"step": r.step, "eval_loss": r.eval_loss} for r in progress if r.eval_loss is not None],
        checkpoints_reported=[r.step for r in reported if isinstance(r, CheckpointReport)],
        peak_gpu_memory_bytes=_peak_gpu_memory(),
    )
    if spec.result_file:
        _write_atomically(Path(spec.result_file), json.dumps(record, indent=1))
    return record


def _peak_gpu_memory() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) is dead
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _watch_parent() -> None:
    """End this rank when the trainer worker that launched the run (``PARENT_PID_ENV``) or this
    rank's launcher (its parent: torchrun / accelerate) is gone: nobody would read its results,
    and a rank left alone would wait in a collective for ever. (torchrun starts every rank in a
    session of its own, so killing the launcher's process group does not reach them.)"""
    raw = os.environ.get(PARENT_PID_ENV, "").strip()
    if not raw.isdigit():
        return
    worker, launcher = int(raw), os.getppid()
    import signal
    import threading

    def watch() -> None:
        while _alive(worker) and os.getppid() == launcher:
            time.sleep(PARENT_POLL_SECONDS)
        log.error("the trainer worker (pid %s) or this rank's launcher (pid %s) is gone: exiting", worker, launcher)
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)  # this rank and what it started (data loader workers)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a launched process: ``python -m tuneforge_builtin.distributed SPEC.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuneforge_builtin.distributed JOB_SPEC.json", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = JobSpec.read(Path(args[0]))
    _watch_parent()
    try:
        train(spec)
    except BaseException as exc:
        if spec.error_file and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:  # the first rank's error is the one the job reports (O_EXCL: later ones lose)
                fd = os.open(spec.error_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(f"rank {rank}: {type(exc).__name__}: {exc}")
            except FileExistsError:
                pass
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
