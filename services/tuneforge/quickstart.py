"""``tuneforge quickstart``: the whole product on one machine in a few minutes.

Starts the embedded stack, creates an Enterprise workspace and API key, makes a Llama 3.2 1B
stand-in, imports the example conversations, fine-tunes on two topics with live progress, and
prints where everything is. Exit code 0 only when the job SUCCEEDED, the model is registered and
the email exists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.core.client import Clients
from tuneforge.core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "conversations.jsonl"
# Llama 3.1 takes tool calls; the example data has tool-call conversations in every topic.
BASE_MODEL = "llama-3.1-8b"
TOPICS = ["billing", "shipping"]


@dataclasses.dataclass
class Outcome:
    job: js.Job
    events: list[js.JobEvent]
    model: mr.Model | None
    deliveries: list[nt.Delivery]
    import_reply: object
    api_key: str
    workspace_id: str


async def create_workspace(endpoints: dict[str, str], admin_token: str, plan: int, email: str, name: str):
    async with Clients.connect(endpoints, admin_token) as admin:
        return await admin.job_scheduler.CreateWorkspace(
            js.CreateWorkspaceRequest(name=name, plan=plan, owner_email=email))


async def run_job(
    endpoints: dict[str, str],
    admin_token: str,
    *,
    examples: Path = EXAMPLES,
    topics: list[str] = TOPICS,
    job_name: str = "support-assistant",
    email: str = "owner@example.com",
    hyperparameters: common_pb2.Hyperparameters | None = None,
    on_event=None,
    plan: int = common_pb2.PLAN_ENTERPRISE,
    method: str = "sft",
    method_options: dict | None = None,
    base_model: str = BASE_MODEL,
    description: str = "Quickstart: customer support on billing and shipping",
) -> Outcome:
    """Workspace → import ``examples`` (a JSONL file) → a ``method`` job on ``base_model`` →
    watch → registry and notifier look-ups."""
    ws = await create_workspace(endpoints, admin_token, plan, email, "Quickstart")
    clients = Clients.connect(endpoints, ws.api_key)
    try:
        await sdk.wait_until_authorised(clients)
        imported = await sdk.import_file(clients, examples)
        if hyperparameters is None:
            # The product's guidance for small data (< 500 examples): 3-5 epochs, not 20.
            hyperparameters = common_pb2.Hyperparameters(max_epochs=3)
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
            name=job_name,
            description=description,
            topics=topics,
            base_model=base_model,
            method=method,
            method_options_json=json.dumps(method_options or {}),
            hyperparameters=hyperparameters,
        )))
        events = await sdk.watch_job(clients, created.job.id, on_event, timeout=1800)
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=created.job.id))).job
        model = None
        if job.state == js.JOB_STATE_SUCCEEDED and not job.dataset_only:
            model = (await clients.model_registry.GetModel(mr.GetModelRequest(model=job_name))).model
        deliveries: list[nt.Delivery] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = await clients.notifier.ListDeliveries(nt.ListDeliveriesRequest(job_id=job.id))
            deliveries = list(reply.deliveries)
            if any(d.state == nt.DELIVERY_STATE_SENT for d in deliveries):
                break
            await asyncio.sleep(0.2)
        return Outcome(job, events, model, deliveries, imported, ws.api_key, ws.workspace.id)
    finally:
        await clients.close()


class ProgressView:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} steps"),
            TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), console=console,
        )
        self.task = None
        self.train_loss: float | None = None
        self.eval_loss: float | None = None

    def __call__(self, event: js.JobEvent) -> None:
        state = js.JobState.Name(event.state).removeprefix("JOB_STATE_")
        if event.kind == "progress":
            p = event.progress
            if p.HasField("train_loss"):
                self.train_loss = p.train_loss
            if p.HasField("eval_loss"):
                self.eval_loss = p.eval_loss
            losses = []
            if self.train_loss is not None:
                losses.append(f"loss {self.train_loss:.4f}")
            if self.eval_loss is not None:
                losses.append(f"eval loss {self.eval_loss:.4f}")
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task("train", total=p.total_steps, losses="")
            self.progress.update(self.task, completed=p.step, total=p.total_steps, losses="  ".join(losses))
            return
        if self.task is not None and state != "TRAINING":
            self.progress.stop()
        self.progress.console.print(f"[cyan]{state:16s}[/] {event.message}")

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def main(data_dir: Path, keep_running: bool = False) -> int:
    from tuneforge.plugins import get_registry
    from tuneforge.stack import Stack
    from tuneforge.trainer.standin import make_standin

    console = Console()
    started = time.monotonic()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    console.print(f"[bold]tuneforge quickstart[/] (state in {data_dir})")
    spec = get_registry().base_model(BASE_MODEL)
    model_dir = make_standin(spec, data_dir / "models")
    console.print(f"stand-in {spec.display_name} (random weights, not the real model) in {model_dir}")
    stack = Stack(data_dir, supervise=True)  # a service that dies is restarted, as under `tuneforge up`
    stack.start()
    console.print("stack up: nats-server + " + ", ".join(f"{s} ({t})" for s, t in stack.endpoints.items()))
    view = ProgressView(console)
    try:
        outcome = asyncio.run(run_job(stack.endpoints, stack.admin_token, on_event=view))
    except BaseException:
        view.close()
        for service in stack.endpoints:
            console.print(stack.log_tail(service, 15))
        stack.stop()
        raise
    view.close()
    job = outcome.job
    ok = job.state == js.JOB_STATE_SUCCEEDED
    table = Table(title="quickstart summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("job", f"{job.spec.name} ({job.id})")
    table.add_row("state", js.JobState.Name(job.state).removeprefix("JOB_STATE_")
                  + (f": {job.failure_reason}" if job.failure_reason else ""))
    imp = outcome.import_reply
    table.add_row("imported", f"{imp.imported} examples from {EXAMPLES.name} ({imp.rejected} rejected)")
    d = job.dataset
    table.add_row("dataset", f"{d.dataset_id}: {d.train_count} train / {d.test_count} test, topics "
                  + ", ".join(f"{t}={n}" for t, n in sorted(d.topic_counts.items())))
    # Where the stack's services put artifacts: <data dir>/artifacts, or $TUNEFORGE_ARTIFACT_URL (s3://...).
    artifacts = Settings(data_dir=data_dir).resolved_artifact_url().removeprefix("file://")
    table.add_row("dataset files", f"{artifacts}/{d.artifact_path}")
    if outcome.model is not None:
        m = outcome.model
        table.add_row("model", f"{m.name} ({m.id}) on {m.base_model}, eval loss "
                      + (f"{m.metrics.eval_loss:.4f}" if m.metrics.HasField("eval_loss") else "n/a")
                      + f", {m.metrics.steps} steps")
        table.add_row("adapter", f"{artifacts}/{m.adapter_path}")
    else:
        ok = False
        table.add_row("model", "[red]not registered[/]")
    sent = [x for x in outcome.deliveries if x.state == nt.DELIVERY_STATE_SENT]
    if sent and Path(sent[0].destination).exists():
        table.add_row("email", f"{sent[0].subject!r} to {sent[0].recipient}: {sent[0].destination}")
    else:
        ok = False
        table.add_row("email", "[red]missing[/]")
    table.add_row("time", f"{time.monotonic() - started:.0f} s")
    console.print(table)
    return finish(console, stack, "quickstart", ok,
                  f"stack still running; API key: {outcome.api_key}\nCtrl-C to stop" if keep_running else None)


def finish(console, stack, what: str, ok: bool, keep_running_message: str | None) -> int:
    """Leave the stack up until Ctrl-C when asked (printing how to use it), stop it, say how it went."""
    if keep_running_message:
        console.print(keep_running_message)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    stack.stop()
    console.print(f"[green]{what} succeeded[/]" if ok else f"[red]{what} failed[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(".tuneforge/quickstart").resolve()))
