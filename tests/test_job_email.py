"""The job emails as a person reads them, end to end: the five services in-process (real NATS, real
gRPC on loopback, SQLite, the outbox directory instead of SMTP), real TRL/peft training of a
stand-in.

1. A finished Enterprise SFT job: the .eml is multipart with a text/plain part, a text/html part and
   an image/png part the HTML references by Content-ID; the figures in it equal GetJob's; the PNG
   is the loss.png at the job's report_path, and report.json holds the job's figures.
2. A job that fails in training (its base model has no weights on the trainer): the email says why
   and how to fix it, with no picture (there were no losses).
3. A report whose loss.png cannot be read: the email still goes out, without the picture.
The trainer announces itself (TrainerWorkerSeen) all along, every period.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import html
import json
import logging
import re
from pathlib import Path

import pytest

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.core import hyperparameters as hp
from tuneforge.core import subjects
from tuneforge.core.storage import ArtifactStore
from tuneforge.notifier import messages
from tuneforge.quickstart import BASE_MODEL, run_job
from tuneforge.trainer import report as run_report
from tuneforge.trainer import worker as w
from conftest import ADMIN
from test_report import expected_device

JOB_NAME = "billing-email"
NO_WEIGHTS_MODEL = "llama-3.1-70b"  # no stand-in is made for it: training fails for want of weights
# 125 billing examples -> 113 train / 12 test; batch 32 -> 4 steps; a checkpoint at 2; evaluations at 2 and 4.
HYPERPARAMETERS = common_pb2.Hyperparameters(max_epochs=1, batch_size=32, n_evals=2, n_checkpoints=2,
                                             min_examples=50, early_stopping_patience=0, lora_rank=4)
SEEN_PERIOD = 1


@pytest.fixture(autouse=True)
def _announce_every_second(monkeypatch):
    """Set before the services start: the trainer reads it when its worker starts."""
    monkeypatch.setenv(w.WORKER_SEEN_PERIOD_ENV, str(SEEN_PERIOD))
    # The CPU worker takes every pool's work, so the 70B job (pool gpu-4x80g) reaches it and fails there.
    monkeypatch.setenv("TUNEFORGE_TRAINER_POOLS", "small,gpu-24g,gpu-80g,gpu-4x80g,gpu-8x80g")


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """This module trains: one torch thread (tests/conftest.py)."""


def _read_eml(path: str) -> email.message.EmailMessage:
    return email.message_from_bytes(Path(path).read_bytes(), policy=email.policy.default)


def _parts(message) -> dict[str, list]:
    out: dict[str, list] = {}
    for part in message.walk():
        out.setdefault(part.get_content_type(), []).append(part)
    return out


def _figures(page: str) -> dict[str, str]:
    """The ``data-figure`` cells of the HTML part, unescaped."""
    return {name: html.unescape(re.sub(r"<[^>]+>", "", value))
            for name, value in re.findall(r'data-figure="([a-z_]+)">(.*?)</(?:td|p)>', page)}


async def _wait_for_delivery(clients, job_id: str):
    for _ in range(300):
        reply = await clients.notifier.ListDeliveries(nt.ListDeliveriesRequest(job_id=job_id))
        sent = [d for d in reply.deliveries if d.state == nt.DELIVERY_STATE_SENT]
        if sent:
            return sent
        await asyncio.sleep(0.1)
    raise AssertionError(f"no email was sent for {job_id}")


async def test_job_emails_carry_the_plot_the_figures_and_what_to_do_next(services, caplog):
    import nats

    from tuneforge.core.client import Clients
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    endpoints, settings = services
    make_standin(get_registry().base_model(BASE_MODEL), settings.resolved_model_store())
    store = ArtifactStore(settings.resolved_artifact_url())
    seen: list[ev.TrainerWorkerSeen] = []
    nc = await nats.connect(settings.nats_url)

    async def on_seen(msg):
        seen.append(ev.TrainerWorkerSeen.FromString(msg.data))

    await nc.subscribe(subjects.TRAINER_WORKER_SEEN, cb=on_seen)
    try:
        # --- 1. a finished training job -------------------------------------------------------
        outcome = await run_job(endpoints, ADMIN, topics=["billing"], job_name=JOB_NAME, email="owner@example.com",
                                hyperparameters=HYPERPARAMETERS, base_model=BASE_MODEL)
        job = outcome.job
        assert job.state == js.JOB_STATE_SUCCEEDED, job.failure_reason
        assert job.report_path == f"{w.attempt_prefix(outcome.workspace_id, job.id, job.attempt)}/report"
        (delivery,) = [d for d in outcome.deliveries if d.state == nt.DELIVERY_STATE_SENT]
        message = _read_eml(delivery.destination)
        assert message.get_content_type() == "multipart/alternative"
        parts = _parts(message)
        (text_part,) = parts["text/plain"]
        (html_part,) = parts["text/html"]
        (png_part,) = parts["image/png"]
        assert parts["multipart/related"], "the HTML and its image belong together"
        text, page = text_part.get_content(), html_part.get_content()

        # The image is the one the HTML shows, and the run's loss.png.
        cid = png_part["Content-ID"].strip("<>")
        assert f'src="cid:{cid}"' in page
        assert png_part.get_content_disposition() == "inline"
        png = png_part.get_content()
        assert png == store.get_bytes(f"{job.report_path}/{run_report.LOSS_PNG}")
        assert png.startswith(b"\x89PNG\r\n\x1a\n")

        # The figures in the email are the job's.
        m, d = job.metrics, job.dataset
        assert m.steps == 4 and m.HasField("eval_loss") and m.HasField("base_eval_loss")
        figures = _figures(page)
        assert figures["steps"] == str(m.steps)
        assert figures["epochs"] == f"{m.epochs:.2f}"
        assert figures["eval_loss"] == f"{m.eval_loss:.4f}"
        assert figures["base_eval_loss"] == f"{m.base_eval_loss:.4f}"
        assert (figures["train_count"], figures["test_count"]) == (str(d.train_count), str(d.test_count))
        assert (figures["base_model"], figures["method"]) == (BASE_MODEL, "SFT")
        assert f"Training: {m.steps} steps, {m.epochs:.2f} epochs, final eval loss {m.eval_loss:.4f}" in text
        assert f"Eval loss: base {m.base_eval_loss:.4f} -> fine-tuned {m.eval_loss:.4f}" in text
        assert f"{d.train_count} training examples, {d.test_count} evaluation examples" in text
        # The samples side by side, HTML-escaped.
        assert len(m.samples) == 5
        for sample in m.samples:
            for value in (sample.prompt, sample.reference, sample.base_answer, sample.tuned_answer):
                assert html.escape(value.strip()[:60]) in page
        # What to do next, in both parts.
        for command in (f"tuneforge models get {JOB_NAME}", f"tuneforge models download {JOB_NAME} ./{JOB_NAME}",
                        f"tuneforge models assign {JOB_NAME} --agent AGENT_ID", f"tuneforge models resolve {JOB_NAME}"):
            assert command in text and html.escape(command) in page
        assert "ResolveModel(name)" in text and "ResolveModel(name)" in page

        # report.json holds the job's figures.
        report = json.loads(store.get_bytes(f"{job.report_path}/{run_report.REPORT_JSON}"))
        assert (report["job_id"], report["base_model"], report["method"], report["outcome"]) == (
            job.id, BASE_MODEL, "sft", "succeeded")
        assert report["metrics"] == run_report.proto_to_plain(m)
        assert report["dataset"] == run_report.proto_to_plain(d)
        for name, value in hp.from_proto(job.resolved_hyperparameters).items():
            assert report["hyperparameters"][name] == (list(value) if isinstance(value, tuple) else value), name
        assert [p["step"] for p in report["history"]] == [1, 2, 3, 4]
        assert [p["step"] for p in report["history"] if p["eval_loss"] is not None] == [2, 4]
        assert report["history"][-1]["eval_loss"] == m.eval_loss
        assert [c["step"] for c in report["checkpoints"]] == [2, 4]
        best = min(report["checkpoints"], key=lambda c: c["eval_loss"])
        assert report["best_checkpoint"] == {"step": best["step"], "eval_loss": best["eval_loss"]}
        assert report["device_class"] == expected_device()[0] and report["trained_tokens"] > 0
        assert report["train_seconds"] == m.train_seconds

        # --- 2. a job that fails in training ----------------------------------------------------
        failed = await run_job(endpoints, ADMIN, topics=["billing"], job_name="no-weights", email="owner@example.com",
                               hyperparameters=HYPERPARAMETERS, base_model=NO_WEIGHTS_MODEL)
        job2 = failed.job
        assert job2.state == js.JOB_STATE_FAILED and job2.failure_kind == common_pb2.FAILURE_KIND_SYSTEM
        assert job2.report_path == ""  # it never logged a loss
        (delivery,) = [d for d in failed.deliveries if d.state == nt.DELIVERY_STATE_SENT]
        message = _read_eml(delivery.destination)
        parts = _parts(message)
        assert "image/png" not in parts
        text, page = parts["text/plain"][0].get_content(), parts["text/html"][0].get_content()
        assert "failed while training because of a platform error" in text
        assert job2.failure_reason in text and f"no weights for {NO_WEIGHTS_MODEL}" in job2.failure_reason
        assert "How to fix it:" in text
        assert "an administrator must place them in the model store" in text
        assert f"tuneforge jobs events {job2.id}" in text
        assert _figures(page)["reason"] == job2.failure_reason
        assert "How to fix it" in page and "cid:" not in page

        # --- 3. a report whose plot cannot be read: the email goes out without it ---------------
        notifier = services.apps["notifier"]
        event = ev.JobSucceeded(meta=notifier.bus.meta(outcome.workspace_id, "job_no_plot"), job_name="<no plot>",
                                owner_email="owner@example.com", dataset=d, model_name="no-plot", model_id="mdl_x",
                                metrics=m, base_model=BASE_MODEL, method="sft",
                                report_path=f"runs/{outcome.workspace_id}/job_no_plot/attempt-1/report")
        with caplog.at_level(logging.WARNING, logger="tuneforge.notifier.service"):
            await notifier.bus.publish(subjects.JOB_SUCCEEDED, event)
            clients = Clients.connect(endpoints, outcome.api_key)
            try:
                (delivery,) = await _wait_for_delivery(clients, "job_no_plot")
            finally:
                await clients.close()
        parts = _parts(_read_eml(delivery.destination))
        assert set(parts) >= {"text/plain", "text/html"} and "image/png" not in parts
        page = parts["text/html"][0].get_content()
        assert "cid:" not in page and "&lt;no plot&gt;" in page and "<no plot>" not in page
        assert any("loss plot" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)

        # The trainer announced itself at start and every period since.
        worker_id = services.apps["trainer"].worker.status.worker_id
        assert len(seen) >= 3 and {s.worker_id for s in seen} == {worker_id}
        assert {(s.device_class, s.device_count, s.period_seconds) for s in seen} == {(*expected_device(), SEEN_PERIOD)}
    finally:
        await nc.close()


def test_the_html_part_escapes_what_users_and_models_wrote() -> None:
    event = ev.JobSucceeded(job_name="<b>x</b>", model_name="m&m", model_id="mdl_1", base_model="b", method="sft")
    event.metrics.steps = 3
    event.metrics.samples.add(prompt="<script>alert(1)</script>", reference="a < b", base_answer='"q"',
                              tuned_answer="x & y")
    page = messages.job_succeeded_html(event, plot_cid="loss.d@tuneforge")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt; b" in page and "&quot;q&quot;" in page and "x &amp; y" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert 'src="cid:loss.d@tuneforge"' in page
    assert "cid:" not in messages.job_succeeded_html(event)  # no plot: no picture

    failed = ev.JobFailed(job_name="j", reason="needs at least 200 examples (min_examples) but only 120 remain",
                          failure_kind=common_pb2.FAILURE_KIND_USER, failed_in_state="JOB_STATE_BUILDING_DATASET")
    _, text = messages.job_failed(failed)
    assert "failed while building dataset because of your data or settings" in text
    assert "lower hyperparameters.min_examples" in text and "tuneforge jobs validate" in text
