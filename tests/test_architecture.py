"""The package's layering, read from its source: no import circle, no import from a lower layer to a higher one, no
private name imported from another module, every subcommand on one protocol.

The module graph is built from every ``import`` / ``from … import`` statement and every
``importlib.import_module("<literal>")`` call in ``bioclip_fast/`` (the Triton kernels included:
``bioclip_fast/kernels/``), wherever it stands (module level or inside a function: a lazy import is still a
dependency). Importing the package root for one of its submodules (``from bioclip_fast import errors``) counts as an
edge to that submodule, not to the root.

``KNOWN_CIRCLES`` and ``KNOWN_UPWARD`` held what the package had when this test was written; issue 18 emptied
both. They may only shrink: a new circle or upward edge fails, and so does a listed one that is gone. The layers
are drawn in ``docs/architecture.md``.
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Layer of each top-level module or subpackage of bioclip_fast (low to high). A module may import its own layer
# and the ones below it. The command line (`cli/`, one module per subcommand, and `__main__.py`) is the top layer:
# nothing imports it but the entry points.
LAYERS: dict[str, int] = {
    "errors": 0, "sysinfo": 0, "fileio": 0,
    "taxonomy": 1, "kernels": 1, "devices": 1, "templates": 1,
    "ops": 2, "distributed": 2, "weights": 2, "preprocess": 2,
    "loss": 3, "data": 3, "tol": 3, "model": 3, "hub": 3,
    "integrations": 4,
    "predict": 5,
    "train": 6, "eval": 6, "analysis": 6,
    "cli": 7, "__main__": 7,
}

KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    base = REPO / "bioclip_fast"
    for path in sorted(base.rglob("*.py")):
        if "assets" in path.parts or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(["bioclip_fast", *parts])] = path
    return mods


def _targets(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = module.split(".")
            if not is_pkg:
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [base] + [f"{base}.{a.name}" for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports, of any package (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {name for node in ast.walk(tree) for name in _targets(node, module, path.name == "__init__.py")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    # `from bioclip_fast import errors` names the submodule; the package root itself is no layer.
    return {module: {name for name in imported_names(module, path)
                     if name in mods and name != module and name != "bioclip_fast"}
            for module, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.add(frozenset(comp))
    return out


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)}


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in _modules() if m != "bioclip_fast"} - set(LAYERS))
    assert not missing, f"add these to LAYERS in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_the_graph_sees_known_edges():
    # The reader must find lazy and importlib imports, or the checks below would pass on an empty graph.
    graph = import_graph()
    assert any(t.startswith("bioclip_fast.ops.") for t in graph["bioclip_fast.loss"])
    assert "bioclip_fast.kernels.clip_loss" in graph["bioclip_fast.ops.dispatch"]  # importlib.import_module
    assert sum(map(len, graph.values())) > 100


def test_no_new_import_circle():
    found = circles(import_graph())
    new = found - KNOWN_CIRCLES
    gone = KNOWN_CIRCLES - found
    assert not new, "new import circle(s): " + "; ".join(" <-> ".join(sorted(c)) for c in new)
    assert not gone, ("these circles are gone, delete them from KNOWN_CIRCLES: "
                      + "; ".join(" <-> ".join(sorted(c)) for c in gone))


def test_no_new_upward_import():
    found = upward_edges(import_graph())
    new = found - KNOWN_UPWARD
    gone = KNOWN_UPWARD - found
    assert not new, "import(s) from a lower layer to a higher one: " + "; ".join(f"{a} -> {b}" for a, b in sorted(new))
    assert not gone, "these upward imports are gone, delete them from KNOWN_UPWARD: " + "; ".join(
        f"{a} -> {b}" for a, b in sorted(gone))


def test_library_never_imports_train_eval_or_analysis():
    graph = import_graph()
    high = {"train", "eval", "analysis"}
    bad = sorted((a, b) for a, targets in graph.items() for b in targets
                 if layer(a) < LAYERS["train"] and b.split(".")[1] in high)
    assert not bad, f"library modules import the application layer: {bad}"


def test_only_command_lines_parse_arguments():
    """The library, training, evaluation and analysis take typed settings (`TrainConfig`, `EvalOptions`,
    `AnalysisOptions`), never the command line's namespace: only `cli/` and the script `kernels/_aot.py` (run as
    ``python -m``) import argparse."""
    scripts = {"bioclip_fast.kernels._aot"}
    bad = sorted(module for module, path in _modules().items()
                 if (module == "bioclip_fast" or layer(module) != LAYERS["cli"]) and module not in scripts
                 and "argparse" in imported_names(module, path))
    assert not bad, f"modules below the command line import argparse: {bad}"


def test_circle_finder_finds_a_circle():
    graph = collections.defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    for n in "abcd":
        graph.setdefault(n, set())
    assert circles(dict(graph)) == {frozenset("abc")}


def test_each_subcommand_module_has_the_one_protocol_and_only_the_dispatcher_names_it():
    """`bioclip_fast.cli.COMMANDS` names one module per subcommand; each defines ``add_arguments(parser)`` and
    ``run(args)``, and no module imports one (a command is never used as a library: what several share lives in
    cli modules that are no subcommand, or in the library below)."""
    from bioclip_fast.cli import COMMANDS

    mods = _modules()
    subcommands = {module for module, _ in COMMANDS.values()}
    for module in sorted(subcommands):
        defined = {n.name for n in ast.parse(mods[module].read_text()).body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"{module} lacks add_arguments/run"
    graph = import_graph()
    users = sorted((a, b) for a, targets in graph.items() for b in targets if b in subcommands)
    assert not users, f"subcommand modules imported as a library: {users}"


def test_a_built_package_ships_every_module(tmp_path):
    """A non-editable install (a wheel, the offline bundle) holds every module of the source tree: setup.py finds
    the packages itself, so a new subpackage (eval.beyond was once left out) cannot be missed."""
    import subprocess
    import sys

    import re

    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                         check=True, capture_output=True, text=True)
    # setuptools still copies a package left out of `packages` as data, with a warning; that is a miss too.
    as_data = [p for p in re.findall(r"recognizes '([\w.]+)' as an importable package", run.stderr)
               if not p.startswith("bioclip_fast.assets")]
    assert as_data == [], f"packages missing from setup.py's packages: {as_data}"
    built = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py")}
    source = {str(p.relative_to(REPO)) for p in (REPO / "bioclip_fast").rglob("*.py") if "__pycache__" not in p.parts}
    assert source - built == set()


EXTENSION_MODULES = {"_C", "_C_avx2"}


def private_imports() -> set[tuple[str, str]]:
    """``from M import _x`` where M is another module of the package (a name private to M used outside it)."""
    mods = _modules()
    found = set()
    for module, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _targets(node, module, is_pkg)[0]
            if base not in mods or base == module:
                continue
            for alias in node.names:
                if alias.name in EXTENSION_MODULES:  # the compiled csrc/ extensions (setup.py), modules not names
                    continue
                if alias.name.startswith("_") and not alias.name.startswith("__") and f"{base}.{alias.name}" not in mods:
                    found.add((module, f"{base}.{alias.name}"))
    return found


def test_no_private_name_is_imported_from_another_module():
    bad = private_imports()
    assert not bad, "private names imported across modules (make them public or move them): " + "; ".join(
        f"{a} imports {b}" for a, b in sorted(bad))


def test_private_import_finder_sees_one(tmp_path, monkeypatch):
    pkg = tmp_path / "bioclip_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ._impl import _ok_inside_a_private_module\n")
    (pkg / "sub" / "_impl.py").write_text("_ok_inside_a_private_module = 1\n")
    (pkg / "b.py").write_text("_hidden = 1\npublic = 2\n")
    (pkg / "a.py").write_text("def f():\n    from bioclip_fast.b import _hidden, public\n"
                              "from . import b\nfrom bioclip_fast.ops import _C\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    assert private_imports() == {("bioclip_fast.a", "bioclip_fast.b._hidden"),
                                 ("bioclip_fast.sub", "bioclip_fast.sub._impl._ok_inside_a_private_module")}


def test_the_drawing_names_every_layer_entry():
    """docs/architecture.md's diagram stays true: each top-level module or package is drawn in its layer's row."""
    page = (REPO / "docs" / "architecture.md").read_text()
    rows = {int(line.split()[0]): line for line in page.split("```")[1].splitlines()
            if line.strip() and line.split()[0].isdigit()}
    missing = []
    for name, lay in LAYERS.items():
        drawn = (name + "/") if (REPO / "bioclip_fast" / name).is_dir() else (name + ".py")
        if drawn not in rows.get(lay, ""):
            missing.append(f"{drawn} (layer {lay})")
    assert not missing, f"draw these in docs/architecture.md's diagram: {missing}"
