"""The package's layering (docs/architecture.md §7) and the tree's citations, checked statically.

An AST walk of every ``.py`` file under ``camopd_megatron/`` collects every import of the package:
module-level and lazy ones inside functions, ``from`` imports (relative ones resolved), and
``importlib.import_module`` / ``__import__`` with a literal name or a module-level string constant.
On that graph:

(a) no import circle between files;
(b) every import between two rooms goes down :data:`LAYERS` (never up, never sideways), so ``ops/``,
    ``config/``, ``data/`` and ``utils/`` import nothing of the package above them;
(c) the library (everything but ``demo/``, ``bench/``, ``testing/``) never imports ``demo``,
    ``bench`` or ``testing``, nor a package only the ``demo`` extra installs;
(d) no tracked file (code, tests, configs, docs, README) cites a document that is not in the
    repository, and none holds an absolute path of a developer machine.

No torch, no megatron: only the source text is read.
"""
from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
PKG = "camopd_megatron"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils", "deps"),
    ("config", "ops", "data"),
    ("compat",),
    ("distributed",),
    ("models",),
    ("parallel", "checkpoint"),
    ("planner", "launch_check", "teachers"),
    ("distill",),
    ("trainer",),
    ("cli",),
    ("testing",),
    ("demo", "bench"),
)
"""Rooms of the package, lowest layer first (the table of docs/architecture.md §7). A room is a
subpackage or a top-level module. An import from room A to room B (A != B) needs B in a lower layer."""

OUTSIDE_LIBRARY = ("demo", "bench", "testing")
"""Rooms that are not the library: the demo extra, the benchmarks, the test helpers."""

DEMO_EXTRA_PACKAGES = ("matplotlib",)
"""Third-party packages only ``pip install -e '.[demo]'`` brings (setup.py ``extras_require['demo']``)."""

EXTERNAL_DOC_STEMS = ("CAMOPD", "ARCHITECTURE", "MCORE_CPU_NOTES", "STYLE")
"""Names of design notes that live outside the repository (stems, so this file does not cite them):
a citation of ``<stem>.md`` always fails, even if a file of that name were added somewhere."""

WRITTEN_NOT_CITED = {"table.md": "the demo's report, written by python -m camopd_megatron.demo"}
"""File names the code writes (outputs), which therefore need not exist in the tree."""

ROOT_ROOM = ""
ROOT_MAY_IMPORT = frozenset({f"{PKG}.compat.imports"})
"""What the package root (``camopd_megatron/__init__.py``) may import: the one named import-time step
(docs/architecture.md, the CPU compatibility layer), which runs before any of our modules imports megatron."""
"""The room of ``camopd_megatron/__init__.py`` itself: below every layer, importing nothing."""


# ------------------------------------------------------------------------------------------------
# the import graph
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    """One import of the package found in a file."""

    src: str
    """Importing module (dotted)."""
    dst: str
    """Imported module (dotted; the longest prefix that is a module of the package)."""
    path: str
    """Importing file, relative to the repository root."""
    line: int
    statement: str
    """The import as written (first line of the statement)."""

    def where(self) -> str:
        return f"{self.path}:{self.line} `{self.statement}`"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=None)
def package_modules() -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package."""
    return {_module_name(p): p for p in sorted((REPO / PKG).rglob("*.py"))}


def room_of(module: str) -> str:
    """``camopd_megatron.models.gpt`` → ``models``; ``camopd_megatron.cli`` → ``cli``; the root → ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_ROOM


