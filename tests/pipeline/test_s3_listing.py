"""The split, concurrent S3 listing against a store that lists as S3 does, in memory.

The store keeps its keys sorted and answers ListObjectsV2's Prefix, StartAfter,
ContinuationToken and MaxKeys the way S3 documents them, so every property
here is about our ranges and ordering, not a client. tests/pipeline/
test_listing.py runs the same code over moto's S3 server.
"""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import s3_listing
from pipeline.s3_listing import KeyRange, Page, list_in_order, split_range


class SortedStore:
    """A bucket's keys, listed like ListObjectsV2 (pages of at most ``page_cap`` keys)."""

    def __init__(self, keys, page_cap=3, delay_s=0.0, fail_after_key=None, order=None):
        self.keys = sorted(set(keys))
        self.page_cap, self.delay_s = page_cap, delay_s
        self.fail_after_key = fail_after_key
        self.order = order  # a key order other than S3's, for stores that do not sort
        self.requests = self.probes = 0
        self.in_flight = self.most_in_flight = 0
        self.in_flight_at_pages = []  # requests on their way as each page's began

    async def list_page(self, key_range: KeyRange, continuation, max_keys) -> Page:
        self.requests += 1
        self.probes += max_keys == 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if max_keys > 1:
            self.in_flight_at_pages.append(self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            keys = self.order or self.keys
            if continuation is not None:
                position = int(continuation)
            elif self.order:
                position = 0  # an unsorted store: StartAfter means nothing to it
            else:
                position = bisect.bisect_right(keys, key_range.start_after)
            page = []
            while position < len(keys) and len(page) < min(max_keys, self.page_cap):
                key = keys[position]
                position += 1
                if key.startswith(key_range.prefix):
                    page.append({"Key": key, "ETag": f'"{len(key)}"', "Size": len(key)})
                elif not self.order and key > key_range.prefix:
                    position = len(keys)  # sorted: nothing after can match
            if self.fail_after_key is not None and any(
                entry["Key"] > self.fail_after_key for entry in page
            ):
                raise PermissionError("AccessDenied")
            more = any(key.startswith(key_range.prefix) for key in keys[position:])
            return Page(page, str(position) if more else None)
        finally:
            self.in_flight -= 1


def listed(store, prefix="", concurrency=4):
    async def collect():
        return [
            entry["Key"]
            async for page in list_in_order(store.list_page, prefix, concurrency)
            for entry in page
        ]

    return asyncio.run(collect())


# Keys as in real buckets: folders, numbered names, keys that are prefixes of
# others, non-ASCII, and the code point the split uses as its upper bound.
_KEY_CHARACTERS = st.sampled_from([*"ab/09._-", "é", "字", "\U0010ffff", "\x7f"])
_KEYS = st.lists(st.text(_KEY_CHARACTERS, min_size=1, max_size=6), max_size=60)


@settings(max_examples=300, deadline=None)
@given(keys=_KEYS, prefix=st.sampled_from(["", "a", "a/", "0", "\U0010ffff"]))
def test_split_listing_holds_every_key_once_in_order(keys, prefix):
    store = SortedStore(keys, page_cap=2)
    expected = [key for key in store.keys if key.startswith(prefix)]
    for concurrency in (1, 2, 5):
        assert listed(store, prefix, concurrency) == expected


@settings(max_examples=300, deadline=None)
@given(keys=_KEYS, start_after=st.text(_KEY_CHARACTERS, max_size=3), budget=st.integers(2, 40))
def test_split_ranges_cover_the_range_exactly(keys, start_after, budget):
    store = SortedStore(keys)
    items = asyncio.run(
        split_range(
            store.list_page,
            KeyRange("", start_after),
            concurrency=3,
            target_ranges=50,
            max_probes=budget,
        )
    )
    covered = []
    for item in items:
        if isinstance(item, KeyRange):
            covered += [
                key for key in store.keys if key.startswith(item.prefix) and key > item.start_after
            ]
        else:
            covered.append(item["Key"])
    assert covered == [key for key in store.keys if key > start_after]
    # Each probe level costs at least one probe per range; the budget bounds them all.
    assert store.probes <= budget


def test_numbered_keys_split_into_many_ranges_listed_at_once():
    keys = [f"images/{index:09d}.jpg" for index in range(3000)]
    store = SortedStore(keys, page_cap=10, delay_s=0.001)
    assert listed(store, "images/", concurrency=6) == keys
    # images/000000000 … images/000002999: the split goes down the shared zeros
    # to the digits that differ, and the rest is listed six ranges at a time.
    assert store.most_in_flight >= 6
    one_at_a_time = SortedStore(keys, page_cap=10)
    listed(one_at_a_time, "images/", concurrency=1)
    assert one_at_a_time.most_in_flight == 1
    assert one_at_a_time.probes == 0


def test_split_does_not_slow_a_prefix_of_a_few_pages():
    store = SortedStore([f"k{index:03d}" for index in range(5)], page_cap=10)
    assert len(listed(store, "", concurrency=8)) == 5
    assert store.requests == 1  # one page, no split begun


def test_a_store_that_does_not_sort_is_walked_to_the_end():
    keys = [f"{index % 7}-{index}" for index in range(40)]
    store = SortedStore(keys, page_cap=4, order=keys)
    assert listed(store, "", concurrency=4) == keys


def test_a_range_that_fails_raises_once_the_keys_before_it_are_handed_on():
    keys = [f"{letter}{index:02d}" for letter in "abcdefgh" for index in range(20)]
    store = SortedStore(keys, page_cap=5, fail_after_key="f05")
    seen = []

    async def collect():
        async for page in list_in_order(store.list_page, "", 4):
            seen.extend(entry["Key"] for entry in page)

    with pytest.raises(PermissionError):
        asyncio.run(collect())
    # Everything before the failing page came through, in order, and nothing after it.
    assert seen == [key for key in keys if key <= "f04"][: len(seen)]
    assert seen and seen[-1] <= "f05"


def test_closing_the_listing_early_stops_the_ranges_being_listed():
    keys = [f"{letter}{index:03d}" for letter in "abcdefghij" for index in range(100)]
    store = SortedStore(keys, page_cap=5, delay_s=0.001)

    async def first_keys(count):
        pages = list_in_order(store.list_page, "", 4)
        taken = []
        async for page in pages:
            taken += [entry["Key"] for entry in page]
            if len(taken) >= count:
                break
        await pages.aclose()
        requests_at_close = store.requests
        await asyncio.sleep(0.05)
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        return taken, requests_at_close, pending

    taken, requests_at_close, pending = asyncio.run(first_keys(300))
    assert taken[:300] == keys[:300]
    assert not pending
    assert store.requests <= requests_at_close + 1


def test_pages_listed_ahead_are_bounded_while_nobody_takes_them(monkeypatch):
    monkeypatch.setattr(s3_listing, "PAGES_AHEAD", 3)
    monkeypatch.setattr(s3_listing, "RANGES_PER_REQUEST", 1)  # one level: a0…, b0…, …
    keys = [f"{letter}{index:03d}" for letter in "abcdefgh" for index in range(200)]
    store = SortedStore(keys, page_cap=10, delay_s=0.001)

    async def stall_after(pages_taken):
        pages = list_in_order(store.list_page, "", 4)
        for _ in range(pages_taken):
            await anext(pages)
        await asyncio.sleep(0.2)  # nobody takes pages: the ranges must stop
        listed_pages = store.requests - store.probes
        await pages.aclose()
        return listed_pages

    listed_pages = asyncio.run(stall_after(pages_taken=12))
    # Taken, plus 3 waiting in the range being handed on and 3 in those after
    # it, plus one answer per request that was on its way (4 at once).
    assert listed_pages <= 12 + 3 + 3 + 4
    # And the ranges did list ahead: more than the walk alone would have.
    assert listed_pages > 12 + 1


def test_ranges_of_many_pages_are_listed_at_once_not_one_after_another(monkeypatch):
    """Eight ranges of twenty pages: a range handed on lists one page at a time,
    so the others must list beside it, not fill a few pages each and wait."""
    monkeypatch.setattr(s3_listing, "RANGES_PER_REQUEST", 1)  # one level: a…, b…, …, h…
    keys = [f"{letter}{index:03d}" for letter in "abcdefgh" for index in range(200)]
    store = SortedStore(keys, page_cap=10, delay_s=0.002)
    assert listed(store, "", concurrency=8) == keys
    pages_after_split = store.in_flight_at_pages[len(store.in_flight_at_pages) // 4 :]
    assert sum(pages_after_split) / len(pages_after_split) >= 4


class JitteryStore(SortedStore):
    """Answers after a random delay each, so the split ends at any point of the walk."""

    def __init__(self, keys, page_cap, seed, fail_probes_under=None):
        super().__init__(keys, page_cap=page_cap)
        self.random = random.Random(seed)
        self.fail_probes_under = fail_probes_under
        self.failed_at_probe = None

    async def list_page(self, key_range, continuation, max_keys):
        if max_keys == 1 and key_range.prefix == self.fail_probes_under:
            self.failed_at_probe = self.probes
            raise PermissionError("AccessDenied")
        await asyncio.sleep(self.random.random() * 0.002)
        return await super().list_page(key_range, continuation, max_keys)


def listed_with_pauses(store, prefix, concurrency, seed):
    """Keys listed by a consumer that pauses at random (the budget fills and
    drains), and the tasks still alive once it is done."""
    pauses = random.Random(seed)

    async def collect():
        keys = []
        async for page in list_in_order(store.list_page, prefix, concurrency):
            keys += [entry["Key"] for entry in page]
            if pauses.random() < 0.3:
                await asyncio.sleep(pauses.random() * 0.003)
        await asyncio.sleep(0.01)  # cancellations asked for are delivered
        return keys, [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    return asyncio.run(collect())


@settings(max_examples=150, deadline=None)
@given(
    keys=_KEYS,
    prefix=st.sampled_from(["", "a", "\U0010ffff", "é"]),
    page_cap=st.integers(1, 4),
    concurrency=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    per_request=st.integers(1, 8),
    ahead=st.integers(1, 4),
)
def test_listing_with_random_delays_and_pauses_is_the_walk_and_leaves_no_task(
    keys, prefix, page_cap, concurrency, seed, per_request, ahead
):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3_listing, "RANGES_PER_REQUEST", per_request)
        patch.setattr(s3_listing, "PAGES_AHEAD", ahead)
        store = JitteryStore(keys, page_cap, seed)
        found, left_running = listed_with_pauses(store, prefix, concurrency, seed)
    assert found == [key for key in store.keys if key.startswith(prefix)]
    assert not left_running


def test_a_store_that_refuses_the_probes_is_walked_and_probed_no_more():
    keys = [
        f"{letter}{digit}{index}"
        for letter in "abcdefgh"
        for digit in "0123456789"
        for index in range(3)
    ]
    store = JitteryStore(keys, page_cap=10, seed=0, fail_probes_under="a")
    found, left_running = listed_with_pauses(store, "", 4, seed=0)
    assert found == store.keys
    assert not left_running
    # The other ranges' probes stopped when one failed.
    assert store.failed_at_probe is not None and store.probes <= store.failed_at_probe + 4
