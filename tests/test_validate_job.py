"""ValidateJob's dry run (issue 10 item 3): the dataset counts after each build step, the training
plan (steps, evaluations, checkpoints, learning-rate schedule, tokens) and the wall-time estimates,
against figures computed by hand; the schedule against the trainer's own scheduler; the dry run
storing nothing; the estimates from announced trainer workers and measured runs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import ADMIN, workspace  # noqa: F401  (ADMIN: the stack's administrator token)
from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core import hyperparameters as hp
from tuneforge.core import subjects
from tuneforge.core.bus import Bus
from tuneforge.core.nats_server import NatsServerProcess, free_port
from tuneforge.core.settings import SERVICES, Settings
from tuneforge.core.storage import ArtifactStore
from tuneforge.dataset_builder.tokens import TokenCounter
from tuneforge.job_scheduler.capability_check import DatasetBuilderLine
from tuneforge.plugins import get_registry
from tuneforge.stack import load_service_class

MODEL = "smollm2-135m"  # context length 8192: one long example goes over it
PARAMETERS = 134_515_008  # smollm2-135m's parameter count (tests/test_chat_templates.py)
GPU = "cuda:Test GPU 80GB"


# --- a stack without a trainer: the only trainer workers are the ones this test announces ---------

@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    from tuneforge.trainer.standin import make_standin

    return make_standin(get_registry().base_model(MODEL), tmp_path_factory.mktemp("store"))


@pytest.fixture
async def stack(tmp_path, standin):
    """dataset-builder, job-scheduler, model-registry and notifier in this event loop (no trainer,
    whose worker would announce itself), with the stand-in's tokenizer in the model store."""
    nats = NatsServerProcess(tmp_path / "nats").start()
    settings = Settings(data_dir=tmp_path / "state", nats_url=nats.url, admin_token=ADMIN,
                        **{f"{s.replace('-', '_')}_port": 0 for s in SERVICES})
    shutil.copytree(standin, settings.resolved_model_store() / MODEL)
    started, endpoints = [], {}
    try:
        for name in SERVICES:
            if name == "trainer":
                continue
            service = load_service_class(name)(settings)
            port = await service.start(port=0)
            started.append(service)
            endpoints[name] = f"127.0.0.1:{port}"
            setattr(settings, f"{name.replace('-', '_')}_port", port)
        endpoints["trainer"] = endpoints["job-scheduler"]  # never called here
        yield endpoints, settings, {s.name: s for s in started}
    finally:
        for service in reversed(started):
            await service.stop(grace=0.5)
        nats.stop()


# --- data ------------------------------------------------------------------------------------------

def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question number {i}"},
                         {"role": "assistant", "content": f"answer number {i}"}]}


