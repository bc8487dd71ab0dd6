"""InFlight's lifetime rules on the CPU, with events whose firing the test controls (the GPU tests in
test_streamer.py run the same paths on real streams)."""
import pytest

from kvstream.handles import EventHandle, Handle
from kvstream.streaming.inflight import HOLD_BYTES, TRACK_TRIM, InFlight


class _Event:
    def __init__(self):
        self.fired = False
        self.queries = 0

    def query(self):
        self.queries += 1
        return self.fired

    def synchronize(self):
        self.fired = True

    def wait(self, stream=None):  # the current stream waits for it (no host blocking)
        WAITS.append(self)


WAITS: list = []  # the events the (fake) current stream was made to wait for, in order


class _Side:
    """A side stream that records fake events (a reused one when given)."""

    def __init__(self):
        self.recorded = []

    def record_event(self, event=None):
        event = event or _Event()
        event.fired = False
        self.recorded.append(event)
        return event


class _Later(Handle):
    """A handle without an event (a disk write's future)."""

    def __init__(self, fail=None):
        self.landed, self.fail = False, fail

    def done(self):
        return self.landed

    def wait(self, timeout=None):
        self.landed = True
        if self.fail:
            raise self.fail


def test_a_flush_handles_event_marks_its_chunk_read_and_no_event_is_recorded():
    side = _Side()
    f = InFlight(side)
    e = _Event()
    f.keep_until_read(["chunk"], EventHandle(e))
    assert side.recorded == [] and list(f.reading) == [(e, ["chunk"], False, 0)]
    f.keep_until_read(["other"], _Later())  # no event of the flush's: one of ours
    assert len(side.recorded) == 1 and f.reading[-1][2] is True


def test_chunks_are_held_until_read_oldest_first_and_our_events_are_reused():
    side = _Side()
    f = InFlight(side)
    f.keep_until_read(["a"], _Later())
    f.keep_until_read(["b"], _Later())
    first, second = side.recorded
    f.keep_until_read(["c"], _Later())  # nothing read yet: all three held
    assert [t for _, t, _, _ in f.reading] == [["a"], ["b"], ["c"]]
    first.fired = True
    f.keep_until_read(["d"], _Later())  # "a" was read: dropped, and its event records "d"
    assert [t for _, t, _, _ in f.reading] == [["b"], ["c"], ["d"]]
    assert side.recorded[-1] is first and not first.fired


def test_release_read_drops_everything_once_the_newest_is_read_in_one_query():
    f = InFlight(_Side())
    events = [_Event() for _ in range(5)]
    for i, e in enumerate(events):
        f.keep_until_read([i], EventHandle(e))
    f.release_read()
    assert len(f.reading) == 5  # the newest is not read: all stay
    events[-1].fired = True
    before = sum(e.queries for e in events)
    f.release_read()
    assert not f.reading and sum(e.queries for e in events) == before + 1
    f.release_read()  # empty: no query at all
    assert sum(e.queries for e in events) == before + 1


def test_track_trims_landed_handles_only_every_trim():
    f = InFlight()
    hs = [_Later() for _ in range(TRACK_TRIM)]
    for h in hs:
        f.track(h)
    for h in hs[:3]:
        h.landed = True
    f.track(_Later())  # the trim: the three landed ones, oldest first, stop at the first in flight
    assert len(f.pending) == TRACK_TRIM + 1 - 3


def test_wait_waits_for_all_raises_the_first_error_and_drops_what_it_held():
    f = InFlight(_Side())
    ok, bad, worse = _Later(), _Later(RuntimeError("first")), _Later(ValueError("second"))
    for h in (ok, bad, worse):
        f.track(h)
    f.keep_until_read(["x"], _Later())
    with pytest.raises(RuntimeError, match="first"):
        f.wait()
    assert ok.landed and bad.landed and worse.landed and not f.pending and not f.reading


def test_bounded_holds_at_most_hold_bytes_and_the_compute_stream_waits_for_the_oldest_read():
    WAITS.clear()
    f = InFlight(_Side())
    chunk = HOLD_BYTES // 2  # two fit the bound; a third makes the oldest wait
    events = [_Event() for _ in range(5)]
    for i, e in enumerate(events):
        f.keep_until_read([i], EventHandle(e), nbytes=chunk, bounded=True)
        assert len(f.reading) == min(i + 1, 2) and f.held_bytes == len(f.reading) * chunk
    assert WAITS == events[:3] and [t for _, t, _, _ in f.reading] == [[3], [4]]
    assert all(not e.fired for e in events)  # the host never blocked
    f.keep_until_read(["ours"], _Later(), nbytes=chunk, bounded=True)  # an event of our own: waited for, then reused
    assert WAITS[-1] is events[3] and f.reading[-1][2] is True
    own = f.reading[-1][0]
    for _ in range(2):
        f.keep_until_read(["x"], EventHandle(_Event()), nbytes=chunk, bounded=True)
    assert WAITS[-1] is own and f._free_events == [own]
    events[4].fired = True  # fired chunks are dropped by a query first, without a wait
    f.reading[0][0].fired = True
    n = len(WAITS)
    f.keep_until_read(["y"], EventHandle(_Event()), nbytes=chunk, bounded=True)
    assert len(WAITS) == n and f.held_bytes == 2 * chunk


def test_bounded_never_waits_below_the_bound_nor_for_the_newest_chunk():
    WAITS.clear()
    f = InFlight(_Side())
    for i in range(40):  # 32 chunks of 4 MiB: 128 MiB, under the bound
        f.keep_until_read([i], EventHandle(_Event()), nbytes=4 << 20, bounded=True)
    assert WAITS == [] and len(f.reading) == 40
    g = InFlight(_Side())
    g.keep_until_read(["huge"], EventHandle(_Event()), nbytes=2 * HOLD_BYTES, bounded=True)
    assert WAITS == [] and len(g.reading) == 1  # waiting for the newest would stall the compute stream on its copy
    g.keep_until_read(["next"], EventHandle(_Event()), nbytes=1, bounded=True)
    assert len(WAITS) == 1 and [t for _, t, _, _ in g.reading] == [["next"]]


def test_unbounded_never_makes_a_stream_wait():
    WAITS.clear()
    f = InFlight(_Side())
    for i in range(6):
        f.keep_until_read([i], EventHandle(_Event()), nbytes=HOLD_BYTES)
    assert WAITS == [] and len(f.reading) == 6 and f.held_bytes == 6 * HOLD_BYTES
    f.release_read()  # the newest has not fired
    assert len(f.reading) == 6
    f.reading[-1][0].fired = True
    f.release_read()
    assert not f.reading and f.held_bytes == 0
