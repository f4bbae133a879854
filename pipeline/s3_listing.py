"""Listing a large S3 prefix: key ranges listed at once, handed on in key order.

A ListObjectsV2 page holds 1000 keys and costs a round trip plus the client's
parsing; walked one page after another, a million keys take minutes before any
work starts (docs/benchmarks.md). S3 returns keys in UTF-8 byte order, which is
Python's ``str`` order, so a prefix splits into consecutive ranges by the
character its keys continue with, found with one-key probes; ranges are then
listed several at once and their pages handed on strictly in order. The result
is the same, key for key, as the walk, and memory stays bounded by the pages
buffered ahead.

The first pages are walked as before while the split is worked out beside
them, so a prefix that ends within a few pages takes no longer (a few
probes, begun and dropped, are all it costs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PAGE_KEYS = 1000  # S3's cap on MaxKeys
# A character no key continues with in practice (a noncharacter, the last code
# point): "<prefix><c>" + this sorts after every key beginning "<prefix><c>"
# but for ones holding it, which the split notices and does not split.
_AFTER_ALL = "\U0010ffff"
# Enough ranges that a few large ones do not leave the concurrent requests idle.
RANGES_PER_REQUEST = 8
# One-key probes in all; each range found costs one, and a character level of
# prefixes one more each. Past it, what is left is listed as found so far.
MAX_PROBES = 600
# Character levels the split may descend (keys such as images/000012345.jpg
# share several characters after the prefix before they differ).
MAX_DEPTH = 24
# Pages listed ahead of the one handed on, twice over (see _PagesAhead): 0.47
# MiB each as botocore returns them (measured), so 60 MiB at most.
PAGES_AHEAD = 64

Entry = dict[str, Any]  # one ListObjectsV2 "Contents" item: Key, ETag, Size, ...


class UnorderedListingError(RuntimeError):
    """The store does not list in key order or ignores StartAfter: it cannot be split."""


@dataclass(frozen=True)
class KeyRange:
    """The keys that begin with ``prefix`` and sort after ``start_after``."""

    prefix: str
    start_after: str = ""

    def after(self, key: str) -> KeyRange | None:
        """This range less every key up to ``key``; None when nothing is left."""
        if key > self.prefix and not key.startswith(self.prefix):
            return None  # key sorts after every key with the prefix
        return KeyRange(self.prefix, max(self.start_after, key))


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    continuation: str | None  # None: the range's last page


# list_page(key_range, continuation, max_keys): one ListObjectsV2 request.
ListPage = Callable[[KeyRange, str | None, int], Awaitable[Page]]


def s3_list_page(fs: Any, bucket: str) -> ListPage:
    """ListObjectsV2 through s3fs, with its retries and error translation."""

    async def list_page(key_range: KeyRange, continuation: str | None, max_keys: int) -> Page:
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": key_range.prefix, "MaxKeys": max_keys}
        if continuation is not None:
            params["ContinuationToken"] = continuation
        elif key_range.start_after:
            params["StartAfter"] = key_range.start_after
        reply = await fs._call_s3("list_objects_v2", **params)
        truncated = reply.get("IsTruncated") and reply.get("NextContinuationToken")
        return Page(
            reply.get("Contents", []), reply["NextContinuationToken"] if truncated else None
        )

    return list_page


async def list_in_order(
    list_page: ListPage, prefix: str, concurrency: int
) -> AsyncIterator[list[Entry]]:
    """Every entry whose key begins with ``prefix``, in key order, a page at a time.

    With ``concurrency`` 1, one page after another. Otherwise the walk goes on
    while :func:`split_range` works out ranges for the rest; once they are
    known, the rest is listed ``concurrency`` ranges at a time. A store that
    does not list in key order (S3 Express directory buckets) or ignores
    StartAfter is walked to the end.
    """
    whole = KeyRange(prefix)
    continuation, last_key = None, ""
    split: asyncio.Task[list[KeyRange | Entry]] | None = None
    in_order = concurrency > 1
    try:
        while True:
            page = await list_page(whole, continuation, PAGE_KEYS)
            if page.entries:
                in_order = in_order and _ascending(page.entries, last_key)
                last_key = page.entries[-1]["Key"]
                yield page.entries
            if page.continuation is None:
                return
            continuation = page.continuation
            if not in_order:
                if split is not None:
                    split.cancel()
                continue
            if split is None:
                split = asyncio.ensure_future(
                    split_range(list_page, KeyRange(prefix, last_key), concurrency)
                )
            elif split.done():
                if (problem := split.exception()) is None:
                    break
                # A store that cannot be split (probes refused, answers out of
                # order) is still listed whole by the walk.
                logger.info("listing page after page: the key ranges' probes failed (%s)", problem)
                in_order = False
        rest = [narrowed for item in split.result() if (narrowed := _after(item, last_key))]
        # Closed with this generator, not when collected: its ranges stop listing then.
        async with contextlib.aclosing(_pages_of(list_page, rest, concurrency)) as pages:
            async for entries in pages:
                yield entries
    finally:
        if split is not None:
            split.cancel()
            if split.done() and not split.cancelled():
                split.exception()  # retrieved: asyncio would log it as never seen


def _ascending(entries: list[Entry], after: str) -> bool:
    keys = [after, *(entry["Key"] for entry in entries)]
    return all(earlier < later for earlier, later in itertools.pairwise(keys))


async def split_range(
    list_page: ListPage,
    key_range: KeyRange,
    concurrency: int,
    target_ranges: int | None = None,
    max_probes: int = MAX_PROBES,
) -> list[KeyRange | Entry]:
    """``key_range`` as consecutive ranges (and single entries found on the way).

    Breadth first: each level replaces every range by one per distinct
    character its keys continue with, until there are ``target_ranges``
    (default ``RANGES_PER_REQUEST × concurrency``), the probes run out or the
    ranges stop splitting. A key equal to a range's prefix is an entry of its
    own, before that range's others. Together the items hold exactly the keys
    of ``key_range``, each once, in order.
    """
    target = target_ranges or RANGES_PER_REQUEST * concurrency
    items: list[KeyRange | Entry] = [key_range]
    unsplittable: set[KeyRange] = set()
    probes_left = max_probes
    gate = asyncio.Semaphore(concurrency)
    for _ in range(MAX_DEPTH):
        splittable = [
            item for item in items if isinstance(item, KeyRange) and item not in unsplittable
        ]
        if not splittable or len(items) >= target or probes_left < 2 * len(splittable):
            break
        budget = probes_left // len(splittable)

        async def split_one(item: KeyRange, budget: int = budget) -> tuple[list, int]:
            async with gate:
                return await _split_by_next_character(list_page, item, budget)

        tasks = [asyncio.ensure_future(split_one(item)) for item in splittable]
        try:
            found = await asyncio.gather(*tasks)
        finally:  # one failed, or the split was cancelled: the others stop probing too
            for task in tasks:
                task.cancel()
        results = dict(zip(splittable, found, strict=True))
        probes_left -= sum(probes for _, probes in results.values())
        next_items: list[KeyRange | Entry] = []
        for item in items:
            if not isinstance(item, KeyRange) or item not in results:
                next_items.append(item)
                continue
            parts = results[item][0]
            if parts == [item]:
                unsplittable.add(item)
            next_items.extend(parts)
        items = next_items
    return items


async def _split_by_next_character(
    list_page: ListPage, key_range: KeyRange, budget: int
) -> tuple[list[KeyRange | Entry], int]:
    """One level of :func:`split_range` for one range: (its parts, probes made)."""
    prefix, parts, probes = key_range.prefix, [], 0
    after = key_range.start_after
    after_before_last = after  # where the search stood when the last part was found
    while True:
        if probes == budget:
            # The rest, the last part with it (its keys may reach past `after`), unsplit.
            if parts and isinstance(parts[-1], KeyRange):
                parts[-1] = KeyRange(prefix, after_before_last)
            else:
                parts.append(KeyRange(prefix, after))
            return parts, probes
        page = await list_page(KeyRange(prefix, after), None, 1)
        probes += 1
        if not page.entries:
            return parts, probes
        key = page.entries[0]["Key"]
        if key <= after:
            raise UnorderedListingError(f"a listing after {after!r} began at {key!r}")
        if key == prefix:
            parts.append(page.entries[0])
            after = after_before_last = key
            continue
        part = prefix + key[len(prefix)]
        if parts and isinstance(parts[-1], KeyRange) and parts[-1].prefix == part:
            # A key sorts after part + _AFTER_ALL: leave the rest, that part with it, whole.
            parts[-1] = KeyRange(prefix, after_before_last)
            return parts, probes
        parts.append(KeyRange(part, key_range.start_after))
        after_before_last, after = after, part + _AFTER_ALL


def _after(item: KeyRange | Entry, key: str) -> KeyRange | Entry | None:
    if isinstance(item, KeyRange):
        return item.after(key)
    return item if item["Key"] > key else None


async def _pages_of(
    list_page: ListPage, items: list[KeyRange | Entry], concurrency: int
) -> AsyncIterator[list[Entry]]:
    """The items' entries in order; up to ``concurrency`` ranges listed at once.

    Ranges start in key order as earlier ones finish listing, and list ahead
    of the one being handed on until ``PAGES_AHEAD`` pages wait in all. A
    budget per range would not do: while a range of many pages is handed on,
    one request at a time, the ranges after it would fill theirs and wait,
    and the listing would be back to one request at a time (measured: 1.6×
    where 8 ranges listed at once).
    """
    ranges = [item for item in items if isinstance(item, KeyRange)]
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in ranges]
    ahead = _PagesAhead(PAGES_AHEAD)
    tasks: list[asyncio.Task] = []
    closing = False

    def start_more(_: object = None) -> None:
        while (
            not closing
            and len(tasks) < len(ranges)
            and sum(not task.done() for task in tasks) < concurrency
        ):
            index = len(tasks)
            task = asyncio.ensure_future(
                _list_range(list_page, ranges[index], queues[index], index, ahead)
            )
            task.add_done_callback(start_more)
            tasks.append(task)

    try:
        start_more()
        index = 0
        for item in items:
            if not isinstance(item, KeyRange):
                yield [item]
                continue
            await ahead.hand_on(index)
            while (entries := await queues[index].get()) is not None:
                if isinstance(entries, BaseException):
                    raise entries
                await ahead.taken(index)
                yield entries
            index += 1
    finally:
        closing = True  # a cancelled range's done callback must not start another
        for task in tasks:
            task.cancel()


class _PagesAhead:
    """Pages listed and not yet handed on: ``budget`` for all the ranges after the
    one being handed on, and ``budget`` for that one (the ranges after it may
    hold the whole of theirs, waiting for it)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.handing_on = budget, 0
        self.waiting = collections.Counter[int]()  # pages by range index
        self.waiting_after = 0  # pages of ranges after the one being handed on
        self.changed = asyncio.Condition()

    def _has_room(self, index: int) -> bool:
        if index == self.handing_on:
            return self.waiting[index] < self.budget
        return self.waiting_after < self.budget

    async def room_for(self, index: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self._has_room(index))

    def listed(self, index: int) -> None:
        self.waiting[index] += 1
        self.waiting_after += index != self.handing_on

    async def taken(self, index: int) -> None:
        async with self.changed:
            self.waiting[index] -= 1
            self.changed.notify_all()

    async def hand_on(self, index: int) -> None:
        async with self.changed:
            self.handing_on = index
            self.waiting_after -= self.waiting[index]
            self.changed.notify_all()


async def _list_range(
    list_page: ListPage, key_range: KeyRange, queue: asyncio.Queue, index: int, ahead: _PagesAhead
) -> None:
    """Every page of ``key_range`` into ``queue``, then None (or the error that stopped it)."""
    continuation = None
    try:
        while True:
            await ahead.room_for(index)
            page = await list_page(key_range, continuation, PAGE_KEYS)
            if page.entries:
                ahead.listed(index)
                queue.put_nowait(page.entries)
            if page.continuation is None:
                break
            continuation = page.continuation
    except Exception as error:  # handed to the consumer, which raises it in order
        queue.put_nowait(error)
        return
    queue.put_nowait(None)
