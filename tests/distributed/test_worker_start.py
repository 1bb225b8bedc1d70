"""``pf worker`` before its bus is bound: Redis unreachable, Redis refusing, a store
that cannot open. A stop request must end the process at every point, a refusal
must fail it with the reason, and the host's loop must get its signals back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dist_flows
import pytest
from dist_support import RedisServer, bus_url, eventually, free_port

from penguiflow_distributed import BusBindError, RedisMessageBus
from penguiflow_distributed.worker import EXIT_OK, main, serve

HERE = Path(__file__).parent


async def test_a_stop_ends_a_worker_whose_redis_never_answers(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on this port: bind retries its link errors for ever.
    bus = RedisMessageBus(f"redis://127.0.0.1:{free_port()}/0", max_backoff_s=0.2)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(dist_flows.chain(), bus, registry=None,
                                        nodes=["a"], stop=stop))
    await eventually(lambda: bus.stats["link_errors"] >= 2, "bind retrying its link")
    stop.set()
    assert await asyncio.wait_for(serving, 15) == EXIT_OK
    assert "stopped before Redis at redis://127.0.0.1:" in capsys.readouterr().err


def test_pf_worker_exits_0_on_sigterm_while_redis_is_unreachable() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", f"redis://127.0.0.1:{free_port()}/0?max_backoff_s=0.2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # Its first link error is logged once the loop (and its handlers) run.
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if "bus_redis_unreachable" in line:
                break
        else:
            raise AssertionError(f"no link error logged: {''.join(lines)[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "stopped before Redis" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The field after the command's closing parenthesis: state, then ppid.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree in /proc")
def test_pf_worker_concurrency_starts_that_many_single_workers_and_no_more() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", f"redis://127.0.0.1:{free_port()}/0?max_backoff_s=0.2",
         "--concurrency=2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = 0
        for line in proc.stderr:  # each worker logs its first link error once
            seen += "bus_redis_unreachable" in line
            if seen == 2:
                break
        children = _children(proc.pid)
        assert len(children) == 2
        assert not [c for child in children for c in _children(child)]  # no chain
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_an_abbreviated_option_is_refused_rather_than_guessed(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Guessed, --concurr 2 reached every child too, each starting two more.
    with pytest.raises(SystemExit) as info:
        main(["dist_flows:chain", "--bus", "redis://127.0.0.1:1/0", "--concurr", "2"])
    assert info.value.code == 2
    assert "unrecognized arguments: --concurr 2" in capsys.readouterr().err


def test_a_bad_log_level_is_a_usage_error() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # A process of its own: logging.basicConfig, where the level was refused, does
    # nothing under pytest (whose handlers are on the root logger already).
    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", "redis://127.0.0.1:1/0", "--log-level", "foo"],
        env=env, capture_output=True, text=True, timeout=30)
    # Before: a ValueError traceback ("Unknown level: 'FOO'") and exit status 1.
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "--log-level: 'foo' is no log level: use one of DEBUG, INFO, WARNING" in err


def test_pf_worker_fails_with_the_reason_when_redis_refuses_the_bus(
        redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    # A plain string where the bus needs its stream: Redis answers WRONGTYPE.
    client.set(f"{namespace}:chain:edge:OpenSea->a", "not a stream")
    monkeypatch.syspath_prepend(str(HERE))
    try:
        code = main(["dist_flows:chain", "--bus", bus_url(redis_url, namespace),
                     "--nodes", "a"])
    finally:
        client.delete(f"{namespace}:chain:edge:OpenSea->a")
        client.close()
    assert code == 2  # before: it idled, reading nothing, and exited 0 on SIGTERM
    err = capsys.readouterr().err
    assert "refused the bus for flow 'chain'" in err and "WRONGTYPE" in err


async def test_ready_raises_the_bind_error(redis_url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    client: Any = aioredis.Redis.from_url(redis_url)
    key = f"{namespace}:chain:edge:OpenSea->a"
    await client.set(key, "not a stream")
    flow = dist_flows.chain()
    bus = RedisMessageBus(redis_url, namespace=namespace)
    flow.run(message_bus=bus, nodes=["a"])
    try:
        with pytest.raises(BusBindError, match="WRONGTYPE"):
            await asyncio.wait_for(bus.ready(), 10)
    finally:
        await flow.stop()
        await client.delete(key)
        await client.aclose()


def _require_password(server: RedisServer) -> None:
    import redis

    client = redis.Redis(port=server.port)
    try:
        client.config_set("requirepass", "the-right-one")
    finally:
        client.close()


@pytest.mark.parametrize(("credentials", "refusal"), [
    (":not-the-password@", "invalid username-password pair"),  # WRONGPASS
    ("", "Authentication required"),  # NOAUTH
])
async def test_a_bad_or_missing_password_fails_the_bind_instead_of_retrying(
        own_redis: RedisServer, credentials: str, refusal: str) -> None:
    _require_password(own_redis)
    flow = dist_flows.chain()
    bus = RedisMessageBus(f"redis://{credentials}127.0.0.1:{own_redis.port}/0",
                          max_backoff_s=0.05)
    flow.run(message_bus=bus, nodes=["a"])
    try:
        # Before: retried for ever as "Redis unreachable", ready() never returned.
        with pytest.raises(BusBindError, match="refused the bus for flow 'chain'") as info:
            await asyncio.wait_for(bus.ready(), 10)
    finally:
        await flow.stop()
    assert refusal in str(info.value)
    assert "check the user name and password in the bus URL" in str(info.value)
    assert "not-the-password" not in str(info.value)
    assert bus.stats["link_errors"] == 0


def test_pf_worker_exits_2_on_a_wrong_password(own_redis: RedisServer) -> None:
    _require_password(own_redis)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", f"redis://:not-the-password@127.0.0.1:{own_redis.port}/0?max_backoff_s=0.05"],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "refused the bus" in done.stderr and "AuthenticationError" in done.stderr
    assert "not-the-password" not in done.stderr


async def test_pf_worker_never_shows_a_password_given_as_a_query_item(
        own_redis: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    _require_password(own_redis)
    url = f"{own_redis.url}?password=the-right-one&max_backoff_s=0.05"
    bus = RedisMessageBus.from_url(url)  # redis-py takes the query item as the password
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(dist_flows.chain(), bus, registry=None,
                                        nodes=["a"], stop=stop))
    await asyncio.wait_for(bus.ready(), 10)
    stop.set()
    assert await asyncio.wait_for(serving, 15) == EXIT_OK
    wrong = RedisMessageBus.from_url(url.replace("the-right-one", "not-the-password"))
    with pytest.raises(BusBindError) as info:
        await asyncio.wait_for(serve(dist_flows.chain(), wrong, registry=None, nodes=["a"],
                                     stop=asyncio.Event()), 15)
    err = capsys.readouterr().err
    assert "runs a of flow 'chain' on redis://127.0.0.1:" in err  # the start line
    for shown in (err, str(info.value)):
        assert "password=***" in shown
        assert "the-right-one" not in shown and "not-the-password" not in shown


class _StoreThatCannotOpen:
    async def open(self) -> None:
        raise OSError("database is down")

    async def close(self) -> None:
        return None


async def test_a_store_that_cannot_open_leaves_the_loop_its_signals() -> None:
    loop = asyncio.get_running_loop()
    bus = RedisMessageBus(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(OSError, match="database is down"):
        await serve(dist_flows.chain(), bus, registry=None, nodes=["a"],
                    store=_StoreThatCannotOpen())
    # remove_signal_handler says whether one was still installed.
    removed = [loop.remove_signal_handler(sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    with contextlib.suppress(Exception):
        await bus.unbind()
    assert removed == [False, False]


def test_pf_worker_exits_2_on_a_bus_url_redis_py_cannot_take() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # Before: accepted, then the bind failed unseen and the worker idled for ever.
    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", "redis://127.0.0.1:notaport/0"],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "Port could not be cast to integer" in done.stderr


@pytest.mark.parametrize("bad", [
    ["nosuchmod:x", "--bus", "redis://127.0.0.1:1/0"],
    ["dist_flows:chain", "--bus", "redis://127.0.0.1:notaport/0"],
])
def test_a_usage_error_under_concurrency_is_said_once_and_exits_2(bad: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_distributed.worker", *bad, "--concurrency", "3"],
        env=env, capture_output=True, text=True, timeout=60)
    # Before: each child said it, and the supervisor exited 1.
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_supervisor_exits_with_the_worst_child_status() -> None:
    from penguiflow_distributed.worker import _worst

    assert _worst([0, 0]) == 0
    assert _worst([2, 2]) == 2 and _worst([0, 2]) == 2  # Redis refused the bus
    assert _worst([2, 1]) == 1 and _worst([0, -15]) == 1
