"""``tuneforge workspaces ...``: workspaces and their API keys.

``create`` (and ``keys ... --workspace``) take the administrator token; the rest the workspace's
own API key. Every command takes ``--json``; errors and exit codes come from :func:`common.run`.
"""

from __future__ import annotations

from tuneforge.cli.common import _admin_token, _clients, _endpoints, add_json, print_json, run, table, timestamp_text, wants_json


def _plan_name(plan: int) -> str:
    from tuneforge.api.common.v1 import common_pb2

    return common_pb2.Plan.Name(plan).removeprefix("PLAN_").lower()


def cmd_workspace_create(args) -> int:
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
    from tuneforge.core.client import Clients

    async def work():
        endpoints = _endpoints(args)  # no stack: exit code 3 before the token is looked for
        async with Clients.connect(endpoints, _admin_token(args)) as clients:
            reply = await clients.job_scheduler.CreateWorkspace(js.CreateWorkspaceRequest(
                name=args.name, plan=common_pb2.Plan.Value(f"PLAN_{args.plan.upper()}"), owner_email=args.email))
        if wants_json(args):
            print_json(reply)
        else:
            print(f"workspace {reply.workspace.id} ({args.plan})\nAPI key (shown once): {reply.api_key}")
        return 0

    return run(args, work())


def cmd_workspace_get(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _clients(args) as clients:
            reply = await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())
        if wants_json(args):
            print_json(reply)
            return 0
        w = reply.workspace
        print(f"workspace {w.id}\n  name   {w.name}\n  plan   {_plan_name(w.plan)}\n  owner  {w.owner_email}")
        return 0

    return run(args, work())


def _key_clients(args):
    """``--workspace``: the administrator token ($TUNEFORGE_ADMIN_TOKEN or the data directory's
    admin_token file); without it: the workspace's own API key (--api-key / $TUNEFORGE_API_KEY)."""
    if not args.workspace:
        return _clients(args)
    endpoints = _endpoints(args)  # no stack: exit code 3 before the token is looked for
    from tuneforge.core.client import Clients

    return Clients.connect(endpoints, _admin_token(args))


def cmd_keys_create(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.CreateApiKey(
                js.CreateApiKeyRequest(workspace_id=args.workspace or "", label=args.label or ""))
        if wants_json(args):
            print_json(reply)
        else:
            print(f"API key {reply.key.id} ({reply.key.prefix})\nAPI key (shown once): {reply.api_key}")
        return 0

    return run(args, work())


def cmd_keys_list(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.ListApiKeys(js.ListApiKeysRequest(workspace_id=args.workspace or ""))
        if wants_json(args):
            print_json(reply)
            return 0
        print(table([(k.id, k.prefix or "(unknown)", timestamp_text(k.create_time), k.label) for k in reply.keys],
                    ("ID", "PREFIX", "CREATED (UTC)", "LABEL"), empty="(no keys)"))
        return 0

    return run(args, work())


def cmd_keys_revoke(args) -> int:
    from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js

    async def work():
        async with _key_clients(args) as clients:
            reply = await clients.job_scheduler.RevokeApiKey(
                js.RevokeApiKeyRequest(workspace_id=args.workspace or "", key_id=args.key))
        if wants_json(args):
            print_json(reply)
        else:
            print(f"revoked {reply.key.id} ({reply.key.prefix or 'no prefix'}): every service refuses it within seconds")
        return 0

    return run(args, work())


def register(sub) -> None:
    ws = sub.add_parser("workspaces", help="workspaces and their API keys").add_subparsers(dest="sub", required=True)
    p = ws.add_parser("create", help="create a workspace and its first API key (administrator token)")
    p.add_argument("--name", required=True)
    p.add_argument("--plan", required=True, choices=["starter", "pro", "business", "enterprise"])
    p.add_argument("--email", required=True, help="owner's email")
    p.set_defaults(fn=cmd_workspace_create)
    add_json(p)
    p = ws.add_parser("get", help="the API key's workspace: id, name, plan, owner")
    p.set_defaults(fn=cmd_workspace_get)
    add_json(p)
    keys = ws.add_parser("keys", help="API keys: the workspace's own (--api-key), or any workspace's with "
                         "--workspace and the administrator token").add_subparsers(dest="keys_sub", required=True)
    workspace_help = "workspace id: manage its keys with the administrator token (default: the --api-key's own)"
    p = keys.add_parser("create", help="create an API key (shown once)")
    p.add_argument("--workspace", help=workspace_help)
    p.add_argument("--label", help="what the key is for, e.g. ci (at most 100 characters)")
    p.set_defaults(fn=cmd_keys_create)
    p = keys.add_parser("list", help="active API keys: id, prefix, creation time, label (never the secret)")
    p.add_argument("--workspace", help=workspace_help)
    p.set_defaults(fn=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke an API key on every service (not the workspace's last one)")
    p.add_argument("key", help="key id (key_...) or prefix (tfk_ and 8 characters)")
    p.add_argument("--workspace", help=workspace_help)
    p.set_defaults(fn=cmd_keys_revoke)
    for parser in keys.choices.values():
        add_json(parser)
