"""Request limits and checks every service applies at the top of its RPC handlers.

A request is judged before anything is looked up, stored or echoed back: strings have a length
limit, repeated fields a size limit, enums must be values the proto declares, ids must look like
ids, and names are never path-like. Every check appends ``(field, description)`` to one
``Violations`` list, so a caller sees all problems at once (INVALID_ARGUMENT with
``google.rpc.BadRequest`` details). Descriptions never quote the offending value in full: a
4 MiB string must not come back in the status trailer.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from tuneforge.core.errors import bad_request

# -- limits ---------------------------------------------------------------------------------------
MAX_NAME = 64  # job / model names (they name the registered model)
MAX_ID = 64  # server-generated ids (job_…, ds_…, mdl_…, ex_…, dlv_…) and idempotency keys
MAX_TOPIC = 100
MAX_TOPICS = 100  # topics in one request
MAX_IDS = 1000  # ids in one request (DeleteExamples)
MAX_KEYWORD = 128  # catalog ids, method names, dataset kinds, choices
MAX_DESCRIPTION = 2000
MAX_DISPLAY_NAME = 200
MAX_EMAIL = 254  # RFC 5321 path limit
MAX_AGENT_ID = 128
MAX_SOURCE_NAME = 256
MAX_PAGE_TOKEN = 12  # an offset; longer would overflow SQLite's 64-bit integers
MAX_OPTIONS_JSON = 64 * 1024
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 100  # far below Python's 4,300-digit conversion limit
MAX_MODULES = 32  # LoRA target modules in one request

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_DRIVE = re.compile(r"[A-Za-z]:")
# Every NAME_RE/ID_RE/... above is used with fullmatch: ``re.match(r"^…$")`` accepts a trailing newline.


class Violations(list):
    """``(field, description)`` pairs; ``raise_if_any`` turns them into INVALID_ARGUMENT."""

    def add(self, field: str, description: str) -> None:
        self.append((field, description))

    def raise_if_any(self, message: str = "invalid request") -> None:
        if self:
            raise bad_request(f"{message}: " + "; ".join(f"{f}: {d}" for f, d in self[:10]), list(self))


def has_control(value: str) -> bool:
    """Control characters (NUL, newlines, escapes …) or unpaired surrogates."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in value) if not value.isprintable() else False


def is_path_like(value: str) -> bool:
    """Could the string steer a file path: separators, ``..``, absolute or drive paths, percent or
    NUL escapes, a leading ``~`` or ``.``."""
    lowered = value.lower()
    return (
        "/" in value or "\\" in value or "\x00" in value or ".." in value
        or "%2e" in lowered or "%2f" in lowered or "%5c" in lowered or "%00" in lowered
        or value.startswith(("~", ".")) or bool(_DRIVE.match(value))
    )


def text(v: Violations, field: str, value: str, *, max_len: int, required: bool = False,
         multiline: bool = False) -> bool:
    """A free-text field: at most ``max_len`` characters, no control characters (line breaks
    and tabs allowed when ``multiline``). True when it passed."""
    if len(value) > max_len:
        v.add(field, f"at most {max_len} characters (got {len(value)})")
        return False
    if required and not value.strip():
        v.add(field, "required")
        return False
    probe = value.replace("\n", "").replace("\r", "").replace("\t", "") if multiline else value
    if has_control(probe):
        v.add(field, "must not contain control characters")
        return False
    return True


def keyword(v: Violations, field: str, value: str, *, required: bool = False) -> bool:
    """A short word chosen from a list (catalog id, method, choice): bounded, no control characters."""
    return text(v, field, value, max_len=MAX_KEYWORD, required=required)


def name(v: Violations, field: str, value: str, *, what: str = "a name") -> bool:
    """1-64 letters, digits, '.', '_' or '-', starting with a letter or digit: never path-like
    (no separator, no '%', no leading dot, so never '..' as a path segment)."""
    if len(value) > MAX_NAME or not NAME_RE.fullmatch(value):
        v.add(field, f"{what} is 1-{MAX_NAME} characters: letters, digits, '.', '_' or '-', "
                     "starting with a letter or digit")
        return False
    return True


def identifier(v: Violations, field: str, value: str, *, required: bool = True) -> bool:
    """An id the server made (``job_…``, ``ds_…``, …). Only the shape is checked here: a
    well-shaped id that is not the caller's is NOT_FOUND from the lookup, as any unknown id is."""
    if not value:
        if required:
            v.add(field, "required")
        return not required
    if len(value) > MAX_ID or not ID_RE.fullmatch(value):
        v.add(field, f"not an id: ids are 1-{MAX_ID} letters, digits, '_' or '-'")
        return False
    return True


def model_ref(v: Violations, field: str, value: str) -> bool:
    """A model id or name."""
    if not value:
        v.add(field, "a model id or name")
        return False
    return name(v, field, value, what="a model id or name")


def email(v: Violations, field: str, value: str, *, required: bool = True) -> bool:
    if not value and not required:
        return True
    if len(value) > MAX_EMAIL or has_control(value) or not EMAIL_RE.fullmatch(value):
        v.add(field, "not an email address")
        return False
    return True


