"""The package's shape: imports point one way (tools -> accumulator/checkpoint -> backends/weighting/collectives ->
plan/dist), no circle (not even one hidden behind ``TYPE_CHECKING``), no module reading the private attributes of
another module's objects, no function past a complexity that compression cannot meet (radon's cyclomatic complexity,
which counts boolean operators) or taking more positional arguments than a reader can match up, tools never loaded
by the core.

``python tests/unit/test_layout.py`` prints each module's size and its most complex function (reported, not gated).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import distaccum

PACKAGE = Path(distaccum.__file__).parent
MAX_COMPLEXITY = 15
"""Per function of the library (``distaccum/tools`` apart), as ``radon cc`` counts it: ruff's C901 counts fewer
(no boolean operators) and passed a 49-line boundary of complexity 23."""
MAX_POSITIONAL = 5
"""Positional parameters per function (``self``/``cls`` apart); more go keyword-only, named at every call."""
# Lower layers never import higher ones; the same layer may import itself as long as there is no circle.
LAYERS = (
    ("distaccum.dist",),
    ("distaccum.plan",),
    ("distaccum.schedule",),
    ("distaccum.batchnorm", "distaccum.noise"),
    (
        "distaccum.collectives",
        "distaccum.weighting",
        "distaccum.backends",
        "distaccum.integrations",
        "distaccum.guards",
    ),
    ("distaccum.micro_step", "distaccum.window", "distaccum.checkpoint_trust"),
    (
        "distaccum.checkpoint_files",
        "distaccum.checkpoint_engine",
        "distaccum.checkpoint_sharded",
        "distaccum.checkpoint_fit",
    ),
    (
        "distaccum.uneven",
        "distaccum.resize",
        "distaccum.precision",
        "distaccum.reduction",
        "distaccum.options",
        "distaccum.accumulator",
        "distaccum",
    ),
    ("distaccum.checkpoint",),
    ("distaccum.tools", "distaccum.survey", "distaccum.__main__"),
)


def module_name(path: Path) -> str:
    parts = ["distaccum", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or (prefix != "distaccum" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} has no layer in tests/unit/test_layout.py: add it where it belongs"
    return max(matches)[1]


def runtime_imports(path: Path, modules: set[str], *, type_checking: bool = False) -> set[str]:
    """distaccum modules that ``path`` imports at run time (and with ``type_checking``, in ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not type_checking:
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from distaccum import dist` imports the submodule, not the package root
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {
        module_name(path): runtime_imports(path, modules, type_checking=type_checking) - {module_name(path)}
        for path in paths
    }


def test_imports_point_down_the_layers():
    upward = [
        f"{importer} -> {imported}"
        for importer, imported_set in import_graph().items()
        for imported in imported_set
        if layer(imported) > layer(importer)
    ]
    assert not upward, f"imports against the layering: {upward}"


@pytest.mark.parametrize("type_checking", [False, True], ids=["run-time", "with-type-checking"])
def test_no_import_circle(type_checking: bool):
    # A circle hidden behind TYPE_CHECKING is still two modules that know each other's insides.
    graph = import_graph(type_checking=type_checking)
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                raise AssertionError("import circle: " + " -> ".join([*trail, module, imported]))
            if imported not in state:
                visit(imported, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_layout_check_sees_a_planted_circle(tmp_path: Path):
    # The walk above must be able to fail: a lazy import inside a function is still an edge.
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from distaccum.accumulator import Accumulator\n")
    assert runtime_imports(source, {"distaccum.accumulator"}) == {"distaccum.accumulator"}
    guarded = tmp_path / "g.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import distaccum.accumulator\n")
    assert runtime_imports(guarded, {"distaccum.accumulator"}) == set()


def library_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "tools" not in path.relative_to(PACKAGE).parts)


def complexities(path: Path) -> list[tuple[str, int]]:
    """(qualified name, radon cyclomatic complexity) of every function and method in ``path``."""
    from radon.complexity import cc_visit

    found: list[tuple[str, int]] = []
    for block in cc_visit(path.read_text()):
        if hasattr(block, "methods"):  # a class: its methods, not its total
            found += [(f"{block.name}.{method.name}", method.complexity) for method in block.methods]
        else:
            found.append((block.name, block.complexity))
    return found


def positional_counts(path: Path) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names = [arg.arg for arg in (*node.args.posonlyargs, *node.args.args)]
            found.append((node.name, len([name for name in names if name not in ("self", "cls")])))
    return found


def test_no_function_is_more_complex_than_the_gate():
    over = [
        f"{path.relative_to(PACKAGE)}:{name} ({value})"
        for path in library_files()
        for name, value in complexities(path)
        if value > MAX_COMPLEXITY
    ]
    assert not over, f"functions above cyclomatic complexity {MAX_COMPLEXITY} (split them into named steps): {over}"


def test_no_function_takes_more_positional_arguments_than_the_gate():
    over = [
        f"{path.relative_to(PACKAGE)}:{name} ({count})"
        for path in library_files()
        for name, count in positional_counts(path)
        if count > MAX_POSITIONAL
    ]
    rule = f"more than {MAX_POSITIONAL} positional parameters (make the rest keyword-only)"
    assert not over, f"functions with {rule}: {over}"


def private_reads(paths: list[Path], root: Path = PACKAGE) -> list[str]:
    """``obj._name`` in one module where ``_name`` is a private attribute or method only other modules of ``paths``
    define (on ``self``): a module reading another's objects' insides. torch's own privates are not ours to judge."""
    defined: dict[str, set[Path]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                owner = node.value
                name = node.attr if isinstance(owner, ast.Name) and owner.id == "self" else None
            if name and name.startswith("_") and not name.startswith("__"):
                defined.setdefault(name, set()).add(path)
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or node.attr not in defined or path in defined[node.attr]:
                continue
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_reads_the_private_attributes_of_another_modules_objects():
    found = private_reads(library_files())
    assert not found, f"private attributes read from another module (give the owner a method for it): {found}"


def test_the_private_read_check_sees_a_planted_one(tmp_path: Path):
    (tmp_path / "owner.py").write_text("class Owner:\n    def __init__(self):\n        self._state = 1\n")
    (tmp_path / "reader.py").write_text("def read(owner):\n    return owner._state\n")
    found = private_reads([tmp_path / "owner.py", tmp_path / "reader.py"], root=tmp_path)
    assert found == ["reader.py:2 owner._state"]


def test_the_gates_see_a_planted_complex_function(tmp_path: Path):
    # radon must count boolean operators: ten `and`s in one condition are complexity 12, which C901 calls 2.
    source = tmp_path / "planted.py"
    condition = " and ".join(f"x{index}" for index in range(11))
    arguments = ", ".join(f"x{index}" for index in range(11))
    source.write_text(f"def planted({arguments}):\n    if {condition}:\n        return 1\n    return 0\n")
    assert complexities(source) == [("planted", 12)]
    assert positional_counts(source) == [("planted", 11)]


def size_report() -> str:
    """Each library module's lines and its most complex function (what the gates do not look at)."""
    rows = []
    for path in library_files():
        found = complexities(path)
        name, value = max(found, key=lambda row: row[1]) if found else ("-", 0)
        rows.append(f"{len(path.read_text().splitlines()):5d}  {value:3d}  {path.relative_to(PACKAGE)}  {name}")
    return "lines   cc  module  most complex function\n" + "\n".join(rows)


def test_import_distaccum_loads_no_tool_backend_or_optional_library():
    code = (
        "import sys, distaccum;"
        "loaded = [m for m in sys.modules if m.startswith(('distaccum.tools', 'distaccum.backends.deepspeed', "
        "'distaccum.integrations.', 'accelerate', 'deepspeed', 'matplotlib', 'sklearn', 'transformers'))];"
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


if __name__ == "__main__":
    print(size_report())
