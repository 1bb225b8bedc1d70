"""``pf inspect --json|--plain`` and ``pf export --json`` on a 200k-event stored trace.

Builds one SQLite store holding a trace of ``--events`` events (the chain of
``benchmarks/inspector.py``: two events per invocation, a remote call every 50),
then runs each command once as a child process and prints its wall time and the
peak RSS of that child (``resource.getrusage(RUSAGE_CHILDREN)``, which is the
largest child so far: so each command runs in its own fresh ``python -c`` that
forks the command and reports its child's figure). Targets (issue 15 §3): each
``--json`` under 5 s and 500 MB, ``--plain`` under 3 s.

    uv run python benchmarks/inspector_scale.py [--events 200000] [--store PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from inspector import TRACE, trace_events
from penguiflow_exporters import open_store

#: Runs one command as a grandchild and prints {"s": wall, "rss_mb": peak} of it.
_PROBE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open(sys.argv[1], "wb") as out:
    rc = subprocess.run(sys.argv[2:], stdout=out, stderr=subprocess.PIPE).returncode
s = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": rc, "s": s, "rss_mb": rss}))
"""


async def _fill(url: str, n_events: int) -> None:
    events = trace_events(n_events)
    async with open_store(url) as store:
        for start in range(0, len(events), 20_000):
            await store.save_events(events[start: start + 20_000])
        await store.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--store", help="reuse (or create) this SQLite file")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pf-scale-")
    path = Path(args.store or os.path.join(tmp, "big.db"))
    url = f"sqlite:///{path}"
    if not path.exists():
        asyncio.run(_fill(url, args.events))
    pf = [sys.executable, "-m", "penguiflow_inspector.cli"]
    runs = {
        "pf inspect --json": [*pf, "inspect", TRACE[:8], "--store", url, "--json"],
        "pf inspect --plain": [*pf, "inspect", TRACE[:8], "--store", url, "--plain"],
        "pf export --json -": [*pf, "export", TRACE[:8], "--store", url, "--json", "-"],
    }
    print(f"{args.events} events, {url}")
    for name, command in runs.items():
        sink = os.path.join(tmp, "out")
        probe = subprocess.run([sys.executable, "-c", _PROBE, sink, *command],
                               capture_output=True, text=True, check=True)
        result = json.loads(probe.stdout)
        size = os.path.getsize(sink) / 1e6
        print(f"  {name:<20} {result['s']:6.2f} s  peak RSS {result['rss_mb']:7.1f} MB  "
              f"output {size:7.1f} MB  exit {result['rc']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
