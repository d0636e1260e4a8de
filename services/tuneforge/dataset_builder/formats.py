"""Example formats, their validation and their canonical form.

Every error names the 1-based line, the field path, a stable code and a sentence a user can act
on. Nothing is stored before validation; a bad line never takes the good ones with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
from typing import Any

from tuneforge.core.validation import MAX_JSON_DEPTH, JsonProblem, json_depth, safe_json_kwargs

try:  # the hot path's parser and serialiser; everything works without it, only slower
    import orjson
except ImportError:  # pragma: no cover - a dependency of the package
    orjson = None

log = logging.getLogger(__name__)

FORMAT_CONVERSATION = "conversation"
FORMAT_INSTRUCTION = "instruction"
FORMAT_TEXT = "text"
FORMAT_PREFERENCE = "preference"

KIND_OF_FORMAT = {
    FORMAT_CONVERSATION: "conversations",
    FORMAT_INSTRUCTION: "conversations",
    FORMAT_TEXT: "conversations",
    FORMAT_PREFERENCE: "preferences",
}

ROLES = ("system", "user", "assistant", "tool")
KNOWN_KEYS = {
    FORMAT_CONVERSATION: {"messages", "tools"},
    FORMAT_INSTRUCTION: {"prompt", "completion"},
    FORMAT_TEXT: {"text"},
    FORMAT_PREFERENCE: set(),
}
MAX_LINE_BYTES = 1_000_000
MAX_TOPIC_LENGTH = 100


@dataclasses.dataclass(frozen=True)
class LineError:
    line: int
    field: str
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class ParsedExample:
    line: int
    format: str
    body: dict[str, Any] | None  # canonical example without topics (None when validated in a worker process)
    topics: tuple[str, ...]
    content_hash: str
    canonical_json: str


class _DupDict(dict):
    """An object that had a key twice (the hook runs inside-out, so the path is found afterwards)."""

    duplicate: str = ""


def _pairs_hook(pairs):
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    dup = _DupDict()
    for key, value in pairs:
        if key in dup and not dup.duplicate:
            dup.duplicate = key
        dup[key] = value
    _seen_duplicate.flag = True
    return dup


def _find_duplicate(value: Any, path: str = "") -> str | None:
    if isinstance(value, _DupDict):
        return f"{path}.{value.duplicate}" if path else value.duplicate
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_duplicate(item, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_duplicate(item, f"{path}[{i}]")
            if found:
                return found
    return None


_seen_duplicate = threading.local()  # set by _pairs_hook when an object repeats a key
_seen_float = threading.local()  # set when a float was read (so the canonical text needs json.dumps)
_STRICT = safe_json_kwargs()


def _parse_float(text: str) -> float:
    _seen_float.flag = True
    return _STRICT["parse_float"](text)


# NaN/Infinity, floats beyond a double (1e999) and integers of over 100 digits raise JsonProblem.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook, **{**_STRICT, "parse_float": _parse_float})


def _decode(text: str) -> Any:
    if json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:  # checked before the recursive decoder runs
        raise JsonProblem("too_deep", f"arrays/objects nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return _DECODER.decode(text)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise JsonProblem("too_deep", f"arrays/objects nested more than {MAX_JSON_DEPTH} levels deep") from None


def loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no number beyond a double or over 100 digits, at most 64
    levels deep (JsonProblem, a ValueError, says which); objects with a repeated key come back
    as _DupDict."""
    return _decode(text)


def loads_marked(text: str) -> tuple[Any, bool, bool]:
    """``loads``, whether any object had a repeated key, and whether any float was read."""
    _seen_duplicate.flag = _seen_float.flag = False
    obj = _decode(text)
    return obj, _seen_duplicate.flag, _seen_float.flag


def loads_flagged(text: str) -> tuple[Any, bool]:
    """``loads`` and whether any object had a repeated key (so the tree walk is only needed then)."""
    _seen_duplicate.flag = False
    obj = _decode(text)
    return obj, _seen_duplicate.flag


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
BOM = b"\xef\xbb\xbf"


