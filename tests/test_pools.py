"""Trainer pools (issue 11 item 5, routing): the memory estimate and the pool of every catalog
entry, the pools a worker's hardware holds, TUNEFORGE_TRAINER_POOLS, the pool subjects, the
drain of work queued before pools, and — with real NATS, real services and two real trainer
workers — a 70B job that waits in QUEUED (with the reason) until a worker of its pool registers,
while a small job is trained by the small worker meanwhile."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pydantic
import pytest

from conftest import ADMIN
from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core import pools, subjects
from tuneforge.core.bus import Bus
from tuneforge.core.nats_server import NatsServerProcess
from tuneforge.core.settings import SERVICES, Settings
from tuneforge.plugins import get_registry
from tuneforge.stack import load_service_class

GIB = 1024 ** 3
BIG = "llama-3.3-70b"  # its stand-in without the stand-in marker: sized as the real 70B
SMALL_JOB_MODEL = "llama-3.1-70b"  # the same stand-in, marked: sized by its real (tiny) size


def spec(model_id: str):
    return get_registry().base_model(model_id)


# --- the estimate and the catalog --------------------------------------------------------------------

def test_every_catalog_entry_goes_to_a_pool_that_holds_it():
    """From the catalog alone (no model store): 70B/72B need several 80 GB GPUs, 7-14B one GPU,
    SmolLM2 any worker; each pool is the smallest whose capacity holds the estimate."""
    got = {s.id: pools.pool_for(s) for s in get_registry().base_models.values()}
    for model_id, sizing in got.items():
        assert sizing.need_gib <= sizing.pool.capacity_gib, model_id
        smaller = [p for p in pools.POOLS if p.capacity_gib < sizing.pool.capacity_gib]
        assert all(sizing.need_gib > p.capacity_gib for p in smaller), model_id
    for big in ("llama-3.1-70b", "llama-3.3-70b", "deepseek-r1-distill-llama-70b", "qwen-2.5-72b"):
        assert got[big].pool.name == "gpu-4x80g" and got[big].pool.processes == 4, (big, got[big].basis)
        assert 140 < got[big].need_gib < 200  # 131 GiB of bf16 weights alone
    for one_gpu in ("llama-3.1-8b", "qwen-2.5-14b", "deepseek-r1-distill-qwen-14b"):
        assert got[one_gpu].pool.gpus == 1 and got[one_gpu].pool.processes == 1, (one_gpu, got[one_gpu].basis)
    assert got["smollm2-135m"].pool.name == "small"
    assert got["llama-3.2-3b"].pool.name == "gpu-24g"
    assert "70,553,706,496 parameters (catalog)" in got["llama-3.3-70b"].basis


def test_4bit_qlora_needs_a_smaller_pool():
    bf16 = pools.pool_for(spec("llama-3.3-70b"))
    qlora = pools.pool_for(spec("llama-3.3-70b"), method_options_json='{"quantization": "4bit"}')
    assert (bf16.pool.name, qlora.pool.name) == ("gpu-4x80g", "gpu-80g")
    assert qlora.need_gib < bf16.need_gib / 2 and "4-bit QLoRA" in qlora.basis
    # Embeddings and LM head stay bf16: 2 × 128,256 × 8,192 of the parameters at 2 bytes.
    size = qlora.size
    embedding = size.vocab_size * size.hidden_size * 2
    assert qlora.estimate.weights == pytest.approx((size.parameters - embedding) * 0.5625 + embedding * 2)
    assert pools.quantization_of('{"quantization": "none"}') == "none" == pools.quantization_of("not json")


def test_the_estimate_by_hand():
    size = pools.ModelSize(parameters=1_000_000_000, hidden_size=2048, layers=16, vocab_size=32_000,
                           intermediate_size=8192, tied_embeddings=True, source="test", dims_source="test")
    tokens = 4096
    e = pools.estimate_training_memory(size, tokens=tokens, lora_rank=8, lora_modules=("q_proj", "v_proj", "up_proj"))
    assert e.weights == 2e9
    assert e.adapter == 16 * 16 * 8 * (2 * 2048 + 2 * 2048 + (2048 + 8192))  # layers × rank × (in+out)
    assert e.activations == tokens * 2048 * (2 * 16 + 34)
    assert e.logits == tokens * 32_000 * 6
    assert e.total == pytest.approx(1.1 * (e.weights + e.adapter + e.activations + e.logits))
    # Tokens of a forward: batch × 95th percentile, at least the longest example, capped at 16,384.
    assert pools.tokens_per_forward(8, p95_tokens=100, longest_tokens=300) == (800, False)
    assert pools.tokens_per_forward(8, p95_tokens=3000, longest_tokens=9000) == (16384, False)
    assert pools.tokens_per_forward(8, p95_tokens=3000, longest_tokens=20000) == (20000, False)
    assert pools.tokens_per_forward(8, longest_tokens=20000, p95_tokens=20000, context_length=8192) == (16384, False)
    assert pools.tokens_per_forward(8) == (8 * 1024, True)
    assert pools.tokens_per_forward(8, p95_tokens=100, longest_tokens=300, sequences_per_example=2) == (1600, False)
    # A dataset of long examples moves a 1B model up a pool; its token counts are in the basis.
    long = common_pb2.DatasetSummary(train_tokens=common_pb2.TokenStats(p95=6000, max=8000))
    short = common_pb2.DatasetSummary(train_tokens=common_pb2.TokenStats(p95=40, max=60))
    assert pools.pool_for(spec("llama-3.2-1b"), dataset=short).pool.name == "small"
    sized = pools.pool_for(spec("llama-3.2-1b"), dataset=long)
    assert sized.pool.name == "gpu-24g" and "longest example 8,000 tokens" in sized.basis


def test_a_standin_is_sized_by_its_own_files_and_a_real_model_by_the_catalog(tmp_path):
    """A stand-in in the store is tiny (small); the same folder without the marker counts as the
    real model (its catalog size), with its config.json's dimensions."""
    folder = tmp_path / BIG
    folder.mkdir()
    config = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 3000, "intermediate_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({"a": {"dtype": "F32", "shape": [3000, 64], "data_offsets": [0, 768000]},
                         "b": {"dtype": "F32", "shape": [64], "data_offsets": [768000, 768256]},
                         "__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 768256)
    (folder / pools.STANDIN_MARKER).write_text("{}")
    standin = pools.pool_for(spec(BIG), model_store=tmp_path)
    assert standin.pool.name == "small" and standin.size.parameters == 3000 * 64 + 64
    assert "stand-in in the model store" in standin.basis
    (folder / pools.STANDIN_MARKER).unlink()
    real = pools.pool_for(spec(BIG), model_store=tmp_path)
    assert real.pool.name == "gpu-4x80g" and real.size.parameters == spec(BIG).parameter_count
    assert real.size.vocab_size == 3000 and "(config.json)" in real.basis


