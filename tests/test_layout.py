"""The house rules, checked: no import cycle, the ground floor imports no stage, modules and functions stay
small, and the light commands start without torch (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = {"slide", "tiles", "native", "decode", "io", "runtime", "jobs", "bags", "encoders", "stain", "metrics",
          "reports", "splits", "config", "settings", "specs", "grids", "schedulers", "pyramid", "claims",
          "dicom"}  # fmt: skip
STAGES = {"tissue", "tiling", "stages", "mil", "images", "demo"}
HEAVY = ("torch", "scipy", "h5py", "zarr", "matplotlib", "sklearn", "timm", "torchvision")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["wsikit", "cli", *rel.parts[1:]] if rel.parts[0] == "cli" else list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*(ROOT / "wsikit").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    return {_module(p): p for p in files}


def _imports(path: Path, modules: set[str], top_only: bool) -> set[str]:
    """wsikit modules ``path`` imports (at module level only, with ``top_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_only:  # `if TYPE_CHECKING:` blocks are not imports at run time
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsikit"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("wsikit")]
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles():
    sources = _sources()
    graph = {m: _imports(p, set(sources), top_only=True) for m, p in sources.items()}
    # a package's __init__ is imported before any of its modules: an edge module -> its own package
    # (`from wsikit.stain import cpu`) closes a cycle through the __init__
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_ground_floor_imports_no_stage():
    sources = _sources()
    for module, path in sources.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in GROUND:
            continue
        for used in _imports(path, set(sources), top_only=False) - {"wsikit"}:
            if used.endswith(".settings"):  # a stage's settings are data (no stage code): anyone may use them
                continue
            assert used.split(".")[1] not in STAGES, f"{module} (ground floor) imports the stage {used}"


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in _sources().items():
        text = path.read_text()
        if len(text.splitlines()) > 520:
            too_long.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1  # option declarations are in the signature
                if lines > 65:
                    too_long.append(f"{module}.{node.name}: {lines} lines")
    assert not too_long, "split these along their seams: " + "; ".join(too_long)


def _loaded(args: list[str], tmp_path: Path) -> set[str]:
    """Top-level packages imported by ``wsikit ARGS`` in a fresh interpreter."""
    code = (
        "import sys, json\nfrom wsikit.cli.main import app\n"
        f"try:\n    app({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('MODULES=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("MODULES=")]
    assert line, result.stderr
    return set(json.loads(line[0].removeprefix("MODULES=")))


@pytest.mark.parametrize(
    "command", [["--version"], ["--help"], ["status", "JOB"], ["config", "show", "CONFIG"]]
)
def test_light_commands_start_without_torch(command, tmp_path):
    (tmp_path / "JOB" / "status" / "tile").mkdir(parents=True)
    (tmp_path / "CONFIG").write_text((ROOT / "configs" / "multimag-0.5um.yaml").read_text())
    loaded = _loaded(command, tmp_path)
    assert not loaded & {"torch", "scipy"}, (
        f"wsikit {' '.join(command)} imported {loaded & {'torch', 'scipy'}}"
    )


def test_info_loads_only_the_slide_layer(tmp_path, sample_slide):
    loaded = _loaded(["info", str(sample_slide)], tmp_path)
    assert not loaded & set(HEAVY), f"wsikit info imported {sorted(loaded & set(HEAVY))}"
