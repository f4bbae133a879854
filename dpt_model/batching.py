"""Choosing the inference batch size at actor start (``inference.batch_size: auto``).

The search is a pure function over a ``probe(batch_size)`` callable, so its
logic is tested on CPU with made-up measurements; the actor passes a probe that
runs the real model on a batch of the checkpoint's input size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchProbe:
    """One trial forward pass: how long it took and the device memory it peaked at."""

    seconds: float
    peak_bytes: int | None = None  # None on CPU


def choose_batch_size(
    probe: Callable[[int], BatchProbe],
    ceiling: int,
    memory_limit_bytes: int | None = None,
    time_budget_s: float | None = None,
) -> int:
    """The largest power of two up to ``ceiling`` whose pass fits both limits.

    Doubles from 1. A size fits when its pass ran (no out-of-memory error),
    peaked under ``memory_limit_bytes`` and took at most ``time_budget_s``.
    One image always fits: a pass that cannot hold one image is not a batch
    size problem, and the predictor reports such images as error rows.
    """
    import torch

    chosen, size = 1, 1
    while size <= ceiling:
        try:
            result = probe(size)
        except torch.OutOfMemoryError:
            break
        over_memory = (
            memory_limit_bytes is not None
            and result.peak_bytes is not None
            and result.peak_bytes > memory_limit_bytes
        )
        over_time = time_budget_s is not None and result.seconds > time_budget_s
        if size > 1 and (over_memory or over_time):
            break
        chosen = size
        if over_memory or over_time:
            break
        size *= 2
    return chosen
