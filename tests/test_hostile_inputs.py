"""Bad input never breaks anything (issue 8, item 4), shown with a corpus of hostile inputs.

* gRPC: every RPC of every service (walked from the service descriptors, so a new RPC or field
  is covered without editing this file) gets each of its request fields set, one at a time, to
  values from a table of hostile values for the field's type: path-like names, NUL and control
  characters, oversized strings and repeated fields, out-of-range enums and numbers, NaN; and
  raw request bytes that are not the message at all (truncated, invalid UTF-8, lone surrogates).
  No answer is INTERNAL or UNKNOWN (nor UNAVAILABLE / DEADLINE_EXCEEDED: the service did not
  fall over); ids, names, emails and enums out of shape are INVALID_ARGUMENT or NOT_FOUND.
* Imports: a file of hostile lines between good ones (nesting 5,000 deep, huge numbers, lone
  surrogates, NUL, invalid UTF-8, overlong lines, BOM, CRLF, non-objects ...): each hostile line
  is refused with its own code and every good line is stored; hostile whole files too.
* CLI: bad values are one line on stderr, exit code 2, never a traceback.
Afterwards every service still answers SERVING on grpc.health.v1.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ADMIN
from tuneforge import cli, sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.api.trainer.v1 import trainer_service_pb2 as tr
from tuneforge.core.client import Clients
from tuneforge.core.client import channel as make_channel
from tuneforge.dataset_builder import formats
from tuneforge.quickstart import create_workspace

SC = grpc.StatusCode
BROKEN = {SC.INTERNAL, SC.UNKNOWN, SC.UNAVAILABLE, SC.DEADLINE_EXCEEDED, SC.DATA_LOSS, SC.UNIMPLEMENTED}
REFUSED = {SC.INVALID_ARGUMENT, SC.NOT_FOUND}
SERVICES = {  # service name -> (proto module, Clients attribute)
    "DatasetBuilderService": (dsb, "dataset_builder"),
    "JobSchedulerService": (js, "job_scheduler"),
    "TrainerService": (tr, "trainer"),
    "ModelRegistryService": (mr, "model_registry"),
    "NotifierService": (nt, "notifier"),
}
ADMIN_RPCS = {"CreateWorkspace"}

# -- the table of hostile values --------------------------------------------------------------
HUGE = "x" * 300_000  # over every string limit, far under the 8 MiB message limit
HOSTILE_STRINGS = {
    "empty": "",
    "blank": "   ",
    "dotdot": "../../etc/passwd",
    "dotdot-backslash": "..\\..\\windows\\system32",
    "absolute": "/etc/passwd",
    "drive": "C:\\Windows\\win.ini",
    "encoded": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "double-encoded": "%252e%252e%252fetc",
    "nul": "name\x00.txt",
    "trailing-newline": "name\n",
    "header-injection": "a@b.example\r\nBcc: victim@example.com",
    "escape-codes": "\x1b[31mred\x1b[0m",
    "rtl-override": "\u202egnp.exe",
    "home": "~/.ssh/id_rsa",
    "dot": ".",
    "sql": "' OR '1'='1",
    "template": "${jndi:ldap://x}{{7*7}}",
    "long": "a" * 1000,
    "huge": HUGE,
    "unicode": "名前-ünï",
}
HOSTILE_INTS = {"minus-one": -1, "int32-min": -(2**31), "int32-max": 2**31 - 1}
HOSTILE_INT64S = {**HOSTILE_INTS, "int64-max": 2**63 - 1, "int64-min": -(2**63)}
HOSTILE_DOUBLES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0": -0.0, "max": 1.7e308,
                   "-max": -1.7e308, "subnormal": 5e-324}
HOSTILE_ENUMS = {"minus-one": -1, "ninety-nine": 99, "int32-max": 2**31 - 1}
HOSTILE_LISTS = {
    "huge-item": [HUGE],
    "path-item": ["../../etc/passwd"],
    "empty-item": [""],
    "nul-item": ["a\x00b"],
    "too-many": ["t"] * 20_000,
}
HOSTILE_JSON = {  # method_options_json
    "deep": "[" * 5000 + "]" * 5000,
    "deep-object": '{"beta": ' + "[" * 100 + "]" * 100 + "}",
    "nan": '{"beta": NaN}',
    "infinity": '{"beta": Infinity}',
    "1e999": '{"beta": 1e999}',
    "huge-int": '{"beta": ' + "9" * 5000 + "}",
    "not-object": "[1, 2]",
    "string": '"beta"',
    "broken": '{"beta": ',
    "oversized": '{"x": "' + "a" * 100_000 + '"}',
}

# Fields whose values are ids, names, emails or choices: any non-empty hostile string is refused.
STRICT_FIELDS = {
    "GetJob.job_id", "CancelJob.job_id", "WatchJob.job_id", "ListCheckpoints.job_id",
    "ValidateJob.spec.name", "CreateJob.spec.name", "ValidateJob.spec.base_model", "CreateJob.spec.base_model",
    "ValidateJob.spec.method", "CreateJob.spec.method", "ValidateJob.spec.notify_email",
    "CreateJob.spec.notify_email", "ValidateJob.spec.hyperparameters.train_on_inputs",
    "CreateJob.spec.hyperparameters.train_on_inputs", "CreateWorkspace.owner_email",
    "GetDataset.dataset_id", "DownloadDataset.dataset_id", "BuildDataset.base_model", "BuildDataset.method",
    "BuildDataset.train_on_inputs", "SummarizeExamples.dataset_kind",
    "GetModel.model", "ResolveModel.name", "DownloadModel.model", "DeleteModel.model",
    "AssignModelToAgent.model", "AssignModelToAgent.agent_id", "UnassignModel.model", "UnassignModel.agent_id",
    "ListDeliveries.job_id", "SendTestNotification.recipient", "ListExamples.page_token",
    "ListJobs.page_token", "ListModels.page_token", "ListDeliveries.page_token",
    "ListModels.agent_id", "ListAssignments.model", "ListAssignments.agent_id", "ListDatasets.page_token",
}
STRICT_OK = {"empty"}  # empty means "the default" for some of them
# Free text: the oversized value and NUL / escape codes are refused; the rest may be accepted.
TEXT_REFUSED = {"huge", "nul", "escape-codes"}
LIST_REFUSED = {"huge-item", "too-many", "nul-item"}  # topics, ids, modules: always refused
# Raw request bytes that no message decodes from (the first is built per message: invalid UTF-8
# in its first string field).
RAW_PAYLOADS = {"truncated-varint": b"\x08\xff\xff", "overlong-length": b"\x0a\xff\x01abc",
                "wire-type-7": b"\x0f", "field-zero": b"\x00"}


def _base_requests(n: int) -> dict[str, object]:
    """A plausible request per RPC, into which one hostile value at a time goes."""
    spec = js.JobSpec(name=f"hostile-{n}", base_model="llama-3.2-1b", method="sft")
    return {
        "ValidateJob": js.ValidateJobRequest(spec=spec),
        "CreateJob": js.CreateJobRequest(spec=spec, request_id=f"req-{n}"),
        "GetJob": js.GetJobRequest(job_id="job_00000000000000000000"),
        "CancelJob": js.CancelJobRequest(job_id="job_00000000000000000000"),
        "WatchJob": js.WatchJobRequest(job_id="job_00000000000000000000"),
        "ListCheckpoints": js.ListCheckpointsRequest(job_id="job_00000000000000000000"),
        "CreateWorkspace": js.CreateWorkspaceRequest(name="W", plan=common_pb2.PLAN_STARTER,
                                                     owner_email="owner@example.com"),
        "BuildDataset": dsb.BuildDatasetRequest(base_model="llama-3.2-1b", method="sft"),
        "GetModel": mr.GetModelRequest(model="no-such-model"),
        "ResolveModel": mr.ResolveModelRequest(name="no-such-model"),
        "DownloadModel": mr.DownloadModelRequest(model="no-such-model"),
        "DeleteModel": mr.DeleteModelRequest(model="no-such-model"),
        "AssignModelToAgent": mr.AssignModelToAgentRequest(model="no-such-model", agent_id="agent-1"),
        "UnassignModel": mr.UnassignModelRequest(model="no-such-model", agent_id="agent-1"),
        "GetDataset": dsb.GetDatasetRequest(dataset_id="ds_000000000000000000000000"),
        "DownloadDataset": dsb.DownloadDatasetRequest(dataset_id="ds_000000000000000000000000"),
    }


def _values_for(field: descriptor.FieldDescriptor, path: str):
    """(label, value, must_be_refused) for one field."""
    if path.endswith("method_options_json"):
        for label, value in HOSTILE_JSON.items():
            yield f"json:{label}", value, True
        return
    if field.is_repeated:
        if field.cpp_type == field.CPPTYPE_STRING:
            for label, value in HOSTILE_LISTS.items():
                refuse = label in LIST_REFUSED or (label == "empty-item" and "topics" in path)
                yield f"list:{label}", value, refuse
        return
    kind = field.cpp_type
    if kind == field.CPPTYPE_STRING and field.type == field.TYPE_STRING:
        strict = path in STRICT_FIELDS
        for label, value in HOSTILE_STRINGS.items():
            refuse = (label not in STRICT_OK) if strict else label in TEXT_REFUSED
            yield f"str:{label}", value, refuse
    elif kind == field.CPPTYPE_ENUM:
        for label, value in HOSTILE_ENUMS.items():
            yield f"enum:{label}", value, True
    elif kind in (field.CPPTYPE_INT32, field.CPPTYPE_UINT32):
        for label, value in HOSTILE_INTS.items():
            yield f"int:{label}", value, path.endswith("page_size") and value < 0
    elif kind in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
        for label, value in HOSTILE_INT64S.items():
            yield f"int64:{label}", value, False
    elif kind == field.CPPTYPE_DOUBLE:
        for label, value in HOSTILE_DOUBLES.items():
            refuse = "hyperparameters" in path and label in ("nan", "inf", "-inf", "max", "-max")
            yield f"double:{label}", value, refuse


def _fields(message_descriptor: descriptor.Descriptor, prefix: str = "", depth: int = 0):
    for field in message_descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.cpp_type == field.CPPTYPE_MESSAGE and not field.is_repeated:
            if depth < 2 and not field.message_type.full_name.startswith("google."):
                yield from _fields(field.message_type, f"{path}.", depth + 1)
            continue
        yield path, field


def _set(request, path: str, value) -> None:
    *parents, name = path.split(".")
    target = request
    for part in parents:
        target = getattr(target, part)
    field = target.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        getattr(target, name).extend(value)
    else:
        setattr(target, name, value)


def grpc_corpus():
    """(service, rpc, field path, label, request, must_be_refused) for every RPC and field."""
    n = 0
    for service_name, (module, _) in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[service_name]
        for method in service.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            base_of = lambda: _base_requests(n).get(method.name, request_class())  # noqa: E731
            yield service_name, method, "", "default", base_of(), False
            for path, field in _fields(method.input_type):
                if method.name == "CreateJob" and ".hyperparameters." in f".{path}" and not field.is_repeated \
                        and field.type != field.TYPE_STRING:
                    continue  # the numbers go through the same check as ValidateJob's, swept there
                qualified = f"{method.name}.{path}"
                for label, value, refuse in _values_for(field, qualified):
                    n += 1
                    request = base_of()
                    _set(request, path, value)
                    yield service_name, method, path, label, request, refuse


def _first_string_field(message_descriptor: descriptor.Descriptor) -> int | None:
    for field in message_descriptor.fields:
        if field.type == field.TYPE_STRING and not field.is_repeated:
            return field.number
    return None


def raw_corpus():
    """(service, rpc, label, bytes): request bytes that are not the RPC's message."""
    for service_name, (module, _) in SERVICES.items():
        for method in module.DESCRIPTOR.services_by_name[service_name].methods:
            payloads = dict(RAW_PAYLOADS)
            number = _first_string_field(method.input_type)
            if number is not None:
                tag = bytes([(number << 3) | 2])
                payloads["invalid-utf8"] = tag + b"\x02\xff\xfe"
                payloads["lone-surrogate"] = tag + b"\x03\xed\xa0\x80"
            for label, data in payloads.items():
                yield service_name, method, label, data


