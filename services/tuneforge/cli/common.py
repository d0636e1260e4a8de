"""What every ``tuneforge`` command shares: the data directory and connection, ``--json``
output, aligned tables with pagination, one-line errors and the exit codes.

Exit codes (documented in the README and ``tuneforge --help``):

====  =====================================================================================
0     done
1     the request was refused or failed: a bad value the server judged, not found, the plan
      does not include it, a job that ended FAILED/CANCELLED (``jobs watch``), ...
2     usage: a bad command line (unknown option, a value of the wrong type or out of range)
3     the server is unavailable: no stack running (no stack file), connection refused, a
      deadline that passed, a service answering UNAVAILABLE
====  =====================================================================================

With ``--json`` a command prints exactly one JSON document on stdout and nothing else there (an
error is ``{"error": {"code": ..., "message": ..., "field_violations": [...]}}``); what a person
reads (progress, hints) goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_CODES_HELP = ("exit codes: 0 ok; 1 refused or failed (bad value, not found, plan, job failed); "
                   "2 usage (bad command line); 3 server unavailable (no stack, connection refused, deadline)")
DEBUG_HINT = "run with TUNEFORGE_DEBUG=1 for the traceback"


class UsageError(Exception):
    """A bad command-line value: printed as one line (``tuneforge: error: ...``), exit code 2."""


class Unavailable(Exception):
    """No server to talk to (no stack file, nothing listening): exit code 3."""


class Failed(Exception):
    """The command ran but its outcome is a failure (an import that could not be done, a model
    that could not be loaded): exit code 1."""


def _data_dir(args) -> Path:
    return Path(getattr(args, "data_dir", None) or os.environ.get("TUNEFORGE_DATA_DIR", ".tuneforge")).resolve()


def wants_json(args) -> bool:
    return bool(getattr(args, "json", False))


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json`` on a subcommand (also accepted before the command: ``tuneforge --json jobs list``)."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout and nothing else")


def add_paging(parser: argparse.ArgumentParser, default: int = 20) -> None:
    parser.add_argument("--limit", type=int, default=default, metavar="N",
                        help=f"rows per page (default {default}, at most 200)")
    parser.add_argument("--page-token", default="", metavar="TOKEN", help="the page after a previous one's token")
    parser.add_argument("--all", action="store_true", help="every page")


def message_dict(message) -> dict:
    """A protobuf message as the JSON output's dict: proto field names, every field shown."""
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(document) -> None:
    """The one JSON document of a ``--json`` command (a message or plain data)."""
    if hasattr(document, "DESCRIPTOR"):
        document = message_dict(document)
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A line for the person (hints, progress): stderr, so stdout stays the command's output."""
    print(text, file=sys.stderr, flush=True)


def table(rows: Iterable[Sequence[object]], headers: Sequence[str], *, empty: str = "(none)") -> str:
    """Rows as aligned columns under upper-case headers; the last column is not padded."""
    rows = [[("-" if cell is None or cell == "" else str(cell)) for cell in row] for row in rows]
    if not rows:
        return empty
    all_rows = [[h.upper() for h in headers], *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + ("  " if widths else "") + r[-1]).rstrip()
                     for r in all_rows)


async def pages(fetch: Callable, args, items: str):
    """Items of a paged List RPC as the command asked: one page (``--limit``, ``--page-token``) or
    ``--all``. ``fetch(page_size, page_token)`` awaits a response with ``items`` and
    ``next_page_token``. Returns (items, next_page_token)."""
    if not 1 <= args.limit <= 200:
        raise UsageError("--limit must be 1 to 200")
    out, token = [], args.page_token
    while True:
        reply = await fetch(args.limit, token)
        out.extend(getattr(reply, items))
        token = reply.next_page_token
        if not args.all or not token:
            return out, token


def next_page_command(args, command: str, **filters: str | bool | None) -> str:
    """The command line that shows the next page: the same filters (a page token is only valid
    with them) and the same ``--limit``."""
    import shlex

    for name, value in filters.items():
        if value is True:
            command += f" --{name.replace('_', '-')}"
        elif value:
            command += f" --{name.replace('_', '-')} {shlex.quote(str(value))}"
    return command + (f" --limit {args.limit}" if args.limit != 20 else "")


