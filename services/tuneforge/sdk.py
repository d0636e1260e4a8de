"""Client-side helpers over the typed stubs: import files, watch jobs, download artifacts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.core.client import Clients

CHUNK = 256 * 1024


async def _import_requests(
    path: Path, options: dsb.ImportOptions, on_progress: Callable[[int, int], None] | None,
) -> AsyncIterator[dsb.ImportExamplesRequest]:
    yield dsb.ImportExamplesRequest(options=options)
    total = path.stat().st_size
    sent = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield dsb.ImportExamplesRequest(chunk=block)
            sent += len(block)
            if on_progress:
                on_progress(sent, total)


async def import_file(
    clients: Clients, path: Path, topics: list[str] | None = None, *, all_or_nothing: bool = False,
    timeout: float = 600.0, on_progress: Callable[[int, int], None] | None = None,
) -> dsb.ImportExamplesResponse:
    """Stream a JSONL file to ImportExamples; ``on_progress(bytes_sent, total_bytes)`` per chunk."""
    options = dsb.ImportOptions(
        source_name=Path(path).name,
        topics=topics or [],
        mode=dsb.IMPORT_MODE_ALL_OR_NOTHING if all_or_nothing else dsb.IMPORT_MODE_KEEP_VALID,
    )
    return await clients.dataset_builder.ImportExamples(
        _import_requests(Path(path), options, on_progress), timeout=timeout)


async def wait_until_authorised(clients: Clients, timeout: float = 30.0) -> None:
    """A new API key reaches the other services through an event; wait until each accepts it."""
    deadline = time.monotonic() + timeout
    checks = [
        lambda: clients.dataset_builder.ListTopics(dsb.ListTopicsRequest()),
        lambda: clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest()),
        lambda: clients.model_registry.ListModels(mr.ListModelsRequest(page_size=1)),
        lambda: clients.notifier.ListDeliveries(nt.ListDeliveriesRequest(page_size=1)),
    ]
    for check in checks:
        while True:
            try:
                await check()
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def watch_job(
    clients: Clients, job_id: str, on_event: Callable[[js.JobEvent], None] | None = None, timeout: float = 3600.0,
) -> list[js.JobEvent]:
    """Follow a job until it ends; returns every event. Reconnects from the last sequence seen."""
    events: list[js.JobEvent] = []
    deadline = time.monotonic() + timeout
    after = 0
    while True:
        try:
            call = clients.job_scheduler.WatchJob(
                js.WatchJobRequest(job_id=job_id, after_sequence=after),
                timeout=max(1.0, deadline - time.monotonic()),
            )
            async for response in call:
                events.append(response.event)
                after = response.event.sequence
                if on_event:
                    on_event(response.event)
            return events
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _write_chunks(stream, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}
    written: list[Path] = []
    try:
        async for response in stream:
            chunk = response.chunk
            rel = Path(chunk.path)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"refusing to write outside {out_dir}: {chunk.path}")
            if chunk.path not in handles:
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                handles[chunk.path] = open(target, "wb")
                written.append(target)
            fh = handles[chunk.path]
            fh.seek(chunk.offset)
            fh.write(chunk.data)
    finally:
        for fh in handles.values():
            fh.close()
    return written


async def download_dataset(clients: Clients, dataset_id: str, out_dir: Path, timeout: float = 600.0) -> list[Path]:
    return await _write_chunks(
        clients.dataset_builder.DownloadDataset(dsb.DownloadDatasetRequest(dataset_id=dataset_id), timeout=timeout),
        out_dir,
    )


async def download_model(clients: Clients, model: str, out_dir: Path, timeout: float = 600.0) -> list[Path]:
    return await _write_chunks(
        clients.model_registry.DownloadModel(mr.DownloadModelRequest(model=model), timeout=timeout), out_dir
    )
