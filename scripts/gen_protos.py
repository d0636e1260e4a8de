#!/usr/bin/env python
"""Regenerate the committed gRPC/protobuf Python code from protos/ (the one way to do it).

    python scripts/gen_protos.py            # writes services/tuneforge/api/
    python scripts/gen_protos.py --check    # exits 1 when the committed code is stale

The proto tree mirrors the import root, so protoc's absolute imports need no fix-ups.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services"
API_DIR = Path("tuneforge") / "api"
INIT_TEXT = '"""Generated protobuf and gRPC code. Do not edit: run scripts/gen_protos.py."""\n'


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = str(files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Packages: every folder under tuneforge/api gets an __init__.py.
    api = out_root / API_DIR
    for folder in [api, *[p for p in api.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").write_text(INIT_TEXT)
    return protos


def generated_files(root: Path) -> set[Path]:
    api = root / API_DIR
    return {p.relative_to(root) for p in api.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        want = generated_files(tmp_root)
        have = generated_files(OUT_ROOT)
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(str(p) for p in want & have if not filecmp.cmp(tmp_root / p, OUT_ROOT / p, shallow=False))
    if stale:
        print("generated code is stale; run `python scripts/gen_protos.py`:", *stale, sep="\n  ")
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    api = OUT_ROOT / API_DIR
    if api.exists():
        shutil.rmtree(api)
    protos = generate(OUT_ROOT)
    print(f"generated {len(protos)} protos into {api.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
