"""Optional item metadata for the console: titles and genres, so a person can read the lists.

Serving itself never needs it (items are ids); without a catalogue the console shows ids only.
Two layouts are read: MovieLens 100K's `u.item` (pipe-separated, Latin-1, 19 genre flags named by
`u.genre` beside it) and a CSV with the columns `item_id,title,genres` (genres separated by `|`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


@dataclass(frozen=True)
class ItemInfo:
    title: str
    genres: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"title": self.title, "genres": list(self.genres)}


class Catalogue:
    def __init__(self, items: dict[str, ItemInfo]) -> None:
        self.items = items
        self._titles = [(item, info.title.lower()) for item, info in items.items()]

    def __len__(self) -> int:
        return len(self.items)

    def lookup(self, ids: list[str]) -> dict[str, dict[str, object]]:
        return {i: self.items[i].to_json() for i in ids if i in self.items}

    def title_matches(self, text: str, limit: int) -> list[str]:
        """Ids of items whose title contains `text` (case-insensitive), in catalogue order."""
        needle = text.lower()
        return [item for item, title in self._titles if needle in title][:limit]

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        """u.item (MovieLens 100K) or a CSV; ValueError on a file in neither layout."""
        if path.name == "u.item":
            return cls(_movielens(path))
        return cls(_csv(path))


def _movielens(path: Path) -> dict[str, ItemInfo]:
    names = ML100K_GENRES
    genre_file = path.with_name("u.genre")
    if genre_file.exists():
        pairs = [line.split("|") for line in genre_file.read_text(encoding="latin-1").splitlines() if "|" in line]
        names = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
    items = {}
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[-len(names):]
        if len(fields) < 2 + len(names) or any(f not in ("0", "1") for f in flags):
            raise ValueError(f"{path}:{number}: not a u.item line ({len(names)} genre flags expected)")
        items[fields[0]] = ItemInfo(fields[1], tuple(n for n, f in zip(names, flags) if f == "1"))
    return items


def _csv(path: Path) -> dict[str, ItemInfo]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"item_id", "title"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: columns {sorted(missing)} missing (expected item_id,title[,genres])")
        return {row["item_id"]: ItemInfo(row["title"], tuple(g for g in (row.get("genres") or "").split("|") if g))
                for row in reader}
