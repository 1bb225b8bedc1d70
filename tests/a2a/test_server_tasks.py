"""The task registry's bounds: max_tasks (oldest ended task evicted, refusal when all run),
TTL of ended tasks, ListTasks cursors, a full subscriber cut off with its memory freed,
and tasks seen only by the principal that owns them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from penguiflow_a2a import _tasks
from penguiflow_a2a._tasks import Subscriber, TaskRecord, TaskRegistry
from penguiflow_a2a.protocol import WORKING


def record(task_id: str, owner: Any = None) -> TaskRecord:
    return TaskRecord(task_id=task_id, context_id="c", trace_id="t-" + task_id, history=[],
                      owner=owner)


def test_max_tasks_evicts_the_oldest_ended_and_refuses_when_all_run() -> None:
    tasks = TaskRegistry(max_tasks=2, ttl_s=3600)
    a, b = record("a"), record("b")
    for r in (a, b):
        assert tasks.room()
        tasks.add(r)
    assert not tasks.room()  # both running: refuse rather than forget a live task
    tasks.publish(b, b.canceled())
    tasks.publish(a, a.canceled())
    assert tasks.room() and tasks.get("b") is None and tasks.get("a") is a
    assert not tasks.trace_active("t-a")


def test_ended_tasks_expire_after_the_ttl() -> None:
    tasks = TaskRegistry(max_tasks=10, ttl_s=0.0)
    r = record("x")
    tasks.add(r)
    tasks.publish(r, r.failed("gone"))
    assert tasks.get("x") is None


def test_pages_are_newest_first_with_stable_cursors() -> None:
    tasks = TaskRegistry(max_tasks=10, ttl_s=3600)
    for i in range(5):
        tasks.add(record(str(i)))
    page, total, cursor = tasks.page(context_id=None, state=None, page_size=2, after_seq=None)
    assert [t.task_id for t in page] == ["4", "3"] and total == 5
    tasks.add(record("new"))  # arrives between pages: does not shift the next page
    page, _, cursor = tasks.page(context_id=None, state=None, page_size=2, after_seq=cursor)
    assert [t.task_id for t in page] == ["2", "1"] and cursor is not None


def test_a_full_subscriber_is_cut_off_and_its_queue_freed() -> None:
    tasks = TaskRegistry(max_tasks=10, ttl_s=3600)
    r = record("s")
    tasks.add(r)
    slow, fast = Subscriber(2), Subscriber(2)
    r.subscribers |= {slow, fast}
    for _ in range(2):
        tasks.publish(r, r.working())
        fast.queue.get_nowait()
    tasks.publish(r, r.working())
    assert slow.cut.is_set() and slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    assert r.subscribers == {fast} and tasks.dropped_subscribers == 1


class _Touchy:
    """A principal whose ``==`` raises."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __hash__ = object.__hash__


def test_lookups_on_a_callers_behalf_see_only_its_own_tasks() -> None:
    tasks = TaskRegistry(max_tasks=10, ttl_s=3600)
    mine, theirs, anonymous = record("a", "alice"), record("b", "bob"), record("n")
    for r in (mine, theirs, anonymous):
        tasks.add(r)
    assert tasks.find("a", "alice") is mine and tasks.find("b", "alice") is None
    assert tasks.find("n", None) is anonymous and tasks.find("n", "alice") is None
    assert tasks.get("b") is theirs  # server-side lookups are not filtered
    page, total, _ = tasks.page(context_id=None, state=None, page_size=10, after_seq=None,
                                principal="alice")
    assert page == [mine] and total == 1
    # Without auth every caller is None and sees the None-owned tasks, as before.
    page, total, _ = tasks.page(context_id=None, state=None, page_size=10, after_seq=None)
    assert page == [anonymous] and total == 1
    assert tasks.find("a", _Touchy()) is None  # a bad principal sees nothing, never raises


def test_a_status_change_after_t_in_the_same_millisecond_is_listed_as_changed_since_t(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: status timestamps were kept to the millisecond, so a change at
    # 12:00:00.000700 was stored as 12:00:00.000 and a poller asking for what changed
    # since 12:00:00.000500 (ListTasks statusTimestampAfter) never saw it.
    since = datetime(2026, 1, 31, 12, 0, 0, 500, tzinfo=UTC)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:  # type: ignore[override]
            return cls(2026, 1, 31, 12, 0, 0, 700, tzinfo=tz)

    monkeypatch.setattr(_tasks, "datetime", Clock)
    tasks = TaskRegistry(max_tasks=10, ttl_s=3600)
    r = record("x")
    tasks.add(r)
    tasks.publish(r, r.status_event(WORKING))
    page, total, _ = tasks.page(context_id=None, state=None, page_size=10, after_seq=None,
                                status_since=since)
    assert page == [r] and total == 1
    assert r.status["timestamp"] == "2026-01-31T12:00:00.000700Z"
