"""Imports run downward: every module of r1jax/ imports only from its own layer or the ones below.

The order (copied in the README's layout section), lowest first; a module may import from its
own layer and any layer before it, never from a later one:

    config
    parallel.backend, parallel.rules,                  the backend check, the logical-axis table,
    parallel.mesh, parallel.sharding                   meshes, shardings
    model                                              the decoder (marks activations by the table)
    parallel.expert                                    expert-parallel MoE dispatch (wraps model.moe)
    data                                               tokenizers, sources, tasks, the pipeline
    interop, checkpoint                                weights on disk: Orbax runs / exports and
                                                       HF directories (each reads the other's)
    sampling                                           the engine
    serving                                            the HTTP server
    train                                              steps, loops, GRPO, rejection sampling, dry run
    eval                                               benchmark evaluation (`python -m r1jax.eval`)
    recipe                                             the R1 recipe's stage graph (`python -m r1jax.recipe`)
    demo

`parallel` is split by module: `parallel.expert` builds on `model.moe` while the model places its
activations through `parallel.rules`. Entry points (ENTRY_POINTS) may import anything and nothing
imports them. Every import counts: module level, inside functions (lazy), under `if`. serve.py and
train.py, the scripts at the top, are above everything and not walked.

Also: no module imports another package's underscore names (`from r1jax.x.y import _name` where
`r1jax.x` is not the importer's package). Within a package they are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "r1jax"

LAYERS: list[tuple[str, ...]] = [
    ("r1jax", "r1jax.config"),
    ("r1jax.parallel", "r1jax.parallel.backend", "r1jax.parallel.rules", "r1jax.parallel.mesh",
     "r1jax.parallel.sharding"),
    ("r1jax.model",),
    ("r1jax.parallel.expert",),
    ("r1jax.data",),
    ("r1jax.interop", "r1jax.checkpoint"),
    ("r1jax.sampling",),
    ("r1jax.serving",),
    ("r1jax.train",),
    ("r1jax.eval",),
    ("r1jax.recipe",),
    ("r1jax.demo",),
]

# Documented commands whose code moved above their package; each only re-exports it.
ENTRY_POINTS = {
    "r1jax.parallel.dryrun": "`python -m r1jax.parallel.dryrun` (README); the code is r1jax.train.dryrun",
}

# Violations not fixed yet, (importer, imported) for the order and (importer, "module:_name") for
# private names. The test fails on a new violation and on an entry that no longer is one.
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, text: str, is_package: bool = False):
    """(imported module, [names]) for every import of r1jax in `text`, the source of module
    `name`; `from X import a` counts X.a when that is a module, else X (with `a` among the names)."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "r1jax":
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "r1jax":
                continue
            plain = []
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    yield f"{module}.{alias.name}", []
                else:
                    plain.append(alias.name)
            if plain:
                yield module, plain


def _layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module}: in no layer of LAYERS"
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations() -> set[tuple[str, str]]:
    out = set()
    for name, path in MODULES.items():
        for module, names in _imports(name, path.read_text(), path.name == "__init__.py"):
            if module in ENTRY_POINTS:
                out.add((name, module))
            elif name not in ENTRY_POINTS and _layer(module) > _layer(name):
                out.add((name, module))
            if _package(module) != _package(name):
                out.update((name, f"{module}:{n}") for n in names if n.startswith("_") and not n.startswith("__"))
    return out


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_run_downward_and_no_foreign_private_names():
    found = violations()
    new, stale = found - KNOWN, KNOWN - found
    assert not new, f"imports against the order of LAYERS (or of another package's _names): {sorted(new)}"
    assert not stale, f"KNOWN entries that are no longer violations, remove them: {sorted(stale)}"


def test_the_checker_sees_violations():
    """Lazy and relative imports and private names are seen (else the test above could never fail)."""
    lazy = "def f():\n    if True:\n        from r1jax.train import step\n"
    assert list(_imports("r1jax.model.x", lazy)) == [("r1jax.train.step", [])]
    assert _layer("r1jax.train.step") > _layer("r1jax.model.x")
    relative = "from ..sampling.engine import Engine, _bits\nfrom . import moe\n"
    assert list(_imports("r1jax.model.x", relative)) == [("r1jax.sampling.engine", ["Engine", "_bits"]),
                                                         ("r1jax.model.moe", [])]
