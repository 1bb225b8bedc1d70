"""PenguiFlow benchmarks: one table of floor vs ours, medians over interleaved repetitions.

cd /work/main && uv run python benchmarks/run.py [--quick] [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from harness import render_table
from workloads import QUICK, Config, run_all


def _penguiflow_version() -> str:
    try:
        import penguiflow
    except ImportError:
        return "not importable"
    return str(getattr(penguiflow, "__version__", "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny M, 1 rep: smoke mode")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the results as JSON to FILE",
    )
    parser.add_argument(
        "--floor-only", action="store_true", help="run only the bare-asyncio floors"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else Config()
    if args.reps is not None:
        cfg = dataclasses.replace(cfg, reps=max(1, args.reps))
    if args.floor_only:
        cfg = dataclasses.replace(cfg, floor_only=True)

    def progress(msg: str) -> None:
        if args.verbose:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    rows = asyncio.run(run_all(cfg, progress))
    wall = time.perf_counter() - t0

    print(f"# PenguiFlow benchmarks — {started:%Y-%m-%d %H:%M} UTC")
    print(
        f"# python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"penguiflow {_penguiflow_version()}"
    )
    print(
        f"# reps={cfg.reps} (median, floor/ours interleaved); chain M={cfg.chain_m} "
        f"(+{cfg.chain_warmup} warm-up); fan-out M={cfg.fan_m}; latency "
        f"{cfg.latency_m} measured (+{cfg.latency_warmup} warm-up); stores: ingest "
        f"{cfg.store_events} events, load a {cfg.store_load_events}-event trace, "
        f"{cfg.store_reps} reps; wall {wall:.1f}s"
        + ("; QUICK MODE (numbers meaningless)" if args.quick else "")
    )
    print()
    print(render_table(rows))

    if args.json is not None:
        doc = {
            "date": started.isoformat(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "penguiflow": _penguiflow_version(),
            "config": dataclasses.asdict(cfg),
            "wall_s": wall,
            "rows": [r.as_json() for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