def _resolve(name: str) -> Optional[str]:
    """The longest prefix of ``name`` that is a module of the package (None: not ours)."""
    if name != PKG and not name.startswith(PKG + "."):
        return None
    mods = package_modules()
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "..."`` assignments (names a lazy ``import_module`` may use)."""
    out: dict[str, str] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for t in targets:
                if isinstance(t, ast.Name):
                    out[t.id] = value.value
    return out


def _dynamic_import_name(call: ast.Call, constants: dict[str, str]) -> Optional[str]:
    """The module name of ``importlib.import_module(X)`` / ``import_module(X)`` / ``__import__(X)``."""
    fn = call.func
    fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
    if fname not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Name):
        return constants.get(arg.id)
    return None


def _imported_names(node: ast.AST, module: str, is_package: bool, constants: dict[str, str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base_parts = module.split(".") if is_package else module.split(".")[:-1]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import name`: the submodule pkg.name when it is one, else pkg itself
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in package_modules() else base for a in node.names]
    if isinstance(node, ast.Call):
        name = _dynamic_import_name(node, constants)
        return [name] if name else []
    return []


@lru_cache(maxsize=None)
def import_edges() -> tuple[Edge, ...]:
    """Every import of a package module by a package module (lazy and dynamic ones included)."""
    edges: list[Edge] = []
    for module, path in package_modules().items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        lines = source.splitlines()
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            for name in _imported_names(node, module, path.name == "__init__.py", constants):
                dst = _resolve(name)
                if dst is not None and dst != module:
                    edges.append(Edge(module, dst, str(path.relative_to(REPO)), node.lineno,
                                      lines[node.lineno - 1].strip()))
    return tuple(edges)


def _cycles(edges: tuple[Edge, ...]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _layer_of() -> dict[str, int]:
    layer = {ROOT_ROOM: -1}
    for i, rooms in enumerate(LAYERS):
        for room in rooms:
            layer[room] = i
    return layer


# ------------------------------------------------------------------------------------------------
# (a)-(c): the import graph
# ------------------------------------------------------------------------------------------------
def test_the_walk_sees_lazy_and_dynamic_imports() -> None:
    """The graph is not trivially empty and holds the imports a module-level-only walk would miss."""
    edges = import_edges()
    assert len(edges) > 50, f"only {len(edges)} imports found: the walk is broken"
    by_pair = {(e.src, e.dst) for e in edges}
    # cli.py imports the trainer lazily through importlib and a module-level constant, and the
    # planner inside a function: both must be edges
    assert (f"{PKG}.cli", f"{PKG}.trainer") in by_pair
    assert (f"{PKG}.cli", f"{PKG}.planner") in by_pair


def test_every_room_has_a_layer() -> None:
    layer = _layer_of()
    unplaced = sorted({room_of(m) for m in package_modules()} - set(layer))
    assert not unplaced, (
        f"rooms {unplaced} of {PKG}/ have no layer: add each to LAYERS in tests/test_layering.py and to the "
        "room map of docs/architecture.md §7 (or move the file into an existing room)"
    )


def test_no_import_circle() -> None:
    edges = import_edges()
    problems = []
    for component in _cycles(edges):
        inside = set(component)
        lines = [f"    {e.where()} -> {e.dst}" for e in edges if e.src in inside and e.dst in inside]
        problems.append(f"import circle between {component}:\n" + "\n".join(lines))
    assert not problems, "\n".join(problems) + "\nbreak each circle: move the shared piece down a layer"


def test_imports_only_go_down_the_layers() -> None:
    layer = _layer_of()
    problems = []
    for e in import_edges():
        src, dst = room_of(e.src), room_of(e.dst)
        if src == ROOT_ROOM and e.dst in ROOT_MAY_IMPORT:
            continue
        if src == dst or src not in layer or dst not in layer:
            continue  # same room; unplaced rooms fail test_every_room_has_a_layer
        if layer[dst] >= layer[src]:
            how = "sideways, same layer" if layer[dst] == layer[src] else "upward"
            problems.append(f"{e.where()}: {src!r} (layer {layer[src]}) imports {e.dst} of {dst!r} "
                            f"(layer {layer[dst]}), {how}")
    assert not problems, (
        "imports against the layering of docs/architecture.md §7 (an import must go to a lower layer):\n"
        + "\n".join(problems)
    )


def test_library_never_imports_demo_bench_or_testing() -> None:
    problems = [
        f"{e.where()}: the library room {room_of(e.src)!r} imports {e.dst}"
        for e in import_edges()
        if room_of(e.src) not in OUTSIDE_LIBRARY and room_of(e.dst) in OUTSIDE_LIBRARY
    ]
    for module, path in package_modules().items():
        if room_of(module) in OUTSIDE_LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                if name.split(".")[0] in DEMO_EXTRA_PACKAGES:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: the library imports {name}, "
                                    "which only the demo extra installs")
    assert not problems, "\n".join(problems) + f"\nthe library must not depend on {OUTSIDE_LIBRARY} or the demo extra"


# ------------------------------------------------------------------------------------------------
# (d): citations and absolute paths in every tracked file
# ------------------------------------------------------------------------------------------------
_SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "outputs"}


@lru_cache(maxsize=None)
def tracked_text_files() -> tuple[Path, ...]:
    """``git ls-files`` (or, outside a git checkout, every file but build/venv dirs), text files only."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        paths = [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if p.is_file() and not _SKIP_DIRS & set(p.relative_to(REPO).parts)]
    files = []
    for p in paths:
        try:
            p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (plots, gz) or deleted in the working tree
        files.append(p)
    assert files, "no tracked files found"
    return tuple(files)


