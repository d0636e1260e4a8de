"""Property-based fuzzing (hypothesis) of the two doors bad input comes through (issue 8, item 4).

* The import parser: arbitrary bytes, JSON of any shape (lone surrogates, NaN, huge and deep
  values), mutated good lines, split into chunks at random: it never raises, every non-blank
  line gets exactly one verdict (an example or errors), and no line hits the "could not be
  validated" fallback (that would be a bug hidden by the per-line safety net).
* CreateJob against a running in-process stack: arbitrary field values give only the expected
  status codes (OK, INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION), never INTERNAL or
  UNKNOWN, and the services stay SERVING.

Kept small (modest max_examples, no deadline) so both parts together stay within ~60 s.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ADMIN
from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.core.client import Clients
from tuneforge.core.hyperparameters import PARAMS
from tuneforge.dataset_builder import formats
from tuneforge.dataset_builder.service import _ImportParser
from tuneforge.quickstart import create_workspace

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- the import parser --------------------------------------------------------------------------------
_any_char = st.characters(exclude_categories=())  # every code point, lone surrogates included
json_leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**95, max_value=10**130)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(_any_char, max_size=12))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(_any_char, max_size=8), inner, max_size=4),
    max_leaves=16,
)
GOOD_LINES = [
    json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
    json.dumps({"prompt": "p", "completion": "c", "topics": ["t"]}).encode(),
    json.dumps({"text": "plain text"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}, {"role": "assistant", "content": "ok"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
]


@st.composite
def json_lines(draw) -> bytes:
    """JSON text of arbitrary shape, including NaN/Infinity and escaped lone surrogates."""
    value = draw(json_values)
    if draw(st.booleans()):  # make it look like an example so deeper checks run
        key = draw(st.sampled_from(["messages", "text", "prompt", "chosen", "input"]))
        value = {key: value, **({"completion": value} if key == "prompt" else {})}
    return json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mutated_lines(draw) -> bytes:
    """A good line with bytes replaced, inserted or removed."""
    line = bytearray(draw(st.sampled_from(GOOD_LINES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(line) - 1)))
        byte = draw(st.integers(0, 255))
        if op == "replace" and line:
            line[at] = byte
        elif op == "insert":
            line.insert(at, byte)
        elif line:
            del line[at]
    return bytes(line)


@st.composite
def nested_lines(draw) -> bytes:
    depth = draw(st.integers(0, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = b"1" if opener != b"[" else b""
    tail = closer * depth if draw(st.booleans()) else b""
    return b'{"text": "t", "x": ' + opener * depth + inner + tail + b"}"


any_line = st.one_of(st.binary(max_size=200), json_lines(), mutated_lines(), nested_lines(),
                     st.sampled_from(GOOD_LINES))


def _expected_lines(data: bytes) -> set[int]:
    """1-based numbers of the non-blank lines, as the parser counts them."""
    return {n for n, raw in enumerate(data.split(b"\n"), start=1)
            if raw.removesuffix(b"\r").removeprefix(b"\xef\xbb\xbf").strip()}


@FUZZ
@given(lines=st.lists(any_line, max_size=12), crlf=st.booleans(), bom=st.booleans(),
       chunking=st.randoms(use_true_random=False))
def test_import_parser_gives_every_line_a_verdict(lines, crlf, bom, chunking: random.Random):
    data = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    parser = _ImportParser(dsb.ImportOptions(source_name="fuzz.jsonl"))
    at = 0
    while at < len(data):  # chunks of random size: lines span chunk boundaries
        size = chunking.randint(1, 64)
        parser.feed(data[at:at + size])
        at += size
    parser.finish()
    example_lines = [e.line for e in parser.examples]
    error_lines = {e.line for e in parser.errors}
    assert len(example_lines) == len(set(example_lines))
    assert not set(example_lines) & error_lines, "an example or errors, never both"
    assert set(example_lines) | error_lines == _expected_lines(data)
    assert parser.lines_read == len(_expected_lines(data))
    assert "unreadable_line" not in {e.code for e in parser.errors}
    for example in parser.examples:  # what is stored is valid UTF-8 JSON without NaN or NUL
        example.canonical_json.encode("utf-8")
        assert "\x00" not in example.canonical_json
        json.loads(example.canonical_json, parse_constant=_no_constant)  # no NaN / Infinity stored


def _no_constant(name: str):
    raise AssertionError(f"{name} stored")


@FUZZ
@given(line=any_line)
def test_parse_line_never_raises(line):
    example, errors = formats.parse_line(line, 7)
    assert (example is None) == bool(errors)
    assert all(e.line == 7 and e.code and e.message for e in errors)
    assert "unreadable_line" not in {e.code for e in errors}


# -- CreateJob against a running stack ----------------------------------------------------------------
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION}
INT64_PARAMS = {"min_examples", "seed"}
HOSTILE = ["", " ", "../../etc/passwd", "/abs", "%2e%2e%2f", "a\\b", "a\x00b", "x\n", "llama-3.2-1b", "sft", "dpo",
           "a" * 70, "名前"]
_text = st.text(max_size=40) | st.sampled_from(HOSTILE)


def _param_value(p):
    """Mostly a value in the parameter's range, else anything its proto type holds."""
    if p.kind is float:
        return mostly(st.floats(p.low, p.high, exclude_min=not p.low_inclusive, exclude_max=not p.high_inclusive),
                      st.floats(allow_nan=True, allow_infinity=True))
    bits = 63 if p.name in INT64_PARAMS else 31
    return mostly(st.integers(int(p.low), int(p.high)), st.integers(-(2**bits), 2**bits - 1) | st.integers(-3, 300))


