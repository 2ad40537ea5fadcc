"""The layering of docs/structure.md: the core (models, kernels, engine, server) and the load test import
neither the benches, the command line nor the training recipes, and the benches do not import the command
line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> packages its modules may not import
CORE_FORBIDDEN = ("linrec.bench", "linrec.cli", "linrec.recipes")
FORBIDDEN = {
    "models": CORE_FORBIDDEN,
    "kernels": CORE_FORBIDDEN,
    "engine": CORE_FORBIDDEN,
    "server": CORE_FORBIDDEN,
    "loadtest": CORE_FORBIDDEN,
    "bench": ("linrec.cli", "linrec.recipes"),
    "cli": ("linrec.recipes",),
}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_inner_layers_import_no_outer_one() -> None:
    offenders = []
    for folder, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imported_modules(path):
                if any(name == outer or name.startswith(outer + ".") for outer in forbidden):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_the_server_reaches_the_engine_only_through_its_client_protocol() -> None:
    """server/ holds an EngineClient (engine/client.py): no attribute named `engine` (EngineCore), and no import
    of the engine's internals (core, scheduler, pool, runner), so that an engine in another process (Ray Serve
    replicas) serves the same app."""
    internals = ("linrec.engine.scheduler", "linrec.engine.state_pool", "linrec.engine.runner", "linrec.engine.llm")
    offenders = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "engine":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .engine")
        for name in _imported_modules(path):
            if name in internals:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
