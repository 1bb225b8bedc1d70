"""Python code blocks in the README and docs/ run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A block opened with ```python runs; use ```text or ```py-skip for fragments.
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

CASES = [
    pytest.param(block, id=f"{path.relative_to(ROOT)}:{n}")
    for path in DOCS
    for n, block in enumerate(BLOCK.findall(path.read_text()))
]


@pytest.mark.parametrize("code", CASES)
def test_doc_block_runs(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{proc.stderr}"


def test_readme_quickstart_prints_its_result() -> None:
    block = BLOCK.findall((ROOT / "README.md").read_text())[0]
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "HELLO, PENGUIN"
