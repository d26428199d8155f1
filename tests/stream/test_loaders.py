"""Log formats the loaders read: ml-1m's `::` files, browsing sessions, and logs without times."""

from __future__ import annotations

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
