"""`/recommend` filters and the configured business rules, over the published item catalogue.

The syntax is the same for a request's query parameters and for the rules in configuration
(`item_rules`, one query string such as `exclude=in_stock:false&range=stock:1..`):
- `include=ATTR:VALUE` keeps the items that have VALUE. Values of one attribute are alternatives
  (OR); different attributes must all hold (AND).
- `exclude=ATTR:VALUE` drops the items that have VALUE.
- `range=ATTR:LO..HI` keeps the items whose numeric ATTR lies in [LO, HI]; either bound may be left
  out (`year:1990..`, `price:..20`). An item without the attribute is dropped.
The attribute is what comes before the first `:`, so a value may itself contain `:`.

A filter becomes one boolean mask over the serving state's item rows, cached per state, and the
candidate pipeline searches within it (streamrec.serving.pipeline). An item with a vector but no
catalogue entry has no attributes: an include or a range drops it, an exclude keeps it. A request
naming an attribute the catalogue lacks is refused (422); a rule naming one is skipped, since
rules are written before any catalogue exists, and `inert_rules` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl

import numpy as np

from streamrec.stream.catalogue import ItemCatalogue

MAX_CLAUSES = 32  # per request, all kinds together
MAX_CLAUSE_CHARS = 600


class FilterError(ValueError):
    """A filter that cannot be applied: HTTP 422 with this message."""


@dataclass(frozen=True)
class ItemFilter:
    include: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (attribute, alternatives), sorted
    exclude: tuple[tuple[str, str], ...] = ()
    ranges: tuple[tuple[str, float, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude or self.ranges)

    @property
    def attributes(self) -> set[str]:
        return {a for a, _ in self.include} | {a for a, _ in self.exclude} | {a for a, _, _ in self.ranges}

    @classmethod
    def parse(cls, include: list[str], exclude: list[str], ranges: list[str]) -> ItemFilter:
        """From the request's repeated parameters; FilterError names the clause that is malformed."""
        if len(include) + len(exclude) + len(ranges) > MAX_CLAUSES:
            raise FilterError(f"at most {MAX_CLAUSES} include / exclude / range clauses")
        alternatives: dict[str, set[str]] = {}
        for clause in include:
            attribute, value = _split(clause, "include")
            alternatives.setdefault(attribute, set()).add(value)
        excluded = {_split(clause, "exclude") for clause in exclude}
        bounds = [_range(clause) for clause in ranges]
        return cls(tuple(sorted((a, tuple(sorted(v))) for a, v in alternatives.items())), tuple(sorted(excluded)),
                   tuple(sorted(bounds)))

    @classmethod
    def parse_rules(cls, text: str) -> ItemFilter:
        """The configured rules: a query string of include / exclude / range parameters."""
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        unknown = {name for name, _ in pairs} - {"include", "exclude", "range"}
        if unknown:
            raise FilterError(f"item rules: unknown parameter(s) {sorted(unknown)}; use include, exclude, range")
        return cls.parse(*([v for n, v in pairs if n == name] for name in ("include", "exclude", "range")))

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
                          tuple(sorted(set(self.ranges) | set(other.ranges))))

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

    def applicable(self, catalogue: ItemCatalogue | None) -> ItemFilter:
        """The clauses whose attribute the catalogue has with the right kind (for rules)."""
        if catalogue is None or not self:
            return ItemFilter()
        kinds = catalogue.attributes
        return ItemFilter(tuple(c for c in self.include if kinds.get(c[0]) == "categorical"),
                          tuple(c for c in self.exclude if kinds.get(c[0]) == "categorical"),
                          tuple(c for c in self.ranges if kinds.get(c[0]) == "numeric"))

    def inert(self, catalogue: ItemCatalogue | None) -> list[str]:
        """The clauses `applicable` leaves out, each with why: a rule that stopped applying (a
        numeric column that became categorical by one non-numeric cell, say) must be seen."""
        kinds = catalogue.attributes if catalogue is not None else {}
        clauses = ([(f"include={a}:{'|'.join(v)}", a, "categorical") for a, v in self.include]
                   + [(f"exclude={a}:{v}", a, "categorical") for a, v in self.exclude]
                   + [(f"range={a}:{lo}..{hi}", a, "numeric") for a, lo, hi in self.ranges])
        return [f"{clause}: the catalogue has {'no ' + repr(a) if a not in kinds else repr(a) + ' as ' + kinds[a]}"
                + ("" if a not in kinds else f", not {kind}") for clause, a, kind in clauses if kinds.get(a) != kind]

    def mask(self, catalogue: ItemCatalogue, catalogue_rows: np.ndarray, n_rows: int) -> np.ndarray:
        """Allowed item rows (bool, `n_rows`); `catalogue_rows`: the item row of each catalogue
        position, -1 where the item has no vector. Checked first (`check`)."""
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
                within[catalogue_rows[has_row & (column >= low) & (column <= high)]] = True
            allowed &= within
        return allowed


NO_FILTER = ItemFilter()


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
    if "_" in text:  # Python's float takes `1_0` as 10; no catalogue number is written so
        low_text = "nan"
    try:
        low = float(low_text) if low_text else -math.inf
        high = float(high_text) if high_text else math.inf
    except ValueError:
        low = high = math.nan
    if not dots or math.isnan(low) or math.isnan(high) or (not low_text and not high_text) or low > high:
        raise FilterError(f"range={clause[:80]!r}: ATTRIBUTE:LOW..HIGH expected, LOW <= HIGH, one may be left out")
    return attribute, low, high
