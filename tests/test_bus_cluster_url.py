"""TUNEFORGE_NATS_URL may list a NATS cluster's nodes, comma-separated (deploy/compose.yaml's
cluster profile): the bus connects through whichever answers."""

from __future__ import annotations

from tuneforge.core.bus import Bus
from tuneforge.core.nats_server import NatsServerProcess, free_port


async def test_a_comma_separated_server_list_reaches_a_live_node(tmp_path):
    nats = NatsServerProcess(tmp_path / "nats").start()
    try:
        dead = f"nats://127.0.0.1:{free_port()}"
        bus = await Bus.connect(f"{dead}, {nats.url}", "test", connect_timeout=2.0)
        try:
            assert bus.nc.is_connected
            assert bus.nc.connected_url.port == int(nats.url.rsplit(":", 1)[1])
        finally:
            await bus.close()
    finally:
        nats.stop()
