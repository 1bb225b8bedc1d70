"""The live tracer's fast path into the OTel SDK: finished spans straight to the processors.

The runtime records a span only once it is finished (see
:mod:`penguiflow._tracer`). Through the API that is ``start_span`` + ``end``:
the SDK then asks the sampler, builds a mutable ``Span`` under a lock, copies
the attributes into a bounded mapping, calls every processor's ``on_start``,
and on ``end`` copies it all again into the ``ReadableSpan`` the processors'
``on_end`` receive. For a span whose every field is already known, all but
the last step is overhead: measured here, ``start_span`` + ``end`` costs 6-10x
building that ``ReadableSpan`` and calling ``on_end``.

:class:`SdkSpanWriter` does the last step only, and only when the result is
exactly what the API path would hand the processors:

* the provider is the SDK's own ``TracerProvider`` and the penguiflow tracer
  is enabled, with no SDK self-metrics to record;
* the sampler would record and sample every penguiflow span: ``ALWAYS_ON``, or
  ``ParentBased`` whose root and sampled-local-parent delegates are ``ALWAYS_ON``
  (the runtime's parents are always local and sampled) -- the SDK default;
* every processor leaves ``on_start`` and ``_on_ending`` as the SDK's no-ops
  (batch, simple, or a subclass that overrides ``on_end`` only), since a
  finished span cannot be handed to ``on_start``;
* no span limit would drop or truncate anything in the span.

Otherwise it returns False and the runtime takes the API path for that span.
The processors are re-checked whenever ``add_span_processor`` changed them.
Ids come from the span record, so through the writer the spans carry the
stored ids whatever the provider's id generator (as they do through the API,
where the live tracer's own id generator takes them); the trace flags are
SAMPLED, as through the API.

The core finds :func:`sdk_span_writer` through this package's
``penguiflow.span_writers`` entry point (``pyproject.toml``), so an application
that configures the SDK itself gets the writer without importing
:mod:`penguiflow_exporters.otel`.
"""

from __future__ import annotations

from typing import Any, Final

from opentelemetry.sdk.trace import (
    ConcurrentMultiSpanProcessor,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from penguiflow.spandata import SpanData, SpanEventData, SpanLinkData

from ._spanexport import readable_span

__all__ = ["SdkSpanWriter", "sdk_span_writer"]

_NOOP_ON_START: Final = frozenset(
    cls.on_start for cls in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor))
_NOOP_ON_ENDING: Final = frozenset(
    getattr(cls, "_on_ending", None)
    for cls in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)) - {None}
_MULTI: Final = (SynchronousMultiSpanProcessor, ConcurrentMultiSpanProcessor)


def _always_samples(sampler: Sampler | None) -> bool:
    if sampler is ALWAYS_ON:
        return True
    return isinstance(sampler, StaticSampler) and \
        getattr(sampler, "_decision", None) is Decision.RECORD_AND_SAMPLE


def _samples_every_span(sampler: Sampler) -> bool:
    if _always_samples(sampler):
        return True
    if type(sampler) is ParentBased:
        return (_always_samples(getattr(sampler, "_root", None))
                and _always_samples(getattr(sampler, "_local_parent_sampled", None)))
    return False


def _noop_start_and_ending(processor: SpanProcessor) -> bool:
    cls = type(processor)
    ending = getattr(cls, "_on_ending", None)
    return cls.on_start in _NOOP_ON_START and (ending is None or ending in _NOOP_ON_ENDING)


def _within(items: list[SpanEventData] | list[SpanLinkData], count: int, attrs: int) -> bool:
    return len(items) <= count and all(len(item.attributes) <= attrs for item in items)


class SdkSpanWriter:
    """Records finished penguiflow spans on one SDK ``TracerProvider`` (see module doc).

    Call it with a :class:`~penguiflow.spandata.SpanData`: True when the span
    was handed to the processors, False when the caller must use the API.
    """

    def __init__(self, provider: TracerProvider, version: str) -> None:
        tracer = provider.get_tracer("penguiflow", version)
        # A tracer configurator can disable the tracer at any time: asked per span.
        self._is_enabled: Any = getattr(tracer, "_is_enabled", None)
        scope = getattr(tracer, "_instrumentation_scope", None)
        self._scope = scope if isinstance(scope, InstrumentationScope) \
            else InstrumentationScope("penguiflow", version)
        self._resource = provider.resource
        self._multi: Any = getattr(provider, "_active_span_processor", None)
        limits = getattr(tracer, "_span_limits", None)
        # (spans, attributes per span, events, attributes per event, links,
        # attributes per link): beyond any of these the SDK would drop something.
        caps = tuple(getattr(limits, name, None) for name in (
            "max_span_attributes", "max_events", "max_event_attributes", "max_links",
            "max_link_attributes"))
        self._caps: tuple[int, ...] = tuple(c if isinstance(c, int) else 0 for c in caps)
        self._static_ok = (
            isinstance(self._multi, _MULTI)
            and callable(self._is_enabled)
            and _samples_every_span(provider.sampler)
            and type(getattr(tracer, "_tracer_metrics", None)).__name__ == "NoOpTracerMetrics"
            and getattr(limits, "max_span_attribute_length", None) is None
            and getattr(limits, "max_attribute_length", None) is None
            and all(isinstance(c, int) for c in caps))
        self._checked: object = None
        self._ok = False
        #: Spans this writer handed to the processors (the rest took the API path).
        self.written = 0

    def _check(self, processors: object) -> None:
        self._checked = processors
        self._ok = self._static_ok and isinstance(processors, tuple) and all(
            _noop_start_and_ending(p) for p in processors)

    def _fits(self, span: SpanData) -> bool:
        # The span limits would drop something: let the SDK apply them exactly.
        max_attrs, max_events, max_event_attrs, max_links, max_link_attrs = self._caps
        # Most spans have no events and no links: skip the generic checks then
        # (~5% of the writer path, measured).
        events, links = span.events, span.links
        return (len(span.attributes) <= max_attrs
                and (not events or _within(events, max_events, max_event_attrs))
                and (not links or _within(links, max_links, max_link_attrs)))

    def __call__(self, span: SpanData) -> bool:
        multi = self._multi
        processors = getattr(multi, "_span_processors", None)
        if processors is not self._checked:
            self._check(processors)
        if not self._ok or not self._is_enabled() or not self._fits(span):
            return False
        readable = readable_span(span, self._resource, self._scope, copy=False)
        self.written += 1
        if type(multi) is not SynchronousMultiSpanProcessor:
            multi.on_end(readable)
            return True
        # The SDK's own loop stops at the first processor that raises, and the ones
        # after it never see the span: each gets it here; the first error is raised
        # afterwards, for the tracer to log and count (once per span).
        failed: Exception | None = None
        for processor in self._checked:  # type: ignore[attr-defined]  # a tuple when _ok
            try:
                processor.on_end(readable)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        return True


def sdk_span_writer(provider: Any, version: str) -> SdkSpanWriter | None:
    """The factory :func:`penguiflow.tracing.register_span_writer` takes: SDK providers only."""
    if type(provider) is not TracerProvider:
        return None
    writer = SdkSpanWriter(provider, version)
    return writer if writer._static_ok else None
