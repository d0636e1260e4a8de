"""A training run's report: ``loss.png`` and ``report.json`` in the attempt's ``report`` folder.

Why: a person wants to see how a run went (did the eval loss fall, where was the best checkpoint,
what did the learning rate do) without a dashboard. The notifier inlines the picture in the job's
email; ``report.json`` keeps the same figures for scripts and for ``tuneforge jobs get``.

The history is the worker's own record of the run, not the plugin's: every progress report the
method makes (:class:`RunHistory`), plus, for an attempt that resumed from a checkpoint, the log
history HF Trainer saved in that checkpoint's ``trainer_state.json`` up to the checkpoint's step.
So a resumed run's plot still starts at step 1, and a run that failed part-way has its losses.

matplotlib is imported inside :func:`render_loss_png` only (the Agg canvas, no pyplot and no
display): the trainer is the one service that installs it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

REPORT_DIRNAME = "report"
LOSS_PNG = "loss.png"
REPORT_JSON = "report.json"
REPORT_VERSION = 1
PNG_WIDTH, PNG_HEIGHT, PNG_DPI = 800, 500, 100  # readable in an email at its natural size


def _number(value: Any) -> float | None:
    """A finite float, or None (NaN and inf are no figure anybody can plot or read)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class HistoryPoint:
    """What was logged at one optimisation step (a field is None when it was not logged there)."""

    step: int
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None


class RunHistory:
    """Per-step history of one run: one point per step, fields merged as they arrive (a step's
    train log and its evaluation are separate log entries)."""

    def __init__(self) -> None:
        self._points: dict[int, HistoryPoint] = {}

    def add(self, step: int, *, epoch: float | None = None, train_loss: float | None = None,
            eval_loss: float | None = None, learning_rate: float | None = None) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return
        point = self._points.setdefault(step, HistoryPoint(step))
        for name, value in (("epoch", epoch), ("train_loss", train_loss), ("eval_loss", eval_loss),
                            ("learning_rate", learning_rate)):
            value = _number(value)
            if value is not None:
                setattr(point, name, value)

    def add_log_entries(self, entries: Iterable[Mapping[str, Any]], up_to_step: int | None = None) -> None:
        """HF Trainer ``state.log_history`` entries (``loss``/``eval_loss``/``learning_rate``/
        ``epoch``/``step``); entries after ``up_to_step`` are skipped (a checkpoint's history
        never goes past it, but a resumed run must not count a step twice)."""
        for entry in entries or ():
            if not isinstance(entry, Mapping):
                continue
            step = entry.get("step")
            if not isinstance(step, int) or (up_to_step is not None and step > up_to_step):
                continue
            if "loss" not in entry and "eval_loss" not in entry:
                continue  # the end-of-training summary (train_runtime, ...)
            self.add(step, epoch=entry.get("epoch"), train_loss=entry.get("loss"), eval_loss=entry.get("eval_loss"),
                     learning_rate=entry.get("learning_rate"))

    def add_trainer_state(self, checkpoint_dir: Path, up_to_step: int) -> None:
        """The log history saved in a checkpoint's ``trainer_state.json`` (none: nothing added)."""
        path = Path(checkpoint_dir) / "trainer_state.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(state, dict) and isinstance(state.get("log_history"), list):
            self.add_log_entries(state["log_history"], up_to_step)

    def clear(self) -> None:
        self._points.clear()

    def points(self) -> list[HistoryPoint]:
        return [dataclasses.replace(self._points[s]) for s in sorted(self._points)]

    def eval_loss_at(self, step: int) -> float | None:
        point = self._points.get(step)
        return point.eval_loss if point else None

    def has_losses(self) -> bool:
        return any(p.train_loss is not None or p.eval_loss is not None for p in self._points.values())


@dataclasses.dataclass(frozen=True)
class CheckpointMark:
    """A kept checkpoint (the final adapter included) and its eval loss when evaluated there."""

    step: int
    eval_loss: float | None = None
    adapter: bool = False  # the adapter the job registers (the run's last step)


