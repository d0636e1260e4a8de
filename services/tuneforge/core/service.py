"""The scaffold every service shares: its database, the bus, the workspace directory and a gRPC
server; ``run_service`` runs one until SIGTERM/SIGINT and shuts it down gracefully."""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence

import grpc

from tuneforge.core import subjects, telemetry
from tuneforge.core.bus import Bus, RedeliveryPolicy
from tuneforge.core.db import Database
from tuneforge.core.outbox import Outbox
from tuneforge.core.grpc_server import AuthInterceptor, create_server, stop_server
from tuneforge.core.settings import Settings, service_key
from tuneforge.core.workspaces import WorkspaceDirectory

log = logging.getLogger(__name__)


class BaseService(abc.ABC):
    """Composes the shared parts; a service fills in its servicers and consumers (its tables come
    from its migration history, core/migrations.py, applied at start)."""

    name: str = ""
    admin_methods: Sequence[str] = ()
    admin_or_workspace_methods: Sequence[str] = ()  # the administrator token or a workspace key

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings.database_url(self.name))
        self.directory = WorkspaceDirectory(self.db)
        self.bus: Bus | None = None
        self.outbox: Outbox | None = None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._health = None
        self._tasks: list[asyncio.Task] = []

    # -- hooks -------------------------------------------------------------------------------
    @abc.abstractmethod
    def grpc_services(self) -> list[tuple[Callable, object, str]]:
        """``(add_XServicer_to_server, servicer, full service name)`` entries."""

    async def on_start(self) -> None:
        """Start consumers and background work (the bus is connected)."""

    async def on_stop(self) -> None:
        """Stop background work."""

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, port: int | None = None) -> int:
        if telemetry.current_service() != self.name:
            # Start in a context naming this service: its server's RPCs, its consumers and its
            # background tasks inherit it (which tracer, which service in the logs).
            return await asyncio.create_task(self.start(port), context=telemetry.service_context(self.name))
        telemetry.setup_tracing(self.name, self.settings.otel_exporter)
        # The schema: this service's migrations (the shared tables and its own), under a lock.
        await self.db.migrate(self.name)
        self.bus = await Bus.connect(
            self.settings.nats_url, self.name, redelivery=RedeliveryPolicy.from_settings(self.settings),
            stream_replicas=self.settings.nats_stream_replicas,
        )
        self.outbox = Outbox(self.db, self.bus)
        self.spawn(self.outbox.relay(), f"{self.name}-outbox")
        await self.bus.consume(
            f"{service_key(self.name)}-workspaces",
            [subjects.WORKSPACE_UPDATED],
            lambda _s, update, _m: self.directory.apply(update),
        )
        await self.on_start()
        interceptor = AuthInterceptor(self.directory, self.settings.admin_token, self.admin_methods,
                                      self.admin_or_workspace_methods)
        self.server, self.port, self._health = await create_server(
            host=self.settings.host,
            port=self.settings.port(self.name) if port is None else port,
            services=self.grpc_services(),
            interceptors=[*telemetry.server_interceptors(self.name), interceptor],
            max_message_bytes=self.settings.max_message_bytes,
        )
        log.info("%s serving on %s:%s", self.name, self.settings.host, self.port)
        return self.port

    async def emit(self, subject: str, message) -> None:
        """Publish an event through the outbox (in its own transaction)."""
        async with self.db.session() as session, session.begin():
            self.outbox.add(session, subject, message)
        self.outbox.notify()

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            await stop_server(self.server, self._health, grace)
        await self.on_stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.bus is not None:
            await self.bus.close()
        await self.db.close()
        telemetry.shutdown_tracing(self.name)


def configure_logging(level: str, log_format: str = "text", service: str = "") -> None:
    """Root logging to stderr: the classic text lines, or (``log_format="json"``) one JSON object
    per line with the service, job and workspace ids and the trace (``telemetry.JsonFormatter``)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        handlers=[telemetry.log_handler(log_format, service)],
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # tuneforge logs what a migration applied


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (less CPU per RPC: grpc.aio's completions, tasks
    and callbacks all go through the loop), else None (asyncio's own). ``TUNEFORGE_UVLOOP=0``
    turns it off."""
    if os.environ.get("TUNEFORGE_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve_forever(service: BaseService, grace: float = 5.0) -> None:
    """Run ``service`` (see :func:`run_service`) on a fresh event loop (uvloop where installed)."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run_service(service, grace))


async def run_service(service: BaseService, grace: float = 5.0) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    log.info("%s stopping", service.name)
    await service.stop(grace)
