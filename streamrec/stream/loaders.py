"""Historical interaction logs -> one columnar, time-ordered table.

Every consumer of a log file (replay to Kafka, batch refits, `streamrec evaluate`) reads it through
`load_log`, so ids, ordering and tie-breaking are identical everywhere. Ids stay opaque strings.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd

LogFormat = Literal["ml-100k", "ml-1m", "ml-latest", "csv", "jsonl", "sessions"]
FORMATS: tuple[str, ...] = ("ml-100k", "ml-1m", "ml-latest", "csv", "jsonl", "sessions", "parquet")
CANONICAL_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "event_type")


@dataclass(frozen=True)
class InteractionLog:
    """Columns of equal length, sorted by (timestamp, user, item) unless built otherwise.

    `rating` is NaN where the log has no explicit value (implicit feedback); `event_type` is None
    when the format carries no event types (then ratings are `rating` events, others `view`).
    """

    user_id: np.ndarray  # object array of str
    item_id: np.ndarray  # object array of str
    rating: np.ndarray  # float64, NaN = none
    timestamp: np.ndarray  # float64 epoch seconds
    event_type: np.ndarray | None = None  # object array of str
    source: str = ""

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def has_ratings(self) -> bool:
        return bool(np.isfinite(self.rating).any())

    def take(self, index: np.ndarray) -> InteractionLog:
        """Rows at `index` (a slice, mask or integer array), keeping the source name."""
        return InteractionLog(
            self.user_id[index],
            self.item_id[index],
            self.rating[index],
            self.timestamp[index],
            None if self.event_type is None else self.event_type[index],
            self.source,
        )

    def event_types(self) -> np.ndarray:
        """Event type per row: the log's own, else `rating` where rated and `view` elsewhere."""
        if self.event_type is not None:
            return self.event_type
        return np.where(np.isfinite(self.rating), "rating", "view").astype(object)

    def event_ids(self) -> list[str]:
        """Deterministic ids: the same file gives the same ids, so consumers can de-duplicate.

        Built from the row's content plus its occurrence number among identical rows, so two
        identical lines still get distinct ids while a reordered file keeps each row's id.
        """
        keys = pd.DataFrame(
            {"u": self.user_id, "i": self.item_id, "t": self.timestamp, "r": self.rating}
        )
        occurrence = keys.groupby(["u", "i", "t", "r"], dropna=False, sort=False).cumcount()
        return [
            hashlib.blake2b(f"{u}\x1f{i}\x1f{t!r}\x1f{r!r}\x1f{n}".encode(), digest_size=12).hexdigest()
            for u, i, t, r, n in zip(
                self.user_id, self.item_id, self.timestamp, self.rating, occurrence.to_numpy()
            )
        ]


_INTEGER = re.compile(r"[+-]?\d+")


def id_codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, text): the distinct ids as Python strs (an object array) and each id's position in it.

    Never numpy's fixed-width strings: `astype(str)` padded every id to the longest, so one id of
    256 characters in a 2M-event log took 4.4 GB and 15 s to index (0.4 GB, 0.8 s without it), and
    it cut trailing NUL characters, making "a" and "a\\0" one id. Hashing runs once per event in C;
    the conversion to str (ids read as ints, say) once per distinct id."""
    codes, distinct = pd.factorize(np.asarray(ids, dtype=object), use_na_sentinel=False)
    text = np.empty(len(distinct), dtype=object)
    text[:] = list(map(str, distinct))
    merged, text = pd.factorize(text)  # 7 and "7" are one id
    return merged[codes].astype(np.int64, copy=False), text


def id_strings(ids: np.ndarray) -> np.ndarray:
    """Each id as a Python str, in an object array (see `id_codes`)."""
    codes, text = id_codes(ids)
    return text[codes]


_REVERSED_DIGITS = str.maketrans("0123456789", "9876543210")


def _integer_key(text: str) -> tuple[int, int, str, str]:
    """Sorts integer strings as `(int(text), text)` would, without `int()`: Python refuses to
    convert strings of more than 4,300 digits, and one such id made the whole log unreadable.

    (sign class, digit count, digits, text): the magnitude is its digits without leading zeros,
    longer is larger; negative magnitudes are ordered in reverse (count negated, digits mirrored
    9 - d); the original text breaks ties, so "007" and "7" stay apart. Non-ASCII decimal digits
    ("٣", which `int` also reads) are compared by their values."""
    digits = text.lstrip("+-")
    if not digits.isascii():
        digits = "".join(str(unicodedata.decimal(c)) for c in digits)
    digits = digits.lstrip("0")
    if not digits:
        return (1, 0, "", text)
    if text.startswith("-"):
        return (0, -len(digits), digits.translate(_REVERSED_DIGITS), text)
    return (2, len(digits), digits, text)


def id_sort_key(ids: np.ndarray) -> np.ndarray:
    """Ids compare as integers when every id is an integer, else as strings (EVALUATION.md).

    Integers compare exactly, whatever their size: as float64, 64-bit ids (Snowflake-style,
    above 2**53) that differ in their last digits compared equal, and the order of their events
    fell back to the file's; longer than 4,300 digits they are compared as digit strings (see
    `_integer_key`). Ids equal as integers ("007", "7") are told apart as strings. The
    key is each id's rank among the distinct ids (code-point order for strings)."""
    codes, text = id_codes(ids)
    distinct = text.tolist()
    if all(map(_INTEGER.fullmatch, distinct)):
        ordered = sorted(range(len(distinct)), key=lambda i: _integer_key(distinct[i]))  # once per distinct id
    else:
        ordered = sorted(range(len(distinct)), key=distinct.__getitem__)
    rank = np.empty(len(distinct), np.int64)
    rank[ordered] = np.arange(len(distinct))
    return rank[codes]


