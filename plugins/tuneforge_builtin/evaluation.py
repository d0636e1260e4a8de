"""Did it learn? The base model (adapter disabled) against the fine-tuned one on the test split.

After training, every TRL method ends with :func:`evaluate_against_base` (called by
``trl_common.run_to_completion``):

* the eval loss of the base model on the same eval batches as the fine-tuned eval loss (SFT only:
  a DPO loss of the base against itself as reference is ln 2 by construction; DPO reports its
  reward accuracy and margin instead);
* for test examples whose assistant turns call tools: tool-call accuracy of greedy generations of
  both models (:func:`tool_call_accuracy`: the set of calls must match, name exact and arguments
  equal as JSON), over at most :data:`MAX_TOOL_CALL_TURNS` turns;
* greedy samples of the first :data:`N_SAMPLES` test examples, side by side (prompt, reference,
  base, tuned), also written as ``samples.jsonl`` into the adapter directory.

Generation is bounded: :data:`MAX_NEW_TOKENS_SAMPLE` / :data:`MAX_NEW_TOKENS_TOOL_CALL` new tokens
each, and :data:`GENERATION_BUDGET_SECONDS` in total per job; once the budget is spent, the rest
is skipped and the metrics say how many were evaluated. The settings are module constants, read at
call time, so tests can lower them.

The parsing and scoring helpers are pure; torch is imported inside the functions that generate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

N_SAMPLES = 5  # the first N usable test examples
MAX_NEW_TOKENS_SAMPLE = 128
MAX_NEW_TOKENS_TOOL_CALL = 96
MAX_TOOL_CALL_TURNS = 50
GENERATION_BUDGET_SECONDS = 120.0  # all generations of one job together
SAMPLES_FILENAME = "samples.jsonl"


# ----------------------------------------------------------------------------------------------
# Pure helpers: tool-call parsing and scoring.


def _arguments(value: Any) -> Any:
    """Arguments as a JSON value: a string holding JSON is decoded (OpenAI stores them so)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _as_call(obj: Any) -> dict[str, Any] | None:
    """``{"name", "arguments"}`` of a call object in any of the families' shapes (``arguments`` or
    ``parameters``; OpenAI's ``{"function": {...}}`` too), else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str):
        return None
    for key in ("arguments", "parameters"):
        if key in obj:
            return {"name": name, "arguments": _arguments(obj[key])}
    return None


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls written in a model's output, whatever the family's format: every JSON object
    or array in the text (Llama 3 ``{"name", "parameters"}``, Qwen 2.5 ``<tool_call>{...}
    </tool_call>``, Mistral ``[TOOL_CALLS] [{...}, ...]``) whose objects have a ``name`` and
    ``arguments`` / ``parameters``. Prose around the JSON is ignored."""
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    i, n = 0, len(text or "")
    while i < n:
        if text[i] not in "{[":
            i += 1
            continue
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        items = value if isinstance(value, list) else [value]
        found = [c for c in (_as_call(item) for item in items) if c is not None]
        if found:
            calls.extend(found)
            i = end
        else:
            i += 1  # e.g. a "[" of prose or an arguments-only object: look inside it
    return calls


def reference_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"name", "arguments"}`` of an assistant message's ``tool_calls``."""
    return [c for c in (_as_call(call) for call in message.get("tool_calls") or []) if c is not None]


def _call_key(call: dict[str, Any]) -> str:
    return json.dumps([call["name"], call["arguments"]], sort_keys=True, separators=(",", ":"))


def calls_match(predicted: list[dict[str, Any]], reference: list[dict[str, Any]]) -> bool:
    """Whether two lists of calls are the same calls, in any order (name exact, arguments equal as
    JSON; a call made twice counts twice)."""
    return sorted(map(_call_key, predicted)) == sorted(map(_call_key, reference))


def tool_call_accuracy(predicted_texts: list[str], reference: list[list[dict[str, Any]]]) -> float | None:
    """Share of turns whose generated text makes exactly the reference calls; None for no turns."""
    if len(predicted_texts) != len(reference):
        raise ValueError(f"{len(predicted_texts)} predictions for {len(reference)} reference turns")
    if not reference:
        return None
    right = sum(calls_match(parse_tool_calls(text), [
        {"name": c["name"], "arguments": _arguments(c["arguments"])} for c in calls
    ]) for text, calls in zip(predicted_texts, reference, strict=True))
    return right / len(reference)