# --- workers' pools -------------------------------------------------------------------------------

@pytest.mark.parametrize(("count", "memory", "expected"), [
    (0, 0, ["small"]),  # a CPU worker
    (1, 0, ["small"]),  # memory unknown
    (1, 24 * GIB, ["small", "gpu-24g"]),  # RTX 4090
    (1, 23_028 * 1024 ** 2, ["small", "gpu-24g"]),  # an A10G ("24 GB") reports 22.5 GiB
    (2, 40 * GIB, ["small", "gpu-24g"]),  # A100 40 GB: not an 80 GB pool
    (1, 85_097_971_712, ["small", "gpu-24g", "gpu-80g"]),  # A100 80 GB reports 79.25 GiB
    (3, 81_559 * 1024 ** 2, ["small", "gpu-24g", "gpu-80g"]),  # three H100s: not four
    (4, 81_559 * 1024 ** 2, ["small", "gpu-24g", "gpu-80g", "gpu-4x80g"]),
    (8, 150_000_000_000, ["small", "gpu-24g", "gpu-80g", "gpu-4x80g", "gpu-8x80g"]),  # 8 × H200
])
def test_pools_for_hardware(count, memory, expected):
    assert pools.pools_for_hardware(count, memory) == expected


def test_trainer_pools_setting(monkeypatch):
    assert pools.parse_pool_list(" gpu-80g, small,gpu-80g ") == ["gpu-80g", "small"]
    with pytest.raises(ValueError, match=r"unknown pool\(s\) 'gpu-100g'.*the pools are small, gpu-24g, gpu-80g"):
        pools.parse_pool_list("small,gpu-100g")
    with pytest.raises(ValueError, match="names no pool"):
        pools.parse_pool_list(" , ")
    monkeypatch.setenv("TUNEFORGE_TRAINER_POOLS", "gpu-4x80g , small")
    assert Settings().trainer_pools == "gpu-4x80g,small"
    assert pools.worker_pools(Settings().trainer_pools, 0, 0) == ["gpu-4x80g", "small"]  # overrides the CPU
    monkeypatch.setenv("TUNEFORGE_TRAINER_POOLS", "big")
    with pytest.raises(pydantic.ValidationError, match="unknown pool"):
        Settings()
    monkeypatch.delenv("TUNEFORGE_TRAINER_POOLS")
    assert Settings().trainer_pools is None and pools.worker_pools(None, 0, 0) == ["small"]
    assert pools.largest_first(["small", "gpu-8x80g", "gpu-24g"]) == ["gpu-8x80g", "gpu-24g", "small"]