_REF = re.compile(r"(?<![\w./<>{}$-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+\.(?:md|ya?ml))(?![\w/-])")
"""A relative path ending in .md / .yaml / .yml (absolute paths, URLs and placeholders are not matched)."""
_YAML_BASE = re.compile(r"^base:\s*['\"]?([^'\"\s#]+)")


def _references(path: Path) -> Iterator[tuple[int, str]]:
    """(line, reference) pairs worth checking in one file: every ``.md`` path; ``.yaml`` paths that start
    at a top-level directory of the repository; and ``base:`` of a YAML config."""
    top_dirs = {p.name for p in REPO.iterdir() if p.is_dir()}
    is_yaml = path.suffix in (".yaml", ".yml")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for ref in _REF.findall(line):
            if ref.endswith(".md"):
                yield i, ref
            elif "/" in ref and ref.split("/")[0] in top_dirs:
                yield i, ref  # bare names like my_run.yaml are examples or test fixtures, not citations
        m = _YAML_BASE.match(line) if is_yaml else None
        if m:
            yield i, m.group(1)


def test_the_citation_scan_finds_citations() -> None:
    """The scan sees the citations it exists for (so an empty result means something)."""
    found = {(str(p.relative_to(REPO)), ref) for p in tracked_text_files() for _, ref in _references(p)}
    assert ("README.md", "docs/architecture.md") in found
    assert ("examples/configs/no_selection.yaml", "camopd.yaml") in found


def test_no_citation_of_a_document_outside_the_repository() -> None:
    external = {f"{stem}.md" for stem in EXTERNAL_DOC_STEMS}
    problems = []
    for path in tracked_text_files():
        rel = path.relative_to(REPO)
        for line, ref in _references(path):
            name = Path(ref).name
            if name in external:
                problems.append(f"{rel}:{line}: cites {ref}, a design note outside the repository; cite "
                                "docs/algorithm.md or docs/architecture.md (section) or make the sentence self-contained")
            elif name in WRITTEN_NOT_CITED and "/" not in ref:
                continue
            elif not ((path.parent / ref).exists() or (REPO / ref).exists()):
                problems.append(f"{rel}:{line}: cites {ref}, which is not in the repository (looked relative to "
                                f"{rel.parent}/ and to the repository root)")
    assert not problems, "\n".join(problems)


_ABSOLUTE = re.compile(r"(?<![\w.~$}-])/(?:work|root|home|tmp|Users)/[\w.-]")
"""An absolute path under a developer machine's work/home/scratch directories."""


def test_no_absolute_path_of_a_machine() -> None:
    problems = []
    for path in tracked_text_files():
        rel = path.relative_to(REPO)
        if rel.name == ".gitignore":
            continue  # its leading "/" anchors a pattern at the repository root
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _ABSOLUTE.search(line):
                problems.append(f"{rel}:{i}: absolute path {line.strip()[:120]!r}; use a path relative to the "
                                "repository (computed from __file__) or a flag/argument")
    assert not problems, "\n".join(problems)
