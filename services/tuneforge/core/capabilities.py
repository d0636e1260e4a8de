"""What training data needs from a base model, and whether a model has it.

A base model's ``BaseModelSpec.capabilities`` say which data it can be fine-tuned on. Two kinds of
data need a capability:

* tool calls — an assistant message with ``tool_calls``, a ``tools`` declaration or a ``tool``
  message — need ``tool_calling``;
* reasoning traces — an assistant message with a ``reasoning`` field or a ``<think>…</think>``
  block in its content — need ``reasoning``.

Pure functions over universal-form bodies (see ``dataset_builder.formats.universal``): the
job-scheduler (ValidateJob, CreateJob) and the dataset-builder (SummarizeExamples, the build for a
job) say it the same way. No I/O, no torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

TOOL_CALLING = "tool_calling"
REASONING = "reasoning"
CHECKED = (TOOL_CALLING, REASONING)  # the capabilities that data is checked against

WHAT_NEEDS = {
    TOOL_CALLING: "tool calls (assistant tool_calls, a tools declaration or tool messages)",
    REASONING: "reasoning traces (an assistant reasoning field or a <think>...</think> block)",
}

# Substrings of the canonical JSON (sorted keys, no spaces) that every example needing the
# capability contains: a cheap prefilter (SQL LIKE) before ``needs`` confirms on parsed bodies.
CANDIDATE_SUBSTRINGS = {
    TOOL_CALLING: ('"tool_calls":', '"tools":', '"role":"tool"'),
    REASONING: ('"reasoning":', "</think>"),
}

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _message_lists(body: Mapping[str, Any]) -> Iterable[Any]:
    """Every list of messages in a universal body: a conversation's, or a preference pair's input
    and both outputs."""
    if "messages" in body:
        yield body["messages"]
    inp = body.get("input")
    if isinstance(inp, Mapping):
        yield inp.get("messages")
    yield body.get("preferred_output")
    yield body.get("non_preferred_output")


def _declares_tools(body: Mapping[str, Any]) -> bool:
    inp = body.get("input")
    return bool(body.get("tools")) or (isinstance(inp, Mapping) and bool(inp.get("tools")))


def needs(body: Mapping[str, Any]) -> frozenset[str]:
    """The capabilities an example (a universal-form body) needs from its base model."""
    out: set[str] = set()
    if _declares_tools(body):
        out.add(TOOL_CALLING)
    for messages in _message_lists(body):
        if not isinstance(messages, list):
            continue
        for msg in messages:
            if not isinstance(msg, Mapping):
                continue
            role = msg.get("role")
            if role == "tool":
                out.add(TOOL_CALLING)
            elif role == "assistant":
                if msg.get("tool_calls"):
                    out.add(TOOL_CALLING)
                reasoning = msg.get("reasoning")
                content = msg.get("content")
                if (isinstance(reasoning, str) and reasoning.strip()) or (
                        isinstance(content, str) and "</think>" in content and THINK_BLOCK.search(content)):
                    out.add(REASONING)
    return frozenset(out)


def is_candidate(canonical_json: str, capability: str) -> bool:
    """Whether the canonical JSON may need ``capability`` (the prefilter, in Python)."""
    return any(s in canonical_json for s in CANDIDATE_SUBSTRINGS[capability])


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    """How many examples (after topic filter and de-duplication) need each capability."""

    example_count: int = 0
    tool_call_example_count: int = 0
    reasoning_example_count: int = 0

    def count(self, capability: str) -> int:
        return {TOOL_CALLING: self.tool_call_example_count, REASONING: self.reasoning_example_count}[capability]

    @property
    def required(self) -> tuple[str, ...]:
        """The capabilities that some example needs, in ``CHECKED`` order."""
        return tuple(c for c in CHECKED if self.count(c))


def summarize(bodies: Iterable[Mapping[str, Any]], example_count: int | None = None) -> DataNeeds:
    """Count the examples needing each capability. ``example_count`` is the number of examples
    the bodies were taken from (default: the number of bodies), for a prefiltered subset."""
    seen = tools = reasoning = 0
    for body in bodies:
        seen += 1
        found = needs(body)
        tools += TOOL_CALLING in found
        reasoning += REASONING in found
    return DataNeeds(seen if example_count is None else example_count, tools, reasoning)


def capable_models(catalog: Mapping[str, Iterable[str]], required: Iterable[str]) -> list[str]:
    """Sorted ids of the catalog's models (id -> capabilities) that have every ``required`` one."""
    wanted = set(required)
    return sorted(model_id for model_id, caps in catalog.items() if wanted <= set(caps))


def refusal(base_model: str, capabilities: Iterable[str], data: DataNeeds,
            catalog: Mapping[str, Iterable[str]]) -> str | None:
    """Why ``base_model`` (with ``capabilities``) cannot be fine-tuned on ``data``: how many
    examples need what, and which catalog models can take all of it. None when it can."""
    has = set(capabilities)
    missing = [c for c in data.required if c not in has]
    if not missing:
        return None
    what = "; ".join(
        f"{data.count(c)} of {data.example_count} examples have {WHAT_NEEDS[c]}, which need {c}" for c in missing)
    required = data.required
    models = capable_models(catalog, required)
    if models:
        choice = f"Base models that can take this data: {', '.join(models)}. Choose one of them"
    else:
        per_capability = "; ".join(f"{c}: {', '.join(capable_models(catalog, [c])) or 'none'}" for c in required)
        choice = (f"No base model in the catalog has {' and '.join(required)} together ({per_capability}). "
                  "Split this data into separate jobs")
    return (f"{base_model} cannot be fine-tuned on this data: {what}; {base_model} does not have "
            f"{' or '.join(missing)}. {choice}, or leave those examples out with the topic filter.")


def catalog_of(base_models: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``registry.base_models`` (id -> BaseModelSpec) as id -> capabilities."""
    return {model_id: tuple(spec.capabilities) for model_id, spec in base_models.items()}
