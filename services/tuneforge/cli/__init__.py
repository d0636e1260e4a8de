"""The ``tuneforge`` command line: one module per command group (server, models, workspaces,
data/datasets, jobs), what they share in :mod:`tuneforge.cli.common`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from tuneforge.cli import data, jobs, models, server, workspaces
from tuneforge.cli.common import (
    DEBUG_HINT, EXIT_CODES_HELP, EXIT_UNAVAILABLE, EXIT_USAGE, Unavailable, UsageError, _error_line, _parse_options,
    _parse_sets, _shown, error_document, print_json,
)

GROUPS = (server, models, workspaces, data, jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune, own and host your own LLMs.",
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("--data-dir", help="state directory (default .tuneforge or $TUNEFORGE_DATA_DIR)")
    parser.add_argument("--api-key", help="workspace API key (default $TUNEFORGE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's errors (bad choices, missing arguments) as one line, exit code 2, on every
    subcommand's parser too."""

    def error(message: str):
        parser.exit(2, f"tuneforge: error: {parser.prog.removeprefix('tuneforge').strip()}"
                       f"{': ' if parser.prog != 'tuneforge' else ''}{message}\n")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _one_line_errors(sub)


def _check_arguments(args) -> None:
    """Values the command would only read after connecting: judged first, so a bad one is a
    usage error whatever the state of the stack."""
    sub = getattr(args, "sub", "")
    client = (args.command in ("data", "jobs", "datasets")
              or args.command == "models" and sub not in ("make-standin", "import", "real-model")
              or args.command == "workspaces" and sub != "create")
    key = args.api_key if args.api_key is not None else (os.environ.get("TUNEFORGE_API_KEY", "") if client else "")
    if key and not re.fullmatch(r"[\x21-\x7e]{1,512}", key):  # it travels in a gRPC header
        where = "--api-key" if args.api_key is not None else "$TUNEFORGE_API_KEY"
        raise UsageError(f"{where}: an API key is printable ASCII without spaces (as `workspaces create` printed it)")
    limit = getattr(args, "limit", None)
    if limit is not None and not 1 <= limit <= 200:
        raise UsageError("--limit must be 1 to 200")
    if getattr(args, "set", None):
        _parse_sets(args.set)
    if getattr(args, "option", None):
        _parse_options(args.option)
    if args.command == "data" and getattr(args, "file", None):
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"{_shown(args.file)}: {'is a directory' if path.is_dir() else 'no such file'}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{_shown(args.file)}: not readable")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _one_line_errors(parser)
    args = parser.parse_args(argv)
    debug = os.environ.get("TUNEFORGE_DEBUG", "") not in ("", "0")
    try:
        if args.data_dir:
            os.environ["TUNEFORGE_DATA_DIR"] = str(Path(args.data_dir).resolve())
        _check_arguments(args)
        return args.fn(args)
    except UsageError as exc:
        if getattr(args, "json", False):
            print_json(error_document(exc))
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unavailable as exc:
        if getattr(args, "json", False):
            print_json(error_document(exc))
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a missing stack file, an unreadable folder: the message says it all
        print(f"tuneforge: error: {_error_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, never a traceback (unless asked for)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"tuneforge: error: {_error_line(exc)}" + ("" if debug else f" ({DEBUG_HINT})"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
