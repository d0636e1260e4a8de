"""Building an immutable, content-addressed dataset snapshot: filter by topic and format,
de-duplicate, count tokens, handle over-length examples, split, and describe every step."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tuneforge.core import datasets as dataset_counts
from tuneforge.dataset_builder import formats

FORMAT_VERSION = 1
SPLIT_ALGORITHM = "sort by content hash, then random.Random(seed).shuffle; the first floor(test_fraction*n + 0.5) are test"
OVERLENGTH_POLICIES = ("drop", "truncate")


@dataclasses.dataclass(frozen=True)
class StoredExample:
    content_hash: str
    format: str
    body: dict[str, Any]  # universal form
    topics: tuple[str, ...]
    canonical_json: str = ""  # the stored text of ``body`` (formats.canonical), when loaded from the store


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    topics: tuple[str, ...]
    kind: str  # "conversations" or "preferences"
    method: str
    base_model: str
    context_length: int
    test_fraction: float = 0.1
    seed: int = 42
    train_on_inputs: str = "auto"
    overlength: str = "drop"
    max_epochs: int = 20

    def key(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["topics"] = sorted(self.topics)
        d["format_version"] = FORMAT_VERSION
        return d


@dataclasses.dataclass
class Snapshot:
    dataset_id: str
    content_hash: str
    options: BuildOptions
    train: list[StoredExample]
    test: list[StoredExample]
    counts: dict[str, int]  # workspace, filtered, deduplicated, overlength, kept, train, test
    topic_counts: dict[str, int]
    token_stats: dict[str, dict[str, float]] | None  # split -> stats
    train_on_inputs_rule: str
    warnings: list[str]
    manifest: dict[str, Any]
    tokenizer: str = ""
    new_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    topic_matched: int = 0  # examples with one of the topics, any format (before the format step)


def split_count(n: int, test_fraction: float) -> int:
    """Examples held out: test_fraction × n rounded half up (12.5 -> 13, not Python's banker's
    rounding), at least 1 when there are 2 or more, and never all of them."""
    n_test = math.floor(test_fraction * n + 0.5 + 1e-9)
    if n >= 2:
        n_test = max(1, min(n - 1, n_test))
    return n_test


def token_stats(counts: Sequence[int]) -> dict[str, float]:
    if not counts:
        return {"count": 0, "total": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(counts)

    def pct(p: float) -> int:  # nearest-rank percentile
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"count": len(ordered), "total": sum(ordered), "mean": sum(ordered) / len(ordered),
            "p50": pct(50), "p95": pct(95), "max": ordered[-1]}


def resolve_train_on_inputs(setting: str, examples: Sequence[StoredExample]) -> str:
    """DESIGN §3: true → all tokens; false → assistant output only; auto → plain text: all tokens,
    conversations: assistant turns only, messages with a `weight` → those weights."""
    if not examples or examples[0].format == formats.FORMAT_PREFERENCE:
        return "preference pairs: loss on the preferred/non-preferred outputs (DPO)"
    if setting == "true":
        return "all tokens (train_on_inputs=true)"
    kinds = set()
    for e in examples:
        if "text" in e.body:
            kinds.add("text")
        elif any("weight" in m for m in e.body["messages"]):
            kinds.add("weights")
        else:
            kinds.add("conversation")
    parts = []
    if "conversation" in kinds:
        parts.append("assistant turns only" + (" (train_on_inputs=false)" if setting == "false" else ""))
    if "weights" in kinds:
        parts.append("assistant messages by their weight (0 or 1)")
    if "text" in kinds:
        parts.append("all tokens of plain text" + (" (plain text has no inputs to leave out)" if setting == "false" else ""))
    return "; ".join(parts)


def select_examples(examples: Sequence[StoredExample], topics: Sequence[str], kind: str,
                    ) -> tuple[list[StoredExample], list[StoredExample]]:
    """The build's first two steps: the examples of ``kind`` with one of ``topics`` (all when
    empty), then those de-duplicated by content hash and ordered by it. Returns both lists."""
    wanted = set(topics)
    filtered = [
        e for e in examples
        if formats.KIND_OF_FORMAT[e.format] == kind and (not wanted or wanted.intersection(e.topics))
    ]
    unique: dict[str, StoredExample] = {}
    for e in filtered:
        unique.setdefault(e.content_hash, e)
    return filtered, sorted(unique.values(), key=lambda e: e.content_hash)


def topic_matched_count(examples: Sequence[StoredExample], topics: Sequence[str]) -> int:
    """Examples with one of ``topics`` (all when empty), of any format: the topic step of the
    build counted on its own (``select_examples`` applies topics and format in one pass)."""
    wanted = set(topics)
    if not wanted:
        return len(examples)
    return sum(1 for e in examples if not wanted.isdisjoint(e.topics))


def build_snapshot(
    examples: Sequence[StoredExample],
    options: BuildOptions,
    count_tokens: Callable[[list[dict[str, Any]]], list[int]] | None = None,
    tokenizer: str = "",
    known_counts: dict[str, int] | None = None,
    extra_warnings: Sequence[str] = (),
    count_examples: Callable[[list[StoredExample]], list[int]] | None = None,
) -> Snapshot:
    """``known_counts`` (content hash -> tokens, same tokenizer) skips counting those examples;
    the counts made here are returned in ``Snapshot.new_counts`` for the caller to keep.
    ``extra_warnings`` (the caller's findings, e.g. data the base model cannot take) come last.
    ``count_examples`` counts like ``count_tokens`` but is given the examples, not their bodies
    (``TokenCounter.count_stored`` sends their stored texts to worker processes)."""
    if count_examples is None and count_tokens is not None:
        def count_examples(rows: list[StoredExample]) -> list[int]:
            return count_tokens([e.body for e in rows])
    if options.overlength not in OVERLENGTH_POLICIES:
        raise ValueError(f"overlength must be one of {OVERLENGTH_POLICIES}")
    wanted = set(options.topics)
    filtered, ordered = select_examples(examples, options.topics, options.kind)
    unique = {e.content_hash for e in ordered}
    lengths: dict[str, int] = {}
    overlength: list[str] = []
    new_counts: dict[str, int] = {}
    if count_examples is not None and ordered:
        known = known_counts or {}
        todo = [e for e in ordered if e.content_hash not in known]
        if todo:
            new_counts = dict(zip([e.content_hash for e in todo], count_examples(todo), strict=True))
        for e in ordered:
            n = known[e.content_hash] if e.content_hash in known else new_counts[e.content_hash]
            lengths[e.content_hash] = n
            if n > options.context_length:
                overlength.append(e.content_hash)
    kept = ordered
    if options.overlength == "drop" and overlength:
        dropped = set(overlength)
        kept = [e for e in ordered if e.content_hash not in dropped]
    shuffled = list(kept)
    random.Random(options.seed).shuffle(shuffled)
    n_test = split_count(len(shuffled), options.test_fraction)
    test, train = shuffled[:n_test], shuffled[n_test:]
    topic_counts = Counter(t for e in kept for t in e.topics if not wanted or t in wanted)
    counts = {
        "workspace": len(examples), "filtered": len(filtered), "deduplicated": len(ordered),
        "overlength": len(overlength), "kept": len(kept), "train": len(train), "test": len(test),
    }
    stats = None
    if count_examples is not None:
        stats = {split: token_stats([lengths[e.content_hash] for e in rows]) for split, rows in
                 (("train", train), ("test", test))}
    rule = resolve_train_on_inputs(options.train_on_inputs, kept)
    warnings = _warnings(counts, options, tokenizer if count_examples else "") + list(extra_warnings)
    key = {**options.key(), "tokenizer": tokenizer if count_examples else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for h in sorted(unique):
        digest.update(h.encode())
    content_hash = digest.hexdigest()
    dataset_id = "ds_" + content_hash[:24]
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset_id": dataset_id,
        "content_hash": content_hash,
        "kind": options.kind,
        "method": options.method,
        "base_model": options.base_model,
        "topics": sorted(wanted) or "all",
        "split": {"seed": options.seed, "test_fraction": options.test_fraction, "algorithm": SPLIT_ALGORITHM},
        "counts": counts,
        "topic_counts": dict(sorted(topic_counts.items())),
        "tokens": {"tokenizer": tokenizer if count_examples else None, "context_length": options.context_length,
                   "overlength_policy": options.overlength, "overlength_hashes": overlength, "splits": stats},
        "train_on_inputs": {"setting": options.train_on_inputs, "resolved": rule},
        "warnings": warnings,
        "files": {"train": "train.jsonl", "test": "test.jsonl"},
        "train_hashes": [e.content_hash for e in train],
        "test_hashes": [e.content_hash for e in test],
    }
    return Snapshot(dataset_id, content_hash, options, train, test, counts, dict(topic_counts), stats, rule,
                    warnings, manifest, tokenizer if count_examples else "", new_counts,
                    topic_matched_count(examples, options.topics))


def _warnings(counts: dict[str, int], options: BuildOptions, tokenizer: str) -> list[str]:
    n = counts["kept"]
    out = []
    if n < 100:
        out.append(f"{n} examples: fine-tuning with fewer than 100 well curated examples will not yield "
                   "the desired results")
    elif n < 1000:
        out.append(f"{n} examples: at least 1000 examples are recommended for fine-tuning")
    if n < 500 and options.max_epochs > 5:
        out.append(f"{n} examples with max_epochs={options.max_epochs}: for fewer than 500 examples, "
                   "reduce epochs to 3-5 to avoid overfitting")
    if counts["overlength"]:
        verb = "dropped" if options.overlength == "drop" else "kept and will be truncated to the context length"
        out.append(f"{counts['overlength']} examples are longer than the {options.context_length}-token context "
                   f"of {options.base_model}: {verb} (their hashes are in manifest.json)")
    if not tokenizer:
        out.append(f"no tokenizer for {options.base_model} in the model store: token statistics and the "
                   "over-length check were skipped")
    return out


def describe_counts(counts: dict[str, int], options: BuildOptions) -> str:
    """Every step's count, for messages such as the refusal to build an empty dataset."""
    return dataset_counts.describe_counts(
        workspace=counts["workspace"], filtered=counts["filtered"], deduplicated=counts["deduplicated"],
        kept=counts["kept"], overlength_dropped=counts["overlength"] if options.overlength == "drop" else 0,
        train=counts["train"], test=counts["test"], kind=options.kind, topics=options.topics,
    )


def jsonl(examples: Sequence[StoredExample]) -> bytes:
    """One example per line in its canonical form (compact JSON, keys sorted): the stored text
    where it was loaded, so each line's SHA-256 is the example's content hash."""
    if not examples:
        return b""
    return ("\n".join(e.canonical_json or formats.canonical(e.body) for e in examples) + "\n").encode()
