"""Log formats the loaders read: ml-1m's `::` files, browsing sessions, and logs without times;
and what they refuse: missing ids and values that are not finite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from streamrec.stream.loaders import load_log


def test_ml1m_ratings_dat(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    log = load_log(tmp_path, "ml-1m")
    assert list(zip(log.user_id, log.item_id, log.rating)) == [("2", "1193", 4.0), ("1", "1193", 5.0), ("1", "661", 3.0)]
    assert log.timestamp.tolist() == sorted(log.timestamp.tolist())


def test_sessions_take_the_place_of_users(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("session_id,item_id,timestamp,user_id\ns:1,a,3,alice\ns:1,b,4,alice\ns:2,a,1,bob\n")
    log = load_log(path, "sessions")
    assert list(zip(log.user_id, log.item_id)) == [("s:2", "a"), ("s:1", "a"), ("s:1", "b")]
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\nu,a,1\n")
    with pytest.raises(ValueError, match="session_id"):
        load_log(tmp_path / "bad.csv", "sessions")


def test_a_log_without_timestamps_keeps_its_file_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id\nu2,z\nu1,y\nu2,x\n")
    log = load_log(path, "csv")
    assert list(zip(log.user_id, log.item_id)) == [("u2", "z"), ("u1", "y"), ("u2", "x")]
    assert log.timestamp.tolist() == [0.0, 1.0, 2.0]
    assert "no timestamp column" in capsys.readouterr().err


def test_a_missing_or_empty_id_is_an_error_naming_its_row(tmp_path: Path) -> None:
    """As text a missing id would become one more id ("nan", ""), and a null among JSON numbers
    would turn every other id of the column into a float ("30.0" for 30)."""
    rows = [{"user_id": 30, "item_id": 7, "timestamp": 1}, {"user_id": 31, "item_id": 8, "timestamp": 2}]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_log(good, "jsonl").user_id.tolist() == ["30", "31"]  # numbers keep their text
    for name in ("user_id", "item_id"):
        bad = tmp_path / f"no_{name}.jsonl"
        bad.write_text("\n".join(json.dumps({k: v for k, v in r.items() if (k, n) != (name, 1)})
                                 for n, r in enumerate(rows)) + "\n")
        with pytest.raises(ValueError, match=f"column '{name}' row 1: the id is missing or empty"):
            load_log(bad, "jsonl")
    empty = tmp_path / "empty.csv"
    empty.write_text("user_id,item_id,timestamp\nu1,i1,1\n,i2,2\n")
    with pytest.raises(ValueError, match="column 'user_id' row 1"):
        load_log(empty, "csv")


def test_an_infinite_value_is_an_error(tmp_path: Path) -> None:
    """`inf` parses as a number; as a weight it used to become 1, as a time it breaks the order."""
    for column, header in (("rating", "user_id,item_id,rating,timestamp\nu1,i1,inf,1\n"),
                           ("timestamp", "user_id,item_id,rating,timestamp\nu1,i1,1,-inf\n")):
        path = tmp_path / f"{column}.csv"
        path.write_text(header)
        with pytest.raises(ValueError, match=f"column '{column}' row 0: .* is not a finite number"):
            load_log(path, "csv")


def test_json_ids_keep_the_text_they_were_written_as(tmp_path: Path) -> None:
    """pandas inferred a column's type: one 1.5 among integer ids made every id a float ("3" became
    "3.0"), ids beyond 2**53 merged into one another, and 20-digit ids were refused."""
    big = 2**53
    rows = [{"user_id": big + n, "item_id": n % 3, "timestamp": n} for n in range(4)]
    rows += [{"user_id": 1.5, "item_id": 3, "timestamp": 9}, {"user_id": 12345678901234567890123, "item_id": "x",
                                                             "timestamp": 10}]
    path = tmp_path / "ids.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n\n")
    log = load_log(path, "jsonl")
    assert sorted(set(log.user_id)) == sorted({str(big + n) for n in range(4)} | {"1.5", "12345678901234567890123"})
    assert set(log.item_id) == {"0", "1", "2", "3", "x"}
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_log(tmp_path / "list.jsonl", "jsonl")
    (tmp_path / "nan.jsonl").write_text('{"user_id": 1, "item_id": 2, "timestamp": NaN}\n')
    with pytest.raises(ValueError, match="line 1: not a JSON value"):
        load_log(tmp_path / "nan.jsonl", "jsonl")


@pytest.mark.parametrize(("unit", "factor"), [("seconds", 1), ("milliseconds", 10**3), ("microseconds", 10**6),
                                              ("nanoseconds", 10**9)])
def test_epoch_times_in_finer_units_are_read_as_seconds(tmp_path: Path, unit: str, factor: int,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Time-aware models count days and the parameter server refuses times a day ahead of now: a log
    exported in milliseconds was refused by the prequential protocol and broke timeSVD++."""
    seconds = [1_700_000_000, 1_700_000_060, 1_700_086_400]
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u,i{n},{s * factor}\n" for n, s in enumerate(seconds)))
    assert load_log(path, "csv").timestamp.tolist() == seconds
    assert (f"epoch {unit}" in capsys.readouterr().err) == (factor > 1)