def time_order(log: InteractionLog) -> np.ndarray:
    """Stable order by timestamp, then user id, then item id."""
    return np.lexsort((id_sort_key(log.item_id), id_sort_key(log.user_id), log.timestamp))


def _parse_mapping(mapping: dict[str, str] | None) -> dict[str, str]:
    """`--map user_id=userId,...` gives canonical -> source column; pandas wants the reverse."""
    unknown = set(mapping or {}) - set(CANONICAL_COLUMNS)
    if unknown:
        raise ValueError(f"--map names unknown fields {sorted(unknown)}; known: {CANONICAL_COLUMNS}")
    sources = list((mapping or {}).values())
    twice = sorted({src for src in sources if sources.count(src) > 1})
    if twice:  # the reversed mapping kept one of them, silently
        raise ValueError(f"--map names the column(s) {twice} for more than one field")
    return {src: dst for dst, src in (mapping or {}).items()}


def _mapped(frame: pd.DataFrame, mapping: dict[str, str] | None) -> pd.DataFrame:
    """`frame` with the `--map` renames; a rename onto a column the log also has is refused (two
    columns of one name made the id reader fail with "Buffer has wrong number of dimensions")."""
    renames = _parse_mapping(mapping)
    names = [renames.get(column, column) for column in frame.columns]  # pandas renames all at once: swaps are fine
    taken = [f"{dst}={src}" for src, dst in renames.items()
             if src in frame.columns and names.count(dst) > 1]
    if taken:
        raise ValueError(f"--map {','.join(taken)}: the log has a column of that name already; rename it or map "
                         "the field to that column")
    return frame.rename(columns=renames)


_FORMAT_OF_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def _read_frame(path: Path, fmt: str, mapping: dict[str, str] | None) -> pd.DataFrame:
    if fmt in ("ml-100k", "ml-1m"):  # u.data: tab-separated; ratings.dat: UserID::MovieID::Rating::Timestamp
        file = path / ("u.data" if fmt == "ml-100k" else "ratings.dat") if path.is_dir() else path
        if file.suffix.lower() in _FORMAT_OF_SUFFIX:
            raise ValueError(f"{file} looks like a {file.suffix[1:]} file, but --format is {fmt} (the default is "
                             f"ml-100k): add --format {_FORMAT_OF_SUFFIX[file.suffix.lower()]}")
        if mapping:
            raise ValueError(f"--map does not apply to --format {fmt}, whose columns are fixed")
        return _read_movielens(file, fmt)
    if fmt == "sessions":  # session_id,item_id,timestamp[,user_id]: sessions take the place of users
        frame = _mapped(_read_csv_with_header(path, dtype=str), mapping)
        if "session_id" not in frame.columns:
            raise ValueError(f"sessions format needs a session_id column (columns: {list(frame.columns)})")
        return frame.drop(columns=["user_id"], errors="ignore").rename(columns={"session_id": "user_id"})
    if fmt == "ml-latest":
        file = path / "ratings.csv" if path.is_dir() else path
        frame = _read_csv_with_header(file, dtype={"userId": str, "movieId": str})
        return _mapped(frame.rename(columns={"userId": "user_id", "movieId": "item_id"}), mapping)
    if fmt == "csv":
        frame = _read_csv_with_header(path, dtype=str)
    elif fmt == "jsonl":
        named = mapping or {}
        frame = _read_json_lines(path, (named.get("user_id", "user_id"), named.get("item_id", "item_id")))
    elif fmt == "parquet":  # a file or a folder of parts, as `streamrec export --to parquet` and Spark write them
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:
            raise ValueError(f"--format parquet needs pyarrow: pip install 'streamrec[parquet]' ({exc})") from exc
        for column in ("user_id", "item_id", "event_type"):
            if column in frame.columns:
                frame[column] = frame[column].astype(str)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return _mapped(frame, mapping)