async def _call(stub, method: descriptor.MethodDescriptor, request, timeout: float = 20.0):
    """The status code (and details) of one call; streamed answers are read to the end."""
    rpc = getattr(stub, method.name)
    try:
        if method.client_streaming:
            requests = [request] if method.name != "ImportExamples" else [dsb.ImportExamplesRequest(
                options=request.options, chunk=b'{"text": "hostile options"}\n')]
            await rpc(iter(requests), timeout=timeout)
        elif method.server_streaming:
            async for _ in rpc(request, timeout=timeout):
                pass
        else:
            await rpc(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return SC.OK, ""


async def _call_raw(channel: grpc.aio.Channel, service: str, method: descriptor.MethodDescriptor, data: bytes):
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path)(iter([data]), timeout=20)
            async for _ in call:
                pass
        elif method.client_streaming:
            await channel.stream_unary(path)(iter([data]), timeout=20)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path)(data, timeout=20):
                pass
        else:
            await channel.unary_unary(path)(data, timeout=20)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return SC.OK, ""


# -- import corpus ---------------------------------------------------------------------------------
def good_line(i: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"hostile-corpus question {i}"},
                                    {"role": "assistant", "content": f"answer {i}"}]}).encode()


HOSTILE_LINES: list[tuple[str, bytes, str]] = [  # (label, line, expected code)
    ("deep-arrays-5000", b"[" * 5000 + b"]" * 5000, "too_deep"),
    ("deep-objects-5000", b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    ("deep-in-messages", b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", "too_deep"),
    ("deep-unclosed", b"[" * 100_000, "too_deep"),
    ("int-5000-digits", b'{"text": "a", "n": ' + b"1" * 5000 + b"}", "number_too_large"),
    ("int-101-digits", b'{"text": "a", "n": -' + b"9" * 101 + b"}", "number_too_large"),
    ("float-1e999", b'{"text": "a", "n": 1e999}', "number_too_large"),
    ("float--1e999", b'{"text": "a", "n": -1e999}', "number_too_large"),
    ("nan", b'{"text": NaN}', "invalid_number"),
    ("infinity", b'{"text": "a", "n": Infinity}', "invalid_number"),
    ("-infinity", b'{"text": "a", "n": -Infinity}', "invalid_number"),
    ("lone-high-surrogate", b'{"text": "\\ud800"}', "invalid_unicode"),
    ("lone-low-surrogate", b'{"text": "x\\udfff"}', "invalid_unicode"),
    ("reversed-surrogates", b'{"text": "\\ude00\\ud83d"}', "invalid_unicode"),
    ("surrogate-in-key", b'{"text": "a", "\\ud800": 1}', "invalid_unicode"),
    ("surrogate-in-topics", b'{"text": "a", "topics": ["\\udc00"]}', "invalid_unicode"),
    ("surrogate-in-content", b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                             b'{"role": "assistant", "content": "b"}]}', "invalid_unicode"),
    ("encoded-surrogate-bytes", b'{"text": "\xed\xa0\x80"}', "not_utf8"),
    ("invalid-utf8", b'{"text": "caf\xe9"}', "not_utf8"),
    ("overlong-utf8", b'{"text": "\xc0\xaf"}', "not_utf8"),
    ("utf16-line", '{"text": "a"}'.encode("utf-16-le"), "nul_byte"),
    ("nul-byte", b'{"text": "a\x00b"}', "nul_byte"),
    ("nul-outside-string", b'{"text": "a"}\x00', "nul_byte"),
    ("nul-escape", b'{"text": "a\\u0000b"}', "nul_byte"),
    ("nul-escape-in-key", b'{"text": "a", "k\\u0000": 1}', "nul_byte"),
    ("overlong-line", b'{"text": "' + b"a" * (formats.MAX_LINE_BYTES + 10) + b'"}', "line_too_long"),
    ("array-line", b"[1, 2, 3]", "not_object"),
    ("string-line", b'"just text"', "not_object"),
    ("number-line", b"42", "not_object"),
    ("null-line", b"null", "not_object"),
    ("true-line", b"true", "not_object"),
    ("not-json", b"this is not json", "invalid_json"),
    ("unterminated", b'{"text": "a', "invalid_json"),
    ("trailing-garbage", b'{"text": "a"} {"text": "b"}', "invalid_json"),
    ("single-quotes", b"{'text': 'a'}", "invalid_json"),
    ("comment", b'{"text": "a"} // comment', "invalid_json"),
    ("raw-control-in-string", b'{"text": "a\x01b"}', "invalid_json"),
    ("lone-cr-separated", b'{"text": "a"}\r{"text": "b"}', "invalid_json"),
    ("duplicate-keys", b'{"text": "a", "text": "b"}', "duplicate_key"),
    ("tool-call-id-list", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": [1], "content": "x"},
        {"role": "assistant", "content": "b"}]}).encode(), "orphan_tool_message"),
    ("tool-name-object", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": {"x": 1}, "arguments": {}}}]}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), "unknown_tool"),
    ("deep-tool-arguments", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), "invalid_tool_arguments"),
    ("huge-key", b'{"text": "a", "' + b"k" * 500_000 + b'": 1}', "unknown_field"),
    ("huge-role", json.dumps({"messages": [{"role": "r" * 500_000, "content": "a"},
                                           {"role": "assistant", "content": "b"}]}).encode(), "unknown_role"),
    ("long-topic", json.dumps({"text": "a", "topics": ["t" * 101]}).encode(), "invalid_topics"),
]
ACCEPTED_ODDITIES: list[tuple[str, bytes]] = [  # hostile-looking but valid: stored
    ("bom-line", b"\xef\xbb\xbf" + json.dumps({"text": "bom in the middle of the file"}).encode()),
    ("escaped-backslash-u", b'{"text": "not a surrogate: \\\\ud800"}'),
    ("surrogate-pair", b'{"text": "pair \\ud83d\\ude00"}'),
    ("depth-64", b'{"messages": [{"role": "user", "content": "deep but allowed"}, {"role": "assistant", '
                 b'"content": "ok"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": '
                 + b'{"a": ' * 60 + b"1" + b"}" * 60 + b"}}]}"),
]


