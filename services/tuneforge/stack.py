"""The embedded default: a bundled nats-server and the five services as separate processes.

``tuneforge up`` uses it; so do the quickstart and the integration tests. Each service is its own
``tuneforge serve <service>`` process with its own SQLite database under the data directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


NATS = "nats-server"  # the bundled server's name in supervision, pid() and kill()


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a process that exits on its own.

    The first restart waits ``initial_delay``, each further one ``factor`` times longer, at most
    ``max_delay``; a process that stayed up ``reset_after`` seconds starts over at
    ``initial_delay``. A process that exits again after ``max_restarts`` restarts within
    ``window`` seconds is crash-looping: the supervisor reports it (name, exit status, the last
    lines of its log) and gives up on it — restarting it every 30 s forever would only hide the
    fault — while the other processes keep running. ``tuneforge up`` says so and keeps serving;
    fix the cause and restart ``tuneforge up``.
    """

    initial_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    reset_after: float = 60.0
    max_restarts: int = 5
    window: float = 120.0

    def delay(self, consecutive: int) -> float:
        return min(self.max_delay, self.initial_delay * self.factor ** consecutive)


@dataclasses.dataclass
class Supervised:
    """The supervisor's record of one process (a service, a replica ``svc#n``, or nats-server)."""

    name: str
    started_at: float
    restarts: int = 0  # restarts so far
    consecutive: int = 0  # quick exits in a row (the back-off exponent)
    restart_times: list[float] = dataclasses.field(default_factory=list)
    restart_at: float | None = None  # a restart is scheduled at this time (monotonic)
    last_exit: int | None = None
    gave_up: bool = False


