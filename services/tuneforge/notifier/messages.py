"""The emails a job's end produces: a plain-text part complete on its own, and an HTML part with
the run's loss plot inline (read from the report folder the trainer wrote, ``loss.png``).

The text is rendered when the delivery is recorded (and stored with it); the HTML when the message
is sent, once the notifier knows whether the plot could be read: without it the HTML simply has
no picture. Everything a user or a model wrote (job and model names, reasons, samples) is
HTML-escaped.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Callable

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev


def _dataset_lines(d: common_pb2.DatasetSummary, download: bool = True) -> list[str]:
    topics = ", ".join(f"{t} ({n})" for t, n in sorted(d.topic_counts.items())) or "all"
    lines = [
        f"Dataset: {d.dataset_id}",
        f"  {d.train_count} training examples, {d.test_count} evaluation examples; topics: {topics}",
    ]
    if download:  # (a dataset-only email has it under "What to do next")
        lines.append(f"  Download: tuneforge datasets download {d.dataset_id} ./{d.dataset_id}")
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


# ----------------------------------------------------------------------------------------------
# What to do next, and how to fix a failure.

LOSS_PLOT_FILE = "loss.png"  # in a run's report folder (trainer/report.py writes it)
SAMPLE_HTML_LIMIT = 1200  # characters of each prompt / answer in the HTML samples table


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _state_name(state: str) -> str:
    """``JOB_STATE_BUILDING_DATASET`` -> "building dataset"."""
    return state.removeprefix("JOB_STATE_").replace("_", " ").lower()


def next_steps(event: ev.JobSucceeded) -> list[tuple[str, str]]:
    """``(what, command)`` of what a user can do with a finished job, in order."""
    if event.dataset_only:
        d = event.dataset
        return [("Download the train and test files", f"tuneforge datasets download {d.dataset_id} ./{d.dataset_id}"),
                ("See the dataset's counts", f"tuneforge datasets get {d.dataset_id}")]
    name = shlex.quote(event.model_name)
    return [
        ("See the model and its evaluation", f"tuneforge models get {name}"),
        ("Download the adapter", f"tuneforge models download {name} {shlex.quote('./' + event.model_name)}"),
        ("Assign it to an agent", f"tuneforge models assign {name} --agent AGENT_ID"),
        ("See what an agent's configuration gets (ResolveModel)", f"tuneforge models resolve {name}"),
    ]


RESOLVE_HINT = ("An agent configuration names the model; ResolveModel(name) turns the name into the base "
                "weights, the adapter's URI and SHA-256, vLLM's --lora-modules argument and the chat template "
                "(from Python through the typed client, tuneforge.client.Client).")

# (words in the reason, hint): the first match is shown before the general advice of the kind.
USER_FIX_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("min_examples",), "Import more examples for the job's topics (tuneforge data import FILE), choose wider "
                        "topics, or lower hyperparameters.min_examples."),
    (("method options",), "Correct the method options named above (tuneforge jobs validate lists the valid ones)."),
    (("no plugin for base model",), "Pick a base model and method from the catalog: tuneforge models catalog."),
    (("context length", "over-length", "overlength", "too long"),
     "Shorten the longest examples, or let the job truncate them (overlength_policy)."),
    (("out of memory",), "Lower batch_size (or lora_rank) and try again."),
)
SYSTEM_FIX_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("out of memory",), "The trainer ran out of memory: a smaller batch_size (or lora_rank) fits in less."),
    (("no weights for",), "The base model's weights are missing on the trainer: an administrator must place them "
                          "in the model store (the reason says where)."),
)


def fix_hints(event: ev.JobFailed) -> list[str]:
    """How to fix the failure: a hint matching the reason, then the advice for its kind (the user's
    data or settings, or the platform)."""
    reason = event.reason.lower()
    user = event.failure_kind == common_pb2.FAILURE_KIND_USER
    hints = [hint for words, hint in (USER_FIX_HINTS if user else SYSTEM_FIX_HINTS) if any(w in reason for w in words)]
    if user:
        hints.append("Fix the data or setting named above and check the job with tuneforge jobs validate (it reports "
                     "such problems and the counts after each step without training), then create it again with "
                     "tuneforge jobs create.")
    else:
        hints.append("Nothing in your data or settings caused it, and the platform retried where it could. Create "
                     "the job again with the same settings (tuneforge jobs create; your data is kept); if it fails "
                     "again, send the job id to your administrator.")
    hints.append(f"What happened, step by step: tuneforge jobs events {event.meta.job_id}")
    return hints


# ----------------------------------------------------------------------------------------------
# The text parts (complete on their own, for plain-text readers).


def _next_step_lines(event: ev.JobSucceeded) -> list[str]:
    lines = ["What to do next:"]
    lines += [f"  {what}:\n    {command}" for what, command in next_steps(event)]
    if not event.dataset_only:
        lines.append(f"  {RESOLVE_HINT}")
    return lines


def job_succeeded(event: ev.JobSucceeded) -> tuple[str, str]:
    if event.dataset_only:
        subject = f"Your dataset for '{event.job_name}' is ready"
        lines = [
            f"The job '{event.job_name}' finished: its train and evaluation files are ready in the universal",
            "format (OpenAI-style chat JSONL) and can be used to fine-tune any model.",
            "",
            *_dataset_lines(event.dataset, download=False),
            "",
            *_next_step_lines(event),
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
            + (f", {_duration(m.train_seconds)} on the trainer" if m.train_seconds else "")
            + (" (stopped early: eval loss stopped improving)" if m.stopped_early else ""),
            *_extra_metric_lines(m.extra),
            "",
            *comparison,
            *([""] if comparison else []),
            *_dataset_lines(event.dataset),
            "",
            *_next_step_lines(event),
        ]
        if event.report_path:
            lines += ["", f"The loss plot is in the HTML version of this email; loss.png and report.json are in the "
                          f"run's report folder ({event.report_path})."]
    return subject, "\n".join(lines) + f"\n\nJob id: {event.meta.job_id}\n"


def job_failed(event: ev.JobFailed) -> tuple[str, str]:
    user = event.failure_kind == common_pb2.FAILURE_KIND_USER
    whose = "your data or settings" if user else "a platform error"
    subject = f"Fine-tuning job '{event.job_name}' failed"
    where = f" while {_state_name(event.failed_in_state)}" if event.failed_in_state else ""
    lines = [f"The job '{event.job_name}' failed{where} because of {whose}:", "", f"  {event.reason}", ""]
    if event.base_model or event.method:
        lines += [f"Job: {event.method.upper()} on {event.base_model}", ""]
    lines += ["How to fix it:", *(f"  - {hint}" for hint in fix_hints(event))]
    if event.report_path:
        lines += ["", f"The losses until it failed are plotted in the HTML version of this email and kept in the "
                      f"run's report folder ({event.report_path})."]
    return subject, "\n".join(lines) + f"\n\nJob id: {event.meta.job_id}\n"


def job_cancelled(event: ev.JobCancelled) -> tuple[str, str]:
    return (
        f"Fine-tuning job '{event.job_name}' was cancelled",
        f"The job '{event.job_name}' was cancelled.\n\nJob id: {event.meta.job_id}\n",
    )


# ----------------------------------------------------------------------------------------------
# The HTML parts.

_STYLE = {
    "body": "font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1f2328; "
            "max-width: 840px; margin: 0 auto; padding: 16px; line-height: 1.45;",
    "table": "border-collapse: collapse; margin: 8px 0 16px 0;",
    "th": "text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid #d0d7de; vertical-align: top;",
    "td": "padding: 4px 12px 4px 0; border-bottom: 1px solid #eaeef2; vertical-align: top;",
    "sample": "padding: 6px 8px; border: 1px solid #d0d7de; vertical-align: top; white-space: pre-wrap; "
              "font-size: 13px;",
    "code": "display: block; background: #f6f8fa; padding: 8px 10px; border-radius: 6px; "
            "font-family: SFMono-Regular, Consolas, monospace; font-size: 13px; white-space: pre-wrap;",
    "warn": "color: #9a6700;",
    "error": "background: #fff1f0; border-left: 4px solid #cf222e; padding: 8px 12px; white-space: pre-wrap;",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _row(label: str, value: str, figure: str = "") -> str:
    """A summary row; ``figure`` names the value (``data-figure``) for scripts and tests."""
    attribute = f' data-figure="{figure}"' if figure else ""
    return f'<tr><th style="{_STYLE["th"]}">{_e(label)}</th><td style="{_STYLE["td"]}"{attribute}>{value}</td></tr>'


def _table(rows: list[str]) -> str:
    return f'<table style="{_STYLE["table"]}">{"".join(rows)}</table>' if rows else ""


def _clip(text: str, limit: int = SAMPLE_HTML_LIMIT) -> str:
    text = (text or "").strip()
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dataset_rows(d: common_pb2.DatasetSummary) -> list[str]:
    topics = ", ".join(f"{t} ({n})" for t, n in sorted(d.topic_counts.items())) or "all"
    rows = [
        _row("Dataset", f"<code>{_e(d.dataset_id)}</code>", "dataset_id"),
        _row("Training examples", _e(d.train_count), "train_count"),
        _row("Evaluation examples", _e(d.test_count), "test_count"),
        _row("Topics", _e(topics)),
    ]
    if d.workspace_example_count:
        steps = [f"{d.workspace_example_count} in the workspace"]
        if d.filtered_count:
            steps.append(f"{d.filtered_count} matched the topics")
        if d.deduplicated_count:
            steps.append(f"{d.deduplicated_count} after removing duplicates")
        if d.overlength_count:
            steps.append(f"{d.overlength_count} over the context length")
        rows.append(_row("Counts", _e(" → ".join(steps))))
    if d.HasField("train_tokens") and d.train_tokens.total:
        rows.append(_row("Training tokens (one epoch)", _e(f"{d.train_tokens.total:,}"), "train_tokens"))
    return rows


def _warnings_html(d: common_pb2.DatasetSummary) -> str:
    if not d.warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in d.warnings)
    return f'<ul style="{_STYLE["warn"]}">{items}</ul>'


def _change(base: float, tuned: float) -> str:
    return f"{(tuned - base) / abs(base):+.1%}" if base else ""


def _comparison_html(m: common_pb2.TrainingMetrics) -> str:
    """Base model against fine-tuned on the test split: eval loss, tool-call accuracy, DPO's reward accuracy."""
    head = "".join(f'<th style="{_STYLE["th"]}">{h}</th>' for h in ("", "Base model", "Fine-tuned", "Change"))
    rows = []

    def line(label: str, base: str, tuned: str, change: str, figure: str) -> None:
        cells = [f'<th style="{_STYLE["th"]}">{_e(label)}</th>',
                 f'<td style="{_STYLE["td"]}" data-figure="base_{figure}">{base}</td>',
                 f'<td style="{_STYLE["td"]}" data-figure="{figure}">{tuned}</td>',
                 f'<td style="{_STYLE["td"]}">{change}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")

    if m.HasField("eval_loss"):
        base = m.base_eval_loss if m.HasField("base_eval_loss") else None
        line("Eval loss (lower is better)", "—" if base is None else f"{base:.4f}", f"{m.eval_loss:.4f}",
             "" if base is None else _change(base, m.eval_loss), "eval_loss")
    if m.HasField("tool_call_accuracy"):
        base = m.base_tool_call_accuracy if m.HasField("base_tool_call_accuracy") else None
        line("Tool-call accuracy (greedy, exact calls)", "—" if base is None else f"{base:.1%}",
             f"{m.tool_call_accuracy:.1%}",
             "" if base is None else f"{(m.tool_call_accuracy - base) * 100:+.1f} points", "tool_call_accuracy")
    if "eval_reward_accuracy" in m.extra:
        line("Reward accuracy (preferred output scored higher)", "—", f"{m.extra['eval_reward_accuracy']:.1%}", "",
             "reward_accuracy")
    if "eval_reward_margin" in m.extra:
        line("Mean reward margin", "—", f"{m.extra['eval_reward_margin']:.4f}", "", "reward_margin")
    if not rows:
        return ""
    note = ""
    turns, total = m.extra.get("tool_call_turns_evaluated"), m.extra.get("tool_call_turns_total")
    if m.HasField("tool_call_accuracy") and turns is not None:
        note = f"<p>Tool-call accuracy over {turns:.0f} tool-call turns"
        note += f" (of {total:.0f} in the test split).</p>" if total is not None and total > turns else ".</p>"
    return (f"<h3>Did it learn? Base model against fine-tuned on the test split</h3>"
            f'<table style="{_STYLE["table"]}"><tr>{head}</tr>{"".join(rows)}</table>{note}')


def _samples_html(m: common_pb2.TrainingMetrics) -> str:
    if not m.samples:
        return ""
    head = "".join(f'<th style="{_STYLE["sample"]}">{h}</th>' for h in ("Prompt", "Reference", "Base model",
                                                                            "Fine-tuned"))
    rows = []
    for sample in m.samples:
        cells = "".join(f'<td style="{_STYLE["sample"]}">{_e(_clip(text))}</td>'
                        for text in (sample.prompt, sample.reference, sample.base_answer, sample.tuned_answer))
        rows.append(f"<tr>{cells}</tr>")
    return (f"<h3>Samples from the test split (greedy, {len(m.samples)})</h3>"
            f'<table style="{_STYLE["table"]}"><tr>{head}</tr>{"".join(rows)}</table>')


def _metrics_html(extra) -> str:
    rows = [_row(label, _e(fmt(extra[name]))) for name, (label, fmt) in EXTRA_METRIC_LABELS.items() if name in extra]
    others = sorted(set(extra) - set(EXTRA_METRIC_LABELS) - EXTRA_METRICS_SHOWN_ELSEWHERE)
    rows += [_row(name, _e(f"{extra[name]:.6g}")) for name in others]
    return f"<h3>Metrics</h3>{_table(rows)}" if rows else ""


def _plot_html(plot_cid: str | None, alt: str) -> str:
    if not plot_cid:
        return ""
    return (f'<h3>Loss</h3><img src="cid:{_e(plot_cid)}" width="800" height="500" alt="{_e(alt)}" '
            f'style="max-width: 100%; height: auto; border: 1px solid #d0d7de;">')


def _next_steps_html(event: ev.JobSucceeded) -> str:
    items = "".join(f"<li>{_e(what)}:<code style=\"{_STYLE['code']}\">{_e(command)}</code></li>"
                    for what, command in next_steps(event))
    resolve = "" if event.dataset_only else f"<p>{_e(RESOLVE_HINT)}</p>"
    return f"<h3>What to do next</h3><ul>{items}</ul>{resolve}"


def _page(title: str, body: str, job_id: str) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title></head>'
            f'<body style="{_STYLE["body"]}"><h2>{_e(title)}</h2>{body}'
            f'<p style="color: #656d76; font-size: 12px;">Job id: <code>{_e(job_id)}</code></p></body></html>\n')


