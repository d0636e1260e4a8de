"""``tuneforge demo`` (``make demo``): a real model that really learns, on a laptop's CPU.

The quickstart's flow on SmolLM2 135M Instruct (catalog ``smollm2-135m``, real weights that
``make real-model`` puts into the model store): start the embedded stack, create an Enterprise
workspace, import the example conversations, fine-tune on two topics, then show what training did
— the base model's eval loss against the fine-tuned one on the held-out split, and test prompts
answered by both, side by side. The settings (DEMO_HYPERPARAMETERS) were chosen by measurement on
2 CPU cores (benchmarks/README.md). Exit code 0 only when the job SUCCEEDED and the fine-tuned
model's eval loss is below the base model's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.quickstart import EXAMPLES, ProgressView, finish, run_job

BASE_MODEL = "smollm2-135m"
TOPICS = ["billing", "shipping"]
JOB_NAME = "support-smollm2"
# Measured on 2 shared CPU cores (benchmarks/README.md): the held-out eval loss falls to well under
# 0.7x the base model's within the run; a higher rate than the product's default 1e-4 because the
# run is short, four small batches per optimizer step worth of examples, evaluation only twice.
DEMO_HYPERPARAMETERS = {
    "learning_rate": 2e-3,
    "max_epochs": 1,
    "batch_size": 4,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "n_evals": 2,
    "early_stopping_patience": 0,
}
GOAL_RATIO = 0.7  # fine-tuned eval loss at most this share of the base model's


def tool_free_examples(source: Path, target: Path) -> tuple[int, int]:
    """Copy ``source`` without the examples that need tool calling (SmolLM2 has no tool-call
    format, so a job with them is refused); returns (kept, left out)."""
    from tuneforge.core import capabilities

    kept = dropped = 0
    with open(source, encoding="utf-8") as src, open(target, "w", encoding="utf-8") as out:
        for line in src:
            if not line.strip():
                continue
            if capabilities.TOOL_CALLING in capabilities.needs(json.loads(line)):
                dropped += 1
                continue
            out.write(line)
            kept += 1
    return kept, dropped


def _samples_table(samples, limit: int = 200) -> Table:
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 1] + "…"

    table = Table(title="held-out prompts: base model vs fine-tuned (greedy)", show_lines=True, expand=True)
    for column in ("prompt", "reference", "base model", "fine-tuned"):
        table.add_column(column, overflow="fold", ratio=1)
    for s in samples:
        table.add_row(cut(s.prompt), cut(s.reference), cut(s.base_answer), cut(s.tuned_answer))
    return table


def main(data_dir: Path, model_store: Path, keep_running: bool = False,
         overrides: common_pb2.Hyperparameters | None = None) -> int:
    """Run the demo; ``overrides`` (``tuneforge demo --set KEY=VALUE``) replace DEMO_HYPERPARAMETERS."""
    from tuneforge.stack import Stack

    console = Console()
    started = time.monotonic()
    model_dir = model_store / BASE_MODEL
    if not (model_dir / "config.json").is_file():
        console.print(f"[red]error:[/] {BASE_MODEL} is not in the model store ({model_dir}): run `make real-model` "
                      f"(or `tuneforge models real-model`) first")
        return 1
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    console.print(f"[bold]tuneforge demo[/]: fine-tune the real SmolLM2 135M Instruct ({model_dir}) on "
                  f"{' + '.join(TOPICS)} (state in {data_dir})")
    examples = data_dir / "conversations-without-tool-calls.jsonl"
    kept, dropped = tool_free_examples(EXAMPLES, examples)
    console.print(f"{EXAMPLES.name}: {kept} conversations; {dropped} with tool calls left out "
                  "(SmolLM2 has no tool-call format)")
    stack = Stack(data_dir, extra_env={"TUNEFORGE_MODEL_STORE": str(model_store)}, supervise=True)
    stack.start()
    console.print("stack up: nats-server + " + ", ".join(stack.endpoints))
    hyperparameters = common_pb2.Hyperparameters(**DEMO_HYPERPARAMETERS)
    if overrides is not None:
        hyperparameters.MergeFrom(overrides)
    view = ProgressView(console)
    try:
        outcome = asyncio.run(run_job(
            stack.endpoints, stack.admin_token, examples=examples, topics=TOPICS, job_name=JOB_NAME,
            base_model=BASE_MODEL, hyperparameters=hyperparameters,
            description="Demo: SmolLM2 135M on billing and shipping support", on_event=view,
        ))
    except BaseException:
        view.close()
        for service in stack.endpoints:
            console.print(stack.log_tail(service, 15))
        stack.stop()
        raise
    view.close()
    job, model = outcome.job, outcome.model
    ok = job.state == js.JOB_STATE_SUCCEEDED and model is not None
    summary = Table(title="demo summary", show_header=False)
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")
    summary.add_row("job", f"{job.spec.name} ({job.id}): " + js.JobState.Name(job.state).removeprefix("JOB_STATE_")
                    + (f": {job.failure_reason}" if job.failure_reason else ""))
    d = job.dataset
    summary.add_row("dataset", f"{d.train_count} train / {d.test_count} held out, topics "
                    + ", ".join(f"{t}={n}" for t, n in sorted(d.topic_counts.items())))
    settings = ", ".join(f"{f.name}={v if f.name != 'lora_target_modules' else ','.join(v)}"
                         for f, v in hyperparameters.ListFields())
    summary.add_row("settings", settings)
    learned = False
    if model is not None:
        m = model.metrics
        summary.add_row("training", f"{m.steps} steps, {m.epochs:.1f} epochs, {m.train_seconds:.0f} s")
        if m.HasField("eval_loss") and m.HasField("base_eval_loss") and m.base_eval_loss > 0:
            ratio = m.eval_loss / m.base_eval_loss
            learned = ratio < 1.0
            verdict = "[green]learned[/]" if ratio <= GOAL_RATIO else ("[yellow]learned a little[/]" if learned else "[red]did not learn[/]")
            summary.add_row("eval loss", f"base model {m.base_eval_loss:.4f} → fine-tuned {m.eval_loss:.4f} "
                            f"(×{ratio:.2f}, {(ratio - 1) * 100:+.0f} %): {verdict}")
        else:
            summary.add_row("eval loss", "[red]no base-vs-tuned evaluation in the metrics[/]")
        summary.add_row("model", f"{model.name} ({model.id}); adapter in {data_dir / 'artifacts' / model.adapter_path}")
    summary.add_row("wall time", f"{time.monotonic() - started:.0f} s")
    console.print(summary)
    if model is not None and model.metrics.samples:
        console.print(_samples_table(model.metrics.samples))
    ok = ok and learned
    message = None
    if keep_running:
        message = (f"stack still running. Try the model:\n  export TUNEFORGE_API_KEY={outcome.api_key}\n"
                   f"  TUNEFORGE_MODEL_STORE={model_store} tuneforge --data-dir {data_dir} models try {JOB_NAME} "
                   "\"My invoice shows a charge twice.\"\nCtrl-C to stop")
    return finish(console, stack, "demo", ok, message)


if __name__ == "__main__":
    sys.exit(main(Path(".tuneforge/demo").resolve(), Path(".tuneforge/models").resolve()))
