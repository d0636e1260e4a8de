"""The trainer worker running a job as several processes (TUNEFORGE_TRAINER_PROCESSES=2: DDP over
gloo on CPU, tuneforge_builtin.distributed launched by trainer/worker.py) — and the QLoRA option's
checks.

1. Through the real stack (five services in-process, real NATS/gRPC/SQLite; conftest ``services``):
   a 2-process SFT job SUCCEEDS with an intermediate checkpoint (n_checkpoints 2: the checkpoint at
   step 2 carries both ranks' RNG states and its completion marker), and the same job trained in
   one process (the worker's in-process path) gives the same adapter format (files, tensor names,
   shapes, dtypes) and the same per-step losses. Then a redelivered attempt resumes from that
   checkpoint through the launched path and ends like the straight run.
2. A worker with a recording bus (no NATS: only the worker's decisions): a rank that crashes
   (TUNEFORGE_TEST_CRASH_RANK) fails the run with the log's tail in the reason, in seconds, not a
   hang; a cancel stops both ranks after the current step and keeps the adapter; a batch that
   does not divide over the processes, and quantization=4bit on a worker without CUDA, fail as
   the user's error before anything is launched.

Tolerance: both runs are fp32 over the same examples per step; they differ in summation order only
(two partial token-loss sums and a gloo all-reduce). tests/test_distributed.py measured relative
differences of at most 1.5e-7 per step and adapter weights 9.2e-6 apart; RTOL 1e-4 and 1e-4 × the
largest weight leave room for thread counts that differ between the two runs, and still fail on a
loss normalised per rank (0.5×) or a batch per rank instead of per step (half the steps).
Time (2 busy cores): about 100 s for the module.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import types
from pathlib import Path

import pytest
from test_sft_training import CATALOG_ID, make_conversations

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core import subjects
from tuneforge.core.storage import ArtifactStore
from tuneforge.trainer import worker as w
from conftest import WorkMsg

pytestmark = pytest.mark.integration

PROCESSES = 2
RTOL = 1e-4
# The quickstart examples' billing topic: 125 examples -> 113 train / 12 test; batch 32 -> 4 steps
# (16 examples a rank; the last step 17: 9 and 8); a checkpoint at step 2; evaluations at 2 and 4.
# No LoRA dropout: each rank draws its own dropout masks, so with dropout a data-parallel run is a
# different (equally valid) random draw from the one-process run, not the same numbers.
STACK_HYPERPARAMETERS = common_pb2.Hyperparameters(
    max_epochs=1, batch_size=32, n_evals=2, n_checkpoints=2, min_examples=50, early_stopping_patience=0,
    lora_rank=4, learning_rate=1e-2, lora_dropout=0.0)


@pytest.fixture(autouse=True)
def _two_processes(monkeypatch):
    """Set before the services start: the trainer's settings read it."""
    monkeypatch.setenv("TUNEFORGE_TRAINER_PROCESSES", str(PROCESSES))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """The one-process runs train in this process: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def standin_store(tmp_path_factory) -> Path:
    """Stand-ins of the quickstart's base model (the stack's jobs: its data calls tools) and of
    the Llama 3.2 1B entry (the worker-only tests)."""
    from tuneforge.plugins import get_registry
    from tuneforge.quickstart import BASE_MODEL
    from tuneforge.trainer.standin import make_standin

    store = tmp_path_factory.mktemp("models")
    for model in (BASE_MODEL, CATALOG_ID):
        make_standin(get_registry().base_model(model), store, seed=0)
    return store


def _history(store: ArtifactStore, report_path: str) -> dict[int, dict]:
    report = json.loads(store.get_bytes(f"{report_path}/report.json"))
    return {p["step"]: p for p in report["history"]}


def _adapter(store: ArtifactStore, prefix: str, into: Path) -> tuple[set[str], dict]:
    from safetensors.torch import load_file

    store.get_dir(prefix, into)
    return {p.name for p in into.iterdir()}, load_file(str(into / "adapter_model.safetensors"))


def _close_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert float((x - y).abs().max()) <= 1e-4 * max(1.0, float(x.abs().max())), name


# ---------------------------------------------------------------------------------------------
# 1. The real stack.


async def test_a_two_process_job_trains_like_one_process_and_resumes(services, standin_store, tmp_path):
    import shutil

    from conftest import ADMIN

    from tuneforge.quickstart import BASE_MODEL, run_job

    endpoints, settings = services
    worker = services.apps["trainer"].worker
    assert worker.settings.trainer_processes == PROCESSES  # from TUNEFORGE_TRAINER_PROCESSES
    shutil.copytree(standin_store / BASE_MODEL, settings.resolved_model_store() / BASE_MODEL)
    store = ArtifactStore(settings.resolved_artifact_url())

    two = await run_job(endpoints, ADMIN, topics=["billing"], job_name="two-processes",
                        hyperparameters=STACK_HYPERPARAMETERS, base_model=BASE_MODEL)
    assert two.job.state == js.JOB_STATE_SUCCEEDED, two.job.failure_reason
    worker.settings.trainer_processes = 1  # the same job, trained in the worker's own process
    one = await run_job(endpoints, ADMIN, topics=["billing"], job_name="one-process",
                        hyperparameters=STACK_HYPERPARAMETERS, base_model=BASE_MODEL)
    worker.settings.trainer_processes = PROCESSES
    assert one.job.state == js.JOB_STATE_SUCCEEDED, one.job.failure_reason
    assert two.job.dataset.content_hash == one.job.dataset.content_hash
    assert two.job.metrics.steps == one.job.metrics.steps == 4

    # The intermediate checkpoint of the 2-process run: uploaded once, complete, both ranks' RNG.
    (checkpoint,) = w.complete_checkpoints(store, two.workspace_id, two.job.id)
    assert (checkpoint.attempt, checkpoint.step) == (1, 2)
    marker = json.loads(store.get_bytes(f"{checkpoint.key}/{w.CHECKPOINT_MARKER}"))
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "adapter_model.safetensors",
            "optimizer.pt"} <= set(marker["files"])

    # Same losses, step by step (train and eval), and the same evaluation against the base model.
    h2 = _history(store, two.job.report_path)
    h1 = _history(store, one.job.report_path)
    assert sorted(h2) == sorted(h1) == [1, 2, 3, 4]
    for step in h1:
        for key in ("train_loss", "eval_loss"):
            a, b = h1[step][key], h2[step][key]
            assert (a is None) == (b is None), (step, key)
            assert a is None or math.isclose(a, b, rel_tol=RTOL), (step, key, a, b)
    assert h2[4]["train_loss"] < h2[1]["train_loss"] - 0.1  # it learned: not two untouched runs agreeing
    m1, m2 = one.job.metrics, two.job.metrics
    assert math.isclose(m1.eval_loss, m2.eval_loss, rel_tol=RTOL)
    assert m2.HasField("base_eval_loss") and math.isclose(m1.base_eval_loss, m2.base_eval_loss, rel_tol=RTOL)
    assert len(m2.samples) == len(m1.samples) > 0  # greedy samples from rank 0

    # Same adapter format: the files, the tensors' names, shapes and dtypes; weights within 1e-4.
    files2, weights2 = _adapter(store, two.model.adapter_path, tmp_path / "two")
    files1, weights1 = _adapter(store, one.model.adapter_path, tmp_path / "one")
    assert files2 == files1 and {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files2
    _close_weights(weights1, weights2)

    # A redelivered attempt (its worker died after the step-2 checkpoint) resumes through the
    # launched path and ends like the straight run.
    job_id = "job-resumed"
    prefix = w.checkpoint_key(two.workspace_id, job_id, 1, 2)
    for key in store.list(checkpoint.key):
        store.put_bytes(prefix + key[len(checkpoint.key):], store.get_bytes(key))
    store.put_bytes(f"{w.attempt_prefix(two.workspace_id, job_id, 1)}/{w.ATTEMPT_MARKER}", b"{}")
    bus = _RecordingBus()
    resumer = w.TrainingWorker(settings, bus)
    request = ev.TrainingRunRequested(
        meta=ev.EventMeta(event_id="r", workspace_id=two.workspace_id, job_id=job_id), base_model=BASE_MODEL,
        method="sft", hyperparameters=STACK_HYPERPARAMETERS, dataset=two.job.dataset, pool="small")
    await resumer.handle(WorkMsg(request, delivered=2))
    started = [m.resumed_from_step for s, m in bus.published if s == subjects.TRAINING_RUN_STARTED]
    assert started == [2]
    (succeeded,) = [m for s, m in bus.published if s == subjects.TRAINING_RUN_SUCCEEDED]
    assert succeeded.attempt == 2 and succeeded.metrics.steps == 4
    resumed = _history(store, succeeded.report_path)
    for step in (3, 4):
        assert math.isclose(resumed[step]["train_loss"], h2[step]["train_loss"], rel_tol=RTOL), step
    _close_weights(weights2, _adapter(store, succeeded.adapter_path, tmp_path / "resumed")[1])


# ---------------------------------------------------------------------------------------------
# 2. The worker alone, with a recording bus.


class _RecordingBus:
    def __init__(self, on_publish=None):
        self.published: list[tuple[str, object]] = []
        self.on_publish = on_publish

    def meta(self, workspace_id, job_id=""):
        return ev.EventMeta(event_id=f"e{len(self.published)}", workspace_id=workspace_id, job_id=job_id)

    async def publish(self, subject, message, **_):
        self.published.append((subject, message))
        if self.on_publish is not None:
            await self.on_publish(subject, message)

    def outcome(self) -> tuple[str, object]:
        (out,) = [(s, m) for s, m in self.published if s in (
            subjects.TRAINING_RUN_SUCCEEDED, subjects.TRAINING_RUN_FAILED, subjects.TRAINING_RUN_CANCELLED)]
        return out


WS = "ws-distributed"


def _worker(tmp_path: Path, standin_store: Path, bus: _RecordingBus, train: int, test: int):
    from tuneforge.core.settings import Settings

    settings = Settings(data_dir=tmp_path / "state", model_store=standin_store, worker_id="w-dist",
                        trainer_processes=PROCESSES)
    worker = w.TrainingWorker(settings, bus)
    rows = make_conversations(train + test, seed=1)
    for name, part in (("train", rows[:train]), ("test", rows[train:])):
        worker.store.put_bytes(f"datasets/{WS}/ds/{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part).encode())
    return worker


def _request(job_id: str, train: int, options: dict | None = None, **hyperparameters) -> ev.TrainingRunRequested:
    values = dict(max_epochs=1, batch_size=8, n_evals=0, n_checkpoints=1, learning_rate=1e-2, lora_rank=4)
    values.update(hyperparameters)
    return ev.TrainingRunRequested(
        meta=ev.EventMeta(event_id=f"r-{job_id}", workspace_id=WS, job_id=job_id), base_model=CATALOG_ID,
        method="sft", method_options_json=json.dumps(options or {}), pool="small",
        hyperparameters=common_pb2.Hyperparameters(**values),
        dataset=common_pb2.DatasetSummary(artifact_path=f"datasets/{WS}/ds", train_count=train))


async def test_a_crashed_rank_fails_the_run_with_the_log_not_a_hang(tmp_path, standin_store, monkeypatch):
    from tuneforge_builtin import distributed

    monkeypatch.setenv(distributed.TEST_CRASH_RANK_ENV, "1:1")  # rank 1 dies at its first step end
    bus = _RecordingBus()
    worker = _worker(tmp_path, standin_store, bus, train=32, test=8)
    started = time.monotonic()
    msg = WorkMsg(_request("job-crash", 32))
    await asyncio.wait_for(worker.handle(msg), timeout=180)
    elapsed = time.monotonic() - started
    subject, failed = bus.outcome()
    assert subject == subjects.TRAINING_RUN_FAILED and msg.acks == 1
    assert failed.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
    assert f"{PROCESSES} training processes failed (exit code" in failed.reason, failed.reason
    assert f"rank 1 exited with code {distributed.TEST_CRASH_EXIT_CODE} first" in failed.reason, failed.reason
    assert "last lines:" in failed.reason and len(failed.reason) < 4000
    key = f"{w.attempt_prefix(WS, 'job-crash', 1)}/logs/{w.LAUNCH_LOG}"
    assert f"test-only {distributed.TEST_CRASH_RANK_ENV}: rank 1 exits" in worker.store.get_bytes(key).decode()
    assert elapsed < 120, elapsed  # torchrun ends the surviving rank; nothing waits for a timeout


async def test_a_cancel_stops_both_ranks_after_the_step_and_keeps_the_adapter(tmp_path, standin_store):
    job_id = "job-cancel"
    worker = None

    async def cancel_on_first_progress(subject, message):
        if subject == subjects.TRAINING_RUN_PROGRESS and not worker._is_cancelled(job_id):
            request = ev.TrainingRunCancelRequested(meta=ev.EventMeta(event_id="c", workspace_id=WS, job_id=job_id))
            await worker._on_cancel(types.SimpleNamespace(data=request.SerializeToString()))

    bus = _RecordingBus(cancel_on_first_progress)
    worker = _worker(tmp_path, standin_store, bus, train=64, test=8)
    await asyncio.wait_for(worker.handle(WorkMsg(_request(job_id, 64, max_epochs=4))), timeout=180)
    subject, cancelled = bus.outcome()
    assert subject == subjects.TRAINING_RUN_CANCELLED, cancelled
    assert 1 <= cancelled.step < 32  # 64 examples × 4 epochs / batch 8 planned; stopped early
    assert f"{cancelled.adapter_path}/adapter_model.safetensors" in worker.store.list(cancelled.adapter_path)


async def test_what_cannot_train_as_processes_fails_as_the_users_error(tmp_path, standin_store):
    bus = _RecordingBus()
    worker = _worker(tmp_path, standin_store, bus, train=16, test=0)
    await worker.handle(WorkMsg(_request("job-odd-batch", 16, batch_size=7)))
    subject, failed = bus.outcome()
    assert subject == subjects.TRAINING_RUN_FAILED and failed.failure_kind == common_pb2.FAILURE_KIND_USER
    assert failed.reason == ("batch_size 7 does not divide over the 2 training processes of this worker: "
                             "choose a multiple of 2")

    bus.published.clear()
    await worker.handle(WorkMsg(_request("job-qlora", 16, options={"quantization": "4bit"})))
    subject, failed = bus.outcome()
    assert subject == subjects.TRAINING_RUN_FAILED and failed.failure_kind == common_pb2.FAILURE_KIND_USER
    assert "quantization=4bit (QLoRA) needs a CUDA GPU" in failed.reason, failed.reason
    assert not (tmp_path / "state" / "trainer-work" / "job-qlora" / "attempt-1" / w.LAUNCH_DIRNAME).exists()


# ---------------------------------------------------------------------------------------------
# Pure decisions.


def test_how_many_processes_and_how():
    def request(pool: str = "small") -> ev.TrainingRunRequested:
        return ev.TrainingRunRequested(meta=ev.EventMeta(job_id="j"), pool=pool)

    assert w.launch_plan("auto", request(), "cpu", 1) is None  # a CPU trains in the worker
    assert w.launch_plan(1, request("gpu-4x80g"), "cpu", 1) is None
    assert w.launch_plan(2, request(), "cpu", 1) == w.LaunchPlan(2, fsdp=False, cpu=True)
    gpu = "cuda:NVIDIA H200"
    assert w.launch_plan("auto", request("gpu-80g"), gpu, 8) is None  # the pool needs one GPU
    assert w.launch_plan("auto", request("gpu-4x80g"), gpu, 8) == w.LaunchPlan(4, fsdp=True, cpu=False)
    assert w.launch_plan(8, request("gpu-4x80g"), gpu, 8) == w.LaunchPlan(8, fsdp=True, cpu=False)
    assert w.launch_plan(4, request("gpu-80g"), gpu, 4) == w.LaunchPlan(4, fsdp=False, cpu=False)  # DDP
    assert w.launch_plan("auto", request(""), gpu, 4) is None  # a request from before pools
    assert w.processes_for(request("gpu-8x80g"), 4) == 4  # never more than the worker has
    with pytest.raises(RuntimeError, match="has 2 GPU"):
        w.launch_plan(4, request(), gpu, 2)


def test_trainer_processes_setting(monkeypatch):
    from pydantic import ValidationError

    from tuneforge.core.settings import Settings

    monkeypatch.delenv("TUNEFORGE_TRAINER_PROCESSES")
    assert Settings().trainer_processes == "auto"
    for raw, want in (("auto", "auto"), ("3", 3)):
        monkeypatch.setenv("TUNEFORGE_TRAINER_PROCESSES", raw)
        assert Settings().trainer_processes == want
    for raw in ("0", "two"):
        monkeypatch.setenv("TUNEFORGE_TRAINER_PROCESSES", raw)
        with pytest.raises(ValidationError):
            Settings()


def test_quantization_option_validates_and_needs_cuda_and_bitsandbytes():
    import torch

    from tuneforge_builtin import trl_common
    from tuneforge_builtin.dpo import DPO
    from tuneforge_builtin.sft import SFT

    assert SFT.validate_options({"quantization": "4bit"}) == {"quantization": "4bit"}
    assert SFT.validate_options({"quantization": "NONE"}) == {"quantization": "none"}
    assert SFT.validate_options({}) == {}  # the default is not written in
    assert DPO.validate_options({"quantization": "4bit"}) == {"beta": 0.1, "quantization": "4bit"}
    for method in (SFT, DPO):
        for bad in ("8bit", 4, True, ""):
            with pytest.raises(ValueError, match="quantization must be one of none, 4bit"):
                method.validate_options({"quantization": bad})
        method.check_runtime({})  # nothing to check
        method.check_runtime({"quantization": "none"})
    assert not torch.cuda.is_available()  # this machine: the clear error, naming what is missing
    with pytest.raises(trl_common.QuantizationUnavailable, match="needs a CUDA GPU and this trainer worker has none"):
        SFT.check_runtime({"quantization": "4bit"})
    with pytest.raises(ValueError, match="unknown SFT option.*valid options: quantization"):
        SFT.validate_options({"packing": True})


def test_batch_per_device():
    from tuneforge_builtin import trl_common

    assert trl_common.per_device_batch(32, 2) == 16
    assert trl_common.per_device_batch(8, 1) == 8
    assert trl_common.per_device_batch(32, 2, gradient_accumulation=4) == 4
    with pytest.raises(trl_common.BatchSplitError, match="batch_size 6 does not divide over 4 training processes: "
                                                         "choose a multiple of 4"):
        trl_common.per_device_batch(6, 4)
    with pytest.raises(trl_common.BatchSplitError, match="choose a multiple of 4"):
        trl_common.per_device_batch(2, 4)  # fewer examples than processes


def test_each_rank_takes_its_share_of_the_one_process_batch():
    from tuneforge_builtin import packed

    batch = list(range(100, 117))  # the partial last batch of 113 examples at batch 32: 17
    shares = [packed.rank_slice(batch, rank, 2, ghost_offset=1000) for rank in (0, 1)]
    assert shares == [batch[:9], batch[9:]]  # 9 and 8, in order, nothing repeated
    assert [packed.rank_slice(list(range(8)), r, 4, 1000) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # fewer examples than ranks: the rank left over trains on a ghost (no loss token) of the first
    assert [packed.rank_slice([7, 9], r, 3, 1000) for r in range(3)] == [[7], [9], [1007]]
    data = packed.GhostableDataset([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert len(data) == 1 and data[0]["labels"] == [-100, 2, 3]
    assert data[1] == {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}


def test_progress_lines_are_read_whole(tmp_path):
    from tuneforge.training import CheckpointReport, ProgressReport
    from tuneforge_builtin import distributed

    path = tmp_path / "progress.jsonl"
    assert w.read_new_records(path, 0) == ([], 0)  # not written yet
    first = distributed.progress_record(ProgressReport(step=1, total_steps=4, epoch=0.25, train_loss=2.5))
    second = distributed.progress_record(CheckpointReport(step=2, path=tmp_path / "step-2", eval_loss=None))
    text = json.dumps(first) + "\n" + json.dumps(second)
    path.write_text(text[:-5])  # rank 0 is half-way through its second line
    records, offset = w.read_new_records(path, 0)
    assert records == [first] and offset == len(json.dumps(first)) + 1
    path.write_text(text + "\n")
    records, offset = w.read_new_records(path, offset)
    assert [distributed.report_from_record(r) for r in records] == [CheckpointReport(2, tmp_path / "step-2")]
    assert offset == len(text) + 1