def _read_csv_with_header(path: Path, **options: Any) -> pd.DataFrame:
    """A CSV file whose first row names its columns ("NA" is an id, not a missing value).

    `index_col=False`: rows with one field more than the header (a trailing comma on each data row)
    made pandas take their first field as the index, shifting every column by one without a word;
    now the fields past the header's are dropped, and that is announced on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = pd.read_csv(path, keep_default_na=False, index_col=False, **options)
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):  # "... leads to a loss of data with index_col=False"
            print(f"note: {path}: rows hold more fields than the header names; the fields past the header's are "
                  "ignored", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return frame


_MOVIELENS_FIELDS = ("user_id", "item_id", "rating", "timestamp")


def _read_movielens(file: Path, fmt: str) -> pd.DataFrame:
    """u.data (tab separated) or ratings.dat (`::` separated): exactly the four fields of
    `_MOVIELENS_FIELDS` on every line. A line with a field more was read with its first field as
    the index, or, for ratings.dat, had the extra field dropped: every column shifted, or data
    lost, without a word; it is refused, naming the line."""
    sep, step = ("\t", 1) if fmt == "ml-100k" else (":", 2)  # `::` read as ':' has an empty column between fields
    expected = f"{fmt} lines hold exactly {len(_MOVIELENS_FIELDS)} fields ({' '.join(_MOVIELENS_FIELDS)})"

    def read(dtype: type | dict[int, type]) -> pd.DataFrame:
        try:
            return pd.read_csv(file, header=None, sep=sep, dtype=dtype, keep_default_na=False)  # "NA" is an id
        except pd.errors.ParserError as exc:  # a line with more fields than the first
            found = re.search(r"line (\d+), saw (\d+)", str(exc))
            if found is None:
                raise ValueError(f"{file}: {exc}; {expected}") from None
            line, tokens = found.groups()
            raise ValueError(f"{file} line {line}: {(int(tokens) + step - 1) // step} fields; {expected}") from None

    try:  # numbers as numbers (twice as fast as text); dtypes by position, so that no field can shift
        frame = read({0: str, step: str, 2 * step: np.float64, 3 * step: np.float64})
    except ValueError:  # a value that is not a number: read as text, so that its row is named later
        frame = read(str)
    fields = (frame.shape[1] + step - 1) // step
    if fields != len(_MOVIELENS_FIELDS):
        raise ValueError(f"{file} line 1: {fields} fields; {expected}")
    return frame.iloc[:, ::step].set_axis(list(_MOVIELENS_FIELDS), axis=1)


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _reject_constant(name: str) -> str:
    raise ValueError(f"{name} is not a value a log can hold")


def _read_json_lines(path: Path, id_columns: tuple[str, str]) -> pd.DataFrame:
    """JSON lines, ids kept as the text they were written as. pandas' reader infers a column's
    type: one `1.5` among integer ids made every id a float ("3" became "3.0"), and ids beyond 2**53
    merged into one another. orjson reads a file whose ids are all strings or integers (exact at
    any size it accepts); any other file is read with every number kept as its text, which is six
    times slower and names the line of anything that is not a JSON object."""
    with _OPENERS.get(path.suffix, open)(path, "rb") as lines:
        try:
            records = [orjson.loads(line) for line in lines if line.strip()]
        except orjson.JSONDecodeError:
            records = None
    plain = records is not None and all(
        type(record) is dict and all(type(record.get(column, "")) in (str, int) for column in id_columns)
        for record in records)
    return pd.DataFrame.from_records(records if plain else _json_lines_as_text(path))


def _json_lines_as_text(path: Path) -> list[dict[str, object]]:
    """Every record of a JSON-lines file, numbers kept as their text (the numeric columns are
    converted later, with their row named when a value is not a number)."""
    records = []
    with _OPENERS.get(path.suffix, open)(path, "rt", encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_int=str, parse_float=str, parse_constant=_reject_constant)
            except ValueError as exc:
                raise ValueError(f"{path} line {number}: not a JSON value ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            _refuse_lone_surrogates(record, path, number)
            records.append(record)
    return records


def _refuse_lone_surrogates(record: dict[str, object], path: Path, number: int) -> None:
    """`"\\ud800"` is valid JSON but no text (orjson refuses it, the standard parser does not):
    pandas' strings then failed on it with "surrogates not allowed", naming no line."""
    for field, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path} line {number}: {field} {value[:40]!r} holds a lone surrogate "
                                 "(an escaped \\ud800-\\udfff without its pair), which is not text") from None