def import_file_bytes() -> tuple[bytes, int, list[tuple[int, str, str]]]:
    """The hostile import: every hostile line between good ones; CRLF and empty lines too.
    Returns the bytes, the number of lines to be stored and [(line, label, code)] expected."""
    lines: list[bytes] = [b"\xef\xbb\xbf" + good_line(0)]  # a BOM opening the file
    expected: list[tuple[int, str, str]] = []
    stored = 1
    for i, (label, line, code) in enumerate(HOSTILE_LINES, start=1):
        lines.append(line)
        expected.append((len(lines), label, code))
        lines.append(good_line(i) + (b"\r" if i % 2 else b""))  # CRLF on every other good line
        stored += 1
        if i % 5 == 0:
            lines.append(b"")  # empty lines are skipped
            lines.append(b"   \t ")
    for label, line in ACCEPTED_ODDITIES:
        lines.append(line)
        stored += 1
    return b"\n".join(lines), stored, expected


HOSTILE_FILES = {  # whole files: (bytes, lines stored, error codes expected)
    "empty": (b"", 0, []),
    "only-bom": (b"\xef\xbb\xbf", 0, []),
    "only-newlines": (b"\n\n\r\n\n", 0, []),
    "no-trailing-newline": (good_line(900), 1, []),
    "utf16-bom-file": ('{"text": "a"}\n{"text": "b"}\n'.encode("utf-16"), 0, ["not_utf8", "nul_byte"]),
    "binary-garbage": (bytes(range(256)) * 20, 0, None),
    "gzip-magic": (b"\x1f\x8b\x08\x00" + b"\x00" * 40, 0, ["not_utf8"]),
    "one-huge-line-then-good": (b'{"text": "' + b"a" * 3_000_000 + b'"}\n' + good_line(901), 1, ["line_too_long"]),
}


