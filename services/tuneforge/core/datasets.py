"""What each step of a dataset build left, in words: the dataset-builder's refusals and the
job-scheduler's min_examples refusal say it the same way."""

from __future__ import annotations

from collections.abc import Iterable


def describe_counts(
    *, workspace: int, filtered: int, deduplicated: int, kept: int, overlength_dropped: int,
    train: int, test: int, kind: str, topics: Iterable[str],
) -> str:
    """workspace → topic (and format) filter → dedupe → over-length drops → train / test."""
    topic_text = ", ".join(sorted(topics)) or "all topics"
    text = (f"{workspace} examples in the workspace -> {filtered} {kind} examples in {topic_text} -> "
            f"{deduplicated} after removing duplicates")
    if overlength_dropped:
        text += f" -> {kept} after dropping {overlength_dropped} over-length"
    return text + f" -> {train} train / {test} test"
