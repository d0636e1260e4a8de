"""The supervised stack, as ``tuneforge up`` runs it: real processes (a bundled nats-server and
five ``tuneforge serve`` processes), real TRL training of a tiny stand-in, a real SMTP sink.

One stack for the module (starting one costs more than most of these tests):
1. Two training jobs. One crashes the trainer process as each attempt starts training (the
   test-only hook ``TUNEFORGE_TEST_CRASH_AT_STEP`` / ``_SEED`` in trainer/worker.py; at step 0 so
   that its 4 attempts do not each pay for loading torch); the other is SIGKILLed by the test
   right after its first checkpoint. The supervisor restarts the trainer each time, the other
   processes keep their pids; the killed job's next attempt resumes from its checkpoint and
   SUCCEEDS (one model, one email); the crashing job is tried 4 times, then FAILS with the reason
   (one email), and the other job still ends.
2. nats-server is killed; the supervisor restarts it on the same port with its JetStream store,
   and the stack still runs a job end to end.
3. A service that cannot start any more crash-loops: reported (name, exit status, log lines) and
   given up on; the rest keep serving.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.core.client import Clients
from tuneforge.core.nats_server import free_port
from tuneforge.plugins import get_registry
from tuneforge.quickstart import BASE_MODEL, EXAMPLES, create_workspace
from tuneforge.stack import NATS, RestartPolicy, Stack
from tuneforge.trainer import worker
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration

CRASH_SEED = 7  # jobs with this seed crash the trainer ...
CRASH_AT_STEP = 0  # ... as each attempt starts training
SERVICES = ("dataset-builder", "job-scheduler", "trainer", "model-registry", "notifier")


@pytest.fixture(scope="module")
def smtp_sink():
    from aiosmtpd.controller import Controller
    from conftest import SmtpSink, _CollectingHandler

    sink = SmtpSink(host="127.0.0.1", port=free_port())
    controller = Controller(_CollectingHandler(sink), hostname=sink.host, port=sink.port)
    controller.start()
    yield sink
    controller.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smtp_sink):
    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(BASE_MODEL), store)
    env = {
        "TUNEFORGE_SMTP_HOST": smtp_sink.host,
        "TUNEFORGE_SMTP_PORT": str(smtp_sink.port),
        "TUNEFORGE_MODEL_STORE": str(store),
        # A dead worker's item comes back after 1 s, then 2, 4, 8 s (worker.redelivery_backoff).
        "TUNEFORGE_TRAINING_ACK_WAIT_SECONDS": "1",
        "TUNEFORGE_TRAINING_HEARTBEAT_SECONDS": "0.3",
        "OMP_NUM_THREADS": "1",
        worker.TEST_CRASH_AT_STEP_ENV: str(CRASH_AT_STEP),
        worker.TEST_CRASH_SEED_ENV: str(CRASH_SEED),
    }
    # tuneforge up's policy, with shorter delays, and room for the trainer's 5 deliberate deaths.
    policy = RestartPolicy(initial_delay=0.2, max_delay=2.0, max_restarts=10)
    with Stack(tmp_path_factory.mktemp("state"), extra_env=env, supervise=True, restart_policy=policy) as running:
        yield running


def _spec(name: str, topic: str, **hyperparameters) -> js.JobSpec:
    return js.JobSpec(name=name, topics=[topic], base_model=BASE_MODEL, method="sft",
                      hyperparameters=common_pb2.Hyperparameters(max_epochs=1, min_examples=100, n_evals=0,
                                                                 **hyperparameters))


def _messages(events) -> list[str]:
    return [e.message for e in events]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


async def _connect(stack: Stack, plan: int, email: str):
    reply = await create_workspace(stack.endpoints, stack.admin_token, plan, email, "W")
    clients = Clients.connect(stack.endpoints, reply.api_key)
    await sdk.wait_until_authorised(clients)
    return clients


def _resumes(events) -> list[tuple[int, int]]:
    """(attempt, step) of every "attempt N on W resumed from step S" in a job's events."""
    found = (re.search(r"attempt (\d+) on \S+ resumed from step (\d+)", m) for m in _messages(events))
    return [(int(m[1]), int(m[2])) for m in found if m]


def _emails(sink, job_name: str) -> list:
    return [m for m in sink.messages if job_name in m["Subject"]]