def preference(i: int) -> dict:
    return {"input": {"messages": [{"role": "user", "content": f"pick one {i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"good {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"bad {i}"}]}


LONG = {"messages": [{"role": "user", "content": " ".join(f"w{j}" for j in range(3000))},
                     {"role": "assistant", "content": "ok"}]}


def write(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def job_spec(**hyper) -> js.JobSpec:
    values = dict(learning_rate=2e-4, lr_peak_ratio=0.1, warmup_ratio=0.2, min_examples=30, test_fraction=0.25,
                  n_evals=4, max_epochs=3, n_checkpoints=3, batch_size=5, seed=7)
    values.update(hyper)
    return js.JobSpec(name="plan-me", base_model=MODEL, method="sft", topics=["A", "B"],
                      hyperparameters=common_pb2.Hyperparameters(**values))


async def import_hand_set(clients, tmp_path: Path) -> None:
    """43 examples in the store: 20 conversations in A, 12 conversations and a long one in B, 4
    preference pairs in A, 6 conversations in C; and 5 exact duplicates of A's, which the store
    keeps once (one example per content hash: duplicates are dropped at import)."""
    imports = [
        ("a.jsonl", [conversation(i) for i in range(20)], "A", 20, 0),
        ("b.jsonl", [conversation(i) for i in range(100, 112)] + [LONG], "B", 13, 0),
        ("pairs.jsonl", [preference(i) for i in range(4)], "A", 4, 0),
        ("c.jsonl", [conversation(i) for i in range(200, 206)], "C", 6, 0),
        ("dups.jsonl", [conversation(i) for i in range(5)], "A", 0, 5),
    ]
    for name, objs, topic, imported, duplicates in imports:
        reply = await sdk.import_file(clients, write(tmp_path / name, objs), topics=[topic])
        assert (reply.imported, reply.duplicates, reply.rejected) == (imported, duplicates, 0), name


async def validate(clients, spec: js.JobSpec) -> js.ValidateJobResponse:
    return await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=spec))


# --- the hand-computed case --------------------------------------------------------------------------

async def test_dry_run_figures_match_a_hand_computed_case(stack, tmp_path):
    endpoints, settings, apps = stack
    clients = await workspace(endpoints)
    try:
        await import_hand_set(clients, tmp_path)
        counter = TokenCounter.for_model(settings.resolved_model_store(), MODEL,
                                         get_registry().base_model(MODEL).training_chat_template)
        assert counter.count([LONG])[0] > 8192 > max(counter.count([conversation(i) for i in range(300)]))

        checked = await validate(clients, job_spec())
        d, t = checked.dataset_plan, checked.training_plan

        # counts per step, by hand:
        assert d.workspace_examples == 43  # 20 + 13 + 4 + 6
        assert d.after_topics == 37  # A or B: 20 + 13 + 4 (C's 6 out)
        assert d.after_formats == 33  # conversations only (SFT): 37 - 4 preference pairs
        assert d.after_dedupe == 33  # the 5 duplicates never reached the store (imported 0, duplicates 5)
        assert d.overlength == 1  # LONG: more than 8192 tokens
        assert d.after_overlength == 32  # dropped (the default policy)
        assert d.test_count == 8  # floor(0.25 x 32 + 0.5)
        assert d.train_count == 24  # 32 - 8
        assert MODEL in d.tokenizer and d.train_tokens > 0 and d.test_tokens > 0

        # steps, by hand:
        assert t.steps_per_epoch == 5  # ceil(24 / 5)
        assert t.epochs == 3
        assert t.total_steps == 15  # 5 x 3
        assert list(t.eval_steps) == [4, 8, 12, 15]  # ceil(k x 15 / 4), k = 1..4
        assert list(t.checkpoint_steps) == [5, 10, 15]  # ceil(k x 15 / 3), k = 1..3; the adapter at 15
        assert t.total_training_tokens == d.train_tokens * 3

        # the schedule, by hand: warmup = ceil(0.2 x 15) = 3 steps from 0.1 x peak; then a cosine
        # over steps 4..15 (11 intervals) from the peak down to 0.1 x peak.
        peak = 2e-4
        expected = [(1, peak * 0.1), (3, peak * (0.1 + 0.9 * 2 / 3))]  # steps 1 and 3 of the warmup
        expected += [(s, peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 11)))) for s in range(4, 16)]
        got = [(p.step, p.learning_rate) for p in t.learning_rate_schedule]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [r for _, r in got] == pytest.approx([r for _, r in expected], rel=1e-12)
        assert got[2] == (4, pytest.approx(peak)) and got[-1] == (15, pytest.approx(peak * 0.1))

        # no trainer seen: one guess, for cpu, from the size (6 FLOPs per parameter and token at 5e10 FLOP/s)
        (only,) = t.wall_time_estimates
        guess_rate = 5e10 / (6 * PARAMETERS)
        assert (only.device_class, only.guess, only.workers) == ("cpu", True, 0)
        assert only.tokens_per_second == pytest.approx(guess_rate)
        assert only.seconds == pytest.approx(d.train_tokens * 3 / guess_rate)
        assert "no trainer has been seen" in only.basis and "5e+10 FLOP/s" in only.basis

        # what the build would warn about, in the plan and in the answer; no refusal at min_examples=30
        assert any(w.startswith("32 examples: fine-tuning with fewer than 100") for w in d.warnings)
        assert any(w.startswith(f"1 examples are longer than the 8192-token context of {MODEL}") for w in d.warnings)
        assert set(d.warnings) <= set(checked.warnings)
        assert not any("would be refused" in w for w in checked.warnings)

        # the dry runs stored nothing: no snapshot listed, nothing in the artifact store
        store = ArtifactStore(settings.resolved_artifact_url())
        assert not (await clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest())).datasets
        assert store.list("datasets") == []

        # built for real, the same figures; train_tokens are the train split's tokens
        built = (await clients.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(
            topics=["A", "B"], method="sft", base_model=MODEL, test_fraction=0.25, seed=7, max_epochs=3))).dataset
        assert built.dataset_id and store.list(f"datasets/{(await _workspace_id(clients))}/{built.dataset_id}")
        assert (built.workspace_example_count, built.topic_matched_count, built.filtered_count,
                built.deduplicated_count, built.overlength_count, built.train_count, built.test_count) == (
                    d.workspace_examples, d.after_topics, d.after_formats, d.after_dedupe, d.overlength,
                    d.train_count, d.test_count)
        assert (built.train_tokens.total, built.test_tokens.total) == (d.train_tokens, d.test_tokens)
        files = await sdk.download_dataset(clients, built.dataset_id, tmp_path / "dl")
        train_lines = [json.loads(x) for x in next(f for f in files if f.name == "train.jsonl").read_text().splitlines()]
        assert len(train_lines) == 24 and sum(counter.count(train_lines)) == d.train_tokens
        listed = (await clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest())).datasets
        assert [e.dataset.dataset_id for e in listed] == [built.dataset_id]

        # min_examples above what remains: the answer says training would be refused, and it is
        refused = await validate(clients, job_spec(min_examples=33))
        warning = [w for w in refused.warnings if w.startswith("training would be refused")]
        assert len(warning) == 1 and "at least 33 examples (min_examples) but only 32 would remain" in warning[0]
        counts_text = "43 examples in the workspace -> 33 conversations examples in A, B -> 33 after removing " \
                      "duplicates -> 32 after dropping 1 over-length -> 24 train / 8 test"
        assert counts_text in warning[0]
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=job_spec(min_examples=33)))
        events = await sdk.watch_job(clients, created.job.id, timeout=60)
        assert events[-1].state == js.JOB_STATE_FAILED
        failed = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        assert "at least 33 examples" in failed.failure_reason and counts_text in failed.failure_reason

        # without the dataset-builder: hyperparameters and warnings, no plans
        scheduler = apps["job-scheduler"]
        await scheduler.dataset_builder.close()
        scheduler.dataset_builder = DatasetBuilderLine(Settings(dataset_builder_port=free_port()))
        alone = await validate(clients, job_spec())
        assert alone.resolved_hyperparameters.batch_size == 5
        assert not alone.HasField("dataset_plan") and not alone.HasField("training_plan")
        assert any(w.startswith("the dataset could not be planned") and "UNAVAILABLE" in w for w in alone.warnings)
    finally:
        await clients.close()


