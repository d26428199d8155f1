"""Log formats the loaders read: ml-1m's `::` files, browsing sessions, and logs without times;
and what they refuse: missing ids and values that are not finite."""

from __future__ import annotations

import json
from pathlib import Path

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
