"""The text of the emails a job's end produces."""

from __future__ import annotations

from collections.abc import Callable

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


# Labels and formats of well-known ``TrainingMetrics.extra`` entries, in the order they are shown;
# other entries follow under their own names. ``eval_loss`` and ``total_steps`` are on the
# Training line already.
EXTRA_METRIC_LABELS: dict[str, tuple[str, Callable[[float], str]]] = {
    "eval_reward_accuracy": ("Reward accuracy on the test split (preferred output scored higher)",
                             lambda v: f"{v:.1%}"),
    "eval_reward_margin": ("Mean reward margin on the test split (preferred minus non-preferred)",
                           lambda v: f"{v:.4f}"),
    "eval_reward_chosen": ("Mean reward of the preferred outputs", lambda v: f"{v:.4f}"),
    "eval_reward_rejected": ("Mean reward of the non-preferred outputs", lambda v: f"{v:.4f}"),
    "beta": ("DPO beta", lambda v: f"{v:g}"),
    "best_eval_loss": ("Best eval loss", lambda v: f"{v:.4f}"),
    "train_loss_mean": ("Mean training loss", lambda v: f"{v:.4f}"),
    "loss_on_inputs": ("Loss on input tokens too", lambda v: "yes" if v else "no (outputs only)"),
    "tokens_per_second": ("Training throughput", lambda v: f"{v:,.0f} tokens/s"),
    "train_runtime_seconds": ("Training time", lambda v: f"{v:,.0f} s"),
}
EXTRA_METRICS_SHOWN_ELSEWHERE = frozenset({
    "eval_loss", "total_steps", "tool_call_turns_evaluated", "tool_call_turns_total", "evaluation_samples",
})
SAMPLE_TEXT_LIMIT = 300  # characters of each prompt / answer shown in the email


def _shorten(text: str, limit: int = SAMPLE_TEXT_LIMIT) -> str:
    text = " ".join((text or "").split())
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _comparison_lines(m: common_pb2.TrainingMetrics) -> list[str]:
    """Did it learn? Base model (adapter disabled) against the fine-tuned one on the test split."""
    lines = []
    if m.HasField("base_eval_loss") and m.HasField("eval_loss"):
        change = ""
        if m.base_eval_loss:
            change = f" ({(m.eval_loss - m.base_eval_loss) / abs(m.base_eval_loss):+.1%})"
        lines.append(f"  Eval loss: base {m.base_eval_loss:.4f} -> fine-tuned {m.eval_loss:.4f}{change}")
    if m.HasField("tool_call_accuracy") and m.HasField("base_tool_call_accuracy"):
        turns = m.extra.get("tool_call_turns_evaluated")
        total = m.extra.get("tool_call_turns_total")
        over = ""
        if turns is not None:
            over = f" over {turns:.0f} tool-call turns"
            if total is not None and total > turns:
                over += f" (of {total:.0f} in the test split)"
        lines.append(f"  Tool-call accuracy (greedy, exact calls): base {m.base_tool_call_accuracy:.1%} -> "
                     f"fine-tuned {m.tool_call_accuracy:.1%}{over}")
    if m.samples:
        lines += ["", f"Samples from the test split (greedy, base model vs fine-tuned, {len(m.samples)}):"]
        for n, sample in enumerate(m.samples, 1):
            lines += [
                f"  {n}. Prompt:     {_shorten(sample.prompt)}",
                f"     Reference:  {_shorten(sample.reference)}",
                f"     Base:       {_shorten(sample.base_answer)}",
                f"     Fine-tuned: {_shorten(sample.tuned_answer)}",
            ]
    return ["Did it learn? Base model against fine-tuned on the test split:", *lines] if lines else []


def _extra_metric_lines(extra) -> list[str]:
    lines = [f"  {label}: {fmt(extra[name])}" for name, (label, fmt) in EXTRA_METRIC_LABELS.items() if name in extra]
    others = sorted(set(extra) - set(EXTRA_METRIC_LABELS) - EXTRA_METRICS_SHOWN_ELSEWHERE)
    lines += [f"  {name}: {extra[name]:.6g}" for name in others]
    return ["Metrics:", *lines] if lines else []


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
        comparison = _comparison_lines(m)
        subject = f"Your fine-tuned model '{event.model_name}' is ready"
        lines = [
            f"The fine-tuning job '{event.job_name}' succeeded.",
            "",
            f"Model: {event.model_name} (id {event.model_id}), {event.method.upper()} on {event.base_model}",
            "It is listed under Hosting & Models and can be assigned to your agents.",
            f"Training: {m.steps} steps, {m.epochs:.2f} epochs"
            + (f", final eval loss {m.eval_loss:.4f}" if m.HasField("eval_loss") else "")
            + (" (stopped early: eval loss stopped improving)" if m.stopped_early else ""),
            *_extra_metric_lines(m.extra),
            "",
            *comparison,
            *([""] if comparison else []),
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
