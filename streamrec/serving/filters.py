"""`/recommend` filters and the configured business rules, over the published item catalogue.

The syntax is the same for a request's query parameters and for the rules in configuration
(`item_rules`, one query string such as `exclude=in_stock:false&range=stock:1..`):
- `include=ATTR:VALUE` keeps the items that have VALUE. Values of one attribute are alternatives
  (OR); different attributes must all hold (AND).
- `exclude=ATTR:VALUE` drops the items that have VALUE.
- `range=ATTR:LO..HI` keeps the items whose numeric ATTR lies in [LO, HI]; either bound may be left
  out (`year:1990..`, `price:..20`). An item without the attribute is dropped. A bound may be the
  request's time in epoch seconds, `now`, or an offset from it, `now-30d` / `now+2h` (units s, m,
  h, d): `range=released:now-30d..now` keeps what was released in the last 30 days.
- `available=true` keeps the items available now: numeric `available_from` (epoch seconds, the
  first moment it may be shown) at or before now, and `available_until` (the first moment it may
  not) after now. A missing bound, or a missing attribute on an item, sets no limit, so a shop
  marks only what has a window. As a rule (`item_rules=available=true`) items leave and enter at
  their times without a new catalogue.
The attribute is what comes before the first `:`, so a value may itself contain `:`.

A filter becomes one boolean mask over the serving state's item rows, cached per state, and the
candidate pipeline searches within it (streamrec.serving.pipeline). A mask that depends on the
time is cached with the next moment an item crosses one of its bounds (`valid_until`) and built
again from then on: exact to the second, without a mask per request. An item with a vector but no
catalogue entry has no attributes: an include or a range drops it, an exclude keeps it. A request
naming an attribute the catalogue lacks is refused (422); a rule naming one is skipped, since
rules are written before any catalogue exists, and `inert_rules` says which.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qsl

import numpy as np

from streamrec.stream.catalogue import ItemCatalogue

MAX_CLAUSES = 32  # per request, all kinds together
MAX_CLAUSE_CHARS = 600
AVAILABLE_FROM, AVAILABLE_UNTIL = "available_from", "available_until"
_NOW = re.compile(r"now(?:([+-])(\d+(?:\.\d+)?)([smhd]))?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


class Bound(NamedTuple):
    """One end of a range: a number, or (`relative`) seconds from the request's time."""

    value: float
    relative: bool = False

    def at(self, now: float) -> float:
        return self.value + now if self.relative else self.value

    def __str__(self) -> str:
        """As a clause writes it (every digit of the number: rules are read back in /readyz)."""
        if not self.relative:
            return "" if math.isinf(self.value) else repr(self.value)
        return "now" if self.value == 0 else f"now{'+' if self.value > 0 else ''}{self.value!r}s"


class FilterError(ValueError):
    """A filter that cannot be applied: HTTP 422 with this message."""


