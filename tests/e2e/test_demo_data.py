"""Where `streamrec demo` takes its data from: `--data`, $STREAMREC_DEMO_DATA, the cached ml-100k, a
download of it, else the built-in synthetic log, so a fresh clone runs even offline."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from streamrec.app.demo_cli import demo_data
from streamrec.core.net import free_port
from streamrec.stream.loaders import load_log


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads go through a proxy nobody listens on: the machine is offline for this test."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STREAMREC_DEMO_DATA", raising=False)


@pytest.mark.usefixtures("offline")
def test_offline_without_data_the_builtin_synthetic_log_is_replayed(tmp_path, capsys):
    path, fmt = demo_data(None, "ml-100k", tmp_path)
    err = capsys.readouterr().err
    assert fmt == "csv" and "built-in synthetic log" in err and "no download" in err
    assert err.count("\n") == 1  # one line says why
    log = load_log(path, fmt)
    assert len(log) == 20_000 and log.user_id[0].startswith("u")
    assert not (tmp_path / "datasets" / "ml-100k").exists()


@pytest.mark.usefixtures("offline")
def test_the_cached_movielens_comes_before_a_download(ml100k, datasets_home, capsys):
    assert demo_data(None, "csv", datasets_home) == (ml100k, "ml-100k")
    assert capsys.readouterr().err == ""


def test_the_environment_and_the_flag_come_first(tmp_path, monkeypatch, ml100k, datasets_home):
    folder = tmp_path / "mine"
    folder.mkdir()
    monkeypatch.setenv("STREAMREC_DEMO_DATA", str(folder))
    assert demo_data(None, "ml-100k", tmp_path) == (folder, "ml-100k")
    assert demo_data("synthetic", "ml-100k", tmp_path)[1] == "csv"
    assert demo_data("ml-100k", "csv", datasets_home) == (ml100k, "ml-100k")  # a data-set name
    monkeypatch.setenv("STREAMREC_DEMO_DATA", "ml-100k")
    assert demo_data(None, "csv", datasets_home) == (ml100k, "ml-100k")
    with pytest.raises(click.ClickException, match="no demo data"):
        demo_data(str(tmp_path / "missing"), "ml-100k", tmp_path)


def test_the_resolved_folder_is_an_ml100k_log(ml100k: Path):
    assert len(load_log(ml100k, "ml-100k")) == 100_000
