"""Every example runs as a user would run it and prints what its README promises.

Each ``examples/<name>/`` has ``flow.py``, ``README.md`` and ``expected.txt``:
one line per string that must appear in the example's output, in that order.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from run_ahead import run_ahead

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/flow.py"))


def test_every_example_has_a_readme_and_expectations() -> None:
    assert "quickstart" in EXAMPLES
    for name in EXAMPLES:
        folder = ROOT / "examples" / name
        assert (folder / "README.md").is_file(), f"examples/{name} lacks a README.md"
        expected = folder / "expected.txt"
        assert expected.is_file() and expected.read_text().strip(), (
            f"examples/{name} lacks an expected.txt (lines its output must contain)")


@pytest.fixture(scope="module")
def example_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Each selected example's run, started ahead two at a time (run_ahead.py), each
    in a working directory of its own."""
    def command(name: str) -> tuple[list[str], dict[str, Any]]:
        folder = ROOT / "examples" / name
        # An example that serves until stopped runs its self-checking mode (args.txt).
        args = ((folder / "args.txt").read_text().split()
                if (folder / "args.txt").is_file() else [])
        return ([sys.executable, str(folder / "flow.py"), *args],
                {"timeout": 60, "cwd": tmp_path_factory.mktemp(name)})

    yield from run_ahead(request, "test_example_runs_and_prints_its_story", "name", command)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_prints_its_story(
        name: str, example_runs: dict[str, Future[subprocess.CompletedProcess[str]]]) -> None:
    folder = ROOT / "examples" / name
    proc = example_runs[name].result()
    assert proc.returncode == 0, proc.stderr
    position = 0
    for line in (folder / "expected.txt").read_text().splitlines():
        if not line.strip():
            continue
        found = proc.stdout.find(line, position)
        assert found >= 0, (
            f"{name}: {line!r} missing (or out of order) in output:\n{proc.stdout}")
        position = found + len(line)
