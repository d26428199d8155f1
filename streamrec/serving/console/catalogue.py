"""Item titles and genres for the console, so a person can read the lists.

Serving itself never needs them (items are ids); without a catalogue the console shows ids only.
The file (`--item-catalogue`: MovieLens's `u.item`, a CSV or JSON lines) is read by the one
catalogue reader, `streamrec.stream.catalogue`; its `title` is the title and its `genre` (u.item)
or `genres` (CSV) attribute the genres.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np

from streamrec.stream.catalogue import ItemCatalogue, read_catalogue

GENRE_ATTRIBUTES = ("genre", "genres")


class Catalogue:
    def __init__(self, items: ItemCatalogue) -> None:
        self.items = items
        self._position = {item: n for n, item in enumerate(items.ids.tolist())}
        titles = items.text.get("title")
        self._titles = titles if titles is not None else np.full(len(items), "", dtype=object)
        self._lowered = [title.lower() for title in self._titles.tolist()]
        self._genres: list[list[str]] = [[] for _ in range(len(items))]
        attribute = next((a for a in GENRE_ATTRIBUTES if a in items.categorical), None)
        if attribute is not None:
            column = items.categorical[attribute]
            for code, value in enumerate(column.values):
                for position in column.items[column.starts[code]:column.starts[code + 1]].tolist():
                    self._genres[position].append(value)

    def __len__(self) -> int:
        return len(self.items)

    def lookup(self, ids: list[str]) -> dict[str, dict[str, object]]:
        found = {}
        for item in ids:
            position = self._position.get(item)
            if position is not None:
                found[item] = {"title": self._titles[position], "genres": sorted(self._genres[position])}
        return found

    def title_matches(self, text: str, limit: int) -> list[str]:
        """Ids of the first `limit` items whose title contains `text` (case-insensitive), in
        catalogue order. The scan stops at the `limit`-th hit: a one-letter search matches most of a
        large catalogue, and every match used to be built before the slice."""
        needle = text.lower()
        hits = (n for n, title in enumerate(self._lowered) if needle in title)
        return [self.items.ids[n] for n in islice(hits, limit)]

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        """u.item, JSON lines (*.jsonl, *.ndjson) or else a CSV; CatalogueError (a ValueError) on a
        file that breaks a rule."""
        known = path.name == "u.item" or path.suffix.lower() in (".csv", ".jsonl", ".ndjson")
        return cls(read_catalogue(path, "auto" if known else "csv"))
