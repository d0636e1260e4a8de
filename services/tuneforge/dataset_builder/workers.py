"""Validation (and, where it pays, token counting) in worker processes, for large imports/builds.

Both are CPU work on independent examples, so a pool of processes (one per core, at most
``MAX_WORKERS``) takes them past what one Python thread can do. Validation is pure Python and
goes to the workers; counting only with ``ENV_COUNT`` set (see there). Small inputs stay in process:
below ``MIN_PARALLEL`` examples the hop costs more than it saves. What crosses the process
boundary is kept flat and cheap to pickle: raw lines in, (line, format, topics, hash, canonical
text) or errors out for validation; canonical texts in, token counts out for counting. The
results are the in-process results (tests compare them).

Processes are started with ``spawn`` (the service has threads, gRPC and an event loop: no fork),
on first use, and kept for the life of the process (stopped at exit). Each worker runs its
tokenizer single-threaded: two workers with two tokenizer threads each would oversubscribe two
cores.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_WORKERS = 8
MIN_PARALLEL = 4000  # examples below which work stays in process
VALIDATE_BATCH = 2000  # lines per validation task
ENV_WORKERS = "TUNEFORGE_DATASET_WORKERS"  # 0 or 1: everything in process
# "1": count tokens in the workers too. Off by default: on 2 shared cores it measured 1.4-1.6x
# slower than counting in process, where the tokenizer already runs on both cores with its own
# threads (benchmarks/dataset_build.py prints both; switch it on where it measures faster).
ENV_COUNT = "TUNEFORGE_DATASET_COUNT_IN_WORKERS"


def counting_in_workers() -> bool:
    return os.environ.get(ENV_COUNT, "").strip() == "1"


def worker_count() -> int:
    configured = os.environ.get(ENV_WORKERS, "")
    if configured.strip().isdigit():
        return int(configured)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus))


_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker (set before any encode)
    os.environ["RAYON_NUM_THREADS"] = "1"


def pool() -> concurrent.futures.ProcessPoolExecutor | None:
    """The shared pool, started on first use; None when configured for one process."""
    global _pool
    if worker_count() < 2:
        return None
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ProcessPoolExecutor(
                worker_count(), mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
            atexit.register(shutdown)
        return _pool


def warm() -> None:
    """Start the workers now (each imports the validator and the tokenizer library)."""
    executor = pool()
    if executor is not None:
        list(executor.map(_ping, range(worker_count())))


def shutdown(wait: bool = True) -> None:
    """Stop the workers (at exit; a later use starts new ones)."""
    global _pool
    with _lock:
        executor, _pool = _pool, None
    if executor is not None:
        executor.shutdown(wait=wait, cancel_futures=True)


def discard() -> None:
    """Forget the pool after a failure (a worker died): the next use starts a new one."""
    shutdown(wait=False)


def _ping(_: int) -> int:
    from tuneforge.dataset_builder import formats, tokens  # noqa: F401 - imported once per worker

    return os.getpid()


# -- validation ---------------------------------------------------------------------------------------

def validate_lines(lines: Sequence[tuple[int, bytes]], extra_topics: tuple[str, ...]) -> list[tuple]:
    """``formats.parse_line`` of each (line number, raw line): for a valid line the tuple
    ``(line, format, topics, content_hash, canonical_json)``, else ``(line, [LineError, ...])``."""
    from tuneforge.dataset_builder import formats

    out: list[tuple] = []
    for line, raw in lines:
        example, errors = formats.parse_line(raw, line, extra_topics)
        if example is None:
            out.append((line, errors))
        else:
            out.append((example.line, example.format, example.topics, example.content_hash, example.canonical_json))
    return out


# -- token counting -----------------------------------------------------------------------------------

_counters: dict[tuple, Any] = {}


def count_texts(spec: tuple[str, str, tuple[tuple[str, str], ...], str, int],
                canonical_texts: Sequence[str]) -> list[int]:
    """Token counts of stored examples (their canonical texts) with the counter ``spec`` names:
    (tokenizer file, chat template, special tokens, name, tokenizer file's mtime)."""
    from tuneforge.dataset_builder import formats
    from tuneforge.dataset_builder.tokens import TokenCounter

    counter = _counters.get(spec)
    if counter is None:
        tokenizer_file, chat_template, special, name, _mtime = spec
        counter = TokenCounter(Path(tokenizer_file), chat_template, dict(special), name)
        _counters.clear()
        _counters[spec] = counter
    return counter.count([formats.loads_stored(text) for text in canonical_texts])


def count_in_workers(spec, canonical_texts: Sequence[str], executor) -> list[int]:
    """``count_texts`` over the pool, in about four tasks per worker, results in order."""
    tasks = max(1, 4 * worker_count())
    size = -(-len(canonical_texts) // tasks)
    futures = [executor.submit(count_texts, spec, list(canonical_texts[i:i + size]))
               for i in range(0, len(canonical_texts), size)]
    out: list[int] = []
    for future in futures:
        out.extend(future.result())
    return out
