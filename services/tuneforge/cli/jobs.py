"""``tuneforge jobs create|validate|list|get|watch|cancel|events|checkpoints``: fine-tuning jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from tuneforge.cli.common import (
    EXIT_OK, EXIT_USER_ERROR, UsageError, _clients, _data_dir, _human_count, _parse_options, _parse_sets,
    _truncate, add_json, add_paging, message_dict, next_page_command, note, pages, print_json, print_page_hint, run,
    state_name,
    table, timestamp_text, wants_json,
)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# A lost connection while watching (a restarted job-scheduler, a network blip, the stream's own
# deadline on a long job): reconnect with back-off, resuming after the last event seen.
RECONNECT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "CANCELLED")
RECONNECT_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


# -- the job a command line describes -------------------------------------------------------------
def _add_spec_arguments(p) -> None:
    p.add_argument("--name", required=True, help="job name; also the registered model's name")
    p.add_argument("--description")
    p.add_argument("--base-model", required=True, help="catalog id (tuneforge models catalog)")
    p.add_argument("--method", default="sft", help="sft or dpo (or a plugin's method)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. beta=0.1 for dpo (repeatable)")
    p.add_argument("--topic", action="append", help="topic filter (repeatable; default all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="hyperparameter (repeatable)")
    p.add_argument("--notify", help="email to notify (default: workspace owner)")
    p.add_argument("--overlength", choices=["drop", "truncate"], default="drop",
                   help="examples over the base model's context length (default drop)")
    add_json(p)


def _spec(args):
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    return js.JobSpec(name=args.name, description=args.description or "", topics=args.topic or [],
                      base_model=args.base_model, method=args.method,
                      method_options_json=_parse_options(args.option or []),
                      hyperparameters=_parse_sets(args.set or []), notify_email=args.notify or "",
                      overlength_policy=common_pb2.OverlengthPolicy.Value(f"OVERLENGTH_POLICY_{args.overlength.upper()}"))


# -- create ---------------------------------------------------------------------------------------
def cmd_job_create(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    key = args.idempotency_key or uuid.uuid4().hex

    async def work():
        request = js.CreateJobRequest(spec=_spec(args), request_id=key)
        async with _clients(args) as clients:
            # Retried by the client while the job-scheduler is unavailable: the idempotency key
            # makes a retry return the job the first try created.
            reply = await clients.job_scheduler.CreateJob(request)
        if not args.watch:
            if wants_json(args):
                print_json(reply)
            else:
                print(f"job {reply.job.id} created ({state_name(reply.job.state)})")
                for w in reply.warnings:
                    print(f"  warning: {w}")
                print(f"follow it: tuneforge jobs watch {reply.job.id}")
            return EXIT_OK
        for w in reply.warnings:
            note(f"warning: {w}")
        note(f"job {reply.job.id} created")
        return await _watch(args, reply.job.id)

    return run(args, work())


# -- validate (the dry run) -----------------------------------------------------------------------
def cmd_job_validate(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=_spec(args)))
        if wants_json(args):
            print_json(reply)
        else:
            print_plan(args.name, args.base_model, args.method, reply)
        return EXIT_OK

    return run(args, work())


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _steps_text(steps, limit: int = 12) -> str:
    steps = list(steps)
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", … ({len(steps)} in all)" if len(steps) > limit else "")


def lr_plot(points, width: int = 48, height: int = 6) -> list[str]:
    """The learning-rate schedule as a few lines of text: linear between the plan's points."""
    points = sorted((p.step, p.learning_rate) for p in points)
    if not points:
        return []
    first, last = points[0][0], points[-1][0]
    top = max(lr for _, lr in points) or 1.0
    low = min(lr for _, lr in points)

    def at(step: float) -> float:
        for (s0, v0), (s1, v1) in zip(points, points[1:]):
            if s0 <= step <= s1:
                return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return points[-1][1]

    columns = [at(first + (last - first) * i / max(1, width - 1)) for i in range(width)]
    span = (top - low) or top
    rows = []
    for r in range(height, 0, -1):
        threshold = low + span * (r - 1) / height if top != low else top * (r - 1) / height  # the floor row is full
        rows.append("".join("█" if v >= threshold - 1e-9 * top else " " for v in columns))  # float slack
    labels = [f"{top:.2e} ┤", *([" " * 9 + "│"] * (height - 2)), f"{low:.2e} ┤"]
    out = [f"{label}{row}" for label, row in zip(labels, rows)]
    out.append(" " * 10 + f"step {first}".ljust(width - len(f"step {last}")) + f"step {last}")
    return out


