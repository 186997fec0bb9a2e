"""The package's shape: no import cycle (imports inside functions count), no private name imported from another
module, and modules small enough to read (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_distill"
LARGEST_MODULE = 600
TRAINER = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """`(module, imported name)` for every import of a hf_distill module in `path`, at any depth of the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "hf_distill":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, "") if submodule in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "hf_distill"]
    return found


def import_cycles(known: dict[str, Path]) -> list[list[str]]:
    graph = {
        name: {target for target, _ in imports(name, path, known) if target != name} for name, path in known.items()
    }
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target) :] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycle_inside_the_package():
    cycles = import_cycles(modules())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [
        f"{name} imports {target}.{imported}"
        for name, path in known.items()
        for target, imported in imports(name, path, known)
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert not private, private


def test_modules_stay_readable_in_size():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert sizes["hf_distill.trainer"] <= TRAINER, sizes["hf_distill.trainer"]
    assert {name: size for name, size in sizes.items() if size > LARGEST_MODULE} == {}


def test_a_cycle_and_a_private_import_are_seen(tmp_path):
    """The checks above on a made-up package: they can fail."""
    for module, text in {"a": "from .b import _helper\n", "b": "def f():\n    from . import a\n"}.items():
        (tmp_path / f"{module}.py").write_text(text)
    known = {"hf_distill.a": tmp_path / "a.py", "hf_distill.b": tmp_path / "b.py"}
    assert imports("hf_distill.a", known["hf_distill.a"], known) == [("hf_distill.b", "_helper")]
    assert imports("hf_distill.b", known["hf_distill.b"], known) == [("hf_distill.a", "")]
    assert import_cycles(known) == [["hf_distill.a", "hf_distill.b", "hf_distill.a"]]