def mostly(valid, hostile):
    """``valid`` nine times in ten: each field is usually fine, so whole requests are often
    accepted and a hostile field decides."""
    return st.integers(0, 9).flatmap(lambda i: hostile if i == 9 else valid)  # 0, the valid side, shrinks best


@st.composite
def create_job_requests(draw) -> js.CreateJobRequest:
    hp = common_pb2.Hyperparameters()
    for p in PARAMS:
        if draw(st.integers(0, 7)) == 0:
            setattr(hp, p.name, draw(_param_value(p)))
    if draw(st.integers(0, 3)) == 0:
        hp.lora_target_modules.extend(draw(st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj"]) | _text,
                                                    max_size=4)))
    if draw(st.integers(0, 3)) == 0:
        hp.train_on_inputs = draw(mostly(st.sampled_from(["auto", "true", "false"]), _text))
    options = draw(mostly(st.sampled_from(["", "{}"]), st.sampled_from(
        ["[" * 3000, '{"beta": NaN}', '{"beta": 1e999}', '{"beta": 0.1}']) | st.text(max_size=30)
        | json_values.map(lambda v: json.dumps(v, allow_nan=True))))
    spec = js.JobSpec(
        name=draw(mostly(st.from_regex(r"[a-z][a-z0-9._-]{0,30}", fullmatch=True), _text)),
        description=draw(mostly(st.text(st.characters(categories=["L", "N", "P", "Zs"]), max_size=60),
                                st.just("d" * 2001) | st.text(max_size=60))),
        topics=draw(mostly(st.just([]), st.lists(_text, max_size=3))),
        base_model=draw(mostly(st.sampled_from(["llama-3.2-1b", "qwen-2.5-14b"]), _text)),
        method=draw(mostly(st.just("sft"), st.just("dpo") | _text)),
        hyperparameters=hp,
        method_options_json=options,
        notify_email=draw(mostly(st.sampled_from(["", "a@b.example"]), st.emails() | _text)),
        overlength_policy=draw(mostly(st.integers(0, 2), st.integers(-(2**31), 2**31 - 1))),
    )
    return js.CreateJobRequest(spec=spec, request_id=draw(mostly(st.just(""), _text)))


@pytest.mark.integration
async def test_create_job_fuzz_gives_only_expected_codes(services):
    endpoints, _ = services
    created = await create_workspace(endpoints, ADMIN, common_pb2.PLAN_STARTER, "fuzz@example.com", "Fuzz")
    clients = Clients.connect(endpoints, created.api_key)
    await sdk.wait_until_authorised(clients)
    loop = asyncio.get_running_loop()
    seen: collections.Counter = collections.Counter()

    async def create(request: js.CreateJobRequest) -> tuple[grpc.StatusCode, str]:
        try:
            await clients.job_scheduler.CreateJob(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,  # the same 60 in CI
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=create_job_requests())
    def check(request):
        code, details = asyncio.run_coroutine_threadsafe(create(request), loop).result(timeout=60)
        seen[code.name] += 1
        assert code in EXPECTED, f"{code.name}: {details}\n{request}"
        assert len(details) <= 2100

    try:
        await asyncio.to_thread(check)  # hypothesis drives from a thread; the calls run on this loop
        for name, target in endpoints.items():
            async with grpc.aio.insecure_channel(target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        await clients.close()
    print(f"\nCreateJob fuzz: {sum(seen.values())} requests: " + ", ".join(f"{k} {v}" for k, v in seen.most_common()))
    assert sum(seen.values()) >= 30 and seen["OK"] >= 1, seen  # both sides of the door were tried

