"""The dataset builder's fast paths give exactly what the plain paths give.

- Hand-written renderers (``dataset_builder.renderers``) write the same text as the families'
  jinja2 training templates, on every case of ``tests/test_chat_templates.py`` and on generated
  conversations (tools, several tool calls, consecutive tool results, reasoning, weights, system
  or none, content parts, odd whitespace, special-token look-alikes); they are chosen only for
  the exact template text they were written for.
- Token counts with the fast renderer, by distinct pieces and in worker processes equal the
  jinja2 + whole-text counts.
- Validation with orjson (canonical texts of float-free lines) accepts and refuses exactly the
  lines it does without orjson, with the same error codes, fields, messages, hashes and texts;
  loading stored texts with orjson gives json.loads' values; train.jsonl lines are the texts.
- Validation in worker processes gives the in-process verdicts, also when the pool fails.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest

from tuneforge.dataset_builder import renderers
from tuneforge.dataset_builder.tokens import compile_template
from tuneforge.plugins import get_registry
from tuneforge.training import template_messages

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import test_chat_templates as tct  # noqa: E402

FAMILY_MODELS = {  # renderer -> a catalog model whose training template it was written for
    "llama3_training.jinja": "llama-3.2-1b",
    "qwen2_5_training.jinja": "qwen-2.5-14b",
    "deepseek_r1_training.jinja": "deepseek-r1-distill-qwen-1.5b",
    "smollm2_training.jinja": "smollm2-135m",
}
SPECIALS = {  # bos, eos as the families' tokenizer_config.json give them
    "llama3_training.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5_training.jinja": ("", "<|im_end|>"),
    "deepseek_r1_training.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "smollm2_training.jinja": ("", "<|im_end|>"),
}


def jinja_render(template, messages, tools, bos, eos) -> str:
    """What ``TokenCounter`` renders with jinja2."""
    return template.render(messages=template_messages(messages), tools=tools or None, bos_token=bos,
                           eos_token=eos, add_generation_prompt=False)


# -- generated conversations -------------------------------------------------------------------------

WORDS = ["Hello", "world", "  padded  ", "\n\nnew lines\n", "tabs\tand\r\n", "café", "東京", "🙂", "<|eot_id|>",
         "<|im_end|>", "<think>", "</think>", "<｜User｜>", "{\"json\": [1, 2]}", "", " ", "naïve", "x" * 40,
         "<tool_call>", "ipython", "'quotes' \"double\"", "\\backslash", "None", "null"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "lookup_order", "description": "Find an order — by id.",
                                      "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}},
]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))


def _content(rng: random.Random):
    roll = rng.random()
    if roll < 0.05:
        return [{"type": "text", "text": _text(rng)}, {"type": "text", "text": _text(rng)}]
    return _text(rng) or "ok"


def _arguments(rng: random.Random):
    args = rng.choice([{"city": "Paris"}, {"id": 12, "flag": True, "nested": {"a": [1, 2.5, None]}},
                       {"q": "naïve 東京 \"quoted\""}, {}])
    roll = rng.random()
    if roll < 0.5:
        return json.dumps(args, ensure_ascii=False, separators=(",", ":"))  # the universal (stored) form
    if roll < 0.8:
        return args
    return rng.choice(["not json", "[1, 2]", '"a string"'])  # rendered as is


def generated_conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": _content(rng)})
    tools = rng.sample(TOOLS, k=rng.randint(1, 2)) if rng.random() < 0.4 else None
    for _ in range(rng.randint(1, 5)):
        messages.append({"role": "user", "content": _content(rng)})
        if tools and rng.random() < 0.6:
            calls = [{"id": f"call_{i}", "type": "function",
                      "function": {"name": rng.choice(tools)["function"]["name"], "arguments": _arguments(rng)}}
                     for i in range(rng.randint(1, 3))]
            content = rng.choice([None, "", "Let me check.", "  spaced  "])
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": _text(rng) or "{}"})
        message = {"role": "assistant", "content": _content(rng)}
        if rng.random() < 0.2:
            message["reasoning"] = _text(rng) or " think "
        if rng.random() < 0.2:
            message["weight"] = rng.choice([0, 1])
        messages.append(message)
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": _content(rng)})
    return {"messages": messages, **({"tools": tools} if tools else {})}


def all_cases(n_generated: int = 400) -> list[dict]:
    import make_conversations

    rng = random.Random(9)
    cases = [copy.deepcopy(c) for c in tct.CONVERSATIONS.values()]
    cases += [generated_conversation(rng) for _ in range(n_generated)]
    cases += [{k: v for k, v in e.items() if k != "topics"} for e in make_conversations.generate(15, 3)]
    return cases


@pytest.fixture(scope="module")
def templates():
    registry = get_registry()
    return {name: registry.base_model(model).training_chat_template for name, model in FAMILY_MODELS.items()}


def test_each_shipped_template_has_its_renderer(templates):
    """A changed template loses its hand-written renderer (jinja2 renders it) until the renderer
    is checked against it again and its hash updated here and in ``renderers.RENDERERS``."""
    for name, source in templates.items():
        found = renderers.RENDERERS.get(renderers.template_hash(source))
        assert found is not None, f"{name} changed: check its renderer and update the hash"
        assert found[0] == name
        assert renderers.for_template(source) is found[1]
    assert renderers.for_template(templates["llama3_training.jinja"] + " ") is None
    mistral = get_registry().base_models.get("mistral-7b-instruct")
    if mistral is not None:
        assert renderers.for_template(mistral.training_chat_template) is None


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_renderer_equals_jinja_template(templates, name):
    template = compile_template(templates[name])
    render = renderers.for_template(templates[name])
    bos, eos = SPECIALS[name]
    checked = 0
    for case in all_cases():
        messages, tools = template_messages(case["messages"]), case.get("tools")
        try:
            expected = jinja_render(template, case["messages"], tools, bos, eos)
        except Exception:  # the template itself refuses it: the renderer must not invent a text
            with pytest.raises(Exception):
                render(messages, tools, bos, eos)
            continue
        try:
            got = render(messages, tools, bos, eos)
        except renderers.Unsupported:
            continue  # rendered with jinja2 by the counter
        assert got == expected, (name, case)
        checked += 1
    assert checked >= 400


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_renderer_equals_the_published_segments(templates, name):
    """The hand-written text of tests/test_chat_templates.py, case by case."""
    family = {"llama3_training.jinja": "llama3", "qwen2_5_training.jinja": "qwen2.5",
              "deepseek_r1_training.jinja": "r1-qwen", "smollm2_training.jinja": "smollm2"}[name]
    render = renderers.for_template(templates[name])
    bos, eos = SPECIALS[name]
    for case, segments in tct.FAMILIES[family][1].items():
        conversation = tct.CONVERSATIONS[case]
        text = render(template_messages(conversation["messages"]), conversation.get("tools"), bos, eos)
        assert text == "".join(t for t, _ in segments), case


def test_unsupported_shapes_fall_back(templates):
    render = renderers.for_template(templates["llama3_training.jinja"])
    for messages in ([{"role": "user", "content": {"a": 1}}],
                     [{"role": 3, "content": "x"}],
                     [{"role": "assistant", "tool_calls": [{"function": {"name": 5, "arguments": {}}}]}],
                     ["not a message"]):
        with pytest.raises(renderers.Unsupported):
            render(messages, None, "", "")


# -- validation: with orjson, exactly the verdicts and texts of the plain path ----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tuneforge.dataset_builder import formats  # noqa: E402


def strict_parse(raw: bytes, line: int = 1):
    """``parse_line`` with orjson switched off (the plain path: json.dumps for every canonical text)."""
    saved, formats.orjson = formats.orjson, None
    try:
        return formats.parse_line(raw, line)
    finally:
        formats.orjson = saved


def assert_same_verdict(raw: bytes) -> None:
    fast, slow = formats.parse_line(raw, 7), strict_parse(raw, 7)
    assert fast == slow, raw
    assert not any(e.code == "unreadable_line" for e in fast[1]), (raw, fast[1])  # a bug, not a verdict
    if fast[0] is not None:  # dataclass equality takes 1 == 1.0 == True; the stored text does not
        assert repr(fast[0].body) == repr(slow[0].body), raw
        assert fast[0].canonical_json == slow[0].canonical_json


def corpus_lines() -> list[bytes]:
    """Good and bad lines: the example file, the benchmark's generator, and the hostile-input and
    format tests' lines that the fast path must leave to the strict parser or read identically."""
    import make_conversations

    lines = (Path(__file__).resolve().parent.parent / "examples" / "conversations.jsonl").read_bytes().splitlines()
    lines += [make_conversations.to_line(e).encode() for e in make_conversations.generate(50, 11)]
    good = lines[0].decode()
    lines += [
        b'{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}',
        b'{"text": "x", "text": "y"}',
        b'{"text": "a:b", "meta": {"k": 1, "k": 2}}',
        b'{"text": "dup nested", "topics": ["t"], "x": [{"a": 1}, {"b": 2, "b": 3}]}',
        b'{"text": "\\u003a hides a colon", "x": {"a": 1, "a": 2}}',
        b'{"text": "\\u003A", "k\\u003a": 1}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "pair \\ud83d\\ude00 ok"}',
        b'{"text": "nul \\u0000 char"}',
        b'{"text": "big", "n": 123456789012345678901234567890}',
        b'{"text": "huge", "n": ' + b"9" * 120 + b"}",
        b'{"text": "float", "n": 1.5e300}',
        b'{"text": "inf", "n": 1e999}',
        b'{"text": "nan", "n": NaN}',
        b'{"text": "neg zero", "n": -0, "m": -0.0}',
        b'{"text": "u64", "n": 18446744073709551615, "m": -9223372036854775808}',
        b'{"text": "deep", "x": ' + b"[" * 70 + b"]" * 70 + b"}",
        b'{"text": "many brackets in a string [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',
        b'{"text": "ctrl \x01 raw"}',
        b'{"text": "tab\tinside"}',
        b'\xef\xbb\xbf{"text": "bom"}',
        b'{"text": "bad utf8 \xc0\xaf"}',
        b'{"text": "surrogate bytes \xed\xa0\x80"}',
        b'{"text": "trailing"} x',
        b' {"text": "spaces"}\t',
        b"[1, 2]",
        b"1.5",
        b"1" + b"0" * 120,
        b'{"text": "looks like a float member", "x": "a:1.5,b"}',
        b'"just a string"',
        b"{}",
        b'{"prompt": "p", "completion": "c", "topics": ["a:b", " spaced "]}',
        b'{"chosen": "a", "rejected": "b", "prompt": "p"}',
        b'{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", '
        b'"content": "x"}], "non_preferred_output": [{"role": "assistant", "content": "y"}]}',
        good.replace('"messages"', '"messages": [], "messages"').encode(),
        good.replace("{", '{"topics": ["x"], ', 1).encode(),
    ]
    for line in list(lines[:40]):  # mutations of good lines: every colon, quote and bracket moved
        for at in range(0, len(line), 37):
            lines.append(line[:at] + line[at + 1:])
            lines.append(line[:at] + b":" + line[at:])
    return lines


