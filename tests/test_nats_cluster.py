"""tuneforge on a 3-node NATS cluster (deploy/compose.yaml's cluster profile, the NATS Helm chart):
streams with ``TUNEFORGE_NATS_STREAM_REPLICAS=3`` keep every event through the loss of the node
that leads them. Three real nats-server processes, clustered over loopback routes."""

from __future__ import annotations

import asyncio
import time

import pytest

from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import subjects
from tuneforge.core.bus import Bus
from tuneforge.core.nats_server import NatsServerProcess, free_port
from tuneforge.core.settings import Settings


def start_cluster(root) -> list[NatsServerProcess]:
    cluster_ports = [free_port() for _ in range(3)]
    nodes = []
    for i, port in enumerate(cluster_ports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i)
        nodes.append(NatsServerProcess(root / f"n{i}", extra_args=[
            "--server_name", f"n{i}", "--cluster_name", "tuneforge",
            "--cluster", f"nats://127.0.0.1:{port}", "--routes", routes,
        ]))
    for node in nodes:
        node.start(timeout=20)
    return nodes


async def connect_when_ready(url: str, replicas: int, timeout: float = 45.0) -> Bus:
    """The cluster elects its JetStream meta leader a few seconds after the nodes start; until then
    stream creation is refused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Bus.connect(url, "cluster-test", stream_replicas=replicas)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def seen(bus: Bus, i: int) -> ev.TrainerWorkerSeen:
    return ev.TrainerWorkerSeen(meta=bus.meta("ws"), worker_id=f"w{i}", device_class="cpu", device_count=1)


async def publish_with_retry(bus: Bus, message, timeout: float = 30.0) -> None:
    """A publish during the stream's leader election times out or finds no responders: the
    producer retries with the same Nats-Msg-Id (what the outbox relay does), and JetStream
    deduplicates a publish that did land."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.publish(subjects.TRAINER_WORKER_SEEN, message, timeout=2.0)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def test_stream_replicas_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "3")
    assert Settings().nats_stream_replicas == 3
    monkeypatch.setenv("TUNEFORGE_NATS_STREAM_REPLICAS", "0")
    with pytest.raises(ValueError):
        Settings()


async def test_three_replicas_on_a_single_server_is_a_clear_error(tmp_path):
    nats = NatsServerProcess(tmp_path / "nats").start()
    try:
        with pytest.raises(RuntimeError, match="TUNEFORGE_NATS_STREAM_REPLICAS must not exceed"):
            await Bus.connect(nats.url, "test", stream_replicas=3)
    finally:
        nats.stop()


async def test_events_survive_the_loss_of_the_stream_leader(tmp_path):
    nodes = start_cluster(tmp_path)
    url = ",".join(n.url for n in nodes)
    buses: list[Bus] = []
    try:
        bus = await connect_when_ready(url, replicas=3)
        buses.append(bus)
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.config.num_replicas == 3
        for name in (subjects.EVENTS_STREAM, subjects.WORK_STREAM):
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2, name

        got: list[str] = []
        done = asyncio.Event()

        async def handler(_subject, message, _msg):
            got.append(message.worker_id)
            if len(got) >= 40:
                done.set()

        consumer_bus = await connect_when_ready(url, replicas=3)
        buses.append(consumer_bus)
        await consumer_bus.consume("cluster-test-reader", [subjects.TRAINER_WORKER_SEEN], handler)

        first = [seen(bus, i) for i in range(20)]
        for message in first:
            await publish_with_retry(bus, message)

        leader = (await bus.js.stream_info(subjects.EVENTS_STREAM)).cluster.leader
        victim = next(n for i, n in enumerate(nodes) if f"n{i}" == leader)
        victim.stop()  # the node that leads the events stream goes away

        for i in range(20, 40):
            await publish_with_retry(bus, seen(bus, i))
        # A publish retried after a lost acknowledgement is deduplicated, never stored twice.
        await publish_with_retry(bus, first[0])

        await asyncio.wait_for(done.wait(), timeout=60)
        await asyncio.sleep(1.0)  # a duplicate, had there been one, would arrive now
        assert sorted(got, key=lambda w: int(w[1:])) == [f"w{i}" for i in range(40)]
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.state.messages == 40
        assert info.cluster.leader and info.cluster.leader != leader
    finally:
        for b in buses:
            await b.close()
        for node in nodes:
            node.stop()
