"""Shared fixtures: real servers on free ports (nats-server with JetStream, an SMTP sink)."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    import tuneforge  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path[:0] = [str(REPO_ROOT / "services"), str(REPO_ROOT / "plugins")]

from tuneforge.core.nats_server import NatsServerProcess, free_port  # noqa: E402


# --- NATS -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    """One JetStream-enabled nats-server for the whole session; connect with `nats_server.url`.

    Shared, so tests must use their own stream and subject names (or clean up after themselves).
    """
    base = tmp_path_factory.mktemp("nats")
    server = NatsServerProcess(base / "store", log_file=base / "nats-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- SMTP -------------------------------------------------------------------------------------

@dataclasses.dataclass
class SmtpSink:
    """A running SMTP server that accepts every message and keeps it."""

    host: str
    port: int
    messages: list[EmailMessage] = dataclasses.field(default_factory=list)
    envelopes: list[object] = dataclasses.field(default_factory=list)  # aiosmtpd Envelope: mail_from, rcpt_tos


class _CollectingHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's hook name)
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        self._sink.envelopes.append(envelope)
        self._sink.messages.append(email.message_from_bytes(raw, policy=email.policy.default))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[SmtpSink]:
    """An aiosmtpd server on 127.0.0.1 and a free port; received mail lands in `.messages`."""
    from aiosmtpd.controller import Controller

    host = "127.0.0.1"
    sink = SmtpSink(host=host, port=free_port(host))
    controller = Controller(_CollectingHandler(sink), hostname=host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


# --- the five services in-process (real NATS, real gRPC on loopback, SQLite) ---------------------

ADMIN = "tfadm_test-admin-token"


class WorkMsg:
    """A work item as the trainer worker's ``handle`` receives it from JetStream: the payload, the
    delivery count, and the acknowledgements it makes (counted); ``term`` must not happen."""

    def __init__(self, request, delivered: int = 1):
        import types

        self.data = request.SerializeToString()
        self.metadata = types.SimpleNamespace(num_delivered=delivered)
        self.acks = 0

    async def ack(self):
        self.acks += 1

    async def in_progress(self):
        pass

    async def term(self):
        raise AssertionError("terminated")


class ServicesHandle(tuple):
    """``(endpoints, settings)``, plus ``.apps``: the service objects by name (for fault injection)."""

    apps: dict


@pytest.fixture
async def services(tmp_path):
    """The five services in this event loop with their own nats-server; yields (endpoints, settings)."""
    from tuneforge.core.settings import SERVICES, Settings
    from tuneforge.stack import load_service_class

    nats = NatsServerProcess(tmp_path / "nats").start()
    settings = Settings(data_dir=tmp_path / "state", nats_url=nats.url, admin_token=ADMIN,
                        **{f"{s.replace('-', '_')}_port": 0 for s in SERVICES})
    started = []
    endpoints = {}
    try:
        for name in SERVICES:
            service = load_service_class(name)(settings)
            port = await service.start(port=0)
            started.append(service)
            endpoints[name] = f"127.0.0.1:{port}"
            # the bound port, as a deployment configures it: the job-scheduler asks the
            # dataset-builder (started before it) at settings.dataset_builder_port
            setattr(settings, f"{name.replace('-', '_')}_port", port)
        handle = ServicesHandle((endpoints, settings))
        handle.apps = {s.name: s for s in started}
        yield handle
    finally:
        for service in reversed(started):
            await service.stop(grace=0.5)
        nats.stop()


async def workspace(endpoints, plan=None, email="owner@example.com"):
    """A new workspace (Enterprise unless ``plan``) and clients authenticated with its API key."""
    from tuneforge import sdk
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.core.client import Clients
    from tuneforge.quickstart import create_workspace

    plan = common_pb2.PLAN_ENTERPRISE if plan is None else plan
    reply = await create_workspace(endpoints, ADMIN, plan, email, "W")
    clients = Clients.connect(endpoints, reply.api_key)
    await sdk.wait_until_authorised(clients)
    return clients




# --- torch ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    barriers stall on descheduled threads: measured 63 s for test_sft_training.py with 2 threads
    beside another training process, 21 s with 1. Training test modules use it for every test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
