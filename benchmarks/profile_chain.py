"""cProfile the penguiflow chain throughput workload (not part of the table).

uv run python benchmarks/profile_chain.py --n 20 --m 20000 --top 30
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats

import flows
from harness import pump


async def _run(n: int, m: int, warmup: int, prof: cProfile.Profile) -> float:
    warm = flows.make_messages(warmup)
    msgs = flows.make_messages(m)
    async with flows.chain(n) as flow:
        await pump(flow.emit, flow.fetch, warm, warmup)
        prof.enable()
        elapsed, _ = await pump(flow.emit, flow.fetch, msgs, m)
        prof.disable()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--m", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime")
    args = parser.parse_args()
    prof = cProfile.Profile()
    elapsed = asyncio.run(_run(args.n, args.m, args.warmup, prof))
    print(f"chain N={args.n} M={args.m}: {elapsed / (args.m * args.n) * 1e6:.2f} µs/hop (profiled)")
    pstats.Stats(prof).strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
