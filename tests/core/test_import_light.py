"""Dependency direction: importing the core pulls in no heavy or optional dependency."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = (
    "textual",
    "asyncpg",
    "redis",
    "httpx",
    "fastapi",
    "starlette",
    "structlog",
    "opentelemetry.sdk",
)

SCRIPT = """
import json, sys
import penguiflow
print(json.dumps(sorted(sys.modules)))
"""


def test_import_penguiflow_is_light() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    offenders = sorted(
        name
        for name in modules
        for forbidden in FORBIDDEN
        if name == forbidden or name.startswith(forbidden + ".")
    )
    assert offenders == []