async def _import(clients, data: bytes, chunk: int = 65536, **options):
    requests = [dsb.ImportExamplesRequest(options=dsb.ImportOptions(source_name="hostile.jsonl", **options))]
    requests += [dsb.ImportExamplesRequest(chunk=data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return await clients.dataset_builder.ImportExamples(iter(requests), timeout=120)


async def _health(endpoints) -> dict[str, int]:
    out = {}
    for name, target in endpoints.items():
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        out[name] = reply.status
    return out


async def _cli(data_dir: Path, key: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TUNEFORGE_API_KEY": key, "TUNEFORGE_DEBUG": ""})
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


# -- the test over a running stack -------------------------------------------------------------------
@pytest.mark.integration
async def test_hostile_corpus_breaks_nothing(services, tmp_path, monkeypatch):
    endpoints, settings = services
    created = await create_workspace(endpoints, ADMIN, common_pb2.PLAN_ENTERPRISE, "owner@example.com", "Hostile")
    key = created.api_key
    clients = Clients.connect(endpoints, key)
    await sdk.wait_until_authorised(clients)
    admin = Clients.connect(endpoints, ADMIN)
    counts: collections.Counter = collections.Counter()
    codes: collections.Counter = collections.Counter()
    broken: list[str] = []
    not_refused: list[str] = []
    try:
        # 1. the import corpus: every hostile line judged alone, every good line stored
        data, to_store, expected = import_file_bytes()
        reply = await _import(clients, data, chunk=4093)
        got: dict[int, str] = {}
        for e in reply.errors:
            got.setdefault(e.line, e.code)  # a line's first error
        assert [(n, label, got.get(n)) for n, label, _ in expected] == [(n, label, c) for n, label, c in expected]
        assert set(got) == {n for n, _, _ in expected}, "only the hostile lines are refused"
        assert (reply.imported, reply.rejected) == (to_store, len(HOSTILE_LINES))
        assert all(len(e.message) <= 500 and len(e.field) <= 200 for e in reply.errors)
        counts["import lines"] += len(HOSTILE_LINES) + len(ACCEPTED_ODDITIES)
        by_code = collections.Counter(e.code for e in reply.errors)
        print(f"\nimport: {reply.lines_read} lines read, {reply.imported} stored, {reply.rejected} refused by code: "
              + ", ".join(f"{c} {n}" for c, n in sorted(by_code.items())))
        for label, (file_bytes, stored, file_codes) in HOSTILE_FILES.items():
            before = (await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())).total_examples
            result = await _import(clients, file_bytes)
            after = (await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())).total_examples
            assert after - before == stored == result.imported, label
            if file_codes is not None:
                assert sorted({e.code for e in result.errors}) == sorted(set(file_codes)), label
            assert "unreadable_line" not in {e.code for e in result.errors}, label
            counts["import files"] += 1
        # all or nothing with a hostile line: nothing stored, the line reported
        result = await _import(clients, good_line(950) + b"\n" + b"[" * 5000, mode=dsb.IMPORT_MODE_ALL_OR_NOTHING)
        assert (result.imported, [e.code for e in result.errors]) == (0, ["too_deep"])
        counts["import files"] += 1

        # 2. gRPC: every RPC, every field, every hostile value of its type
        stubs = {name: getattr(clients, attr) for name, (_, attr) in SERVICES.items()}
        admin_stubs = {name: getattr(admin, attr) for name, (_, attr) in SERVICES.items()}
        for service_name, method, path, label, request, refuse in grpc_corpus():
            stub = (admin_stubs if method.name in ADMIN_RPCS else stubs)[service_name]
            code, details = await _call(stub, method, request)
            where = f"{method.name} {path or '(request)'}={label}: {code.name} {details[:120]}"
            counts["grpc requests"] += 1
            codes[code.name] += 1
            if code in BROKEN:
                broken.append(where)
            elif refuse and code not in REFUSED:
                not_refused.append(where)
            assert len(details) <= 2100, where  # nothing oversized is quoted back
        # 3. raw bytes that are not the request message
        raw_channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        for service_name, method, label, data in raw_corpus():
            target = endpoints[{"DatasetBuilderService": "dataset-builder", "JobSchedulerService": "job-scheduler",
                                "TrainerService": "trainer", "ModelRegistryService": "model-registry",
                                "NotifierService": "notifier"}[service_name]]
            token = ADMIN if method.name in ADMIN_RPCS else key
            if (target, token) not in raw_channels:
                raw_channels[target, token] = make_channel(target, token)
            code, details = await _call_raw(raw_channels[target, token], service_name, method, data)
            counts["raw requests"] += 1
            codes[code.name] += 1
            where = f"{method.name} raw:{label}: {code.name} {details[:120]}"
            if code in BROKEN:
                broken.append(where)
            elif code != SC.INVALID_ARGUMENT:
                not_refused.append(where)
        for chan in raw_channels.values():
            await chan.close()

        # 4. the CLI against the stack: server errors are one line, no traceback
        data_dir = tmp_path / "cli"
        data_dir.mkdir()
        (data_dir / "stack.json").write_text(json.dumps({"endpoints": endpoints, "nats_url": settings.nats_url}))
        hostile_file = tmp_path / "hostile.jsonl"
        hostile_file.write_bytes(good_line(990) + b"\n" + b"[" * 5000 + b"]" * 5000 + b"\n" + b'{"text": 1e999}\n')
        for args, rc, first in (
            (("jobs", "get", "../../etc/passwd"), 1, "tuneforge: error: INVALID_ARGUMENT: "),
            (("jobs", "get", "job_00000000000000000000"), 1, "tuneforge: error: NOT_FOUND: "),
            (("jobs", "create", "--name", "bad name!", "--base-model", "llama-3.2-1b"), 1, "tuneforge: error: INVALID_ARGUMENT: "),
            (("data", "import", str(hostile_file)), 1, None),
        ):
            code, out, err = await _cli(data_dir, key, *args)
            counts["cli (server)"] += 1
            assert code == rc and "Traceback" not in out + err, (args, out, err)
            if first is not None:
                assert err.startswith(first) and len(err.strip().splitlines()) == 1, (args, err)
            else:
                assert "1 imported" in out and "[too_deep]" in out and "[number_too_large]" in out, out
                assert "errors by code: " in out and "too_deep 1" in out, out

        # 5. the last resort for a bug (not for bad input): INTERNAL with a reference, never UNKNOWN,
        # never the exception's text
        from tuneforge.notifier import service as notifier_service

        class Exploding:
            @staticmethod
            def of(*_args, **_kwargs):
                raise RuntimeError("secret internals")

        with monkeypatch.context() as patch:
            patch.setattr(notifier_service, "Page", Exploding)
            code, details = await _call(clients.notifier, nt.DESCRIPTOR.services_by_name["NotifierService"]
                                        .methods_by_name["ListDeliveries"], nt.ListDeliveriesRequest())
        assert code == SC.INTERNAL and details.startswith("internal error (ref ") and "secret" not in details

        # 6. every service still SERVING, and still working
        assert set((await _health(endpoints)).values()) == {health_pb2.HealthCheckResponse.SERVING}
        after = await _import(clients, good_line(999))
        assert after.imported == 1
        await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())
    finally:
        await clients.close()
        await admin.close()
    total = sum(counts.values())
    print(f"hostile corpus: {total} inputs — " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("gRPC status codes: " + ", ".join(f"{k} {v}" for k, v in codes.most_common()))
    assert not broken, f"{len(broken)} broke a service:\n" + "\n".join(broken[:40])
    assert not not_refused, f"{len(not_refused)} were not refused:\n" + "\n".join(not_refused[:40])
    assert total >= 200


# -- the CLI without a stack -------------------------------------------------------------------------
SET_KEYS = ["batch_size", "lora_rank", "max_epochs", "n_evals", "seed", "min_examples", "learning_rate",
            "lora_alpha", "lora_dropout", "warmup_ratio", "test_fraction", "train_on_inputs", "lora_target_modules"]
SET_VALUES = ["2.5", "abc", "1e999", "nan", "inf", "-1", "", " ", "0x10", "1_000", "１２", "9" * 30, "--", "=", "1e-400"]
INT_KEYS = {"batch_size", "lora_rank", "max_epochs", "n_evals", "seed", "min_examples"}


def run_cli(capsys, *argv: str, env: dict | None = None, monkeypatch=None) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("key", SET_KEYS)
def test_cli_set_values_are_one_line_errors(key, capsys, tmp_path):
    for value in SET_VALUES:
        code, out, err = run_cli(capsys, "--data-dir", str(tmp_path), "jobs", "create", "--name", "x",
                                 "--base-model", "llama-3.2-1b", "--set", f"{key}={value}")
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (key, value, err)
        if code == 2:
            assert lines[0].startswith(f"tuneforge: error: --set {key}="), lines
        else:  # a value the CLI accepts gets as far as looking for the stack
            assert code == 3 and "no tuneforge stack" in lines[0], (key, value, lines)  # exit 3: unavailable
            assert not (key in INT_KEYS and value.strip() in ("2.5", "abc", "1e999", "nan", "-1", "")), (key, value)


def test_cli_bad_arguments_are_one_line_errors(capsys, tmp_path):
    base = ("--data-dir", str(tmp_path))
    cases = [
        (("jobs", "create", "--name", "x", "--base-model", "m", "--set", "batch_size=2.5"), 2,
         "tuneforge: error: --set batch_size=2.5: batch_size must be an integer"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--set", "batch_size"), 2,
         "tuneforge: error: --set batch_size: expected KEY=VALUE"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--set", "=3"), 2, "tuneforge: error: --set =3"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--set", "bogus=1"), 2,
         "tuneforge: error: --set bogus=1: unknown hyperparameter 'bogus'"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--overlength", "sideways"), 2,
         "tuneforge: error: jobs create: argument --overlength: invalid choice"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--option", "beta"), 2,
         "tuneforge: error: --option beta: expected KEY=VALUE"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--option", "beta=NaN"), 2,
         "tuneforge: error: --option beta=NaN: the literal NaN"),
        (("jobs", "create", "--name", "x", "--base-model", "m", "--option", "beta=" + "[" * 5000), 2,
         "tuneforge: error: --option beta=[[["),
        (("jobs", "create", "--name", "x"), 2, "tuneforge: error: jobs create: the following arguments are required"),
        (("workspaces", "create", "--name", "a", "--plan", "gold", "--email", "a@b.c"), 2,
         "tuneforge: error: workspaces create: argument --plan: invalid choice"),
        (("datasets", "build", "--base-model", "m", "--seed", "abc"), 2,
         "tuneforge: error: datasets build: argument --seed: invalid int value"),
        (("datasets", "build", "--base-model", "m", "--train-on-inputs", "maybe"), 2,
         "tuneforge: error: datasets build: argument --train-on-inputs: invalid choice"),
        (("data", "import", str(tmp_path / "missing.jsonl")), 2, "tuneforge: error: "),
        (("data", "import", str(tmp_path)), 2, "tuneforge: error: "),
        (("bogus",), 2, "tuneforge: error: argument command: invalid choice"),
        (("jobs", "get", "job_1"), 3, "tuneforge: error: no tuneforge stack in "),  # exit 3: unavailable
        (("--api-key", "ключ", "jobs", "get", "job_1"), 2, "tuneforge: error: --api-key: an API key is printable"),
        (("--api-key", "a\nb", "models", "list"), 2, "tuneforge: error: --api-key: an API key is printable"),
        (("demo", "--set", "learning_rate=abc"), 2, "tuneforge: error: --set learning_rate=abc: learning_rate must be"),
    ]
    for args, rc, first in cases:
        code, out, err = run_cli(capsys, *base, *args)
        lines = err.strip().splitlines()
        assert (code, len(lines)) == (rc, 1) and lines[0].startswith(first), (args, code, err)
        assert "Traceback" not in out + err


