"""gRPC server helpers: health, reflection, authentication, rich errors, graceful shutdown."""

from __future__ import annotations

import contextvars
import hmac
import logging
import uuid
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
_caller_is_admin: contextvars.ContextVar[bool] = contextvars.ContextVar("tuneforge_admin", default=False)

# Calls one server runs at once (see create_server); a service at this many is overloaded, and a
# quick RESOURCE_EXHAUSTED serves a client better than a queue that outlives its deadline.
MAX_CONCURRENT_RPCS = 2000

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_workspace() -> Workspace:
    """The authenticated caller's workspace (set by the auth interceptor)."""
    ws = _current_workspace.get()
    if ws is None:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "no workspace for this call")
    return ws


def caller_is_admin() -> bool:
    """True when the call carries the administrator token (set by the auth interceptor)."""
    return _caller_is_admin.get()


def _bearer(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            return value.removeprefix("Bearer ").strip()
    return ""


async def _abort_for(error: ServiceError, context: grpc.aio.ServicerContext) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Undecodable:
    """Stands in for a request whose bytes are not the RPC's message (grpc would answer INTERNAL)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(exc)

    return decode


def _undecodable_error() -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                        "the request could not be decoded as this RPC's message (malformed protobuf, or a "
                        "string field that is not UTF-8)")


async def _decoded(requests):
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _undecodable_error()
        yield request


async def _abort_unexpected(context: grpc.aio.ServicerContext) -> None:
    """The last resort for a bug: logged with a reference, answered INTERNAL (never UNKNOWN, never
    the exception's text). Requests are validated first; this is not how bad input is handled."""
    ref = uuid.uuid4().hex[:12]
    log.exception("unexpected error in an RPC handler (ref %s)", ref)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the service has logged it")


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with ServiceError mapped to a status; an undecodable request is INVALID_ARGUMENT,
    an unexpected exception INTERNAL. Built once per method: the caller's workspace (or
    administrator) is in context variables that the auth interceptor sets for each call (grpc.aio
    runs a call's interceptors and its handler in one task, so one context)."""
    streamed_requests = bool(handler.request_streaming)

    def checked(request):
        """The request as the handler takes it; an undecodable one is INVALID_ARGUMENT."""
        if streamed_requests:
            return _decoded(request)
        if request.__class__ is _Undecodable:
            raise _undecodable_error()
        return request

    def unary(fn: Callable):
        async def behaviour(request, context):
            try:
                return await fn(checked(request), context)
            except ServiceError as error:
                await _abort_for(error, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _abort_unexpected(context)

        return behaviour

    def streaming(fn: Callable):
        async def behaviour(request, context):
            try:
                async for item in fn(checked(request), context):
                    yield item
            except ServiceError as error:
                await _abort_for(error, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _abort_unexpected(context)

        return behaviour

    kwargs = dict(
        request_deserializer=_lenient(handler.request_deserializer),
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
        request_deserializer=_lenient(handler.request_deserializer),  # refused either way, never INTERNAL
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
    """Every RPC but health and reflection needs a workspace API key (or the admin token).

    * ``admin_methods``: the administrator token only; a valid workspace key is PERMISSION_DENIED.
    * ``admin_or_workspace_methods``: either; the handler sees ``caller_is_admin()`` or a workspace.
    * every other method: a workspace API key only.
    No credentials, or credentials that are neither (unknown, revoked), are UNAUTHENTICATED."""

    def __init__(self, directory: WorkspaceDirectory, admin_token: str | None, admin_methods: Iterable[str] = (),
                 admin_or_workspace_methods: Iterable[str] = ()):
        self.directory = directory
        self.admin_token = admin_token
        self.admin_methods = frozenset(admin_methods)
        self.admin_or_workspace_methods = frozenset(admin_or_workspace_methods)
        # method -> (its handler, the handler wrapped by _wrap); public methods are not here
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _is_admin_token(self, token: str) -> bool:
        return bool(self.admin_token and token and hmac.compare_digest(token.encode(), self.admin_token.encode()))

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            # First call of this method: find and wrap its handler once (the registered handlers
            # do not change once the server runs). An unknown method is not cached (any name).
            handler = await continuation(details)
            if handler is None or method.startswith(PUBLIC_PREFIXES):
                return handler
            wrapped = (handler, _wrap(handler))
            self._wrapped[method] = wrapped
        handler, wrapped_handler = wrapped
        token = _bearer(details)
        if not token:
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "missing API key (authorization: Bearer <key>)")
        if method in self.admin_methods or method in self.admin_or_workspace_methods:
            if self._is_admin_token(token):
                _current_workspace.set(None)
                _caller_is_admin.set(True)
                return wrapped_handler
        try:
            workspace = await self.directory.authenticate(token)
        except Exception:  # the directory's database is unreachable or locked: retryable, never UNKNOWN
            log.exception("authentication failed for %s", details.method)
            return _rejecting(handler, grpc.StatusCode.UNAVAILABLE, "authentication is unavailable; retry")
        if workspace is None:
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
        if method in self.admin_methods:
            return _rejecting(handler, grpc.StatusCode.PERMISSION_DENIED, "administrator token required")
        _current_workspace.set(workspace)
        _caller_is_admin.set(False)
        return wrapped_handler


async def create_server(
    *,
    host: str,
    port: int,
    services: Sequence[tuple[Callable, object, str]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = 8 * 1024 * 1024,
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a grpc.aio server with the given ``(add_fn, servicer, full_service_name)`` entries,
    health checking and reflection; bind ``host:port`` (0 = any free port) and start it.
    Returns the server, the bound port and the health servicer (set NOT_SERVING on shutdown).

    At most ``max_concurrent_rpcs`` calls (streams included) run at once; beyond that grpc answers
    RESOURCE_EXHAUSTED at once instead of queueing without bound. ``grpc.so_reuseport`` (on by
    default on Linux, set explicitly here) lets several replicas of a service bind one port."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
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
