"""The training worker: pulls ``training.run.requested.<pool>`` from the work queue (one durable
consumer per trainer pool it serves, largest pool first; core/pools.py), runs the job's method
with heartbeats, reports progress, writes the adapter, and acks only when done.

A worker that dies leaves its message un-acked: JetStream redelivers it (to this worker once it
is back, or another) with a higher attempt number, and the scheduler ignores the older attempt's
reports. The new attempt resumes from the latest complete checkpoint of the earlier attempts
(adapter, optimizer, scheduler, RNG, data position, trainer state with the log history from which
early stopping is rebuilt), and says so in ``TrainingRunStarted.resumed_from_step``. Every
attempt writes under its own ``attempt-N`` prefix, so a stale worker never overwrites a newer
attempt's files. After ``MAX_ATTEMPTS`` the job fails with the reason.

Each attempt that trained leaves a report (``attempt-N/report``: ``loss.png`` and ``report.json``,
:mod:`tuneforge.trainer.report`) built from its progress reports and, when it resumed, the log
history of the checkpoint it resumed from; the outcome event names it in ``report_path``. The
worker also announces itself (``TrainerWorkerSeen``: device class, count and memory, its pools) at start and every
``TUNEFORGE_WORKER_SEEN_PERIOD`` seconds, from which the job-scheduler estimates wall times.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import hyperparameters as hp
from tuneforge.core import pools, subjects, telemetry
from tuneforge.core.pools import GRADIENT_CHECKPOINTING_OPTION
from tuneforge.core.bus import Bus
from tuneforge.core.settings import Settings
from tuneforge.core.storage import ArtifactStore
from tuneforge.plugins import get_registry
from tuneforge.trainer import report as run_report
from tuneforge.trainer.model_import import check_safe_model_dir
from tuneforge.training import CheckpointReport, ProgressReport, TrainingContext, TrainingResult
from tuneforge.training import finite_metrics as extra_metrics  # a result's metrics as TrainingMetrics.extra

log = logging.getLogger(__name__)
# One durable pull consumer per trainer pool, "trainer-<pool>", shared by every worker of the pool
# (work_consumer_name); "trainers" is the one consumer of the release before pools, on the bare
# subject: workers drain what is left on it (legacy_work_pending).
LEGACY_WORK_CONSUMER = "trainers"
LEGACY_CHECK_SECONDS = 60.0
# A work item is trained at most MAX_ATTEMPTS times. Delivery n's lease is redelivery_backoff(ack_wait)[n-1]
# (ack_wait doubling, heartbeats keep it alive), so after a worker dies the item comes back later
# each time; the delivery after the last attempt fails the job without training. The consumer
# itself never drops the item (max_deliver -1): the worker always decides, and says why.
MAX_ATTEMPTS = 4
MAX_BACKOFF_SECONDS = 600.0
CHECKPOINT_MARKER = "checkpoint-complete.json"  # written after the upload: only such checkpoints are trusted
ATTEMPT_MARKER = "attempt.json"  # written when an attempt starts: attempt numbers survive a consumer reset
RESULT_FILE = "result.json"  # the attempt's final event: a redelivery after it republishes, never retrains
PROGRESS_MIN_INTERVAL = 0.5
# Test-only fault injection (tests/test_supervised_stack.py sets it for the stack it starts; never
# set it in a deployment): the trainer process os._exit()s when a run reaches this step (0: as the
# attempt starts training), as a crash would. TUNEFORGE_TEST_CRASH_SEED, when set too, limits it
# to runs with that seed (other jobs train normally).
TEST_CRASH_AT_STEP_ENV = "TUNEFORGE_TEST_CRASH_AT_STEP"
TEST_CRASH_SEED_ENV = "TUNEFORGE_TEST_CRASH_SEED"
TEST_CRASH_EXIT_CODE = 71
# How often the worker announces itself (TrainerWorkerSeen); tests set a shorter period.
WORKER_SEEN_PERIOD_ENV = "TUNEFORGE_WORKER_SEEN_PERIOD"
DEFAULT_WORKER_SEEN_PERIOD = 60


SAMPLE_FIELDS = ("prompt_json", "prompt", "reference", "base_answer", "tuned_answer")


def training_metrics(result: TrainingResult, train_seconds: float) -> common_pb2.TrainingMetrics:
    """A method's result as the ``TrainingMetrics`` that reach the scheduler, the registry and the
    email: losses, the comparison with the base model (non-finite values left out), the samples."""
    metrics = common_pb2.TrainingMetrics(steps=result.steps, epochs=result.epochs,
                                         stopped_early=result.stopped_early, train_seconds=train_seconds)
    for field in ("train_loss", "eval_loss", "base_eval_loss", "tool_call_accuracy", "base_tool_call_accuracy"):
        value = getattr(result, field)
        if value is not None and math.isfinite(value):
            setattr(metrics, field, float(value))
    metrics.extra.update(extra_metrics(result.metrics))
    for sample in result.samples:
        metrics.samples.add(**{name: str(sample.get(name) or "") for name in SAMPLE_FIELDS})
    return metrics


def dataset_tokens_trained(request: ev.TrainingRunRequested, result, resumed_from_step: int) -> int:
    """Tokens this attempt trained on, counted as the dataset builder counts a split (its
    ``train_tokens`` per epoch times the epochs this attempt ran): the unit of ValidateJob's
    ``total_training_tokens``, so a measured tokens/s turns a plan into seconds. (A DPO pair is
    one sequence there, two forwards here; the method's own count would not compare.) Without
    the builder's count (no tokenizer): the method's real-token count, or 0."""
    per_epoch = request.dataset.train_tokens.total
    batch = request.hyperparameters.batch_size or 1
    steps_per_epoch = max(1, -(-request.dataset.train_count // batch))
    epochs = result.epochs - (resumed_from_step or 0) / steps_per_epoch
    if per_epoch > 0 and epochs > 0:
        return round(per_epoch * epochs)
    return result.trained_tokens or 0


@functools.cache
def device_class() -> tuple[str, int]:
    """``(class, count)`` of the devices this worker trains on: ``("cuda:<device name>", n)`` on
    a GPU (the methods train on CUDA whenever it is available), else ``("cpu", 1)``. The class is
    the key of measured throughput per base model, so it names the hardware, not an index."""
    import torch  # the trainer is the one service that imports torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}", torch.cuda.device_count()
    return "cpu", 1


@functools.cache
def device_memory_bytes() -> int:
    """Memory of the smallest GPU this worker trains on, in bytes; 0 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def resolve_worker_pools(settings: Settings) -> list[str]:
    """The pools this worker takes work from: ``TUNEFORGE_TRAINER_POOLS`` when set, else every
    pool its hardware holds (core/pools.py), smallest first."""
    _, count = device_class()
    memory = device_memory_bytes()
    return pools.worker_pools(settings.trainer_pools, count if memory else 0, memory)


def worker_seen_period() -> int:
    """Seconds between two ``TrainerWorkerSeen`` announcements (``TUNEFORGE_WORKER_SEEN_PERIOD``,
    default 60, at least 1)."""
    raw = os.environ.get(WORKER_SEEN_PERIOD_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKER_SEEN_PERIOD
    try:
        return max(1, int(float(raw)))
    except ValueError:
        raise ValueError(f"{WORKER_SEEN_PERIOD_ENV}={raw!r}: expected a number of seconds") from None


@dataclasses.dataclass
class RunRecord:
    """What the worker saw of one attempt, for its report: filled while the method trains (on the
    training thread), read once it has returned or raised."""

    history: run_report.RunHistory = dataclasses.field(default_factory=run_report.RunHistory)
    checkpoints: dict[int, run_report.CheckpointMark] = dataclasses.field(default_factory=dict)
    hyperparameters: dict | None = None  # resolved, once known
    resumed_from_step: int = 0

    def reset(self, resumed_from_step: int) -> None:
        self.history.clear()
        self.checkpoints.clear()
        self.resumed_from_step = resumed_from_step


class UserDataError(Exception):
    """The job cannot train because of its data or settings."""


class CheckpointError(Exception):
    """A stored checkpoint cannot be used (incomplete, corrupt, or not what its marker says)."""


# ----------------------------------------------------------------------------------------------
# The work consumer and the run's layout in the artifact store (functions: the tests use them).


def redelivery_backoff(ack_wait: float) -> list[float]:
    """Delivery n's lease: ``ack_wait`` doubling per attempt, at most ``MAX_BACKOFF_SECONDS``."""
    return [min(max(ack_wait, MAX_BACKOFF_SECONDS), ack_wait * 2 ** i) for i in range(MAX_ATTEMPTS)]


def work_consumer_name(pool: str) -> str:
    return f"trainer-{pools.get_pool(pool).name}"


def work_consumer_config(ack_wait: float, pool: str | None = None) -> api.ConsumerConfig:
    """The durable work consumer of ``pool`` (its subject only), or with ``pool`` None the legacy
    consumer of the bare subject (items queued by the release before pools)."""
    return api.ConsumerConfig(
        durable_name=work_consumer_name(pool) if pool else LEGACY_WORK_CONSUMER,
        ack_policy=api.AckPolicy.EXPLICIT,
        filter_subject=pools.work_subject(pool) if pool else subjects.TRAINING_RUN_REQUESTED,
        ack_wait=ack_wait,
        backoff=redelivery_backoff(ack_wait),
        max_deliver=-1,
        # Items waiting for their back-off do not hold up the others (a worker takes one at a time).
        max_ack_pending=1000,
    )


def _same_consumer_config(have: api.ConsumerConfig, want: api.ConsumerConfig) -> bool:
    def close(a, b) -> bool:
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-3

    return (have.max_deliver == want.max_deliver and have.filter_subject == want.filter_subject
            and have.max_ack_pending == want.max_ack_pending and close(have.ack_wait, want.ack_wait)
            and len(have.backoff or []) == len(want.backoff or [])
            and all(close(a, b) for a, b in zip(have.backoff or [], want.backoff or [])))


async def ensure_work_consumer(js, config: api.ConsumerConfig) -> api.ConsumerInfo:
    """Create the durable work consumer, or bring an existing one (an older release's settings)
    to ``config``: updated in place where the server allows it, else deleted and created again.
    Pending items stay in the work-queue stream either way; attempt numbers survive through the
    attempt markers in the artifact store (:func:`next_attempt`)."""
    try:
        info = await js.add_consumer(subjects.WORK_STREAM, config)
        if _same_consumer_config(info.config, config):
            return info
        reason = f"it kept max_deliver={info.config.max_deliver} backoff={info.config.backoff}"
    except nats.js.errors.BadRequestError as exc:  # e.g. "consumer already exists" with another config
        reason = str(exc)
    log.warning("work consumer %s has an older configuration (%s): recreating it", config.durable_name, reason)
    await js.delete_consumer(subjects.WORK_STREAM, config.durable_name)
    return await js.add_consumer(subjects.WORK_STREAM, config)


async def legacy_work_pending(js, ack_wait: float) -> bool:
    """Whether items of the release before pools wait on the bare work subject: its consumer
    ("trainers") holds pending or unacknowledged items, or (no such consumer: no worker of that
    release ever ran) the stream holds a message on that subject, for which the consumer is made.
    While this is true every worker drains them too; a new deployment never creates the consumer."""
    try:
        info = await js.consumer_info(subjects.WORK_STREAM, LEGACY_WORK_CONSUMER)
        return (info.num_pending or 0) + (info.num_ack_pending or 0) > 0
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.get_last_msg(subjects.WORK_STREAM, subjects.TRAINING_RUN_REQUESTED)
    except nats.js.errors.NotFoundError:
        return False
    await ensure_work_consumer(js, work_consumer_config(ack_wait))
    return True


def run_prefix(workspace_id: str, job_id: str) -> str:
    return f"runs/{workspace_id}/{job_id}"


def attempt_prefix(workspace_id: str, job_id: str, attempt: int) -> str:
    return f"{run_prefix(workspace_id, job_id)}/attempt-{attempt}"


def checkpoint_key(workspace_id: str, job_id: str, attempt: int, step: int) -> str:
    return f"{attempt_prefix(workspace_id, job_id, attempt)}/checkpoints/step-{step}"


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    attempt: int
    step: int
    key: str  # the checkpoint's prefix in the artifact store


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def upload_checkpoint(store: ArtifactStore, local_dir, key: str, step: int) -> bool:
    """Upload a checkpoint directory, then, for a trainer checkpoint (one that can be resumed
    from: it has ``trainer_state.json``; the final adapter has not), its completion marker with
    every file's size and sha256. A checkpoint without the marker (the uploader died part-way) is
    never resumed from. Returns whether the marker was written."""
    local_dir = Path(local_dir)
    files = {p.relative_to(local_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(local_dir.rglob("*")) if p.is_file()}
    store.put_dir(local_dir, key)
    if "trainer_state.json" not in files:
        return False
    store.put_bytes(f"{key}/{CHECKPOINT_MARKER}", json.dumps({"step": step, "files": files}).encode())
    return True


_CHECKPOINT_RE = re.compile(r"attempt-(\d+)/checkpoints/step-(\d+)/" + re.escape(CHECKPOINT_MARKER))
_ATTEMPT_RE = re.compile(r"attempt-(\d+)/")


def complete_checkpoints(store: ArtifactStore, workspace_id: str, job_id: str,
                         before_attempt: int | None = None) -> list[StoredCheckpoint]:
    """The job's completed checkpoints of attempts before ``before_attempt``, latest step first."""
    prefix = run_prefix(workspace_id, job_id)
    found = []
    for key in store.list(prefix):
        match = _CHECKPOINT_RE.fullmatch(key[len(prefix) + 1:])
        if match and (before_attempt is None or int(match[1]) < before_attempt):
            attempt, step = int(match[1]), int(match[2])
            found.append(StoredCheckpoint(attempt, step, checkpoint_key(workspace_id, job_id, attempt, step)))
    return sorted(found, key=lambda c: (c.step, c.attempt), reverse=True)


def download_checkpoint(store: ArtifactStore, checkpoint: StoredCheckpoint, local_dir) -> Path:
    """Download and verify a checkpoint against its marker (every file, size and sha256; the
    trainer state at the marker's step); raises :class:`CheckpointError` if it does not match."""
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    try:
        marker = json.loads(store.get_bytes(f"{checkpoint.key}/{CHECKPOINT_MARKER}"))
        store.get_dir(checkpoint.key, local_dir)
    except Exception as exc:
        raise CheckpointError(f"cannot read it: {type(exc).__name__}: {exc}") from exc
    files = marker.get("files") or {}
    if marker.get("step") != checkpoint.step or "trainer_state.json" not in files:
        raise CheckpointError("its completion marker does not describe a trainer checkpoint at this step")
    for name, want in files.items():
        path = local_dir / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if path.stat().st_size != want.get("size") or _sha256(path) != want.get("sha256"):
            raise CheckpointError(f"{name} differs from what was uploaded")
    try:
        state = json.loads((local_dir / "trainer_state.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"trainer_state.json is not JSON: {exc}") from exc
    if state.get("global_step") != checkpoint.step:
        raise CheckpointError(f"trainer_state.json is at step {state.get('global_step')}, not {checkpoint.step}")
    return local_dir


def started_attempts(store: ArtifactStore, workspace_id: str, job_id: str) -> list[int]:
    """Attempt numbers that wrote their start marker, ascending."""
    prefix = run_prefix(workspace_id, job_id)
    seen = set()
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:]
        match = _ATTEMPT_RE.match(rest)
        if match and rest == f"attempt-{match[1]}/{ATTEMPT_MARKER}":
            seen.add(int(match[1]))
    return sorted(seen)


def next_attempt(num_delivered: int, started: list[int]) -> int:
    """This delivery's attempt number: JetStream's delivery count, or one more than the highest
    attempt that started if that is higher (a recreated consumer counts from 1 again)."""
    return max(num_delivered, (max(started) + 1) if started else 1)


def _test_crash_hook(seed: int):
    """Test-only (see TEST_CRASH_AT_STEP_ENV): the step at which this process must die, or None."""
    at = os.environ.get(TEST_CRASH_AT_STEP_ENV)
    only_seed = os.environ.get(TEST_CRASH_SEED_ENV)
    if not at or (only_seed and int(only_seed) != seed):
        return None
    return int(at)


# ----------------------------------------------------------------------------------------------
# Multi-process training (tuneforge_builtin.distributed): how many processes a job trains as, and
# running them. One process trains in the worker itself (a thread), exactly as always.

LAUNCH_DIRNAME = "launch"  # under the attempt's work dir: job spec, progress, result, log
LAUNCH_LOG = "training.log"  # every process's output (lines of rank N start "[rank N]")
LAUNCH_POLL_SECONDS = 0.25
# After a cancel, the processes stop at the end of their step, evaluate and save; if they have not
# exited after this long they are killed (the job fails: no adapter was saved).
STOP_GRACE_SECONDS = 900.0
# SIGTERM to the launcher's process group (torchrun ends its ranks: SIGTERM, SIGKILL after 30 s),
# then SIGKILL; a rank whose launcher is gone exits by itself (distributed._watch_parent).
KILL_GRACE_SECONDS = 40.0
LOG_TAIL_LINES = 25
LOG_TAIL_CHARS = 1500


def processes_for(request: ev.TrainingRunRequested, device_count: int) -> int:
    """GPUs the job needs on this worker: its pool's (core/pools.py, ``request.pool``: 4 for
    ``gpu-4x80g``; 1 for a one-GPU pool, ``small``, or a request from before pools), at most
    ``device_count``."""
    return max(1, min(pools.processes_for_pool(request.pool), max(1, device_count)))


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How a job trains when it is more than one process."""

    processes: int
    fsdp: bool  # the model needs several GPUs: shard it (FSDP2); otherwise data-parallel (DDP)
    cpu: bool  # DDP over gloo

    def describe(self) -> str:
        how = "DDP over gloo (CPU)" if self.cpu else ("FSDP" if self.fsdp else "DDP")
        return f"{self.processes} processes, {how}"


def launch_plan(setting: int | str, request: ev.TrainingRunRequested, device_kind: str,
                device_count: int) -> LaunchPlan | None:
    """The processes a job trains as on this worker (``TUNEFORGE_TRAINER_PROCESSES``: ``auto`` or
    a number), or None for one process in the worker. ``auto``: 1 on a CPU; on GPUs the GPUs the
    job's pool needs (:func:`processes_for`). FSDP when the model needs more than one GPU, DDP when
    more processes than it needs are asked. Raises RuntimeError when a number asks for more GPUs
    than the worker has (a configuration error)."""
    cpu = device_kind == "cpu"
    needed = 1 if cpu else processes_for(request, device_count)
    processes = needed if setting in (None, "", "auto") else int(setting)
    if not cpu and processes > device_count:
        raise RuntimeError(f"TUNEFORGE_TRAINER_PROCESSES={setting} but this worker has {device_count} GPU(s)")
    if processes < needed:
        log.warning("job %s: pool %s trains on %d GPUs; TUNEFORGE_TRAINER_PROCESSES=%s runs it as %d process(es) "
                    "(it may not fit)", request.meta.job_id, request.pool, needed, setting, processes)
    if processes <= 1:
        return None
    return LaunchPlan(processes=processes, fsdp=not cpu and needed > 1, cpu=cpu)


class LaunchedTrainingError(RuntimeError):
    """The launched training processes failed (a crashed rank, an error in one, killed)."""


def read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete JSON lines of ``path`` after byte ``offset`` (a line still being written is
    left for the next read), and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("unreadable progress line from the training processes: %r", line[:200])
    return records, offset + end + 1


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``lines`` non-blank lines of a log (at most ``chars`` characters), for a reason."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    tail = "\n".join(kept)
    return tail if len(tail) <= chars else "…" + tail[-(chars - 1):]


_ROOT_CAUSE_RE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def root_cause(log_text: str) -> str:
    """torchrun's "Root Cause (first observed failure)" in a launch log, as "rank 1 exited with
    code 71", or "" (the other ranks' errors are its consequences: a closed connection)."""
    found = _ROOT_CAUSE_RE.findall(log_text)
    if not found:
        return ""
    rank, code = found[-1]
    return f"rank {rank} exited with code {code} first"


def _kill_group(pid: int, sig: int) -> bool:
    """Signal the process group of the launcher (``start_new_session``: every rank is in it)."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def stop_process_group(proc) -> None:
    """SIGTERM to the launched group (torchrun passes it on to its ranks), SIGKILL after
    ``KILL_GRACE_SECONDS``, and reap the launcher. Never waits longer than that."""
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=KILL_GRACE_SECONDS)
    except asyncio.TimeoutError:
        pass
    _kill_group(proc.pid, signal.SIGKILL)  # the launcher, and ranks that outlived it
    if proc.returncode is None:
        try:
            await asyncio.wait_for(proc.wait(), timeout=KILL_GRACE_SECONDS)
        except asyncio.TimeoutError:
            log.error("launched training process %s did not exit after SIGKILL", proc.pid)


def launch_environment(processes: int) -> dict[str, str]:
    """The launched processes' environment: this one, intra-op threads shared out over the
    processes, the import roots of tuneforge and its built-in plugins on ``PYTHONPATH`` (a source
    checkout runs too), and this worker's pid (a rank whose worker died stops: see
    ``tuneforge_builtin.distributed``)."""
    import tuneforge
    import tuneforge_builtin
    from tuneforge_builtin import distributed

    env = distributed.launch_environment(max(1, (os.cpu_count() or 1) // processes))
    roots = [str(Path(m.__file__).resolve().parent.parent) for m in (tuneforge, tuneforge_builtin)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    env[distributed.PARENT_PID_ENV] = str(os.getpid())
    return env


@dataclasses.dataclass
class WorkerStatus:
    worker_id: str
    start_time: float
    current_job_id: str = ""
    current_workspace_id: str = ""  # GetWorkerStatus shows the current job to this workspace only
    current_attempt: int = 0
    current_step: int = 0
    runs_completed: int = 0


class TrainingWorker:
    def __init__(self, settings: Settings, bus: Bus):
        self.settings = settings
        self.bus = bus
        self.store = ArtifactStore(settings.resolved_artifact_url())
        self.model_store = settings.resolved_model_store()
        self.work_root = (settings.data_dir / "trainer-work").resolve()
        self.status = WorkerStatus(worker_id=settings.worker_id or f"{socket.gethostname()}-{os.getpid()}",
                                   start_time=time.time())
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._stopping = asyncio.Event()
        self._started_sent = False  # TrainingRunStarted of the current attempt went out

    async def run(self) -> None:
        """Take work from this worker's pools, largest pool first (a big machine takes the big
        jobs first; each pool's durable consumer is shared by all its workers), plus what the
        release before pools left on the bare subject while there is any."""
        js = self.bus.js
        ack_wait = self.settings.training_ack_wait_seconds
        # The consumers known without looking at the hardware first (every worker's hardware holds
        # "small"); the hardware (torch: seconds to import) decides the rest.
        configured = self.settings.trainer_pools
        known = pools.parse_pool_list(configured) if configured else [pools.SMALL.name]
        for pool in known:
            await ensure_work_consumer(js, work_consumer_config(ack_wait, pool))
        self.worker_pools = await asyncio.to_thread(resolve_worker_pools, self.settings)
        subs = []
        for pool in pools.largest_first(self.worker_pools):
            config = work_consumer_config(ack_wait, pool)
            if pool not in known:
                await ensure_work_consumer(js, config)
            subs.append((pool, await js.pull_subscribe_bind(durable=config.durable_name, stream=subjects.WORK_STREAM)))
        log.info("worker %s takes work from pool(s) %s", self.status.worker_id, ", ".join(self.worker_pools))
        cancel_sub = await self.bus.nc.subscribe(subjects.TRAINING_RUN_CANCEL_REQUESTED, cb=self._on_cancel)
        announcer = asyncio.create_task(self._announce(worker_seen_period()))
        legacy, legacy_checked = None, -math.inf
        try:
            while not self._stopping.is_set():
                if time.monotonic() - legacy_checked >= LEGACY_CHECK_SECONDS:
                    legacy_checked = time.monotonic()
                    legacy = await self._legacy_subscription(legacy)
                order = ([("legacy", legacy)] if legacy is not None else []) + subs
                wait = max(0.2, 1.0 / len(order))  # an idle round over every pool takes about a second
                msgs = []
                for _name, psub in order:
                    try:
                        msgs = await psub.fetch(1, timeout=wait)
                        break
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        continue
                    except nats.errors.ConnectionClosedError:
                        return
                    except Exception:  # nats-server restarting, etc.: keep the worker alive
                        log.warning("fetching work failed; retrying", exc_info=True)
                        await asyncio.sleep(0.5)
                        break
                for msg in msgs:
                    with telemetry.consumer_span(msg):  # the job's trace goes on; job ids in the logs
                        await self.handle(msg)
                if msgs and legacy is not None:
                    legacy_checked = -math.inf  # drained yet? look again before the next fetch
        finally:
            announcer.cancel()
            await cancel_sub.unsubscribe()
            for psub in [p for _, p in subs] + ([legacy] if legacy is not None else []):
                try:
                    await psub.unsubscribe()
                except Exception:
                    pass

    async def _legacy_subscription(self, current):
        """The legacy consumer's subscription while it has items, else None (unsubscribed)."""
        js = self.bus.js
        try:
            pending = await legacy_work_pending(js, self.settings.training_ack_wait_seconds)
        except Exception:  # NATS away: ask again later
            log.warning("could not look for work queued before trainer pools", exc_info=True)
            return current
        if pending and current is None:
            log.info("draining work items queued before trainer pools (consumer %s)", LEGACY_WORK_CONSUMER)
            return await js.pull_subscribe_bind(durable=LEGACY_WORK_CONSUMER, stream=subjects.WORK_STREAM)
        if not pending and current is not None:
            try:
                await current.unsubscribe()
            except Exception:
                pass
            return None
        return current

    def stop(self) -> None:
        self._stopping.set()

    async def _announce(self, period: int) -> None:
        """``TrainerWorkerSeen`` now and every ``period`` seconds until the worker stops: the
        job-scheduler's view of the hardware in the cluster. Best effort (a missed one is only
        late news)."""
        kind, count = await asyncio.to_thread(device_class)
        memory = await asyncio.to_thread(device_memory_bytes)
        while not self._stopping.is_set():
            try:
                await self.bus.publish(subjects.TRAINER_WORKER_SEEN, ev.TrainerWorkerSeen(
                    meta=self.bus.meta(""), worker_id=self.status.worker_id, device_class=kind,
                    device_count=count, period_seconds=period, pools=list(getattr(self, "worker_pools", ())),
                    device_memory_bytes=memory))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not announce the worker (TrainerWorkerSeen); next try in %ss", period,
                            exc_info=True)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=period)
            except asyncio.TimeoutError:
                pass

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            event = ev.TrainingRunCancelRequested.FromString(msg.data)
        except Exception:
            return
        with self._cancel_lock:
            self._cancelled.add(event.meta.job_id)

    def _is_cancelled(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancelled

    async def handle(self, msg: Msg) -> None:
        try:
            request = ev.TrainingRunRequested.FromString(msg.data)
        except Exception:
            log.exception("undecodable work item; terminating it")
            await msg.term()
            return
        meta = request.meta
        job_id, workspace_id = meta.job_id, meta.workspace_id
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            if await self._finish_from_stored_result(workspace_id, job_id):
                await self._ack(msg)
                return
            started = await asyncio.to_thread(started_attempts, self.store, workspace_id, job_id)
            attempt = next_attempt(delivered, started)
            if attempt > MAX_ATTEMPTS:
                await self._give_up(workspace_id, job_id, attempt)
                await self._ack(msg)
                return
        except Exception:  # the artifact store or NATS is unavailable: the item comes back later
            log.exception("work item for job %s (delivery %s): cannot look at its earlier attempts", job_id, delivered)
            return
        finally:
            heartbeat.cancel()
        self.status.current_job_id, self.status.current_attempt, self.status.current_step = job_id, attempt, 0
        self.status.current_workspace_id = workspace_id
        self._started_sent = False
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        record = RunRecord()
        try:
            try:
                await asyncio.to_thread(
                    self.store.put_bytes, f"{attempt_prefix(workspace_id, job_id, attempt)}/{ATTEMPT_MARKER}",
                    json.dumps({"attempt": attempt, "delivery": delivered, "worker_id": self.status.worker_id,
                                "started_at": time.time()}).encode())
                result_event = await self._train(request, attempt, record)
                subject = (subjects.TRAINING_RUN_CANCELLED if isinstance(result_event, ev.TrainingRunCancelled)
                           else subjects.TRAINING_RUN_SUCCEEDED)
            except UserDataError as exc:
                subject = subjects.TRAINING_RUN_FAILED
                result_event = self._failure(workspace_id, job_id, attempt, str(exc), common_pb2.FAILURE_KIND_USER)
            except Exception as exc:
                log.exception("training %s (attempt %s) failed", job_id, attempt)
                subject = subjects.TRAINING_RUN_FAILED
                result_event = self._failure(workspace_id, job_id, attempt,
                                             f"training failed: {type(exc).__name__}: {exc}",
                                             common_pb2.FAILURE_KIND_SYSTEM)
            if subject == subjects.TRAINING_RUN_FAILED and record.history.has_losses():
                result_event.report_path = await self._write_report(
                    request, attempt, record, "failed", reason=result_event.reason)
            if not self._started_sent:
                await self._publish_started(workspace_id, job_id, attempt, 0)
            await self._store_result(workspace_id, job_id, attempt, subject, result_event)
            await self.bus.publish(subject, result_event)
        except Exception:  # NATS unavailable: no ack, the item comes back and the stored result is sent then
            log.exception("job %s (attempt %s): cannot report the outcome; the work item will come back", job_id, attempt)
            return
        finally:
            heartbeat.cancel()
            self.status.current_job_id, self.status.current_attempt = "", 0
            self.status.runs_completed += 1
        await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        """Ack, retrying for a while (nats-server restarting); if it never goes through, the item
        is redelivered and the stored result is republished (no second training)."""
        for delay in (0.5, 1, 2, 4, 8):
            try:
                await msg.ack()
                return
            except Exception:
                log.warning("ack failed; retrying in %ss", delay, exc_info=True)
                await asyncio.sleep(delay)
        log.error("could not ack the work item %s; it will be redelivered", msg.metadata)

    async def _publish_started(self, workspace_id: str, job_id: str, attempt: int, resumed_from_step: int) -> None:
        self._started_sent = True
        await self.bus.publish(subjects.TRAINING_RUN_STARTED, ev.TrainingRunStarted(
            meta=self.bus.meta(workspace_id, job_id), attempt=attempt, worker_id=self.status.worker_id,
            resumed_from_step=resumed_from_step))

    async def _store_result(self, workspace_id, job_id, attempt, subject: str, event) -> None:
        """Best effort: without it a lost ack costs a second run, nothing worse."""
        record = {"subject": subject, "event": base64.b64encode(event.SerializeToString()).decode()}
        try:
            await asyncio.to_thread(self.store.put_bytes,
                                    f"{attempt_prefix(workspace_id, job_id, attempt)}/{RESULT_FILE}",
                                    json.dumps(record).encode())
        except Exception:
            log.warning("job %s: could not store the result of attempt %s", job_id, attempt, exc_info=True)

    async def _finish_from_stored_result(self, workspace_id: str, job_id: str) -> bool:
        """An earlier attempt finished (its result is stored) but its ack was lost: publish that
        result again (same event id: JetStream drops it if the first one arrived) instead of
        training again."""
        prefix = run_prefix(workspace_id, job_id)
        keys = await asyncio.to_thread(self.store.list, prefix)
        results = sorted((int(m[1]), key) for key in keys
                         if (m := re.fullmatch(r"attempt-(\d+)/" + re.escape(RESULT_FILE), key[len(prefix) + 1:])))
        if not results:
            return False
        attempt, key = results[-1]
        record = json.loads(await asyncio.to_thread(self.store.get_bytes, key))
        subject = record["subject"]
        event = subjects.MESSAGE_TYPES[subject].FromString(base64.b64decode(record["event"]))
        log.info("job %s: attempt %s already finished (%s); publishing its result again", job_id, attempt, subject)
        await self.bus.publish(subject, event)
        return True

    async def _give_up(self, workspace_id: str, job_id: str, attempt: int) -> None:
        latest = await asyncio.to_thread(complete_checkpoints, self.store, workspace_id, job_id)
        where = f"last checkpoint at step {latest[0].step}" if latest else "before its first checkpoint"
        reason = f"the trainer stopped during {attempt - 1} attempts ({where}); giving up"
        log.error("job %s: %s", job_id, reason)
        await self._report_failure(workspace_id, job_id, attempt, reason, common_pb2.FAILURE_KIND_SYSTEM)

    def _failure(self, workspace_id, job_id, attempt, reason, kind) -> ev.TrainingRunFailed:
        return ev.TrainingRunFailed(meta=self.bus.meta(workspace_id, job_id), attempt=attempt, reason=reason,
                                    failure_kind=kind)

    async def _report_failure(self, workspace_id, job_id, attempt, reason, kind) -> None:
        await self.bus.publish(subjects.TRAINING_RUN_FAILED, self._failure(workspace_id, job_id, attempt, reason, kind))

    async def _heartbeat(self, msg: Msg) -> None:
        interval = max(0.2, min(self.settings.training_heartbeat_seconds, self.settings.training_ack_wait_seconds / 3))
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    async def _write_report(self, request: ev.TrainingRunRequested, attempt: int, record: RunRecord, outcome: str,
                            *, metrics: common_pb2.TrainingMetrics | None = None, trained_tokens: int | None = None,
                            train_seconds: float | None = None, reason: str = "") -> str:
        """Store the attempt's report (``loss.png``, ``report.json``); its artifact prefix, or ""
        when it could not be written: a report is never worth failing a job for."""
        meta = request.meta
        prefix = run_report.report_prefix(attempt_prefix(meta.workspace_id, meta.job_id, attempt))
        try:
            kind, _ = await asyncio.to_thread(device_class)
            hyperparameters = record.hyperparameters
            if hyperparameters is None:  # failed before resolving them: what the scheduler sent
                hyperparameters = run_report.proto_to_plain(request.hyperparameters)
            content = run_report.build_report(
                job_id=meta.job_id, workspace_id=meta.workspace_id, attempt=attempt, outcome=outcome,
                base_model=request.base_model, method=request.method, hyperparameters=hyperparameters,
                dataset=request.dataset, history=record.history, checkpoints=record.checkpoints.values(),
                metrics=metrics, device_class=kind, trained_tokens=trained_tokens, train_seconds=train_seconds,
                resumed_from_step=record.resumed_from_step, reason=reason)
            return await asyncio.to_thread(run_report.write_report, self.store, prefix, content, request.job_name)
        except Exception:
            log.warning("job %s (attempt %s): could not write the run's report", meta.job_id, attempt, exc_info=True)
            return ""

    def _launch_plan(self, request: ev.TrainingRunRequested, method, resolved: hp.ResolvedHyperparameters,
                     options: dict) -> LaunchPlan | None:
        """:func:`launch_plan` for this worker and job, or None (one process, in the worker).
        UserDataError when the job cannot train as those processes (its batch does not divide)."""
        kind, count = device_class()
        plan = launch_plan(self.settings.trainer_processes, request, kind, count)
        if plan is None:
            return None
        job_id = request.meta.job_id
        if not getattr(method, "supports_distributed", False):
            log.warning("job %s: method %s trains as one process only (not %s)", job_id, method.name, plan.describe())
            return None
        if resolved.batch_size % plan.processes:
            raise UserDataError(f"batch_size {resolved.batch_size} does not divide over the {plan.processes} "
                                f"training processes of this worker: choose a multiple of {plan.processes}")
        if plan.fsdp and str(options.get("quantization") or "none") != "none":
            raise UserDataError(f"quantization={options['quantization']} cannot train a model sharded over "
                                f"{plan.processes} GPUs (QLoRA trains on one GPU a process)")
        log.info("job %s: training as %s", job_id, plan.describe())
        return plan

    async def _train_launched(self, request: ev.TrainingRunRequested, attempt: int, context: TrainingContext,
                              plan: LaunchPlan, work: Path, on_progress, on_checkpoint) -> TrainingResult:
        """Train ``context`` as ``plan.processes`` launched processes (tuneforge_builtin.distributed):
        their progress and checkpoints go to ``on_progress`` / ``on_checkpoint`` as rank 0 writes
        them, a cancel becomes the stop file, rank 0's result file the ``TrainingResult``. A crashed
        or failing rank fails the run with the log's tail (the log is kept in the work dir and
        stored under the attempt's ``logs/``); the process group is killed whenever this returns
        or raises with it still running (cancelled task, stop timeout, a failed upload)."""
        from tuneforge_builtin import distributed

        job_id = context.job_id
        meta = request.meta
        launch_dir = work / LAUNCH_DIRNAME
        shutil.rmtree(launch_dir, ignore_errors=True)
        launch_dir.mkdir(parents=True)
        paths = {name: launch_dir / file for name, file in (
            ("progress", "progress.jsonl"), ("result", "result.json"), ("stop", "stop"), ("error", "error.txt"))}
        spec = distributed.JobSpec(
            job_id=job_id, method=request.method, base_model=context.base_model.id,
            model_dir=str(Path(context.model_dir).resolve()), train_file=str(Path(context.train_file).resolve()),
            test_file=str(Path(context.test_file).resolve()), output_dir=str(Path(context.output_dir).resolve()),
            hyperparameters=context.hyperparameters.to_dict(), seed=context.seed,
            method_options=dict(context.method_options),
            resume_from=str(Path(context.resume_from).resolve()) if context.resume_from else None,
            progress_file=str(paths["progress"]), result_file=str(paths["result"]), stop_file=str(paths["stop"]),
            error_file=str(paths["error"]))
        command = distributed.launch_command(spec.write(launch_dir / "job.json"), plan.processes, cpu=plan.cpu,
                                             fsdp=plan.fsdp, python=sys.executable)
        log_path = launch_dir / LAUNCH_LOG
        log.info("job %s: launching %s (log: %s)", job_id, plan.describe(), log_path)
        with open(log_path, "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                env=launch_environment(plan.processes), start_new_session=True)
        offset, stop_sent = 0, None
        try:
            while True:
                try:
                    await asyncio.wait_for(proc.wait(), timeout=LAUNCH_POLL_SECONDS)
                    exited = True
                except asyncio.TimeoutError:
                    exited = False
                records, offset = await asyncio.to_thread(read_new_records, paths["progress"], offset)
                for item in map(distributed.report_from_record, records):
                    if isinstance(item, CheckpointReport):
                        await asyncio.to_thread(on_checkpoint, item)  # uploads: an error fails the run
                    else:
                        try:
                            await asyncio.to_thread(on_progress, item)
                        except Exception:  # best effort, as in one process (trl_common.ProgressCallback)
                            log.exception("job %s: progress report failed", job_id)
                if exited:
                    break
                if stop_sent is None and self._is_cancelled(job_id):
                    paths["stop"].touch()
                    stop_sent = time.monotonic()
                    log.info("job %s: cancel requested: the training processes stop after this step", job_id)
                elif stop_sent is not None and time.monotonic() - stop_sent > STOP_GRACE_SECONDS:
                    raise LaunchedTrainingError(f"the training processes did not stop within {STOP_GRACE_SECONDS:.0f} s "
                                                "of the cancel request; killed")
        finally:
            if proc.returncode is None:
                log.warning("job %s: stopping the training processes (group %s)", job_id, proc.pid)
                await asyncio.shield(stop_process_group(proc))
            else:
                _kill_group(proc.pid, signal.SIGKILL)  # a rank that outlived its launcher
        if proc.returncode == 0 and paths["result"].is_file():
            return distributed.result_from_record(json.loads(paths["result"].read_text(encoding="utf-8")))
        error = paths["error"].read_text(encoding="utf-8", errors="replace").strip() if paths["error"].is_file() else ""
        tail = log_tail(log_path)
        first = root_cause(log_tail(log_path, lines=200, chars=64 * 1024))
        if first and not error.startswith(first.split(" exited")[0] + ":"):
            error = f"{first}; {error}" if error else first
        key = f"{attempt_prefix(meta.workspace_id, meta.job_id, attempt)}/logs/{LAUNCH_LOG}"
        try:
            await asyncio.to_thread(self.store.put_file, log_path, key)
        except Exception:
            log.warning("job %s: could not store the training log %s", job_id, log_path, exc_info=True)
            key = str(log_path)
        log.error("job %s: the %d training processes failed (exit code %s); log %s, last lines:\n%s",
                  job_id, plan.processes, proc.returncode, log_path, tail)
        what = error or ("no result file" if proc.returncode == 0 else "a process exited without an error message")
        raise LaunchedTrainingError(f"{plan.processes} training processes failed (exit code {proc.returncode}): "
                                    f"{what}; log {key}, last lines:\n{tail}")

    async def _train(self, request: ev.TrainingRunRequested, attempt: int, record: RunRecord | None = None):
        record = record if record is not None else RunRecord()
        meta = request.meta
        job_id, workspace_id = meta.job_id, meta.workspace_id
        registry = get_registry()
        spec = registry.base_models.get(request.base_model)
        method = registry.methods.get(request.method)
        if spec is None or method is None:
            raise UserDataError(f"this worker has no plugin for base model {request.base_model!r} / method {request.method!r}")
        model_dir = self.model_store / spec.id
        if not (model_dir / "config.json").exists():
            raise RuntimeError(
                f"no weights for {spec.id} in the model store {self.model_store} "
                f"(place them there, or `tuneforge models make-standin {spec.id}` for a tiny stand-in)"
            )
        check_safe_model_dir(model_dir)  # every method plugin: no pickle files, no remote code (UnsafeModelError)
        try:
            options = method.validate_options(json.loads(request.method_options_json or "{}"))
        except ValueError as exc:
            raise UserDataError(f"invalid method options: {exc}") from exc
        if (GRADIENT_CHECKPOINTING_OPTION in getattr(method, "option_names", ())
                and GRADIENT_CHECKPOINTING_OPTION not in options):
            # A job sized for a GPU pool is sized with gradient checkpointing on (core.pools): train so.
            options[GRADIENT_CHECKPOINTING_OPTION] = pools.needs_gradient_checkpointing(request.pool)
        check_runtime = getattr(method, "check_runtime", None)  # e.g. quantization=4bit needs CUDA, bitsandbytes
        if check_runtime is not None:
            try:
                await asyncio.to_thread(check_runtime, options)
            except ValueError as exc:
                raise UserDataError(str(exc)) from exc
        resolved = hp.resolve(
            hp.from_proto(request.hyperparameters),
            available_modules=spec.lora_target_modules,
            default_modules=spec.default_lora_target_modules,
        )
        record.hyperparameters = dataclasses.asdict(resolved)
        launch = await asyncio.to_thread(self._launch_plan, request, method, resolved, options)
        work = self.work_root / job_id / f"attempt-{attempt}"
        if work.exists():
            shutil.rmtree(work)
        # What crashed attempts left on local disk (their checkpoints are in the artifact store; a
        # stale worker still using it is fenced by attempt number anyway).
        for older in range(1, attempt):
            shutil.rmtree(self.work_root / job_id / f"attempt-{older}", ignore_errors=True)
        data_dir = work / "data"
        dataset_prefix = request.dataset.artifact_path
        await asyncio.to_thread(self.store.get_dir, dataset_prefix, data_dir)
        # Earlier attempts' complete checkpoints, latest first; each is tried in turn, then step 0.
        candidates = (await asyncio.to_thread(complete_checkpoints, self.store, workspace_id, job_id, attempt)
                      if attempt > 1 else [])
        crash_at = _test_crash_hook(resolved.seed)
        loop = asyncio.get_running_loop()
        last_sent = [0.0]
        resumed_from = [0]  # the step this try started from
        trained_past = [False]  # a step after resumed_from completed (so the checkpoint loaded)

        def publish_threadsafe(subject, message) -> None:
            asyncio.run_coroutine_threadsafe(self.bus.publish(subject, message), loop).result(timeout=30)

        def on_progress(report: ProgressReport) -> None:
            self.status.current_step = report.step
            record.history.add(report.step, epoch=report.epoch, train_loss=report.train_loss,
                               eval_loss=report.eval_loss, learning_rate=report.learning_rate)
            if report.step > resumed_from[0]:
                trained_past[0] = True
            if crash_at is not None and report.step >= crash_at:
                log.error("test-only %s=%s: exiting at step %s", TEST_CRASH_AT_STEP_ENV, crash_at, report.step)
                os._exit(TEST_CRASH_EXIT_CODE)
            now = time.monotonic()
            final = report.step >= report.total_steps
            if report.eval_loss is None and not final and now - last_sent[0] < PROGRESS_MIN_INTERVAL:
                return
            last_sent[0] = now
            progress = common_pb2.TrainingProgress(step=report.step, total_steps=report.total_steps, epoch=report.epoch)
            for field in ("train_loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds"):
                value = getattr(report, field)
                if value is not None:
                    setattr(progress, field, float(value))
            publish_threadsafe(subjects.TRAINING_RUN_PROGRESS, ev.TrainingRunProgress(
                meta=self.bus.meta(workspace_id, job_id), attempt=attempt, progress=progress))

        def on_checkpoint(report: CheckpointReport) -> None:
            trained_past[0] = trained_past[0] or report.step > resumed_from[0]
            key = checkpoint_key(workspace_id, job_id, attempt, report.step)
            resumable = upload_checkpoint(self.store, report.path, key, report.step)
            eval_loss = report.eval_loss if report.eval_loss is not None else record.history.eval_loss_at(report.step)
            # A checkpoint without trainer state is the final adapter (trl_common.run_to_completion).
            record.checkpoints[report.step] = run_report.CheckpointMark(report.step, eval_loss, adapter=not resumable)
            event = ev.TrainingRunCheckpoint(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                             step=report.step, artifact_path=key)
            if report.eval_loss is not None:
                event.eval_loss = report.eval_loss
            try:
                publish_threadsafe(subjects.TRAINING_RUN_CHECKPOINT, event)
            except Exception:  # the checkpoint is stored (and marked complete); the event only informs
                log.warning("job %s: could not report the checkpoint at step %s", job_id, report.step, exc_info=True)

        context = TrainingContext(
            job_id=job_id,
            base_model=spec,
            model_dir=model_dir,
            train_file=data_dir / "train.jsonl",
            test_file=data_dir / "test.jsonl",
            output_dir=work / "output",
            hyperparameters=resolved,
            method_options=options,
            seed=resolved.seed,
            report_progress=on_progress,
            report_checkpoint=on_checkpoint,
            should_stop=lambda: self._is_cancelled(job_id),
        )
        started = time.monotonic()
        for candidate in [*candidates, None]:
            resume_dir = None
            if candidate is not None:
                try:
                    resume_dir = await asyncio.to_thread(download_checkpoint, self.store, candidate, work / "resume")
                except CheckpointError as exc:
                    log.warning("job %s attempt %s: the checkpoint at step %s (attempt %s) is unusable: %s; "
                                "trying the next older one", job_id, attempt, candidate.step, candidate.attempt, exc)
                    continue
            resumed_from[0], trained_past[0] = (candidate.step if resume_dir is not None else 0), False
            self.status.current_step = resumed_from[0]
            # The report covers the whole run: what the checkpoint's trainer state logged up to it
            # (HF Trainer saves its log history there), and the earlier attempts' kept checkpoints.
            record.reset(resumed_from[0])
            if resume_dir is not None:
                record.history.add_trainer_state(resume_dir, resumed_from[0])
                for older in candidates:
                    if older.step <= resumed_from[0]:
                        record.checkpoints.setdefault(older.step, run_report.CheckpointMark(
                            older.step, record.history.eval_loss_at(older.step)))
            if attempt > 1:
                log.info("job %s attempt %s: resuming from step %s", job_id, attempt, resumed_from[0])
            await self._publish_started(workspace_id, job_id, attempt, resumed_from[0])
            output_dir = work / "output"
            if output_dir.exists():
                shutil.rmtree(output_dir)
            context.resume_from = resume_dir
            if crash_at == 0:
                log.error("test-only %s=0: exiting as attempt %s starts", TEST_CRASH_AT_STEP_ENV, attempt)
                os._exit(TEST_CRASH_EXIT_CODE)
            try:
                if launch is None:  # one process: the method trains in this one
                    result = await asyncio.to_thread(method.train, context)
                else:
                    result = await self._train_launched(request, attempt, context, launch, work,
                                                        on_progress, on_checkpoint)
                break
            except Exception as exc:
                if resume_dir is None or trained_past[0]:
                    raise
                # Failed before finishing a step: loading the checkpoint failed. Fall back.
                log.warning("job %s attempt %s: resuming from step %s failed (%s: %s); falling back to an "
                            "older checkpoint or step 0", job_id, attempt, resumed_from[0], type(exc).__name__, exc,
                            exc_info=True)
        elapsed = time.monotonic() - started
        adapter_key = f"{attempt_prefix(workspace_id, job_id, attempt)}/adapter"  # never another attempt's
        await asyncio.to_thread(self.store.put_dir, result.adapter_dir, adapter_key)
        # Checkpoints and the adapter are in the artifact store now: the local copy can go.
        await asyncio.to_thread(shutil.rmtree, work, True)
        final = record.checkpoints.get(result.steps)
        record.checkpoints[result.steps] = run_report.CheckpointMark(
            result.steps, final.eval_loss if final and final.eval_loss is not None else result.eval_loss, adapter=True)
        for step, mark in list(record.checkpoints.items()):
            if mark.adapter and step != result.steps:  # only the run's last adapter is the one kept
                record.checkpoints[step] = dataclasses.replace(mark, adapter=False)
        if result.cancelled:
            if record.history.has_losses():  # no field for it in the event: the report is at the usual place
                await self._write_report(request, attempt, record, "cancelled", train_seconds=elapsed,
                                         trained_tokens=result.trained_tokens)
            return ev.TrainingRunCancelled(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                           adapter_path=adapter_key, step=result.steps)
        metrics = training_metrics(result, elapsed)
        report_path = await self._write_report(request, attempt, record, "succeeded", metrics=metrics,
                                               trained_tokens=result.trained_tokens, train_seconds=elapsed)
        kind, _ = await asyncio.to_thread(device_class)
        return ev.TrainingRunSucceeded(meta=self.bus.meta(workspace_id, job_id), attempt=attempt,
                                       adapter_path=adapter_key, metrics=metrics, report_path=report_path,
                                       device_class=kind,
                                       trained_tokens=dataset_tokens_trained(request, result, resumed_from[0]))