def _id_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """An id column as strings. A missing or empty id is an error naming its row: as text it would
    become one more id ("nan", ""), and a missing value in a JSON column of numbers would also turn
    every other id of the column into a float ("30.0" for 30)."""
    column = frame[name]
    ids = column.astype(str).to_numpy(dtype=object)
    missing = column.isna().to_numpy() | (ids == "")
    if missing.any():
        row = int(np.argmax(missing))
        raise ValueError(f"column {name!r} row {row}: the id is missing or empty "
                         f"({int(missing.sum())} of {len(missing)} rows)")
    return ids


def _numeric_column(frame: pd.DataFrame, name: str, required: bool) -> np.ndarray:
    if name not in frame.columns:
        if required:
            raise ValueError(f"log has no {name!r} column (columns: {list(frame.columns)}); use --map")
        return np.full(len(frame), np.nan)
    raw = frame[name].replace("", np.nan)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"column {name!r} row {row}: {raw.iloc[row]!r} is not a number")
    if np.isinf(values).any():
        row = int(np.argmax(np.isinf(values)))
        raise ValueError(f"column {name!r} row {row}: {raw.iloc[row]!r} is not a finite number")
    if required and np.isnan(values).any():
        raise ValueError(f"column {name!r} has empty values")
    return values


EPOCH_UNITS = ((1e17, 1e9, "nanoseconds"), (1e14, 1e6, "microseconds"), (1e11, 1e3, "milliseconds"))
"""(median magnitude from which, divisor, unit): epoch seconds reach 1e11 only in the year 5138."""
DATED_FROM = 1e8  # |t| from which a time is an epoch date in some unit (1973 in seconds): below, any unit fits


def _check_one_unit(values: np.ndarray, path: Path) -> None:
    """Refuse a numeric time column that mixes epoch units: the unit is chosen for the whole
    column from its median, so a log with 40% of its times in milliseconds kept them as seconds
    (the year 55,000: every user's latest events, the topn test split) and one with half of
    them converted moved the rest to January 1970, each with exit 0. The units' ranges do not
    overlap from 1973 on (seconds reach 1e11 in the year 5138), so two of them in one column are
    two exports mixed, not a long log."""
    magnitude = np.abs(values)
    dated = magnitude >= DATED_FROM
    unit_of = np.searchsorted(np.array([1e11, 1e14, 1e17]), magnitude, side="right")  # 0: s, 1: ms, 2: us, 3: ns
    units = np.unique(unit_of[dated])
    if len(units) > 1:
        names = ("seconds", "milliseconds", "microseconds", "nanoseconds")
        found = ", ".join(f"{int(((unit_of == u) & dated).sum()):,} in epoch {names[u]} (the first at row "
                          f"{int(np.argmax((unit_of == u) & dated))})" for u in units.tolist())
        raise ValueError(f"{path}: column 'timestamp' mixes time units: {found}; write every time in one unit")