class Stack:
    """Start nats-server (unless ``nats_url`` is given) and the five services; stop them all.

    With ``supervise=True`` (what ``tuneforge up`` uses) a background thread restarts any of them
    that exits on its own, following ``restart_policy`` (:class:`RestartPolicy`); each restart and
    a crash loop are reported through ``report`` (default: a line on stderr) and kept in
    ``supervisor_log``. :meth:`supervise_once` is one pass of that loop, for callers that drive
    it themselves. Only :meth:`stop` stops everything.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        supervise: bool = False,
        restart_policy: RestartPolicy | None = None,
        report: Callable[[str], None] | None = None,
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
        self.supervise = supervise
        self.restart_policy = restart_policy or RestartPolicy()
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.supervisor_log: list[str] = []
        self.supervised: dict[str, Supervised] = {}
        # Commands by process name; a test may replace one (e.g. with a command that always fails).
        self.commands: dict[str, list[str]] = {}
        self._env: dict[str, str] = {}
        self._lock = threading.RLock()
        self._supervisor: threading.Thread | None = None
        self._supervisor_stop = threading.Event()

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
                self.supervised[NATS] = Supervised(NATS, started_at=time.monotonic())
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
            self._env = env
            for service in SERVICES:
                self._spawn(service)
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        (self.data_dir / "stack.json").write_text(json.dumps(
            {"nats_url": self.nats_url, "endpoints": self.endpoints, "pid": os.getpid()}, indent=2))
        if self.supervise:
            self.start_supervisor()
        return self

    # -- supervision ------------------------------------------------------------------------

    def _process_log(self, name: str) -> Path:
        if name == NATS:
            return self.data_dir / "logs" / "nats.log"
        service, _, n = name.partition("#")
        return self.log_path(service) if not n else self.data_dir / "logs" / f"{service}-{n}.log"

    def command(self, name: str) -> list[str]:
        """The command line of a service process (``svc`` or a replica ``svc#n``)."""
        return self.commands.get(name) or [sys.executable, "-m", "tuneforge.cli", "serve", name.partition("#")[0]]

    def _spawn(self, name: str) -> subprocess.Popen:
        with open(self._process_log(name), "ab") as log:
            proc = subprocess.Popen(self.command(name), env=self._env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        with self._lock:
            self.processes[name] = proc
            self.supervised.setdefault(name, Supervised(name, started_at=time.monotonic()))
        return proc

    def _exit_status(self, name: str) -> int | None:
        if name == NATS:
            return self.nats.poll() if self.nats is not None else None
        proc = self.processes.get(name)
        return proc.poll() if proc is not None else None

    def pid(self, name: str) -> int | None:
        """The pid of a running process: a service, a replica ``svc#n``, or ``"nats-server"``."""
        with self._lock:
            if name == NATS:
                return self.nats.pid if self.nats is not None and self.nats.is_running() else None
            proc = self.processes.get(name)
            return proc.pid if proc is not None and proc.poll() is None else None

    def pids(self) -> dict[str, int | None]:
        names = [*([NATS] if self.nats is not None else []), *self.processes]
        return {name: self.pid(name) for name in names}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (default SIGKILL) to a process (see :meth:`pid`); returns the pid."""
        pid = self.pid(name)
        if pid is None:
            raise StackError(f"{name} is not running")
        os.kill(pid, sig)
        return pid

    def restarts(self, name: str) -> int:
        record = self.supervised.get(name)
        return record.restarts if record is not None else 0

    def _say(self, line: str) -> None:
        self.supervisor_log.append(line)
        try:
            self.report(line)
        except Exception:  # a broken reporter must not stop supervision
            pass

    def supervise_once(self) -> None:
        """One pass: notice processes that exited, schedule their restart with back-off, restart
        those whose time has come, give up on crash loops (reporting each step)."""
        policy = self.restart_policy
        with self._lock:
            names = [*([NATS] if self.nats is not None else []), *self.processes]
            for name in names:
                now = time.monotonic()
                record = self.supervised.setdefault(name, Supervised(name, started_at=now))
                if record.gave_up:
                    continue
                if record.restart_at is None:
                    status = self._exit_status(name)
                    if status is None:
                        continue
                    record.last_exit = status
                    if now - record.started_at >= policy.reset_after:
                        record.consecutive = 0
                    recent = [t for t in record.restart_times if now - t <= policy.window]
                    if len(recent) >= policy.max_restarts:
                        record.gave_up = True
                        self._say(
                            f"{name} exited with {status} again after {len(recent)} restarts in the last "
                            f"{policy.window:.0f}s: it is crash-looping; giving up on it (the other services "
                            f"keep running; fix the cause and restart)\n{self.log_tail(name, 20)}")
                        continue
                    delay = policy.delay(record.consecutive)
                    record.consecutive += 1
                    record.restart_at = now + delay
                    self._say(f"{name} exited with {status}; restarting in {delay:.1f}s "
                              f"(restart {record.restarts + 1})")
                elif now >= record.restart_at:
                    record.restart_at = None
                    record.restarts += 1
                    record.restart_times.append(now)
                    record.started_at = now
                    try:
                        self._restart(name)
                    except Exception as exc:  # counted as a quick exit: the next pass backs off
                        self._say(f"{name} did not restart: {exc}")

    def _restart(self, name: str) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self._process_log(name), "ab") as log:
            log.write(f"--- {when}: restarted by the supervisor ---\n".encode())
        if name == NATS:
            assert self.nats is not None
            self.nats.restart()
        else:
            self._spawn(name)

    def start_supervisor(self, interval: float = 0.2) -> None:
        """Run :meth:`supervise_once` every ``interval`` seconds in a daemon thread until :meth:`stop`."""
        if self._supervisor is not None:
            return
        self._supervisor_stop.clear()

        def loop() -> None:
            while not self._supervisor_stop.wait(interval):
                try:
                    self.supervise_once()
                except Exception as exc:  # never die silently
                    self._say(f"supervisor error: {type(exc).__name__}: {exc}")

        self._supervisor = threading.Thread(target=loop, name="tuneforge-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        self._supervisor_stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
            self._supervisor = None

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
        path = self._process_log(service)
        if not path.exists():
            return f"[{service}: no log]"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {service} log (last {len(text)} lines) ---\n" + "\n".join(text)

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_supervisor()
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

    def add_replica(self, service: str, timeout: float = 60.0) -> str:
        """Start one more ``tuneforge serve <service>`` process on the same port as the running one
        (gRPC sets SO_REUSEPORT on Linux, so the kernel spreads new connections over the replicas;
        they share the service's database and its durable NATS consumers). Returns its name in
        ``processes`` (``<service>#<n>``, supervised like the others); ``stop`` stops it too."""
        if service not in self.endpoints or not self._env:
            raise StackError(f"{service} is not running; start the stack first")
        n = 2 + sum(1 for name in self.processes if name.startswith(f"{service}#"))
        name = f"{service}#{n}"
        log = self._process_log(name)
        seen = log.stat().st_size if log.exists() else 0
        proc = self._spawn(name)
        # The port answers already (the first replica): wait for this process's own log line.
        deadline = time.monotonic() + timeout
        marker = f"{service} serving on".encode()
        while marker not in log.read_bytes()[seen:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{name} did not start:\n{self.log_tail(name, 30)}")
            time.sleep(0.1)
        return name

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