def test_a_time_column_that_mixes_units_is_refused(tmp_path: Path) -> None:
    """The unit is chosen from the column's median: with 40% of the times in milliseconds they were
    kept as seconds (the year 55,000, every user's test item in topn), with half of them the other
    half was divided into January 1970; both exited 0. Small times (offsets, 1970-1973) fit any
    unit and stay allowed beside a dated unit."""
    seconds = [1_700_000_000 + 60 * n for n in range(10)]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{n % 3},i{n},{s * 1000 if n % 5 < 2 else s}\n" for n, s in enumerate(seconds)))
    with pytest.raises(ValueError, match=r"mixes time units: 6 in epoch seconds \(the first at row 2\), "
                                         r"4 in epoch milliseconds \(the first at row 0\)"):
        load_log(mixed, "csv")
    offsets = tmp_path / "offsets.csv"
    offsets.write_text("user_id,item_id,timestamp\nu,a,0\nu,b,5000\nu,c,1700000000\n")
    assert load_log(offsets, "csv").timestamp.tolist() == [0.0, 5000.0, 1_700_000_000.0]


def test_dates_are_read_as_epoch_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "dates.csv"
    csv.write_text("user_id,item_id,timestamp\nu,a,2023-11-14T22:13:20Z\nu,b,2023-11-14 22:14:20\n")
    assert load_log(csv, "csv").timestamp.tolist() == [1_700_000_000.0, 1_700_000_060.0]
    assert "ISO 8601" in capsys.readouterr().err
    parquet = tmp_path / "dates.parquet"
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"],
                  "timestamp": pd.to_datetime([1_700_000_000, 1_700_000_060], unit="s").as_unit("us")}
                 ).to_parquet(parquet)
    assert load_log(parquet, "parquet").timestamp.tolist() == [1_700_000_000.0, 1_700_000_060.0]
    csv.write_text("user_id,item_id,timestamp\nu,a,2023-11-14\nu,b,yesterday\n")
    with pytest.raises(ValueError, match="column 'timestamp' row 0: '2023-11-14' is not a number"):
        load_log(csv, "csv")


def test_a_log_without_events_or_a_folder_for_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(ValueError, match="holds no events"):
        load_log(tmp_path / "header.csv", "csv")
    with pytest.raises(ValueError, match="is a folder; --format csv reads one file"):
        load_log(tmp_path, "csv")


def test_a_movielens_file_with_a_bad_value_or_a_csv_read_as_movielens_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t10\t5\t881250949\n2\t20\tx\t881250950\n")
    with pytest.raises(ValueError, match="column 'rating' row 1: 'x' is not a number"):
        load_log(tmp_path, "ml-100k")
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\nu,a,1\n")
    with pytest.raises(ValueError, match="looks like a csv file, but --format is ml-100k .*add --format csv"):
        load_log(tmp_path / "log.csv", "ml-100k")


def test_json_ids_under_their_own_names_are_checked_as_ids(tmp_path: Path) -> None:
    """The fast reader takes a file whose ids are strings or integers; a float id under a mapped
    name sends it to the reader that keeps each number's text."""
    path = tmp_path / "mapped.jsonl"
    path.write_text('{"uid": 7, "sku": "a", "timestamp": 1}\n{"uid": 7.0, "sku": 8, "timestamp": 2}\n')
    log = load_log(path, "jsonl", {"user_id": "uid", "item_id": "sku"})
    assert log.user_id.tolist() == ["7", "7.0"] and log.item_id.tolist() == ["a", "8"]


