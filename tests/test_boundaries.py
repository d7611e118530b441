"""The kit's boundaries, read from its source: no import cycles, the edge stays light, and each
helper has one home (a second copy is how the first release's rules drifted apart)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cloud": "hybridml.cloud", "edge": "hybridml.edge", "shared": "hybridml.shared",
            "hybridml_pkg": "hybridml", "benchmarks": "benchmarks"}


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    """(dotted name, path, syntax tree) of every module of the kit and its benchmarks."""
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def imports(name: str, tree: ast.Module, known: frozenset[str] = frozenset()) -> set[str]:
    """The modules ``name`` imports (TYPE_CHECKING and function-level imports included)."""
    package = name if name in PACKAGES.values() else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # "from pkg import mod" imports the module; "from mod import name", the module.
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out.update(subs if subs else {base})
    return out


def graph() -> dict[str, set[str]]:
    tree = {name: t for name, _, t in modules()}
    known = frozenset(tree)
    return {name: {m for m in imports(name, t, known) if m in tree and m != name}
            for name, t in tree.items()}


def test_no_two_modules_import_each_other_through_any_path() -> None:
    g = graph()
    cycles = []
    for start in g:
        seen, todo = set(), [start]
        while todo:
            for nxt in g[todo.pop()]:
                if nxt == start:
                    cycles.append(start)
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    assert not cycles, f"modules on an import cycle: {sorted(set(cycles))}"


@pytest.mark.parametrize(("package", "forbidden"), [
    ("hybridml.shared", ("hybridml.cloud", "hybridml.edge", "sklearn", "onnx", "onnxruntime",
                         "flask", "requests", "skl2onnx", "scipy")),
    ("hybridml.edge", ("hybridml.cloud", "sklearn", "onnx", "flask", "skl2onnx", "scipy")),
])
def test_layers_import_only_downwards(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [(name, m) for name, _, tree in modules() if name.startswith(package)
           for m in imports(name, tree) if m.split(".")[0] in forbidden or
           any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{package} reaches above itself: {bad}"


def _uses(tree: ast.Module, dotted: str) -> int:
    """How often ``tree`` names ``dotted`` (``os.replace``, ``str.ljust`` as ``.ljust``)."""
    owner, _, attr = dotted.rpartition(".")
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == attr
               and (not owner or (isinstance(n.value, ast.Name) and n.value.id == owner)))


def _defines(tree: ast.Module, fn: str) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == fn for n in ast.walk(tree))


# helper -> (how a copy shows, the one home, places allowed a different but similar thing)
ONE_HOME = {
    # Replacing a file with new bytes is atomic_write; renaming a file that was streamed and
    # verified (a download, an uploaded blob) into its content address is a different step.
    "atomic write": ("os.replace", "hybridml.shared.files",
                     {"hybridml.edge.store", "hybridml.cloud.blobs"}),
    "fsync of a directory": ("os.O_RDONLY", "hybridml.shared.files", set()),
    "UTC timestamps": ("strftime", "hybridml.shared.clock", set()),
    "table printing": (".ljust", "hybridml.shared.text", set()),
}


@pytest.mark.parametrize("helper", list(ONE_HOME))
def test_each_helper_has_one_home(helper: str) -> None:
    attr, home, allowed = ONE_HOME[helper]
    copies = [name for name, _, tree in modules()
              if _uses(tree, attr) and name != home and name not in allowed]
    assert not copies, f"{helper} is written again in {copies}; use {home}"


@pytest.mark.parametrize(("fn", "home"), [("key_id_of", "hybridml.shared.signature"),
                                          ("file_sha256", "hybridml.shared.files"),
                                          ("atomic_write", "hybridml.shared.files"),
                                          ("parse_bool", "hybridml.shared.settings")])
def test_shared_functions_are_defined_once(fn: str, home: str) -> None:
    assert [name for name, _, tree in modules() if _defines(tree, fn)] == [home]


def _truthy_words(node: ast.AST) -> bool:
    """A tuple, list or set literal of the words of a yes/no setting."""
    if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return False
    words = {e.value.lower() for e in node.elts
             if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return len(words & {"1", "true", "yes", "on"}) >= 2


def test_one_spelling_of_yes_for_environment_variables() -> None:
    spellings = [name for name, _, tree in modules() for n in ast.walk(tree)
                 if _truthy_words(n) and name != "hybridml.shared.settings"]
    assert not spellings, f"truthy words spelled again in {spellings}; use load_env/env_flag"
