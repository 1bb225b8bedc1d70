"""The OTel rows: one bare SDK span's cost, and what tracing adds per hop against it.

Issue 5's target: the µs PenguiFlow adds per hop with the SDK configured (chain
N=5 with a BatchSpanProcessor over a discarding exporter, minus the same chain
without observers) is at most 1.5x one bare SDK span (start + end, 3 attributes,
same processor), both measured in this run. The same figure for a provider the
SDK writer declines (every span through ``start_span`` + ``end``) is printed
next to it, for comparison.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Sequence

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