def test_fast_validation_equals_strict_on_the_corpus():
    lines = corpus_lines()
    for raw in lines:
        assert_same_verdict(raw)
    good = (Path(__file__).resolve().parent.parent / "examples" / "conversations.jsonl").read_bytes().splitlines()
    assert all(formats.parse_line(raw, 1)[0] is not None for raw in good)


def test_canonical_fast_path_is_taken_only_without_floats():
    _, has_duplicate, has_float = formats.loads_marked('{"a": 1, "b": [true, null, "x:1.5"]}')
    assert (has_duplicate, has_float) == (False, False)
    assert formats.loads_marked('{"a": 1.0}')[2] and formats.loads_marked('{"a": [1e5]}')[2]
    big = {"n": 10**30, "s": "\x00\x1f\u2028\"\\/ é 😀", "k": {"é": 1, "e": 2, "😀": 3, "\uffff": 4}}
    assert formats._canonical_fast(big) == formats.canonical(big)  # beyond 64 bits: json.dumps


_char = st.characters(exclude_categories=())  # every code point, lone surrogates included
_key = st.sampled_from(["role", "content", "a", "a:", ":", "text", "é", "messages"]) | st.text(_char, max_size=4)
_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**40)
         | st.floats(allow_nan=True, allow_infinity=True) | st.text(_char, max_size=8)
         | st.sampled_from(["a:b", "::", "\x00", "\u2028", "\\u003a", "😀"]))


