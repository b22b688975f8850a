"""The package's imports point one way: foundation -> data -> models -> sampling -> train -> evaluation -> commands.

Read from the source (every import statement, lazy ones inside functions too), so a module that reaches a layer
above it fails here with the import named, before it can grow into a cycle.
`python -m tests.unit.foundation.test_architecture` prints the whole graph (module -> the cxrdist modules it
imports) and the count of upward imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cxrdist

PACKAGE_DIR = Path(cxrdist.__file__).parent
# Bottom to top. Foundation: what every layer may use (errors, typed config, atomic files, logging, progress
# reporting, CLI plumbing) and the metrics, which are numpy/torch functions of images and labels with no cxrdist
# dependency.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("cxrdist", "errors", "config", "config_reference", "fileio", "locks", "logging_utils", "progress",
                    "env_info", "cli_options", "processes", "metrics")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("sampling", ("sampling",)),
    ("train", ("train",)),
    ("evaluation", ("evaluation",)),
    ("commands", ("commands", "cli")),
]


def module_name(path: Path) -> str:
    parts = ["cxrdist", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The cxrdist modules that module `name` (source text `source`) imports anywhere in its body, lazily inside a
    function too; `from pkg import mod` counts as pkg.mod."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cxrdist")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "cxrdist":
                continue
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.add(candidate if candidate in known else origin)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported_modules(name, path.read_text(encoding="utf-8"), set(mods), path.name == "__init__.py")
            for name, path in mods.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in {__file__}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(module)]


def test_every_module_has_a_layer_and_no_import_points_up():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    assert upward_imports(graph) == []


def test_the_checker_sees_lazy_and_relative_imports():
    """A lazy import inside a function, from a layer above, is caught: the checker is not blind to them."""
    source = "import os\n\ndef f():\n    from cxrdist.train.trainer import Trainer\n    from . import index\n"
    found = imported_modules("cxrdist.data.loader", source, set(modules()))
    assert found == {"cxrdist.train.trainer", "cxrdist.data.index"}
    assert upward_imports({"cxrdist.data.loader": found}) == [
        "cxrdist.data.loader (data) imports cxrdist.train.trainer (train)"]


def test_presets_ship_inside_the_package():
    from cxrdist.config import PRESETS_DIR, resolve_preset

    assert PRESETS_DIR.parent == PACKAGE_DIR
    for name in ("dev", "product", "demo"):
        assert resolve_preset(name).parent == PRESETS_DIR
    pyproject = (PACKAGE_DIR.parent / "pyproject.toml").read_text()
    assert '"presets/*.yaml"' in pyproject  # package data: a wheel carries them


if __name__ == "__main__":
    graph = import_graph()
    for module, targets in sorted(graph.items()):
        print(module.removeprefix("cxrdist."), "->", " ".join(sorted(t.removeprefix("cxrdist.") for t in targets)))
    print(f"upward imports: {len(upward_imports(graph))}")
