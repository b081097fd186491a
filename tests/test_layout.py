"""The package layout: pipeline stages in order, each importing only the stages before it.

Imports are read with ``ast`` from every file, wherever they sit (module level, inside functions,
under ``TYPE_CHECKING``), and so are the module names a file imports by string
(``importlib.import_module("hf_grass....")`` tables), so lazy imports count too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_grass"
MAX_LINES = 500

# The stages, in pipeline order (DESIGN.md §4). A module may import its own stage and earlier ones.
STAGES = [
    ["hf_grass._version", "hf_grass.seeding"],
    ["hf_grass.kernels"],
    ["hf_grass.compressors"],
    # preconditioners declare what they need, and GraSSConfig validates against them: they come
    # before the config, and import nothing of the capture, the cache or the configuration
    ["hf_grass.precondition"],
    ["hf_grass.config"],
    ["hf_grass.distributed"],
    ["hf_grass.chat"],  # chat rows tokenized as TRL's SFTTrainer does: imports nothing of the package
    ["hf_grass.data"],
    ["hf_grass.capture"],
    ["hf_grass.cache"],
    ["hf_grass.attribution"],
    ["hf_grass.scoring"],
    ["hf_grass.results"],
    ["hf_grass.checkpoints"],
    ["hf_grass.prompts"],
    ["hf_grass.query"],
    ["hf_grass.lookups"],
    ["hf_grass.trainer"],
    ["hf_grass.callbacks"],
    ["hf_grass.testing"],  # tiny offline models, tokenizer and corpus: imports no stage; the demo uses it
    ["hf_grass.cli"],
    ["hf_grass.evaluation"],
    ["hf_grass"],  # the front door: lazy public names
]
# storage only: the cache knows nothing of capture, the pass, preconditioning, scoring or data (the
# kernels are pure tensor maps: the index's projection of wide rows is a sparse JL map)
CACHE_MAY_IMPORT = (
    "hf_grass.cache",
    "hf_grass.kernels",
    "hf_grass.config",
    "hf_grass.seeding",
    "hf_grass.distributed",
    "hf_grass._version",
)
HF_LIBRARIES = ("transformers", "huggingface_hub")
MAY_IMPORT_HF = (
    "hf_grass.trainer",
    "hf_grass.callbacks",
    "hf_grass.query",
    "hf_grass.cli",
    "hf_grass.cache.hub",
    "hf_grass.testing",  # builds tiny transformers models and tokenizers offline
)
_MODULE_STRING = re.compile(r"^hf_grass(\.\w+)+$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The hf_grass module an imported name refers to (a module, or the module holding a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(hf_grass modules, top-level third-party packages) that module ``name`` imports."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from a import b" imports the module a.b when there is one, else a name of a
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.match(node.value)
        ):
            targets.append(node.value)  # importlib.import_module tables
    ours = {m for t in targets if t.split(".")[0] == "hf_grass" and (m := resolve(t)) and m != name}
    others = {t.split(".")[0] for t in targets if t and t.split(".")[0] != "hf_grass"}
    return ours, others


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def stage(name: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best >= 0, f"{name} belongs to no stage; add it to STAGES in the pipeline order"
    return best


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_stages_import_only_earlier_stages() -> None:
    wrong = [
        f"{a} (stage {stage(a)}) imports {b} (stage {stage(b)})"
        for a, deps in GRAPH.items()
        for b in deps
        if stage(b) > stage(a)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_cache_is_storage_only() -> None:
    wrong = [
        f"{a} imports {b}"
        for a, deps in GRAPH.items()
        if a.startswith("hf_grass.cache")
        for b in deps
        if not any(b == p or b.startswith(p + ".") for p in CACHE_MAY_IMPORT)
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_front_doors_import_transformers_and_the_hub() -> None:
    wrong = [
        f"{name} imports {lib}"
        for name in MODULES
        for lib in imports_of(name)[1] & set(HF_LIBRARIES)
        if not any(name == p or name.startswith(p + ".") for p in MAY_IMPORT_HF)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_too_long() -> None:
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_walker_sees_lazy_and_string_imports() -> None:
    # the checks above are only as good as the graph: it must hold the lazy edges too
    assert "hf_grass.trainer" in GRAPH["hf_grass"]  # hf_grass/__init__.py's lazy table
    assert "hf_grass.cache.hub" in GRAPH["hf_grass.cache.reader"]
    assert "hf_grass.compressors.base" in GRAPH["hf_grass.compressors"]  # imported inside a function
    assert "hf_grass.kernels.triton_kernels" in GRAPH["hf_grass.kernels"]