def print_plan(name: str, base_model: str, method: str, reply) -> None:
    d, t, hp = reply.dataset_plan, reply.training_plan, reply.resolved_hyperparameters
    print(f"{name}: {method} on {base_model} — "
          + ("dataset only (the plan does not train; Enterprise does)" if reply.dataset_only else "would train"))
    if reply.HasField("dataset_plan"):
        print("dataset, counted now (nothing is stored by a dry run)")
        rows = [
            ("examples in the workspace", f"{d.workspace_examples:,}"),
            ("with the job's topics", f"{d.after_topics:,}"),
            ("of the method's formats", f"{d.after_formats:,}"),
            ("after removing duplicates", f"{d.after_dedupe:,}"),
            ("over the context length", f"{d.overlength:,}"),
            ("kept", f"{d.after_overlength:,}"),
            ("split", f"{d.train_count:,} train / {d.test_count:,} test"),
        ]
        if d.tokenizer:
            rows.append(("tokens", f"{_human_count(d.train_tokens)} train, {_human_count(d.test_tokens)} test "
                                   f"({d.tokenizer} tokenizer)"))
        for label, value in rows:
            print(f"  {label:28s}{value}")
    if reply.HasField("training_plan"):
        print("training, planned at max_epochs (early stopping may end it sooner)")
        print(f"  {'steps':28s}{t.steps_per_epoch:,} per epoch × {t.epochs} epochs = {t.total_steps:,}")
        print(f"  {'evaluations after steps':28s}{_steps_text(t.eval_steps)}")
        print(f"  {'checkpoints at steps':28s}{_steps_text(t.checkpoint_steps)}")
        if t.total_training_tokens:
            print(f"  {'training tokens':28s}{_human_count(t.total_training_tokens)}")
        for e in t.wall_time_estimates:
            workers = f", {e.workers} worker{'s' if e.workers != 1 else ''}" if e.workers else ""
            print(f"  {'time on ' + e.device_class:28s}{'~' if e.guess else ''}{_duration(e.seconds)}"
                  f" at {e.tokens_per_second:,.0f} tokens/s{workers} — {'GUESS: ' if e.guess else ''}{e.basis}")
        if t.learning_rate_schedule:
            print("  learning rate")
            for line in lr_plot(t.learning_rate_schedule):
                print("    " + line)
    if reply.HasField("pool_plan"):
        print_pool_plan(reply.pool_plan)
    print("hyperparameters")
    print("  " + ", ".join(f"{k}={v}" for k, v in _hyperparameter_items(hp)))
    for w in [*reply.warnings, *d.warnings]:
        print(f"warning: {w}")


def print_pool_plan(p) -> None:
    """Where the job would train: its trainer pool, the memory estimate, and whether a worker of
    the pool is registered."""
    print("trainer pool")
    processes = f", {p.processes} processes" if p.processes > 1 else ""
    print(f"  {'pool':28s}{p.pool}: {p.description}{processes}")
    print(f"  {'memory needed':28s}~{p.required_memory_gib:,.1f} GiB — {p.basis}")
    if p.workers_registered:
        print(f"  {'workers registered':28s}{p.workers_registered}")
    else:
        print(f"warning: no worker of this pool ({p.pool}) is registered: the job will wait in QUEUED")