def agent_id(v: Violations, field: str, value: str) -> bool:
    if len(value) > MAX_AGENT_ID or not AGENT_RE.fullmatch(value):
        v.add(field, f"1-{MAX_AGENT_ID} characters: letters, digits, '.', '_', ':', '-'")
        return False
    return True


def enum(v: Violations, field: str, value: int, enum_type, *, allow_unspecified: bool = True) -> bool:
    """A value the proto enum declares (proto3 enums are open: any int32 arrives)."""
    values = set(enum_type.values())
    if value not in values or (not allow_unspecified and value == 0):
        names = [n for n in enum_type.keys() if allow_unspecified or enum_type.Value(n) != 0]
        v.add(field, f"unknown value {value}; one of {', '.join(names)}")
        return False
    return True


def repeated(v: Violations, field: str, values: Sequence[Any], *, max_items: int,
             each: Callable[[Violations, str, Any], bool] | None = None) -> bool:
    """At most ``max_items`` entries, each passing ``each(v, "field[i]", value)`` (the first
    ten failures are reported)."""
    if len(values) > max_items:
        v.add(field, f"at most {max_items} entries (got {len(values)})")
        return False
    ok = True
    if each is not None:
        before = len(v)
        for i, item in enumerate(values):
            if len(v) - before >= 10:
                break
            ok = each(v, f"{field}[{i}]", item) and ok
    return ok


def topic(v: Violations, field: str, value: str) -> bool:
    if not value.strip() or len(value) > MAX_TOPIC or has_control(value):
        v.add(field, f"a topic is 1-{MAX_TOPIC} characters, without control characters")
        return False
    return True


def topics(v: Violations, field: str, values: Sequence[str]) -> bool:
    return repeated(v, field, values, max_items=MAX_TOPICS, each=topic)


def page(v: Violations, request) -> bool:
    """``page_size`` (negative is refused; 0 takes the default) and an offset ``page_token``."""
    ok = True
    if request.page_size < 0:
        v.add("page_size", "must not be negative")
        ok = False
    token = request.page_token
    if token and (len(token) > MAX_PAGE_TOKEN or not (token.isascii() and token.isdigit())):
        v.add("page_token", "not a page token from a previous response")
        ok = False
    return ok


def finite(v: Violations, field: str, value: float) -> bool:
    if not math.isfinite(value):
        v.add(field, "must be a finite number")
        return False
    return True


# -- JSON text given inside a request (method options) -------------------------------------------
class JsonProblem(ValueError):
    """JSON that is valid syntax but refused: too deep, a number out of range, NaN/Infinity."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text_: str, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays/objects in ``text_`` (strings skipped), counted without
    recursion. Exact above ``limit`` (counting stops at ``limit + 1``); at or below it, an upper
    bound (the number of opening brackets), which is all a limit check needs and costs nothing."""
    openers = text_.count("[") + text_.count("{")
    if openers <= limit:
        return openers
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text_))
    depth = deepest = 0
    for c in brackets:
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonProblem("number_too_large", f"an integer with {len(s.lstrip('-'))} digits "
                                              f"(at most {MAX_INT_DIGITS})")
    return int(s)


def _parse_float(s: str) -> float:
    value = float(s)
    if not math.isfinite(value):
        raise JsonProblem("number_too_large", f"the number {s[:20]}{'…' if len(s) > 20 else ''} "
                                              "is beyond the range of a double")
    return value


def _parse_constant(s: str):
    raise JsonProblem("invalid_number", f"the literal {s} is not a JSON number (JSON has no NaN or Infinity)")


def safe_json_kwargs() -> dict[str, Any]:
    """``json`` decoder hooks: NaN/Infinity, infinite floats and huge integers raise JsonProblem."""
    return {"parse_int": _parse_int, "parse_float": _parse_float, "parse_constant": _parse_constant}


def loads_bounded(text_: str, *, max_depth: int = MAX_JSON_DEPTH, **hooks) -> Any:
    """``json.loads`` that never recurses past ``max_depth`` and never raises RecursionError:
    refusals are JsonProblem, syntax errors ValueError."""
    if json_depth(text_, max_depth) > max_depth:
        raise JsonProblem("too_deep", f"nested more than {max_depth} levels deep")
    kwargs = {**safe_json_kwargs(), **hooks}
    try:
        return json.loads(text_, **kwargs)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise JsonProblem("too_deep", f"nested more than {max_depth} levels deep") from None


def json_object(v: Violations, field: str, value: str, *, max_bytes: int = MAX_OPTIONS_JSON) -> dict | None:
    """A JSON object given as text (empty: ``{}``); None with a violation when it is not one."""
    if len(value) > max_bytes:
        v.add(field, f"at most {max_bytes} characters")
        return None
    try:
        parsed = loads_bounded(value or "{}")
    except ValueError as exc:
        v.add(field, f"not a usable JSON object: {str(exc)[:200]}")
        return None
    if not isinstance(parsed, dict):
        v.add(field, "must be a JSON object")
        return None
    return parsed


def check(message: str, *checks: Callable[[Violations], Any]) -> None:
    """Run ``checks`` against one Violations list and raise INVALID_ARGUMENT if any failed."""
    v = Violations()
    for fn in checks:
        fn(v)
    v.raise_if_any(message)


def clip(value: str, limit: int = 80) -> str:
    """A user string, shortened for an error message."""
    return value if len(value) <= limit else value[: limit - 1] + "…"