def test_pool_subjects():
    subject = pools.work_subject("gpu-4x80g")
    assert subject == "tuneforge.training.run.requested.gpu-4x80g"
    assert subjects.message_type(subject) is ev.TrainingRunRequested
    assert subjects.message_type(subjects.TRAINING_RUN_REQUESTED) is ev.TrainingRunRequested  # the old subject
    assert subjects.message_type(subject + ".x") is None and subjects.message_type("tuneforge.nope") is None
    assert subjects.pool_of(subject) == "gpu-4x80g" and subjects.pool_of(subjects.TRAINING_RUN_REQUESTED) == ""
    with pytest.raises(ValueError, match="unknown trainer pool"):
        pools.work_subject("gpu-1g")
    assert subjects.TRAINING_RUN_REQUESTED in subjects.WORK_SUBJECTS
    assert subjects.TRAINING_RUN_REQUESTED not in subjects.EVENT_SUBJECTS


async def test_work_queued_before_pools_is_drained(tmp_path):
    """Items on the bare subject (the release before pools) are found, their consumer is made
    for them, and once they are taken the workers stop looking there."""
    from tuneforge.trainer import worker as w

    nats = NatsServerProcess(tmp_path / "nats").start()
    bus = await Bus.connect(nats.url, "test")
    try:
        assert not await w.legacy_work_pending(bus.js, 5.0)
        with pytest.raises(Exception):  # a new deployment never gets the legacy consumer
            await bus.js.consumer_info(subjects.WORK_STREAM, w.LEGACY_WORK_CONSUMER)
        old = ev.TrainingRunRequested(meta=bus.meta("ws", "job_old"), base_model="smollm2-135m", method="sft")
        await bus.publish(subjects.TRAINING_RUN_REQUESTED, old)
        new = ev.TrainingRunRequested(meta=bus.meta("ws", "job_new"), base_model="smollm2-135m", pool="small")
        await bus.publish(pools.work_subject("small"), new)
        assert await w.legacy_work_pending(bus.js, 5.0)
        psub = await bus.js.pull_subscribe_bind(durable=w.LEGACY_WORK_CONSUMER, stream=subjects.WORK_STREAM)
        msgs = await psub.fetch(1, timeout=2)
        assert [ev.TrainingRunRequested.FromString(m.data).meta.job_id for m in msgs] == ["job_old"]
        assert await w.legacy_work_pending(bus.js, 5.0)  # taken, not yet acknowledged
        await msgs[0].ack()
        await asyncio.sleep(0.2)
        assert not await w.legacy_work_pending(bus.js, 5.0)
        await psub.unsubscribe()
        # The pool's item stays for its pool's consumer.
        await w.ensure_work_consumer(bus.js, w.work_consumer_config(5.0, "small"))
        info = await bus.js.consumer_info(subjects.WORK_STREAM, w.work_consumer_name("small"))
        assert info.num_pending == 1 and info.config.filter_subject == pools.work_subject("small")
    finally:
        await bus.close()
        nats.stop()


