"""dataset-builder: imports and validates examples, builds dataset snapshots, serves downloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets

import grpc
from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as pb
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2_grpc as pb_grpc
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core import capabilities, subjects
from tuneforge.core.bus import derived_event_id
from tuneforge.core.db import utcnow
from tuneforge.core.hyperparameters import TRAIN_ON_INPUTS_CHOICES
from tuneforge.core.gcpause import gc_paused
from tuneforge.core.errors import ServiceError, bad_request, not_found
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.rpc import Page, file_chunks, timestamp
from tuneforge.core import validation as val
from tuneforge.core.service import BaseService
from tuneforge.core.storage import ArtifactStore
from tuneforge.core.workspaces import Workspace, WorkspaceRow
from tuneforge.dataset_builder import builder, formats, workers
from tuneforge.dataset_builder.tokens import TokenCounter
from tuneforge.dataset_builder.models import DatasetRow, ExampleRow, ExampleTopicRow, TokenCountRow
from tuneforge.plugins import get_registry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DatasetBuilderService"].full_name
MAX_REPORTED_ERRORS = 1000
MAX_IMPORT_BYTES = 1024 * 2**20



class DatasetBuilder(BaseService):
    name = "dataset-builder"

    def __init__(self, settings):
        super().__init__(settings)
        self.store = ArtifactStore(settings.resolved_artifact_url())
        self._build_lock = asyncio.Lock()
        self._counters: dict[str, tuple[int, TokenCounter | None]] = {}

    def grpc_services(self):
        return [(pb_grpc.add_DatasetBuilderServiceServicer_to_server, DatasetBuilderServicer(self), SERVICE_NAME)]

    async def on_start(self) -> None:
        await self.bus.consume("dataset-builder", [subjects.DATASET_BUILD_REQUESTED], self.on_build_requested,
                               on_dead_letter=self.on_build_given_up)

    async def on_build_requested(self, _subject, event: ev.DatasetBuildRequested, msg) -> None:
        """Build (or find: snapshots are content-addressed) the job's dataset and announce it. The
        result event's id derives from the request's, so a redelivered request that is built again
        publishes the same ``Nats-Msg-Id`` and JetStream keeps one result. A build that keeps
        failing is redelivered with back-off and then given up (``on_build_given_up``)."""
        meta = event.meta
        try:
            summary, _files = await self.build(
                meta.workspace_id, list(event.topics), event.method, event.dataset_kind,
                event.base_model, event.test_fraction, event.seed,
                event.train_on_inputs, event.overlength_policy, event.max_epochs,
                require_capabilities=await self._trains(meta.workspace_id),
            )
        except ServiceError as exc:
            failed = ev.DatasetBuildFailed(
                meta=self._result_meta(meta, subjects.DATASET_BUILD_FAILED),
                reason=exc.message,
                failure_kind=common_pb2.FAILURE_KIND_USER,
            )
            await self.emit(subjects.DATASET_BUILD_FAILED, failed)
            return
        await self.emit(
            subjects.DATASET_BUILD_SUCCEEDED,
            ev.DatasetBuildSucceeded(meta=self._result_meta(meta, subjects.DATASET_BUILD_SUCCEEDED), dataset=summary),
        )

    async def on_build_given_up(self, _subject, event: ev.DatasetBuildRequested | None, error: str) -> None:
        """The build failed on every delivery (core.bus.RedeliveryPolicy): the job fails as a
        system error instead of waiting forever."""
        if event is None:
            return
        meta = event.meta
        await self.emit(subjects.DATASET_BUILD_FAILED, ev.DatasetBuildFailed(
            meta=self._result_meta(meta, subjects.DATASET_BUILD_FAILED),
            reason=f"the dataset could not be built after {self.bus.redelivery.max_deliver} attempts: {error}",
            failure_kind=common_pb2.FAILURE_KIND_SYSTEM,
        ))

    def _result_meta(self, cause: ev.EventMeta, subject: str) -> ev.EventMeta:
        return self.bus.meta(cause.workspace_id, cause.job_id, event_id=derived_event_id(cause.event_id, subject))

    async def load_examples(self, workspace_id: str) -> list[builder.StoredExample]:
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(ExampleRow.id, ExampleRow.content_hash, ExampleRow.format, ExampleRow.body)
                    .where(ExampleRow.workspace_id == workspace_id)
                )
            ).all()
            topic_rows = (
                await session.execute(
                    select(ExampleTopicRow.example_id, ExampleTopicRow.topic)
                    .where(ExampleTopicRow.workspace_id == workspace_id)
                )
            ).all()
        topics: dict[str, list[str]] = {}
        for example_id, topic in topic_rows:
            topics.setdefault(example_id, []).append(topic)
        with gc_paused():
            return [
                builder.StoredExample(h, fmt, formats.loads_stored(body), tuple(sorted(topics.get(i, ()))), body)
                for i, h, fmt, body in rows
            ]

    async def _trains(self, workspace_id: str) -> bool:
        """Whether the workspace's plan fine-tunes (so its job's data must suit the base model).
        A workspace not known here yet is treated as one that trains."""
        async with self.db.session() as session:
            row = await session.get(WorkspaceRow, workspace_id)
        return row is None or Workspace(row.id, row.name, row.plan, row.owner_email).can_train

    def token_counter(self, base_model: str):
        """The base model's tokenizer from the model store (cached), or None when absent."""
        folder = self.settings.resolved_model_store() / base_model
        try:
            stamp = (folder / "tokenizer.json").stat().st_mtime_ns
        except FileNotFoundError:
            return None  # looked up again next time: the weights may arrive later
        cached = self._counters.get(base_model)
        if cached is None or cached[0] != stamp:
            spec = get_registry().base_model(base_model)
            cached = (stamp, TokenCounter.for_model(self.settings.resolved_model_store(), base_model,
                                                    spec.training_chat_template))
            self._counters[base_model] = cached
        return cached[1]

    async def build(self, workspace_id, topics, method, kind, base_model, test_fraction, seed,
                    train_on_inputs="auto", overlength=common_pb2.OVERLENGTH_POLICY_UNSPECIFIED, max_epochs=0,
                    *, require_capabilities=False, dry_run=False):
        """Build (or find) the snapshot. ``require_capabilities`` (a job that fine-tunes): data the
        base model cannot take (core.capabilities) is refused; otherwise it is a warning.

        ``dry_run``: the same steps and the same summary, but nothing of the snapshot is kept (no
        files, no dataset row, no event); the summary has no ``dataset_id`` or ``artifact_path``
        and the files list is empty. A build that would be refused for want of examples returns
        its counts with that refusal as a warning instead, so a dry run can show where the data
        went. Token counts are still cached (``token_counts``, keyed by content hash): they are
        no part of a snapshot and spare the real build the counting."""
        violations = []
        registry = get_registry()
        if method not in registry.methods:
            violations.append(("method", f"unknown method {method!r}; choose one of {', '.join(sorted(registry.methods))}"))
        elif not kind:
            kind = registry.methods[method].dataset_kind
        if base_model not in registry.base_models:
            violations.append(("base_model", f"unknown base model {base_model!r}"))
        if not 0 < test_fraction <= 0.5:
            violations.append(("test_fraction", "must be in (0, 0.5]"))
        if (train_on_inputs or "auto") not in TRAIN_ON_INPUTS_CHOICES:
            violations.append(("train_on_inputs", "one of auto, true, false"))
        if violations:
            raise bad_request("invalid dataset request", violations)
        spec = registry.base_model(base_model)
        options = builder.BuildOptions(
            topics=tuple(sorted(set(topics))), kind=kind, method=method, base_model=base_model,
            context_length=spec.context_length, test_fraction=test_fraction, seed=seed,
            train_on_inputs=train_on_inputs or "auto",
            overlength="truncate" if overlength == common_pb2.OVERLENGTH_POLICY_TRUNCATE else "drop",
            max_epochs=max_epochs or 20,
        )
        examples = await self.load_examples(workspace_id)
        _, selected = builder.select_examples(examples, options.topics, kind)
        refusal = capabilities.refusal(
            base_model, spec.capabilities, await asyncio.to_thread(capabilities.summarize, [e.body for e in selected]),
            capabilities.catalog_of(registry.base_models))
        if refusal and require_capabilities:
            raise bad_request(refusal, [("base_model", refusal)])
        extra = [f"{refusal} A fine-tuning job on {base_model} is refused; the dataset itself can be downloaded."
                 ] if refusal else []
        counter = await asyncio.to_thread(self.token_counter, base_model)
        known = await self._stored_counts(workspace_id, counter.key) if counter else {}
        snap = await asyncio.to_thread(
            builder.build_snapshot, examples, options, None, counter.name if counter else "", known, extra,
            counter.count_stored if counter else None,
        )
        if snap.new_counts:
            await self._store_counts(workspace_id, counter.key, snap.new_counts)
        refusal = "" if snap.train else "no examples to train on: " + builder.describe_counts(snap.counts, options)
        if refusal and not dry_run:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        summary = common_pb2.DatasetSummary(
            dataset_id=snap.dataset_id,
            content_hash=snap.content_hash,
            train_count=len(snap.train),
            test_count=len(snap.test),
            topic_counts=snap.topic_counts,
            warnings=snap.warnings,
            filtered_count=snap.counts["filtered"],
            kind=kind,
            artifact_path=self.prefix(workspace_id, snap.dataset_id),
            workspace_example_count=snap.counts["workspace"],
            deduplicated_count=snap.counts["deduplicated"],
            overlength_count=snap.counts["overlength"],
            overlength_policy=(common_pb2.OVERLENGTH_POLICY_TRUNCATE if options.overlength == "truncate"
                               else common_pb2.OVERLENGTH_POLICY_DROP),
            train_on_inputs_rule=snap.train_on_inputs_rule,
            tokenizer=snap.tokenizer,
            context_length=options.context_length,
            topic_matched_count=snap.topic_matched,
        )
        if snap.token_stats:
            for split, field in (("train", summary.train_tokens), ("test", summary.test_tokens)):
                st = snap.token_stats[split]
                field.CopyFrom(common_pb2.TokenStats(count=st["count"], total=st["total"], mean=st["mean"],
                                                     p50=st["p50"], p95=st["p95"], max=st["max"]))
        if dry_run:
            summary.ClearField("dataset_id")
            summary.ClearField("artifact_path")
            if refusal:
                summary.warnings.append(f"a build would be refused: {refusal}")
            return summary, []
        async with self._build_lock:
            async with self.db.session() as session:
                existing = await session.get(DatasetRow, (workspace_id, snap.dataset_id))
            if existing is not None:
                return common_pb2.DatasetSummary.FromString(existing.summary), json.loads(existing.files)
            files = await asyncio.to_thread(self._write, workspace_id, snap)
            async with self.db.session() as session, session.begin():
                session.add(
                    DatasetRow(
                        id=snap.dataset_id,
                        workspace_id=workspace_id,
                        summary=summary.SerializeToString(),
                        files=json.dumps(files),
                    )
                )
        return summary, files

    async def _stored_counts(self, workspace_id: str, tokenizer_key: str) -> dict[str, int]:
        async with self.db.session() as session:
            rows = await session.execute(
                select(TokenCountRow.content_hash, TokenCountRow.tokens).where(
                    TokenCountRow.workspace_id == workspace_id, TokenCountRow.tokenizer_key == tokenizer_key)
            )
            return dict(rows.all())

    async def _store_counts(self, workspace_id: str, tokenizer_key: str, counts: dict[str, int]) -> None:
        try:
            async with self.db.session() as session, session.begin():
                conn = await session.connection()
                if conn.dialect.name == "sqlite":  # the driver's executemany, rows in key order (see _store)
                    await conn.exec_driver_sql(
                        "INSERT INTO token_counts (workspace_id, tokenizer_key, content_hash, tokens) VALUES (?, ?, ?, ?)",
                        [(workspace_id, tokenizer_key, h, n) for h, n in sorted(counts.items())])
                    return
                rows = [{"workspace_id": workspace_id, "tokenizer_key": tokenizer_key, "content_hash": h, "tokens": n}
                        for h, n in counts.items()]
                for i in range(0, len(rows), 5000):
                    await conn.execute(insert(TokenCountRow.__table__), rows[i:i + 5000])
        except IntegrityError:
            log.info("token counts stored concurrently; keeping the stored ones")

    def prefix(self, workspace_id: str, dataset_id: str) -> str:
        return f"datasets/{workspace_id}/{dataset_id}"

    def _write(self, workspace_id: str, snap: builder.Snapshot) -> list[dict]:
        prefix = self.prefix(workspace_id, snap.dataset_id)
        contents = {
            "train.jsonl": builder.jsonl(snap.train),
            "test.jsonl": builder.jsonl(snap.test),
            "manifest.json": json.dumps(snap.manifest, indent=2).encode(),
        }
        files = []
        for name, data in contents.items():
            key = f"{prefix}/{name}"
            self.store.put_bytes(key, data)
            files.append({"path": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        return files


def _summarize_json(bodies: list[str], total: int) -> capabilities.DataNeeds:
    with gc_paused():
        return capabilities.summarize((json.loads(b) for b in bodies), example_count=total)


class _ImportParser:
    """Splits streamed chunks into lines (which may span chunks) and validates them in order."""

    def __init__(self, options: pb.ImportOptions):
        self.options = options
        self.validator = formats.FileValidator(tuple(t.strip() for t in options.topics))
        self.examples: list[formats.ParsedExample] = []
        self.errors: list[formats.LineError] = []
        self.lines_read = 0
        self._line_no = 0
        self._buffer = b""
        self._skipping = False
        # A large import is validated in worker processes (workers.py), in batches, from the
        # line after MIN_PARALLEL on; results are taken in line order by finish().
        self._executor = None
        self._pending: list[tuple[int, bytes]] = []
        self._futures: list = []

    def _take(self, raw: bytes) -> None:
        self._line_no += 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.startswith(formats.BOM):  # a UTF-8 byte-order mark, as some editors write (also where
            raw = raw[3:]  # files were concatenated; whatever the chunking)
        if not raw.strip():
            return
        self.lines_read += 1
        if self.lines_read == workers.MIN_PARALLEL + 1:
            self._executor = workers.pool()  # None: everything in process
        if self._executor is not None:
            self._pending.append((self._line_no, raw))
            if len(self._pending) >= workers.VALIDATE_BATCH:
                self._submit()
            return
        example, errors = self.validator.line(raw, self._line_no)
        if example is not None:
            self.examples.append(example)
        else:
            self.errors.extend(errors)

    def _submit(self) -> None:
        batch, self._pending = self._pending, []
        try:
            future = self._executor.submit(workers.validate_lines, batch, self.validator.extra_topics)
        except RuntimeError:  # the pool broke or shut down: validate here
            future = None
        self._futures.append((future, batch))

    def feed(self, chunk: bytes) -> None:
        with gc_paused():  # parsed JSON has no reference cycles; the collector only slows this down
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        if self._skipping:  # the rest of an over-long line
            end = chunk.find(b"\n")
            if end < 0:
                return
            chunk = chunk[end + 1:]
            self._skipping = False
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            self._take(raw)
        if len(self._buffer) > formats.MAX_LINE_BYTES:
            # A line past the limit: report it once and skip to its end without holding it.
            self._take(self._buffer)
            self._buffer = b""
            self._skipping = True

    def finish(self) -> None:
        if self._buffer:
            self._take(self._buffer)
            self._buffer = b""
        if self._pending:
            self._submit()
        futures, self._futures = self._futures, []
        with gc_paused():
            for future, batch in futures:
                try:
                    results = future.result() if future is not None else None
                except Exception:  # a worker died (BrokenProcessPool, ...): the lines are judged here
                    log.warning("a validation worker failed; validating %d lines in process", len(batch),
                                exc_info=True)
                    workers.discard()
                    results = None
                if results is None:
                    results = workers.validate_lines(batch, self.validator.extra_topics)
                for result in results:
                    if len(result) == 2:  # (line, errors)
                        self.errors.extend(result[1])
                        continue
                    line, fmt, topics, content_hash, text = result
                    example, errors = self.validator.accept(
                        formats.ParsedExample(line, fmt, None, topics, content_hash, text))
                    if example is not None:
                        self.examples.append(example)
                    else:
                        self.errors.extend(errors)


class DatasetBuilderServicer(pb_grpc.DatasetBuilderServiceServicer):
    def __init__(self, app: DatasetBuilder):
        self.app = app

    async def ImportExamples(self, request_iterator, context):
        workspace = current_workspace()
        parser: _ImportParser | None = None
        received = 0
        async for request in request_iterator:
            if parser is None:
                options = request.options
                val.check("invalid import options",
                          lambda v: val.topics(v, "options.topics", options.topics),
                          lambda v: val.text(v, "options.source_name", options.source_name,
                                             max_len=val.MAX_SOURCE_NAME),
                          lambda v: val.enum(v, "options.mode", options.mode, pb.ImportMode))
                parser = _ImportParser(options)
            received += len(request.chunk)
            if received > MAX_IMPORT_BYTES:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"an import is at most {MAX_IMPORT_BYTES // 2**20} MiB; split the file")
            if request.chunk:
                await asyncio.to_thread(parser.feed, request.chunk)
        if parser is None:
            raise bad_request("empty import", [("options", "the first message must carry the options")])
        await asyncio.to_thread(parser.finish)
        errors = parser.errors
        response = pb.ImportExamplesResponse(lines_read=parser.lines_read, rejected=len({e.line for e in errors}),
                                             error_count=len(errors))
        for e in errors[:MAX_REPORTED_ERRORS]:
            response.errors.add(line=e.line, field=e.field, code=e.code, message=e.message)
        if errors and parser.options.mode == pb.IMPORT_MODE_ALL_OR_NOTHING:
            return response
        response.imported, response.duplicates = await self._store(workspace.id, parser)
        return response

    async def _store(self, workspace_id: str, parser: "_ImportParser") -> tuple[int, int]:
        """Insert new examples and topic links in one transaction; known hashes only gain topics."""
        parsed = parser.examples
        source = parser.options.source_name[:256]
        async with self.app.db.session() as session, session.begin():
            existing: dict[str, str] = {}
            hashes = list({p.content_hash for p in parsed})
            stored = (await session.execute(
                select(func.count()).select_from(ExampleRow).where(ExampleRow.workspace_id == workspace_id))).scalar()
            if stored and stored <= 4 * len(hashes):  # one pass over the workspace beats len/900 IN queries
                wanted = set(hashes)
                rows = await session.execute(
                    select(ExampleRow.content_hash, ExampleRow.id).where(ExampleRow.workspace_id == workspace_id))
                existing = {h: i for h, i in rows if h in wanted}
            elif stored:
                for i in range(0, len(hashes), 900):
                    rows = await session.execute(
                        select(ExampleRow.content_hash, ExampleRow.id).where(
                            ExampleRow.workspace_id == workspace_id, ExampleRow.content_hash.in_(hashes[i:i + 900])
                        )
                    )
                    existing.update(dict(rows.all()))
            known_topics: set[tuple[str, str]] = set()
            ids = list(existing.values())
            for i in range(0, len(ids), 900):
                rows = await session.execute(
                    select(ExampleTopicRow.example_id, ExampleTopicRow.topic).where(
                        ExampleTopicRow.example_id.in_(ids[i:i + 900]))
                )
                known_topics.update(rows.all())
            # New examples (the first line of each new hash) in content-hash order, given random ids
            # drawn and sorted beforehand: both indexes of the table then grow in key order, which
            # SQLite inserted about twice as fast as keys in random order (measured with 50k rows).
            first: dict[str, formats.ParsedExample] = {}
            for p in parsed:
                if p.content_hash not in existing and p.content_hash not in first:
                    first[p.content_hash] = p
            new = sorted(first.values(), key=lambda p: p.content_hash)
            for p, example_id in zip(new, sorted("ex_" + secrets.token_hex(10) for _ in new)):
                existing[p.content_hash] = example_id
            imported, duplicates = len(new), len(parsed) - len(new)
            topic_rows: list[tuple[str, str]] = []
            for p in parsed:
                example_id = existing[p.content_hash]
                for topic in p.topics:
                    if (example_id, topic) not in known_topics:
                        known_topics.add((example_id, topic))
                        topic_rows.append((example_id, topic))
            topic_rows.sort()
            conn = await session.connection()
            examples, topics = ExampleRow.__table__, ExampleTopicRow.__table__
            created_at = utcnow()
            if conn.dialect.name == "sqlite":  # the driver's executemany: no per-row work in SQLAlchemy
                bind = examples.c.created_at.type.bind_processor(conn.dialect)
                created_at = bind(created_at) if bind else created_at
                if new:
                    await conn.exec_driver_sql(
                        "INSERT INTO examples (id, workspace_id, content_hash, format, body, source_name,"
                        " source_line, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(existing[p.content_hash], workspace_id, p.content_hash, p.format, p.canonical_json,
                          source, p.line, created_at) for p in new])
                if topic_rows:
                    await conn.exec_driver_sql(
                        "INSERT INTO example_topics (example_id, topic, workspace_id) VALUES (?, ?, ?)",
                        [(example_id, topic, workspace_id) for example_id, topic in topic_rows])
            else:
                rows = [{"id": existing[p.content_hash], "workspace_id": workspace_id, "content_hash": p.content_hash,
                         "format": p.format, "body": p.canonical_json, "source_name": source, "source_line": p.line,
                         "created_at": created_at} for p in new]
                for i in range(0, len(rows), 5000):
                    await conn.execute(insert(examples), rows[i:i + 5000])
                rows = [{"example_id": example_id, "topic": topic, "workspace_id": workspace_id}
                        for example_id, topic in topic_rows]
                for i in range(0, len(rows), 5000):
                    await conn.execute(insert(topics), rows[i:i + 5000])
        return imported, duplicates

    async def ListTopics(self, request, context):
        workspace = current_workspace()
        async with self.app.db.session() as session:
            rows = (
                await session.execute(
                    select(ExampleTopicRow.topic, ExampleRow.format, func.count())
                    .join(ExampleRow, ExampleRow.id == ExampleTopicRow.example_id)
                    .where(ExampleTopicRow.workspace_id == workspace.id)
                    .group_by(ExampleTopicRow.topic, ExampleRow.format)
                )
            ).all()
            total = (
                await session.execute(select(func.count()).select_from(ExampleRow).where(ExampleRow.workspace_id == workspace.id))
            ).scalar()
        topics: dict[str, pb.TopicCount] = {}
        for topic, fmt, count in rows:
            tc = topics.setdefault(topic, pb.TopicCount(topic=topic))
            tc.example_count += count
            tc.format_counts[fmt] = count
        return pb.ListTopicsResponse(topics=[topics[t] for t in sorted(topics)], total_examples=total or 0)

    async def SummarizeExamples(self, request, context):
        """What the examples a job would train on need from its base model (core.capabilities).
        Filtered and de-duplicated as a build is (content hashes are unique per workspace); only
        the examples whose canonical JSON holds a candidate substring are parsed to confirm."""
        workspace = current_workspace()
        val.check("invalid request", lambda v: val.topics(v, "topics", request.topics),
                  lambda v: val.keyword(v, "dataset_kind", request.dataset_kind))
        kinds = sorted(set(formats.KIND_OF_FORMAT.values()))
        if request.dataset_kind and request.dataset_kind not in kinds:
            raise bad_request("invalid dataset kind",
                              [("dataset_kind", f"one of {', '.join(kinds)}, or empty for both")])
        conditions = [ExampleRow.workspace_id == workspace.id]
        if request.dataset_kind:
            conditions.append(ExampleRow.format.in_(
                [f for f, k in formats.KIND_OF_FORMAT.items() if k == request.dataset_kind]))
        if request.topics:
            conditions.append(ExampleRow.id.in_(
                select(ExampleTopicRow.example_id).where(ExampleTopicRow.workspace_id == workspace.id,
                                                         ExampleTopicRow.topic.in_(sorted(set(request.topics))))))
        candidate = or_(*(ExampleRow.body.contains(s, autoescape=True)
                          for subs in capabilities.CANDIDATE_SUBSTRINGS.values() for s in subs))
        async with self.app.db.session() as session:
            total = (await session.execute(select(func.count()).select_from(ExampleRow).where(*conditions))).scalar()
            bodies = (await session.execute(select(ExampleRow.body).where(*conditions, candidate))).scalars().all()
        needs = await asyncio.to_thread(_summarize_json, bodies, total or 0)
        return pb.SummarizeExamplesResponse(
            example_count=needs.example_count,
            tool_call_example_count=needs.tool_call_example_count,
            reasoning_example_count=needs.reasoning_example_count,
        )

    async def ListExamples(self, request, context):
        workspace = current_workspace()
        val.check("invalid request", lambda v: val.page(v, request),
                  lambda v: request.topic == "" or val.topic(v, "topic", request.topic))
        page = Page.of(request, default=100, maximum=1000)
        size, offset = page.size, page.offset
        async with self.app.db.session() as session:
            query = select(ExampleRow).where(ExampleRow.workspace_id == workspace.id)
            if request.topic:
                query = query.join(ExampleTopicRow, ExampleTopicRow.example_id == ExampleRow.id).where(
                    ExampleTopicRow.topic == request.topic
                )
            rows = (await session.execute(query.order_by(ExampleRow.created_at, ExampleRow.id).offset(offset).limit(size + 1))).scalars().all()
            ids = [r.id for r in rows[:size]]
            topic_rows = (
                await session.execute(select(ExampleTopicRow.example_id, ExampleTopicRow.topic).where(ExampleTopicRow.example_id.in_(ids)))
            ).all() if ids else []
        topics: dict[str, list[str]] = {}
        for example_id, topic in topic_rows:
            topics.setdefault(example_id, []).append(topic)
        return pb.ListExamplesResponse(
            examples=[
                pb.Example(
                    example_id=r.id, content_hash=r.content_hash, format=r.format,
                    topics=sorted(topics.get(r.id, [])), json=r.body, source_name=r.source_name,
                    source_line=r.source_line, created_at=timestamp(r.created_at),
                )
                for r in rows[:size]
            ],
            next_page_token=page.next_token(len(rows)),
        )

    async def DeleteExamples(self, request, context):
        workspace = current_workspace()
        val.check("invalid request",
                  lambda v: val.repeated(v, "example_ids", request.example_ids, max_items=val.MAX_IDS,
                                         each=val.identifier),
                  lambda v: val.topics(v, "topics", request.topics))
        if not request.example_ids and not request.topics:
            raise bad_request("nothing to delete", [("example_ids", "give example ids or topics")])
        async with self.app.db.session() as session, session.begin():
            ids = set(request.example_ids)
            if request.topics:
                rows = await session.execute(
                    select(ExampleTopicRow.example_id).where(
                        ExampleTopicRow.workspace_id == workspace.id, ExampleTopicRow.topic.in_(list(request.topics))
                    )
                )
                ids.update(r for (r,) in rows)
            if not ids:
                return pb.DeleteExamplesResponse(deleted=0)
            wanted, owned = sorted(ids), []
            for i in range(0, len(wanted), 900):  # a big topic: SQLite takes at most 32,766 variables
                owned += [r for (r,) in await session.execute(select(ExampleRow.id).where(
                    ExampleRow.workspace_id == workspace.id, ExampleRow.id.in_(wanted[i:i + 900])))]
            for i in range(0, len(owned), 900):
                await session.execute(delete(ExampleTopicRow).where(ExampleTopicRow.example_id.in_(owned[i:i + 900])))
                await session.execute(delete(ExampleRow).where(ExampleRow.id.in_(owned[i:i + 900])))
        return pb.DeleteExamplesResponse(deleted=len(owned))

    async def BuildDataset(self, request, context):
        workspace = current_workspace()
        val.check("invalid dataset request",
                  lambda v: val.topics(v, "topics", request.topics),
                  lambda v: val.keyword(v, "method", request.method),
                  lambda v: val.keyword(v, "base_model", request.base_model),
                  lambda v: val.keyword(v, "train_on_inputs", request.train_on_inputs),
                  lambda v: val.enum(v, "overlength_policy", request.overlength_policy, common_pb2.OverlengthPolicy),
                  lambda v: 0 <= request.max_epochs <= 100 or v.add("max_epochs", "0 (the default, 20) to 100"),
                  lambda v: 0 <= request.seed < 2**31 or v.add("seed", "0 to 2147483647"))
        summary, files = await self.app.build(
            workspace.id, list(request.topics), request.method or "sft", "", request.base_model,
            request.test_fraction or 0.1, request.seed, request.train_on_inputs or "auto",
            request.overlength_policy, request.max_epochs, dry_run=request.dry_run,
        )
        return pb.BuildDatasetResponse(dataset=summary, files=[common_pb2.ArtifactFile(**f) for f in files])

    async def ListDatasets(self, request, context):
        """The workspace's snapshots, newest first (offset pages, as ListJobs)."""
        workspace = current_workspace()
        val.check("invalid request", lambda v: val.page(v, request))
        page = Page.of(request, default=50, maximum=200)
        async with self.app.db.session() as session:
            rows = (
                await session.execute(
                    select(DatasetRow.summary, DatasetRow.created_at)
                    .where(DatasetRow.workspace_id == workspace.id)
                    .order_by(DatasetRow.created_at.desc(), DatasetRow.id)
                    .offset(page.offset)
                    .limit(page.size + 1)
                )
            ).all()
        return pb.ListDatasetsResponse(
            datasets=[pb.DatasetListEntry(dataset=common_pb2.DatasetSummary.FromString(summary),
                                          create_time=timestamp(created_at))
                      for summary, created_at in rows[:page.size]],
            next_page_token=page.next_token(len(rows)),
        )

    async def _dataset(self, dataset_id: str) -> DatasetRow:
        workspace = current_workspace()
        val.check("invalid request", lambda v: val.identifier(v, "dataset_id", dataset_id))
        async with self.app.db.session() as session:
            row = await session.get(DatasetRow, (workspace.id, dataset_id)) if dataset_id else None
        if row is None:
            raise not_found(f"dataset {dataset_id!r}")
        return row

    async def GetDataset(self, request, context):
        row = await self._dataset(request.dataset_id)
        return pb.GetDatasetResponse(
            dataset=common_pb2.DatasetSummary.FromString(row.summary),
            files=[common_pb2.ArtifactFile(**f) for f in json.loads(row.files)],
            created_at=timestamp(row.created_at),
        )

    async def DownloadDataset(self, request, context):
        row = await self._dataset(request.dataset_id)
        paths = [f["path"] for f in json.loads(row.files)]
        async for chunk in file_chunks(self.app.store, self.app.prefix(row.workspace_id, row.id), paths):
            yield pb.DownloadDatasetResponse(chunk=chunk)
