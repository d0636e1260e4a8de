"""``tuneforge data ...`` (the workspace's training examples) and ``tuneforge datasets ...``
(immutable dataset snapshots built from them).

Every command takes ``--json`` (one JSON document on stdout: the RPC's response, or a small dict
for a download); errors and exit codes come from :func:`common.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.cli.common import (
    UsageError, _clients, _size, _truncate, add_json, add_paging, downloaded_files, next_page_command, pages,
    print_downloaded, print_json, print_page_hint, run, table,
    timestamp_text, wants_json,
)


def cmd_data_import(args) -> int:
    from tuneforge import sdk

    async def work():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        progress = Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TextColumn("then validating and storing ..."), transient=True,
                            disable=not sys.stderr.isatty(), console=Console(stderr=True))
        task = progress.add_task("import", total=Path(args.file).stat().st_size)
        async with _clients(args) as clients:
            with progress:
                reply = await sdk.import_file(clients, Path(args.file), args.topic, all_or_nothing=args.all_or_nothing,
                                              on_progress=lambda sent, total: progress.update(task, completed=sent))
        if wants_json(args):
            print_json(reply)
            return 0 if reply.rejected == 0 else 1
        print(f"read {reply.lines_read} lines: {reply.imported} imported, {reply.duplicates} already stored, "
              f"{reply.rejected} rejected")
        for e in reply.errors:
            print(f"  line {e.line}: {e.field or '(line)'}: [{e.code}] {e.message}")
        if reply.error_count > len(reply.errors):
            print(f"  ... and {reply.error_count - len(reply.errors)} more errors")
        if reply.errors:  # counts per code (of the errors reported, the first 1,000)
            by_code: dict[str, int] = {}
            for e in reply.errors:
                by_code[e.code] = by_code.get(e.code, 0) + 1
            print("errors by code: " + ", ".join(f"{c} {n}" for c, n in sorted(by_code.items(), key=lambda x: -x[1])))
        return 0 if reply.rejected == 0 else 1

    return run(args, work())


def cmd_data_topics(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    async def work():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.ListTopics(dsb.ListTopicsRequest())
        if wants_json(args):
            print_json(reply)
            return 0
        print(table([(t.topic, t.example_count, ", ".join(f"{k} {v}" for k, v in sorted(t.format_counts.items())))
                     for t in reply.topics], ("TOPIC", "EXAMPLES", "FORMATS"), empty="(no topics)"))
        print(f"{reply.total_examples} examples in the workspace")
        return 0

    return run(args, work())


def cmd_data_list(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb


    async def work():
        async with _clients(args) as clients:
            examples, token = await pages(lambda size, page_token: clients.dataset_builder.ListExamples(
                dsb.ListExamplesRequest(topic=args.topic or "", page_size=size, page_token=page_token)), args, "examples")
        if wants_json(args):
            print_json(dsb.ListExamplesResponse(examples=examples, next_page_token=token))
            return 0
        print(table([(e.example_id, e.format, ",".join(e.topics), e.content_hash[:12]) for e in examples],
                    ("ID", "FORMAT", "TOPICS", "HASH"), empty="(no examples)"))
        print_page_hint(token, next_page_command(args, "tuneforge data list", topic=args.topic))
        return 0

    return run(args, work())


def cmd_data_delete(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    if not args.id and not args.topic:  # an empty request would delete nothing; say what is needed
        raise UsageError("data delete: give --id ID and/or --topic TOPIC (each repeatable)")

    async def work():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.DeleteExamples(
                dsb.DeleteExamplesRequest(example_ids=args.id or [], topics=args.topic or []))
        if wants_json(args):
            print_json(reply)
        else:
            print(f"deleted {reply.deleted} example{'s' if reply.deleted != 1 else ''}")
        return 0

    return run(args, work())


def _print_dataset(summary, files=(), created=None, *, dry_run: bool = False) -> None:
    """A snapshot's summary: what each step of the build kept, the split, token statistics, files."""
    from tuneforge.api.common.v1 import common_pb2

    d = summary
    title = "dry run (nothing stored)" if dry_run else f"dataset {d.dataset_id}"
    print(f"{title}: {d.kind or '-'}" + (f", built {timestamp_text(created)}" if created is not None else ""))
    policy = {"DROP": "dropped", "TRUNCATE": "truncated"}.get(
        common_pb2.OverlengthPolicy.Name(d.overlength_policy).removeprefix("OVERLENGTH_POLICY_"), "-")
    over = f"{d.overlength_count} over {d.context_length} tokens ({policy})" if d.context_length else \
        f"{d.overlength_count} over-length ({policy})"
    print(f"  examples    {d.workspace_example_count} in the workspace → {d.topic_matched_count} with the topics → "
          f"{d.filtered_count} of the format → {d.deduplicated_count} after dedupe → {over} → "
          f"{d.train_count} train + {d.test_count} test")
    topics = ", ".join(f"{t} {n}" for t, n in sorted(d.topic_counts.items()))
    print(f"  topics      {topics or '-'}")
    for name, stats in (("train", d.train_tokens), ("test", d.test_tokens)):
        if d.HasField(f"{name}_tokens"):
            print(f"  tokens      {name}: {stats.total} in {stats.count} examples (mean {stats.mean:.1f}, "
                  f"p50 {stats.p50}, p95 {stats.p95}, max {stats.max})")
    print(f"  tokenizer   {d.tokenizer or '- (no token statistics)'}")
    if d.train_on_inputs_rule:
        print(f"  loss on     {d.train_on_inputs_rule}")
    if d.content_hash:
        print(f"  hash        {d.content_hash}")
    for w in d.warnings:
        print(f"  warning     {_truncate(w, 300)}")
    if files:
        print("  files")
        for f in files:
            print(f"    {f.path:32s} {_size(f.size_bytes):>10s}  sha256 {f.sha256[:12]}")


