"""The auth interceptor caches each method's wrapped handler and hands the caller's workspace to
the handler through context variables: concurrent calls of different workspaces, interleaved at
every await, must each see their own."""

from __future__ import annotations

import asyncio
import random

import grpc

from tuneforge.core.grpc_server import AuthInterceptor, caller_is_admin, current_workspace
from tuneforge.core.workspaces import Workspace


class _Directory:
    def __init__(self, keys: dict[str, Workspace]):
        self.keys = keys

    async def authenticate(self, token: str) -> Workspace | None:
        await asyncio.sleep(random.random() / 1000)  # interleave look-ups
        return self.keys.get(token)


async def test_concurrent_calls_each_see_their_own_workspace():
    keys = {f"tfk_{i}": Workspace(id=f"ws_{i}", name=f"w{i}", plan=1, owner_email="a@b.cd") for i in range(5)}

    async def who(request, context):
        first = current_workspace().id
        await asyncio.sleep(random.random() / 500)  # other calls run in between
        assert current_workspace().id == first and not caller_is_admin()
        return first.encode()

    async def admin_who(request, context):
        await asyncio.sleep(random.random() / 500)
        return b"admin" if caller_is_admin() else current_workspace().id.encode()

    server = grpc.aio.server(interceptors=[AuthInterceptor(_Directory(keys), "admin-token",
                                                           admin_or_workspace_methods=["/t.T/AdminWho"])])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "AdminWho": grpc.unary_unary_rpc_method_handler(admin_who),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call_who, call_admin = channel.unary_unary("/t.T/Who"), channel.unary_unary("/t.T/AdminWho")
            plan = [(random.choice([*keys, "admin-token"]), random.random() < 0.5) for _ in range(300)]

            async def one(token: str, admin_method: bool):
                method = call_admin if admin_method else call_who
                try:
                    return await method(b"", metadata=(("authorization", f"Bearer {token}"),))
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            answers = await asyncio.gather(*(one(t, a) for t, a in plan))
        for (token, admin_method), answer in zip(plan, answers):
            if token == "admin-token":
                assert answer == (b"admin" if admin_method else grpc.StatusCode.UNAUTHENTICATED)
            else:
                assert answer == keys[token].id.encode()
    finally:
        await server.stop(None)
