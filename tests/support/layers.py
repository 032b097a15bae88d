"""The layer contract of hotsite's packages, and an AST checker for it (tests/unit/test_layers.py).

Layers, lowest first: imports run only from a layer to the same or a lower
one. Every module of the product packages must be placed (longest matching
prefix wins), so a new module cannot slip past the contract. Every import
counts: at module level, inside a function, under ``TYPE_CHECKING`` — a
type-only import upward is still a dependency upward. Cycles are checked on
the imports that run (all but ``TYPE_CHECKING``), module by module, and
between the feature packages, which may use each other sideways but never
both ways. ARCHITECTURE.md explains the layers.
"""

from __future__ import annotations

import ast
import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("appliance", "failover", "monitoring", "provisioning")

# (layer name, module prefixes). Longest prefix wins across all layers; "=name" is that module alone.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "=appliance",  # the package itself (__version__); "=": this module only, not what is under it
            "appliance.api",  # control API transport (unix socket, framing, peer credentials)
            "appliance.clock",
            "appliance.core_metrics",  # the core's metrics (process, build, reloads, listeners)
            "appliance.core_settings",
            "appliance.daemon",
            "appliance.errors",
            "appliance.fields",
            "appliance.hostnames",  # the one host check
            "appliance.httpd",
            "appliance.kamailio",
            "appliance.logs",
            "appliance.schema",  # the core's tables; each feature's are in its own schema.py
            "appliance.redact",
            "appliance.roles",
            "appliance.secretfile",  # the one secret-file reader
            "appliance.store",
            "appliance.systemd",
            "appliance.timefmt",
            "appliance.timeouts",  # cancellation-safe waits
            "appliance.tomlfile",  # the one TOML loader and error describer
        ),
    ),
    ("monitoring", ("monitoring",)),
    ("features", ("failover", "appliance.paging", "appliance.replication", "appliance.reports")),
    (
        "top",
        (
            "appliance.app",
            "appliance.cli",
            "appliance.config",
            "appliance.configcheck",
            "appliance.features",  # the feature table: settings, metrics, migrations, API routes
            "appliance.migrations",  # every component's migrations, for the daemon's store
            "appliance.systemd_unit",
            "monitoring.catalogue",  # the metrics catalogue: every feature's metrics, built at the top
            "provisioning",
        ),
    ),
)

# The features layer's packages: sideways imports between them are allowed, a cycle is not.
FEATURE_PACKAGES = ("failover", "appliance.paging", "appliance.replication", "appliance.reports")

# Known debt, each with its reason; the test fails if an entry is no longer needed.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the longest known module the import names)
    line: int
    runs: bool  # False for an import under ``if TYPE_CHECKING:``


def modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module under ``root``'s packages, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(root: Path, known: dict[str, Path] | None = None) -> list[Import]:
    """Every import of a product module by a product module, with its line."""
    known = known if known is not None else modules(root)
    out: list[Import] = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out.extend(_imports_of(name, package, ast.parse(path.read_text(), str(path)), known))
    return out


def _imports_of(name: str, package: str, tree: ast.AST, known: dict[str, Path]) -> Iterator[Import]:
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST, runs: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            child_runs = runs and not (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            targets: list[str | None] = []
            line = 0
            if isinstance(child, ast.Import):
                line = child.lineno
                targets = [resolve(alias.name) for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                line = child.lineno
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [resolve(f"{base}.{alias.name}") for alias in child.names]
            for target in targets:
                if target is not None and target != name:
                    yield Import(name, target, line, runs)
            yield from visit(child, child_runs)

    yield from visit(tree, True)


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of the layer ``module`` belongs to, or None if it is not placed."""
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for entry in prefixes:
            prefix = entry.removeprefix("=")
            covers = module == prefix or (prefix == entry and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def unplaced(known: Iterable[str]) -> list[str]:
    return [m for m in known if layer_of(m) is None]


def upward(found: Iterable[Import]) -> list[str]:
    """Imports from a layer to a higher one, as ``module:line -> target (base -> top)``."""
    out = []
    for imp in found:
        here, there = layer_of(imp.source), layer_of(imp.target)
        if here is None or there is None or there <= here or (imp.source, imp.target) in ALLOWED_UPWARD:
            continue
        out.append(f"{imp.source}:{imp.line} -> {imp.target} ({LAYERS[here][0]} -> {LAYERS[there][0]})")
    return out


def cycles(found: Iterable[Import]) -> list[list[str]]:
    """Strongly connected groups of modules through imports that run (the allowed ones left out)."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for imp in found:
        if imp.runs:
            graph[imp.source].add(imp.target)
    return [group for group in _components(graph) if frozenset(group) not in ALLOWED_CYCLES]


def feature_cycles(found: Iterable[Import]) -> list[list[str]]:
    """Feature packages that import each other (directly or around a loop)."""

    def package(module: str) -> str | None:
        return next((p for p in FEATURE_PACKAGES if module == p or module.startswith(p + ".")), None)

    graph: dict[str, set[str]] = collections.defaultdict(set)
    for imp in found:
        a, b = package(imp.source), package(imp.target)
        if a and b and a != b:
            graph[a].add(b)
    return _components(graph)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(graph):
        if v not in index:
            connect(v)
    return out
