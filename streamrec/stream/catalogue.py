"""The item catalogue (issue 17): item metadata that business rules and `/recommend` filters read.

The interaction events stay as they are; metadata arrives beside them, from a file:
- MovieLens's `u.item` (pipe-separated, Latin-1): `title` (text), `genre` (categorical, several per
  item, named by `u.genre` beside it when present) and `year` (numeric, from the release date);
- a CSV with an `item_id` column and any others: a column whose every non-empty value is a number
  (one at least finite; an infinite one is refused with its line) is numeric, `title` is text,
  every other column is categorical with `|` between several values;
- JSON lines, one object per item with `item_id`: numbers are numeric, strings, booleans and lists
  of strings categorical (a boolean as "true" / "false"), `title` text. An empty string is no
  value, in JSON as in a CSV cell.

Columnar, so that a filter is a few array operations over the catalogue, never a loop per item:
a categorical attribute is a list of (item position, value code) pairs grouped by value; a numeric
one is a float64 array with NaN where an item lacks it. Input is checked on the way in and a
broken rule names its line: ids of 1 to 256 characters, each once; attribute names of letters,
digits, `_`, `-` and `.` (never `:`, which separates attribute and value in filters); values of at
most 256 characters (a title too), at most 256 values of one attribute per item; at most 64
attributes. `to_arrays` / `from_arrays` give the form the parameter server stores as a blob (JSON
header and plain arrays: nothing is pickled).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

MAX_ID_CHARS = 256
MAX_VALUE_CHARS = 256
MAX_VALUES_PER_ITEM = 256  # of one attribute: a catalogue's size stays bounded by its item count
MAX_ATTRIBUTES = 64
ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
TEXT_ATTRIBUTES = frozenset({"title"})
CatalogueFormat = Literal["auto", "movielens", "csv", "jsonl"]
Value = str | float | list[str]  # one attribute of one item: categorical values, a number, or text


class CatalogueError(ValueError):
    """A catalogue file or blob that breaks a rule; the message names the line where there is one."""


@dataclass(frozen=True)
class Categorical:
    """One categorical attribute: `values` by code, and the (item, code) pairs sorted by code, so
    the items holding a value are one slice (`starts[code]:starts[code + 1]` of `items`)."""

    values: tuple[str, ...]
    items: np.ndarray  # int32 item positions, grouped by value code
    starts: np.ndarray  # int64, len(values) + 1
    _codes: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_codes", {value: code for code, value in enumerate(self.values)})

    @classmethod
    def from_pairs(cls, values: list[str], items: np.ndarray, codes: np.ndarray) -> Categorical:
        order = np.argsort(codes, kind="stable")
        starts = np.zeros(len(values) + 1, np.int64)
        np.cumsum(np.bincount(codes, minlength=len(values)), out=starts[1:])
        return cls(tuple(values), items[order].astype(np.int32), starts)

    def holding(self, value: str) -> np.ndarray:
        """Positions of the items that have `value` (empty for a value nobody has)."""
        code = self._codes.get(value)
        if code is None:
            return np.zeros(0, np.int32)
        return self.items[self.starts[code]:self.starts[code + 1]]


@dataclass(frozen=True)
class ItemCatalogue:
    ids: np.ndarray  # object: item id by position
    categorical: dict[str, Categorical]
    numeric: dict[str, np.ndarray]  # float64 by position, NaN where missing
    text: dict[str, np.ndarray]  # object by position, "" where missing

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def attributes(self) -> dict[str, str]:
        """Each attribute's kind, for errors and summaries."""
        return {**{a: "categorical" for a in self.categorical}, **{a: "numeric" for a in self.numeric},
                **{a: "text" for a in self.text}}

    def summary(self) -> dict[str, object]:
        return {"items": len(self), "attributes": {
            **{a: {"kind": "categorical", "values": len(c.values)} for a, c in self.categorical.items()},
            **{a: {"kind": "numeric", "present": int(np.isfinite(v).sum())} for a, v in self.numeric.items()},
            **{a: {"kind": "text"} for a in self.text}}}

    def without(self, ids: Iterable[str]) -> ItemCatalogue:
        """The catalogue less the items `ids` (items that do not exist yet, in a simulation)."""
        # as objects: numpy's fixed-width strings drop trailing NULs ("a\0" was "a") and are as wide
        # as the longest id for every item
        keep = ~pd.Index(self.ids).isin(list(ids))
        position = np.cumsum(keep) - 1  # old position -> new, where kept
        categorical = {}
        for name, column in self.categorical.items():
            codes = np.repeat(np.arange(len(column.values)), np.diff(column.starts))
            held = keep[column.items]
            categorical[name] = Categorical.from_pairs(list(column.values), position[column.items[held]], codes[held])
        return ItemCatalogue(self.ids[keep], categorical, {a: v[keep] for a, v in self.numeric.items()},
                             {a: v[keep] for a, v in self.text.items()})

    @classmethod
    def empty(cls) -> ItemCatalogue:
        return cls(np.empty(0, object), {}, {}, {})

    def appended(self, other: ItemCatalogue) -> ItemCatalogue:
        """This catalogue followed by `other`'s items (ids must not repeat): value codes are merged
        per attribute with array operations, so the cost is the catalogue's size in numpy work."""
        clash = sorted(name for name, kind in other.attributes.items() if self.attributes.get(name, kind) != kind)
        if clash:
            raise CatalogueError(f"attribute {clash[0]!r} is {self.attributes[clash[0]]} here, "
                                 f"{other.attributes[clash[0]]} in the items added")
        n = len(self)
        categorical = {}
        for name in sorted({*self.categorical, *other.categorical}):
            parts = [(column, offset) for column, offset in ((self.categorical.get(name), 0),
                                                             (other.categorical.get(name), n)) if column is not None]
            values = np.unique(np.concatenate([np.array(c.values, dtype=object) for c, _ in parts]))
            items, codes = [], []
            for column, offset in parts:
                mine = np.searchsorted(values, np.array(column.values, dtype=object))
                codes.append(np.repeat(mine, np.diff(column.starts)))
                items.append(column.items.astype(np.int64) + offset)
            held, merged = np.unique(np.concatenate(codes), return_inverse=True)  # a value no item holds goes
            categorical[name] = Categorical.from_pairs(values[held].tolist(), np.concatenate(items), merged)

        def joined(mine: dict[str, np.ndarray], theirs: dict[str, np.ndarray], blank: object,
                   dtype: type) -> dict[str, np.ndarray]:
            return {name: np.concatenate([mine.get(name, np.full(n, blank, dtype)),
                                          theirs.get(name, np.full(len(other), blank, dtype))])
                    for name in sorted({*mine, *theirs})}

        return ItemCatalogue(np.concatenate([self.ids, other.ids]), categorical,
                             joined(self.numeric, other.numeric, np.nan, np.float64),
                             joined(self.text, other.text, "", object))

    def attributes_of(self, ids: Iterable[str]) -> dict[str, dict[str, Value]]:
        """{id: its attributes} for the `ids` the catalogue holds, in the form the builder takes
        (the rows a patch starts from)."""
        wanted = np.array(list(ids), dtype=object)
        found = pd.Index(self.ids).get_indexer(wanted)
        rows: dict[int, dict[str, Value]] = {int(p): {} for p in found[found >= 0]}
        positions = np.array(sorted(rows), np.int64)
        for name, column in self.categorical.items():
            held = np.flatnonzero(np.isin(column.items, positions))
            codes = np.searchsorted(column.starts, held, side="right") - 1
            for position, code in zip(column.items[held].tolist(), codes.tolist()):
                rows[position].setdefault(name, []).append(column.values[code])  # type: ignore[union-attr]
        for name, numbers in self.numeric.items():
            for position, number in zip(positions.tolist(), numbers[positions].tolist()):
                if math.isfinite(number):
                    rows[position][name] = number
        for name, texts in self.text.items():
            for position, text in zip(positions.tolist(), texts[positions].tolist()):
                if text:
                    rows[position][name] = text
        return {str(self.ids[position]): row for position, row in rows.items()}

    # ---- the blob form ------------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """(JSON header, arrays): strings as UTF-8 bytes with offsets, so no object array is stored."""
        arrays: dict[str, np.ndarray] = {}
        _put_strings(arrays, "ids", self.ids.tolist())
        header: dict[str, object] = {"kind": "catalogue", "items": len(self), "categorical": {},
                                     "numeric": sorted(self.numeric), "text": sorted(self.text)}
        for n, (name, column) in enumerate(sorted(self.categorical.items())):
            header["categorical"][name] = n  # type: ignore[index]
            _put_strings(arrays, f"c{n}_values", list(column.values))
            arrays[f"c{n}_items"], arrays[f"c{n}_starts"] = column.items, column.starts
        for n, name in enumerate(sorted(self.numeric)):
            arrays[f"n{n}"] = self.numeric[name]
        for n, name in enumerate(sorted(self.text)):
            _put_strings(arrays, f"t{n}", self.text[name].tolist())
        return header, arrays

    @classmethod
    def from_arrays(cls, header: dict[str, object], arrays: dict[str, np.ndarray]) -> ItemCatalogue:
        """Inverse of `to_arrays`; CatalogueError on a blob whose parts disagree."""
        if header.get("kind") != "catalogue":
            raise CatalogueError(f"not a catalogue blob (kind {header.get('kind')!r})")
        try:
            ids = np.array(_get_strings(arrays, "ids"), dtype=object)
            n = len(ids)
            categorical = {}
            for name, k in dict(header["categorical"]).items():  # type: ignore[call-overload]
                values = _get_strings(arrays, f"c{k}_values")
                items, starts = arrays[f"c{k}_items"].astype(np.int32), arrays[f"c{k}_starts"].astype(np.int64)
                if (len(starts) != len(values) + 1 or starts[0] != 0 or starts[-1] != len(items)
                        or np.any(np.diff(starts) < 0) or (len(items) and (items.min() < 0 or items.max() >= n))):
                    raise CatalogueError(f"attribute {name!r}: inconsistent value groups")
                categorical[str(name)] = Categorical(tuple(values), items, starts)
            numeric = {str(name): arrays[f"n{k}"].astype(np.float64) for k, name in enumerate(header["numeric"])}  # type: ignore[arg-type]
            text = {str(name): np.array(_get_strings(arrays, f"t{k}"), dtype=object)
                    for k, name in enumerate(header["text"])}  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogueError(f"malformed catalogue blob: {exc}") from exc
        if any(len(v) != n for v in (*numeric.values(), *text.values())):
            raise CatalogueError("malformed catalogue blob: a column's length differs from the item count")
        return cls(ids, categorical, numeric, text)