def message_text(message: dict[str, Any]) -> str:
    """An assistant message as text: its content, then its tool calls as compact JSON."""
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    parts = [content] if isinstance(content, str) and content else []
    calls = reference_calls(message)
    if calls:
        parts.append(json.dumps(calls, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(parts)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Something to answer: a chat (``messages`` + ``tools``) or, for plain prompt/completion
    data, a raw ``text`` prompt."""

    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    text: str | None = None

    @property
    def display(self) -> str:
        return self.text if self.text is not None else _last_user_text(self.messages or [])

    @property
    def as_json(self) -> str:
        messages = self.messages if self.text is None else [{"role": "user", "content": self.text}]
        return json.dumps(messages, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class SampleCase:
    prompt: Prompt
    reference: str


@dataclasses.dataclass(frozen=True)
class ToolCallCase:
    prompt: Prompt
    calls: list[dict[str, Any]]  # the reference calls


@dataclasses.dataclass
class EvaluationSet:
    """What to generate for one job's test split."""

    samples: list[SampleCase] = dataclasses.field(default_factory=list)
    tool_calls: list[ToolCallCase] = dataclasses.field(default_factory=list)
    tool_call_turns_total: int = 0  # before the MAX_TOOL_CALL_TURNS cap


def conversation_evaluation_set(rows: list[dict[str, Any]]) -> EvaluationSet:
    """Samples and tool-call turns of SFT test rows (conversations, prompt/completion; plain text
    has no prompt and is skipped)."""
    out = EvaluationSet()
    for row in rows:
        tools = row.get("tools") or None
        if isinstance(row.get("messages"), list):
            messages = row["messages"]
            last = None
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or message.get("role") != "assistant":
                    continue
                last = i
                calls = reference_calls(message)
                if calls:
                    out.tool_call_turns_total += 1
                    out.tool_calls.append(ToolCallCase(Prompt(messages[:i], tools), calls))
            if last is not None and last > 0:
                out.samples.append(SampleCase(Prompt(messages[:last], tools), message_text(messages[last])))
        elif isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
            completion = [m for m in row["completion"] if isinstance(m, dict) and m.get("role") == "assistant"]
            if completion:
                out.samples.append(SampleCase(Prompt(row["prompt"], tools), message_text(completion[0])))
                if calls := reference_calls(completion[0]):
                    out.tool_call_turns_total += 1
                    out.tool_calls.append(ToolCallCase(Prompt(row["prompt"], tools), calls))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.samples.append(SampleCase(Prompt(text=row["prompt"]), row["completion"]))
    out.samples = out.samples[:N_SAMPLES]
    out.tool_calls = out.tool_calls[:MAX_TOOL_CALL_TURNS]
    return out


def preference_evaluation_set(pairs: list[dict[str, Any]]) -> EvaluationSet:
    """Samples (reference: the preferred output) and tool-call turns (a preferred output that
    calls tools) of DPO test pairs (TRL's ``prompt`` / ``chosen`` / ``tools``)."""
    out = EvaluationSet()
    for pair in pairs:
        prompt = Prompt(pair["prompt"], pair.get("tools") or None)
        chosen = pair["chosen"][0]
        out.samples.append(SampleCase(prompt, "\n".join(message_text(m) for m in pair["chosen"])))
        if calls := reference_calls(chosen):
            out.tool_call_turns_total += 1
            out.tool_calls.append(ToolCallCase(prompt, calls))
    out.samples = out.samples[:N_SAMPLES]
    out.tool_calls = out.tool_calls[:MAX_TOOL_CALL_TURNS]
    return out


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate_against_base` found."""

    base_eval_loss: float | None = None
    tool_call_accuracy: float | None = None
    base_tool_call_accuracy: float | None = None
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # counts and timings


def write_samples(samples: list[dict[str, str]], directory: Path) -> Path:
    path = Path(directory) / SAMPLES_FILENAME
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Generation (torch imported inside).


class _Generator:
    """Greedy, bounded generation with one model, adapter on or off, under one time budget."""

    def __init__(self, model, tokenizer, max_length: int, budget_seconds: float):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.deadline = time.monotonic() + budget_seconds
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) else eos)
        self.seconds = 0.0
        self.count = 0

    @property
    def spent(self) -> bool:
        return time.monotonic() >= self.deadline

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.text is not None:
            return list(self.tokenizer(prompt.text)["input_ids"])
        out = self.tokenizer.apply_chat_template(prompt.messages, tools=prompt.tools, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def generate(self, ids: list[int], max_new_tokens: int) -> str:
        import torch

        started = time.monotonic()
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                eos_token_id=self.eos, pad_token_id=self.pad,
            )
        self.seconds += time.monotonic() - started
        self.count += 1
        return self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()

    def both(self, prompt: Prompt, max_new_tokens: int) -> tuple[str, str] | None:
        """``(base, tuned)`` answers, or None when the budget is spent or the prompt too long."""
        if self.spent:
            return None
        ids = self.encode(prompt)
        if len(ids) + max_new_tokens > self.max_length:
            log.info("evaluation: prompt of %d tokens too long for %d new tokens, skipped", len(ids), max_new_tokens)
            return None
        with self.model.disable_adapter():
            base = self.generate(ids, max_new_tokens)
        return base, self.generate(ids, max_new_tokens)


def evaluate_against_base(trainer, tokenizer, cases: EvaluationSet, *, max_length: int, base_eval_loss: bool,
                          job_id: str = "") -> Evaluation:
    """Base model against fine-tuned on the test split (see the module docstring). ``trainer``
    is the trained TRL trainer (its model a peft model); ``base_eval_loss``: evaluate the base
    model's loss on the trainer's eval set too (SFT)."""
    model = trainer.model
    out = Evaluation()
    if not hasattr(model, "disable_adapter"):
        log.warning("job %s: the model has no adapter to disable; no comparison with the base model", job_id)
        return out
    was_training = model.training
    model.eval()
    try:
        if base_eval_loss and trainer.eval_dataset is not None:
            with model.disable_adapter():
                # A prefix other than "eval": the progress callback must not report it as the run's.
                metrics = trainer.evaluate(metric_key_prefix="base_eval")
            value = metrics.get("base_eval_loss")
            if value is not None and math.isfinite(value):
                out.base_eval_loss = float(value)

        generator = _Generator(model, tokenizer, max_length, GENERATION_BUDGET_SECONDS)
        for case in cases.samples:
            answers = generator.both(case.prompt, MAX_NEW_TOKENS_SAMPLE)
            if answers is None:
                continue
            out.samples.append({"prompt_json": case.prompt.as_json, "prompt": case.prompt.display,
                                "reference": case.reference, "base_answer": answers[0], "tuned_answer": answers[1]})
        base_texts, tuned_texts, references = [], [], []
        for case in cases.tool_calls:
            answers = generator.both(case.prompt, MAX_NEW_TOKENS_TOOL_CALL)
            if answers is None:
                continue
            base_texts.append(answers[0])
            tuned_texts.append(answers[1])
            references.append(case.calls)
        if references:
            out.base_tool_call_accuracy = tool_call_accuracy(base_texts, references)
            out.tool_call_accuracy = tool_call_accuracy(tuned_texts, references)
            out.metrics["tool_call_turns_evaluated"] = float(len(references))
        if cases.tool_call_turns_total:
            out.metrics["tool_call_turns_total"] = float(cases.tool_call_turns_total)
        out.metrics["evaluation_samples"] = float(len(out.samples))
        out.metrics["evaluation_generation_seconds"] = generator.seconds
        skipped = len(cases.samples) - len(out.samples) + len(cases.tool_calls) - len(references)
        log.info(
            "job %s: evaluation against the base model: base eval loss %s; %d/%d samples, %d/%d tool-call turns "
            "(%d in the test split) in %d generations, %.1f s%s; tool-call accuracy base %s, tuned %s",
            job_id, "n/a" if out.base_eval_loss is None else f"{out.base_eval_loss:.4f}",
            len(out.samples), len(cases.samples), len(references), len(cases.tool_calls),
            cases.tool_call_turns_total, generator.count, generator.seconds,
            f" ({skipped} skipped: time budget or prompt length)" if skipped else "",
            out.base_tool_call_accuracy, out.tool_call_accuracy,
        )
    finally:
        model.train(was_training)
    return out