def _pairs(inner):
    """Objects as key/value pairs, so that a key may repeat."""
    return st.lists(st.tuples(_key, inner), max_size=4).map(lambda pairs: ("obj", pairs))


_tree = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | _pairs(inner), max_leaves=20)


def _dump(value, ensure_ascii: bool) -> str:
    if isinstance(value, tuple):
        return "{" + ", ".join(json.dumps(k, ensure_ascii=ensure_ascii) + ": " + _dump(v, ensure_ascii)
                               for k, v in value[1]) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)


@st.composite
def example_like_lines(draw) -> bytes:
    value = draw(_tree)
    key = draw(st.sampled_from(["messages", "text", "prompt", "chosen", "input", "tools"]))
    wrapped = ("obj", [(key, value)] + ([("completion", value)] if key == "prompt" else [])
               + draw(st.lists(st.tuples(_key, _leaf), max_size=2)))
    if draw(st.booleans()):
        text = draw(st.text(_char, max_size=20))
        wrapped = ("obj", [("messages", [("obj", [("role", "user"), ("content", text)]),
                                         ("obj", [("role", "assistant"), ("content", value)])])])
    return _dump(wrapped, draw(st.booleans())).encode("utf-8", "surrogatepass")


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example_like_lines())
def test_fast_validation_equals_strict_on_generated_lines(raw):
    assert_same_verdict(raw)