def _datetime_seconds(column: pd.Series) -> np.ndarray:
    """Datetimes (naive ones read as UTC) as float epoch seconds, whatever their resolution. The
    subtraction runs in the column's own unit: pandas reads `2300-01-01` in microseconds, and
    subtracting a nanosecond epoch raised OutOfBoundsDatetime, reported as "is not a number"."""
    times = pd.to_datetime(column, utc=True).dt.tz_localize(None).to_numpy()
    return (times - np.datetime64(0, "s")) / np.timedelta64(1, "s")


def _timestamp_column(frame: pd.DataFrame, path: Path) -> np.ndarray:
    """Event times as epoch seconds. Datetime columns (Parquet's, pandas') and ISO 8601 text are
    converted; numbers whose median magnitude is that of epoch milliseconds, microseconds or
    nanoseconds are divided down to seconds, announced on stderr, so that the same log gives the
    same times whichever unit its exporter chose (time-aware models count days, and the parameter
    server refuses event times a day or more in the future)."""
    column = frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        values = _datetime_seconds(column)
    else:
        try:
            values = _numeric_column(frame, "timestamp", required=True)
        except ValueError as not_numbers:
            text = column.replace("", np.nan)
            try:
                values = _datetime_seconds(pd.to_datetime(text, utc=True, format="ISO8601"))
            except (ValueError, TypeError):
                raise not_numbers from None
            print(f"note: {path}: timestamps read as ISO 8601 dates", file=sys.stderr)
    if np.isnan(values).any():
        raise ValueError(f"column 'timestamp' row {int(np.argmax(np.isnan(values)))}: the time is missing")
    if not pd.api.types.is_datetime64_any_dtype(column.dtype):
        _check_one_unit(values, path)
    magnitude = float(np.median(np.abs(values))) if len(values) else 0.0
    for bound, divisor, unit in EPOCH_UNITS:
        if magnitude >= bound:
            print(f"note: {path}: timestamps look like epoch {unit}; divided by {divisor:.0e} to seconds",
                  file=sys.stderr)
            return values / divisor
    return values


def load_log(
    path: str | Path, fmt: str = "ml-100k", mapping: dict[str, str] | None = None, sort: bool = True,
    require_timestamp: bool = False,
) -> InteractionLog:
    """Read a log file (or an ml-100k / ml-latest folder) into time order.

    Columns: user_id and item_id required; rating and event_type optional; without a timestamp
    column the rows keep the file's order (row position as time, announced on stderr), unless
    `require_timestamp`: replay publishes each event at its time, and positions 0, 1, 2 ... are
    not times any event may carry (every event was dead-lettered), so it refuses such a log.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such log: {path}")
    if path.is_dir() and fmt in ("csv", "jsonl", "sessions"):
        raise ValueError(f"{path} is a folder; --format {fmt} reads one file")
    frame = _read_frame(path, fmt, mapping)
    if not len(frame):
        raise ValueError(f"{path} holds no events")
    for name in ("user_id", "item_id"):
        if name not in frame.columns:
            raise ValueError(f"log has no {name!r} column (columns: {list(frame.columns)}); use --map")
    if "timestamp" not in frame.columns and require_timestamp:
        raise ValueError(f"{path} has no timestamp column (columns: {list(frame.columns)}), and each event "
                         "needs its time here; name the column with --map timestamp=COLUMN")
    if "timestamp" not in frame.columns:  # no times: the file's order is the order of events
        print(f"note: {path} has no timestamp column; using each row's position as its time", file=sys.stderr)
        frame = frame.assign(timestamp=np.arange(len(frame), dtype=np.float64))
    log = InteractionLog(
        user_id=_id_column(frame, "user_id"),
        item_id=_id_column(frame, "item_id"),
        rating=_numeric_column(frame, "rating", required=False),
        timestamp=_timestamp_column(frame, path),
        event_type=(
            frame["event_type"].astype(str).to_numpy(dtype=object)
            if "event_type" in frame.columns
            else None
        ),
        source=str(path),
    )
    return log.take(time_order(log)) if sort else log


def parse_map_option(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`("user_id=userId,item_id=movieId", "rating=stars")` -> {"user_id": "userId", ...}."""
    mapping: dict[str, str] = {}
    for chunk in values:
        for pair in chunk.split(","):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"bad --map entry {pair!r}; expected field=column")
            mapping[key.strip()] = value.strip()
    return mapping
