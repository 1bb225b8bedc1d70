"""The `pf` command surface (its commands arrive with later releases)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from penguiflow_inspector.cli import COMMANDS, main


def test_help_lists_every_planned_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert name in out
    assert [name for name, _ in COMMANDS] == ["inspect", "traces", "tail", "export", "demo"]


def test_a_command_not_yet_available_says_so_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "abc123"]) == 2
    assert "not available in this build yet" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: pf" in capsys.readouterr().out


def test_console_scripts_are_installed() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["pf"] == "penguiflow_inspector.cli:main"
    assert scripts["penguiflow-admin"] == "penguiflow.admin:main"


def test_pf_runs_as_a_module_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", "--help"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0
    assert "inspect" in proc.stdout
