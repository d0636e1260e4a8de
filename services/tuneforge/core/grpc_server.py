"""gRPC server helpers: health, reflection, authentication, rich errors, graceful shutdown."""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tuneforge.core.errors import ServiceError
from tuneforge.core.workspaces import Workspace, WorkspaceDirectory

log = logging.getLogger(__name__)

_current_workspace: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar(
    "tuneforge_workspace", default=None
)

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_workspace() -> Workspace:
    """The authenticated caller's workspace (set by the auth interceptor)."""
    ws = _current_workspace.get()
    if ws is None:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "no workspace for this call")
    return ws


def _bearer(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            return value.removeprefix("Bearer ").strip()
    return ""


async def _abort_for(error: ServiceError, context: grpc.aio.ServicerContext) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def _wrap(handler: grpc.RpcMethodHandler, workspace: Workspace | None) -> grpc.RpcMethodHandler:
    """Run the handler with the caller's workspace set and ServiceError mapped to a status."""

    def unary(fn: Callable):
        async def behaviour(request, context):
            _current_workspace.set(workspace)
            try:
                return await fn(request, context)
            except ServiceError as error:
                await _abort_for(error, context)

        return behaviour

    def streaming(fn: Callable):
        async def behaviour(request, context):
            _current_workspace.set(workspace)
            try:
                async for item in fn(request, context):
                    yield item
            except ServiceError as error:
                await _abort_for(error, context)

        return behaviour

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)


def _rejecting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def reject(request, context):
        await context.abort(code, message)

    async def reject_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health and reflection needs a workspace API key (or the admin token)."""

    def __init__(self, directory: WorkspaceDirectory, admin_token: str | None, admin_methods: Iterable[str] = ()):
        self.directory = directory
        self.admin_token = admin_token
        self.admin_methods = frozenset(admin_methods)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        token = _bearer(details)
        if details.method in self.admin_methods:
            if self.admin_token and token and hmac.compare_digest(token, self.admin_token):
                return _wrap(handler, None)
            return _rejecting(handler, grpc.StatusCode.PERMISSION_DENIED, "administrator token required")
        if not token:
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "missing API key (authorization: Bearer <key>)")
        workspace = await self.directory.authenticate(token)
        if workspace is None:
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
        return _wrap(handler, workspace)


async def create_server(
    *,
    host: str,
    port: int,
    services: Sequence[tuple[Callable, object, str]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = 8 * 1024 * 1024,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a grpc.aio server with the given ``(add_fn, servicer, full_service_name)`` entries,
    health checking and reflection; bind ``host:port`` (0 = any free port) and start it.
    Returns the server, the bound port and the health servicer (set NOT_SERVING on shutdown)."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add_fn, servicer, name in services:
        add_fn(servicer, server)
        names.append(name)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def stop_server(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, grace: float) -> None:
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)