def _hyperparameter_items(hp):
    for field in hp.DESCRIPTOR.fields:
        value = getattr(hp, field.name)
        if not isinstance(value, (str, int, float, bool)):  # a repeated field
            yield field.name, ",".join(value)
        elif hp.HasField(field.name):
            yield field.name, f"{value:g}" if isinstance(value, float) else value


# -- list / get / cancel ------------------------------------------------------------------------
def _progress_text(job) -> str:
    p = job.progress
    if state_name(job.state) == "TRAINING" and p.total_steps:
        return f"step {p.step}/{p.total_steps}" + (f" loss {p.train_loss:.3f}" if p.HasField("train_loss") else "")
    if job.metrics.steps:
        return f"{job.metrics.steps} steps" + (f", eval {job.metrics.eval_loss:.3f}" if job.metrics.HasField("eval_loss") else "")
    return ""


def cmd_job_list(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            jobs, token = await pages(lambda size, tok: clients.job_scheduler.ListJobs(
                js.ListJobsRequest(page_size=size, page_token=tok)), args, "jobs")
        if wants_json(args):
            print_json({"jobs": [message_dict(j) for j in jobs], "next_page_token": token})
            return EXIT_OK
        print(table([(j.id, j.spec.name, state_name(j.state), j.spec.base_model, j.spec.method, _progress_text(j),
                      timestamp_text(j.create_time)) for j in jobs],
                    ("id", "name", "state", "base model", "method", "progress", "created (utc)"), empty="no jobs"))
        print_page_hint(token, next_page_command(args, "tuneforge jobs list"))
        return EXIT_OK

    return run(args, work())


FIX_HINTS = {
    "FAILURE_KIND_USER": "this is about the job's data or settings: fix what the reason names "
                         "(`tuneforge jobs validate` with the same options shows counts and warnings first), then create it again",
    "FAILURE_KIND_SYSTEM": "this is a fault of the platform, not of your data: create the job again; "
                           "if it fails the same way, send the job id to your administrator",
}


def job_summary(job) -> list[str]:
    """What ``jobs get`` prints (and what the job's email says): state, data, training, base vs
    fine-tuned, samples, what to do next."""
    from tuneforge.api.common.v1 import common_pb2

    s, d, m = job.spec, job.dataset, job.metrics
    state = state_name(job.state)
    out = [f"{s.name} ({job.id}): {state}" + (f", attempt {job.attempt}" if job.attempt > 1 else ""),
           f"  {'base model':14s}{s.base_model}, method {s.method}" + (", dataset only" if job.dataset_only else ""),
           f"  {'created':14s}{timestamp_text(job.create_time)} UTC, last change {timestamp_text(job.update_time)} UTC"]
    if s.topics:
        out.append(f"  {'topics':14s}{', '.join(s.topics)}")
    if job.pool:
        out.append(f"  {'trainer pool':14s}{job.pool}")
    if job.state_reason:
        out.append(f"  {'state reason':14s}{job.state_reason}")
    if d.dataset_id:
        out.append(f"  {'dataset':14s}{d.dataset_id}: {d.train_count:,} train / {d.test_count:,} test "
                   f"(of {d.filtered_count:,} matched, {d.deduplicated_count:,} after dedupe, {d.overlength_count:,} over length)")
    if state == "TRAINING" and job.progress.total_steps:
        p = job.progress
        out.append(f"  {'progress':14s}step {p.step}/{p.total_steps}, epoch {p.epoch:.2f}"
                   + (f", train loss {p.train_loss:.4f}" if p.HasField("train_loss") else "")
                   + (f", eval loss {p.eval_loss:.4f}" if p.HasField("eval_loss") else "")
                   + (f", ETA {_duration(p.eta_seconds)}" if p.HasField("eta_seconds") else ""))
    if m.steps:
        out.append(f"  {'training':14s}{m.steps} steps, {m.epochs:.2f} epochs, {_duration(m.train_seconds)}"
                   + (", stopped early" if m.stopped_early else "")
                   + (f", final train loss {m.train_loss:.4f}" if m.HasField("train_loss") else ""))
        if m.HasField("eval_loss") and m.HasField("base_eval_loss"):
            change = (m.eval_loss - m.base_eval_loss) / m.base_eval_loss * 100 if m.base_eval_loss else 0.0
            out.append(f"  {'eval loss':14s}{m.eval_loss:.4f} fine-tuned vs {m.base_eval_loss:.4f} base ({change:+.1f} %)")
        elif m.HasField("eval_loss"):
            out.append(f"  {'eval loss':14s}{m.eval_loss:.4f}")
        if m.HasField("tool_call_accuracy"):
            base = f"{m.base_tool_call_accuracy:.0%}" if m.HasField("base_tool_call_accuracy") else "n/a"
            out.append(f"  {'tool calls':14s}{base} base → {m.tool_call_accuracy:.0%} fine-tuned (exact)")
        if "eval_reward_accuracy" in m.extra:
            out.append(f"  {'DPO':14s}reward accuracy {m.extra['eval_reward_accuracy']:.0%}"
                       + (f", margin {m.extra['eval_reward_margin']:.3f}" if "eval_reward_margin" in m.extra else ""))
        for sample in list(m.samples)[:3]:
            out.append(f"  sample        {_truncate(sample.prompt, 100)}")
            out.append(f"    base        {_truncate(sample.base_answer, 100)}")
            out.append(f"    fine-tuned  {_truncate(sample.tuned_answer, 100)}")
    if job.report_path:
        out.append(f"  {'report':14s}{job.report_path}/loss.png and report.json (artifact store)")
    if state == "FAILED":
        kind = common_pb2.FailureKind.Name(job.failure_kind)
        out.append(f"  {'failed':14s}{job.failure_reason}")
        out.append(f"  {'what to do':14s}{FIX_HINTS.get(kind, FIX_HINTS['FAILURE_KIND_SYSTEM'])}")
    elif state == "SUCCEEDED" and job.model_name:
        steps = [(f"tuneforge models get {job.model_name}", "lineage, metrics, samples, files"),
                 (f"tuneforge models download {job.model_name} ./{job.model_name}", "the adapter files"),
                 (f"tuneforge models assign {job.model_name} --agent AGENT_ID", "an agent uses it"),
                 (f"tuneforge models resolve {job.model_name}", "what an agent configuration needs")]
        width = max(len(c) for c, _ in steps)
        out += ["  next", *(f"    {c.ljust(width)}   # {why}" for c, why in steps)]
    elif state == "SUCCEEDED" and d.dataset_id:
        out += ["  next", f"    tuneforge datasets download {d.dataset_id} ./dataset"]
    elif state not in TERMINAL:
        out += ["  next", f"    tuneforge jobs watch {job.id}"]
    return out


def cmd_job_get(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=args.job_id))).job
        if wants_json(args):
            print_json(job)
        else:
            print("\n".join(job_summary(job)))
        return EXIT_OK

    return run(args, work())