_float_free = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 5, max_value=2**64 + 5)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=4), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=4), _float_free, max_size=4))
def test_canonical_fast_equals_json_dumps_without_floats(body):
    assert formats._canonical_fast(body) == formats.canonical(body)


_stored_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-10**40, max_value=10**40)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
                | st.sampled_from(["a:1.5,b", "[1e5]", ":12345678901234567890,"]))
_stored_tree = st.recursive(_stored_leaf, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


@settings(max_examples=400, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=4), _stored_tree, max_size=4))
def test_loading_stored_bodies_equals_json_loads(body):
    """``load_examples`` reads stored canonical texts with orjson only where json.loads reads
    the same value (floats and integers beyond 64 bits go through json.loads)."""
    text = formats.canonical(body)
    assert repr(formats.loads_stored(text)) == repr(json.loads(text))


def test_jsonl_lines_are_the_canonical_texts():
    import hashlib

    from tuneforge.dataset_builder import builder

    lines = corpus_lines()[:60]
    parsed = [p for p, _ in (formats.parse_line(raw, i) for i, raw in enumerate(lines, 1)) if p is not None]
    loaded = [builder.StoredExample(p.content_hash, p.format, formats.loads_stored(p.canonical_json), p.topics,
                                    p.canonical_json) for p in parsed]
    plain = [builder.StoredExample(p.content_hash, p.format, json.loads(p.canonical_json), p.topics) for p in parsed]
    assert len(parsed) > 40
    assert builder.jsonl(loaded) == builder.jsonl(plain)
    for line, p in zip(builder.jsonl(loaded).splitlines(), parsed):
        assert hashlib.sha256(line).hexdigest() == p.content_hash
        assert json.loads(line) == p.body


# -- worker processes: the same verdicts and counts as in process -----------------------------------

