"""Parse-level validation (tuneforge.dataset_builder.formats): one test per error code, each with a
real bad line placed inside a small file of good lines, asserting the 1-based line number, the
field path and the code. Also canonical form and hashing. Pure and fast: no services."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tuneforge.dataset_builder import formats
from tuneforge.dataset_builder.formats import FileValidator, parse_line

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def conv(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def tool_conv(*, args=None, call_name="get_weather", tool_call_id="call_1", tools=TOOLS, extra=None) -> dict:
    """user -> assistant tool call -> tool result -> assistant answer (indexes 0..3)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": call_name, "arguments": {"city": "Paris"} if args is None else args}}
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": tool_call_id, "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."}]
    obj = {"messages": msgs}
    if tools is not None:
        obj["tools"] = tools
    obj.update(extra or {})
    return obj


def call_weather(cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def pref(i: int) -> dict:
    return {"input": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"good {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"bad {i}"}]}


def enc(obj) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


GOOD = {
    "conversation": [enc(conv(i)) for i in range(6)],
    "preference": [enc(pref(i)) for i in range(6)],
    "text": [enc({"text": f"plain text number {i}"}) for i in range(6)],
}


def validate(lines: list[bytes], extra_topics=()):
    validator = FileValidator(tuple(extra_topics))
    examples, errors = [], []
    for n, raw in enumerate(lines, start=1):
        example, errs = validator.line(raw, n)
        assert (example is None) == bool(errs), "an example or errors, never both"
        if example is not None:
            examples.append(example)
        errors.extend(errs)
    return examples, errors


def msgs(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

# (id, bad line, expected errors on that line as (field, code) list, good-line kind, 1-based position)
CASES = [
    ("not_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', [("", "not_utf8")], "conversation", 3),
    ("invalid_json", b'{"messages": [{"role": "user", "content": "hi"}', [("", "invalid_json")], "conversation", 4),
    ("invalid_json-trailing-comma", b'{"text": "a",}', [("", "invalid_json")], "text", 2),
    ("not_object", b'[{"role": "user", "content": "hi"}]', [("", "not_object")], "conversation", 5),
    ("not_object-string", b'"just a string"', [("", "not_object")], "text", 6),
    ("duplicate_key", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                      b'"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}',
     [("messages", "duplicate_key")], "conversation", 3),
    ("unknown_format", enc({"question": "hi", "answer": "hello"}), [("", "unknown_format")], "conversation", 2),
    ("unknown_field", enc({**conv(9), "metadata": {"source": "x"}}), [("metadata", "unknown_field")],
     "conversation", 4),
    ("unknown_field-preference", enc({**pref(9), "score": 3}), [("score", "unknown_field")], "preference", 3),
    ("invalid_topics-not-list", enc({**conv(9), "topics": "billing"}), [("topics", "invalid_topics")],
     "conversation", 3),
    ("invalid_topics-empty-string", enc({**conv(9), "topics": ["billing", "  "]}), [("topics", "invalid_topics")],
     "conversation", 5),
    ("messages_not_list", enc({"messages": {"role": "user", "content": "hi"}}), [("messages", "messages_not_list")],
     "conversation", 2),
    ("messages_not_list-empty", enc({"messages": []}), [("messages", "messages_not_list")], "conversation", 6),
    ("message_not_object", enc(msgs(U, "hello", A)), [("messages[1]", "message_not_object")], "conversation", 3),
    ("unknown_role", enc(msgs(U, {"role": "bot", "content": "hello"}, U, A)),
     [("messages[1].role", "unknown_role")], "conversation", 4),
    ("unknown_role-missing", enc(msgs(U, A, {"content": "no role"}, A)), [("messages[2].role", "unknown_role")],
     "conversation", 2),
    ("content_not_string", enc(msgs(U, {"role": "assistant", "content": 42})),
     [("messages[1].content", "content_not_string")], "conversation", 3),
    ("content_not_string-instruction", enc({"prompt": "q", "completion": ["a"]}),
     [("completion", "content_not_string")], "conversation", 2),
    ("content_not_string-reasoning", enc(msgs(U, {"role": "assistant", "content": "x", "reasoning": 1})),
     [("messages[1].reasoning", "content_not_string")], "conversation", 4),
    ("empty_content", enc(msgs({"role": "system", "content": "be brief"}, U, {"role": "assistant", "content": " \n"})),
     [("messages[2].content", "empty_content")], "conversation", 5),
    ("empty_content-text", enc({"text": "   "}), [("text", "empty_content")], "text", 3),
    ("no_assistant_turn", enc(msgs({"role": "system", "content": "s"}, U)), [("messages", "no_assistant_turn")],
     "conversation", 3),
    ("tools_not_list", enc(msgs(U, A, tools={"type": "function", "function": {"name": "f"}})),
     [("tools", "tools_not_list")], "conversation", 4),
    ("tool_without_name", enc(msgs(U, A, tools=[TOOLS[0], {"type": "function", "function": {"description": "x"}}])),
     [("tools[1].function.name", "tool_without_name")], "conversation", 2),
    ("tool_calls_not_list", enc(msgs(U, {"role": "assistant", "tool_calls": {"id": "c"}}, tools=TOOLS)),
     [("messages[1].tool_calls", "tool_calls_not_list")], "conversation", 3),
    ("tool_calls_not_list-empty", enc(msgs(U, {"role": "assistant", "content": "x", "tool_calls": []}, tools=TOOLS)),
     [("messages[1].tool_calls", "tool_calls_not_list")], "conversation", 5),
    ("tool_call_invalid", enc(msgs(U, {"role": "assistant", "tool_calls": [{"id": "c1", "name": "get_weather"}]},
                                   tools=TOOLS)),
     [("messages[1].tool_calls[0].function", "tool_call_invalid")], "conversation", 4),
    ("unknown_tool", enc(tool_conv(call_name="get_time")),
     [("messages[1].tool_calls[0].function.name", "unknown_tool")], "conversation", 3),
    ("unknown_tool-no-tools-declared", enc(tool_conv(tools=None)),
     [("messages[1].tool_calls[0].function.name", "unknown_tool")], "conversation", 2),
    ("invalid_tool_arguments", enc(msgs(U, A, U, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"'}}]},
        tools=TOOLS)),
     [("messages[3].tool_calls[0].function.arguments", "invalid_tool_arguments")], "conversation", 4),
    ("invalid_tool_arguments-json-list", enc(tool_conv(args='["Paris"]')),
     [("messages[1].tool_calls[0].function.arguments", "invalid_tool_arguments")], "conversation", 2),
    ("invalid_tool_arguments-number", enc(tool_conv(args=7)),
     [("messages[1].tool_calls[0].function.arguments", "invalid_tool_arguments")], "conversation", 6),
    ("orphan_tool_message", enc(tool_conv(tool_call_id="call_9")),
     [("messages[2].tool_call_id", "orphan_tool_message")], "conversation", 3),
    ("orphan_tool_message-before-call", enc(msgs(U, {"role": "tool", "tool_call_id": "c1", "content": "r"}, A)),
     [("messages[1].tool_call_id", "orphan_tool_message")], "conversation", 5),
    ("invalid_weight", enc(msgs(U, {"role": "assistant", "content": "a", "weight": 0.5})),
     [("messages[1].weight", "invalid_weight")], "conversation", 3),
    ("invalid_weight-bool", enc(msgs(U, {"role": "assistant", "content": "a", "weight": True})),
     [("messages[1].weight", "invalid_weight")], "conversation", 2),
    ("weight_on_non_assistant", enc(msgs({"role": "user", "content": "hi", "weight": 1}, A)),
     [("messages[0].weight", "weight_on_non_assistant")], "conversation", 4),
    ("invalid_preference", enc({"input": "q", "preferred_output": [A], "non_preferred_output": [A]}),
     [("input", "invalid_preference")], "preference", 3),
    ("identical_preference", enc({"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [A]}),
     [("preferred_output", "identical_preference")], "preference", 4),
    ("identical_preference-chosen-rejected", enc({"prompt": "q", "chosen": "same", "rejected": [
        {"role": "assistant", "content": "same"}]}), [("chosen", "identical_preference")], "preference", 2),
    ("line_too_long", enc({"text": "a" * (formats.MAX_LINE_BYTES + 1)}), [("", "line_too_long")], "text", 3),
    # OpenAI content parts: text parts are accepted (joined); anything else is refused
    ("unsupported_content_part", enc(msgs({"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}, A)),
     [("messages[0].content[1].type", "unsupported_content_part")], "conversation", 3),
    ("unsupported_content_part-preference-input", enc({"input": {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]},
        "preferred_output": [A], "non_preferred_output": [{"role": "assistant", "content": "other"}]}),
     [("input.messages[0].content[0].type", "unsupported_content_part")], "preference", 2),
    ("unsupported_content_part-beside-tool-calls", enc(msgs(U, {"role": "assistant", "content": [
        {"type": "refusal", "refusal": "no"}], "tool_calls": [call_weather()]}, tools=TOOLS)),
     [("messages[1].content[0].type", "unsupported_content_part")], "conversation", 5),
    ("invalid_content_part", enc(msgs(U, {"role": "assistant", "content": [{"type": "text"}]})),
     [("messages[1].content[0].text", "invalid_content_part")], "conversation", 4),
    ("invalid_content_part-empty-list", enc(msgs({"role": "user", "content": []}, A)),
     [("messages[0].content", "invalid_content_part")], "conversation", 2),
    ("invalid_content_part-not-object", enc(msgs({"role": "user", "content": ["hi", {"type": "text", "text": "x"}]}, A)),
     [("messages[0].content[0]", "invalid_content_part")], "conversation", 6),
    ("invalid_content_part-no-type", enc(msgs({"role": "system", "content": [{"text": "be brief"}]}, U, A)),
     [("messages[0].content[0].type", "invalid_content_part")], "conversation", 3),
    ("invalid_content_part-chosen", enc({"prompt": "q", "chosen": [{"role": "assistant", "content": [
        {"type": "text", "text": 7}]}], "rejected": "b"}),
     [("chosen[0].content[0].text", "invalid_content_part")], "preference", 4),
    ("empty_content-parts", enc(msgs(U, {"role": "assistant", "content": [{"type": "text", "text": " "},
                                                                          {"type": "text", "text": "\n"}]})),
     [("messages[1].content", "empty_content")], "conversation", 3),
    ("content_not_string-parts-object", enc(msgs(U, {"role": "assistant", "content": {"type": "text", "text": "x"}})),
     [("messages[1].content", "content_not_string")], "conversation", 2),
    # hostile lines (issue 8): each its own code, the good lines around them still stored
    ("too_deep", b'{"text": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", [("", "too_deep")], "text", 2),
    ("too_deep-65", b'{"text": "a", "x": ' + b"[" * 64 + b"]" * 64 + b"}", [("", "too_deep")], "text", 3),
    ("number_too_large", b'{"text": "a", "n": 1e999}', [("", "number_too_large")], "text", 3),
    ("number_too_large-int", b'{"text": "a", "n": ' + b"7" * 5000 + b"}", [("", "number_too_large")], "text", 2),
    ("invalid_number", b'{"text": "a", "n": NaN}', [("", "invalid_number")], "text", 4),
    ("invalid_number-infinity", b'{"text": "a", "n": -Infinity}', [("", "invalid_number")], "text", 2),
    ("nul_byte", b'{"text": "a\x00b"}', [("", "nul_byte")], "text", 3),
    ("nul_byte-escaped", b'{"text": "a\\u0000b"}', [("", "nul_byte")], "text", 2),
    ("invalid_unicode", b'{"text": "\\ud800 alone"}', [("", "invalid_unicode")], "text", 3),
    ("invalid_unicode-in-topics", enc({"text": "a"})[:-1] + b', "topics": ["\\udc00"]}', [("", "invalid_unicode")],
     "text", 2),
]


@pytest.mark.parametrize("bad,expected,kind,position", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_line_is_reported_with_line_field_and_code(bad, expected, kind, position):
    good = GOOD[kind]
    lines = good[:position - 1] + [bad] + good[position - 1:]
    examples, errors = validate(lines)
    assert [(e.line, e.field, e.code) for e in errors] == [(position, f, c) for f, c in expected]
    assert all(e.message and e.message[0].isalpha() for e in errors), "a sentence the user can act on"
    # the bad line never takes the good ones with it
    assert [e.line for e in examples] == [n for n in range(1, len(lines) + 1) if n != position]
    assert {e.format for e in examples} == {kind}


def test_every_code_in_formats_py_is_covered():
    tree = ast.parse(Path(formats.__file__).read_text())
    codes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 3 and isinstance(node.args[2], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("add", "LineError"):
                codes.add(node.args[2].value)
    # the codes of refused-but-valid JSON (too deep, numbers out of range) come from JsonProblem
    from tuneforge.core import validation

    for module in (formats, validation):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "JsonProblem"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                codes.add(node.args[0].value)
    covered = {c[0].split("-")[0] for c in CASES} | {"mixed_formats", "unreadable_line"}  # the last: below
    assert len(codes) >= 26
    assert codes == covered


def test_a_line_the_validator_cannot_handle_is_refused_alone(monkeypatch):
    """A bug in a check refuses that line (unreadable_line) and never takes the others with it."""
    def broken(*_args, **_kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(formats, "_check_string", broken)
    examples, errors = validate([enc({"text": "a"}), enc(conv(1)), enc(conv(2))])
    assert [(e.line, e.code) for e in errors] == [(1, "unreadable_line")]
    assert [e.line for e in examples] == [2, 3]


def test_messages_name_the_problem():
    bad = b'{"text": "caf\xc3\xa9 \xff"}'
    _, errors = validate([GOOD["conversation"][0], bad])
    assert errors[0].line == 2 and "UTF-8" in errors[0].message
    assert "byte %d" % bad.index(b"\xff") in errors[0].message  # where in the line
    _, errors = validate([enc(tool_conv(call_name="get_time"))])
    assert "'get_time'" in errors[0].message
    _, errors = validate([enc(msgs(U, {"role": "robot", "content": "x"}))])
    assert "'robot'" in errors[0].message and "assistant" in errors[0].message
    _, errors = validate([enc({**conv(1), "meta": 1})])
    assert "'meta'" in errors[0].message and "topics" in errors[0].message


PAIR = {"prompt": "q", "chosen": "good", "rejected": "bad"}


def test_mixed_formats_first_valid_example_fixes_the_kind():
    """SFT formats (conversation, instruction, text) may share a file, as in a downloaded
    train.jsonl; preference pairs may not share it with them (and the other way round)."""
    lines = [b"{broken", enc({"prompt": "q1", "completion": "a1"}), enc(conv(1)),
             enc(PAIR), enc({"text": "t"}), enc({**PAIR, "chosen": "better"})]
    examples, errors = validate(lines)
    assert [(e.line, e.field, e.code) for e in errors] == [
        (1, "", "invalid_json"), (4, "", "mixed_formats"), (6, "", "mixed_formats")]
    assert [e.line for e in examples] == [2, 3, 5]
    for err in errors[1:]:
        assert "line 2" in err.message and "instruction" in err.message and "preference" in err.message
    examples, errors = validate([enc(PAIR), enc(conv(1))])
    assert [(e.line, e.code) for e in errors] == [(2, "mixed_formats")] and len(examples) == 1


def test_several_errors_on_one_line_are_all_reported():
    bad = enc(msgs({"role": "user", "content": "", "weight": 2}, {"role": "narrator", "content": "x"},
                   {"role": "assistant", "content": "ok"}, extra_key=1))
    _, errors = validate([GOOD["conversation"][0], bad])
    assert [(e.line, e.field, e.code) for e in errors] == [
        (2, "extra_key", "unknown_field"),
        (2, "messages[0].weight", "invalid_weight"),
        (2, "messages[0].weight", "weight_on_non_assistant"),
        (2, "messages[0].content", "empty_content"),
        (2, "messages[1].role", "unknown_role"),
    ]


def test_line_length_limit_is_exact():
    pad = formats.MAX_LINE_BYTES - len(b'{"text": ""}')
    at_limit = b'{"text": "' + b"a" * pad + b'"}'
    assert len(at_limit) == formats.MAX_LINE_BYTES
    example, errors = parse_line(at_limit, 1)
    assert example is not None and not errors
    example, errors = parse_line(at_limit[:-2] + b'a"}', 1)
    assert example is None and [(e.code, e.field) for e in errors] == [("line_too_long", "")]
    assert str(formats.MAX_LINE_BYTES + 1) in errors[0].message


def test_good_lines_of_every_format_pass():
    lines = {
        "conversation": [enc(conv(1)), enc(tool_conv()), enc(tool_conv(args='{"city": "Paris"}')),
                         enc(msgs({"role": "system", "content": "s"}, U, {"role": "assistant", "content": "a",
                                                                           "weight": 0}, U, {**A, "weight": 1}))],
        "instruction": [enc({"prompt": "p", "completion": "c"})],
        "text": [enc({"text": "t"})],
        "preference": [enc(pref(1)), enc({"prompt": "q", "chosen": "a", "rejected": "b"}),
                       enc({"prompt": [U], "chosen": [A], "rejected": "other"})],
    }
    for fmt, raws in lines.items():
        examples, errors = validate(raws)
        assert not errors, (fmt, errors)
        assert {e.format for e in examples} == {fmt}


# --- canonical form and content hash -------------------------------------------------------------

def test_canonical_form_and_hash():
    a = parse_line(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', 1)[0]
    b = parse_line(b'{"messages":[{"content":"hi","role":"user"},{"content":"yo","role":"assistant"}],'
                   b'"topics":["x"]}', 9)[0]
    assert a.content_hash == b.content_hash and a.canonical_json == b.canonical_json
    assert a.content_hash == formats.content_hash(a.body) and json.loads(a.canonical_json) == a.body
    assert (a.topics, b.topics, b.line) == ((), ("x",), 9)
    # an instruction pair is a two-turn conversation in the universal form and hashes the same
    ins = parse_line(enc({"prompt": "hi", "completion": "yo"}), 1)[0]
    assert ins.format == "instruction" and ins.body == a.body and ins.content_hash == a.content_hash
    # tool-call arguments given as an object become a compact JSON string; the same string hashes the same
    obj = parse_line(enc(tool_conv()), 1)[0]
    txt = parse_line(enc(tool_conv(args='{"city":"Paris"}')), 1)[0]
    assert obj.body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
    assert obj.content_hash == txt.content_hash
    # re-parsing the universal form is a fixed point
    again = parse_line(obj.canonical_json.encode(), 1)[0]
    assert again.content_hash == obj.content_hash
    # preference pairs: the chosen/rejected spelling and the OpenAI spelling are the same example
    p1 = parse_line(enc({"prompt": "q1", "chosen": "good 1", "rejected": "bad 1"}), 1)[0]
    p2 = parse_line(enc(pref(1)), 1)[0]
    assert p1.body == p2.body and p1.content_hash == p2.content_hash


def test_topics_are_stripped_sorted_and_merged_with_import_topics():
    examples, errors = validate([enc({**conv(1), "topics": [" b ", "a", "b"]}), enc(conv(2))], extra_topics=("z", "a"))
    assert not errors
    assert [e.topics for e in examples] == [("a", "b", "z"), ("a", "z")]
    assert "topics" not in examples[0].body  # topics are not part of the content (or of its hash)
    assert examples[0].content_hash == parse_line(enc(conv(1)), 1)[0].content_hash


# --- regressions: bugs found by these tests and fixed -----------------------------------------

def test_preference_output_may_call_a_tool_declared_in_input():
    line = enc({"input": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
                "preferred_output": [{"role": "assistant", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Paris"}}}]}],
                "non_preferred_output": [{"role": "assistant", "content": "I cannot know that."}]})
    example, errors = parse_line(line, 2)
    assert errors == [] and example is not None


def test_preference_input_tools_error_path():
    line = enc({"input": {"messages": [U], "tools": {"name": "f"}},
                "preferred_output": [A], "non_preferred_output": [{"role": "assistant", "content": "other"}]})
    _, errors = parse_line(line, 2)
    assert [(e.field, e.code) for e in errors] == [("input.tools", "tools_not_list")]


def test_nested_duplicate_key_has_a_field_path():
    line = b'{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "x"}]}'
    _, errors = parse_line(line, 2)
    assert [(e.line, e.field, e.code) for e in errors] == [(2, "messages[0].content", "duplicate_key")]


def test_nan_and_infinity_are_not_json():
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], '
                b'"tools": [{"type": "function", "function": {"name": "f", "parameters": {"maximum": Infinity}}}]}',
                b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c", '
                b'"function": {"name": "f", "arguments": "{\\"x\\": NaN}"}}]}], "tools": [{"type": "function", '
                b'"function": {"name": "f"}}]}'):
        example, errors = parse_line(raw, 1)
        assert example is None and errors[0].code in ("invalid_number", "invalid_tool_arguments")


def test_line_topics_longer_than_100_characters_are_rejected():
    _, errors = parse_line(enc({**conv(1), "topics": ["t" * 101]}), 3)
    assert [(e.line, e.field, e.code) for e in errors] == [(3, "topics", "invalid_topics")]


# --- OpenAI content parts ------------------------------------------------------------------------

def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_text_content_parts_are_joined_and_hash_like_the_string_in_every_format():
    """A line whose contents are text parts is the same example as the line with the joined
    strings: same universal body, same hash. Parts are joined in order with no separator."""
    tool_calling = {"role": "assistant", "tool_calls": [call_weather()]}
    pairs = [  # (with parts, with strings)
        (msgs({"role": "system", "content": parts("Be ", "brief.")}, {"role": "user", "content": parts("Weather", " in Paris?")},
              {**tool_calling, "content": parts("Checking", "...")},
              {"role": "tool", "tool_call_id": "call_1", "content": parts('{"temp_c":', " 21}")},
              {"role": "assistant", "content": parts("It is ", "21", " degrees."), "weight": 1}, tools=TOOLS),
         msgs({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
              {**tool_calling, "content": "Checking..."},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
              {"role": "assistant", "content": "It is 21 degrees.", "weight": 1}, tools=TOOLS)),
        ({"input": {"messages": [{"role": "user", "content": parts("q", "1")}]},
          "preferred_output": [{"role": "assistant", "content": parts("good", " 1")}],
          "non_preferred_output": [{"role": "assistant", "content": parts("bad 1")}]},
         pref(1)),
        ({"prompt": [{"role": "user", "content": parts("q1")}], "chosen": [{"role": "assistant", "content": parts("go", "od 1")}],
          "rejected": [{"role": "assistant", "content": parts("", "bad 1")}]},
         {"prompt": "q1", "chosen": "good 1", "rejected": "bad 1"}),
    ]
    for with_parts, with_strings in pairs:
        a, errors = parse_line(enc(with_parts), 1)
        assert errors == [] and a is not None
        b, errors = parse_line(enc(with_strings), 1)
        assert errors == [] and b is not None
        assert a.body == b.body and a.content_hash == b.content_hash and a.canonical_json == b.canonical_json
        assert '"type":"text"' not in a.canonical_json
    conversation = parse_line(enc(pairs[0][0]), 1)[0]
    assert [m.get("content") for m in conversation.body["messages"]] == [
        "Be brief.", "Weather in Paris?", "Checking...", '{"temp_c": 21}', "It is 21 degrees."]
    # the universal form of a parts line re-imports as itself
    again = parse_line(conversation.canonical_json.encode(), 1)[0]
    assert again.content_hash == conversation.content_hash


def test_identical_preference_is_found_through_content_parts():
    line = enc({"input": {"messages": [U]}, "preferred_output": [{"role": "assistant", "content": parts("sa", "me")}],
                "non_preferred_output": [{"role": "assistant", "content": "same"}]})
    _, errors = parse_line(line, 1)
    assert [(e.field, e.code) for e in errors] == [("preferred_output", "identical_preference")]


def test_content_part_errors_name_the_part_its_type_and_what_to_do():
    line = enc(msgs({"role": "user", "content": parts("Look: ") + [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "file", "file": {"file_id": "file-1"}}, {"type": "text"}]}, A))
    _, errors = parse_line(line, 7)
    assert [(e.line, e.field, e.code) for e in errors] == [
        (7, "messages[0].content[1].type", "unsupported_content_part"),
        (7, "messages[0].content[2].type", "unsupported_content_part"),
        (7, "messages[0].content[3].text", "invalid_content_part"),
    ]
    assert "part 1" in errors[0].message and "'image_url'" in errors[0].message
    assert "only text parts can be fine-tuned" in errors[0].message
    assert "part 2" in errors[1].message and "'file'" in errors[1].message
    assert "part 3" in errors[2].message and '"text"' in errors[2].message
    # a parts line that is otherwise fine never reports empty_content on top of a part error
    assert "empty_content" not in {e.code for e in errors}
