"""The inspector in a real terminal: tmux at 100x30, keys sent, the screen captured.

``pf inspect <id> --store sqlite:///...`` when the CLI has the command; until
then the same app through ``python -c`` (the CLI only constructs and runs it).
Skips when tmux is missing, and fails instead under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from tui_traces import TRACE, demo_events

TMUX = shutil.which("tmux")
if TMUX is None:
    if os.environ.get("CI") == "true":
        pytest.fail("tmux is required under CI=true (apt-get install tmux)", pytrace=False)
    pytest.skip("tmux is not installed: the terminal smoke test needs it", allow_module_level=True)


def _cli_has_inspect() -> bool:
    pf = Path(sys.executable).with_name("pf")
    if not pf.exists():
        return False
    out = subprocess.run([str(pf), "inspect", "--help"], capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    return out.returncode == 0 and "--store" in out.stdout


def _command(url: str, trace_id: str) -> str:
    if _cli_has_inspect():
        pf = Path(sys.executable).with_name("pf")
        return f"{shlex.quote(str(pf))} inspect {trace_id} --store {shlex.quote(url)}"
    code = ("import sys; from penguiflow_inspector.app import InspectorApp; "
            f"a = InspectorApp({url!r}, {trace_id!r}); a.run(); sys.exit(a.return_code or 0)")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def _tmux(*args: str) -> str:
    assert TMUX is not None
    return subprocess.run([TMUX, *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def _wait_screen(session: str, ok: Callable[[str], bool], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if ok(screen):
            return screen
        time.sleep(0.1)  # polling a separate process's terminal; no event to await
    raise AssertionError(f"screen never matched; last capture:\n{screen}")


def test_inspect_in_tmux(tmp_path: Path) -> None:
    from penguiflow_exporters import open_store

    url = f"sqlite:///{tmp_path}/traces.db"

    async def record() -> None:
        async with open_store(url) as store:
            await store.save_events(demo_events())

    asyncio.run(record())
    session = f"pf-smoke-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "exit"
    cmd = f"{_command(url, TRACE)}; echo $? > {shlex.quote(str(marker))}"
    _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd)
    try:
        screen = _wait_screen(session, lambda s: "merge" in s and "dur" in s)
        assert "0af7651916cd" in screen and "cancelled" in screen
        assert "plan" in screen and "summarise" in screen
        _tmux("send-keys", "-t", session, "j", "j")
        _wait_screen(session, lambda s: "b200000000000002" in s)  # fetch's detail
        _tmux("send-keys", "-t", session, "2")
        _wait_screen(session, lambda s: "task-91c2" in s and "p95" in s)
        _tmux("send-keys", "-t", session, "3")
        _wait_screen(session, lambda s: "acknowledged" in s and "deadlines" in s)
        _tmux("send-keys", "-t", session, "?")
        _wait_screen(session, lambda s: "pf inspect — keys" in s)
        # Separately: tmux reads "Escape q" sent at once as Alt+q.
        _tmux("send-keys", "-t", session, "Escape")
        _wait_screen(session, lambda s: "pf inspect — keys" not in s)
        _tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text().strip() == "0"
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True, check=False)
