"""The OTel rows: one bare SDK span's cost, and what tracing adds per hop against it.

Issue 5's target: the µs PenguiFlow adds per hop with the SDK configured (chain
N=5 with a BatchSpanProcessor over a discarding exporter, minus the same chain
without observers) is at most 1.5x one bare SDK span (start + end, 3 attributes,
same processor), both measured in this run. The same figure for a provider the
SDK writer declines (every span through ``start_span`` + ``end``) is printed
next to it, for comparison.

The stock-provider rows are what an application that configures OTel itself gets:
chain N=5 with a plain ``TracerProvider()`` (random id generator, batch processor),
once in a process that never imports ``penguiflow_exporters.otel`` and once in one
that does, each as a ratio to the chain without observers in that same process.
Run them alone with ``python benchmarks/otel.py stock [--reps N]``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

from harness import Row

SPANS = 20_000


def sdk_span_us(reps: int, count: int = SPANS) -> list[float]:
    """µs per bare SDK span (start_span + 3 attributes + end), one sample per rep."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class _Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=65536))
    tracer = provider.get_tracer("bench")
    samples: list[float] = []
    try:
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            for i in range(count):
                span = tracer.start_span("invoke_agent n", attributes={
                    "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "n",
                    "pf.attempt": i})
                span.end()
            samples.append((time.perf_counter() - t0) / count * 1e6)
            provider.force_flush()
    finally:
        provider.shutdown()
    return samples


def otel_rows(observer_rows: Sequence[Row], reps: int, count: int = SPANS) -> list[Row]:
    """The SDK span row and the added-cost row (from the chain + OTel SDK row)."""
    samples = sdk_span_us(reps, count)
    span = statistics.median(samples)
    hop = next((row.floor for row in observer_rows
                if row.workload.endswith("+ OTel SDK + BatchSpanProcessor")), None)
    rows = [Row("OTel SDK span start+end (3 attrs, batch processor)", "µs", hop, span,
                ours_samples=samples, baseline="runtime hop",
                note="floor = chain N=5 hop without observers")]
    for suffix, label in (("+ OTel SDK + BatchSpanProcessor", ""),
                          ("+ OTel SDK via start_span (writer declined)",
                           ", writer declined")):
        for row in observer_rows:
            if row.workload.endswith(suffix) and row.ours is not None \
                    and row.floor is not None:
                added = row.ours - row.floor
                rows.append(Row(f"chain N=5: added per hop by tracing{label} vs 1.5x one "
                                "SDK span (target <= 1x)", "µs", 1.5 * span, added,
                                note="floor = 1.5 x SDK span, ours = with SDK - without"))
    return rows


# ---------------------------------------------------------------- stock TracerProvider()

#: The rows for an application's own plain SDK set-up: ``TracerProvider()`` (random
#: ids, no PenguiFlow id generator) with a BatchSpanProcessor, passed to the flow.
STOCK = "chain N=5 + stock TracerProvider()"
_VARIANTS = (("penguiflow_exporters.otel not imported", False),
             ("penguiflow_exporters.otel imported", True))


def _stock_child(argv: Sequence[str]) -> None:
    """In a fresh process: chain N=5 without observers and with a stock
    ``TracerProvider()``, interleaved; prints one JSON line with the samples.

    A process of its own because what is imported is the point: the parent
    benchmark has imported ``penguiflow_exporters.otel`` long before.
    """
    import argparse
    import asyncio
    import json
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--import-exporters", action="store_true")
    args = parser.parse_args(argv)
    if args.import_exporters:
        import penguiflow_exporters.otel  # noqa: F401  # the import under test

    import flows
    from harness import interleave, pump
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class _Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class _Stock:
        def __init__(self) -> None:
            self.provider = TracerProvider()
            self.provider.add_span_processor(BatchSpanProcessor(_Discard(),
                                                                max_queue_size=65536))

        def flow_kwargs(self) -> dict[str, object]:
            return {"tracer_provider": self.provider}

        def install(self, flow: object) -> None:
            return None

    stock = _Stock()
    n, m = 5, args.m

    def side(setup: _Stock | None) -> Callable[[], Awaitable[dict[str, float]]]:
        async def measure() -> dict[str, float]:
            flow = flows.build_chain(n, setup)  # type: ignore[arg-type]
            flow.run()
            try:
                await pump(flow.emit, flow.fetch, flows.make_messages(args.warmup),
                           args.warmup)
                elapsed, out = await pump(flow.emit, flow.fetch, flows.make_messages(m), m)
            finally:
                await flow.stop()
            if [x.payload for x in out] != list(range(m)):
                raise AssertionError("chain delivered wrong or reordered payloads")
            return {"us": elapsed / (m * n) * 1e6}

        return measure

    base, traced = asyncio.run(interleave([side(None), side(stock)], args.reps))
    stock.provider.shutdown()
    from penguiflow._tracer import tracer_for

    writer = getattr(tracer_for(stock.provider), "_writer", None)
    print(json.dumps({
        "base": [r["us"] for r in base], "traced": [r["us"] for r in traced],
        "writer": writer is not None and getattr(writer, "written", 0) > 0,
        "otel_imported": "penguiflow_exporters.otel" in sys.modules,
    }))


def stock_provider_rows(reps: int, quick: bool) -> list[Row]:
    """Chain N=5 with a stock ``TracerProvider()``, with and without
    ``penguiflow_exporters.otel`` imported, each as a ratio to the same chain without
    observers in the same (fresh) process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    m, warmup = (300, 20) if quick else (20_000, 500)
    rows: list[Row] = []
    for label, imported in _VARIANTS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "stock-chain", "--m", str(m),
               "--warmup", str(warmup), "--reps", str(reps)]
        if imported:
            cmd.append("--import-exporters")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            rows.append(Row(f"{STOCK} ({label})", "µs/hop", None, None,
                            note=f"failed: {proc.stderr.strip().splitlines()[-1:]}"))
            continue
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        path = "SDK writer" if data["writer"] else "start_span + end"
        rows.append(Row(f"{STOCK} ({label})", "µs/hop", statistics.median(data["base"]),
                        statistics.median(data["traced"]), floor_samples=data["base"],
                        ours_samples=data["traced"], baseline="no observers",
                        note=f"floor = no observers, same process; spans via {path}"))
    return rows


if __name__ == "__main__":
    # `python benchmarks/otel.py stock [--reps N] [--quick]` prints these rows alone;
    # `stock-chain ...` is the child process stock_provider_rows starts.
    import argparse
    import sys

    if sys.argv[1:2] == ["stock-chain"]:
        _stock_child(sys.argv[2:])
    else:
        from harness import render_table

        cli = argparse.ArgumentParser(description="the stock TracerProvider() rows alone")
        cli.add_argument("what", choices=["stock"])
        cli.add_argument("--reps", type=int, default=5)
        cli.add_argument("--quick", action="store_true")
        opts = cli.parse_args()
        print(render_table(stock_provider_rows(opts.reps, opts.quick)))