def job_succeeded_html(event: ev.JobSucceeded, plot_cid: str | None = None) -> str:
    """The HTML part: the summary, the loss plot (``<img src="cid:plot_cid">`` when given), base
    against fine-tuned, the samples and what to do next."""
    subject, _ = job_succeeded(event)
    if event.dataset_only:
        body = (f"<p>The job <b>{_e(event.job_name)}</b> finished: its train and evaluation files are ready in the "
                f"universal format (OpenAI-style chat JSONL) and can be used to fine-tune any model.</p>"
                f"<h3>Dataset</h3>{_table(_dataset_rows(event.dataset))}{_warnings_html(event.dataset)}"
                f"{_next_steps_html(event)}")
        return _page(subject, body, event.meta.job_id)
    m = event.metrics
    summary = [
        _row("Model", f"<b>{_e(event.model_name)}</b> (id <code>{_e(event.model_id)}</code>)"),
        _row("Base model", _e(event.base_model), "base_model"),
        _row("Method", _e(event.method.upper()), "method"),
        _row("Steps", _e(m.steps), "steps"),
        _row("Epochs", _e(f"{m.epochs:.2f}"), "epochs"),
    ]
    if m.train_seconds:
        summary.append(_row("Time on the trainer", _e(_duration(m.train_seconds)), "train_seconds"))
    if m.stopped_early:
        summary.append(_row("Stopped early", "yes: the eval loss stopped improving"))
    summary += _dataset_rows(event.dataset)
    body = (f"<p>The fine-tuning job <b>{_e(event.job_name)}</b> succeeded. The model is listed under Hosting &amp; "
            f"Models and can be assigned to your agents.</p>"
            f"<h3>Summary</h3>{_table(summary)}{_warnings_html(event.dataset)}"
            f"{_plot_html(plot_cid, 'Train and eval loss against step, learning rate, best checkpoint')}"
            f"{_comparison_html(m)}{_samples_html(m)}{_metrics_html(m.extra)}{_next_steps_html(event)}")
    return _page(subject, body, event.meta.job_id)


