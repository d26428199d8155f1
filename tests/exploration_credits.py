"""Clicks for `ExplorationStore.count` in tests, as the trainer gives them: one credit per
(request id, item) pair, so `n` clicks on an item are `n` distinct requests that showed it."""

from __future__ import annotations

from collections.abc import Sequence


def credits(items: Sequence[str], clicks: Sequence[int], tag: str = "request") -> list[tuple[str, str]]:
    """`clicks[n]` credits for `items[n]`; `tag` keeps the request ids of separate calls apart
    (a pair is credited once, whenever it comes again)."""
    return [(f"{tag}-{k}", str(item)) for item, n in zip(items, clicks) for k in range(int(n))]
