"""The PenguiFlow inspector: the ``pf`` command and its Textual app.

Dependency direction: inspector -> exporters -> core. Nothing in ``penguiflow``
imports this package.
"""

__all__: list[str] = []
