"""Helpers of the distributed suite: a real Redis server and real worker processes.

``redis_url`` (session): ``$TEST_REDIS_URL`` if set, else a throwaway
``redis-server`` on a free loopback port; where neither can be had the tests are
skipped -- or fail when ``CI=true``. ``own_redis`` (function): a server of the
test's own, with AOF persistence, for tests that restart it. Every test gets its
own ``namespace`` so that tests never see each other's streams.

``workers`` starts ``python -m penguiflow_distributed.worker dist_flows:<flow>``
processes (this folder on their PYTHONPATH), waits for their "ready" line, and
stops (SIGKILL) any still running at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def no_redis(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no Redis for the distributed tests: {reason}", pytrace=False)
    pytest.skip(f"no Redis: {reason} (set TEST_REDIS_URL=redis://... or install redis-server)")


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until ``check()`` holds: for what another process does (a file it writes)
    or a counter with no event to await; fails after ``timeout`` seconds naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # polled: nothing to await across processes
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` (optionally with AOF, to survive a restart)."""

    def __init__(self, *, aof: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pf-redis-")
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--dir", self.dir, "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return self.url
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def named(url: str, name: str) -> str:
    """``url`` whose connections carry the client name ``name`` (CLIENT SETNAME), so
    that :func:`cut_links` can break them and no one else's."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


async def cut_links(redis: Any, name: str) -> None:
    """Kill the connections named ``name`` (see :func:`named`) on the server: a link
    break for the buses made with that name only. Never every client of the server:
    the shared TEST_REDIS_URL serves other tests at the same time (another pytest
    run, an xdist worker), whose buses would see link errors of no cause of theirs."""
    ids = [c["id"] for c in await redis.client_list() if c.get("name") == name]
    assert ids, f"no connection named {name!r} to cut"
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)


def bus_url(url: str, namespace: str, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"namespace": namespace, **options}.items())
    return f"{url}?{query}"


class Worker:
    """One ``penguiflow_distributed.worker`` process."""

    def __init__(self, flow: str, url: str, *, nodes: str | None = None,
                 store: str | None = None, extra: tuple[str, ...] = ()) -> None:
        args = [sys.executable, "-m", "penguiflow_distributed.worker", f"dist_flows:{flow}",
                "--bus", url, "--grace", "10", *extra]
        if nodes is not None:
            args += ["--nodes", nodes]
        if store is not None:
            args += ["--store", store]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.args = args
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.worker_id: str | None = None
        self._reader: threading.Thread | None = None

    async def ready(self, timeout: float = 30.0) -> str:
        """Wait for the worker's start line; its worker id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self.proc.stderr is not None
        while loop.time() < deadline:
            line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stderr.readline),
                                          deadline - loop.time())
            if not line:
                break
            self.lines.append(line)
            if line.startswith("pf worker: worker "):
                self.worker_id = line.split()[3]
                # Keep draining stderr so the worker never blocks on a full pipe.
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return self.worker_id
        raise AssertionError(f"worker never got ready: {''.join(self.lines)[-3000:]}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(ValueError):  # closed by close()
            for line in self.proc.stderr:
                self.lines.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit status, once every line it wrote is read."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(10)
        return code




class SilentProxy:
    """A TCP proxy in front of Redis (in the test's loop) that can go silent.

    ``silence()`` makes every connection open now stop forwarding, in both
    directions, without closing anything: a link dropped by a NAT or a firewall, as
    its endpoints see it. Connections made afterwards are forwarded normally.
    """

    def __init__(self, target_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self._server: asyncio.AbstractServer | None = None
        self._live: list[list[bool]] = []  # per connection: [forwarding]
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._db}"

    async def start(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def silence(self) -> None:
        for flag in self._live:
            flag[0] = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        flag = [True]
        self._live.append(flag)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, flag))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    flag: list[bool]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if flag[0]:  # silenced: swallowed, and the connection stays open
                    dst.write(data)
                    await dst.drain()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
