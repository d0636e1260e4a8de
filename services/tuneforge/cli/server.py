"""``tuneforge up|serve|quickstart|demo``: running tuneforge."""

from __future__ import annotations

import argparse  # noqa: F401
import asyncio  # noqa: F401
import json  # noqa: F401
import os  # noqa: F401
import signal  # noqa: F401
import sys  # noqa: F401
from pathlib import Path  # noqa: F401

from tuneforge.core.settings import SERVICES
from tuneforge.cli.common import _data_dir, _parse_sets


# -- server side -------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from tuneforge.core.service import configure_logging, serve_forever
    from tuneforge.core.settings import get_settings
    from tuneforge.stack import load_service_class

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, args.service)
    service = load_service_class(args.service)(settings)
    serve_forever(service)
    return 0


def cmd_up(args) -> int:
    from tuneforge.stack import Stack

    import threading

    data_dir = _data_dir(args)
    # Supervised: a process that exits on its own (a service, or the bundled nats-server) is
    # restarted with back-off and a line on stderr; a crash loop is reported and given up on
    # (stack.RestartPolicy). Only Ctrl-C / SIGTERM stops everything.
    stack = Stack(data_dir, nats_url=args.nats_url, supervise=True)
    print(f"starting tuneforge in {data_dir} ...", flush=True)
    stack.start()
    print(f"NATS: {stack.nats_url}")
    for service, target in stack.endpoints.items():
        print(f"  {service:16s} {target}")
    print(f"admin token: {data_dir / 'admin_token'}\nlogs: {data_dir / 'logs'}\n"
          "Services that exit are restarted. Ctrl-C stops everything.", flush=True)
    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


def cmd_quickstart(args) -> int:
    from tuneforge.quickstart import main as quickstart_main

    return quickstart_main(data_dir=_data_dir(args) / "quickstart", keep_running=args.keep_running)


def cmd_demo(args) -> int:
    from tuneforge.core.settings import get_settings
    from tuneforge.demo import main as demo_main

    return demo_main(data_dir=_data_dir(args) / "demo", model_store=get_settings().resolved_model_store(),
                     keep_running=args.keep_running, overrides=_parse_sets(args.set or []))


def register(sub) -> None:
    p = sub.add_parser("up", help="run the embedded default: nats-server and the five services")
    p.add_argument("--nats-url", help="use this NATS server instead of starting the bundled one")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("serve", help="run one service")
    p.add_argument("service", choices=SERVICES)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("quickstart", help="start the stack and fine-tune a stand-in model end to end")
    p.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")
    p.set_defaults(fn=cmd_quickstart)
    p = sub.add_parser("demo", help="fine-tune the real SmolLM2 135M (make real-model) and show base vs fine-tuned")
    p.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards (to try the model)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo hyperparameter (repeatable)")
    p.set_defaults(fn=cmd_demo)