async def _workspace_id(clients) -> str:
    return (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace.id


# --- wall time from announced workers and measured runs ----------------------------------------------

async def test_wall_time_from_measured_runs_of_announced_workers(stack, tmp_path):
    endpoints, settings, _ = stack
    clients = await workspace(endpoints)
    bus = await Bus.connect(settings.nats_url, "test")
    try:
        await import_hand_set(clients, tmp_path)
        ws = await _workspace_id(clients)
        # a job of this base model to carry the measurements (it fails at min_examples; no trainer here)
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=job_spec(min_examples=1000)))
        assert (await sdk.watch_job(clients, created.job.id, timeout=60))[-1].state == js.JOB_STATE_FAILED
        tokens = (await validate(clients, job_spec())).training_plan.total_training_tokens
        assert tokens > 0

        def seen(worker: str, device: str, age_s: float = 0.0) -> ev.TrainerWorkerSeen:
            meta = bus.meta("")
            meta.occurred_at.FromDatetime(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s))
            return ev.TrainerWorkerSeen(meta=meta, worker_id=worker, device_class=device, device_count=1,
                                        period_seconds=60)

        for message in (seen("w-cpu", "cpu"), seen("w-gpu-1", GPU), seen("w-gpu-2", GPU),
                        seen("w-old", "cuda:Old GPU", age_s=600)):  # 600 s > 3 periods of 60 s: gone
            await bus.publish(subjects.TRAINER_WORKER_SEEN, message)

        def succeeded(attempt: int, trained: int, seconds: float) -> ev.TrainingRunSucceeded:
            return ev.TrainingRunSucceeded(
                meta=bus.meta(ws, created.job.id), attempt=attempt, device_class=GPU, trained_tokens=trained,
                metrics=common_pb2.TrainingMetrics(train_seconds=seconds))

        # 3000, then attempt 1 again (a redelivery under a new event id: not counted), 1000, 1500 tokens/s
        for message in (succeeded(1, 30_000, 10.0), succeeded(1, 90_000, 10.0), succeeded(2, 10_000, 10.0),
                        succeeded(3, 30_000, 20.0)):
            await bus.publish(subjects.TRAINING_RUN_SUCCEEDED, message)

        deadline = time.monotonic() + 30
        while True:  # the events are handled in order: 3 runs counted means all were handled
            estimates = (await validate(clients, job_spec())).training_plan.wall_time_estimates
            counted = [int(m.group(1)) for e in estimates if (m := re.search(r"median of (\d+) measured", e.basis))]
            if counted and counted[0] >= 3:
                break
            assert time.monotonic() < deadline, [str(e) for e in estimates]
            await asyncio.sleep(0.2)

        cpu, gpu = estimates  # by device class; the old GPU's worker is gone
        guess_rate = 5e10 / (6 * PARAMETERS)
        assert (cpu.device_class, cpu.guess, cpu.workers) == ("cpu", True, 1)
        assert cpu.tokens_per_second == pytest.approx(guess_rate) and cpu.seconds == pytest.approx(tokens / guess_rate)
        assert f"no run of {MODEL} on cpu measured yet" in cpu.basis
        assert (gpu.device_class, gpu.guess, gpu.workers) == (GPU, False, 2)
        assert gpu.tokens_per_second == 1500.0  # the median of 3000, 1000 and 1500 (the mean: 1833)
        assert gpu.seconds == pytest.approx(tokens / 1500.0)
        assert gpu.basis == f"median of 3 measured runs of {MODEL} on {GPU}"
        # a base model without a tokenizer in the store: no tokens counted, so no time to estimate
        other = await validate(clients, js.JobSpec(
            name="other", base_model="llama-3.2-1b", method="sft", topics=["A", "B"],
            hyperparameters=common_pb2.Hyperparameters(min_examples=1)))
        assert other.training_plan.total_steps > 0 and not other.training_plan.wall_time_estimates
        assert any(w.startswith("no tokenizer for llama-3.2-1b in the model store: the training tokens")
                   for w in other.warnings)
    finally:
        await bus.close()
        await clients.close()


