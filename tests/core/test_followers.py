"""Followers: a subscriber that falls behind is bounded and told, not fed for ever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pfcore_support import within

from penguiflow.followers import DEFAULT_MAX_PENDING, Followers
from penguiflow.state import FollowerLagged, InMemoryStateStore, StateStoreError, StoredEvent


def event(i: int, trace_id: str = "t1") -> StoredEvent:
    return StoredEvent(trace_id, float(i), "node_start", "n", "n1", {"i": i})


async def subscribed(iterator: AsyncIterator[StoredEvent]) -> asyncio.Future[StoredEvent]:
    """Step ``iterator`` (a generator subscribes on its first step) and return that
    step, pending until the first event arrives."""
    step = asyncio.ensure_future(anext(iterator))
    await asyncio.sleep(0)  # one turn: the task runs the generator to its first wait
    assert not step.done()
    return step


async def test_a_subscriber_that_falls_behind_gets_what_it_held_then_the_count_it_missed(
) -> None:
    followers = Followers(max_pending=3)
    slow = followers.iterate(None)
    slow_first = await subscribed(slow)
    fast = followers.iterate("t1")
    fast_first = await subscribed(fast)
    other_trace = followers.iterate("t2")
    other_first = await subscribed(other_trace)

    followers.publish([event(1)])
    seen_fast = [await within(fast_first)]
    for i in range(2, 21):  # the fast one reads each event as it comes: it keeps up
        followers.publish([event(i)])
        seen_fast.append(await within(anext(fast)))
    # Its pending step took event 1 when it came; the queue then held 2-4 and kept
    # nothing after.
    held = [await within(slow_first)] + [await within(anext(slow)) for _ in range(3)]
    with pytest.raises(FollowerLagged) as caught:
        await within(anext(slow))

    assert [e.payload["i"] for e in held] == [1, 2, 3, 4]
    assert caught.value.skipped == 16  # 20 published, 4 delivered: counted exactly
    assert isinstance(caught.value, StateStoreError)
    assert "3 events behind" in str(caught.value)
    assert "load_history_page" in str(caught.value)
    assert [e.payload["i"] for e in seen_fast] == list(range(1, 21))
    assert not other_first.done()  # another trace's follower saw none of it
    assert len(followers._subs) == 2  # the lagging subscription is gone
    await fast.aclose()
    other_first.cancel()  # ends that generator too (its finally unsubscribes it)
    with pytest.raises(asyncio.CancelledError):
        await other_first
    assert not followers


async def test_a_forgotten_subscription_holds_no_more_than_its_bound() -> None:
    followers = Followers(max_pending=5)
    forgotten = followers.iterate(None)
    step = await subscribed(forgotten)  # started, then never read again
    for i in range(2000):
        followers.publish([event(i)])
    (sub,) = followers._subs
    assert sub.queue.qsize() == 6  # the 5 events it held and the lag mark, not 2000
    assert sub.skipped == 1995
    assert (await within(step)).payload == {"i": 0}
    await forgotten.aclose()
    assert not followers


async def test_a_store_follower_holds_ten_thousand_events_by_default() -> None:
    async with InMemoryStateStore() as store:
        follow = store.follow("t1")
        step = await subscribed(follow)
        await store.save_events([event(i) for i in range(DEFAULT_MAX_PENDING + 8)])
        got = [await within(step)]
        got += [await within(anext(follow)) for _ in range(DEFAULT_MAX_PENDING - 1)]
        with pytest.raises(FollowerLagged) as caught:
            await within(anext(follow))
        assert caught.value.skipped == 8
        assert [e.payload["i"] for e in got] == list(range(DEFAULT_MAX_PENDING))
        # The store is unharmed: a new follower sees what comes next.
        again = store.follow("t1")
        step = await subscribed(again)
        await store.save_event(event(-1))
        assert (await within(step)).payload == {"i": -1}
        await again.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_a_bound_below_one_or_not_an_int_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
        Followers(max_pending=bad)  # type: ignore[arg-type]
