"""The package's floors: every import (module level or inside a function) goes down, never up
and never sideways to another package of the same floor, and no modules import each other in
a circle. The README's "How the code is laid out" describes the same floors."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: From the top floor down: the first part of each module's name below `sciquant`.
FLOORS = (
    ("cli",),
    ("benchmarks",),
    ("batch",),
    ("launch",),
    ("study",),
    ("workloads", "report"),
    ("quant",),
    ("runtime", "vocabulary"),
    ("models", "data", "plugins"),
    ("provenance", "errors"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "sciquant").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The sciquant modules a module imports (a `from package import module` is the module)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    return {target for target in targets if target in modules and target != name}


def _floor(name: str) -> tuple[int, str]:
    """The floor (0: top) and the package of a module (`sciquant` itself, which holds only the
    version and imports nothing: the ground, below every floor)."""
    parts = name.split(".")
    if len(parts) == 1:
        return len(FLOORS), ""
    for index, packages in enumerate(FLOORS):
        if parts[1] in packages:
            return index, parts[1]
    raise AssertionError(f"{name} is on no floor: add its package to FLOORS (and the README)")


def test_every_import_goes_down_a_floor_or_stays_in_its_package() -> None:
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        floor, package = _floor(name)
        for target in sorted(_imports(path, name, modules)):
            target_floor, target_package = _floor(target)
            if target_package == package or target_floor > floor:
                continue
            wrong.append(f"{name} (floor {floor}) imports {target} (floor {target_floor})")
    assert not wrong, "\n".join(wrong)
    assert not _imports(modules["sciquant"], "sciquant", modules)


def test_no_modules_import_each_other_in_a_circle() -> None:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" → ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def test_the_floors_name_every_package_and_the_readme_describes_them() -> None:
    packages = {name.split(".")[1] for name in _modules() if "." in name}
    named = {package for floor in FLOORS for package in floor}
    assert packages == named
    readme = (SRC.parent / "README.md").read_text()
    layout = readme[readme.index("### How the code is laid out") :]
    layout = layout[: layout.index("\n## ")]
    positions = [min(layout.index(f"`{package}`") for package in floor) for floor in FLOORS]
    assert positions == sorted(positions), "README lists the floors in another order"


def test_quantization_drivers_do_not_import_evaluation_code() -> None:
    """A workload's quantize, dynamic-quantize and sensitivity drivers reach its evaluation
    neither directly nor through another module."""
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    drivers = [name for name in modules
               if name.rsplit(".", 1)[-1] in ("quantize", "dynamic", "sensitivity")]  # fmt: skip
    assert len(drivers) == 4, drivers
    for driver in drivers:
        reached, todo = set(), [driver]
        while todo:
            for target in graph[todo.pop()] - reached:
                reached.add(target)
                todo.append(target)
        assert not {name for name in reached if name.endswith(".evaluate")}, driver