# --- the must-show: a 70B job waits for its pool ----------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One llama stand-in, twice: as the 70B without its marker (sized as the real model) and as
    another 70B entry with it (a stand-in: small)."""
    from tuneforge.trainer.standin import STANDIN_MARKER, make_standin

    root = tmp_path_factory.mktemp("models")
    made = make_standin(spec(BIG), root)
    shutil.copytree(made, root / SMALL_JOB_MODEL)
    (made / STANDIN_MARKER).unlink()
    return root


def _conversations(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                              {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]}) + "\n")
    return path


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_a_70b_job_waits_for_a_worker_of_its_pool(tmp_path, store, one_torch_thread):
    from tuneforge.core.client import Clients
    from tuneforge.quickstart import create_workspace

    nats = NatsServerProcess(tmp_path / "nats").start()

    def settings_for(**extra) -> Settings:
        return Settings(data_dir=tmp_path / "state", nats_url=nats.url, admin_token=ADMIN, model_store=store,
                        training_heartbeat_seconds=1, **{f"{s.replace('-', '_')}_port": 0 for s in SERVICES}, **extra)

    settings = settings_for()
    started, endpoints, clients = [], {}, None

    async def start(name: str, service_settings: Settings):
        service = load_service_class(name)(service_settings)
        port = await service.start(port=0)
        started.append(service)
        return service, f"127.0.0.1:{port}"

    try:
        for name in SERVICES:
            if name == "trainer":
                continue
            _, endpoints[name] = await start(name, settings)
            setattr(settings, f"{name.replace('-', '_')}_port", int(endpoints[name].rsplit(":", 1)[1]))
        small_trainer, endpoints["trainer"] = await start(
            "trainer", settings_for(trainer_pools="small", worker_id="small-worker"))
        reply = await create_workspace(endpoints, ADMIN, common_pb2.PLAN_ENTERPRISE, "owner@example.com", "W")
        clients = Clients.connect(endpoints, reply.api_key)
        await sdk.wait_until_authorised(clients)
        await sdk.import_file(clients, _conversations(tmp_path / "data.jsonl", 40))
        hyper = common_pb2.Hyperparameters(min_examples=20, max_epochs=1, n_evals=1, batch_size=8)
        big_spec = js.JobSpec(name="big", base_model=BIG, method="sft", hyperparameters=hyper)
        small_spec = js.JobSpec(name="small", base_model=SMALL_JOB_MODEL, method="sft", hyperparameters=hyper)

        async def job(job_id):
            return (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job_id))).job

        # The small worker is registered (its first announcement reached the scheduler).
        async def small_registered():
            plan = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=small_spec))
            return plan if plan.pool_plan.workers_registered == 1 else None
        small_plan = await _until(small_registered, 30, "the small worker to register")
        assert small_plan.pool_plan.pool == "small" and small_plan.pool_plan.processes == 1

        # ValidateJob: the 70B needs gpu-4x80g, and no worker of it is registered.
        big_plan = (await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=big_spec))).pool_plan
        assert (big_plan.pool, big_plan.processes, big_plan.workers_registered) == ("gpu-4x80g", 4, 0)
        assert big_plan.required_memory_gib > 130 and "70,553,706,496 parameters (catalog)" in big_plan.basis
        assert big_plan.description == "4 GPUs with at least 80 GB each (FSDP)"

        big_id = (await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=big_spec))).job.id

        async def queued_with_reason():
            j = await job(big_id)
            return j if j.state == js.JOB_STATE_QUEUED and j.state_reason else None
        waiting = await _until(queued_with_reason, 30, "the 70B job to be QUEUED with a reason")
        assert waiting.pool == "gpu-4x80g"
        assert waiting.state_reason == ("waiting for a trainer of pool gpu-4x80g (4 GPUs with at least 80 GB each "
                                        "(FSDP)): no worker of that pool is registered")
        # Its work item is on its pool's subject, routed there.
        item = await small_trainer.bus.js.get_last_msg(subjects.WORK_STREAM, pools.work_subject("gpu-4x80g"))
        assert ev.TrainingRunRequested.FromString(item.data).pool == "gpu-4x80g"

        # Meanwhile a small job is trained by the small worker; the 70B job is not touched.
        small_id = (await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=small_spec))).job.id
        waited_from = time.monotonic()

        async def small_done():
            j = await job(small_id)
            return j if j.state in (js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED) else None
        small_job = await _until(small_done, 120, "the small job to finish")
        assert small_job.state == js.JOB_STATE_SUCCEEDED, small_job.failure_reason
        assert small_job.pool == "small" and small_job.state_reason == ""
        small_events: list = []
        await sdk.watch_job(clients, small_id, small_events.append, timeout=10)
        assert any("training on small-worker" in e.message for e in small_events), [e.message for e in small_events]
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - waited_from)))  # several seconds, at least
        still = await job(big_id)
        assert still.state == js.JOB_STATE_QUEUED and still.attempt == 0 and still.state_reason == waiting.state_reason
        assert small_trainer.worker.status.runs_completed == 1

        # A worker of the pool registers: the reason goes, the job trains there (a stand-in: on CPU).
        await start("trainer", settings_for(trainer_pools="gpu-4x80g", worker_id="big-worker"))

        async def big_done():
            j = await job(big_id)
            return j if j.state in (js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED) else None
        big_job = await _until(big_done, 120, "the 70B job to finish")
        assert big_job.state == js.JOB_STATE_SUCCEEDED, big_job.failure_reason
        assert big_job.pool == "gpu-4x80g" and big_job.state_reason == ""
        events: list = []
        await sdk.watch_job(clients, big_id, events.append, timeout=10)
        messages = [e.message for e in events]
        registered = next(i for i, m in enumerate(messages) if m == "a trainer of pool gpu-4x80g is registered (big-worker)")
        training = next(i for i, m in enumerate(messages) if "training on big-worker" in m)
        assert messages.index(waiting.state_reason) < registered < training, messages
        assert not any("small-worker" in m for m in messages), messages
        assert (await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=big_spec))).pool_plan.workers_registered == 1
    finally:
        if clients is not None:
            await clients.close()
        for service in reversed(started):
            await service.stop(grace=0.5)
        nats.stop()


async def test_a_queued_job_gets_its_reason_back_when_its_pools_last_worker_goes_silent(tmp_path):
    """Announcements only say that a worker is there: when the last worker of a pool stops
    announcing (``plan.LIVE_PERIODS`` periods), the job-scheduler's sweep marks the jobs queued for
    that pool as waiting again, with a job event; a pool that still has a live worker is left alone;
    a second sweep changes nothing. Real NATS, the real job-scheduler and its SQLite database."""
    import datetime as dt

    from sqlalchemy import select

    from tuneforge.core.db import utcnow
    from tuneforge.job_scheduler.models import JobEventRow, JobRow, TrainerWorkerRow

    nats = NatsServerProcess(tmp_path / "nats").start()
    service = load_service_class("job-scheduler")(Settings(
        data_dir=tmp_path / "state", nats_url=nats.url, admin_token=ADMIN, job_scheduler_port=0))
    try:
        await service.start(port=0)
        now = utcnow()
        async with service.db.session() as session, session.begin():
            session.add_all([
                TrainerWorkerRow(worker_id="big-gone", device_class="cuda:H100", device_count=4, period_seconds=10,
                                 pools="gpu-4x80g", last_seen_at=now - dt.timedelta(seconds=31)),
                TrainerWorkerRow(worker_id="one-gpu", device_class="cuda:H100", device_count=1, period_seconds=10,
                                 pools="small,gpu-24g,gpu-80g", last_seen_at=now - dt.timedelta(seconds=5)),
            ])
            for job_id, pool in (("job-big", "gpu-4x80g"), ("job-one", "gpu-80g"), ("job-legacy", "legacy")):
                session.add(JobRow(id=job_id, workspace_id="ws", name=job_id, spec=b"", resolved_hyperparameters=b"",
                                   state=js.JOB_STATE_QUEUED, notify_email="a@example.com", pool=pool))
        assert await service.sweep_waiting_pools(utcnow()) == ["job-big"]
        assert await service.sweep_waiting_pools(utcnow()) == []  # once
        async with service.db.session() as session:
            reasons = {j.id: j.state_reason for j in (await session.execute(select(JobRow))).scalars()}
            events = [(e.job_id, e.message) for e in (await session.execute(select(JobEventRow))).scalars()]
        assert reasons == {"job-big": pools.waiting_reason("gpu-4x80g"), "job-one": "", "job-legacy": ""}
        assert events == [("job-big", pools.waiting_reason("gpu-4x80g"))]
        # The worker announces itself again: the reason goes (the path the end-to-end test takes).
        seen = ev.TrainerWorkerSeen(meta=service.bus.meta(""), worker_id="big-gone", device_class="cuda:H100",
                                    device_count=4, period_seconds=10, pools=["gpu-4x80g"])
        await service.on_worker_seen(seen)
        async with service.db.session() as session:
            assert (await session.get(JobRow, "job-big")).state_reason == ""
    finally:
        await service.stop(grace=0.5)
        nats.stop()


def test_the_cli_shows_the_pool_and_why_a_job_waits(capsys):
    from tuneforge.cli.jobs import job_summary, print_plan

    sizing = pools.pool_for(spec(BIG))
    reply = js.ValidateJobResponse(pool_plan=js.PoolPlan(
        pool="gpu-4x80g", description=sizing.pool.description, required_memory_gib=sizing.need_gib,
        processes=4, basis=sizing.basis, workers_registered=0))
    print_plan("big", BIG, "sft", reply)
    out = capsys.readouterr().out
    assert "gpu-4x80g: 4 GPUs with at least 80 GB each (FSDP), 4 processes" in out
    assert f"~{sizing.need_gib:,.1f} GiB — 70,553,706,496 parameters (catalog)" in out
    assert "warning: no worker of this pool (gpu-4x80g) is registered: the job will wait in QUEUED" in out
    reply.pool_plan.workers_registered = 2
    print_plan("big", BIG, "sft", reply)
    out = capsys.readouterr().out
    assert "workers registered" in out and "warning: no worker" not in out
    job = js.Job(id="job_1", spec=js.JobSpec(name="big", base_model=BIG, method="sft"), state=js.JOB_STATE_QUEUED,
                 pool="gpu-4x80g", state_reason=pools.waiting_reason("gpu-4x80g"))
    text = "\n".join(job_summary(job))
    assert "trainer pool  gpu-4x80g" in text and "state reason  waiting for a trainer of pool gpu-4x80g" in text
    assert "state reason" not in "\n".join(job_summary(js.Job(id="job_2", state=js.JOB_STATE_TRAINING, pool="small")))