def test_a_killed_trainer_comes_back_and_the_job_resumes(stack, smtp_sink):
    pids_before = stack.pids()
    assert set(pids_before) == {NATS, *SERVICES} and all(pids_before.values())
    killed = {}

    async def scenario():
        clients = await _connect(stack, common_pb2.PLAN_ENTERPRISE, "owner@example.com")
        try:
            imported = await sdk.import_file(clients, EXAMPLES)
            assert imported.imported > 400
            # ~112 train examples, batch 8: 14 steps each.
            crashing = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=_spec(
                "always-crashes", "shipping", seed=CRASH_SEED)))
            resumed = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=_spec(
                "resumed-after-kill", "billing", n_checkpoints=4)))  # checkpoints at 4, 7, 11

            def on_event(event: js.JobEvent) -> None:
                if event.kind == "checkpoint" and not killed:
                    # attempt 1 is training this job right now: kill -9 its process
                    killed["step"] = int(event.message.rsplit(" ", 1)[1])
                    killed["pid"] = stack.kill("trainer")

            resumed_events, crashing_events = await asyncio.gather(
                sdk.watch_job(clients, resumed.job.id, on_event, timeout=400),
                sdk.watch_job(clients, crashing.job.id, timeout=400))
            jobs = {}
            for created in (resumed, crashing):
                jobs[created.job.spec.name] = (await clients.job_scheduler.GetJob(
                    js.GetJobRequest(job_id=created.job.id))).job
            models = (await clients.model_registry.ListModels(mr.ListModelsRequest())).models
            return jobs, resumed_events, crashing_events, list(models)
        finally:
            await clients.close()

    jobs, resumed_events, crashing_events, models = asyncio.run(scenario())
    log = "\n".join(stack.supervisor_log)

    # The killed job: SUCCEEDED, attempt 2 (or later) resumed from a checkpoint step > 0.
    job = jobs["resumed-after-kill"]
    assert job.state == js.JOB_STATE_SUCCEEDED, (job.failure_reason, _messages(resumed_events))
    assert killed and killed["step"] > 0, killed
    resumes = _resumes(resumed_events)
    assert resumes and resumes[-1][0] >= 2 and resumes[-1][1] >= killed["step"] > 0, _messages(resumed_events)
    assert job.attempt == resumes[-1][0] and job.metrics.steps == 14
    progress = [e.progress.step for e in resumed_events if e.kind == "progress"]
    assert progress[-1] == 14
    # the trainer came back: restarted by the supervisor, and said so
    assert "trainer exited with -9; restarting in" in log, log
    assert stack.pid("trainer") not in (None, pids_before["trainer"], killed["pid"])
    # ... and nothing else was restarted
    after = stack.pids()
    assert {name: after[name] for name in after if name != "trainer"} == \
        {name: pids_before[name] for name in pids_before if name != "trainer"}

    # The job that crashes the trainer every time: 4 attempts, then FAILED with the reason.
    job = jobs["always-crashes"]
    assert job.state == js.JOB_STATE_FAILED, _messages(crashing_events)
    assert job.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
    assert job.failure_reason == (f"the trainer stopped during {worker.MAX_ATTEMPTS} attempts "
                                  "(before its first checkpoint); giving up"), job.failure_reason
    assert _resumes(crashing_events) == [(n, 0) for n in range(2, worker.MAX_ATTEMPTS + 1)], \
        _messages(crashing_events)
    assert log.count(f"trainer exited with {worker.TEST_CRASH_EXIT_CODE}; restarting") == worker.MAX_ATTEMPTS, log

    # Exactly one model (the job that succeeded, its last attempt's adapter) and one email per job.
    assert [m.name for m in models] == ["resumed-after-kill"]
    _wait(lambda: len(smtp_sink.messages) >= 2, 30, "two emails")
    time.sleep(1.0)  # would a third arrive?
    assert len(_emails(smtp_sink, "resumed-after-kill")) == 1
    assert len(_emails(smtp_sink, "always-crashes")) == 1
    assert len(smtp_sink.messages) == 2


async def _jetstream_state(url: str) -> tuple[int, float]:
    """(messages in the events stream, the durable work consumer's ack_wait)."""
    import nats

    from tuneforge.core import subjects

    nc = await nats.connect(url, max_reconnect_attempts=20, reconnect_time_wait=0.25)
    try:
        js_ctx = nc.jetstream()
        events = await js_ctx.stream_info(subjects.EVENTS_STREAM)
        consumer = await js_ctx.consumer_info(subjects.WORK_STREAM, worker.work_consumer_name("small"))
        return events.state.messages, consumer.config.ack_wait
    finally:
        await nc.close()