@dataclass(frozen=True)
class ItemFilter:
    include: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (attribute, alternatives), sorted
    exclude: tuple[tuple[str, str], ...] = ()
    ranges: tuple[tuple[str, Bound, Bound], ...] = ()
    available: bool = False

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude or self.ranges or self.available)

    @property
    def attributes(self) -> set[str]:
        """The attributes the clauses name (`available` names none: its attributes are optional)."""
        return {a for a, _ in self.include} | {a for a, _ in self.exclude} | {a for a, _, _ in self.ranges}

    @property
    def timed(self) -> bool:
        """Whether the mask depends on the request's time."""
        return self.available or any(low.relative or high.relative for _, low, high in self.ranges)

    @classmethod
    def parse(cls, include: list[str], exclude: list[str], ranges: list[str],
              available: list[str] | tuple[str, ...] = ()) -> ItemFilter:
        """From the request's repeated parameters; FilterError names the clause that is malformed."""
        if len(include) + len(exclude) + len(ranges) + len(available) > MAX_CLAUSES:
            raise FilterError(f"at most {MAX_CLAUSES} include / exclude / range / available clauses")
        flags = {_BOOLS.get(text) for text in available}
        if None in flags:
            raise FilterError("available: true or false expected")
        alternatives: dict[str, set[str]] = {}
        for clause in include:
            attribute, value = _split(clause, "include")
            alternatives.setdefault(attribute, set()).add(value)
        excluded = {_split(clause, "exclude") for clause in exclude}
        bounds = [_range(clause) for clause in ranges]
        return cls(tuple(sorted((a, tuple(sorted(v))) for a, v in alternatives.items())), tuple(sorted(excluded)),
                   tuple(sorted(bounds)), available=bool(available) and _BOOLS[available[-1]])

    @classmethod
    def parse_rules(cls, text: str) -> ItemFilter:
        """The configured rules: a query string of include / exclude / range parameters."""
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        unknown = {name for name, _ in pairs} - set(PARAMETERS)
        if unknown:
            raise FilterError(f"item rules: unknown parameter(s) {sorted(unknown)}; use {', '.join(PARAMETERS)}")
        return cls.parse(*([v for n, v in pairs if n == name] for name in PARAMETERS))

    def merged(self, other: ItemFilter) -> ItemFilter:
        """Both filters at once (a request's on top of the rules)."""
        if not other:
            return self
        if not self:
            return other
        alternatives: dict[str, set[str]] = {a: set(v) for a, v in self.include}
        for attribute, values in other.include:  # both must hold: the alternatives common to both
            alternatives[attribute] = alternatives[attribute] & set(values) if attribute in alternatives else set(values)
        return ItemFilter(tuple(sorted((a, tuple(sorted(v))) for a, v in alternatives.items())),
                          tuple(sorted(set(self.exclude) | set(other.exclude))),
                          tuple(sorted(set(self.ranges) | set(other.ranges))), self.available or other.available)

    def check(self, catalogue: ItemCatalogue | None) -> None:
        """FilterError unless every attribute exists in the catalogue with a kind the clause fits."""
        if not self:
            return
        if catalogue is None:
            raise FilterError("no item catalogue is published, so there is nothing to filter on "
                              "(streamrec catalogue publish PATH)")
        kinds = catalogue.attributes
        for attribute in sorted(self.attributes):
            if attribute not in kinds:
                raise FilterError(f"unknown attribute {attribute!r}; the catalogue has {sorted(kinds)}")
        for attribute in sorted({a for a, _ in self.include} | {a for a, _ in self.exclude}):
            if kinds[attribute] != "categorical":
                raise FilterError(f"{attribute!r} is {kinds[attribute]}: include / exclude need a categorical "
                                  "attribute (use range for numbers)")
        for attribute, _, _ in self.ranges:
            if kinds[attribute] != "numeric":
                raise FilterError(f"{attribute!r} is {kinds[attribute]}: range needs a numeric attribute")
        if self.available:
            window = {a: kinds[a] for a in (AVAILABLE_FROM, AVAILABLE_UNTIL) if a in kinds}
            if not window or any(kind != "numeric" for kind in window.values()):
                raise FilterError(f"available needs numeric {AVAILABLE_FROM} and/or {AVAILABLE_UNTIL} (epoch seconds) "
                                  f"in the catalogue; it has {window or 'neither'}")

    def applicable(self, catalogue: ItemCatalogue | None) -> ItemFilter:
        """The clauses whose attribute the catalogue has with the right kind (for rules)."""
        if catalogue is None or not self:
            return ItemFilter()
        kinds = catalogue.attributes
        return ItemFilter(tuple(c for c in self.include if kinds.get(c[0]) == "categorical"),
                          tuple(c for c in self.exclude if kinds.get(c[0]) == "categorical"),
                          tuple(c for c in self.ranges if kinds.get(c[0]) == "numeric"),
                          self.available and _window_ok(kinds))

    def inert(self, catalogue: ItemCatalogue | None) -> list[str]:
        """The clauses `applicable` leaves out, each with why: a rule that stopped applying (a
        numeric column that became categorical by one non-numeric cell, say) must be seen."""
        kinds = catalogue.attributes if catalogue is not None else {}
        clauses = ([(f"include={a}:{'|'.join(v)}", a, "categorical") for a, v in self.include]
                   + [(f"exclude={a}:{v}", a, "categorical") for a, v in self.exclude]
                   + [(f"range={a}:{lo}..{hi}", a, "numeric") for a, lo, hi in self.ranges])
        inert = [f"{clause}: the catalogue has {'no ' + repr(a) if a not in kinds else repr(a) + ' as ' + kinds[a]}"
                 + ("" if a not in kinds else f", not {kind}") for clause, a, kind in clauses if kinds.get(a) != kind]
        if self.available and not _window_ok(kinds):
            inert.append(f"available=true: the catalogue has no numeric {AVAILABLE_FROM} or {AVAILABLE_UNTIL}, "
                         "or one that is not numeric")
        return inert

    def mask(self, catalogue: ItemCatalogue, catalogue_rows: np.ndarray, n_rows: int, now: float = 0.0) -> np.ndarray:
        """Allowed item rows (bool, `n_rows`) at time `now` (epoch seconds); `catalogue_rows`: the
        item row of each catalogue position, -1 where the item has no vector. Checked first (`check`)."""
        allowed = np.ones(n_rows, bool)
        has_row = catalogue_rows >= 0
        for attribute, values in self.include:
            column = catalogue.categorical[attribute]
            holding = np.zeros(n_rows, bool)
            for value in values:
                rows = catalogue_rows[column.holding(value)]
                holding[rows[rows >= 0]] = True
            allowed &= holding
        for attribute, value in self.exclude:
            rows = catalogue_rows[catalogue.categorical[attribute].holding(value)]
            allowed[rows[rows >= 0]] = False
        for attribute, low, high in self.ranges:
            column = catalogue.numeric[attribute]
            within = np.zeros(n_rows, bool)
            with np.errstate(invalid="ignore"):
                within[catalogue_rows[has_row & (column >= low.at(now)) & (column <= high.at(now))]] = True
            allowed &= within
        if self.available:
            starts, ends = _window(catalogue)
            with np.errstate(invalid="ignore"):
                unavailable = has_row & ((starts > now) | (ends <= now))  # NaN compares False: no limit
            allowed[catalogue_rows[unavailable]] = False
        return allowed

    def valid_until(self, catalogue: ItemCatalogue, now: float) -> float:
        """The first moment after `now` at which the mask may change: the nearest time an item
        crosses a time-relative bound or an availability bound (inf: never, an untimed filter)."""
        until = math.inf
        with np.errstate(invalid="ignore"):
            for attribute, low, high in self.ranges:
                column = catalogue.numeric[attribute]
                if low.relative:  # the items at or above the lower bound leave as it rises past them
                    until = min(until, _least(column[column >= low.at(now)]) - low.value)
                if high.relative:  # the items above the upper bound enter as it reaches them
                    until = min(until, _least(column[column > high.at(now)]) - high.value)
            if self.available:
                for column in _window(catalogue):
                    until = min(until, _least(column[column > now]))
        return until


