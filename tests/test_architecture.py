"""The folders are the architecture (docs/architecture.md): imports point down, never up, and the
pure rooms stay free of torch and Megatron. Read from the source, so a new import cannot slip in."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_microep"
BASE = {"settings", "validation"}
# Room -> the project rooms its modules may import (besides itself and BASE).
MAY_IMPORT = {
    "planning": set(),
    "simulator": {"planning"},
    "runtime": {"planning"},
    "glue": {"planning", "simulator", "runtime"},
    "cli": {"planning", "simulator", "runtime", "glue"},
}
# Room -> third-party top-level packages its modules must not import.
MUST_NOT_IMPORT = {
    "planning": {"torch", "megatron"},
    "simulator": {"torch", "megatron"},
    "runtime": {"megatron"},
    "base": {"torch", "megatron"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _room(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if relative.parts == ("__main__.py",):
        return "cli"  # ``python -m megatron_microep``: the command's entry point
    return relative.parts[0] if len(relative.parts) > 1 else "base"


def test_imports_point_down_and_pure_rooms_stay_pure():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "megatron_microep" and len(parts) > 1:
                target = parts[1]
                allowed = BASE | {room} | MAY_IMPORT.get(room, set())
                if room == "base" and target not in BASE:
                    problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
                elif room != "base" and target not in allowed:
                    problems.append(f"{path.relative_to(PACKAGE)} ({room}) imports {name}")
            elif parts[0] in MUST_NOT_IMPORT.get(room, set()):
                problems.append(f"{path.relative_to(PACKAGE)} ({room}) imports {name}")
    assert not problems, "\n".join(problems)
