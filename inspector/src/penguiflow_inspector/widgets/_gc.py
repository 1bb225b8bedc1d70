"""Hold Python's cyclic garbage collector from a key press until its frame is painted.

With a 100k-event trace loaded the heap holds millions of objects, and a replay
step makes a few lists of 10k-100k references each (the view at t: its events,
invocations and critical path, the waterfall rows). Each young container is
traversed by the next generation-0 collection and again by a generation-1 one,
one cache miss per reference: 10-20 ms per step on the CI machine, landing
between the key and its frame (a quarter to a half of the step). Nothing the
frame shows depends on collecting cycles, so :func:`hold_gc_until_painted` turns
the collector off for that stretch and :func:`release_gc` turns it back on once
a frame has been written (``InspectorApp.post_display_hook``; a one-second
backstop covers a key that changes nothing on screen, and an app that does not
call it). The collection then runs after the frame, at the next allocation: the
same work, off the path between the key and what the user waits to see.

(``call_after_refresh`` is too early: it can run at a screen update tick that
comes before the widgets' refreshes have reached the screen, so before the frame.)

Only a collector this module turned off is turned back on (``build_trace`` also
pauses it, in a worker thread, with ``penguiflow_exporters._gc.gc_paused``), and
unmounting the trace screen releases a hold.
"""

from __future__ import annotations

import gc
from functools import partial

from textual.dom import DOMNode

__all__ = ["hold_gc_until_painted", "release_gc"]

#: The current hold (0: none), and the last one given out.
_held = 0
_last = 0
#: At the latest, the collector is back on this long after the key.
_BACKSTOP_S = 1.0


def hold_gc_until_painted(node: DOMNode) -> None:
    """Pause the cyclic GC until the next frame is written (or a second has passed)."""
    global _held, _last
    if _held or not gc.isenabled():
        return
    gc.disable()
    _last += 1
    _held = _last
    node.app.set_timer(_BACKSTOP_S, partial(_release, _held))


def _release(hold: int) -> None:
    if _held == hold:
        release_gc()


def release_gc() -> None:
    """Turn the collector back on, if :func:`hold_gc_until_painted` turned it off."""
    global _held
    if _held:
        _held = 0
        gc.enable()
