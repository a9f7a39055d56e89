"""The core library never imports Ray: checked in the source (AST) and at run time (fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "dual_attention"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_no_core_file_imports_ray_or_upper_layers() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 5, f"expected the core's files under {CORE}"
    offenders = {}
    for path in files:
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in ("ray", "jobs", "serve", "tune",
                                                                          "dual_attention_cli")}
        if bad:
            offenders[str(path.relative_to(CORE.parent))] = sorted(bad)
    assert not offenders, f"core files import Ray or an upper layer: {offenders}"


def test_the_scanner_sees_a_ray_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom ray import train\nimport importlib\nimportlib.import_module('ray.serve')\n")
    assert {"ray", "ray.serve"} <= _imported_modules(sample)


def test_importing_every_core_module_loads_no_ray() -> None:
    modules = sorted(".".join(p.relative_to(CORE.parent).with_suffix("").parts) for p in CORE.rglob("*.py")
                     if p.stem not in ("__init__", "__main__"))
    assert "dual_attention.synthetic.render" in modules  # subpackages are imported too
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY_MODULES', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"importing the core loaded Ray or failed:\n{result.stdout}\n{result.stderr}"
    assert "RAY_MODULES []" in result.stdout


def test_the_scoring_core_does_not_depend_on_the_synthetic_package() -> None:
    """The synthetic writer and toy tasks are their own package (dual_attention/synthetic/): tests,
    benchmarks and the CLI use them, the model, pipeline and training never do."""
    offenders = {}
    for path in sorted(CORE.glob("*.py")):
        bad = {m for m in _imported_modules(path) if m.startswith("dual_attention.synthetic")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"core modules import the synthetic package: {offenders}"


def test_the_runtime_room_imports_no_job_and_no_upper_layer() -> None:
    """jobs/runtime/ (start_ray, tile plane, tracking) is what jobs/, tune/ and serve/ share: it may use the
    core and Ray, never a job, tune, serve or the CLI, so that no room reaches back into another."""
    runtime = CORE.parent / "jobs" / "runtime"
    files = sorted(runtime.glob("*.py"))
    assert {p.stem for p in files} >= {"cluster", "tile_plane", "tracking"}
    offenders = {}
    for path in files:
        bad = {m for m in _imported_modules(path)
               if (m.split(".")[0] in ("serve", "tune", "dual_attention_cli"))
               or (m.split(".")[0] == "jobs" and not m.startswith("jobs.runtime"))}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"jobs/runtime imports a job or an upper layer: {offenders}"