def downloaded_files(out_dir: Path, paths: list[Path]) -> list[dict]:
    """The files a download wrote: path (relative to ``out_dir``), size and SHA-256 of what is on
    disk, so a script can compare them with the registry's (``models get --json``'s files)."""
    files = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        files.append({"path": path.relative_to(out_dir).as_posix(), "size_bytes": path.stat().st_size,
                      "sha256": digest.hexdigest()})
    return files


def print_downloaded(args, what: dict, out_dir: Path, files: list[dict]) -> None:
    """A download's outcome: the JSON document, or the files as a table and a total."""
    if wants_json(args):
        print_json({**what, "dir": str(out_dir), "files": files})
        return
    print(table([(f["path"], _size(f["size_bytes"]), f["sha256"][:12]) for f in files], ("PATH", "SIZE", "SHA256")))
    print(f"{len(files)} files, {_size(sum(f['size_bytes'] for f in files))}, in {out_dir}")


def print_page_hint(token: str, command: str) -> None:
    if token:
        note(f"more: {command} --page-token {token}   (or --all)")


def timestamp_text(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def state_name(state: int) -> str:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    return js.JobState.Name(state).removeprefix("JOB_STATE_")


def _api_key(args) -> str:
    key = getattr(args, "api_key", None) or os.environ.get("TUNEFORGE_API_KEY")
    if not key:
        raise UsageError("no API key: pass --api-key or set TUNEFORGE_API_KEY")
    return key


def _endpoints(args) -> dict[str, str]:
    from tuneforge.stack import read_stack_file

    try:
        return read_stack_file(_data_dir(args))["endpoints"]
    except FileNotFoundError:
        raise Unavailable(f"no tuneforge stack in {_data_dir(args)}: start one with `tuneforge up` "
                          "(or pass --data-dir)") from None


def _clients(args, token: str | None = None):
    """The typed client (:class:`tuneforge.client.AsyncClient`) on the stack's endpoints with the
    API key (or ``token``): a deadline on every call, reads retried while a service restarts,
    typed errors."""
    from tuneforge.client import AsyncClient

    return AsyncClient(_endpoints(args), api_key=token or _api_key(args))


def _admin_token(args) -> str:
    token = os.environ.get("TUNEFORGE_ADMIN_TOKEN", "")
    path = _data_dir(args) / "admin_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise UsageError(f"this needs the administrator token ($TUNEFORGE_ADMIN_TOKEN or {path})")
    return token


UNAVAILABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def rpc_error(exc: BaseException):
    """A failed call as the typed client's error (:class:`tuneforge.client.TuneforgeError`), also
    for a raw gRPC error; None for anything else."""
    import grpc

    from tuneforge.client import TuneforgeError, from_rpc_error

    if isinstance(exc, TuneforgeError):
        return exc
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return from_rpc_error(exc)
    return None


def error_document(exc: BaseException) -> dict:
    """An error as the ``--json`` output's document."""
    error = rpc_error(exc)
    if error is not None:
        doc = {"code": error.code.name, "message": " ".join(error.message.split())}
        if error.reason:
            doc["reason"] = error.reason
        if error.field_violations:
            doc["field_violations"] = [{"field": f, "description": d} for f, d in error.field_violations]
        return {"error": doc}
    kind = {UsageError: "USAGE", Unavailable: "UNAVAILABLE"}.get(type(exc), "FAILED")
    return {"error": {"code": kind, "message": " ".join(str(exc).split())}}


def exit_code(exc: BaseException) -> int:
    error = rpc_error(exc)
    if error is not None:
        return EXIT_UNAVAILABLE if error.code.name in UNAVAILABLE_CODES else EXIT_USER_ERROR
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_USER_ERROR


def rpc_error_line(exc) -> str:
    """A failed call as one line: status code, the server's message, field violations it lacks."""
    error = rpc_error(exc)
    line = " ".join(error.message.split())
    extra = [f"{f}: {d}" for f, d in error.field_violations if f"{f}: {d}" not in line]
    text = f"{error.code.name}: {line}" + ("; " + "; ".join(extra) if extra else "")
    if error.code.name == "UNAVAILABLE":
        text += " (is the stack running? `tuneforge up`)"
    return text


def run(args, coro) -> int:
    """Run a command's coroutine; errors become one line on stderr (and the error document on
    stdout with --json) and the documented exit code. The coroutine returns the exit code."""
    import grpc

    from tuneforge.client import TuneforgeError

    try:
        return asyncio.run(coro)
    except (TuneforgeError, grpc.RpcError, Unavailable, Failed) as exc:
        if wants_json(args):
            print_json(error_document(exc))
        if rpc_error(exc) is not None:
            print(f"tuneforge: error: {rpc_error_line(exc)}", file=sys.stderr)
        else:
            print(f"tuneforge: {'error: ' if not isinstance(exc, Failed) else ''}{exc}", file=sys.stderr)
        return exit_code(exc)


def _set_value(key: str, value: str, kind: type):
    """One ``--set`` value as ``kind`` (int or float), checked against the hyperparameter's range."""
    from tuneforge.core.hyperparameters import PARAMS_BY_NAME

    text = value.strip()
    if kind is int:
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", text):
            raise UsageError(f"{key} must be an integer")
        number: int | float = int(text)
    else:
        try:
            number = float(text)
        except ValueError:
            raise UsageError(f"{key} must be a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UsageError(f"{key} must be a finite number")
    param = PARAMS_BY_NAME.get(key)
    if param is not None:
        low_ok = number >= param.low if param.low_inclusive else number > param.low
        high_ok = number <= param.high if param.high_inclusive else number < param.high
        if not (low_ok and high_ok):
            raise UsageError(f"{key} must be in {param.range_text()}")
    return number

def _parse_sets(pairs: list[str]):
    """``--set KEY=VALUE`` pairs → common.v1.Hyperparameters; a bad pair is a UsageError naming it."""
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.core.hyperparameters import TRAIN_ON_INPUTS_CHOICES

    hp = common_pb2.Hyperparameters()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        try:
            if not sep or not key:
                raise UsageError("expected KEY=VALUE")
            if not value.strip():
                raise UsageError(f"{key} needs a value")
            if key == "lora_target_modules":
                modules = [v.strip() for v in value.split(",") if v.strip()]
                if not modules:
                    raise UsageError("lora_target_modules is a comma-separated list, e.g. q_proj,v_proj")
                hp.lora_target_modules.extend(modules)
                continue
            field = hp.DESCRIPTOR.fields_by_name.get(key)
            if field is None:
                known = ", ".join(sorted(hp.DESCRIPTOR.fields_by_name))
                raise UsageError(f"unknown hyperparameter {key[:40]!r}; known: {known}")
            if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
                setattr(hp, key, _set_value(key, value, float))
            elif field.type == field.TYPE_STRING:
                if value.strip().lower() not in TRAIN_ON_INPUTS_CHOICES:
                    raise UsageError(f"{key} must be one of {', '.join(TRAIN_ON_INPUTS_CHOICES)}")
                setattr(hp, key, value.strip().lower())
            else:
                setattr(hp, key, _set_value(key, value, int))
        except UsageError as exc:
            raise UsageError(f"--set {_shown(pair)}: {exc}") from None
    return hp

def _shown(value: str, limit: int = 60) -> str:
    """A command-line value as echoed in an error: one line, shortened."""
    value = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    return value if len(value) <= limit else value[: limit - 1] + "…"

def _parse_options(pairs: list[str]) -> str:
    """``--option beta=0.2`` → the method options as a JSON object (values read as JSON where
    they parse: numbers, true/false, null; otherwise as strings). The method validates them."""
    from tuneforge.core.validation import JsonProblem, loads_bounded

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {_shown(pair)}: expected KEY=VALUE")
        try:
            options[key.strip()] = loads_bounded(value)
        except JsonProblem as exc:  # NaN, 1e999, nesting past 64 levels
            raise UsageError(f"--option {_shown(pair)}: {exc}") from None
        except ValueError:
            options[key.strip()] = value
    return json.dumps(options) if options else ""

def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

def _size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

def _human_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

def _progress(line: str) -> None:
    print(line, flush=True)

def _model_store(args) -> Path:
    from tuneforge.core.settings import get_settings

    return Path(args.store).resolve() if args.store else get_settings().resolved_model_store()

def _error_line(exc: BaseException) -> str:
    """An exception as one line: an RPC error as its status code and the server's message; a
    missing file or an OS error as its own message; anything else with its type."""
    error = rpc_error(exc)
    if error is not None:
        return f"{error.code.name}: {' '.join(error.message.split())}"
    if isinstance(exc, OSError):
        return " ".join(str(exc).split())
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