def job_failed_html(event: ev.JobFailed, plot_cid: str | None = None) -> str:
    """The HTML part: why it failed, how to fix it, and the losses until then when there were any."""
    subject, _ = job_failed(event)
    user = event.failure_kind == common_pb2.FAILURE_KIND_USER
    whose = "your data or settings" if user else "a platform error"
    where = f" while {_e(_state_name(event.failed_in_state))}" if event.failed_in_state else ""
    facts = []
    if event.base_model:
        facts.append(_row("Base model", _e(event.base_model), "base_model"))
    if event.method:
        facts.append(_row("Method", _e(event.method.upper()), "method"))
    hints = "".join(f"<li>{_e(h)}</li>" for h in fix_hints(event))
    body = (f"<p>The job <b>{_e(event.job_name)}</b> failed{where} because of {whose}:</p>"
            f'<p style="{_STYLE["error"]}" data-figure="reason">{_e(event.reason)}</p>{_table(facts)}'
            f"<h3>How to fix it</h3><ul>{hints}</ul>"
            f"{_plot_html(plot_cid, 'Train and eval loss until the job failed')}")
    return _page(subject, body, event.meta.job_id)


def job_cancelled_html(event: ev.JobCancelled, plot_cid: str | None = None) -> str:
    subject, _ = job_cancelled(event)
    return _page(subject, f"<p>The job <b>{_e(event.job_name)}</b> was cancelled.</p>", event.meta.job_id)


def report_path(event) -> str:
    """The report folder whose ``loss.png`` the email shows ("" when none)."""
    return getattr(event, "report_path", "") or ""
