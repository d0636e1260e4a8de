"""Control-plane load: GetJob/ListJobs at a fixed rate, CreateJob at 10/s and a few WatchJob
streams against a running stack; p50/p95/p99, errors, and whether every created job ended.

    .venv/bin/python benchmarks/control_plane.py                      # own stack, 1,000 reads/s, 60 s
    .venv/bin/python benchmarks/control_plane.py --rate 200 --duration 20
    .venv/bin/python benchmarks/control_plane.py --replicas 2         # two job-scheduler processes, one port
    .venv/bin/python benchmarks/control_plane.py --attach DATA_DIR    # a stack started by `tuneforge up`

Open loop: request i of a kind is due at ``start + i / rate`` and is sent then, whatever happened
to the requests before it; its latency is measured from that due time, so a server (or a load
generator) that falls behind shows up as latency instead of as a lower request rate (no
coordinated omission). The load runs in ``--procs`` separate processes (grpc.aio, a few channels
each), apart from the process that started the stack; the CPU each of them used is printed, with
the CPU of every service process, so that one can see what bounds the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import tuneforge  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path[:0] = [str(REPO_ROOT / "services"), str(REPO_ROOT / "plugins")]

import grpc  # noqa: E402

from tuneforge.api.common.v1 import common_pb2  # noqa: E402
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js  # noqa: E402
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as js_grpc  # noqa: E402

EXAMPLES = REPO_ROOT / "examples" / "conversations.jsonl"
BASE_MODEL = "llama-3.1-8b"
TERMINAL = {js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED, js.JOB_STATE_CANCELLED}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]


@dataclasses.dataclass
class WorkerConfig:
    index: int
    target: str
    api_key: str
    start_at: float  # time.monotonic() (CLOCK_MONOTONIC: the same clock in every process)
    duration: float
    read_rate: float
    list_fraction: float
    page_size: int
    create_rate: float
    watchers: int
    job_ids: list[str]
    deadline: float
    channels: int
    run_id: str
    examples_topics: list[str]


@dataclasses.dataclass
class KindResult:
    latencies: list[float] = dataclasses.field(default_factory=list)  # seconds, successful calls
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    offered: int = 0
    last_done: float = 0.0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def merge(self, other: "KindResult") -> None:
        self.latencies.extend(other.latencies)
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.offered += other.offered
        self.last_done = max(self.last_done, other.last_done)


@dataclasses.dataclass
class WorkerResult:
    kinds: dict[str, KindResult]
    created: list[str]
    watch_events: int
    watch_streams: int
    cpu_seconds: float
    dispatch_lag_max: float
    dispatch_lag_p99: float


# -- the load process -----------------------------------------------------------------------------

def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


async def _drive(cfg: WorkerConfig) -> WorkerResult:
    loop = asyncio.get_running_loop()
    channels = [grpc.aio.insecure_channel(cfg.target, options=CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)])
                for _ in range(cfg.channels)]
    stubs = [js_grpc.JobSchedulerServiceStub(ch) for ch in channels]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=30)
    md = (("authorization", f"Bearer {cfg.api_key}"),)
    kinds = {k: KindResult() for k in ("GetJob", "ListJobs", "CreateJob", "WatchJob")}
    created: list[str] = []
    pending: set[asyncio.Task] = set()
    lags: list[float] = []
    rng = random.Random(cfg.index)
    get_requests = [js.GetJobRequest(job_id=j) for j in cfg.job_ids]
    list_request = js.ListJobsRequest(page_size=cfg.page_size)

    async def timed(kind: str, due: float, call) -> None:
        result = kinds[kind]
        try:
            reply = await call
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its code
            result.error(_code(exc))
            return
        done = loop.time()
        result.latencies.append(done - due)
        result.last_done = done
        if kind == "CreateJob":
            created.append(reply.job.id)

    def read(i: int, due: float) -> None:
        stub = stubs[i % len(stubs)]
        if rng.random() < cfg.list_fraction:
            kinds["ListJobs"].offered += 1
            coro = timed("ListJobs", due, stub.ListJobs(list_request, metadata=md, timeout=cfg.deadline))
        else:
            kinds["GetJob"].offered += 1
            request = get_requests[i % len(get_requests)]
            coro = timed("GetJob", due, stub.GetJob(request, metadata=md, timeout=cfg.deadline))
        task = loop.create_task(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    def create(i: int, due: float) -> None:
        kinds["CreateJob"].offered += 1
        spec = js.JobSpec(name=f"cp-{cfg.run_id}-{cfg.index}-{i}", topics=cfg.examples_topics,
                          base_model=BASE_MODEL, method="sft")
        request = js.CreateJobRequest(spec=spec, request_id=f"cp-{cfg.run_id}-{cfg.index}-{i}")
        stub = stubs[i % len(stubs)]
        task = loop.create_task(timed("CreateJob", due, stub.CreateJob(request, metadata=md, timeout=cfg.deadline)))
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def open_loop(rate: float, fire) -> None:
        if rate <= 0:
            return
        n = int(round(rate * cfg.duration))
        i = 0
        while i < n:
            due = cfg.start_at + i / rate
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
                now = loop.time()
            while i < n and cfg.start_at + i / rate <= now:
                due = cfg.start_at + i / rate
                lags.append(now - due)
                fire(i, due)
                i += 1

    watch_events = 0
    watch_streams = 0
    end_at = cfg.start_at + cfg.duration

    async def watcher(w: int) -> None:
        nonlocal watch_events, watch_streams
        result = kinds["WatchJob"]
        stub = stubs[w % len(stubs)]
        await asyncio.sleep(max(0.0, cfg.start_at - loop.time()) + 0.25 * w)
        ended = None
        while loop.time() < end_at:
            job_id = created[-1 - (w % len(created))] if len(created) > w else cfg.job_ids[w % len(cfg.job_ids)]
            if job_id == ended:
                # That job has ended and no newer one is there to watch: look again in a while,
                # as a client would (not dozens of streams a second on a finished job).
                await asyncio.sleep(0.5)
                continue
            result.offered += 1
            due = loop.time()
            first = None
            try:
                call = stub.WatchJob(js.WatchJobRequest(job_id=job_id), metadata=md,
                                     timeout=max(1.0, end_at - loop.time() + cfg.deadline))
                async for _response in call:
                    watch_events += 1
                    if first is None:
                        first = loop.time() - due  # latency: stream opened -> first event
            except Exception as exc:  # noqa: BLE001
                result.error(_code(exc))
                await asyncio.sleep(0.2)
                continue
            watch_streams += 1
            ended = job_id
            if first is not None:
                result.latencies.append(first)
            result.last_done = loop.time()

    cpu0 = _cpu_self()
    watchers = [loop.create_task(watcher(w)) for w in range(cfg.watchers)]
    await asyncio.gather(open_loop(cfg.read_rate, read), open_loop(cfg.create_rate, create))
    if pending:
        await asyncio.wait(set(pending), timeout=cfg.deadline + 5)
    for task in watchers:
        try:
            await asyncio.wait_for(task, timeout=cfg.deadline + 5)
        except asyncio.TimeoutError:
            kinds["WatchJob"].error("did not end")
    cpu = _cpu_self() - cpu0
    for ch in channels:
        await ch.close()
    lags.sort()
    return WorkerResult(
        kinds=kinds, created=created, watch_events=watch_events, watch_streams=watch_streams, cpu_seconds=cpu,
        dispatch_lag_max=lags[-1] if lags else 0.0, dispatch_lag_p99=_pct(lags, 99) if lags else 0.0,
    )


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker_main(cfg: WorkerConfig, conn) -> None:
    try:
        conn.send(("ok", asyncio.run(_drive(cfg))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


# -- measurement helpers --------------------------------------------------------------------------

def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service_pids(data_dir: Path, stack) -> dict[str, list[int]]:
    """Service name -> pids: the Stack's own processes, or (attached) every process serving from
    ``data_dir``."""
    out: dict[str, list[int]] = {}
    if stack is not None:
        for key, proc in stack.processes.items():
            out.setdefault(key.split("#")[0], []).append(proc.pid)
        if stack.nats is not None and stack.nats.pid:
            out["nats-server"] = [stack.nats.pid]
        return out
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" not in argv or f"TUNEFORGE_DATA_DIR={data_dir}".encode() not in env:
            continue
        name = argv[argv.index(b"serve") + 1].decode()
        out.setdefault(name, []).append(int(entry.name))
    return out


def _cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(_proc_cpu(p) or 0.0 for p in plist) for name, plist in pids.items()}


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def _summary(label: str, result: KindResult, duration: float, rate: float | None) -> str:
    lat = sorted(result.latencies)
    achieved = len(lat) / duration
    errors = sum(result.errors.values())
    detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(result.errors.items()))})" if errors else ""
    offered = f"offered {rate:g}/s " if rate is not None else f"offered {result.offered} "
    return (f"{label:<9} {offered}achieved {achieved:.0f}/s p50 {_ms(_pct(lat, 50))} p95 {_ms(_pct(lat, 95))} "
            f"p99 {_ms(_pct(lat, 99))} max {_ms(lat[-1] if lat else math.nan)} errors {errors}{detail}")


# -- setup ----------------------------------------------------------------------------------------

async def _setup(endpoints: dict[str, str], admin_token: str, n_examples: int, topics: list[str], pre_jobs: int):
    from tuneforge import sdk
    from tuneforge.core.client import Clients
    from tuneforge.quickstart import create_workspace

    reply = await create_workspace(endpoints, admin_token, common_pb2.PLAN_PRO, "bench@example.com", "control-plane")
    clients = Clients.connect(endpoints, reply.api_key)
    try:
        await sdk.wait_until_authorised(clients)
        lines = EXAMPLES.read_bytes().splitlines()[:n_examples]
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as fh:
            fh.write(b"\n".join(lines) + b"\n")
        try:
            imported = await sdk.import_file(clients, Path(fh.name))
        finally:
            os.unlink(fh.name)
        job_ids = []
        for i in range(pre_jobs):
            created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
                name=f"cp-seed-{i}", topics=topics, base_model=BASE_MODEL, method="sft")))
            job_ids.append(created.job.id)
        return reply.api_key, imported, job_ids
    finally:
        await clients.close()


async def _wait_ended(target: str, api_key: str, job_ids: list[str], timeout: float) -> dict[int, int]:
    """Poll until every job is terminal or ``timeout``; returns state -> count."""
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = js_grpc.JobSchedulerServiceStub(channel)
    md = (("authorization", f"Bearer {api_key}"),)
    states: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        todo = list(job_ids)
        while True:
            still = []
            for i in range(0, len(todo), 50):
                replies = await asyncio.gather(*(stub.GetJob(js.GetJobRequest(job_id=j), metadata=md, timeout=10)
                                                 for j in todo[i:i + 50]))
                for job_id, reply in zip(todo[i:i + 50], replies):
                    if reply.job.state in TERMINAL:
                        states[job_id] = reply.job.state
                    else:
                        still.append(job_id)
            todo = still
            if not todo or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    finally:
        await channel.close()
    counts: dict[int, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


# -- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="GetJob+ListJobs requests per second (default 1000)")
    p.add_argument("--create-rate", type=float, default=10.0, help="dataset-only CreateJob per second (default 10)")
    p.add_argument("--watchers", type=int, default=4, help="concurrent WatchJob streams (default 4)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--list-fraction", type=float, default=0.5, help="share of reads that are ListJobs (default 0.5)")
    p.add_argument("--page-size", type=int, default=10, help="ListJobs page size (default 10)")
    p.add_argument("--deadline", type=float, default=5.0, help="deadline of each call in seconds (default 5)")
    p.add_argument("--procs", type=int, default=1, help="load-generating processes (default 1)")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) per process (default 4)")
    p.add_argument("--replicas", type=int, default=1, help="job-scheduler processes on one port (own stack)")
    p.add_argument("--examples", type=int, default=50, help="examples imported into the workspace (default 50)")
    p.add_argument("--topics", default="billing", help="topics of each created job, comma-separated")
    p.add_argument("--end-timeout", type=float, default=120.0, help="seconds to wait for created jobs to end")
    p.add_argument("--attach", type=Path, metavar="DATA_DIR", help="use the stack running from DATA_DIR")
    p.add_argument("--data-dir", type=Path, help="state directory of the stack started here (default: temporary)")
    args = p.parse_args(argv)

    topics = [t for t in args.topics.split(",") if t]
    stack = None
    tmp = None
    if args.attach:
        from tuneforge.stack import admin_token_for, read_stack_file

        data_dir = args.attach.resolve()
        endpoints = read_stack_file(data_dir)["endpoints"]
        admin_token = admin_token_for(data_dir)
        if args.replicas != 1:
            print("--replicas applies to a stack started here; ignored with --attach", file=sys.stderr)
    else:
        from tuneforge.core.nats_server import free_port
        from tuneforge.stack import Stack

        if args.data_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="tuneforge-cp-")
            data_dir = Path(tmp.name)
        else:
            data_dir = args.data_dir.resolve()
        ports = {"job-scheduler": free_port()} if args.replicas > 1 else None
        print(f"starting a stack in {data_dir} ...", flush=True)
        stack = Stack(data_dir, ports=ports, extra_env={"OMP_NUM_THREADS": "1"}).start()
        for _ in range(args.replicas - 1):
            stack.add_replica("job-scheduler")
        endpoints = stack.endpoints
        admin_token = stack.admin_token
    try:
        return _run(args, data_dir, endpoints, admin_token, topics, stack)
    finally:
        if stack is not None:
            stack.stop()
        if tmp is not None:
            tmp.cleanup()


def _run(args, data_dir: Path, endpoints: dict[str, str], admin_token: str, topics: list[str], stack) -> int:
    target = endpoints["job-scheduler"]
    api_key, imported, seed_jobs = asyncio.run(_setup(endpoints, admin_token, args.examples, topics, pre_jobs=10))
    print(f"workspace ready: {imported.imported} examples imported, "
          f"{len(seed_jobs)} seed jobs; job-scheduler at {target}"
          f"{f' ({args.replicas} replicas)' if stack is not None and args.replicas > 1 else ''}", flush=True)
    run_id = os.urandom(3).hex()
    ctx = mp.get_context("spawn")
    start_at = time.monotonic() + 3.0  # time for the processes to start and connect
    workers = []
    for k in range(args.procs):
        cfg = WorkerConfig(
            index=k, target=target, api_key=api_key, start_at=start_at, duration=args.duration,
            read_rate=args.rate / args.procs, list_fraction=args.list_fraction, page_size=args.page_size,
            create_rate=args.create_rate if k == 0 else 0.0, watchers=args.watchers if k == 0 else 0,
            job_ids=seed_jobs, deadline=args.deadline, channels=args.channels, run_id=run_id,
            examples_topics=topics,
        )
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(cfg, child), daemon=True)
        proc.start()
        child.close()
        workers.append((proc, parent))
    pids = _service_pids(data_dir, stack)
    while time.monotonic() < start_at:
        time.sleep(0.01)
    cpu0 = _cpu_of(pids)
    wall0 = time.monotonic()
    results = []
    failed = False
    for proc, conn in workers:
        status, payload = conn.recv()
        proc.join()
        if status != "ok":
            print(f"load process failed: {payload}", file=sys.stderr)
            failed = True
        else:
            results.append(payload)
    wall = time.monotonic() - wall0
    cpu1 = _cpu_of(pids)
    if failed:
        return 2

    merged = {k: KindResult() for k in ("GetJob", "ListJobs", "CreateJob", "WatchJob")}
    for r in results:
        for k, v in r.kinds.items():
            merged[k].merge(v)
    reads = KindResult()
    reads.merge(merged["GetJob"])
    reads.merge(merged["ListJobs"])
    d = args.duration
    print(f"\nload: {d:g} s open loop, reads {args.rate:g}/s ({args.list_fraction:.0%} ListJobs page {args.page_size}),"
          f" CreateJob {args.create_rate:g}/s, {args.watchers} WatchJob streams, deadline {args.deadline:g} s,"
          f" {args.procs} load process(es) x {args.channels} channels")
    print(_summary("reads:", reads, d, args.rate))
    print(_summary("  GetJob", merged["GetJob"], d, None))
    print(_summary("  ListJobs", merged["ListJobs"], d, None))
    print(_summary("creates:", merged["CreateJob"], d, args.create_rate))
    w = merged["WatchJob"]
    events = sum(r.watch_events for r in results)
    streams = sum(r.watch_streams for r in results)
    print(f"watches:  {streams} streams ran to their job's end, {events} events; first event p50 "
          f"{_ms(_pct(sorted(w.latencies), 50))} p99 {_ms(_pct(sorted(w.latencies), 99))} errors {sum(w.errors.values())}"
          + (f" ({', '.join(f'{k} {v}' for k, v in sorted(w.errors.items()))})" if w.errors else ""))
    total = KindResult()
    for k in merged.values():
        total.merge(k)
    errors = sum(total.errors.values())
    lag_max = max(r.dispatch_lag_max for r in results)
    lag_p99 = max(r.dispatch_lag_p99 for r in results)
    print(f"totals:   {len(total.latencies)} calls ok, errors {errors}")

    client_cpu = sum(r.cpu_seconds for r in results)
    print(f"cpu:      load generator {client_cpu:.1f} s ({client_cpu / wall:.0%} of one core; dispatch lag p99 "
          f"{_ms(lag_p99)} max {_ms(lag_max)})")
    parts = []
    for name in sorted(cpu1):
        used = cpu1[name] - cpu0.get(name, 0.0)
        parts.append(f"{name} {used:.1f} s ({used / wall:.0%})")
    print(f"          services over {wall:.0f} s: " + ", ".join(parts))
    js_cpu = cpu1.get("job-scheduler", 0.0) - cpu0.get("job-scheduler", 0.0)
    calls = len(total.latencies) + errors
    if calls:
        print(f"          job-scheduler CPU per call {js_cpu / calls * 1000:.2f} ms")
    try:
        load1, load5, _ = os.getloadavg()
        print(f"          load average {load1:.2f} (1 min) {load5:.2f} (5 min) on {os.cpu_count()} cores")
    except OSError:
        pass

    created = [j for r in results for j in r.created]
    states = asyncio.run(_wait_ended(target, api_key, created, args.end_timeout))
    ended = sum(states.values())
    detail = ", ".join(f"{js.JobState.Name(s).removeprefix('JOB_STATE_').lower()} {n}" for s, n in sorted(states.items()))
    print(f"jobs: created {len(created)} ended {ended}" + (f" ({detail})" if detail else ""))
    ok = errors == 0 and ended == len(created)
    print("PASS" if ok else "FAIL: " + ("errors; " if errors else "") + ("unfinished jobs" if ended != len(created) else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
