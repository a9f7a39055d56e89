"""The README tells the truth: its two set-up commands, and every command it shows exists."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from dual_attention_cli.main import SUBCOMMANDS

README = (PROJECT_ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the Set up section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_exactly_two_setup_commands_install_and_test() -> None:
    install, test = _setup_commands()
    assert "pip install torch==2.13.0" in install and "dual-attention quickstart" in install
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert test in ci, ".ci/run must run the README's test command"


def test_every_subcommand_the_readme_names_exists() -> None:
    named = set(re.findall(r"dual-attention ([a-z]+)", README))
    assert named, "the README names no subcommand"
    missing = named - set(SUBCOMMANDS)
    assert not missing, f"README names subcommands that do not exist: {sorted(missing)}"


def _help_text(module_name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a ``main(argv)`` in-process (the code ``python -m`` runs) and return what ``--help`` printed."""
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code in (0, None), f"{module_name} {' '.join(argv)} exited with {exited.value.code}"
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_succeeds(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "usage:" in _help_text("dual_attention_cli.main", [name, "--help"], capsys)


def test_every_module_the_readme_runs_with_python_m_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    modules = sorted(set(re.findall(r"python -m ((?:jobs|tune|serve|dual_attention_cli)\.[a-z_]+)", README)))
    assert modules, "the README shows no python -m entry point"
    for module in modules:
        source = importlib.util.find_spec(module).origin
        assert 'if __name__ == "__main__":' in Path(source).read_text(), f"{module} does not run with python -m"
        assert "usage:" in _help_text(module, ["--help"], capsys)