def test_integer_ids_beyond_float_precision_order_exactly_whatever_the_file_order(tmp_path: Path) -> None:
    """64-bit ids (above 2**53) compared as float64: neighbours compared equal, and the order of
    events with one timestamp followed the file's, so the same log read in another row order was
    replayed in another order (prequential figures moved from 0.446 to 0.366)."""
    rows = [(2**60 + u, 2**62 + i, 1e9) for u in range(5) for i in range(4)] + [("007", 1, 1e9), ("7", 1, 1e9)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame.to_csv(tmp_path / "forward.csv", index=False)
    frame.iloc[::-1].to_csv(tmp_path / "reverse.csv", index=False)
    forward, reverse = (load_log(tmp_path / name, "csv") for name in ("forward.csv", "reverse.csv"))
    assert list(zip(forward.user_id, forward.item_id)) == list(zip(reverse.user_id, reverse.item_id))
    assert forward.user_id.tolist() == ["007", "7"] + [str(2**60 + u) for u in range(5) for _ in range(4)]
    assert forward.item_id[2:6].tolist() == [str(2**62 + i) for i in range(4)]


def test_integer_ids_longer_than_pythons_int_limit_order_like_shorter_ones(tmp_path: Path) -> None:
    """`int()` refuses strings of more than 4,300 digits: one such id made the whole log unreadable
    (ValueError: Exceeds the limit). The order is that of (integer value, text) for every id."""
    huge = "9" * 5000
    users = [huge, "1" + "0" * 4999, "-" + huge, "-1" + "0" * 4999, "007", "7", "+7", "-7", "-007", "0", "-0", "00",
             "12", "-12", "3", "٣"]  # "٣" is an Arabic-Indic 3: `int` reads it, so it is an integer too
    path = tmp_path / "huge.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},i,1000000000\n" for u in reversed(users)),
                    encoding="utf-8")
    log = load_log(path, "csv")
    expected = ["-" + huge, "-1" + "0" * 4999, "-12", "-007", "-7", "-0", "0", "00", "3", "٣", "+7", "007", "7", "12",
                "1" + "0" * 4999, huge]
    assert log.user_id.tolist() == expected
    short = [u for u in users if len(u) < 10]
    assert [u for u in expected if len(u) < 10] == sorted(short, key=lambda u: (int(u), u))  # as before


def test_ids_that_read_like_missing_values_are_ids_in_every_format(tmp_path: Path) -> None:
    """pandas reads "NA", "null" or "nan" as missing unless told not to: the ml-100k and
    ml-latest formats refused such ids as "missing or empty", where csv takes them."""
    ids = ["NA", "null", "nan", "None", "n/a"]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t3\t{900 + n}\n" for n, (u, i) in enumerate(zip(ids, ids[::-1]))))
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},3.5,{900 + n}\n" for n, (u, i) in enumerate(zip(ids, ids[::-1]))))
    for fmt in ("ml-100k", "ml-latest"):
        log = load_log(tmp_path, fmt)
        assert log.user_id.tolist() == ids and log.item_id.tolist() == ids[::-1], fmt


