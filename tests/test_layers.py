"""The package's floors (docs/architecture.md): every import points down, counting the imports
made inside functions; no cycle; floors 0-1 start without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgetransfer"

FLOORS = {
    0: {"__init__", "errors", "fileio", "manifest", "config", "ptefile"},
    1: {"data", "parity", "onnxio", "headfit", "golden", "bundle", "bundlecache", "device"},
    2: {"backbones", "strategies", "loaders", "train", "runs"},
    3: {"features", "runtime", "evaluate", "quantize", "pte"},
    4: {"adapt", "auto", "export", "verify", "bench", "info", "report", "bundler"},
    5: {"demo", "cli", "__main__"},
}
FLOOR = {m: f for f, mods in FLOORS.items() for m in mods}

# Function-local imports of sibling modules outside cli.py, each to keep a light path light.
LAZY = {
    ("runs", "backbones"): "load_run builds the eager model: torch only when a RUN_DIR is loaded",
    ("runtime", "runs"): "TorchClassifier on a RUN_DIR; predict on .onnx imports no torch",
    ("runtime", "backbones"): "TorchClassifier.logits splits outputs; ONNX path stays torch-free",
    ("demo", "adapt"): "the demo's torch path; without PyTorch it runs the device path",
    ("demo", "export"): "the demo's torch path; without PyTorch it runs the device path",
    ("demo", "verify"): "the demo's torch path; without PyTorch it runs the device path",
}
MAX_LAZY = 20
# Third-party libraries a floor may import at module level.
THIRD_PARTY = {
    0: set(),
    1: {"numpy", "PIL", "onnx", "onnxruntime", "threadpoolctl"},
}


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported top-level name, inside a function?, line) for every import in `path`:
    sibling modules as their module name, third-party ones as their package."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level or module.startswith("edgetransfer"):
                    parts = module.split(".")
                    if child.level == 0:
                        parts = parts[1:]  # drop "edgetransfer"
                    if parts and parts[0]:
                        found.append((f"edgetransfer.{parts[0]}", in_function, child.lineno))
                    else:  # from edgetransfer import strategies, __version__
                        found.extend(
                            (f"edgetransfer.{a.name}", in_function, child.lineno)
                            for a in child.names
                        )
                else:
                    found.append((module, in_function, child.lineno))
            visit(child, local)

    visit(tree, False)
    return found


def _modules() -> dict[str, list[tuple[str, bool, int]]]:
    return {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def _sibling_edges() -> dict[str, dict[str, list[tuple[bool, int]]]]:
    modules = _modules()
    edges: dict[str, dict[str, list[tuple[bool, int]]]] = {m: {} for m in modules}
    for mod, imports in modules.items():
        for name, local, line in imports:
            if name.startswith("edgetransfer."):
                target = name.split(".")[1]
                if target in modules and target != mod:
                    edges[mod].setdefault(target, []).append((local, line))
    return edges


def test_every_module_has_a_floor():
    missing = sorted(set(_modules()) - set(FLOOR))
    assert not missing, f"give these modules a floor in FLOORS and docs/architecture.md: {missing}"


def test_imports_only_point_down():
    upward = [
        f"{mod}.py:{line} imports {target} (floor {FLOOR[mod]} -> {FLOOR[target]})"
        for mod, targets in _sibling_edges().items()
        for target, uses in targets.items()
        for _, line in uses
        if FLOOR.get(target, 99) > FLOOR.get(mod, -1)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = {m: set(t) for m, t in _sibling_edges().items()}
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(edges[node]):
            cycle = walk(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = walk(start, [])
        assert cycle is None, " -> ".join(cycle)


def test_function_local_sibling_imports_are_few_and_each_has_a_reason():
    local = {
        (mod, target)
        for mod, targets in _sibling_edges().items()
        if mod not in ("cli", "__main__")
        for target, uses in targets.items()
        if any(is_local for is_local, _ in uses)
    }
    unexplained = sorted(local - set(LAZY))
    assert not unexplained, (
        f"function-local imports {unexplained}: import at the top (or, for a light path, add "
        "the reason to LAZY)"
    )
    count = sum(
        1
        for mod, targets in _sibling_edges().items()
        if mod not in ("cli", "__main__")
        for uses in targets.values()
        for is_local, _ in uses
        if is_local
    )
    assert count <= MAX_LAZY


@pytest.mark.parametrize("floor", [0, 1])
def test_low_floors_import_only_their_libraries(floor):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    allowed = stdlib | THIRD_PARTY[floor] | (THIRD_PARTY[0] if floor else set())
    wrong = [
        f"{mod}.py:{line} imports {name}"
        for mod in sorted(FLOORS[floor])
        if (PACKAGE / f"{mod}.py").is_file()
        for name, local, line in _modules()[mod]
        if not local and not name.startswith("edgetransfer") and name.split(".")[0] not in allowed
    ]
    assert not wrong, "\n".join(wrong)


def test_floors_0_and_1_start_without_torch():
    mods = sorted(m for f in (0, 1) for m in FLOORS[f] if (PACKAGE / f"{m}.py").is_file())
    code = (
        "import sys\n"
        + "".join(f"import edgetransfer.{m}\n" for m in mods if m != "__init__")
        + "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_layering_check_can_fail(tmp_path, monkeypatch):
    """An upward import and a cycle planted in a copy of two modules are both caught."""
    for name in ("errors", "data"):
        (tmp_path / f"{name}.py").write_text((PACKAGE / f"{name}.py").read_text())
    with (tmp_path / "errors.py").open("a") as f:
        f.write("\n\ndef _late():\n    from edgetransfer.data import scan  # noqa\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    with pytest.raises(AssertionError, match="errors.py:.* imports data"):
        test_imports_only_point_down()
    with pytest.raises(AssertionError, match="errors -> data -> errors|data -> errors -> data"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="function-local imports"):
        test_function_local_sibling_imports_are_few_and_each_has_a_reason()
