"""The text of the emails a job's end produces."""

from __future__ import annotations

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev


def _dataset_lines(d: common_pb2.DatasetSummary) -> list[str]:
    topics = ", ".join(f"{t} ({n})" for t, n in sorted(d.topic_counts.items())) or "all"
    lines = [
        f"Dataset: {d.dataset_id}",
        f"  {d.train_count} training examples, {d.test_count} evaluation examples; topics: {topics}",
        f"  Download: tuneforge datasets download {d.dataset_id} ./{d.dataset_id}",
    ]
    lines += [f"  Warning: {w}" for w in d.warnings]
    return lines


def job_succeeded(event: ev.JobSucceeded) -> tuple[str, str]:
    if event.dataset_only:
        subject = f"Your dataset for '{event.job_name}' is ready"
        lines = [
            f"The job '{event.job_name}' finished: its train and evaluation files are ready in the universal",
            "format (OpenAI-style chat JSONL) and can be used to fine-tune any model.",
            "",
            *_dataset_lines(event.dataset),
        ]
    else:
        m = event.metrics
        subject = f"Your fine-tuned model '{event.model_name}' is ready"
        lines = [
            f"The fine-tuning job '{event.job_name}' succeeded.",
            "",
            f"Model: {event.model_name} (id {event.model_id}), {event.method.upper()} on {event.base_model}",
            "It is listed under Hosting & Models and can be assigned to your agents.",
            f"Training: {m.steps} steps, {m.epochs:.2f} epochs"
            + (f", final eval loss {m.eval_loss:.4f}" if m.HasField("eval_loss") else "")
            + (" (stopped early: eval loss stopped improving)" if m.stopped_early else ""),
            "",
            *_dataset_lines(event.dataset),
        ]
    return subject, "\n".join(lines) + f"\n\nJob id: {event.meta.job_id}\n"


def job_failed(event: ev.JobFailed) -> tuple[str, str]:
    whose = "your data or settings" if event.failure_kind == common_pb2.FAILURE_KIND_USER else "a platform error"
    subject = f"Fine-tuning job '{event.job_name}' failed"
    body = (
        f"The job '{event.job_name}' failed because of {whose}:\n\n  {event.reason}\n\n"
        f"Job id: {event.meta.job_id}\n"
    )
    return subject, body


def job_cancelled(event: ev.JobCancelled) -> tuple[str, str]:
    return (
        f"Fine-tuning job '{event.job_name}' was cancelled",
        f"The job '{event.job_name}' was cancelled.\n\nJob id: {event.meta.job_id}\n",
    )
