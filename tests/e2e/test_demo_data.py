"""Where `streamrec demo` takes its data from: a fresh clone needs nothing beside it."""

from __future__ import annotations

import click
import pytest

from streamrec.app.demo_cli import demo_data
from streamrec.stream.loaders import load_log


def test_without_data_the_builtin_synthetic_log_is_replayed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STREAMREC_DEMO_DATA", raising=False)
    path, fmt = demo_data(None, "ml-100k", tmp_path)
    assert fmt == "csv" and "built-in synthetic log" in capsys.readouterr().err
    log = load_log(path, fmt)
    assert len(log) == 20_000 and log.user_id[0].startswith("u")


def test_the_environment_and_the_flag_come_first(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    monkeypatch.setenv("STREAMREC_DEMO_DATA", str(folder))
    assert demo_data(None, "ml-100k", tmp_path) == (folder, "ml-100k")
    assert demo_data("synthetic", "ml-100k", tmp_path)[1] == "csv"
    with pytest.raises(click.ClickException, match="no demo data"):
        demo_data(str(tmp_path / "missing"), "ml-100k", tmp_path)
