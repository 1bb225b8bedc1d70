"""PenguiFlow exporters: tracing setup, log correlation and durable StateStores.

Dependency direction: this package depends on ``penguiflow``; the core never
imports it. The SQLite/Postgres stores and the OpenTelemetry SDK helpers arrive
with their issues.
"""

__all__: list[str] = []
