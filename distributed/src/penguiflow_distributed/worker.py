"""``pf worker``: run a share of a flow's nodes in this process, over Redis Streams.

::

    pf worker MODULE:ATTR --bus URL [--store URL] [--nodes a,b] [--concurrency N]

``ATTR`` is a ``PenguiFlow``, a zero-argument callable returning one, or returning a
``(flow, registry)`` pair; otherwise a module-level ``registry`` (a
``ModelRegistry``) is used when the module has one. ``--bus`` defaults to
``$PENGUIFLOW_BUS`` and ``--store`` to ``$PENGUIFLOW_STORE`` (none: no store; a store
needs ``penguiflow-exporters``).

The worker logs its worker id on start (``worker_started``). SIGTERM or SIGINT
drains it: it takes no new entries, waits up to ``--grace`` seconds for the ones it
holds to finish, stops, and exits 0; entries not finished by then are left to
another worker (claimed after the bus's ``claim_idle_s``). ``--concurrency N`` runs
N worker processes under this one, which forwards the signals and exits with the
worst status.

Exit status: 0 after a drain, 2 for a usage error (bad MODULE:ATTR, bus URL, bus
option, --log-level or node names) or a Redis that refuses the bus, 1 when a child
worker failed. With ``--concurrency N``, MODULE:ATTR and the bus URL are checked
once, before any child starts; the status is then the worst child's (2 when every
child that did not drain exited 2, else 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from penguiflow import ModelRegistry, PenguiFlow
from penguiflow.errors import PenguiFlowError

from .bus import RedisMessageBus, _redact

__all__ = ["build_parser", "load_flow", "main", "serve"]

logger = logging.getLogger("penguiflow_distributed.worker")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageFailure(Exception):
    """A usage error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "pf worker") -> argparse.ArgumentParser:
    """The ``pf worker`` argument parser."""
    # allow_abbrev=False: a child is told its own --concurrency, and an abbreviated
    # spelling the parent took (--concurr 2) would otherwise reach it too.
    parser = _Parser(prog=prog, allow_abbrev=False, description=(
        "Run a share of a flow's nodes in this process, over Redis Streams "
        "(at-least-once; SIGTERM drains and exits 0)."))
    parser.add_argument("target", metavar="MODULE:ATTR",
                        help="the flow: a PenguiFlow, or a zero-argument callable returning one "
                             "(or a (flow, registry) pair)")
    parser.add_argument("--bus", metavar="URL", default=os.environ.get("PENGUIFLOW_BUS"),
                        help="redis://host:6379/0?namespace=x&claim_idle_s=30 "
                             "(default: $PENGUIFLOW_BUS)")
    parser.add_argument("--store", metavar="URL", default=os.environ.get("PENGUIFLOW_STORE"),
                        help="record events here: sqlite:///path.db or postgresql://... "
                             "(default: $PENGUIFLOW_STORE; none: no store)")
    parser.add_argument("--nodes", metavar="A,B",
                        help="run only these nodes (default: every node)")
    parser.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="run N worker processes (default 1)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, wait this long for work in hand (default 30)")
    # WARNING by default: at INFO the runtime logs a line per node run, which a busy
    # worker pays for in CPU and its operator in log volume.
    parser.add_argument("--log-level", default="WARNING", metavar="LEVEL", type=_log_level,
                        help="log level of the worker's log lines on stderr (default "
                             "WARNING; INFO adds a line per node run)")
    return parser


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    """``--log-level``: a level name, in any case (a usage error otherwise)."""
    if value.upper() not in _LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is no log level: use one of {', '.join(_LEVELS)}")
    return value.upper()