# --- the schedule points against the trainer's scheduler ---------------------------------------------

@pytest.mark.parametrize("total,warmup_ratio,peak_ratio", [
    (15, 0.2, 0.1), (15, 0.2, 0.0), (40, 0.0, 0.3), (1, 0.5, 0.2), (7, 0.9, 0.0), (1000, 0.05, 0.1), (2, 0.0, 0.0),
])
def test_schedule_points_are_the_learning_rates_the_trainer_uses(total, warmup_ratio, peak_ratio):
    """The trainer's LambdaLR (trl_common.ScheduledLearningRate.create_scheduler) stepped as a
    Trainer steps it: the rate read before optimisation step s is the plan's rate at s."""
    import torch
    from tuneforge_builtin.trl_common import ScheduledLearningRate

    class Bare:
        lr_scheduler = None

    class Scheduled(ScheduledLearningRate, Bare):
        pass

    rate = 3e-4
    trainer = Scheduled(warmup_ratio=warmup_ratio, lr_peak_ratio=peak_ratio)
    trainer.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=rate)
    scheduler = trainer.create_scheduler(total)
    used = {}
    for step in range(1, total + 1):
        used[step] = trainer.optimizer.param_groups[0]["lr"]
        trainer.optimizer.step()
        scheduler.step()
    points = hp.learning_rate_points(rate, total, warmup_ratio, peak_ratio)
    assert len(points) <= hp.MAX_SCHEDULE_POINTS
    assert [r for _, r in points] == pytest.approx([used[s] for s, _ in points], rel=1e-9)
    steps = [s for s, _ in points]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == total
    warm = math.ceil(warmup_ratio * total)
    for must in (warm, warm + 1):
        if 1 <= must <= total:
            assert must in steps
    if peak_ratio > 0 and total > 40:  # the cosine is sampled evenly: no gap wider than ~total/36
        gaps = [b - a for a, b in zip(steps, steps[1:]) if a > warm]
        assert max(gaps) <= math.ceil((total - warm) / 36) + 1
        assert all(x >= y for x, y in zip([r for s, r in points if s > warm], [r for s, r in points if s > warm][1:]))