@pytest.mark.parametrize("fmt", ["csv", "sessions", "ml-latest"])
def test_a_trailing_comma_on_each_data_row_does_not_shift_the_columns(tmp_path: Path, fmt: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Rows with one field more than the header made pandas take the first field as the index:
    every column moved one to the left (item ids read as users, ratings as items), exit 0."""
    header = {"csv": "user_id,item_id,rating,timestamp", "sessions": "session_id,item_id,rating,timestamp",
              "ml-latest": "userId,movieId,rating,timestamp"}[fmt]
    rows = [(f"u{n % 7}", f"i{n % 11}", 1 + n % 5, 1000 + n) for n in range(40)]
    plain, trailing = tmp_path / "plain.csv", tmp_path / "trailing.csv"
    plain.write_text(header + "\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    trailing.write_text(header + "\n" + "".join(f"{u},{i},{r},{t},\n" for u, i, r, t in rows))
    expected, read = load_log(plain, fmt), load_log(trailing, fmt)
    assert (len(set(read.user_id)), len(set(read.item_id))) == (7, 11)
    assert read.user_id.tolist() == expected.user_id.tolist() and read.rating.tolist() == expected.rating.tolist()
    assert "fields past the header's are ignored" in capsys.readouterr().err


@pytest.mark.parametrize(("fmt", "name", "sep"), [("ml-100k", "u.data", "\t"), ("ml-1m", "ratings.dat", "::")])
def test_a_movielens_file_without_exactly_four_fields_is_refused_naming_the_line(tmp_path: Path, fmt: str, name: str,
                                                                                 sep: str) -> None:
    """A 5th column on every line of u.data shifted every column (users read from the item field),
    and ratings.dat's was dropped without a word."""
    rows = [("1", "10", "5", "881250949"), ("2", "20", "3", "881250950"), ("3", "30", "4", "881250951")]
    path = tmp_path / name
    path.write_text("".join(sep.join((*row, "0")) + "\n" for row in rows))
    with pytest.raises(ValueError, match=f"{name} line 1: 5 fields; {fmt} lines hold exactly 4 fields"):
        load_log(tmp_path, fmt)
    path.write_text("".join(sep.join((*row, "0")[: 4 + (n == 2)]) + "\n" for n, row in enumerate(rows)))
    with pytest.raises(ValueError, match=f"{name} line 3: 5 fields; {fmt} lines hold exactly 4 fields"):
        load_log(tmp_path, fmt)
    path.write_text("".join(sep.join(row[:3]) + "\n" for row in rows))
    with pytest.raises(ValueError, match=f"{name} line 1: 3 fields"):
        load_log(tmp_path, fmt)
    path.write_text("".join(sep.join(row) + "\n" for row in rows))
    assert load_log(tmp_path, fmt).user_id.tolist() == ["1", "2", "3"]


def test_map_applies_to_sessions_and_ml_latest(tmp_path: Path) -> None:
    """Both formats returned before the renames: the error then asked for the very --map given."""
    sessions = tmp_path / "sessions.csv"
    sessions.write_text("session_id,item_id,ts\ns1,a,1\ns1,b,2\ns2,a,3\ns2,c,4\n")
    log = load_log(sessions, "sessions", {"timestamp": "ts"})
    assert log.user_id.tolist() == ["s1", "s1", "s2", "s2"] and log.timestamp.tolist() == [1, 2, 3, 4]
    latest = tmp_path / "ratings.csv"
    latest.write_text("userId,movieId,stars,when\n1,10,4,100\n2,10,3,50\n")
    log = load_log(latest, "ml-latest", {"rating": "stars", "timestamp": "when"})
    assert log.rating.tolist() == [3.0, 4.0] and log.timestamp.tolist() == [50, 100]


@pytest.mark.parametrize(("header", "mapping", "message"), [
    ("user_id,uid,item_id,timestamp", {"user_id": "uid"}, "--map user_id=uid: the log has a column of that name"),
    ("x,item_id,timestamp", {"user_id": "x", "item_id": "x"}, "names the column(s) ['x'] for more than one field"),
])
def test_a_mapping_that_would_make_two_columns_of_one_name_is_refused(tmp_path: Path, header: str, mapping: dict,
                                                                      message: str) -> None:
    path = tmp_path / "log.csv"
    path.write_text(header + "\n" + "\n".join(",".join(["1"] * len(header.split(","))) for _ in range(3)) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_log(path, "csv", mapping)


def test_map_may_swap_or_chain_columns(tmp_path: Path) -> None:
    """pandas renames every column at once: a rename onto a column renamed away is no collision."""
    path = tmp_path / "log.csv"
    path.write_text("customer,user_id,timestamp\nc1,p1,1\nc2,p2,2\n")
    chained = load_log(path, "csv", {"user_id": "customer", "item_id": "user_id"})
    assert chained.user_id.tolist() == ["c1", "c2"] and chained.item_id.tolist() == ["p1", "p2"]
    path.write_text("item_id,user_id,timestamp\nc1,p1,1\nc2,p2,2\n")
    swapped = load_log(path, "csv", {"user_id": "item_id", "item_id": "user_id"})
    assert swapped.user_id.tolist() == ["c1", "c2"] and swapped.item_id.tolist() == ["p1", "p2"]


def test_map_is_refused_for_a_format_with_fixed_columns(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n")
    with pytest.raises(ValueError, match="--map does not apply to --format ml-100k"):
        load_log(path, "ml-100k", {"timestamp": "when"})


def test_iso_dates_outside_pandas_nanosecond_range_are_read(tmp_path: Path) -> None:
    """pandas reads 2300-01-01 in microseconds; subtracting a nanosecond epoch raised, and the
    date was reported as "is not a number"."""
    path = tmp_path / "dates.csv"
    path.write_text("user_id,item_id,timestamp\nu1,a,2300-01-01T00:00:00Z\nu1,b,2021-01-01T00:00:00Z\n"
                    "u2,a,2021-01-02T00:00:00Z\nu3,c,1600-01-01T00:00:00+01:00\n")
    log = load_log(path, "csv")
    assert log.timestamp.tolist() == [-11676099600.0, 1609459200.0, 1609545600.0, 10413792000.0]



def test_a_json_lines_id_with_a_lone_surrogate_is_refused_naming_its_line(tmp_path: Path) -> None:
    """`"\\ud800"` is valid JSON that orjson refuses; the text reader took it, and pandas' strings
    then failed with "surrogates not allowed", naming no line."""
    path = tmp_path / "weird.jsonl"
    path.write_text('{"user_id": "u1", "item_id": "i1", "timestamp": 1}\n'
                    '{"user_id": "\\ud800x", "item_id": "i1", "timestamp": 2}\n')
    with pytest.raises(ValueError, match=r"weird.jsonl line 2: user_id '\\ud800x' holds a lone surrogate"):
        load_log(path, "jsonl")
