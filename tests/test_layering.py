"""Imports run downhill (DESIGN.md): each package of megalm imports only from its own layer or the
ones below, no module imports another in a cycle, nothing imports the command line, and no private
name (``_x``) is used outside its file. Read from the sources, so it holds for imports inside
functions too."""

import ast
from collections import defaultdict
from pathlib import Path

MEGALM = Path(__file__).resolve().parent.parent / "megalm"
# bottom first; a package may import its own layer's and lower layers' packages
LAYERS = [
    ["errors", "common", "records"],
    ["config"],
    ["parallel", "observe", "data"],
    ["model"],
    ["checkpoint"],
    ["train", "plan", "sampling"],
    ["bench", "cluster"],
    ["commands"],
    ["cli"],
]
LAYER = {package: i for i, packages in enumerate(LAYERS) for package in packages}


def modules() -> dict[str, Path]:
    out = {}
    for path in MEGALM.rglob("*.py"):
        name = ".".join(path.relative_to(MEGALM.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every megalm import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megalm."):
            names = [a.name for a in node.names]
            out.append((node.module, names))
            out += [(f"{node.module}.{n}", []) for n in names if f"{node.module}.{n}" in known]  # submodules
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("megalm.")]
    return out


def package(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_layer():
    assert {package(m) for m in modules() if m != "megalm"} == set(LAYER)


def test_imports_run_downhill_without_cycles_or_private_names():
    mods = modules()
    graph, upward, private = defaultdict(set), [], []
    for name, path in mods.items():
        for target, names in imports(path, set(mods)):
            graph[name].add(target)
            if name != "megalm" and LAYER[package(target)] > LAYER[package(name)]:
                upward.append(f"{name} imports {target}")
            private += [f"{name} takes {target}.{n}" for n in names if n.startswith("_") and target != name]
    assert not upward, upward
    assert not private, private
    # no cycle between modules (a package's __init__ importing its own submodules aside)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt in mods and nxt != node and not node.startswith(nxt + ".") and not nxt.startswith(node + "."):
                assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
                if nxt not in state:
                    visit(nxt, [*trail, node])
        state[node] = 2

    for module in mods:
        if module not in state:
            visit(module, [])
    assert not any("megalm.cli" in targets for name, targets in graph.items() if name != "megalm.cli")
