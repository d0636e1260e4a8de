"""The core never reaches into an external plugin distribution: models arrive through entry points.

``services/`` is scanned with ``ast`` (not imported), so the check holds whether or not a plugin is
installed: no ``import``/``from`` of a plugin module and no string naming one (``importlib``).
"""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

SERVICES = Path(__file__).resolve().parent.parent / "services"
EXTERNAL_PLUGIN_MODULES = {"tuneforge_mistral"}  # plugins/tuneforge-mistral, its own distribution


def external_plugin_modules() -> set[str]:
    """Top-level modules of every installed ``tuneforge`` plugin that tuneforge itself does not ship."""
    found = set(EXTERNAL_PLUGIN_MODULES)
    for ep in entry_points(group="tuneforge"):
        if ep.dist is not None and ep.dist.name != "tuneforge":
            found.add(ep.module.split(".")[0])
    return found


def references(tree: ast.AST, modules: set[str]) -> list[tuple[int, str]]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        else:
            continue
        hits += [(node.lineno, name) for name in names if name.split(".")[0] in modules]
    return hits


def test_the_scan_finds_an_import():
    tree = ast.parse("import os\nfrom tuneforge_mistral import specs\nimportlib.import_module('tuneforge_mistral')\n")
    assert references(tree, {"tuneforge_mistral"}) == [(2, "tuneforge_mistral"), (3, "tuneforge_mistral")]


def test_services_import_no_external_plugin():
    modules = external_plugin_modules()
    sources = sorted(SERVICES.rglob("*.py"))
    assert len(sources) > 30 and SERVICES / "tuneforge" / "plugins.py" in sources
    offenders = [f"{path.relative_to(SERVICES)}:{line}: {name}"
                 for path in sources
                 for line, name in references(ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)]
    assert offenders == []
