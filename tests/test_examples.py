"""Every example runs as a user would run it and prints what its README promises.

Each ``examples/<name>/`` has ``flow.py``, ``README.md`` and ``expected.txt``:
one line per string that must appear in the example's output, in that order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_prints_its_story(name: str, tmp_path: Path) -> None:
    folder = ROOT / "examples" / name
    # An example that serves until stopped runs its self-checking mode here (args.txt).
    args = (folder / "args.txt").read_text().split() if (folder / "args.txt").is_file() else []
    proc = subprocess.run(
        [sys.executable, str(folder / "flow.py"), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    position = 0
    for line in (folder / "expected.txt").read_text().splitlines():
        if not line.strip():
            continue
        found = proc.stdout.find(line, position)
        assert found >= 0, (
            f"{name}: {line!r} missing (or out of order) in output:\n{proc.stdout}")
        position = found + len(line)