def test_cli_unreachable_server_names_the_address(capsys, tmp_path):
    (tmp_path / "stack.json").write_text(json.dumps({"endpoints": {
        name: "127.0.0.1:9" for name in ("dataset-builder", "job-scheduler", "trainer", "model-registry", "notifier")}}))
    code, out, err = run_cli(capsys, "--data-dir", str(tmp_path), "--api-key", "tfk_x", "jobs", "get", "job_1")
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1 and lines[0].startswith("tuneforge: error: UNAVAILABLE: ") and "127.0.0.1:9" in lines[0]


def test_cli_unexpected_error_is_one_line_and_a_hint(capsys, tmp_path, monkeypatch):
    def explode(args):
        raise RuntimeError("something\nunexpected")

    from tuneforge.cli import jobs as cli_jobs

    monkeypatch.setattr(cli_jobs, "cmd_job_get", explode)
    monkeypatch.delenv("TUNEFORGE_DEBUG", raising=False)
    code, out, err = run_cli(capsys, "--data-dir", str(tmp_path), "jobs", "get", "job_1")
    assert code == 1 and err.strip().splitlines() == [
        "tuneforge: error: RuntimeError: something unexpected (run with TUNEFORGE_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("TUNEFORGE_DEBUG", "1")
    code, out, err = run_cli(capsys, "--data-dir", str(tmp_path), "jobs", "get", "job_1")
    assert code == 1 and "Traceback (most recent call last)" in err and "RuntimeError: something" in err


# -- artifact keys ------------------------------------------------------------------------------------
HOSTILE_KEYS = ["../x", "/etc/passwd", "a/../../b", "a/./b", "a\\b", "%2e%2e/x", "a/%2e%2e%2f", "a/\x00", "a/b\n",
                "C:/x", "~/x", ".hidden/x", "a//b", "", "a/", "x" * 2000, "a/b c", "a/..", "datasets/ws_1/\u2025"]


def test_artifact_keys_are_plain_segments(tmp_path):
    from tuneforge.core.storage import ArtifactStore, StorageKeyError, artifact_key

    store = ArtifactStore(str(tmp_path / "store"))
    for key in HOSTILE_KEYS:
        for operation in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.list(key),
                          lambda: store.delete_prefix(key), lambda: store.get_dir(key, tmp_path / "out")):
            with pytest.raises(StorageKeyError):
                operation()
    for segment in ("..", "a/b", "", ".x", "a\x00", "ws\n", "%2e%2e"):
        with pytest.raises(StorageKeyError):
            artifact_key("datasets", segment, "train.jsonl")
    key = artifact_key("datasets", "ws_0123", "ds_0abc")
    store.put_bytes(f"{key}/train.jsonl", b"ok")
    assert store.get_bytes(f"{key}/train.jsonl") == b"ok"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["store/datasets/ws_0123/ds_0abc/train.jsonl"]


PATH_LIKE = ["../x", "..", "/etc/passwd", "C:\\x", "%2e%2e%2f", "%2E%2E%5Cx", "a\\b", "a\x00", "~root", ".ssh",
             "a/b", "x\n", "%00"]


def test_path_like_names_and_ids_are_refused_by_every_check():
    from tuneforge.core import validation as val

    for value in [*PATH_LIKE, "c:x"]:
        assert val.is_path_like(value) or val.has_control(value), value
    for value in PATH_LIKE:
        for check in (val.name, val.identifier, val.model_ref, val.agent_id):
            v = val.Violations()
            assert not check(v, "f", value) and v, (check.__name__, value)
    ok = val.Violations()
    assert val.name(ok, "f", "my-model.v2") and val.identifier(ok, "f", "job_0a1b") and not ok