def _put_strings(arrays: dict[str, np.ndarray], name: str, strings: list[str]) -> None:
    encoded = [s.encode() for s in strings]
    arrays[f"{name}_bytes"] = np.frombuffer(b"".join(encoded), np.uint8)
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    arrays[f"{name}_offsets"] = offsets


def _get_strings(arrays: dict[str, np.ndarray], name: str) -> list[str]:
    data, offsets = arrays[f"{name}_bytes"].astype(np.uint8).tobytes(), arrays[f"{name}_offsets"].astype(np.int64)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
        raise CatalogueError(f"malformed catalogue blob: offsets of {name!r}")
    bounds = offsets.tolist()
    return [data[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:])]


# ---- building -----------------------------------------------------------------------------------


class CatalogueBuilder:
    """Rows (item id, {attribute: value}) in file order -> an ItemCatalogue, checking every rule."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids: list[str] = []
        self.seen: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.pairs: dict[str, tuple[list[int], list[str]]] = {}
        self.numbers: dict[str, dict[int, float]] = {}
        self.texts: dict[str, dict[int, str]] = {}

    def fail(self, line: int, message: str) -> CatalogueError:
        return CatalogueError(f"{self.source}:{line}: {message}")

    def add(self, line: int, item_id: object, attributes: dict[str, Value]) -> None:
        if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS:
            raise self.fail(line, f"item_id must be a string of 1 to {MAX_ID_CHARS} characters")
        self._check_text(line, item_id)
        if item_id in self.seen:
            raise self.fail(line, f"item {item_id[:80]!r} appears twice (first on line {self.seen[item_id]})")
        self.seen[item_id] = line
        position = len(self.ids)
        self.ids.append(item_id)
        for name, value in attributes.items():
            self._add_value(line, position, name, value)

    def _check_text(self, line: int, text: str) -> None:
        """JSON can spell a lone surrogate (`"\\ud800"`), which no UTF-8 blob can hold."""
        try:
            text.encode()
        except UnicodeEncodeError:
            raise self.fail(line, f"{text[:80]!r} is not valid Unicode text (a lone surrogate)") from None

    def _add_value(self, line: int, position: int, name: str, value: Value) -> None:
        if not ATTRIBUTE_NAME.match(name):
            raise self.fail(line, f"attribute name {name[:80]!r}: letters, digits, '_', '-', '.' only, 1 to 64")
        kind = "text" if name in TEXT_ATTRIBUTES else "numeric" if isinstance(value, float) else "categorical"
        known = self.kinds.setdefault(name, kind)
        if known != kind:
            raise self.fail(line, f"attribute {name!r} is {known} elsewhere, {kind} here")
        if len(self.kinds) > MAX_ATTRIBUTES:
            raise self.fail(line, f"more than {MAX_ATTRIBUTES} attributes")
        if kind == "numeric":
            self.numbers.setdefault(name, {})[position] = float(value)  # type: ignore[arg-type]
            return
        values = value if isinstance(value, list) else [str(value)]
        if len(values) > MAX_VALUES_PER_ITEM:
            raise self.fail(line, f"{name!r} has {len(values)} values; at most {MAX_VALUES_PER_ITEM} per item")
        for v in values:
            self._check_text(line, v)
            if len(v) > MAX_VALUE_CHARS:
                raise self.fail(line, f"a value of {name!r} is longer than {MAX_VALUE_CHARS} characters")
        if kind == "text":
            text = " ".join(values)
            if len(text) > MAX_VALUE_CHARS:  # a list of short parts joined: read back, it must pass again
                raise self.fail(line, f"{name!r} is longer than {MAX_VALUE_CHARS} characters")
            self.texts.setdefault(name, {})[position] = text
            return
        positions, found = self.pairs.setdefault(name, ([], []))
        for v in dict.fromkeys(values):  # a value once per item
            positions.append(position)
            found.append(v)

    def build(self) -> ItemCatalogue:
        n = len(self.ids)
        categorical = {}
        for name, (positions, found) in self.pairs.items():
            values = sorted(set(found))
            code_of = {v: c for c, v in enumerate(values)}
            codes = np.fromiter((code_of[v] for v in found), np.int64, len(found))
            categorical[name] = Categorical.from_pairs(values, np.array(positions, np.int32), codes)
        numeric = {}
        for name, by_position in self.numbers.items():
            column = np.full(n, np.nan)
            column[list(by_position)] = list(by_position.values())
            numeric[name] = column
        text = {}
        for name, by_position in self.texts.items():
            column = np.full(n, "", dtype=object)
            column[list(by_position)] = list(by_position.values())
            text[name] = column
        return ItemCatalogue(np.array(self.ids, dtype=object), categorical, numeric, text)


def _number(text: str) -> float | None:
    """A number as written in data, finite or not (`inf`, `-Infinity`, `1e999`); None for other text,
    `1_000` too (Python's `float` takes it, as a code literal)."""
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def movielens_genres(path: Path) -> tuple[str, ...]:
    """The genre names of the u.item at `path`, in flag order: from `u.genre` beside it when
    present, else MovieLens 100K's 19."""
    genre_file = path.with_name("u.genre")
    if not genre_file.exists():
        return ML100K_GENRES
    pairs = [line.split("|") for line in genre_file.read_text(encoding="latin-1").splitlines() if "|" in line]
    try:
        return tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
    except (ValueError, IndexError):
        raise CatalogueError(f"{genre_file}: every line must be name|index") from None


def read_movielens(path: Path) -> ItemCatalogue:
    """MovieLens 100K's u.item: title, genres (flags named by `movielens_genres`), year.

    A line is `id|title|release date|video release date|URL|flags`. The format has no quoting,
    so a title that holds `|` spans several fields: the fields are read from both ends, and the
    title is everything between the id and the fixed tail (it used to lose its year and date).
    A shorter line without the video date and URL (`id|title|date|flags`) is read as before."""
    names = movielens_genres(path)
    tail = len(names) + 3  # release date, video release date, URL, flags
    builder = CatalogueBuilder(str(path))
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[-len(names):]
        if len(fields) < 3 + len(names) or any(f not in ("0", "1") for f in flags):
            raise builder.fail(number, f"not a u.item line ({len(names)} genre flags expected)")
        title, date = (("|".join(fields[1:-tail]), fields[-tail]) if len(fields) >= 2 + tail
                       else (fields[1], fields[2]))
        attributes: dict[str, Value] = {"title": title, "genre": [n for n, f in zip(names, flags) if f == "1"]}
        year = re.search(r"(\d{4})\s*$", date)
        if year:
            attributes["year"] = float(year.group(1))
        builder.add(number, fields[0], attributes)
    return builder.build()


MISSING_NUMBERS = frozenset({"n/a", "na", "nan", "null", "none", "-"})  # in a numeric column: no value


def _missing(text: str) -> bool:
    return text == "" or text.strip().lower() in MISSING_NUMBERS


def _numeric_column(cells: list[float | None]) -> bool:
    """Whether a CSV column's present cells (`_number` of each) make it numeric: all numbers, at
    least one finite (a column of infinities alone is no column of numbers)."""
    return all(cell is not None for cell in cells) and any(cell is not None and math.isfinite(cell) for cell in cells)


def read_csv(path: Path) -> ItemCatalogue:
    """`item_id` plus any columns; all-number columns numeric, `title` text, the rest categorical.
    In a column of numbers, `n/a`, `NaN`, `null`, `-` and the like are no value (the item then
    fails every range on it): one such cell used to make the column categorical, which silently
    turned off a configured range rule such as `range=stock:1..`. A column whose cells are numbers,
    at least one of them finite, is numeric even where one is infinite (`inf`, `-Infinity`, `1e999`),
    and that cell is refused with its line, as JSON lines refuse one: it used to make the whole
    column categorical, which turned off its ranges and the content tower's use of its values."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or "item_id" not in rows[0]:
        raise CatalogueError(f"{path}:1: a header with an item_id column is expected")
    header, body = rows[0], rows[1:]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # the last column of a name used to win without a word
        raise CatalogueError(f"{path}:1: column {repeated[0][:80]!r} appears more than once in the header")
    key = header.index("item_id")
    numeric = {c for c, name in enumerate(header) if c != key and name not in TEXT_ATTRIBUTES
               and _numeric_column([_number(r[c]) for r in body if c < len(r) and not _missing(r[c])])}
    builder = CatalogueBuilder(str(path))
    for number, row in enumerate(body, 2):
        if len(row) != len(header):
            raise builder.fail(number, f"{len(row)} fields, the header has {len(header)}")
        attributes: dict[str, Value] = {}
        for c, (name, text) in enumerate(zip(header, row)):
            if c == key or text == "" or (c in numeric and _missing(text)):
                continue
            if c not in numeric:
                attributes[name] = [v for v in text.split("|") if v]
                continue
            value = float(text)
            if not math.isfinite(value):
                raise builder.fail(number, f"column {name[:80]!r}: {text[:80]!r} is not a finite number")
            attributes[name] = value
        builder.add(number, row[key], attributes)
    return builder.build()


def json_value(value: object) -> Value:
    """A JSON value as an attribute value; ValueError for NaN and the infinities (Python's json
    reads them, and dropping the value in silence hid the broken row), TypeError for any other
    type than a number, string, boolean or list of strings. An empty string is no value, as an
    empty CSV cell is: stored, it was a value that no filter could name (`include=color:` is not
    a clause), so `exclude=` could never drop it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value} is not a finite number")
        return number
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise TypeError(type(value).__name__)


