"""Faults in every part: 20 jobs (dataset-only on a Pro workspace, fine-tuning of a tiny stand-in on
an Enterprise workspace) run while, at seeded random points, the job-scheduler, dataset-builder,
model-registry, notifier, trainer and the nats-server itself (JetStream state on disk) are killed
with SIGKILL and restarted by the stack's supervisor. Afterwards every accepted job has ended in
exactly one terminal state, every succeeded training job has exactly one registered model, and
every job's owner got exactly one email.

Real processes throughout (``Stack``: the bundled nats-server and five ``tuneforge serve``
processes), real SQLite, real TRL training, a real SMTP server. The seed is
``TUNEFORGE_CHAOS_SEED`` (default below); a failure prints it with the kill schedule."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
import uuid
from pathlib import Path

import grpc
import pytest

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.core.client import Clients
from tuneforge.plugins import get_registry
from tuneforge.stack import NATS, RestartPolicy, Stack
from tuneforge.trainer.standin import make_standin
from tuneforge import sdk

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("TUNEFORGE_CHAOS_SEED", "20261129"))
TARGETS = ("job-scheduler", "dataset-builder", "model-registry", "notifier", "trainer", NATS)
N_TRAINING_JOBS = 4
N_DATASET_JOBS = 16
EXTRA_KILLS = 4  # beyond one kill of every target
BASE_MODEL = "llama-3.2-1b"
TOPICS = ("billing", "shipping", "returns")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
TERMINAL = {js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED, js.JOB_STATE_CANCELLED}


async def robust(call, *, budget: float = 120.0):
    """``await call()`` again while the service is away (UNAVAILABLE) or too slow to answer while
    it recovers (DEADLINE_EXCEEDED), with back-off. Every call made here is safe to repeat:
    reads, imports (examples are deduplicated by content) and CreateJob with a request_id."""
    deadline = time.monotonic() + budget
    delay = 0.2
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 1.5)


def write_examples(path: Path, per_topic: int) -> Path:
    with open(path, "w") as fh:
        for topic in TOPICS:
            for i in range(per_topic):
                fh.write(json.dumps({
                    "messages": [
                        {"role": "user", "content": f"A {topic} question number {i}: what happens next?"},
                        {"role": "assistant", "content": f"For {topic} case {i}, we look into it and reply today."},
                    ],
                    "topics": [topic],
                }) + "\n")
    return path


class Chaos:
    """Kills one process at a time at seeded random moments; the supervisor restarts it."""

    def __init__(self, stack: Stack, rng: random.Random):
        self.stack = stack
        self.rng = rng
        order = list(TARGETS)
        rng.shuffle(order)
        self.plan = order + [rng.choice(TARGETS) for _ in range(EXTRA_KILLS)]
        self.done: list[tuple[float, str]] = []
        self.started = time.monotonic()

    async def run(self) -> None:
        for target in self.plan:
            await asyncio.sleep(self.rng.uniform(1.5, 5.0))
            await self.wait_up(target)  # a process still restarting is not killed again
            self.stack.kill(target)
            self.done.append((round(time.monotonic() - self.started, 1), target))

    async def wait_up(self, target: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stack.pid(target) is None or (target != NATS and not await asyncio.to_thread(
                Stack._serving, self.stack.endpoints[target])):
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} did not come back:\n{self.stack.log_tail(target)}")
            await asyncio.sleep(0.2)

    def describe(self) -> str:
        return f"seed {SEED}, kills (s after start, process): {self.done}"


@pytest.fixture(scope="module")
def stand_in_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(BASE_MODEL), store)
    return store


def test_every_job_ends_once_while_every_part_is_killed(tmp_path, smtp_server, stand_in_store):
    env = {
        "TUNEFORGE_SMTP_HOST": smtp_server.host,
        "TUNEFORGE_SMTP_PORT": str(smtp_server.port),
        "TUNEFORGE_MODEL_STORE": str(stand_in_store),
        "TUNEFORGE_TRAINING_HEARTBEAT_SECONDS": "1",
        "TUNEFORGE_TRAINING_ACK_WAIT_SECONDS": "6",  # a killed trainer's work comes back quickly
        "TUNEFORGE_EVENT_ACK_WAIT_SECONDS": "4",  # so do events held by a killed service
        "TUNEFORGE_EVENT_RETRY_MAX_SECONDS": "4",
        "OMP_NUM_THREADS": "1",
    }
    stack = Stack(tmp_path / "state", extra_env=env, supervise=True,
                  restart_policy=RestartPolicy(initial_delay=0.2, max_delay=2.0, max_restarts=10),
                  report=lambda line: None)
    with stack:
        chaos = Chaos(stack, random.Random(SEED))
        try:
            outcome = asyncio.run(_drive(stack, chaos, tmp_path, smtp_server))
        except BaseException:
            print(chaos.describe())
            for name in TARGETS:
                print(stack.log_tail(name, 30))
            raise
        time.sleep(2.0)  # would a second email arrive?
        supervisor_log = list(stack.supervisor_log)
    jobs, events, models, training_ids = outcome
    context = chaos.describe()
    attempts = {jobs[j].spec.name: jobs[j].attempt for j in training_ids}
    resumed = sum(1 for j in training_ids for e in events[j] if "resumed from step" in e.message)
    print(f"\nchaos: {context}; restarts by the supervisor: {len(supervisor_log)} lines; "
          f"training attempts {attempts}; resumed-attempt events {resumed}; "
          f"emails {len(smtp_server.messages)}; models {len(models)}")

    # Every target was killed at least once, and each came back.
    assert {t for _, t in chaos.done} == set(TARGETS), context
    assert all(any(line.startswith(f"{t} exited") for line in supervisor_log) for t in TARGETS), supervisor_log
    assert not any("giving up" in line for line in supervisor_log), supervisor_log

    # Exactly the 20 accepted jobs exist (CreateJob retried after a lost reply made no twin).
    assert len(jobs) == N_TRAINING_JOBS + N_DATASET_JOBS, context
    # Every job ended, SUCCEEDED, with exactly one terminal transition in its history.
    for job in jobs.values():
        assert job.state == js.JOB_STATE_SUCCEEDED, (job.spec.name, js.JobState.Name(job.state),
                                                     job.failure_reason, context)
        terminal = [e for e in events[job.id] if e.kind == "state_changed" and e.state in TERMINAL]
        assert len(terminal) == 1, (job.spec.name, [(e.kind, e.state, e.message) for e in events[job.id]])
        states = [e.state for e in events[job.id] if e.kind == "state_changed"]
        assert len(states) == len(set(states)), (job.spec.name, states)  # no state entered twice
    # One registered model per succeeded training job, and none for anything else.
    per_job = collections.Counter(m.job_id for m in models)
    assert per_job == collections.Counter(training_ids), (per_job, training_ids, context)
    # One email per job's terminal state: one Message-ID per job, and no repeats of it.
    by_job: dict[str, list] = collections.defaultdict(list)
    for message in smtp_server.messages:
        by_job[message["X-Tuneforge-Job"]].append(message)
    assert set(by_job) == set(jobs), context
    for job_id, messages in by_job.items():
        assert len({m["Message-ID"] for m in messages}) == 1, (job_id, [m["Subject"] for m in messages])
        assert len(messages) == 1, (job_id, "the same message was sent twice", context)
        assert jobs[job_id].spec.name in messages[0]["Subject"]


async def _drive(stack: Stack, chaos: Chaos, tmp_path: Path, sink):
    from tuneforge.quickstart import create_workspace

    rng = random.Random(SEED + 1)
    endpoints = stack.endpoints
    pro = await robust(lambda: create_workspace(endpoints, stack.admin_token, common_pb2.PLAN_PRO,
                                                "pro@example.com", "Pro"))
    ent = await robust(lambda: create_workspace(endpoints, stack.admin_token, common_pb2.PLAN_ENTERPRISE,
                                                "ent@example.com", "Enterprise"))
    pro_clients = Clients.connect(endpoints, pro.api_key)
    ent_clients = Clients.connect(endpoints, ent.api_key)
    try:
        await sdk.wait_until_authorised(pro_clients)
        await sdk.wait_until_authorised(ent_clients)
        data = write_examples(tmp_path / "examples.jsonl", per_topic=16)
        for clients in (pro_clients, ent_clients):
            await robust(lambda c=clients: sdk.import_file(c, data, timeout=60))

        # Jobs: created one after another at random intervals while the chaos runs.
        # 48 examples: 46 train / 2 test, 3 steps of 16 (few evaluation samples: the trainer is the long pole)
        hp_train = common_pb2.Hyperparameters(max_epochs=1, n_evals=1, min_examples=20, batch_size=16,
                                              test_fraction=0.05)
        plan = [("ent", i) for i in range(N_TRAINING_JOBS)] + [("pro", i) for i in range(N_DATASET_JOBS)]
        rng.shuffle(plan)
        plan.sort(key=lambda p: p[0] != "ent")  # training first: it takes longest
        monkey = asyncio.create_task(chaos.run())
        created: dict[str, tuple[str, js.Job]] = {}
        training_ids: list[str] = []
        for kind, i in plan:
            # training needs min_examples (20): all three topics (48 examples); datasets take any
            topics = list(TOPICS) if kind == "ent" else rng.sample(TOPICS, rng.randint(1, len(TOPICS)))
            clients = ent_clients if kind == "ent" else pro_clients
            spec = js.JobSpec(name=f"chaos-{kind}-{i}", topics=topics, base_model=BASE_MODEL, method="sft")
            if kind == "ent":
                spec.hyperparameters.CopyFrom(hp_train)
            request = js.CreateJobRequest(request_id=uuid.uuid4().hex, spec=spec)
            reply = await robust(lambda c=clients, r=request: c.job_scheduler.CreateJob(r, timeout=15))
            created[reply.job.id] = (kind, reply.job)
            if kind == "ent":
                training_ids.append(reply.job.id)
            await asyncio.sleep(rng.uniform(0.1, 1.2))
        await monkey
        for target in TARGETS:
            await chaos.wait_up(target)

        # Wait until every job is terminal.
        deadline = time.monotonic() + 300  # training 4 jobs one after another on a busy machine
        jobs: dict[str, js.Job] = {}
        while True:
            jobs = {}
            for clients in (pro_clients, ent_clients):
                reply = await robust(lambda c=clients: c.job_scheduler.ListJobs(js.ListJobsRequest(page_size=200)))
                jobs.update({j.id: j for j in reply.jobs})
            if all(j.state in TERMINAL for j in jobs.values()) and len(jobs) >= len(created):
                break
            if time.monotonic() > deadline:
                raise AssertionError("jobs not terminal: " + ", ".join(
                    f"{j.spec.name}={js.JobState.Name(j.state)}" for j in jobs.values() if j.state not in TERMINAL))
            await asyncio.sleep(1.0)
        assert set(jobs) == set(created), (sorted(jobs), sorted(created))

        events = {}
        for job_id, (kind, _) in created.items():
            clients = ent_clients if kind == "ent" else pro_clients
            events[job_id] = await robust(lambda c=clients, j=job_id: sdk.watch_job(c, j, timeout=30))
        models = list((await robust(lambda: ent_clients.model_registry.ListModels(
            mr.ListModelsRequest(page_size=200)))).models)
        models += list((await robust(lambda: pro_clients.model_registry.ListModels(
            mr.ListModelsRequest(page_size=200)))).models)
        # Emails go out shortly after the job ends (the notifier may itself have been restarting).
        deadline = time.monotonic() + 60
        while True:
            seen = {str(m["X-Tuneforge-Job"]) for m in sink.messages}
            if set(created) <= seen or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return jobs, events, models, training_ids
    finally:
        await pro_clients.close()
        await ent_clients.close()