def test_nats_server_is_restarted_on_its_port_with_its_store(stack, smtp_sink, tmp_path):
    before = stack.pids()
    url = stack.nats_url
    asyncio.run(create_workspace(stack.endpoints, stack.admin_token, common_pb2.PLAN_STARTER, "a@example.com", "A"))
    # At least that workspace's event (relayed by the outbox, so not at once), and the trainers' consumer.
    _wait(lambda: asyncio.run(_jetstream_state(url))[0] > 0, 15, "the workspace event in the events stream")
    messages, ack_wait = asyncio.run(_jetstream_state(url))
    assert messages > 0 and ack_wait == 1.0
    stack.kill(NATS)
    _wait(lambda: stack.pid(NATS) not in (None, before[NATS]), 30, "nats-server to come back")
    assert stack.nats_url == url and stack.nats.url == url
    assert any(line.startswith("nats-server exited with -9; restarting in") for line in stack.supervisor_log)
    assert {s: stack.pid(s) for s in SERVICES} == {s: before[s] for s in SERVICES}  # they reconnected
    # The JetStream store on disk came back with it: the history and the durable consumers.
    after_messages, after_ack_wait = asyncio.run(_jetstream_state(url))
    assert after_messages >= messages and after_ack_wait == ack_wait

    examples = tmp_path / "a.jsonl"
    examples.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"after the restart {i}"}, {"role": "assistant", "content": f"ok {i}"}]}) + "\n"
        for i in range(30)))

    async def scenario():
        clients = await _connect(stack, common_pb2.PLAN_STARTER, "starter@example.com")
        try:
            await sdk.import_file(clients, examples)
            created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
                name="after-nats-restart", base_model=BASE_MODEL, method="sft")))
            return await sdk.watch_job(clients, created.job.id, timeout=90)
        finally:
            await clients.close()

    events = asyncio.run(scenario())
    assert events[-1].state == js.JOB_STATE_SUCCEEDED, _messages(events)
    _wait(lambda: _emails(smtp_sink, "after-nats-restart"), 30, "the email")


def _children(parent: int) -> dict[str, int]:
    """``tuneforge serve <service>`` children of ``parent``, by service (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and "serve" in argv:
            found[argv[argv.index("serve") + 1]] = int(entry.name)
    return found


def test_tuneforge_up_restarts_a_killed_service_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess

    data_dir = tmp_path / "state"
    up = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), "up"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait(lambda: (data_dir / "stack.json").exists() or up.poll() is not None, 90, "tuneforge up")
        assert up.poll() is None, up.communicate()
        endpoints = json.loads((data_dir / "stack.json").read_text())["endpoints"]
        before = _children(up.pid)
        assert set(before) == set(SERVICES), before
        os.kill(before["model-registry"], signal.SIGKILL)
        after = _wait(lambda: (c := _children(up.pid)).get("model-registry") not in (None, before["model-registry"])
                      and c, 30, "the model-registry to be restarted")
        assert {s: after[s] for s in SERVICES if s != "model-registry"} == \
            {s: before[s] for s in SERVICES if s != "model-registry"}
        _wait(lambda: Stack._serving(endpoints["model-registry"]), 60, "the restarted model-registry to serve")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            out, err = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert up.returncode == 0, err
    assert "model-registry exited with -9; restarting in 0.5s (restart 1)" in err, err
    assert "stopping ..." in out
    assert not (data_dir / "stack.json").exists()
    assert not [pid for pid in after.values() if Path(f"/proc/{pid}").exists()]  # all stopped


def test_a_crash_looping_service_is_reported_and_given_up_on(stack):
    stack.restart_policy = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=3, window=60)
    # From now on the notifier cannot start (as with a broken configuration).
    stack.commands["notifier"] = [sys.executable, "-c",
                                  "import sys; print('notifier: cannot start: bad configuration (test)'); sys.exit(3)"]
    others = {s: stack.pid(s) for s in (NATS, *SERVICES) if s != "notifier"}
    stack.kill("notifier")
    _wait(lambda: stack.supervised["notifier"].gave_up, 30, "the supervisor to give up")
    report = stack.supervisor_log[-1]
    assert report.startswith("notifier exited with 3 again after 3 restarts in the last 60s: it is crash-looping; "
                             "giving up on it"), report
    assert "notifier: cannot start: bad configuration (test)" in report  # the last log lines
    assert [line.split(";")[0] for line in stack.supervisor_log if line.startswith("notifier exited")] == [
        "notifier exited with -9", "notifier exited with 3", "notifier exited with 3",
        "notifier exited with 3 again after 3 restarts in the last 60s: it is crash-looping"]
    time.sleep(0.5)
    assert stack.restarts("notifier") == 3 and stack.pid("notifier") is None  # no further restarts
    assert {s: stack.pid(s) for s in others} == others
    assert all(Stack._serving(stack.endpoints[s]) for s in SERVICES if s != "notifier")