def _strings(value: Any):
    """Every key and string in a decoded value, walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded value holds a lone surrogate (``"\\ud800"`` decodes but is no text)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def loads_stored(text: str) -> Any:
    """A stored canonical text (``ParsedExample.canonical_json``) read as ``json.loads`` reads it.
    orjson reads it when writing its value back gives the same text: then every number in it
    (orjson reads integers beyond 64 bits as floats, and writes floats as 1e16 where json.dumps
    writes 1e+16) was read as the same value, a float's shortest text naming one double."""
    if orjson is not None:
        try:
            value = orjson.loads(text)
            if orjson.dumps(value, option=orjson.OPT_SORT_KEYS) == text.encode():
                return value
        except (orjson.JSONDecodeError, TypeError):
            pass
    return json.loads(text)


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canonical_fast(body: dict[str, Any]) -> str:
    """``canonical`` of a body without floats, 5-10x faster: orjson writes strings (the same
    escapes, no ASCII escaping), integers, booleans and null exactly as json.dumps does and sorts
    keys by code point; only floats it writes differently (1e+16 is 1e16)."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # an integer beyond 64 bits
        return canonical(body)


def content_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return FORMAT_CONVERSATION
    if "preferred_output" in obj or "non_preferred_output" in obj or "chosen" in obj or "rejected" in obj:
        return FORMAT_PREFERENCE
    if "prompt" in obj and "completion" in obj:
        return FORMAT_INSTRUCTION
    if "text" in obj:
        return FORMAT_TEXT
    return None


MAX_ERROR_FIELD = 200  # a field path or message quotes user keys and values: shortened, so that
MAX_ERROR_MESSAGE = 500  # a thousand reported errors stay far below the response size limit


class _Errors(list):
    def add(self, line: int, field: str, code: str, message: str) -> None:
        if len(field) > MAX_ERROR_FIELD:
            field = field[: MAX_ERROR_FIELD - 1] + "…"
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "…"
        self.append(LineError(line, field, code, message))


def _tool_names(tools: Any, line: int, tools_path: str, errors: "_Errors | None") -> set[str]:
    """Names of the declared tools; errors in the declaration are added when ``errors`` is given."""
    names: set[str] = set()
    if tools is None:
        return names
    if not isinstance(tools, list):
        if errors is not None:
            errors.add(line, tools_path, "tools_not_list", "tools must be a list of function definitions")
        return names
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            if errors is not None:
                errors.add(line, f"{tools_path}[{i}].function.name", "tool_without_name",
                           'each tool needs {"type": "function", "function": {"name": ...}}')
        else:
            names.add(fn["name"])
    return names


def _content_text(content: Any, line: int, path: str, errors: _Errors) -> str | None:
    """A message's ``content`` as one string: a string as is, or OpenAI content parts (a list of
    ``{"type": "text", "text": ...}``) joined in order with no separator, as OpenAI does. Only text
    can be fine-tuned: another part type is ``unsupported_content_part``; a malformed part or an
    empty list is ``invalid_content_part``. None (with the errors added) when there is no text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        errors.add(line, path, "content_not_string",
                   'content must be a string or a list of text parts ({"type": "text", "text": "..."})')
        return None
    if not content:
        errors.add(line, path, "invalid_content_part",
                   "content is an empty list of parts; give a string or at least one text part")
        return None
    texts: list[str] = []
    ok = True
    for i, part in enumerate(content):
        ppath = f"{path}[{i}]"
        if not isinstance(part, dict):
            errors.add(line, ppath, "invalid_content_part",
                       f'content part {i} must be an object such as {{"type": "text", "text": "..."}}')
            ok = False
            continue
        kind = part.get("type")
        if not isinstance(kind, str) or not kind:
            errors.add(line, f"{ppath}.type", "invalid_content_part",
                       f'content part {i} has no "type"; a text part is {{"type": "text", "text": "..."}}')
            ok = False
        elif kind != "text":
            errors.add(line, f"{ppath}.type", "unsupported_content_part",
                       f"content part {i} is of type {kind!r}; only text parts can be fine-tuned "
                       "(remove images, audio and files, or describe them in text)")
            ok = False
        elif not isinstance(part.get("text"), str):
            errors.add(line, f"{ppath}.text", "invalid_content_part",
                       f'content part {i} is a text part without a string "text"')
            ok = False
        else:
            texts.append(part["text"])
    return "".join(texts) if ok else None


