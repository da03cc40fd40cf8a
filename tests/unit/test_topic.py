"""Topic: the per-generation window of encoded frames, and its single-flight log reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from broker.core import protocol, sse
from broker.core.metrics import Metrics
from broker.core.protocol import Event
from broker.edge.topic import KEPT_CHUNKS, LOG_READ_CHUNK, MAX_WRITE_BYTES, Frame, Topic, to_frame


def frame(seq: int, terminal: bool = False) -> Frame:
    return Frame(seq, f"frame {seq}".encode(), terminal, 0)


def frames(first: int, last: int, terminal_last: bool = False) -> list[Frame]:
    return [frame(s, terminal_last and s == last) for s in range(first, last + 1)]


def seqs(window: Iterable[Frame] | None) -> list[int]:
    assert window is not None
    return [f.seq for f in window]


def topic_with(first: int, last: int, capacity: int = 16) -> Topic:
    topic = Topic("gen", capacity)
    for f in frames(first, last):
        topic.offer(f)
    return topic


# -- offer -----------------------------------------------------------------------------------


async def test_offer_appends_contiguous_frames() -> None:
    topic = Topic("gen", 8)
    assert topic.head == 0
    assert [topic.offer(f) for f in frames(1, 3)] == [True, True, True]
    assert seqs(topic.window) == [1, 2, 3]
    assert topic.head == 3


async def test_first_offer_may_start_anywhere() -> None:
    topic = Topic("gen", 8)
    assert topic.offer(frame(40)) is True  # a viewer joined late: no gap yet, nothing to heal
    assert seqs(topic.window) == [40]


@pytest.mark.parametrize("duplicate", [1, 2, 3])
async def test_duplicate_offer_is_ignored(duplicate: int) -> None:
    topic = topic_with(1, 3)
    original = list(topic.window)
    changed = topic.next_change()
    assert topic.offer(frame(duplicate)) is True
    assert list(topic.window) == original
    assert all(a is b for a, b in zip(topic.window, original, strict=True))
    assert not changed.is_set()
    assert not topic.lost


async def test_same_seq_with_other_content_is_a_diverged_history() -> None:
    # Redis now holds another event under a seq this edge already delivered (a failover lost
    # acknowledged writes): the viewers cannot be continued and must be told.
    topic = topic_with(1, 3)
    changed = topic.next_change()
    assert topic.offer(Frame(2, b"other bytes", False, 0)) is True
    assert topic.lost
    assert changed.is_set()


def test_log_and_live_copies_of_an_event_encode_to_the_same_bytes() -> None:
    # Divergence is detected by comparing bytes, so both paths must encode identically.
    event = Event(7, "message", protocol.message_data("Hi.\nThere"), 1234)
    live = protocol.decode_payload(f"7 message 1234 {event.data}")  # as PUBLISH_SCRIPT sends it
    entry_id = protocol.stream_id(7)
    logged = protocol.decode_log_entry(
        entry_id, {b"k": b"message", b"d": event.data.encode(), b"t": b"1234"}
    )
    assert to_frame(live) == to_frame(logged) == to_frame(event)


async def test_gap_returns_false_and_restarts_the_window() -> None:
    topic = topic_with(1, 3)
    changed = topic.next_change()
    assert topic.offer(frame(6)) is False
    assert seqs(topic.window) == [6]
    assert changed.is_set()
    # ...and later frames are contiguous with the new start.
    assert topic.offer(frame(7)) is True
    assert seqs(topic.window) == [6, 7]


async def test_window_is_capped_at_capacity() -> None:
    topic = topic_with(1, 10, capacity=4)
    assert seqs(topic.window) == [7, 8, 9, 10]
    topic.offer(frame(11))
    assert seqs(topic.window) == [8, 9, 10, 11]


async def test_terminal_offer_sets_terminal_seq() -> None:
    topic = topic_with(1, 2)
    assert topic.terminal_seq is None
    topic.offer(frame(3, terminal=True))
    assert topic.terminal_seq == 3


# -- frames_after ----------------------------------------------------------------------------


async def test_frames_after_serves_the_window_slice() -> None:
    topic = topic_with(1, 10, capacity=4)  # window 7..10
    assert seqs(topic.frames_after(6)) == [7, 8, 9, 10]
    assert seqs(topic.frames_after(8)) == [9, 10]
    assert seqs(topic.frames_after(9)) == [10]
    got = topic.frames_after(7)
    assert got is not None and all(a is b for a, b in zip(got, list(topic.window)[1:], strict=True))


@pytest.mark.parametrize("cursor", [10, 11, 1000])
async def test_frames_after_head_is_empty(cursor: int) -> None:
    topic = topic_with(1, 10, capacity=4)
    assert topic.frames_after(cursor) == []


@pytest.mark.parametrize("cursor", [0, 1, 5])
async def test_frames_after_is_none_when_the_window_does_not_reach_back(cursor: int) -> None:
    topic = topic_with(1, 10, capacity=4)  # window 7..10: cursor 6 is the earliest it serves
    assert topic.frames_after(cursor) is None


@pytest.mark.parametrize("cursor", [0, 5])
async def test_frames_after_is_none_for_an_empty_window(cursor: int) -> None:
    assert Topic("gen", 4).frames_after(cursor) is None


# -- absorb ----------------------------------------------------------------------------------


async def test_absorb_fills_an_empty_window() -> None:
    topic = Topic("gen", 8)
    topic.absorb(frames(1, 5))
    assert seqs(topic.window) == [1, 2, 3, 4, 5]
    assert topic.frames_after(0) is not None


async def test_absorb_into_an_empty_window_keeps_the_newest_capacity_frames() -> None:
    topic = Topic("gen", 3)
    topic.absorb(frames(1, 5))
    assert seqs(topic.window) == [3, 4, 5]


async def test_absorb_prepends_an_older_contiguous_range() -> None:
    topic = topic_with(5, 6)
    topic.absorb(frames(1, 4))
    assert seqs(topic.window) == [1, 2, 3, 4, 5, 6]
    assert seqs(topic.frames_after(0)) == [1, 2, 3, 4, 5, 6]


async def test_absorb_prepends_an_older_range_overlapping_the_window() -> None:
    topic = topic_with(5, 6)
    topic.absorb(frames(2, 6))
    assert seqs(topic.window) == [2, 3, 4, 5, 6]


async def test_absorb_prepend_keeps_live_frames_and_respects_capacity() -> None:
    topic = topic_with(5, 6, capacity=4)
    live = list(topic.window)
    topic.absorb(frames(1, 4))
    assert seqs(topic.window) == [3, 4, 5, 6]  # the newest older frames that fit
    assert list(topic.window)[2:] == live


async def test_absorb_prepend_into_a_full_window_changes_nothing() -> None:
    topic = topic_with(5, 8, capacity=4)
    topic.absorb(frames(1, 4))
    assert seqs(topic.window) == [5, 6, 7, 8]


async def test_absorb_appends_a_following_contiguous_range() -> None:
    topic = topic_with(1, 3)
    topic.absorb(frames(4, 6))
    assert seqs(topic.window) == [1, 2, 3, 4, 5, 6]


async def test_absorb_append_respects_capacity() -> None:
    topic = topic_with(1, 3, capacity=4)
    topic.absorb(frames(4, 6))
    assert seqs(topic.window) == [3, 4, 5, 6]


@pytest.mark.parametrize(
    "batch",
    [frames(1, 3), frames(8, 9, terminal_last=True), frames(20, 22, terminal_last=True)],
    ids=["before-with-gap", "after-with-gap", "far-after"],
)
async def test_absorb_ignores_a_non_contiguous_range(batch: list[Frame]) -> None:
    topic = topic_with(5, 6)
    changed = topic.next_change()
    topic.absorb(batch)
    assert seqs(topic.window) == [5, 6]
    assert topic.terminal_seq is None
    assert not changed.is_set()


async def test_absorb_of_nothing_changes_nothing() -> None:
    topic = topic_with(1, 2)
    changed = topic.next_change()
    topic.absorb([])
    assert seqs(topic.window) == [1, 2]
    assert not changed.is_set()


async def test_absorb_of_a_terminal_range_sets_terminal_seq() -> None:
    topic = Topic("gen", 8)
    topic.absorb(frames(1, 4, terminal_last=True))
    assert topic.terminal_seq == 4

    topic = topic_with(1, 2)
    topic.absorb(frames(3, 5, terminal_last=True))
    assert topic.terminal_seq == 5


@pytest.mark.parametrize("first", [1, 6], ids=["from-before-window", "from-inside-window"])
async def test_absorb_of_a_range_running_past_head_keeps_the_newer_frames(first: int) -> None:
    topic = topic_with(5, 7)
    topic.absorb(frames(first, 10, terminal_last=True))
    assert seqs(topic.window) == list(range(min(first, 5), 11))
    assert topic.terminal_seq == topic.head == 10


# -- change notification ---------------------------------------------------------------------


async def test_changed_is_set_by_offer_and_renewed() -> None:
    topic = Topic("gen", 8)
    first = topic.next_change()
    assert topic.next_change() is first  # stable until something changes
    assert not first.is_set()
    topic.offer(frame(1))
    assert first.is_set()
    second = topic.next_change()
    assert second is not first
    assert not second.is_set()


async def test_changed_is_set_by_absorb() -> None:
    topic = Topic("gen", 8)
    event = topic.next_change()
    topic.absorb(frames(1, 2))
    assert event.is_set()
    assert not topic.next_change().is_set()


async def test_changed_is_set_by_resync_which_bumps_resyncs() -> None:
    topic = topic_with(1, 2)
    event = topic.next_change()
    assert topic.resyncs == 0
    topic.resync()
    assert topic.resyncs == 1
    assert event.is_set()
    assert not topic.next_change().is_set()
    topic.resync()
    assert topic.resyncs == 2
    assert seqs(topic.window) == [1, 2]  # a resync does not touch the window


async def test_a_waiter_on_changed_wakes_on_offer() -> None:
    topic = Topic("gen", 8)
    waiter = asyncio.create_task(topic.next_change().wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    topic.offer(frame(1))
    await asyncio.wait_for(waiter, 1)


# -- live fan-out: parked viewers get frames written without being woken -----------------------


class Viewer:
    """A parked viewer: takes the next frames while ``accepting`` (its socket takes writes)."""

    def __init__(self, position: int, accepting: bool = True) -> None:
        self.position = position
        self.accepting = accepting
        self.chunks: list[bytes] = []
        self.end_observed = False

    def push(self, after: int, last: int, chunk: bytes, now: float) -> bool:
        if not self.accepting or after != self.position:
            return False
        self.chunks.append(chunk)
        self.position = last
        return True


async def parked(topic: Topic, viewer: Viewer) -> asyncio.Task[None]:
    task = asyncio.create_task(topic.park(viewer))
    await asyncio.sleep(0)  # it runs up to its wait
    assert viewer in topic.live
    return task


async def fanned_out() -> None:
    await asyncio.sleep(0)  # the fan-out runs in the loop's next round


async def test_a_parked_viewer_gets_each_frame_framed_once_and_stays_parked() -> None:
    metrics = Metrics()
    topic = Topic("gen", 8, metrics=metrics)
    for f in frames(1, 2):
        topic.offer(f)
    a, b = Viewer(2), Viewer(2)
    parks = [await parked(topic, a), await parked(topic, b)]
    changed = topic.next_change()
    topic.offer(frame(3))
    assert changed.is_set()  # viewers that are not parked hear of the change at once
    await fanned_out()
    topic.offer(frame(4))
    await fanned_out()
    assert a.chunks == b.chunks == [sse.http_chunk(b"frame 3"), sse.http_chunk(b"frame 4")]
    assert a.chunks[0] is b.chunks[0]  # the same bytes for every viewer
    assert not any(p.done() for p in parks)
    sample = metrics.registry.get_sample_value
    assert sample("broker_events_delivered_total") == 4  # 2 viewers x 2 frames
    assert sample("broker_delivery_latency_seconds_count") == 2  # one per fan-out
    # The end is not written: each viewer is woken to write it with its response's end (one
    # write, where a push and the end would be two).
    topic.offer(frame(5, terminal=True))
    await asyncio.wait_for(asyncio.gather(*parks), 1)
    assert a.chunks == b.chunks == [sse.http_chunk(b"frame 3"), sse.http_chunk(b"frame 4")]
    assert a.position == b.position == 4 and not topic.live
    assert sample("broker_events_delivered_total") == 4
    # The terminal event's latency: observed once by the fan-out that woke them, not by each.
    assert a.end_observed and b.end_observed
    assert sample("broker_delivery_latency_seconds_count") == 3


async def test_frames_offered_with_the_terminal_event_are_written_and_the_end_left() -> None:
    """Frames offered together with the terminal event: they are pushed, the terminal event
    is left to the viewer's own task (it writes it with the end of its response)."""
    metrics = Metrics()
    topic = Topic("gen", 8, metrics=metrics)
    topic.offer(frame(1))
    viewer = Viewer(1)
    park = await parked(topic, viewer)
    for f in frames(2, 4, terminal_last=True):
        topic.offer(f)
    await asyncio.wait_for(park, 1)
    assert viewer.chunks == [sse.http_chunk(b"frame 2frame 3")]
    assert viewer.position == 3 and not topic.live
    assert [f.seq for f in topic.frames_after(3) or []] == [4]
    assert metrics.registry.get_sample_value("broker_direct_writes_total") == 2