def load_flow(target: str) -> tuple[PenguiFlow, ModelRegistry | None]:
    """The flow (and registry) ``MODULE:ATTR`` names (see the module docstring).

    Raises:
        UsageFailure: the module or attribute is missing, or is no flow.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageFailure(f"expected MODULE:ATTR (e.g. myapp.flows:build), got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageFailure(f"cannot import {module_name!r}: {exc}") from exc
    try:
        value: Any = getattr(module, attr)
    except AttributeError:
        raise UsageFailure(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(value, PenguiFlow) and callable(value):
        try:
            value = value()
        except Exception as exc:
            raise UsageFailure(
                f"{target}() raised {type(exc).__name__}: {exc} (ATTR must be a PenguiFlow "
                f"or a callable taking no arguments that returns one)") from exc
    registry = getattr(module, "registry", None)
    if isinstance(value, tuple) and len(value) == 2:
        value, registry = value
    if not isinstance(value, PenguiFlow):
        raise UsageFailure(
            f"{target} is a {type(value).__name__}, not a PenguiFlow (or a callable "
            f"returning one)")
    if registry is not None and not isinstance(registry, ModelRegistry):
        registry = None
    return value, registry


def _open_store(url: str) -> Any:
    try:
        exporters = importlib.import_module("penguiflow_exporters")
    except ImportError:
        raise UsageFailure(
            "--store needs penguiflow-exporters: pip install penguiflow-exporters") from None
    return exporters.open_store(url)


async def serve(flow: PenguiFlow, bus: RedisMessageBus, *, registry: ModelRegistry | None,
                nodes: Sequence[str] | None, store: Any = None, grace_s: float = 30.0,
                stop: asyncio.Event | None = None) -> int:
    """Run ``flow``'s ``nodes`` over ``bus`` until ``stop`` is set (or SIGTERM/SIGINT
    when ``stop`` is None), then drain; returns the exit status."""
    loop = asyncio.get_running_loop()
    own_signals = stop is None
    stop = stop or asyncio.Event()
    if own_signals:  # the command owns the process: its signals are its to handle
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        # Inside the try: a store that cannot open must not leave our handlers on
        # the host's loop (a later Ctrl-C would set an Event nobody waits for).
        if store is not None and hasattr(store, "open"):
            await store.open()
        flow.run(registry=registry, message_bus=bus, state_store=store, nodes=nodes)
        try:
            bound = await _bound_or_stopped(bus, stop)
        except BaseException:
            await flow.stop()  # Redis refused the bus (BusBindError): said by main()
            raise
        if not bound:
            # Redis never answered (bind retries link errors for ever): a stop
            # request must still end the process, with nothing taken to hand back.
            await flow.stop()
            print(f"pf worker: stopped before Redis at {_redact(bus.url)} answered; "
                  "nothing was read", file=sys.stderr, flush=True)
            return EXIT_OK
        binding = flow.binding
        assert binding is not None
        logger.info("worker_started", extra={
            "worker_id": binding.worker_id, "flow": flow.name,
            "nodes": sorted(binding.local_nodes), "bus": _redact(bus.url), "pid": os.getpid()})
        print(f"pf worker: worker {binding.worker_id} (pid {os.getpid()}) runs "
              f"{', '.join(sorted(binding.local_nodes)) or 'no nodes'} of flow {flow.name!r} "
              f"on {_redact(bus.url)} (namespace {bus.namespace!r})", file=sys.stderr, flush=True)
        await stop.wait()
        left = await bus.drain(grace_s)
        logger.info("worker_draining_done", extra={
            "worker_id": binding.worker_id, "left_to_others": left, "stats": dict(bus.stats)})
        await flow.stop()
        print(f"pf worker: worker {binding.worker_id} stopped ({left} entries left to other "
              f"workers); stats {json.dumps(bus.stats, sort_keys=True)}",
              file=sys.stderr, flush=True)
        return EXIT_OK
    finally:
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if store is not None and hasattr(store, "close"):
            with contextlib.suppress(Exception):
                await store.close()


async def _bound_or_stopped(bus: RedisMessageBus, stop: asyncio.Event) -> bool:
    """True once ``bus`` is bound, False if ``stop`` is set first.

    Raises:
        BusBindError: Redis refused the bus.
    """
    ready = asyncio.ensure_future(bus.ready())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()  # no-ops on the one that finished
        stopped.cancel()
    if ready.done() and not ready.cancelled():
        ready.result()  # BusBindError when Redis refused the bus
        return True
    return False


def _supervise(argv: Sequence[str], count: int) -> int:
    """Run ``count`` single workers as children; forward SIGTERM/SIGINT; worst status."""
    cleaned: list[str] = []
    skip = False
    for arg in argv:  # every argument but --concurrency N / --concurrency=N
        if skip:
            skip = False
        elif arg == "--concurrency":
            skip = True
        elif not arg.startswith("--concurrency="):
            cleaned.append(arg)
    # Each child runs one worker, whatever else argv said (the last option wins).
    children = [subprocess.Popen([sys.executable, "-m", "penguiflow_distributed.worker",
                                  *cleaned, "--concurrency", "1"]) for _ in range(count)]

    def forward(sig: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _worst(codes)


def _worst(codes: Sequence[int]) -> int:
    """The status of a supervisor whose children exited with ``codes``: 0 when all
    drained, 2 when the worst was a usage error (or Redis refusing the bus), else
    1 (a child failed, or was killed by a signal)."""
    if all(c == EXIT_OK for c in codes):
        return EXIT_OK
    if all(c in (EXIT_OK, EXIT_USAGE) for c in codes):
        return EXIT_USAGE
    return EXIT_FAILED


def _prepared(ns: argparse.Namespace) -> tuple[RedisMessageBus, PenguiFlow,
                                               ModelRegistry | None]:
    """The bus and the flow ``ns`` names.

    Raises:
        UsageFailure, PenguiFlowError, ValueError: a usage error (exit status 2).
    """
    if not ns.bus:
        raise UsageFailure("no bus: pass --bus redis://host:6379/0 or set PENGUIFLOW_BUS")
    bus = RedisMessageBus.from_url(ns.bus)
    flow, registry = load_flow(ns.target)
    return bus, flow, registry


def main(argv: Sequence[str] | None = None, *, prog: str = "pf worker") -> int:
    """Run ``pf worker``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser(prog).parse_args(argv)
    if ns.concurrency < 1:
        print(f"{prog}: error: --concurrency must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    if ns.concurrency > 1:
        # A usage error is said once, here, before any child starts (each child
        # would say it again, and the supervisor exited 1 for it).
        try:
            _prepared(ns)
        except (UsageFailure, PenguiFlowError, ValueError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _supervise(argv, ns.concurrency)
    logging.basicConfig(level=ns.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        bus, flow, registry = _prepared(ns)
        nodes = None if ns.nodes is None else [n.strip() for n in ns.nodes.split(",")
                                               if n.strip()]
        store = _open_store(ns.store) if ns.store else None
        return asyncio.run(serve(flow, bus, registry=registry, nodes=nodes, store=store,
                                 grace_s=ns.grace))
    except (UsageFailure, PenguiFlowError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(prog="penguiflow-worker"))