def _check_messages(messages: Any, tools: Any, line: int, path: str, errors: _Errors, *, need_assistant: bool,
                    tools_path: str = "tools", report_tools: bool = True) -> None:
    if not isinstance(messages, list) or not messages:
        errors.add(line, path, "messages_not_list", "messages must be a non-empty list of message objects")
        return
    tool_names = _tool_names(tools, line, tools_path, errors if report_tools else None)
    open_calls: set[str] = set()
    has_assistant = False
    for i, msg in enumerate(messages):
        mpath = f"{path}[{i}]"
        if not isinstance(msg, dict):
            errors.add(line, mpath, "message_not_object", "each message must be a JSON object")
            continue
        role = msg.get("role")
        if role not in ROLES:
            errors.add(line, f"{mpath}.role", "unknown_role",
                       f"role {role!r} is not one of {', '.join(ROLES)}")
            continue
        if "weight" in msg and (msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool)):
            errors.add(line, f"{mpath}.weight", "invalid_weight", "weight must be 0 or 1")
        if "weight" in msg and role != "assistant":
            errors.add(line, f"{mpath}.weight", "weight_on_non_assistant", "weight applies to assistant messages only")
        content = msg.get("content")
        tool_calls = msg.get("tool_calls")
        if role == "assistant":
            has_assistant = True
            if tool_calls is not None:
                if not isinstance(tool_calls, list) or not tool_calls:
                    errors.add(line, f"{mpath}.tool_calls", "tool_calls_not_list", "tool_calls must be a non-empty list")
                    tool_calls = []
                for j, call in enumerate(tool_calls):
                    cpath = f"{mpath}.tool_calls[{j}]"
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict):
                        errors.add(line, f"{cpath}.function", "tool_call_invalid",
                                   'a tool call is {"id", "type": "function", "function": {"name", "arguments"}}')
                        continue
                    name = fn.get("name")
                    if not tool_names or not isinstance(name, str) or name not in tool_names:
                        errors.add(line, f"{cpath}.function.name", "unknown_tool",
                                   f"tool call names {name!r}, which is not declared in tools")
                    args = fn.get("arguments")
                    if isinstance(args, str):
                        try:
                            parsed = loads(args)
                        except ValueError:
                            errors.add(line, f"{cpath}.function.arguments", "invalid_tool_arguments",
                                       "arguments must be valid JSON (an object)")
                            parsed = None
                        if parsed is not None and not isinstance(parsed, dict):
                            errors.add(line, f"{cpath}.function.arguments", "invalid_tool_arguments",
                                       "arguments must be a JSON object")
                    elif not isinstance(args, dict):
                        errors.add(line, f"{cpath}.function.arguments", "invalid_tool_arguments",
                                   "arguments must be a JSON object")
                    call_id = call.get("id")
                    if isinstance(call_id, str) and call_id:
                        open_calls.add(call_id)
                if content is not None:  # optional beside tool calls, and may be empty
                    _content_text(content, line, f"{mpath}.content", errors)
                continue
            if "reasoning" in msg and not isinstance(msg["reasoning"], str):
                errors.add(line, f"{mpath}.reasoning", "content_not_string", "reasoning must be a string")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in open_calls:
                errors.add(line, f"{mpath}.tool_call_id", "orphan_tool_message",
                           f"tool message answers {call_id!r}, which no earlier assistant tool call made")
        text = _content_text(content, line, f"{mpath}.content", errors)
        if text is not None and not text.strip():
            errors.add(line, f"{mpath}.content", "empty_content", "content is empty")
    if need_assistant and not has_assistant:
        errors.add(line, path, "no_assistant_turn", "there is no assistant message to learn from")


def _check_string(obj: dict, key: str, line: int, errors: _Errors, path: str | None = None) -> None:
    value = obj.get(key)
    if not isinstance(value, str):
        errors.add(line, path or key, "content_not_string", f"{key} must be a string")
    elif not value.strip():
        errors.add(line, path or key, "empty_content", f"{key} is empty")


def _check_output(value: Any, line: int, path: str, errors: _Errors, tools: Any = None) -> None:
    if isinstance(value, str):
        if not value.strip():
            errors.add(line, path, "empty_content", f"{path} is empty")
    elif isinstance(value, list):
        _check_messages(value, tools, line, path, errors, need_assistant=True, report_tools=False)
    else:
        errors.add(line, path, "content_not_string", f"{path} must be a string or a list of assistant messages")