def cmd_dataset_build(args) -> int:
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    async def work():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(
                topics=args.topic or [], method=args.method, base_model=args.base_model,
                test_fraction=args.test_fraction, seed=args.seed, train_on_inputs=args.train_on_inputs,
                overlength_policy=common_pb2.OverlengthPolicy.Value(f"OVERLENGTH_POLICY_{args.overlength.upper()}"),
                max_epochs=args.max_epochs, dry_run=args.dry_run), timeout=600)
        if wants_json(args):
            print_json(reply)
        else:
            _print_dataset(reply.dataset, reply.files, dry_run=args.dry_run)
        return 0

    return run(args, work())


def cmd_dataset_get(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

    async def work():
        async with _clients(args) as clients:
            reply = await clients.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=args.dataset_id))
        if wants_json(args):
            print_json(reply)
        else:
            _print_dataset(reply.dataset, reply.files, reply.created_at)
        return 0

    return run(args, work())


def cmd_dataset_list(args) -> int:
    from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb


    async def work():
        async with _clients(args) as clients:
            entries, token = await pages(lambda size, page_token: clients.dataset_builder.ListDatasets(
                dsb.ListDatasetsRequest(page_size=size, page_token=page_token)), args, "datasets")
        if wants_json(args):
            print_json(dsb.ListDatasetsResponse(datasets=entries, next_page_token=token))
            return 0
        print(table([(e.dataset.dataset_id, e.dataset.train_count, e.dataset.test_count, e.dataset.kind,
                      ",".join(f"{t}={n}" for t, n in sorted(e.dataset.topic_counts.items())),
                      timestamp_text(e.create_time)) for e in entries],
                    ("ID", "TRAIN", "TEST", "KIND", "TOPICS", "CREATED"), empty="(no datasets)"))
        print_page_hint(token, next_page_command(args, "tuneforge datasets list"))
        return 0

    return run(args, work())


def cmd_dataset_download(args) -> int:
    from tuneforge import sdk

    async def work():
        out_dir = Path(args.dir).resolve()
        async with _clients(args) as clients:
            paths = await sdk.download_dataset(clients, args.dataset_id, out_dir)
        print_downloaded(args, {"dataset_id": args.dataset_id}, out_dir, downloaded_files(out_dir, paths))
        return 0

    return run(args, work())


def register(sub) -> None:
    data = sub.add_parser("data", help="training examples").add_subparsers(dest="sub", required=True)
    p = data.add_parser("import", help="import a JSONL file of examples")
    p.add_argument("file")
    p.add_argument("--topic", action="append", help="topic added to every example (repeatable)")
    p.add_argument("--all-or-nothing", action="store_true", help="store nothing unless every line is valid")
    p.set_defaults(fn=cmd_data_import)
    p = data.add_parser("topics", help="topics with example counts per format")
    p.set_defaults(fn=cmd_data_topics)
    p = data.add_parser("list", help="stored examples (ListExamples)")
    p.add_argument("--topic", help="only examples with this topic")
    add_paging(p)
    p.set_defaults(fn=cmd_data_list)
    p = data.add_parser("delete", help="delete examples by id and/or topic")
    p.add_argument("--id", action="append", metavar="EXAMPLE_ID", help="example id (repeatable)")
    p.add_argument("--topic", action="append", help="delete every example with this topic (repeatable)")
    p.set_defaults(fn=cmd_data_delete)
    for parser in data.choices.values():
        add_json(parser)

    ds = sub.add_parser("datasets", help="dataset snapshots").add_subparsers(dest="sub", required=True)
    p = ds.add_parser("build", help="build (or find) a dataset snapshot without a job")
    p.add_argument("--base-model", required=True)
    p.add_argument("--method", default="sft")
    p.add_argument("--topic", action="append", help="topic filter (repeatable; default all)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-on-inputs", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--overlength", choices=["drop", "truncate"], default="drop")
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="the counts and tokens a build would give; store nothing")
    p.set_defaults(fn=cmd_dataset_build)
    p = ds.add_parser("get", help="a snapshot's summary: counts after each step, token statistics, files")
    p.add_argument("dataset_id")
    p.set_defaults(fn=cmd_dataset_get)
    p = ds.add_parser("list", help="the workspace's snapshots, newest first (ListDatasets)")
    add_paging(p)
    p.set_defaults(fn=cmd_dataset_list)
    p = ds.add_parser("download", help="download a snapshot's files (train.jsonl, test.jsonl, manifest.json)")
    p.add_argument("dataset_id")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_dataset_download)
    for parser in ds.choices.values():
        add_json(parser)
