"""Every example runs as a user would run it, and prints what its README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/flow.py"))

#: Lines (substrings) each example must print; an example missing here fails.
EXPECTED: dict[str, list[str]] = {
    "quickstart": ["answer: 5 WORDS, LONGEST: 'UNDERWATER'", "same id from emit to fetch: True"],
}


def test_every_example_has_expectations_and_a_readme() -> None:
    assert EXAMPLES, "no examples found"
    for name in EXAMPLES:
        assert name in EXPECTED, f"add the expected output of examples/{name} to EXPECTED"
        assert (ROOT / "examples" / name / "README.md").is_file(), f"examples/{name} lacks a README"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_prints_its_story(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name / "flow.py")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for line in EXPECTED[name]:
        assert line in proc.stdout, f"{name}: {line!r} not in output:\n{proc.stdout}"