def _normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI form: content as one string (text parts joined, no separator), tool-call arguments
    as compact JSON strings (objects are encoded)."""
    out = []
    for msg in messages:
        if isinstance(msg.get("content"), list):  # validated: text parts only
            msg = {**msg, "content": "".join(part["text"] for part in msg["content"])}
        if msg.get("tool_calls"):
            msg = dict(msg)
            calls = []
            for call in msg["tool_calls"]:
                call = dict(call)
                fn = dict(call["function"])
                args = fn.get("arguments")
                if isinstance(args, str):
                    args = json.loads(args)  # validated: a JSON object
                fn["arguments"] = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
                call["function"] = fn
                call.setdefault("type", "function")
                calls.append(call)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _output_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _normalise_messages(value)


def universal(fmt: str, obj: dict[str, Any]) -> dict[str, Any]:
    """The universal form of a validated example: OpenAI chat for SFT data, OpenAI preference
    format for DPO pairs, ``{"text"}`` for plain text. Stored, hashed and downloaded as is."""
    if fmt == FORMAT_CONVERSATION:
        body: dict[str, Any] = {"messages": _normalise_messages(obj["messages"])}
        if obj.get("tools"):
            body["tools"] = obj["tools"]
        return body
    if fmt == FORMAT_INSTRUCTION:
        return {"messages": [{"role": "user", "content": obj["prompt"]},
                             {"role": "assistant", "content": obj["completion"]}]}
    if fmt == FORMAT_TEXT:
        return {"text": obj["text"]}
    if "input" in obj:
        inp = {"messages": _normalise_messages(obj["input"]["messages"])}
        if obj["input"].get("tools"):
            inp["tools"] = obj["input"]["tools"]
        chosen, rejected = obj["preferred_output"], obj["non_preferred_output"]
    else:
        prompt = obj.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _normalise_messages(prompt or [])
        inp = {"messages": messages}
        chosen, rejected = obj["chosen"], obj["rejected"]
    return {"input": inp, "preferred_output": _output_messages(chosen),
            "non_preferred_output": _output_messages(rejected)}


def parse_line(raw: bytes, line: int, extra_topics: tuple[str, ...] = ()) -> tuple[ParsedExample | None, list[LineError]]:
    """Validate one JSONL line. Returns the example or the errors (never both), and never raises:
    whatever the bytes, the line gets a verdict and the other lines are judged on their own."""
    try:
        return _parse_line(raw, line, extra_topics)
    except Exception as exc:  # a bug, never a user's fault: the line is refused, the import goes on
        log.exception("line %d could not be validated", line)
        return None, [LineError(line, "", "unreadable_line",
                                f"this line could not be validated ({type(exc).__name__}); it was skipped")]


def _parse_line(raw: bytes, line: int, extra_topics: tuple[str, ...]) -> tuple[ParsedExample | None, list[LineError]]:
    errors = _Errors()
    if raw.startswith(BOM):  # a byte-order mark, also where files were concatenated
        raw = raw[3:]
    if len(raw) > MAX_LINE_BYTES:
        errors.add(line, "", "line_too_long", f"line is longer than the limit of {MAX_LINE_BYTES} bytes (at least {len(raw)}); "
                   "split the example or shorten it")
        return None, errors
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        errors.add(line, "", "not_utf8", f"line is not valid UTF-8 (byte {exc.start}); save the file as UTF-8")
        return None, errors
    if "\x00" in text:
        errors.add(line, "", "nul_byte", "line contains a NUL byte (0x00); is this a binary file?")
        return None, errors
    try:
        obj, has_duplicate, has_float = loads_marked(text)
    except JsonProblem as exc:
        errors.add(line, "", exc.code, f"{exc}; each line must be plain JSON text")
        return None, errors
    except ValueError as exc:
        errors.add(line, "", "invalid_json", f"not valid JSON: {exc}")
        return None, errors
    if "\\u" in text:  # only escapes can smuggle a NUL or a lone surrogate into decoded strings
        if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
            errors.add(line, "", "invalid_unicode",
                       "line contains a lone UTF-16 surrogate escape (such as \\ud800), which is not text; "
                       "escape characters as pairs or write them as UTF-8")
            return None, errors
        if "\\u0000" in text and any("\x00" in s for s in _strings(obj)):
            errors.add(line, "", "nul_byte", "line contains a NUL character (\\u0000), which is not text")
            return None, errors
    duplicate = _find_duplicate(obj) if has_duplicate else None
    if duplicate:
        key = duplicate.rsplit(".", 1)[-1]
        errors.add(line, duplicate, "duplicate_key", f"key {key!r} appears twice in one object; keep one")
        return None, errors
    if not isinstance(obj, dict):
        errors.add(line, "", "not_object", "each line must be one JSON object")
        return None, errors
    topics_raw = obj.pop("topics", [])
    if not isinstance(topics_raw, list) or not all(
        isinstance(t, str) and t.strip() and len(t.strip()) <= MAX_TOPIC_LENGTH for t in topics_raw
    ):
        errors.add(line, "topics", "invalid_topics",
                   f"topics must be a list of non-empty strings of at most {MAX_TOPIC_LENGTH} characters")
        topics_raw = []
    fmt = detect_format(obj)
    if fmt is None:
        errors.add(line, "", "unknown_format",
                   'unknown format: expected "messages", "prompt"+"completion", "text", or a preference pair')
        return None, errors
    known = KNOWN_KEYS[fmt] | ({"input", "preferred_output", "non_preferred_output", "prompt", "chosen", "rejected"}
                               if fmt == FORMAT_PREFERENCE else set())
    for key in obj:
        if key not in known:
            errors.add(line, key, "unknown_field",
                       f"unexpected key {key!r} for a {fmt} example; allowed: {', '.join(sorted(known | {'topics'}))}")
    if fmt == FORMAT_CONVERSATION:
        _check_messages(obj.get("messages"), obj.get("tools"), line, "messages", errors, need_assistant=True)
    elif fmt == FORMAT_INSTRUCTION:
        _check_string(obj, "prompt", line, errors)
        _check_string(obj, "completion", line, errors)
    elif fmt == FORMAT_TEXT:
        _check_string(obj, "text", line, errors)
    else:
        if "input" in obj or "preferred_output" in obj:
            inp = obj.get("input")
            if not isinstance(inp, dict):
                errors.add(line, "input", "invalid_preference", 'input must be {"messages": [...]}')
                return None, errors
            _check_messages(inp.get("messages"), inp.get("tools"), line, "input.messages", errors,
                            need_assistant=False, tools_path="input.tools")
            chosen, rejected = obj.get("preferred_output"), obj.get("non_preferred_output")
            _check_output(chosen, line, "preferred_output", errors, inp.get("tools"))
            _check_output(rejected, line, "non_preferred_output", errors, inp.get("tools"))
        else:
            chosen, rejected = obj.get("chosen"), obj.get("rejected")
            prompt = obj.get("prompt")
            if isinstance(prompt, list):
                _check_messages(prompt, None, line, "prompt", errors, need_assistant=False)
            elif prompt is not None and not isinstance(prompt, str):
                errors.add(line, "prompt", "content_not_string", "prompt must be a string or messages")
            _check_output(chosen, line, "chosen", errors)
            _check_output(rejected, line, "rejected", errors)
        if not errors and canonical({"x": _output_messages(chosen)}) == canonical({"x": _output_messages(rejected)}):
            errors.add(line, "preferred_output" if "preferred_output" in obj else "chosen",
                       "identical_preference", "the preferred and non-preferred outputs are identical")
    if errors:
        return None, errors
    body = universal(fmt, obj)
    topics = tuple(sorted({t.strip() for t in (*topics_raw, *extra_topics)}))
    # Without a float in the line the body has none (``universal`` turns tool-call arguments into
    # strings), and orjson writes the canonical text byte for byte as json.dumps does.
    text = canonical(body) if has_float or orjson is None else _canonical_fast(body)
    return ParsedExample(line=line, format=fmt, body=body, topics=topics,
                         content_hash=hashlib.sha256(text.encode()).hexdigest(), canonical_json=text), []


class FileValidator:
    """Validates the lines of one file in order. A file holds one kind of data, set by its first
    valid example: SFT data (conversations, instruction pairs, plain text — the kinds a universal
    train.jsonl may hold together) or preference pairs; a line of the other kind is an error
    naming both lines."""

    def __init__(self, extra_topics: tuple[str, ...] = ()):
        self.extra_topics = extra_topics
        self.format: str | None = None
        self.format_line = 0

    def line(self, raw: bytes, line: int) -> tuple[ParsedExample | None, list[LineError]]:
        example, errors = parse_line(raw, line, self.extra_topics)
        if example is None:
            return None, errors
        return self.accept(example)

    def accept(self, example: ParsedExample) -> tuple[ParsedExample | None, list[LineError]]:
        """The file-level check of a valid line (``parse_line`` may have run elsewhere), in order."""
        line = example.line
        if self.format is None:
            self.format, self.format_line = example.format, line
        elif KIND_OF_FORMAT[example.format] != KIND_OF_FORMAT[self.format]:
            return None, [LineError(
                line, "", "mixed_formats",
                f"this line is a {example.format} example but the file's first example (line "
                f"{self.format_line}) is a {self.format}; put SFT data and preference pairs in separate files",
            )]
        return example, []
