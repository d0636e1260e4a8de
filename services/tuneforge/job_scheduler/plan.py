"""The dry run of ValidateJob: what the dataset build would leave (asked of the dataset-builder
with ``BuildDataset(dry_run=true)``), what training would do with it, and how long that would take
on the trainer hardware the cluster has announced, and which trainer pool it needs (``pool_plan``,
sized by core/pools.py) with how many live workers serve that pool.

The training figures use the trainer's own arithmetic (``core.hyperparameters``: ``spread``,
``planned_total_steps``, ``learning_rate_multiplier``), so the plan says what a run does, not what
it might do. Wall time comes from measured runs (tokens per second of this base model on this
device class, ``ThroughputRow``) when there are any, otherwise from a stated guess.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import statistics
from collections.abc import Iterable, Sequence

import grpc

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as pb
from tuneforge.core import hyperparameters as hp
from tuneforge.core import pools
from tuneforge.job_scheduler.capability_check import DatasetBuilderLine

log = logging.getLogger(__name__)

DRY_RUN_DEADLINE_SECONDS = 30.0  # a dry run counts tokens like a build: longer than a look-up
LIVE_PERIODS = 3  # a worker not seen for this many of its periods is gone
MEASURED_RUNS = 25  # the median is over at most this many recent runs of a model on a class
FLOPS_PER_PARAMETER_TOKEN = 6  # forward + backward of a dense decoder, per parameter and token
# Effective training FLOP/s assumed per device class (a rough guess: utilisation included).
ASSUMED_FLOPS = (("cuda", 1e14), ("cpu", 5e10))


@dataclasses.dataclass(frozen=True)
class Worker:
    """A trainer worker as the job-scheduler last saw it."""

    worker_id: str
    device_class: str
    last_seen_at: dt.datetime
    period_seconds: int
    pools: tuple[str, ...] = ()  # the trainer pools it takes work from (core/pools.py)

    def alive(self, now: dt.datetime) -> bool:
        return now - self.last_seen_at <= dt.timedelta(seconds=LIVE_PERIODS * max(1, self.period_seconds))


def workers_serving(workers: Iterable[Worker], pool: str, now: dt.datetime) -> int:
    """Live workers (seen within ``LIVE_PERIODS`` periods) that take work of ``pool``."""
    return sum(1 for w in workers if pool in w.pools and w.alive(now))


def pool_plan(sizing: pools.Sizing, workers: Iterable[Worker], now: dt.datetime) -> pb.PoolPlan:
    """ValidateJob's answer to "where would it train": the pool, the estimate, live workers of it."""
    return pb.PoolPlan(pool=sizing.pool.name, description=sizing.pool.description,
                       required_memory_gib=round(sizing.need_gib, 2), processes=sizing.pool.processes,
                       basis=sizing.basis, workers_registered=workers_serving(workers, sizing.pool.name, now))


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured training run of ``base_model`` on ``device_class``."""

    base_model: str
    device_class: str
    tokens_per_second: float


async def dry_run_dataset(line: DatasetBuilderLine, spec: pb.JobSpec, resolved: hp.ResolvedHyperparameters,
                          metadata: list[tuple[str, str]], deadline: float | None = None,
                          ) -> tuple[common_pb2.DatasetSummary | None, str]:
    """The summary the job's dataset build would produce now, or ``(None, why not)`` when the
    dataset-builder cannot tell (then ValidateJob answers without the plans). The request is the
    one CreateJob's ``DatasetBuildRequested`` makes, with ``dry_run``."""
    timeout = DRY_RUN_DEADLINE_SECONDS if deadline is None else max(0.1, min(DRY_RUN_DEADLINE_SECONDS, deadline))
    try:
        reply = await line.stub().BuildDataset(
            dsb.BuildDatasetRequest(
                topics=list(spec.topics), method=spec.method, base_model=spec.base_model,
                test_fraction=resolved.test_fraction, seed=resolved.seed,
                train_on_inputs=resolved.train_on_inputs, overlength_policy=spec.overlength_policy,
                max_epochs=resolved.max_epochs, dry_run=True,
            ),
            metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        log.warning("BuildDataset(dry_run) failed (%s: %s); ValidateJob answers without a dataset plan",
                    exc.code().name, exc.details())
        return None, (f"the dataset could not be planned: the dataset-builder answered {exc.code().name} "
                      f"({exc.details() or 'no details'}); the counts, steps and time are shown when it can be asked")
    return reply.dataset, ""


def dataset_plan(summary: common_pb2.DatasetSummary) -> pb.DatasetPlan:
    """The build's counts step by step, from its summary."""
    return pb.DatasetPlan(
        workspace_examples=summary.workspace_example_count,
        after_topics=summary.topic_matched_count,
        after_formats=summary.filtered_count,
        after_dedupe=summary.deduplicated_count,
        overlength=summary.overlength_count,
        after_overlength=summary.train_count + summary.test_count,
        train_count=summary.train_count,
        test_count=summary.test_count,
        train_tokens=summary.train_tokens.total,
        test_tokens=summary.test_tokens.total,
        tokenizer=summary.tokenizer,
        warnings=list(summary.warnings),
    )


def training_plan(resolved: hp.ResolvedHyperparameters, train_count: int, test_count: int,
                  train_tokens: int) -> pb.TrainingPlan:
    """Steps, evaluations, checkpoints and the learning-rate schedule of a run over ``max_epochs``,
    as the trainer computes them (trl_common: ScheduleCallback, ScheduledLearningRate). Without a
    test split there are no evaluations. ``checkpoint_steps`` ends with ``total_steps``: the
    trainer keeps the others as checkpoints and writes the final adapter there."""
    steps_per_epoch = hp.planned_total_steps(train_count, resolved.batch_size, 1)
    total = hp.planned_total_steps(train_count, resolved.batch_size, resolved.max_epochs)
    n_evals = resolved.n_evals if test_count > 0 else 0
    plan = pb.TrainingPlan(
        steps_per_epoch=steps_per_epoch,
        epochs=resolved.max_epochs,
        total_steps=total,
        eval_steps=hp.spread(n_evals, total),
        checkpoint_steps=hp.spread(resolved.n_checkpoints, total),
        total_training_tokens=train_tokens * resolved.max_epochs,
    )
    for step, rate in hp.learning_rate_points(resolved.learning_rate, total, resolved.warmup_ratio,
                                              resolved.lr_peak_ratio):
        plan.learning_rate_schedule.add(step=step, learning_rate=rate)
    return plan


def assumed_flops(device_class: str) -> tuple[float, str]:
    """Effective FLOP/s assumed for a device class without measurements, and its kind's name."""
    kind = device_class.split(":", 1)[0].strip().lower()
    for name, flops in ASSUMED_FLOPS:
        if kind == name:
            return flops, name
    return dict(ASSUMED_FLOPS)["cpu"], "cpu"  # an unknown kind: the slowest assumption


def guessed_tokens_per_second(parameter_count: int, device_class: str) -> tuple[float, str]:
    """Tokens per second guessed from the model's size, and the assumption in words."""
    flops, kind = assumed_flops(device_class)
    per_token = FLOPS_PER_PARAMETER_TOKEN * max(1, parameter_count)
    return flops / per_token, (f"{FLOPS_PER_PARAMETER_TOKEN} x {parameter_count:,} parameters = {per_token:.3g} "
                               f"FLOPs per training token at an assumed {flops:.0e} FLOP/s for a {kind} device")


def wall_time_estimates(total_tokens: int, base_model: str, parameter_count: int, workers: Iterable[Worker],
                        measurements: Sequence[Measurement], now: dt.datetime) -> list[pb.WallTimeEstimate]:
    """One estimate per device class with a worker seen within ``LIVE_PERIODS`` periods: the
    median tokens/s of measured runs of ``base_model`` on that class, else a guess from the size
    (``guess``). With no worker alive, one guess for "cpu". seconds = total_tokens / tokens/s."""
    alive: dict[str, int] = {}
    for w in workers:
        if w.alive(now):
            alive[w.device_class] = alive.get(w.device_class, 0) + 1
    classes = sorted(alive.items()) or [("cpu", 0)]
    out = []
    for device_class, count in classes:
        runs = [m.tokens_per_second for m in measurements
                if m.base_model == base_model and m.device_class == device_class and m.tokens_per_second > 0]
        if runs:
            rate = statistics.median(runs)
            plural = "run" if len(runs) == 1 else "runs"
            basis, guess = f"median of {len(runs)} measured {plural} of {base_model} on {device_class}", False
        else:
            rate, assumption = guessed_tokens_per_second(parameter_count, device_class)
            guess = True
            if count:
                basis = f"a guess: no run of {base_model} on {device_class} measured yet; {assumption}"
            else:
                basis = f"a guess: no trainer has been seen; {assumption}"
        out.append(pb.WallTimeEstimate(device_class=device_class, seconds=total_tokens / rate,
                                       tokens_per_second=rate, guess=guess, basis=basis, workers=count))
    return out


def refusal_warning(resolved: hp.ResolvedHyperparameters, summary: common_pb2.DatasetSummary,
                    counts_text: str) -> str | None:
    """The job-scheduler's own refusal after the build (``on_dataset_built``), said in advance."""
    total = summary.train_count + summary.test_count
    if total >= resolved.min_examples:
        return None
    return (f"training would be refused: it needs at least {resolved.min_examples} examples (min_examples) "
            f"but only {total} would remain: {counts_text}. Add data, widen the topic filter, or lower "
            f"min_examples")
