"""Python code blocks in the README and docs/ run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from run_ahead import run_ahead

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A block opened with ```python runs; use ```text or ```py-skip for fragments.
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

CASES = [
    pytest.param(block, id=f"{path.relative_to(ROOT)}:{n}")
    for path in DOCS
    for n, block in enumerate(BLOCK.findall(path.read_text()))
]


@pytest.fixture(scope="module")
def block_runs(request: pytest.FixtureRequest
               ) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Each selected block's run, started ahead two at a time (run_ahead.py)."""
    yield from run_ahead(request, "test_doc_block_runs", "code",
                         lambda code: ([sys.executable, "-c", code],
                                       {"timeout": 60, "cwd": ROOT}))


@pytest.mark.parametrize("code", CASES)
def test_doc_block_runs(
        code: str, block_runs: dict[str, Future[subprocess.CompletedProcess[str]]]) -> None:
    proc = block_runs[code].result()
    assert proc.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{proc.stderr}"


def test_readme_quickstart_prints_its_result(
        block_runs: dict[str, Future[subprocess.CompletedProcess[str]]]) -> None:
    block = BLOCK.findall((ROOT / "README.md").read_text())[0]
    # The block's run above, when that test is selected too; else its own.
    proc = (block_runs[block].result() if block in block_runs else
            subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                           timeout=60, cwd=ROOT, check=False))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "HELLO, PENGUIN"