NO_FILTER = ItemFilter()
PARAMETERS = ("include", "exclude", "range", "available")  # in ItemFilter.parse's order


def _least(values: np.ndarray) -> float:
    return float(values.min()) if values.size else math.inf


def _window_ok(kinds: dict[str, str]) -> bool:
    window = [kinds[a] for a in (AVAILABLE_FROM, AVAILABLE_UNTIL) if a in kinds]
    return bool(window) and all(kind == "numeric" for kind in window)


def _window(catalogue: ItemCatalogue) -> tuple[np.ndarray, np.ndarray]:
    """(available_from, available_until) by catalogue position, NaN where there is no limit."""
    nothing = np.full(len(catalogue.ids), np.nan)
    return catalogue.numeric.get(AVAILABLE_FROM, nothing), catalogue.numeric.get(AVAILABLE_UNTIL, nothing)


def _bound(text: str, open_end: float) -> Bound:
    """A range bound: empty (open), a finite number, `now` or `now±N<unit>`; ValueError otherwise."""
    if not text:
        return Bound(open_end)
    match = _NOW.fullmatch(text)
    if match is not None:
        sign, amount, unit = match.groups()
        offset = 0.0 if sign is None else float(amount) * _UNITS[unit] * (-1 if sign == "-" else 1)
        return Bound(offset, relative=True)
    if "_" in text:  # Python's float takes `1_0` as 10; no catalogue number is written so
        raise ValueError(text)
    value = float(text)
    if math.isnan(value):
        raise ValueError(text)
    return Bound(value)


def _split(clause: str, kind: str) -> tuple[str, str]:
    if len(clause) > MAX_CLAUSE_CHARS:
        raise FilterError(f"{kind}: a clause is longer than {MAX_CLAUSE_CHARS} characters")
    attribute, colon, value = clause.partition(":")
    if not colon or not attribute or not value:
        raise FilterError(f"{kind}={clause[:80]!r}: ATTRIBUTE:VALUE expected")
    return attribute, value


def _range(clause: str) -> tuple[str, float, float]:
    attribute, text = _split(clause, "range")
    low_text, dots, high_text = text.partition("..")
    try:
        low, high = _bound(low_text, -math.inf), _bound(high_text, math.inf)
    except ValueError:
        low = high = Bound(math.nan)
    comparable = low.relative == high.relative or math.isinf(low.value) or math.isinf(high.value)
    if (not dots or math.isnan(low.value) or math.isnan(high.value) or (not low_text and not high_text)
            or (comparable and low.at(0) > high.at(0))):
        raise FilterError(f"range={clause[:80]!r}: ATTRIBUTE:LOW..HIGH expected, LOW <= HIGH, one may be left out; "
                          "a bound is a number, now, or now-30d / now+2h")
    return attribute, low, high