async def test_frames_offered_together_go_out_in_one_write() -> None:
    metrics = Metrics()
    topic = Topic("gen", 8, metrics=metrics)
    topic.offer(frame(1))
    viewer = Viewer(1)
    park = await parked(topic, viewer)
    for f in frames(2, 4):  # the reader was behind: three in one round of the loop
        topic.offer(f)
    await fanned_out()
    assert viewer.chunks == [sse.http_chunk(b"frame 2frame 3frame 4")]
    assert viewer.position == 4 and not park.done()
    assert metrics.registry.get_sample_value("broker_events_delivered_total") == 3
    park.cancel()


async def test_a_viewer_that_parked_after_the_offer_gets_nothing_twice() -> None:
    topic = topic_with(1, 2)
    behind = Viewer(2)
    behind_park = await parked(topic, behind)
    topic.offer(frame(3))
    at_head = Viewer(3)  # it took frame 3 the slow way, then parked before the fan-out ran
    head_park = await parked(topic, at_head)
    await fanned_out()
    assert behind.position == 3 and at_head.chunks == []
    assert not behind_park.done() and not head_park.done()
    behind_park.cancel()
    head_park.cancel()


async def test_a_viewer_that_cannot_take_a_frame_is_woken_and_the_others_go_on() -> None:
    topic = topic_with(1, 2)
    slow, fast = Viewer(2, accepting=False), Viewer(2)
    slow_park, fast_park = await parked(topic, slow), await parked(topic, fast)
    topic.offer(frame(3))
    await asyncio.wait_for(slow_park, 1)  # it takes frame 3 the slow way (from the window)
    assert slow.chunks == [] and slow.position == 2
    assert fast.position == 3 and not fast_park.done()
    assert list(topic.live) == [fast]
    fast_park.cancel()