def read_jsonl(lines: Iterable[str], source: str) -> ItemCatalogue:
    """One JSON object per line with `item_id`; other keys become attributes by their JSON type."""
    builder = CatalogueBuilder(source)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise builder.fail(number, f"not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise builder.fail(number, "a JSON object is expected")
        try:
            attributes = json_attributes(record)
        except CatalogueError as exc:
            raise builder.fail(number, str(exc)) from None
        builder.add(number, record.get("item_id"), {k: v for k, v in attributes.items() if v is not None})
    return builder.build()


def json_attributes(record: dict[str, object], reserved: frozenset[str] = frozenset({"item_id"})) -> dict[str, Value | None]:
    """The attributes of one JSON object (a JSONL line, an items-topic record) by their JSON type;
    None for a null (no value; in a patch, remove it)."""
    attributes: dict[str, Value | None] = {}
    for name, value in record.items():
        if name in reserved:
            continue
        try:
            attributes[name] = None if value is None else json_value(value)
        except TypeError as exc:
            raise CatalogueError(f"attribute {str(name)[:80]!r}: a {exc} is not a number, string, boolean or "
                                 "list of strings") from None
        except (ValueError, OverflowError) as exc:  # NaN, Infinity; an integer past a float's range
            raise CatalogueError(f"attribute {str(name)[:80]!r}: {str(exc)[:80]}") from None
    return attributes


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        yield from handle


def read_catalogue(path: Path, fmt: CatalogueFormat = "auto") -> ItemCatalogue:
    """The catalogue in `path`; `auto` picks by name (u.item, *.csv, *.jsonl / *.ndjson)."""
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = ("movielens" if path.name == "u.item" else "csv" if suffix == ".csv"
               else "jsonl" if suffix in (".jsonl", ".ndjson") else "auto")
        if fmt == "auto":
            raise CatalogueError(f"{path}: cannot tell the format from the name; pass movielens, csv or jsonl")
    try:
        if fmt == "movielens":
            return read_movielens(path)
        if fmt == "csv":
            return read_csv(path)
        return read_jsonl(_lines(path), str(path))
    except CatalogueError:
        raise
    except (csv.Error, OverflowError, RecursionError, ValueError) as exc:  # a field over csv's limit, 1e400, ...
        raise CatalogueError(f"{path}: {type(exc).__name__}: {str(exc)[:300]}") from exc
