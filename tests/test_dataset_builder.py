"""The dataset-builder, at the builder level (build_snapshot, split, token counts, over-length,
warnings) and through its real gRPC API (ImportExamples, ListTopics, ListExamples, DeleteExamples,
BuildDataset, GetDataset, DownloadDataset) with the five services in-process."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import grpc
import pytest

from conftest import workspace
from tuneforge import sdk
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core.errors import field_violations
from tuneforge.dataset_builder import builder, formats
from tuneforge.dataset_builder.builder import BuildOptions, StoredExample, build_snapshot, split_count
from tuneforge.dataset_builder.tokens import TokenCounter
from tuneforge.plugins import get_registry

MODEL = "llama-3.2-1b"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_docs", "description": "Search the handbook",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"},
                                                                                       "k": {"type": "integer"}}}}},
]


# --- example generators ---------------------------------------------------------------------------

def call(cid: str, name: str, args) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def rich_conversation(i: int) -> dict:
    """Varied conversations: system prompts, tools with object and string arguments, several calls in
    one turn, tool results, weights, unicode, multi-turn."""
    kind = i % 7
    user = {"role": "user", "content": f"Question {i}: what about city {i}?"}
    if kind == 0:
        return {"messages": [{"role": "system", "content": f"You are assistant #{i}. Be brief."}, user,
                             {"role": "assistant", "content": f"Answer {i}."}]}
    if kind == 1:  # arguments as a JSON object
        return {"messages": [user, {"role": "assistant", "tool_calls": [call("c1", "get_weather", {"city": f"C{i}"})]},
                             {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp": i % 30})},
                             {"role": "assistant", "content": f"It is {i % 30} degrees.", "weight": 1}],
                "tools": TOOLS}
    if kind == 2:  # arguments as a JSON string (kept verbatim, spaces included)
        return {"messages": [{"role": "system", "content": "Use tools."}, user,
                             {"role": "assistant", "tool_calls": [call("x", "search_docs", f'{{"q": "topic {i}", "k": 3}}')]},
                             {"role": "tool", "tool_call_id": "x", "content": f"doc {i} says yes"},
                             {"role": "assistant", "content": "The handbook says yes."}],
                "tools": TOOLS}
    if kind == 3:  # two calls in one turn, object and string, with content
        return {"messages": [user, {"role": "assistant", "content": "Let me check both.", "tool_calls": [
                    call("a", "get_weather", {"city": "Oslo"}), call("b", "search_docs", f'{{"q":"oslo {i}"}}')]},
                             {"role": "tool", "tool_call_id": "a", "content": "cold"},
                             {"role": "tool", "tool_call_id": "b", "content": "fjords"},
                             {"role": "assistant", "content": f"Cold, with fjords ({i})."}],
                "tools": TOOLS}
    if kind == 4:  # multi-turn with weights
        return {"messages": [{"role": "system", "content": "Tutor."}, user,
                             {"role": "assistant", "content": "A first try.", "weight": 0},
                             {"role": "user", "content": "Try again."},
                             {"role": "assistant", "content": f"A better answer {i}.", "weight": 1}]}
    if kind == 5:  # unicode and whitespace the template trims
        return {"messages": [{"role": "user", "content": f"  Grüße aus 東京 №{i} — ✓  "},
                             {"role": "assistant", "content": f"\nDanke! 🎉 {i}\n"}]}
    return {"messages": [user, {"role": "assistant", "content": "Checking.", "tool_calls": [
                call("w", "get_weather", {"city": "Rome", "unit": {"c": True, "digits": [1, 2]}})]},
                         {"role": "tool", "tool_call_id": "w", "content": "sunny"},
                         {"role": "assistant", "content": f"Sunny in Rome {i}."}],
            "tools": TOOLS[:1]}


def simple(i: int, topics=None) -> dict:
    obj = {"messages": [{"role": "user", "content": f"question number {i}"},
                        {"role": "assistant", "content": f"answer number {i}"}]}
    if topics:
        obj["topics"] = list(topics)
    return obj


def write_jsonl(path: Path, objs) -> Path:
    path.write_bytes(b"".join((o if isinstance(o, bytes) else json.dumps(o, ensure_ascii=False).encode()) + b"\n"
                              for o in objs))
    return path


def stored(objs, topics=()) -> list[StoredExample]:
    out = []
    for n, obj in enumerate(objs, start=1):
        ex, errors = formats.parse_line(json.dumps(obj).encode(), n, tuple(topics))
        assert not errors, errors
        out.append(StoredExample(ex.content_hash, ex.format, json.loads(ex.canonical_json), ex.topics))
    return out


def options(**kw) -> BuildOptions:
    base = dict(topics=(), kind="conversations", method="sft", base_model=MODEL, context_length=131_072)
    base.update(kw)
    return BuildOptions(**base)


def half_up(n: int, fraction: str) -> int:
    """round(fraction × n), halves up, in exact decimal arithmetic (12.5 -> 13)."""
    return int((Decimal(fraction) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nearest_rank(values, p):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- RPC helpers ----------------------------------------------------------------------------------

async def import_bytes(clients, data: bytes, *, topics=(), mode=dsb.IMPORT_MODE_KEEP_VALID, chunk=256 * 1024,
                       source="upload.jsonl"):
    async def requests():
        yield dsb.ImportExamplesRequest(options=dsb.ImportOptions(source_name=source, topics=list(topics), mode=mode))
        for i in range(0, len(data), chunk):
            yield dsb.ImportExamplesRequest(chunk=data[i:i + chunk])
    return await clients.dataset_builder.ImportExamples(requests())


async def list_all(clients, topic="", page_size=1000):
    out, token, pages = [], "", 0
    while True:
        page = await clients.dataset_builder.ListExamples(
            dsb.ListExamplesRequest(topic=topic, page_size=page_size, page_token=token))
        out.extend(page.examples)
        pages += 1
        token = page.next_page_token
        if not token:
            return out, pages


async def build(clients, **kw):
    kw.setdefault("base_model", MODEL)
    return await clients.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(**kw))


async def download(clients, dataset_id, out: Path) -> dict[str, bytes]:
    paths = await sdk.download_dataset(clients, dataset_id, out)
    return {p.name: p.read_bytes() for p in paths}


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def hashes_of(data: bytes) -> list[str]:
    return [formats.content_hash(body) for body in lines_of(data)]


async def rpc_error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """One stand-in llama-3.2-1b (tokenizer + tiny weights) for the module; tests copy it."""
    from tuneforge.trainer.standin import make_standin

    return make_standin(get_registry().base_model(MODEL), tmp_path_factory.mktemp("store"))


# ====================================================================================================
# builder level
# ====================================================================================================

def test_split_is_deterministic_and_sized_by_split_count():
    examples = stored([simple(i, ["t"]) for i in range(230)])
    a = build_snapshot(examples, options(seed=5))
    shuffled = list(examples)
    random.Random(1).shuffle(shuffled)
    b = build_snapshot(shuffled + examples[:10], options(seed=5))  # other order, some duplicates
    assert a.dataset_id == b.dataset_id and a.content_hash == b.content_hash
    assert builder.jsonl(a.train) == builder.jsonl(b.train) and builder.jsonl(a.test) == builder.jsonl(b.test)
    assert b.counts == {"workspace": 240, "filtered": 240, "deduplicated": 230, "overlength": 0, "kept": 230,
                        "train": 207, "test": 23}
    assert len(a.test) == split_count(230, 0.1) == half_up(230, "0.1") == 23
    c = build_snapshot(examples, options(seed=6))
    assert c.dataset_id != a.dataset_id
    assert {e.content_hash for e in c.test} != {e.content_hash for e in a.test}
    assert {e.content_hash for e in c.train + c.test} == {e.content_hash for e in a.train + a.test}
    assert not {e.content_hash for e in a.train} & {e.content_hash for e in a.test}
    d = build_snapshot(examples, options(seed=5, test_fraction=0.25))
    assert len(d.test) == split_count(230, 0.25) == half_up(230, "0.25") == 58  # 57.5 rounds up
    # the documented example: 1,000 examples -> 100 test, 900 train
    assert split_count(1000, 0.1) == 100
    for n in range(10, 400):
        assert split_count(n, 0.1) == half_up(n, "0.1"), n
    assert [split_count(n, 0.1) for n in (15, 25, 35, 45)] == [2, 3, 4, 5]  # halves round up, not to even
    assert [split_count(n, 0.1) for n in range(5)] == [0, 0, 1, 1, 1]  # at least one test example from 2


def test_topic_filter_and_per_topic_counts_builder_level():
    examples = (stored([simple(i) for i in range(10)], ["a"]) + stored([simple(i) for i in range(10, 25)], ["b"])
                + stored([simple(i) for i in range(25, 30)], ["a", "b"]) + stored([simple(i) for i in range(30, 37)]))
    snap = build_snapshot(examples, options(topics=("a",)))
    kept = snap.train + snap.test
    assert len(kept) == 15 and all("a" in e.topics for e in kept)
    assert snap.topic_counts == {"a": 15} and snap.manifest["topics"] == ["a"]
    snap = build_snapshot(examples, options(topics=("b", "a")))
    assert snap.topic_counts == {"a": 15, "b": 20} and snap.counts["filtered"] == 30
    snap = build_snapshot(examples, options())
    assert snap.counts["kept"] == 37 and snap.topic_counts == {"a": 15, "b": 20} and snap.manifest["topics"] == "all"
    # preferences are another kind: a conversations build leaves them out
    prefs = stored([{"prompt": "q", "chosen": "x", "rejected": "y"}])
    assert build_snapshot(examples + prefs, options()).counts["filtered"] == 37
    assert build_snapshot(examples + prefs, options(kind="preferences", method="dpo")).counts["kept"] == 1
    # the topic step on its own (any format): a and/or b = 10 + 15 + 5, plus the pair when it has "a"
    prefs_a = stored([{"prompt": "q", "chosen": "x", "rejected": "y"}], ["a"])
    assert build_snapshot(examples + prefs_a, options(topics=("a", "b"))).topic_matched == 31
    assert build_snapshot(examples + prefs_a, options(topics=("a", "b"))).counts["filtered"] == 30
    assert build_snapshot(examples + prefs, options(topics=("a", "b"))).topic_matched == 30
    assert build_snapshot(examples + prefs, options()).topic_matched == 38  # no topics: every example


@pytest.mark.parametrize("n,max_epochs,expected", [
    (50, 20, ["50 examples: fine-tuning with fewer than 100", "50 examples with max_epochs=20"]),
    (99, 3, ["99 examples: fine-tuning with fewer than 100"]),
    (100, 20, ["100 examples: at least 1000 examples are recommended", "100 examples with max_epochs=20"]),
    (499, 6, ["499 examples: at least 1000", "499 examples with max_epochs=6"]),
    (499, 5, ["499 examples: at least 1000"]),
    (500, 20, ["500 examples: at least 1000"]),
    (999, 20, ["999 examples: at least 1000"]),
    (1000, 20, []),
])
def test_small_data_warnings(n, max_epochs, expected):
    snap = build_snapshot(stored([simple(i) for i in range(n)]), options(max_epochs=max_epochs))
    warnings = [w for w in snap.warnings if "no tokenizer" not in w]
    assert len(warnings) == len(expected), warnings
    for w, start in zip(warnings, expected):
        assert w.startswith(start), (w, start)
    if any("max_epochs" in w for w in warnings):
        assert "3-5" in warnings[-1] and "500" in warnings[-1]
    assert snap.manifest["warnings"] == snap.warnings
    assert any("no tokenizer for llama-3.2-1b" in w for w in snap.warnings)  # no counter given


def test_token_counter_matches_transformers_chat_template(standin):
    from transformers import AutoTokenizer

    from tuneforge.training import template_messages

    spec = get_registry().base_model(MODEL)
    counter = TokenCounter.for_model(standin.parent, MODEL, spec.training_chat_template)
    assert counter is not None and MODEL in counter.name
    tokenizer = AutoTokenizer.from_pretrained(standin)
    tokenizer.chat_template = spec.training_chat_template
    bodies = [e.body for e in stored([rich_conversation(i) for i in range(21)])]
    assert sum("tools" in b for b in bodies) >= 9
    counts = counter.count(bodies)
    for body, n in zip(bodies, counts):
        # rendered as the trainer renders it: tool-call arguments as objects
        ids = tokenizer.apply_chat_template(template_messages(body["messages"]), tools=body.get("tools"),
                                            tokenize=True, return_dict=True)["input_ids"]
        assert n == len(ids), body
    # a preference pair counts its longer sequence
    pair = stored([{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "short",
                    "non_preferred_output": "a much much longer answer than the other one"}])[0].body
    chosen, rejected = (len(tokenizer.apply_chat_template(pair["input"]["messages"] + pair[k], tokenize=True,
                                                          return_dict=True)["input_ids"])
                        for k in ("preferred_output", "non_preferred_output"))
    assert counter.count([pair]) == [max(chosen, rejected)] and rejected > chosen


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlength_drop_and_truncate(standin, policy):
    spec = get_registry().base_model(MODEL)
    counter = TokenCounter.for_model(standin.parent, MODEL, spec.training_chat_template)
    objs = [simple(i) for i in range(30)] + [
        {"messages": [{"role": "user", "content": " ".join(f"word{j}" for j in range(40 + 10 * i))},
                      {"role": "assistant", "content": "ok"}]} for i in range(6)]
    examples = stored(objs)
    lengths = dict(zip((e.content_hash for e in examples), counter.count([e.body for e in examples])))
    context = max(lengths[e.content_hash] for e in examples[:30])
    long = sorted(h for h, n in lengths.items() if n > context)
    assert len(long) == 6
    snap = build_snapshot(examples, options(context_length=context, overlength=policy), counter.count, counter.name)
    kept = {e.content_hash for e in snap.train + snap.test}
    assert snap.counts["overlength"] == 6
    assert sorted(snap.manifest["tokens"]["overlength_hashes"]) == long
    assert snap.manifest["tokens"]["overlength_policy"] == policy
    assert snap.manifest["tokens"]["context_length"] == context
    warning = [w for w in snap.warnings if "longer than" in w]
    assert len(warning) == 1 and f"6 examples are longer than the {context}-token context of {MODEL}" in warning[0]
    stats = snap.token_stats
    if policy == "drop":
        assert kept == set(lengths) - set(long) and snap.counts["kept"] == 30
        assert "dropped" in warning[0]
        assert max(stats["train"]["max"], stats["test"]["max"]) <= context
        assert "36 after removing duplicates -> 30 after dropping 6 over-length -> 27 train / 3 test" in \
            builder.describe_counts(snap.counts, snap.options)
    else:
        assert kept == set(lengths) and snap.counts["kept"] == 36
        assert "truncated" in warning[0]
        assert max(stats["train"]["max"], stats["test"]["max"]) == max(lengths.values()) > context
        assert "dropping" not in builder.describe_counts(snap.counts, snap.options)
    for split, rows in (("train", snap.train), ("test", snap.test)):
        ns = [lengths[e.content_hash] for e in rows]
        assert stats[split] == {"count": len(ns), "total": sum(ns), "mean": sum(ns) / len(ns),
                                "p50": nearest_rank(ns, 50), "p95": nearest_rank(ns, 95), "max": max(ns)}
    assert not any("no tokenizer" in w for w in snap.warnings)


# ====================================================================================================
# through the gRPC API
# ====================================================================================================

async def test_import_reports_line_field_and_code_over_rpc(services):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        good = [json.dumps(simple(i)).encode() for i in range(6)]
        long_line = b'{"text": "' + b"x" * (formats.MAX_LINE_BYTES + 50) + b'"}'
        lines = [
            good[0],                                                                                 # 1
            json.dumps(rich_conversation(1)).encode(),                                               # 2
            b"",                                                                                     # 3 blank
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"},
                                     {"role": "assistant", "content": "y"}]}).encode(),             # 4
            good[1] + b"\r",                                                                         # 5 CRLF
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"},
                                     {"role": "assistant", "tool_calls": [call("c", "get_weather", "{oops")]}],
                        "tools": TOOLS}).encode(),                                                  # 6
            b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',                             # 7
            good[2],                                                                                 # 8
            long_line,                                                                               # 9
            good[3],                                                                                 # 10
            b'{"messages": [], "messages": []}',                                                     # 11
            json.dumps({"messages": [{"role": "user", "content": "a"},
                                     {"role": "tool", "tool_call_id": "nope", "content": "r"},
                                     {"role": "assistant", "content": "b"}]}).encode(),             # 12
            json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode(),                    # 13
            good[4],                                                                                 # 14
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
                        "note": 1}).encode(),                                                        # 15
            good[5],                                                                                 # 16 (no final \n)
        ]
        data = b"\n".join(lines)
        expected = [(4, "messages[1].role", "unknown_role"),
                    (6, "messages[3].tool_calls[0].function.arguments", "invalid_tool_arguments"),
                    (7, "", "not_utf8"), (9, "", "line_too_long"), (11, "messages", "duplicate_key"),
                    (12, "messages[1].tool_call_id", "orphan_tool_message"), (13, "", "mixed_formats"),
                    (15, "note", "unknown_field"), (15, "messages[1].content", "empty_content")]
        first = await import_bytes(clients, data)
        assert [(e.line, e.field, e.code) for e in first.errors] == expected
        assert all(e.message for e in first.errors)
        assert (first.lines_read, first.imported, first.duplicates, first.rejected, first.error_count) == (15, 7, 0, 8, 9)
        # other chunk boundaries (lines and the over-long line span many chunks) give the same answer
        second = await import_bytes(clients, data, chunk=4093)
        assert [(e.line, e.field, e.code) for e in second.errors] == expected
        assert (second.lines_read, second.imported, second.duplicates, second.rejected) == (15, 0, 7, 8)
        stored_rows, _ = await list_all(clients)
        assert sorted(r.source_line for r in stored_rows) == [1, 2, 5, 8, 10, 14, 16]
        assert {r.source_name for r in stored_rows} == {"upload.jsonl"}
        # bad import options and an empty stream are refused as a whole
        err = await rpc_error(import_bytes(clients, good[0], topics=["ok", " "]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(err)] == ["options.topics[1]"]
        err = await rpc_error(clients.dataset_builder.ImportExamples(iter(())))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await clients.close()


async def test_thousand_good_fifty_bad(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints, email="one@example.com")
    fresh = await workspace(endpoints, email="two@example.com")
    try:
        rng = random.Random(7)
        bad_lines = sorted(rng.sample(range(1, 1051), 50))
        bad_kinds = [
            (b"{not json", "invalid_json"), (b"[]", "not_object"), (b'{"foo": 1}', "unknown_format"),
            (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(), "no_assistant_turn"),
            (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                                         "weight": 2}]}).encode(), "invalid_weight"),
            (json.dumps({**simple(0), "topics": [1]}).encode(), "invalid_topics"),
            (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
                call("c", "launch_rockets", {})]}], "tools": TOOLS}).encode(), "unknown_tool"),
            (b'{"text": "\xc3\x28"}', "not_utf8"),
            (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}).encode(),
             "content_not_string"),
            (json.dumps({"prompt": "a preference pair", "chosen": "x", "rejected": "y"}).encode(), "mixed_formats"),
        ]
        objs, good_hashes, expected_topics, codes = [], set(), {"alpha": 0, "beta": 0}, []
        g = 0
        for n in range(1, 1051):
            if n in bad_lines:
                raw, code = bad_kinds[len(codes) % len(bad_kinds)]
                codes.append(code)
                objs.append(raw)
            else:
                topics = [["alpha"], ["beta"], ["alpha", "beta"], []][g % 4]
                obj = rich_conversation(g) if g % 5 == 0 else simple(g, topics)
                if g % 5 == 0:
                    obj = {**obj, "topics": topics} if topics else obj
                for t in topics:
                    expected_topics[t] += 1
                objs.append(obj)
                g += 1
        assert g == 1000
        path = write_jsonl(tmp_path / "mixed.jsonl", objs)
        for n, raw in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
            ex, _ = formats.parse_line(raw, n)
            if n not in bad_lines:
                good_hashes.add(ex.content_hash)
        assert len(good_hashes) == 1000

        reply = await sdk.import_file(clients, path)
        assert (reply.lines_read, reply.imported, reply.duplicates, reply.rejected) == (1050, 1000, 0, 50)
        assert sorted({e.line for e in reply.errors}) == bad_lines
        assert [e.code for e in reply.errors] == codes
        topics = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        assert topics.total_examples == 1000
        assert {t.topic: t.example_count for t in topics.topics} == expected_topics
        rows, pages = await list_all(clients, page_size=400)
        assert pages == 3 and len({r.example_id for r in rows}) == 1000
        assert {r.content_hash for r in rows} == good_hashes
        assert {r.source_line for r in rows} == set(range(1, 1051)) - set(bad_lines)
        first = await clients.dataset_builder.ListExamples(dsb.ListExamplesRequest())
        assert len(first.examples) == 100 and first.next_page_token  # default page size
        alpha, _ = await list_all(clients, topic="alpha", page_size=333)
        assert len(alpha) == expected_topics["alpha"] and all("alpha" in r.topics for r in alpha)

        # re-importing the same file stores nothing new, but adds the import's topics
        again = await sdk.import_file(clients, path, topics=["gamma"])
        assert (again.imported, again.duplicates, again.rejected) == (0, 1000, 50)
        topics = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        counts = {t.topic: t.example_count for t in topics.topics}
        assert topics.total_examples == 1000 and counts == {**expected_topics, "gamma": 1000}
        assert dict(next(t for t in topics.topics if t.topic == "gamma").format_counts) == {"conversation": 1000}

        # all or nothing: the same file stores none, and reports the same 50
        strict = await sdk.import_file(fresh, path, all_or_nothing=True)
        assert (strict.imported, strict.rejected, strict.lines_read) == (0, 50, 1050)
        assert sorted({e.line for e in strict.errors}) == bad_lines
        assert (await fresh.dataset_builder.ListTopics(dsb.ListTopicsRequest())).total_examples == 0
        assert not (await fresh.dataset_builder.ListExamples(dsb.ListExamplesRequest())).examples
        clean = write_jsonl(tmp_path / "clean.jsonl", [o for o in objs if isinstance(o, dict)])
        ok = await sdk.import_file(fresh, clean, all_or_nothing=True)
        assert (ok.imported, ok.rejected) == (1000, 0)
    finally:
        await clients.close()
        await fresh.close()


async def test_round_trip_build_download_reimport(services, tmp_path, standin):
    import datasets

    endpoints, settings = services
    shutil.copytree(standin, settings.resolved_model_store() / MODEL)
    source = await workspace(endpoints, email="src@example.com")
    target = await workspace(endpoints, email="dst@example.com")
    try:
        convs = write_jsonl(tmp_path / "convs.jsonl", [rich_conversation(i) for i in range(42)])
        pairs = write_jsonl(tmp_path / "pairs.jsonl",
                            [{"prompt": f"Define term {i}.", "completion": f"Term {i} is defined as {i * 7}."}
                             for i in range(18)])
        assert (await sdk.import_file(source, convs, topics=["support"])).imported == 42
        assert (await sdk.import_file(source, pairs, topics=["faq"])).imported == 18
        originals, _ = await list_all(source)
        assert {r.format for r in originals} == {"conversation", "instruction"}

        built = await build(source, seed=11)
        ds = built.dataset
        assert (ds.train_count, ds.test_count) == (54, 6) and ds.kind == "conversations"
        assert (ds.workspace_example_count, ds.filtered_count, ds.deduplicated_count) == (60, 60, 60)
        assert dict(ds.topic_counts) == {"support": 42, "faq": 18}
        assert ds.artifact_path.endswith(ds.dataset_id) and ds.dataset_id.startswith("ds_")
        files = await download(source, ds.dataset_id, tmp_path / "dl")
        assert sorted(files) == ["manifest.json", "test.jsonl", "train.jsonl"]
        for f in built.files:
            assert (len(files[f.path]), hashlib.sha256(files[f.path]).hexdigest()) == (f.size_bytes, f.sha256)
        got = await source.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=ds.dataset_id))
        assert got.dataset == ds and list(got.files) == list(built.files)

        manifest = json.loads(files["manifest.json"])
        assert manifest["dataset_id"] == ds.dataset_id and manifest["content_hash"] == ds.content_hash
        assert manifest["format_version"] == builder.FORMAT_VERSION == 1
        assert manifest["train_hashes"] == hashes_of(files["train.jsonl"])
        assert manifest["test_hashes"] == hashes_of(files["test.jsonl"])
        assert set(manifest["train_hashes"] + manifest["test_hashes"]) == {r.content_hash for r in originals}
        assert manifest["topics"] == "all" and manifest["topic_counts"] == {"faq": 18, "support": 42}
        assert manifest["split"]["seed"] == 11 and manifest["split"]["test_fraction"] == 0.1
        assert manifest["counts"] == {"workspace": 60, "filtered": 60, "deduplicated": 60, "overlength": 0,
                                      "kept": 60, "train": 54, "test": 6}
        assert manifest["warnings"] == list(ds.warnings)
        assert any(w.startswith("60 examples: fine-tuning with fewer than 100") for w in ds.warnings)
        assert any(w.startswith("60 examples with max_epochs=20") for w in ds.warnings)
        assert manifest["files"] == {"train": "train.jsonl", "test": "test.jsonl"}

        # token statistics: counted with the stand-in's tokenizer and the training chat template
        spec = get_registry().base_model(MODEL)
        counter = TokenCounter.for_model(settings.resolved_model_store(), MODEL, spec.training_chat_template)
        assert MODEL in ds.tokenizer and ds.context_length == spec.context_length
        assert not any("no tokenizer" in w for w in ds.warnings)
        for split, stats in (("train", ds.train_tokens), ("test", ds.test_tokens)):
            ns = counter.count(lines_of(files[f"{split}.jsonl"]))
            assert (stats.count, stats.total, stats.p50, stats.p95, stats.max) == (
                len(ns), sum(ns), nearest_rank(ns, 50), nearest_rank(ns, 95), max(ns))
            assert stats.mean == pytest.approx(sum(ns) / len(ns)) and stats.p50 <= stats.p95 <= stats.max
            assert manifest["tokens"]["splits"][split]["total"] == stats.total
        assert manifest["tokens"]["tokenizer"] == ds.tokenizer and manifest["tokens"]["overlength_hashes"] == []

        # the files load with Hugging Face datasets
        for split, n in (("train", 54), ("test", 6)):
            loaded = datasets.load_dataset("json", data_files=str(tmp_path / "dl" / f"{split}.jsonl"), split="train")
            assert loaded.num_rows == n and "messages" in loaded.column_names

        # re-import the downloaded files into a new workspace: the same examples, hash for hash
        for split, n in (("train", 54), ("test", 6)):
            reply = await sdk.import_file(target, tmp_path / "dl" / f"{split}.jsonl")
            assert (reply.imported, reply.rejected, list(reply.errors)) == (n, 0, [])
        copies, _ = await list_all(target)
        assert {r.content_hash for r in copies} == set(manifest["train_hashes"] + manifest["test_hashes"])
        assert {r.format for r in copies} == {"conversation"}  # instruction pairs came back as conversations

        # another workspace cannot see the snapshot
        for rpc in (target.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=ds.dataset_id)),
                    download(target, ds.dataset_id, tmp_path / "nope")):
            assert (await rpc_error(rpc)).code() == grpc.StatusCode.NOT_FOUND
        assert not (tmp_path / "nope").exists() or not any((tmp_path / "nope").iterdir())
    finally:
        await source.close()
        await target.close()


async def test_split_determinism_and_content_addressing_over_rpc(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, write_jsonl(tmp_path / "a.jsonl", [simple(i) for i in range(120)]))
        one = (await build(clients, seed=1)).dataset
        two = (await build(clients, seed=1)).dataset
        assert one == two  # the same snapshot, found again
        assert (one.train_count, one.test_count) == (108, 12) and one.test_count == split_count(120, 0.1)
        files_one = await download(clients, one.dataset_id, tmp_path / "one")
        files_two = await download(clients, two.dataset_id, tmp_path / "two")
        assert files_one == files_two
        other_seed = (await build(clients, seed=2)).dataset
        assert other_seed.dataset_id != one.dataset_id
        files_other = await download(clients, other_seed.dataset_id, tmp_path / "other")
        assert set(hashes_of(files_other["test.jsonl"])) != set(hashes_of(files_one["test.jsonl"]))
        assert (set(hashes_of(files_other["test.jsonl"] + files_other["train.jsonl"]))
                == set(hashes_of(files_one["test.jsonl"] + files_one["train.jsonl"])))
        wider = (await build(clients, seed=1, test_fraction=0.25)).dataset
        assert wider.test_count == split_count(120, 0.25) == 30 and wider.dataset_id != one.dataset_id
        # the snapshot is immutable: new examples make a new snapshot, the old one is unchanged
        await sdk.import_file(clients, write_jsonl(tmp_path / "b.jsonl", [simple(i) for i in range(120, 130)]))
        grown = (await build(clients, seed=1)).dataset
        assert grown.dataset_id != one.dataset_id and grown.train_count + grown.test_count == 130
        assert await download(clients, one.dataset_id, tmp_path / "again") == files_one
        # request validation
        err = await rpc_error(build(clients, test_fraction=0.6, base_model="gpt-9", train_on_inputs="maybe"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(err)] == ["base_model", "test_fraction", "train_on_inputs"]
        err = await rpc_error(clients.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id="ds_missing")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await clients.close()


async def test_topic_filter_warnings_and_delete_over_rpc(services, tmp_path):
    endpoints, _ = services
    clients = await workspace(endpoints)
    other = await workspace(endpoints, email="other@example.com")
    try:
        groups = [(range(0, 10), ["a"]), (range(10, 25), ["b"]), (range(25, 30), ["a", "b"]), (range(30, 37), ["c"]),
                  (range(37, 40), [])]
        objs = [simple(i, t) for r, t in groups for i in r]
        await sdk.import_file(clients, write_jsonl(tmp_path / "t.jsonl", objs))
        hash_of = {i: formats.content_hash(formats.universal("conversation", simple(i))) for i in range(40)}
        topics = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        assert topics.total_examples == 40
        assert {t.topic: t.example_count for t in topics.topics} == {"a": 15, "b": 20, "c": 7}

        only_a = (await build(clients, topics=["a"], max_epochs=5)).dataset
        assert dict(only_a.topic_counts) == {"a": 15} and only_a.filtered_count == 15
        files = await download(clients, only_a.dataset_id, tmp_path / "a")
        assert set(hashes_of(files["train.jsonl"] + files["test.jsonl"])) == {hash_of[i] for i in [*range(10),
                                                                                                  *range(25, 30)]}
        assert [w.split(":")[0] for w in only_a.warnings if "max_epochs" in w or "fewer than" in w] == ["15 examples"]
        a_and_c = (await build(clients, topics=["c", "a"])).dataset
        assert dict(a_and_c.topic_counts) == {"a": 15, "c": 7} and a_and_c.train_count + a_and_c.test_count == 22
        assert any(w.startswith("22 examples with max_epochs=20: for fewer than 500 examples") for w in a_and_c.warnings)
        everything = (await build(clients)).dataset
        assert dict(everything.topic_counts) == {"a": 15, "b": 20, "c": 7}
        assert everything.train_count + everything.test_count == 40
        err = await rpc_error(build(clients, topics=["nope"]))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "40 examples in the workspace -> 0 conversations examples in nope" in err.details()

        # pagination is stable and complete
        pages = [await clients.dataset_builder.ListExamples(dsb.ListExamplesRequest(page_size=15))]
        while pages[-1].next_page_token:
            pages.append(await clients.dataset_builder.ListExamples(
                dsb.ListExamplesRequest(page_size=15, page_token=pages[-1].next_page_token)))
        assert [len(p.examples) for p in pages] == [15, 15, 10]
        by_hash = {e.content_hash: e for p in pages for e in p.examples}
        assert set(by_hash) == set(hash_of.values())

        # delete by topic (an example with a and b goes with b), by id; other workspaces are untouched
        assert (await clients.dataset_builder.DeleteExamples(dsb.DeleteExamplesRequest(topics=["b"]))).deleted == 20
        victims = [by_hash[hash_of[0]].example_id, by_hash[hash_of[38]].example_id]
        assert (await other.dataset_builder.DeleteExamples(dsb.DeleteExamplesRequest(example_ids=victims))).deleted == 0
        assert (await clients.dataset_builder.DeleteExamples(
            dsb.DeleteExamplesRequest(example_ids=victims + ["ex_unknown"]))).deleted == 2
        left, _ = await list_all(clients)
        assert {r.content_hash for r in left} == {hash_of[i] for i in [*range(1, 10), *range(30, 37), 37, 39]}
        topics = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        assert topics.total_examples == 18 and {t.topic: t.example_count for t in topics.topics} == {"a": 9, "c": 7}
        err = await rpc_error(clients.dataset_builder.DeleteExamples(dsb.DeleteExamplesRequest()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a snapshot built before the deletion is immutable
        assert set(hashes_of((await download(clients, only_a.dataset_id, tmp_path / "a2"))["train.jsonl"])) == \
            set(hashes_of(files["train.jsonl"]))
    finally:
        await clients.close()
        await other.close()


# --- regressions: bugs found by these tests and fixed ----------------------------------------------

async def test_two_workspaces_can_build_the_same_data(services, tmp_path):
    endpoints, _ = services
    first = await workspace(endpoints, email="first@example.com")
    second = await workspace(endpoints, email="second@example.com")
    try:
        path = write_jsonl(tmp_path / "same.jsonl", [simple(i) for i in range(20)])
        for clients in (first, second):
            assert (await sdk.import_file(clients, path)).imported == 20
        a = (await build(first, seed=3)).dataset
        b = (await build(second, seed=3)).dataset
        assert b.train_count == a.train_count
        assert (await download(second, b.dataset_id, tmp_path / "b"))["train.jsonl"] == \
            (await download(first, a.dataset_id, tmp_path / "a"))["train.jsonl"]
    finally:
        await first.close()
        await second.close()


async def test_downloaded_snapshot_with_text_and_conversations_reimports(services, tmp_path):
    endpoints, _ = services
    source = await workspace(endpoints, email="src@example.com")
    target = await workspace(endpoints, email="dst@example.com")
    try:
        await sdk.import_file(source, write_jsonl(tmp_path / "c.jsonl", [simple(i) for i in range(20)]))
        await sdk.import_file(source, write_jsonl(tmp_path / "t.jsonl", [{"text": f"plain {i}"} for i in range(20)]))
        ds = (await build(source, seed=1)).dataset
        assert ds.train_count + ds.test_count == 40
        await download(source, ds.dataset_id, tmp_path / "dl")
        reply = await sdk.import_file(target, tmp_path / "dl" / "train.jsonl")
        assert (reply.imported, reply.rejected) == (ds.train_count, 0)
    finally:
        await source.close()
        await target.close()


async def test_tokenizer_added_to_the_model_store_later_is_used(services, tmp_path, standin):
    endpoints, settings = services
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, write_jsonl(tmp_path / "a.jsonl", [simple(i) for i in range(20)]))
        before = (await build(clients, seed=1)).dataset
        assert not before.tokenizer and any("no tokenizer" in w for w in before.warnings)
        shutil.copytree(standin, settings.resolved_model_store() / MODEL)
        after = (await build(clients, seed=2)).dataset  # a new snapshot (other seed)
        assert MODEL in after.tokenizer and after.train_tokens.count == after.train_count
    finally:
        await clients.close()


async def test_rebuilds_reuse_stored_token_counts_until_the_tokenizer_changes(services, tmp_path, standin):
    endpoints, settings = services
    shutil.copytree(standin, settings.resolved_model_store() / MODEL)
    app = services.apps["dataset-builder"]
    clients = await workspace(endpoints)
    try:
        await sdk.import_file(clients, write_jsonl(tmp_path / "a.jsonl", [simple(i) for i in range(40)]))
        first = (await build(clients, seed=1)).dataset
        counter = app.token_counter(MODEL)
        ws = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace
        assert len(await app._stored_counts(ws.id, counter.key)) == 40

        def no_counting(bodies):
            raise AssertionError(f"counted {len(bodies)} examples again")

        counter.count = no_counting  # a rebuild with another seed must not count again
        second = (await build(clients, seed=2)).dataset
        assert second.dataset_id != first.dataset_id
        assert (second.train_tokens.total + second.test_tokens.total
                == first.train_tokens.total + first.test_tokens.total)
        assert (max(second.train_tokens.max, second.test_tokens.max)
                == max(first.train_tokens.max, first.test_tokens.max))

        # A different tokenizer (new tokenizer.json) is a different key: counted afresh.
        tokenizer_file = settings.resolved_model_store() / MODEL / "tokenizer.json"
        data = json.loads(tokenizer_file.read_text())
        data["added_tokens"].append({**data["added_tokens"][-1], "id": data["added_tokens"][-1]["id"] + 1,
                                     "content": "<|tuneforge_test_token|>"})
        tokenizer_file.write_text(json.dumps(data))
        third = (await build(clients, seed=3)).dataset
        assert third.tokenizer and app.token_counter(MODEL).key != counter.key
        assert third.train_tokens.count + third.test_tokens.count == 40
    finally:
        await clients.close()


async def test_openai_text_content_parts_are_imported_as_joined_strings(services, tmp_path):
    """OpenAI lines whose contents are lists of text parts: every line is stored, in the universal
    form with each content joined (in order, no separator), so the same lines written with plain
    strings are duplicates of them. Conversations and preference pairs in both spellings."""
    endpoints, _ = services
    clients = await workspace(endpoints)

    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    def pair(with_parts: bool, i: int):
        c = parts if with_parts else (lambda *t: "".join(t))
        return [
            {"messages": [{"role": "system", "content": c("You are ", "brief.")},
                          {"role": "user", "content": c(f"Question {i}, ", "part two.")},
                          {"role": "assistant", "content": c("Answer", f" {i}", ".")}]},
            {"messages": [{"role": "user", "content": c(f"Weather in C{i}?", "")},
                          {"role": "assistant", "content": c("Let me ", "check."),
                           "tool_calls": [call("c1", "get_weather", {"city": f"C{i}"})]},
                          {"role": "tool", "tool_call_id": "c1", "content": c('{"temp":', f" {i}}}")},
                          {"role": "assistant", "content": c(f"{i} degrees."), "weight": 1}],
             "tools": TOOLS},
        ], [
            {"input": {"messages": [{"role": "user", "content": c("Pick ", f"{i}")}]},
             "preferred_output": [{"role": "assistant", "content": c("Good ", f"{i}")}],
             "non_preferred_output": [{"role": "assistant", "content": c("Bad ", f"{i}")}]},
            {"prompt": [{"role": "user", "content": c("Say ", f"{i + 100}")}],
             "chosen": [{"role": "assistant", "content": c(f"{i + 100}", "!")}],
             "rejected": [{"role": "assistant", "content": c("no")}]},
        ]

    def contents(body):
        lists = [body.get("messages"), body.get("input", {}).get("messages"), body.get("preferred_output"),
                 body.get("non_preferred_output")]
        return [m.get("content") for msgs in lists if msgs for m in msgs]

    try:
        sft = [o for i in range(10) for o in pair(True, i)[0]]
        prefs = [o for i in range(10) for o in pair(True, i)[1]]
        for objs, name in ((sft, "sft.jsonl"), (prefs, "prefs.jsonl")):
            reply = await import_bytes(clients, write_jsonl(tmp_path / name, objs).read_bytes(), source=name)
            assert (reply.imported, reply.rejected, reply.lines_read, list(reply.errors)) == (20, 0, 20, [])
        stored_rows, _ = await list_all(clients)
        assert len(stored_rows) == 40
        bodies = {r.content_hash: json.loads(r.json) for r in stored_rows}
        assert all(isinstance(c, str) for b in bodies.values() for c in contents(b) if c is not None)
        assert all('"type": "text"' not in r.json and '"type":"text"' not in r.json for r in stored_rows)
        by_source = {(r.source_name, r.source_line): json.loads(r.json) for r in stored_rows}
        first = by_source[("sft.jsonl", 1)]
        assert [m["content"] for m in first["messages"]] == ["You are brief.", "Question 0, part two.", "Answer 0."]
        tool = by_source[("sft.jsonl", 4)]
        assert [m.get("content") for m in tool["messages"]] == ["Weather in C1?", "Let me check.", '{"temp": 1}',
                                                                "1 degrees."]
        chosen_rejected = by_source[("prefs.jsonl", 2)]
        assert chosen_rejected == {"input": {"messages": [{"role": "user", "content": "Say 100"}]},
                                   "preferred_output": [{"role": "assistant", "content": "100!"}],
                                   "non_preferred_output": [{"role": "assistant", "content": "no"}]}
        # the same lines with plain strings are the same examples (same hash): all duplicates
        for objs, name in (([o for i in range(10) for o in pair(False, i)[0]], "sft-strings.jsonl"),
                           ([o for i in range(10) for o in pair(False, i)[1]], "prefs-strings.jsonl")):
            reply = await import_bytes(clients, write_jsonl(tmp_path / name, objs).read_bytes(), source=name)
            assert (reply.imported, reply.duplicates, reply.rejected) == (0, 20, 0)
        # a non-text part is refused with its own code, and takes no good line with it
        image = {"messages": [{"role": "user", "content": parts("What is this?") + [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
            {"role": "assistant", "content": "A cat."}]}
        reply = await import_bytes(clients, write_jsonl(tmp_path / "img.jsonl", [simple(1000), image]).read_bytes())
        assert (reply.imported, reply.rejected) == (1, 1)
        assert [(e.line, e.field, e.code) for e in reply.errors] == [
            (2, "messages[0].content[1].type", "unsupported_content_part")]
    finally:
        await clients.close()


async def test_dry_run_builds_the_same_summary_and_stores_nothing(services, tmp_path):
    """BuildDataset(dry_run): the summary of the real build (counts, topic step, split, warnings)
    without dataset_id, artifact path or files; no snapshot listed, nothing in the artifact store.
    ListDatasets: newest first, pages, this workspace only."""
    from tuneforge.core.storage import ArtifactStore

    endpoints, settings = services
    clients = await workspace(endpoints)
    other = await workspace(endpoints, email="other@example.com")
    store = ArtifactStore(settings.resolved_artifact_url())
    try:
        await sdk.import_file(clients, write_jsonl(tmp_path / "a.jsonl", [simple(i) for i in range(30)]), topics=["a"])
        await sdk.import_file(clients, write_jsonl(tmp_path / "c.jsonl", [simple(i) for i in range(30, 40)]),
                              topics=["c"])
        pairs = [{"prompt": f"q{i}", "chosen": "x", "rejected": "y"} for i in range(4)]
        await sdk.import_file(clients, write_jsonl(tmp_path / "p.jsonl", pairs), topics=["a"])

        dry = await build(clients, topics=["a"], seed=3, dry_run=True)
        assert not dry.dataset.dataset_id and not dry.dataset.artifact_path and not dry.files
        assert (dry.dataset.workspace_example_count, dry.dataset.topic_matched_count, dry.dataset.filtered_count,
                dry.dataset.train_count, dry.dataset.test_count) == (44, 34, 30, 27, 3)
        assert not (await clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest())).datasets
        assert store.list("datasets") == []

        real = await build(clients, topics=["a"], seed=3)
        expected = dsb.BuildDatasetResponse()
        expected.dataset.CopyFrom(real.dataset)
        expected.dataset.ClearField("dataset_id")
        expected.dataset.ClearField("artifact_path")
        assert dry.dataset == expected.dataset and real.dataset.topic_matched_count == 34 and real.files

        # a dry run that a build would refuse: its counts, and the refusal as a warning
        nothing = await build(clients, topics=["missing"], dry_run=True)
        assert (nothing.dataset.workspace_example_count, nothing.dataset.topic_matched_count,
                nothing.dataset.train_count) == (44, 0, 0)
        assert any(w.startswith("a build would be refused: no examples to train on: 44 examples in the workspace")
                   for w in nothing.dataset.warnings)
        err = await rpc_error(build(clients, topics=["missing"]))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no examples to train on" in err.details()

        # ListDatasets: newest first, in pages; another workspace sees none of them
        ids = [real.dataset.dataset_id]
        for seed in (4, 5):
            ids.append((await build(clients, topics=["a"], seed=seed)).dataset.dataset_id)
        first = await clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest(page_size=2))
        second = await clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest(
            page_size=2, page_token=first.next_page_token))
        assert [e.dataset.dataset_id for e in [*first.datasets, *second.datasets]] == ids[::-1]
        assert first.next_page_token and not second.next_page_token
        assert first.datasets[0].create_time.ToDatetime() >= first.datasets[1].create_time.ToDatetime()
        assert first.datasets[1].dataset.train_count == 27
        assert not (await other.dataset_builder.ListDatasets(dsb.ListDatasetsRequest())).datasets
        err = await rpc_error(clients.dataset_builder.ListDatasets(dsb.ListDatasetsRequest(page_token="x")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await clients.close()
        await other.close()