async def test_a_viewer_whose_push_fails_is_woken_and_the_fan_out_goes_on() -> None:
    class Broken(Viewer):
        def push(self, after: int, last: int, chunk: bytes, now: float) -> bool:
            raise ValueError("a bug in one viewer")

    topic = topic_with(1, 2)
    broken, fine = Broken(2), Viewer(2)
    broken_park, fine_park = await parked(topic, broken), await parked(topic, fine)
    topic.offer(frame(3))
    await asyncio.wait_for(broken_park, 1)
    assert fine.position == 3 and not fine_park.done()
    fine_park.cancel()


async def test_more_than_one_write_goes_the_slow_way() -> None:
    topic = Topic("gen", 64)
    topic.offer(frame(1))
    viewer = Viewer(1)
    park = await parked(topic, viewer)
    big = b"x" * (MAX_WRITE_BYTES // 2)
    for seq in range(2, 5):
        topic.offer(Frame(seq, big, False, 0))
    await asyncio.wait_for(park, 1)  # its task sends them in batches
    assert viewer.chunks == [] and viewer.position == 1


async def test_a_gap_wakes_parked_viewers_without_writing() -> None:
    topic = topic_with(1, 2)
    viewer = Viewer(2)
    park = await parked(topic, viewer)
    assert topic.offer(frame(5)) is False
    await asyncio.wait_for(park, 1)
    assert viewer.chunks == []  # 3 and 4 come from the log first


@pytest.mark.parametrize("change", ["wake", "resync", "diverged", "absorb"])
async def test_other_changes_wake_parked_viewers(change: str) -> None:
    topic = topic_with(1, 2)
    viewer = Viewer(2)
    park = await parked(topic, viewer)
    if change == "absorb":
        topic.absorb(frames(3, 4))
    else:
        getattr(topic, change)()
    await asyncio.wait_for(park, 1)
    assert not topic.live


async def test_merging_older_frames_wakes_nobody() -> None:
    topic = topic_with(3, 4)
    viewer = Viewer(4)
    park = await parked(topic, viewer)
    changed = topic.next_change()
    topic.absorb(frames(1, 2))
    await asyncio.sleep(0)
    assert seqs(topic.window) == [1, 2, 3, 4]
    assert not park.done() and not changed.is_set()
    park.cancel()


async def test_a_cancelled_parked_viewer_leaves_the_topic() -> None:
    topic = topic_with(1, 2)
    viewer = Viewer(2)
    park = await parked(topic, viewer)
    park.cancel()
    topic.offer(frame(3))
    with pytest.raises(asyncio.CancelledError):
        await park
    await fanned_out()
    assert viewer.chunks == [] and not topic.live


# -- read_log: one store call per range, shared by every concurrent reader ---------------------


class FakeStore:
    """``Store.read_log`` stand-in: counts calls; each call blocks until ``gate`` is set."""

    def __init__(self, events: list[Event], fail_times: int = 0) -> None:
        self.events = events
        self.fail_times = fail_times
        self.calls: list[tuple[str, int, int]] = []
        self.gate = asyncio.Event()

    async def read_log(
        self, gen_id: str, after_seq: int, count: int, via: Any = None
    ) -> list[Event]:
        self.calls.append((gen_id, after_seq, count))
        await self.gate.wait()
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("redis fell over")
        return [e for e in self.events if e.seq > after_seq][:count]


def log_events(n: int) -> list[Event]:
    events = [Event(i, "message", protocol.message_data(f"part {i}. "), i) for i in range(1, n)]
    return [*events, Event(n, "end", protocol.end_data("stop", None), n)]


def log_reads(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("broker_log_reads_total")


async def test_concurrent_reads_of_one_range_share_one_store_call() -> None:
    store = FakeStore(log_events(5))
    metrics = Metrics()
    topic = Topic("gen", 16)
    readers = [asyncio.create_task(topic.read_log(store, 0, metrics)) for _ in range(50)]
    for _ in range(10):  # let every reader and the shared read task reach their waits
        await asyncio.sleep(0)
    assert len(store.calls) == 1
    store.gate.set()
    results = await asyncio.gather(*readers)

    assert len(store.calls) == 1
    assert store.calls[0][:2] == ("gen", 0)
    assert log_reads(metrics) == 1
    expected = [sse.encode_event(e) for e in store.events]
    for result, more in results:
        assert not more  # a short chunk: the log's end
        assert [f.data for f in result] == expected
        assert [f.terminal for f in result] == [False] * 4 + [True]
    # The read also fills the window, so the next viewer is served from memory.
    assert seqs(topic.frames_after(0)) == [1, 2, 3, 4, 5]
    assert topic.terminal_seq == 5


async def test_cursors_in_one_chunk_share_a_read_and_other_chunks_are_separate() -> None:
    store = FakeStore(log_events(LOG_READ_CHUNK + 5))
    topic = Topic("gen", 16)
    metrics = Metrics()
    a = asyncio.create_task(topic.read_log(store, 0, metrics))
    b = asyncio.create_task(topic.read_log(store, 3, metrics))
    c = asyncio.create_task(topic.read_log(store, LOG_READ_CHUNK + 1, metrics))
    await asyncio.sleep(0)
    store.gate.set()
    (got_a, more_a), (got_b, more_b), (got_c, more_c) = await asyncio.gather(a, b, c)
    assert sorted(call[1] for call in store.calls) == [0, LOG_READ_CHUNK]
    assert seqs(got_a) == list(range(1, LOG_READ_CHUNK + 1)) and more_a
    assert seqs(got_b) == list(range(4, LOG_READ_CHUNK + 1)) and more_b
    assert seqs(got_c) == list(range(LOG_READ_CHUNK + 2, LOG_READ_CHUNK + 6)) and not more_c


async def test_full_chunks_are_kept_for_later_readers_but_not_past_a_resync() -> None:
    store = FakeStore(log_events(LOG_READ_CHUNK * (KEPT_CHUNKS + 2)))
    store.gate.set()
    topic = Topic("gen", 16)
    metrics = Metrics()
    for chunk in range(KEPT_CHUNKS + 2):  # one viewer walks the whole log
        frames, more = await topic.read_log(store, chunk * LOG_READ_CHUNK, metrics)
        assert len(frames) == LOG_READ_CHUNK and more
    assert len(store.calls) == KEPT_CHUNKS + 2
    # The next viewers walking the recent chunks read nothing: log content never changes.
    for chunk in range(2, KEPT_CHUNKS + 2):
        frames, _ = await topic.read_log(store, chunk * LOG_READ_CHUNK + 7, metrics)
        assert frames[0].seq == chunk * LOG_READ_CHUNK + 8
    assert len(store.calls) == KEPT_CHUNKS + 2
    await topic.read_log(store, 0, metrics)  # the oldest chunk was let go
    assert len(store.calls) == KEPT_CHUNKS + 3
    topic.resync()  # Redis may hold another history now
    await topic.read_log(store, 2 * LOG_READ_CHUNK, metrics)
    assert len(store.calls) == KEPT_CHUNKS + 4


async def test_sequential_reads_each_call_the_store() -> None:
    store = FakeStore(log_events(2))
    store.gate.set()
    topic = Topic("gen", 16)
    metrics = Metrics()
    await topic.read_log(store, 0, metrics)
    await topic.read_log(store, 0, metrics)
    assert len(store.calls) == 2  # a short chunk is not kept: a new read sees new events


async def test_a_store_error_reaches_every_reader_and_a_later_read_retries() -> None:
    store = FakeStore(log_events(3), fail_times=1)
    metrics = Metrics()
    topic = Topic("gen", 16)
    readers = [asyncio.create_task(topic.read_log(store, 0, metrics)) for _ in range(50)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert len(store.calls) == 1
    assert all(isinstance(r, RuntimeError) and "fell over" in str(r) for r in results)
    assert len(topic.window) == 0

    retried, _ = await topic.read_log(store, 0, metrics)
    assert len(store.calls) == 2
    assert seqs(retried) == [1, 2, 3]


async def test_cancelling_the_first_reader_does_not_cancel_the_others() -> None:
    store = FakeStore(log_events(3))
    metrics = Metrics()
    topic = Topic("gen", 16)
    first = asyncio.create_task(topic.read_log(store, 0, metrics))
    await asyncio.sleep(0)
    other = asyncio.create_task(topic.read_log(store, 0, metrics))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    store.gate.set()
    await asyncio.gather(first, return_exceptions=True)
    assert seqs((await asyncio.wait_for(other, 1))[0]) == [1, 2, 3]


# -- needs_log: viewers skip a log read the topic already made ---------------------------------


async def test_a_fresh_topic_needs_the_log() -> None:
    topic = Topic("gen", 16)
    assert topic.needs_log(0)


async def test_a_window_reaching_back_to_the_cursor_serves_without_the_log() -> None:
    topic = Topic("gen", 16)
    for f in frames(5, 8):
        topic.offer(f)
    assert not topic.needs_log(4) and not topic.needs_log(8) and not topic.needs_log(20)
    assert topic.needs_log(3)  # event 4 is not in the window


async def test_an_empty_log_read_spares_later_viewers_at_or_after_its_cursor() -> None:
    store = FakeStore([])
    store.gate.set()
    topic = Topic("gen", 16)
    assert await topic.read_log(store, 0, Metrics()) == ([], False)
    assert topic.read_to == 0
    assert not topic.needs_log(0)  # what follows arrives live: no second read
    assert len(store.calls) == 1


async def test_a_short_read_records_how_far_the_log_was_read() -> None:
    store = FakeStore(log_events(5)[:3])  # three messages so far, no end yet
    store.gate.set()
    topic = Topic("gen", 16)
    await topic.read_log(store, 1, Metrics())
    assert topic.read_to == 3
    assert not topic.needs_log(1)  # the window (absorbed from the read) covers it
    # Reads start at their chunk's boundary: event 1 came with it.
    assert not topic.needs_log(0)


async def test_a_full_chunk_does_not_count_as_read_to_the_end() -> None:
    store = FakeStore(log_events(LOG_READ_CHUNK + 10))
    store.gate.set()
    topic = Topic("gen", LOG_READ_CHUNK * 2)
    await topic.read_log(store, 0, Metrics())
    assert topic.read_to is None  # more may follow the chunk


async def test_a_resync_forgets_how_far_the_log_was_read() -> None:
    store = FakeStore([])
    store.gate.set()
    topic = Topic("gen", 16)
    await topic.read_log(store, 0, Metrics())
    topic.resync()
    assert topic.read_to is None and topic.needs_log(0)


async def test_a_read_overtaken_by_a_resync_records_nothing() -> None:
    store = FakeStore([])
    topic = Topic("gen", 16)
    read = asyncio.create_task(topic.read_log(store, 0, Metrics()))
    for _ in range(10):
        await asyncio.sleep(0)
    topic.resync()  # messages may be missed while the read is in flight
    store.gate.set()
    await read
    assert topic.read_to is None
