"""The house rules, read from the code: the core (``adapters/``) imports no host, benchmark, toy model or
command-line module; data flows downward only (no import cycles); the big files stay split."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "adapters")
OUTSIDE_THE_CORE = ("bench", "toyworld", "nodes", "extension", "cli", "scripts", "tests")
MAX_CORE_LINES = 600


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    rel = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
    return "conceptgate." + rel


def _imports(path: str) -> list[tuple[int, str]]:
    """Every module an import statement names (absolute, in ``conceptgate``), with its line: module level and
    inside functions alike, since a lazy import is still a dependency."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # "from . import geom" names the module conceptgate.adapters.geom
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t == "conceptgate" or t.startswith("conceptgate.")]


def _core_files() -> list[str]:
    files = []
    for dirpath, _, names in os.walk(CORE):
        files += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    return sorted(files)


def test_the_core_imports_no_host_benchmark_toy_model_or_cli():
    offenders = []
    for path in _core_files():
        for line, target in _imports(path):
            top = target.split(".")[1] if target.count(".") >= 1 else ""
            if top in OUTSIDE_THE_CORE:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_the_core_has_no_import_cycles():
    """Module-level imports between core modules form a graph without cycles (a package's ``__init__``
    importing its own submodules is how a package is built, so edges into a package's own children from
    its ``__init__`` count, and edges from a child to its parent package's ``__init__`` do not)."""
    modules = {_module_name(p): p for p in _core_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in tree.body:  # module level only: what runs when the module is imported
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [f"{target}.{a.name}" for a in node.names] + [target]:
                if cand in modules and cand != mod:
                    if mod.startswith(cand + "."):
                        continue  # a child module reaching its (already initialised) parent package
                    graph[mod].add(cand)
                    break
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, trail: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend(trail + [m, n])
                return True
            if state.get(n) is None and visit(n, trail + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_each_mechanism_has_its_own_package_and_registers_itself():
    import conceptgate.adapters  # noqa: F401  (imports the four mechanisms)
    from conceptgate.adapters.registry import CHECKS, CONDITIONING_HANDLERS, GUIDANCE_HANDLERS, MECHANISMS

    for name in ("spm", "rece", "geom", "abo"):
        assert os.path.isfile(os.path.join(CORE, name, "__init__.py"))
    assert set(MECHANISMS) == {"spm", "rece", "geom", "abo"}
    assert {m for m in CONDITIONING_HANDLERS} == {"geom"}
    assert {m for m in GUIDANCE_HANDLERS} == {"abo"}
    assert ("guidance", "abo") in CHECKS
    recorded = {pair for m in MECHANISMS.values() for pair in m.erasers}
    assert {("weight", "spm"), ("weight", "uce"), ("weight", "rece"), ("conditioning", "geom"),
            ("guidance", "abo"), ("weight", "abo")} <= recorded


def test_no_core_file_is_a_monolith():
    too_long = [f"{os.path.relpath(p, ROOT)}: {n} lines" for p in _core_files()
                if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_CORE_LINES]
    assert not too_long, too_long