def best_checkpoint(checkpoints: Iterable[CheckpointMark]) -> CheckpointMark | None:
    """The kept checkpoint with the lowest eval loss (the earliest on a tie); None when none was
    evaluated."""
    evaluated = [c for c in checkpoints if _number(c.eval_loss) is not None]
    return min(evaluated, key=lambda c: (c.eval_loss, c.step)) if evaluated else None


def proto_to_plain(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready Python values: int64 as int (``MessageToDict`` makes them
    strings), enums by name, unset optional fields and sub-messages left out, maps as dicts."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _plain_value(value_field, v) for k, v in sorted(value.items())}
        elif field.is_repeated:
            out[field.name] = [_plain_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _plain_value(field, value)
    return out


def _plain_value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_to_plain(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value else value
    return value


def build_report(*, job_id: str, workspace_id: str, attempt: int, outcome: str, base_model: str, method: str,
                 hyperparameters: Mapping[str, Any], dataset: Message | None, history: RunHistory,
                 checkpoints: Iterable[CheckpointMark], metrics: Message | None = None, device_class: str = "",
                 trained_tokens: int | None = None, train_seconds: float | None = None,
                 resumed_from_step: int = 0, reason: str = "") -> dict[str, Any]:
    """``report.json``'s content. ``outcome``: "succeeded", "failed" or "cancelled"; ``metrics``:
    the run's ``TrainingMetrics`` (succeeded runs), ``dataset``: its ``DatasetSummary``."""
    marks = sorted({c.step: c for c in checkpoints}.values(), key=lambda c: c.step)
    best = best_checkpoint(marks)
    tokens_per_second = None
    extra = dict(metrics.extra) if metrics is not None else {}
    if _number(extra.get("tokens_per_second")) is not None:
        tokens_per_second = float(extra["tokens_per_second"])  # measured over the training loop itself
    elif trained_tokens and train_seconds:
        tokens_per_second = trained_tokens / train_seconds
    return {
        "version": REPORT_VERSION,
        "job_id": job_id,
        "workspace_id": workspace_id,
        "attempt": attempt,
        "outcome": outcome,
        "reason": reason,
        "base_model": base_model,
        "method": method,
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hyperparameters.items()},
        "dataset": proto_to_plain(dataset) if dataset is not None else {},
        "resumed_from_step": resumed_from_step,
        "history": [dataclasses.asdict(p) for p in history.points()],
        "checkpoints": [{"step": c.step, "eval_loss": _number(c.eval_loss), "best": best is not None and c is best,
                         "adapter": c.adapter} for c in marks],
        "best_checkpoint": ({"step": best.step, "eval_loss": best.eval_loss} if best is not None else None),
        "metrics": proto_to_plain(metrics) if metrics is not None else {},
        "device_class": device_class,
        "trained_tokens": trained_tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_per_second,
    }


def plot_title(report: Mapping[str, Any], job_name: str = "") -> str:
    name = job_name or f"job {report.get('job_id', '')}"
    title = f"{name}: {str(report.get('method', '')).upper()} on {report.get('base_model', '')}"
    outcome = report.get("outcome")
    return title if outcome in (None, "", "succeeded") else f"{title} ({outcome})"


def _label_alignment(step: int, steps: list[int]) -> str:
    """Where a label over ``step`` extends, so that it stays inside the axes at either end."""
    low, high = min(steps, default=step), max(steps, default=step)
    if high <= low:
        return "center"
    position = (step - low) / (high - low)
    return "left" if position < 0.2 else "right" if position > 0.8 else "center"


def _in_upper_half(loss: float, history: list[Mapping[str, Any]]) -> bool:
    """Whether ``loss`` is in the upper half of the plotted losses (its label then goes below it,
    clear of the title)."""
    values = [p[k] for p in history for k in ("train_loss", "eval_loss") if p.get(k) is not None]
    low, high = min(values, default=loss), max(values, default=loss)
    return high > low and (loss - low) / (high - low) > 0.5


def render_loss_png(report: Mapping[str, Any], job_name: str = "") -> bytes:
    """The report's history as an 800x500 PNG: train loss and eval loss against step, the learning
    rate on a second y axis, the best checkpoint (lowest eval loss among the kept ones) starred and
    labelled, the adapter the job keeps marked when it is another step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    history = report.get("history") or []
    fig = Figure(figsize=(PNG_WIDTH / PNG_DPI, PNG_HEIGHT / PNG_DPI), dpi=PNG_DPI)
    FigureCanvasAgg(fig)  # the Agg backend, set on this figure only (no global matplotlib state)
    ax = fig.add_subplot()
    ax.set_title(plot_title(report, job_name), fontsize=12)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = []

    def series(name: str) -> tuple[list[int], list[float]]:
        pairs = [(p["step"], p[name]) for p in history if p.get(name) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    steps, losses = series("train_loss")
    if steps:
        handles += ax.plot(steps, losses, color="tab:blue", linewidth=1.6, label="train loss",
                           marker="." if len(steps) <= 40 else None)
    steps, losses = series("eval_loss")
    if steps:
        handles += ax.plot(steps, losses, color="tab:orange", linewidth=1.8, marker="o", markersize=5,
                           label="eval loss")
    steps, rates = series("learning_rate")
    if steps:
        lr_ax = ax.twinx()
        handles += lr_ax.plot(steps, rates, color="tab:gray", linestyle="--", linewidth=1.2, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lr_ax.tick_params(axis="y", colors="tab:gray")
        lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))  # no offset text
        lr_ax.set_ylim(bottom=0)

    best = report.get("best_checkpoint")
    if best and best.get("eval_loss") is not None:
        handles += ax.plot([best["step"]], [best["eval_loss"]], linestyle="none", marker="*", markersize=18,
                           color="tab:red", zorder=5, label="best checkpoint")
        ax.annotate(f"best checkpoint\nstep {best['step']}, eval loss {best['eval_loss']:.4f}",
                    xy=(best["step"], best["eval_loss"]), textcoords="offset points",
                    xytext=(0, -44 if _in_upper_half(best["eval_loss"], history) else 28),
                    ha=_label_alignment(best["step"], [p["step"] for p in history]), fontsize=9, color="tab:red",
                    arrowprops={"arrowstyle": "->", "color": "tab:red"},
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "tab:red", "alpha": 0.9})
    adapter = next((c for c in report.get("checkpoints") or [] if c.get("adapter")), None)
    if adapter and best and adapter["step"] != best["step"]:
        handles.append(ax.axvline(adapter["step"], color="tab:green", linestyle=":", linewidth=1.2,
                                  label=f"adapter kept (step {adapter['step']})"))
    if not history or not handles:
        ax.text(0.5, 0.5, "no losses were logged", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="tab:gray")
    else:  # below the axes: inside, the curves (and the learning-rate axis drawn on top) would hide it
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    ax.margins(y=0.15)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI)  # no bbox_inches="tight": exactly 800x500
    return buffer.getvalue()


def report_prefix(attempt_prefix: str) -> str:
    return f"{attempt_prefix}/{REPORT_DIRNAME}"


def write_report(store, prefix: str, report: Mapping[str, Any], job_name: str = "") -> str:
    """Render and store ``loss.png`` and ``report.json`` under ``prefix`` (an ``ArtifactStore``
    key); returns ``prefix``. The JSON is written last: a reader that finds it finds the plot."""
    png = render_loss_png(report, job_name)
    store.put_bytes(f"{prefix}/{LOSS_PNG}", png)
    store.put_bytes(f"{prefix}/{REPORT_JSON}", json.dumps(report, indent=2, sort_keys=True).encode())
    return prefix
