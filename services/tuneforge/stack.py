"""The embedded default: a bundled nats-server and the five services as separate processes.

``tuneforge up`` uses it; so do the quickstart and the integration tests. Each service is its own
``tuneforge serve <service>`` process with its own SQLite database under the data directory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneforge.core.nats_server import NatsServerProcess, free_port
from tuneforge.core.settings import SERVICES, service_key

SERVICE_CLASSES = {
    "dataset-builder": "tuneforge.dataset_builder.service:DatasetBuilder",
    "job-scheduler": "tuneforge.job_scheduler.service:JobScheduler",
    "trainer": "tuneforge.trainer.service:Trainer",
    "model-registry": "tuneforge.model_registry.service:ModelRegistry",
    "notifier": "tuneforge.notifier.service:Notifier",
}


def load_service_class(name: str):
    import importlib

    module, _, attr = SERVICE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def admin_token_for(data_dir: Path) -> str:
    """The data directory's administrator token (created once, readable by the owner only)."""
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = "tfadm_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token


def read_stack_file(data_dir: Path) -> dict:
    path = data_dir / "stack.json"
    if not path.exists():
        raise FileNotFoundError(f"no running stack found ({path} missing): start one with `tuneforge up`")
    return json.loads(path.read_text())


class StackError(RuntimeError):
    pass


class Stack:
    """Start nats-server (unless ``nats_url`` is given) and the five services; stop them all."""

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.nats_url = nats_url
        self.extra_env = dict(extra_env or {})
        self.host = host
        self.ports = dict(ports or {})
        self.nats: NatsServerProcess | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}
        self.admin_token = ""

    def log_path(self, service: str) -> Path:
        return self.data_dir / "logs" / f"{service}.log"

    def start(self, timeout: float = 90.0) -> "Stack":
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.admin_token = admin_token_for(self.data_dir)
        try:
            if self.nats_url is None:
                self.nats = NatsServerProcess(self.data_dir / "nats", log_file=self.data_dir / "logs" / "nats.log")
                self.nats.start()
                self.nats_url = self.nats.url
            env = {
                **os.environ,
                "TUNEFORGE_DATA_DIR": str(self.data_dir),
                "TUNEFORGE_NATS_URL": self.nats_url,
                "TUNEFORGE_ADMIN_TOKEN": self.admin_token,
                "TUNEFORGE_HOST": self.host,
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
            for service in SERVICES:
                port = self.ports.get(service) or free_port(self.host)
                env[f"TUNEFORGE_{service_key(service).upper()}_PORT"] = str(port)
                self.endpoints[service] = f"{self.host}:{port}"
            for service in SERVICES:
                log = open(self.log_path(service), "ab")
                self.processes[service] = subprocess.Popen(
                    [sys.executable, "-m", "tuneforge.cli", "serve", service],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
                log.close()
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        (self.data_dir / "stack.json").write_text(json.dumps(
            {"nats_url": self.nats_url, "endpoints": self.endpoints, "pid": os.getpid()}, indent=2))
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.processes)
        while pending:
            for service in sorted(pending):
                proc = self.processes[service]
                if proc.poll() is not None:
                    raise StackError(f"{service} exited with {proc.returncode}:\n{self.log_tail(service)}")
                if self._serving(self.endpoints[service]):
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}\n"
                                 + "\n".join(self.log_tail(s) for s in pending))
            if pending:
                time.sleep(0.2)

    @staticmethod
    def _serving(target: str) -> bool:
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def log_tail(self, service: str, lines: int = 40) -> str:
        path = self.log_path(service)
        if not path.exists():
            return f"[{service}: no log]"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {service} log (last {len(text)} lines) ---\n" + "\n".join(text)

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        stack_file = self.data_dir / "stack.json"
        if stack_file.exists():
            stack_file.unlink()

    def alive(self) -> dict[str, bool]:
        return {s: p.poll() is None for s, p in self.processes.items()}

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