def cmd_job_cancel(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            job = (await clients.job_scheduler.CancelJob(js.CancelJobRequest(job_id=args.job_id))).job
        if wants_json(args):
            print_json(job)
        else:
            print(f"job {job.id}: {state_name(job.state)}"
                  + ("" if state_name(job.state) in TERMINAL else " (training stops at the next step and keeps what it has)"))
        return EXIT_OK

    return run(args, work())


def cmd_job_checkpoints(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.ListCheckpoints(js.ListCheckpointsRequest(job_id=args.job_id))
        if wants_json(args):
            print_json(reply)
            return EXIT_OK
        scored = [c for c in reply.checkpoints if c.HasField("eval_loss")]
        best = min(scored, key=lambda c: c.eval_loss).step if scored else None
        print(table([(c.step, f"{c.eval_loss:.4f}" if c.HasField("eval_loss") else "",
                      "best" if c.step == best else "", timestamp_text(c.create_time), c.artifact_path)
                     for c in reply.checkpoints], ("step", "eval loss", "", "created (utc)", "artifact path"),
                    empty="no checkpoints (n_checkpoints=1 keeps the final adapter only)"))
        return EXIT_OK

    return run(args, work())


def _event_line(e) -> str:
    return f"[{e.sequence:4d}] {state_name(e.state):16s} {e.message}"


def cmd_job_events(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            call = clients.job_scheduler.WatchJob(js.WatchJobRequest(job_id=args.job_id, after_sequence=args.after,
                                                                     history_only=True))
            events = [r.event async for r in call]
        if wants_json(args):
            print_json({"job_id": args.job_id, "events": [message_dict(e) for e in events]})
            return EXIT_OK
        print(table([(e.sequence, timestamp_text(e.time), state_name(e.state), e.kind, e.message) for e in events],
                    ("seq", "time (utc)", "state", "kind", "message"), empty="no events"))
        return EXIT_OK

    return run(args, work())


# -- watch ----------------------------------------------------------------------------------------
class Cursor:
    """The last event a watch of a job printed on this machine (``<data dir>/cli/watch/<job>``):
    an interrupted ``jobs watch`` started again goes on after it, so every event is shown once.
    Removed when the job has ended (watching it again shows the whole history)."""

    def __init__(self, args, job_id: str):
        self.path = _data_dir(args) / "cli" / "watch" / f"{job_id}.json"

    def load(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["after_sequence"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def save(self, sequence: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"after_sequence": sequence}))
            tmp.replace(self.path)
        except OSError:  # a read-only data directory: watching still works, resuming does not
            pass

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Display:
    """What a person sees while watching: a progress bar with ETA, losses and tokens/s on a
    terminal (stderr), and one line per event on stdout; with --json only the final document."""

    def __init__(self, args):
        self.json = wants_json(args)
        self.bar = None
        if not self.json and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            # The ETA is the trainer's (in ``info``), not one guessed from this watch's updates.
            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True)
            self.task = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def event(self, e) -> None:
        if self.json:
            return
        p = e.progress if e.HasField("progress") else None
        if p is not None and self.bar is not None and p.total_steps:
            info = "  ".join(x for x in (
                f"loss {p.train_loss:.4f}" if p.HasField("train_loss") else "",
                f"eval {p.eval_loss:.4f}" if p.HasField("eval_loss") else "",
                f"{p.tokens_per_second:,.0f} tok/s" if p.HasField("tokens_per_second") else "",
                f"ETA {_duration(p.eta_seconds)}" if p.HasField("eta_seconds") else "") if x)
            if self.task is None:
                self.task = self.bar.add_task("train", total=p.total_steps, info=info)
            self.bar.update(self.task, completed=p.step, total=p.total_steps, info=info)
            return
        line = _event_line(e)
        if p is not None and p.total_steps:
            line += "".join(x for x in (
                f"  tok/s {p.tokens_per_second:,.0f}" if p.HasField("tokens_per_second") else "",
                f"  ETA {_duration(p.eta_seconds)}" if p.HasField("eta_seconds") else "") if x)
        if self.bar is not None:
            self.bar.console.print(line, highlight=False, markup=False)  # above the bar
        else:
            print(line, flush=True)

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            note(text)


async def _watch(args, job_id: str) -> int:
    """Follow a job to its end through every lost connection, never showing an event twice."""
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
    from tuneforge.client import TuneforgeError

    cursor = Cursor(args, job_id)
    after = args.after if getattr(args, "after", None) is not None else (0 if getattr(args, "from_start", True) else cursor.load())
    if after and getattr(args, "after", None) is None:
        note(f"resuming after event {after} (the last one an earlier watch showed; --from-start for the whole history)")
    events, state, reconnects, lost_since = [], "", 0, None
    deadline = time.monotonic() + args.reconnect_timeout
    display = Display(args)
    try:
        with display:
            async with _clients(args) as clients:
                while True:
                    try:
                        call = clients.job_scheduler.WatchJob(js.WatchJobRequest(job_id=job_id, after_sequence=after))
                        async for response in call:
                            e = response.event
                            if e.sequence <= after:  # never twice, whatever a server replays
                                continue
                            if lost_since is not None:
                                display.say(f"reconnected; resuming after event {after}")
                                lost_since = None
                            events.append(e)
                            after, state = e.sequence, state_name(e.state)
                            display.event(e)
                            cursor.save(after)
                        break  # the stream ended: the job did
                    except TuneforgeError as exc:
                        if exc.code.name not in RECONNECT_CODES:
                            raise
                        if lost_since is None:
                            lost_since = time.monotonic()
                            deadline = lost_since + args.reconnect_timeout
                            display.say(f"connection lost ({exc.code.name}); reconnecting and resuming after "
                                        f"event {after} ...")
                        if time.monotonic() > deadline:
                            raise
                        reconnects += 1
                        await asyncio.sleep(RECONNECT_BACKOFF[min(reconnects - 1, len(RECONNECT_BACKOFF) - 1)])
    finally:  # an interrupted watch still prints what it saw (--json: one document)
        if wants_json(args):
            print_json({"job_id": job_id, "state": state, "events": [message_dict(e) for e in events],
                        "reconnects": reconnects, "complete": state in TERMINAL})
    if state in TERMINAL:
        cursor.clear()
    if not wants_json(args):
        print(f"job {job_id} {state.lower() or 'has no events'}")
    return EXIT_OK if state == "SUCCEEDED" else EXIT_USER_ERROR  # FAILED/CANCELLED: the document is printed


def cmd_job_watch(args) -> int:
    if args.reconnect_timeout <= 0:
        raise UsageError("--reconnect-timeout must be above 0 seconds")
    return run(args, _watch(args, args.job_id))


def register(sub) -> None:
    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="sub", required=True)
    p = jobs.add_parser("create", help="create a job (it starts at once)")
    _add_spec_arguments(p)
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="the same key again returns the same job instead of a second one (default: a new random key; "
                        "retries of this command reuse it)")
    p.add_argument("--watch", action="store_true", help="then follow it like `jobs watch`")
    p.add_argument("--reconnect-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_job_create, from_start=True, after=None)
    p = jobs.add_parser("validate", help="dry run: counts per build step, tokens, steps, evaluations, "
                                         "checkpoints, learning-rate schedule, time estimate — nothing is created")
    _add_spec_arguments(p)
    p.set_defaults(fn=cmd_job_validate)
    p = jobs.add_parser("list", help="the workspace's jobs, newest first")
    add_paging(p)
    add_json(p)
    p.set_defaults(fn=cmd_job_list)
    p = jobs.add_parser("get", help="a job: state, data, training, base vs fine-tuned, what to do next")
    p.add_argument("job_id")
    add_json(p)
    p.set_defaults(fn=cmd_job_get)
    p = jobs.add_parser("watch", help="follow a job until it ends (reconnects by itself; resumes after an interruption)")
    p.add_argument("job_id")
    p.add_argument("--from-start", action="store_true", help="show the whole history, not only what an earlier watch missed")
    p.add_argument("--after", type=int, metavar="SEQ", help="show events after this sequence number")
    p.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up when the server has been unreachable this long (default 300)")
    add_json(p)
    p.set_defaults(fn=cmd_job_watch)
    p = jobs.add_parser("cancel", help="cancel a job; training stops at the next step and keeps what it has")
    p.add_argument("job_id")
    add_json(p)
    p.set_defaults(fn=cmd_job_cancel)
    p = jobs.add_parser("events", help="a job's history so far (no following)")
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="events after this sequence number")
    add_json(p)
    p.set_defaults(fn=cmd_job_events)
    p = jobs.add_parser("checkpoints", help="checkpoints a job's training kept, the best marked")
    p.add_argument("job_id")
    add_json(p)
    p.set_defaults(fn=cmd_job_checkpoints)
