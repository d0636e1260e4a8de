"""Building an immutable, content-addressed dataset snapshot: filter, de-duplicate, split, write."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from typing import Any

from tuneforge.dataset_builder import formats

FORMAT_VERSION = 1
SPLIT_ALGORITHM = "sha256-sort+random.Random(seed).shuffle"


@dataclasses.dataclass(frozen=True)
class StoredExample:
    content_hash: str
    format: str
    body: dict[str, Any]
    topics: tuple[str, ...]


@dataclasses.dataclass
class Snapshot:
    dataset_id: str
    content_hash: str
    kind: str
    train: list[StoredExample]
    test: list[StoredExample]
    filtered_count: int
    topic_counts: dict[str, int]
    warnings: list[str]
    manifest: dict[str, Any]


def split_count(n: int, test_fraction: float) -> int:
    """Examples held out: round(test_fraction × n), at least 1 when there are 2 or more."""
    n_test = round(test_fraction * n)
    if n >= 2:
        n_test = max(1, min(n - 1, n_test))
    return n_test


def build_snapshot(
    examples: list[StoredExample],
    *,
    topics: list[str],
    kind: str,
    test_fraction: float,
    seed: int,
    base_model: str,
    method: str,
) -> Snapshot:
    wanted = set(topics)
    filtered = [
        e for e in examples
        if formats.KIND_OF_FORMAT[e.format] == kind and (not wanted or wanted.intersection(e.topics))
    ]
    unique: dict[str, StoredExample] = {}
    for e in filtered:
        unique.setdefault(e.content_hash, e)
    ordered = sorted(unique.values(), key=lambda e: e.content_hash)
    random.Random(seed).shuffle(ordered)
    n_test = split_count(len(ordered), test_fraction)
    test, train = ordered[:n_test], ordered[n_test:]
    topic_counts = Counter(t for e in ordered for t in e.topics if not wanted or t in wanted)
    settings = {"topics": sorted(wanted), "kind": kind, "test_fraction": test_fraction, "seed": seed,
                "format_version": FORMAT_VERSION, "base_model": base_model}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for e in sorted(unique):
        digest.update(e.encode())
    content_hash = digest.hexdigest()
    dataset_id = "ds_" + content_hash[:24]
    n = len(ordered)
    warnings = []
    if n < 100:
        warnings.append(f"{n} examples: fewer than 100 well curated examples will not yield the desired results")
    elif n < 1000:
        warnings.append(f"{n} examples: at least 1000 examples are recommended for fine-tuning")
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset_id": dataset_id,
        "content_hash": content_hash,
        "kind": kind,
        "method": method,
        "base_model": base_model,
        "topics": sorted(wanted) or "all",
        "split": {"seed": seed, "test_fraction": test_fraction, "algorithm": SPLIT_ALGORITHM},
        "counts": {"filtered": len(filtered), "after_dedupe": n, "train": len(train), "test": len(test)},
        "topic_counts": dict(sorted(topic_counts.items())),
        "warnings": warnings,
        "files": {"train": "train.jsonl", "test": "test.jsonl"},
        "train_hashes": [e.content_hash for e in train],
        "test_hashes": [e.content_hash for e in test],
    }
    return Snapshot(dataset_id, content_hash, kind, train, test, len(filtered), dict(topic_counts), warnings, manifest)


def jsonl(examples: list[StoredExample]) -> bytes:
    lines = [
        json.dumps(formats.to_universal(e.format, e.body), ensure_ascii=False, sort_keys=False)
        for e in examples
    ]
    return ("\n".join(lines) + "\n").encode() if lines else b""