from tuneforge.dataset_builder import builder, workers  # noqa: E402
from tuneforge.dataset_builder.tokens import TokenCounter  # noqa: E402


@pytest.fixture
def two_workers(monkeypatch):
    monkeypatch.setenv(workers.ENV_WORKERS, "2")
    monkeypatch.setenv(workers.ENV_COUNT, "1")
    monkeypatch.setattr(workers, "MIN_PARALLEL", 10)
    monkeypatch.setattr(workers, "VALIDATE_BATCH", 7)
    assert workers.pool() is not None
    return workers


def test_import_parser_in_workers_gives_the_in_process_verdicts(two_workers, monkeypatch):
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
    from tuneforge.dataset_builder.service import _ImportParser

    lines = corpus_lines()[:400]
    lines.insert(200, b'{"chosen": "a", "rejected": "b", "prompt": "p"}')  # mixed_formats after the switch
    data = b"\n".join(lines) + b"\n"

    def run(chunk: int):
        parser = _ImportParser(dsb.ImportOptions(source_name="x.jsonl", topics=["extra"]))
        for at in range(0, len(data), chunk):
            parser.feed(data[at:at + chunk])
        parser.finish()
        return ([(e.line, e.format, e.topics, e.content_hash, e.canonical_json) for e in parser.examples],
                parser.errors, parser.lines_read)

    in_workers = run(4096)
    monkeypatch.setenv(workers.ENV_WORKERS, "1")
    in_process = run(1000)
    assert in_workers == in_process
    assert len(in_workers[0]) > 150 and any(e.code == "mixed_formats" for e in in_workers[1])


def _tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with the Llama 3 special tokens (no transformers needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [json.dumps(c, ensure_ascii=False) for c in all_cases(100)]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_token_counts_fast_paths_equal_the_plain_path(two_workers, tmp_path, templates):
    path = _tiny_tokenizer(tmp_path)
    counter = TokenCounter(path, templates["llama3_training.jinja"],
                           {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "tiny")
    assert counter.renderer is renderers.render_llama3
    cases = all_cases(300)
    parsed = [formats.parse_line(json.dumps(c).encode(), i)[0] for i, c in enumerate(cases, 1)]
    stored = [builder.StoredExample(p.content_hash, p.format, formats.loads_stored(p.canonical_json), p.topics,
                                    p.canonical_json) for p in parsed if p is not None]
    assert len(stored) > 150
    bodies = [e.body for e in stored]
    fast = counter.count(bodies)
    in_workers = counter.count_stored(stored)
    counter.renderer = None  # jinja2, and every text encoded whole
    plain = [len(counter.tokenizer.encode(text, add_special_tokens=False).ids)
             for body in bodies for text in counter.texts(body)]
    assert fast == plain
    assert in_workers == plain


def test_a_failed_pool_falls_back_to_in_process(two_workers, tmp_path, templates):
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
    from tuneforge.dataset_builder.service import _ImportParser

    lines = corpus_lines()[:60]
    data = b"\n".join(lines) + b"\n"

    def parse():
        parser = _ImportParser(dsb.ImportOptions(source_name="x.jsonl"))
        parser.feed(data)
        parser.finish()
        return [(e.line, e.content_hash) for e in parser.examples], parser.errors

    expected = parse()
    workers.pool().shutdown(wait=True)  # every submit now fails
    assert parse() == expected
    workers.discard()
    path = _tiny_tokenizer(tmp_path)
    counter = TokenCounter(path, templates["llama3_training.jinja"], {}, "tiny")
    parsed = [formats.parse_line(json.dumps(c).encode(), i)[0] for i, c in enumerate(all_cases(30), 1)]
    stored = [builder.StoredExample(p.content_hash, p.format, p.body, p.topics, p.canonical_json)
              for p in parsed if p is not None]
    workers.pool().shutdown(wait=True)
    assert counter.count_stored(stored) == counter.count([e.body for e in stored])
    assert workers._pool is None  # discarded: the next use starts a new pool