def test_spread_and_planned_steps_are_the_trainers():
    """The plan and the trainer share one spread / planned_total_steps (the trainer's methods
    import them from core.hyperparameters), and they give what was computed by hand."""
    from tuneforge_builtin import dpo, sft, trl_common

    assert trl_common.spread is hp.spread
    assert sft.planned_total_steps is dpo.planned_total_steps is hp.planned_total_steps
    assert hp.spread(4, 15) == [4, 8, 12, 15] and hp.spread(3, 15) == [5, 10, 15] and hp.spread(1, 7) == [7]
    assert hp.spread(20, 10) == list(range(1, 11)) and hp.spread(0, 10) == [] and hp.spread(5, 0) == []
    assert hp.planned_total_steps(24, 5, 3) == 15 and hp.planned_total_steps(17, 17, 2) == 2
    assert hp.planned_total_steps(18, 17, 2) == 4


def test_no_trainer_and_unknown_hardware_are_guesses_that_say_so():
    from tuneforge.job_scheduler import plan

    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    fresh = plan.Worker("w1", "mps:Apple", now - dt.timedelta(seconds=100), 60)
    stale = plan.Worker("w2", "cuda:X", now - dt.timedelta(seconds=181), 60)
    (e,) = plan.wall_time_estimates(1_000_000, "m", 1_000_000_000, [fresh, stale], [], now)
    assert (e.device_class, e.guess, e.workers) == ("mps:Apple", True, 1)
    assert e.tokens_per_second == pytest.approx(5e10 / 6e9)  # an unknown kind: the cpu assumption, said
    assert "for a cpu device" in e.basis
    measured = [plan.Measurement("m", "mps:Apple", r) for r in (10.0, 30.0)]
    (e,) = plan.wall_time_estimates(1_000_000, "m", 1_000_000_000, [fresh], measured, now)
    assert (e.guess, e.tokens_per_second, e.seconds) == (False, 20.0, 50_000.0)
    assert e.basis == "median of 2 measured runs of m on mps:Apple"


def test_measured_tokens_are_in_the_plans_unit():
    """A run's trained_tokens is the builder's train_tokens per epoch × the epochs this attempt
    ran (a resumed attempt counts from where it resumed), so measured tokens/s turn a plan's
    total_training_tokens into seconds; without the builder's count, the method's own."""
    import types

    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.trainer.worker import dataset_tokens_trained

    request = ev.TrainingRunRequested()
    request.dataset.train_tokens.total = 1000
    request.dataset.train_count = 20
    request.hyperparameters.batch_size = 8  # 3 steps per epoch
    result = types.SimpleNamespace(epochs=2.0, trained_tokens=7777)
    assert dataset_tokens_trained(request, result, 0) == 2000
    assert dataset_tokens_trained(request, result, 3) == 1000  # resumed after epoch 1
    assert dataset_tokens_trained(request, types.SimpleNamespace(epochs=1.5, trained_tokens=1), 0) == 1500
    request.dataset.train_tokens.total = 0  # no tokenizer when the dataset was built
    assert dataset_tokens_trained(request, result, 0) == 7777
