"""The package's layers point down: read every module's imports (module level and inside functions) and check
that each goes to the same or a lower layer, that no two modules import each other through a circle, that no
method's folder imports another method's folder, and that no private name crosses a module boundary.

A new module must be placed in LAYERS below: the test fails for a module it does not know, so the
decision is made once, when the module is written."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sparsecc"

# lowest first; a module belongs to the longest prefix listed. Within one layer imports are free (no circles).
LAYERS: list[tuple[str, ...]] = [
    ("sparsecc.errors", "sparsecc.io", "sparsecc.progress", "sparsecc.version", "sparsecc.data",
     "sparsecc.distributed"),
    ("sparsecc.layouts", "sparsecc.capture", "sparsecc.passes"),
    ("sparsecc.ops",),
    ("sparsecc.nn", "sparsecc.graph"),
    ("sparsecc.calibrate", "sparsecc.backends", "sparsecc.report"),
    ("sparsecc.model",),
    ("sparsecc.methods",),
    ("sparsecc.recipe",),
    ("sparsecc.api",),
    ("sparsecc.saving",),
    # the front: the package itself, and what is built on the whole of it
    ("sparsecc", "sparsecc.bench", "sparsecc.causal_lm", "sparsecc.cli", "sparsecc.decode", "sparsecc.demo", "sparsecc.models",
     "sparsecc.testing", "sparsecc.train", "sparsecc.tune"),
]
METHODS_SHARED = {"sparsecc.methods", "sparsecc.methods.base", "sparsecc.methods.block_sparse",
                  "sparsecc.methods.identity", "sparsecc.methods.registry", "sparsecc.methods.validate"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return layer


def imports(module: str) -> tuple[set[str], list[str]]:
    """(sparsecc modules `module` imports, private names it takes from other modules)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    found, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base != "sparsecc" and not base.startswith("sparsecc."):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:  # `from sparsecc.x import submodule`
                    found.add(target)
                    aliases[alias.asname or alias.name] = target
                else:
                    found.add(base)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base != module:
                        private.append(f"{module} imports {alias.name} from {base}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sparsecc" or alias.name.startswith("sparsecc."):
                    found.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
    for node in ast.walk(tree):  # `mod._private` through a module imported under a name
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return found - {module}, private


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, (targets, _) in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges = {m: {t for t in targets if t in MODULES} for m, (targets, _) in GRAPH.items()}
    for package in MODULES:  # `import sparsecc.a.b` runs sparsecc.a's __init__ first
        for m in list(edges.get(package, ())):
            parent = m.rsplit(".", 1)[0]
            while parent in MODULES and parent != package and not package.startswith(parent + "."):
                edges[package].add(parent)
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    state, stack, circles = defaultdict(int), [], []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state[t] == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif state[t] == 0:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if state[m] == 0:
            visit(m)
    # a package's __init__ importing its own submodules is how packages re-export: not a circle
    real = [c for c in circles if not all(a.startswith(b + ".") or b.startswith(a + ".")
                                          for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert not real, "\n".join(real)


def test_a_method_folder_imports_no_other_method_folder():
    def folder(m: str) -> str | None:
        parts = m.split(".")
        return ".".join(parts[:3]) if len(parts) >= 3 and parts[1] == "methods" and m not in METHODS_SHARED else None

    crossing = [f"{m} imports {t}" for m, (targets, _) in GRAPH.items() if folder(m)
                for t in sorted(targets) if folder(t) and folder(t) != folder(m)]
    assert not crossing, "\n".join(crossing)


def test_no_private_name_crosses_a_module_boundary():
    private = [p for _, (_, names) in GRAPH.items() for p in names]
    assert not private, "\n".join(private)


def test_the_checker_sees_what_it_checks():
    """The rules above would catch a violation: the import graph is read, private names are seen."""
    targets, _ = GRAPH["sparsecc.api"]
    assert {"sparsecc.methods.registry", "sparsecc.calibrate", "sparsecc.model"} <= targets
    assert layer_of("sparsecc.methods.spion.handler") > layer_of("sparsecc.calibrate") > layer_of("sparsecc.ops.ffn")
    assert "sparsecc.api" in GRAPH["sparsecc.train.spion"][0]  # an import inside a function counts too
