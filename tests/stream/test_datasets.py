"""`streamrec datasets`: downloads against a real HTTP server on loopback, the verified cache, safe
extraction, local imports, `--data NAME` resolution, and the MovieLens fixture's CI rule."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.core.net import free_port
from streamrec.stream.datasets import cache
from streamrec.stream.datasets.archive import extract
from streamrec.stream.datasets.catalogue import CATALOGUE, Dataset, DatasetError
from streamrec.stream.datasets.resolve import DataSource, resolve_data
from streamrec.stream.datasets.store import fetch_dataset, import_dataset
from streamrec.stream.loaders import load_log
from tests.conftest import REPO

U_DATA = b"1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250951\n"
README = b"a toy data set for tests\n"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


GOOD = _zip({"toy/u.data": U_DATA, "toy/README": README})
TAMPERED = GOOD[:40] + bytes([GOOD[40] ^ 0xFF]) + GOOD[41:]  # same size, other bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HUGE = 64 * 2**20  # what /endless.zip and /liar.zip would send when read to the end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: Counter[str]
    sent: Counter[str]  # body bytes written per path, until the client hung up
    done: defaultdict[str, threading.Event]  # set when the last request of a path ended
    released: threading.Event


class _Handler(BaseHTTPRequestHandler):
    """/good.zip, /tampered.zip, /short.zip (announces the archive's size, sends half, then closes),
    /slow.zip (no answer until the test ends), /endless.zip (the archive, then zeros up to HUGE,
    with no length announced) and /liar.zip (announces HUGE bytes and sends them)."""

    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.server.sent[self.path] += len(data)

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        try:
            if self.path == "/slow.zip":
                self.server.released.wait(30)
                return
            if self.path in ("/endless.zip", "/liar.zip"):
                self.send_response(200)
                if self.path == "/liar.zip":
                    self.send_header("Content-Length", str(HUGE))
                self.end_headers()
                self._send(GOOD if self.path == "/endless.zip" else b"")
                while self.server.sent[self.path] < HUGE:
                    self._send(b"\0" * 2**20)
                return
            body = {"/good.zip": GOOD, "/tampered.zip": TAMPERED, "/short.zip": GOOD}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._send(body[: len(body) // 2] if self.path == "/short.zip" else body)
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.done[self.path].set()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.hits, httpd.sent, httpd.done, httpd.released = Counter(), Counter(), defaultdict(threading.Event), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.released.set()
    httpd.shutdown()
    httpd.server_close()


def _toy(url: str) -> Dataset:
    """A test-only catalogue entry pinning the archive and its files."""
    return Dataset(name="toy", title="toy", url=url, format="ml-100k", license="test data", size=len(GOOD),
                   archive_sha256=_sha(GOOD), files={"u.data": _sha(U_DATA), "README": _sha(README)}, folder="toy")


def _url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _nothing_cached(home: Path) -> None:
    """No copy, and no staging folder or partial file left behind: only the lock file."""
    assert sorted(p.name for p in cache.cache_root(home).iterdir()) == [".toy.lock"]


# ---------------------------------------------------------------- downloads
def test_a_good_archive_is_downloaded_verified_and_cached_once(server, tmp_path):
    entry = _toy(_url(server, "/good.zip"))
    path, downloaded = fetch_dataset(entry, tmp_path)
    assert downloaded and path == tmp_path / "datasets" / "toy"
    assert (path / "u.data").read_bytes() == U_DATA
    record = cache.manifest(tmp_path, "toy")
    assert record is not None and record["archive_sha256"] == _sha(GOOD) and record["source"] == entry.url
    assert len(load_log(path, "ml-100k")) == 3
    hits = server.hits["/good.zip"]
    assert fetch_dataset(entry, tmp_path) == (path, False)  # cached: no second download
    assert server.hits["/good.zip"] == hits
    assert sorted(p.name for p in cache.cache_root(tmp_path).iterdir()) == [".toy.lock", "toy"]


def test_a_checksum_mismatch_is_refused_and_nothing_is_cached(server, tmp_path):
    with pytest.raises(DatasetError, match=f"SHA-256 {_sha(TAMPERED)}, expected {_sha(GOOD)}"):
        fetch_dataset(_toy(_url(server, "/tampered.zip")), tmp_path)
    _nothing_cached(tmp_path)


def test_a_wrong_file_inside_a_good_looking_archive_is_refused(server, tmp_path):
    entry = replace(_toy(_url(server, "/good.zip")), files={"u.data": _sha(b"other")})
    with pytest.raises(DatasetError, match="u.data has SHA-256"):
        fetch_dataset(entry, tmp_path)
    _nothing_cached(tmp_path)


def test_an_interrupted_transfer_is_refused_and_nothing_is_cached(server, tmp_path):
    with pytest.raises(DatasetError, match="interrupted"):
        fetch_dataset(_toy(_url(server, "/short.zip")), tmp_path)
    _nothing_cached(tmp_path)


@pytest.mark.parametrize(("path", "reason"), [("/endless.zip", "sends more than the expected"),
                                               ("/liar.zip", f"announces {HUGE:,} bytes")])
def test_a_download_past_the_pinned_size_is_cut_off_at_once(server, tmp_path, path, reason):
    """Without a bound, a server (a bad mirror, a redirect) that sent more than the pinned size was
    read to its end, onto the disk, and refused only then: 300 MB written for a 4.9 MB archive."""
    entry = _toy(_url(server, path))
    with pytest.raises(DatasetError, match=f"{reason}.*{entry.size:,}"):
        fetch_dataset(entry, tmp_path)
    _nothing_cached(tmp_path)
    assert server.done[path].wait(30)
    assert server.sent[path] < HUGE / 4  # the client hung up; what is left is the socket buffers


def test_an_unreachable_host_fails_at_once(tmp_path):
    closed = free_port()  # nothing listens there
    entry = _toy(f"http://127.0.0.1:{closed}/toy.zip")
    with pytest.raises(DatasetError, match=f"cannot download http://127.0.0.1:{closed}/toy.zip: .*refused"):
        fetch_dataset(entry, tmp_path)
    _nothing_cached(tmp_path)


def test_a_silent_server_hits_the_read_timeout(server, tmp_path):
    with pytest.raises(DatasetError, match="read timeout"):
        fetch_dataset(_toy(_url(server, "/slow.zip")), tmp_path, timeout=httpx.Timeout(5.0, read=0.3))
    _nothing_cached(tmp_path)


def test_concurrent_fetches_download_once_and_agree(server, tmp_path):
    entry = _toy(_url(server, "/good.zip"))
    before = server.hits["/good.zip"]
    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_dataset(entry, tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(downloaded for _, downloaded in results) == [False, False, False, True]
    assert {path for path, _ in results} == {tmp_path / "datasets" / "toy"}
    assert server.hits["/good.zip"] == before + 1
    assert (tmp_path / "datasets" / "toy" / "u.data").read_bytes() == U_DATA


# ---------------------------------------------------------------- extraction
@pytest.mark.parametrize("member", ["../evil", "toy/../../evil", "/abs/evil", "C:/evil", "toy\\..\\evil"])
def test_members_that_escape_the_target_are_refused(tmp_path, member):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"toy/u.data": U_DATA, member: b"x"}))
    with pytest.raises(DatasetError, match="refused"):
        extract(archive, tmp_path / "out", "toy", 1 << 20)
    assert not (tmp_path / "evil").exists() and not list((tmp_path / "out").glob("**/*"))


def test_extraction_is_capped(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip({"toy/u.data": b"\0" * 200_000}))
    assert archive.stat().st_size < 2_000
    with pytest.raises(DatasetError, match="over the 100,000 cap"):
        extract(archive, tmp_path / "out", "toy", 100_000)


def _zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """`_zip`, but members may repeat a name (zipfile warns, and writes both)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, method)
    return buffer.getvalue()


def _method(data: bytes, method: int) -> bytes:
    """The stored archive `data` with every member's compression method set to `method` in its local
    and central headers (zipfile cannot write deflate64, 9, but an archive found online can use it)."""
    raw = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = raw.find(signature)
        while at >= 0:
            raw[at + offset:at + offset + 2] = method.to_bytes(2, "little")
            at = raw.find(signature, at + 4)
    return bytes(raw)


@pytest.mark.parametrize(("members", "reason"), [
    ([("toy/u.data", U_DATA), ("toy/u.data/x", b"x")], "u.data both as a file and as a folder"),
    ([("toy/sub/x", b"x"), ("toy/sub", b"y"), ("toy/u.data", U_DATA)], "sub both as a file and as a folder"),
    ([("toy/u.data", U_DATA), ("toy/u.data", b"other")], "u.data twice"),
])
def test_members_that_collide_are_refused_before_anything_is_written(tmp_path, members, reason):
    """They raised FileExistsError or IsADirectoryError half way, past the one-line error handling
    (or, twice the same name, let the second member replace the first)."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_of(members))
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError, match=f"holds {reason}; refused"):
        extract(archive, tmp_path / "out", "toy", 1 << 20)
    assert not list((tmp_path / "out").iterdir())


def test_a_member_zipfile_cannot_read_is_a_dataset_error(tmp_path):
    """Compression method 9 (deflate64) raised NotImplementedError through `datasets import`."""
    archive = tmp_path / "deflate64.zip"
    archive.write_bytes(_method(_zip_of([("toy/u.data", U_DATA)], zipfile.ZIP_STORED), 9))
    with pytest.raises(DatasetError, match="member toy/u.data cannot be read: That compression method is not supported"):
        extract(archive, tmp_path / "out", "toy", 1 << 20)
    with pytest.raises(DatasetError, match="cannot be read"):
        import_dataset(replace(_toy("http://unused.invalid/toy.zip"), archive_sha256=None), archive, tmp_path / "home")


# ---------------------------------------------------------------- imports
def _folder(tmp_path: Path, data: bytes = U_DATA) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "u.data").write_bytes(data)
    (folder / "README").write_bytes(README)
    return folder


def test_a_verified_folder_or_zip_is_imported(tmp_path):
    entry = _toy("http://unused.invalid/toy.zip")
    path = import_dataset(entry, _folder(tmp_path), tmp_path / "home")
    assert (path / "u.data").read_bytes() == U_DATA and cache.is_cached(tmp_path / "home", entry)
    archive = tmp_path / "toy.zip"
    archive.write_bytes(GOOD)
    path = import_dataset(entry, archive, tmp_path / "home2")
    assert cache.manifest(tmp_path / "home2", "toy")["archive_sha256"] == _sha(GOOD)


def test_a_folder_of_links_is_imported_and_a_missing_file_is_named_in_the_users_folder(tmp_path):
    """DVC and git-annex check files out as symbolic links: they were skipped, and the import
    failed with "README is missing from <a staging folder that no longer exists>"."""
    entry, real = _toy("http://unused.invalid/toy.zip"), _folder(tmp_path)
    links = tmp_path / "links"
    links.mkdir()
    for name in ("u.data", "README"):
        (links / name).symlink_to(real / name)
    path = import_dataset(entry, links, tmp_path / "home")
    assert (path / "u.data").read_bytes() == U_DATA and not (path / "u.data").is_symlink()
    (links / "README").unlink()
    with pytest.raises(DatasetError, match=f"toy: README missing from {links}$"):
        import_dataset(entry, links, tmp_path / "home2")


def test_a_modified_copy_is_refused_and_the_cached_one_kept(tmp_path):
    entry, home = _toy("http://unused.invalid/toy.zip"), tmp_path / "home"
    import_dataset(entry, _folder(tmp_path), home)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "u.data").write_bytes(U_DATA + b"3\t30\t1\t881250952\n")
    (bad / "README").write_bytes(README)
    with pytest.raises(DatasetError, match="u.data has SHA-256"):
        import_dataset(entry, bad, home)
    tampered = tmp_path / "tampered.zip"
    tampered.write_bytes(TAMPERED)
    with pytest.raises(DatasetError, match="refused"):
        import_dataset(entry, tampered, home)
    assert (cache.cached_path(home, "toy") / "u.data").read_bytes() == U_DATA
    assert sorted(p.name for p in cache.cache_root(home).iterdir()) == [".toy.lock", "toy"]


def test_a_cached_copy_changed_after_its_install_is_not_used_and_a_fetch_repairs_it(server, tmp_path, monkeypatch):
    """A copy was trusted for its manifest alone: a u.data cut short or a file deleted after the
    install was still "cached", read by `--data NAME`, and kept by `datasets fetch`."""
    entry = _toy(_url(server, "/good.zip"))
    monkeypatch.setitem(CATALOGUE, "toy", entry)
    path, _ = fetch_dataset(entry, tmp_path)
    (path / "u.data").write_bytes(U_DATA.replace(b"\t5\t", b"\t1\t"))  # one rating changed: same size
    with pytest.raises(DatasetError, match=f"u.data in the cached copy {path} changed since it was installed"):
        resolve_data("toy", tmp_path, fetch=False)
    assert not cache.is_cached(tmp_path, entry)
    (path / "README").unlink()
    with pytest.raises(DatasetError, match=f"README is missing from the cached copy {path}: run `streamrec"):
        resolve_data("toy", tmp_path, fetch=False)
    hits = server.hits["/good.zip"]
    assert resolve_data("toy", tmp_path) == DataSource(path, "ml-100k", "toy")  # downloaded again
    assert server.hits["/good.zip"] == hits + 1
    assert (path / "u.data").read_bytes() == U_DATA and (path / "README").read_bytes() == README
    assert cache.is_cached(tmp_path, entry) and fetch_dataset(entry, tmp_path) == (path, False)
    (path / "u.data").unlink()
    assert fetch_dataset(entry, tmp_path) == (path, True)  # `datasets fetch` repairs it too
    assert (path / "u.data").read_bytes() == U_DATA
    assert sorted(p.name for p in cache.cache_root(tmp_path).iterdir()) == [".toy.lock", "toy"]


_REIMPORT = """
import sys
from pathlib import Path
from streamrec.stream.datasets.catalogue import Dataset
from streamrec.stream.datasets.store import import_dataset
import_dataset(Dataset(name="toy", title="toy", url="http://unused.invalid/toy.zip", format="ml-100k",
                       license="test", files={"u.data": sys.argv[3], "README": sys.argv[4]}),
               Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_reimport_killed_while_it_replaces_the_copy_leaves_a_whole_copy(tmp_path):
    """The old copy was removed in place (rmtree) before the new one was renamed in: a kill during
    the removal left part of it, with its manifest, and that half copy was used as the data set."""
    entry, home = _toy("http://unused.invalid/toy.zip"), tmp_path / "home"
    copies = {}
    for tag in ("old", "new"):  # many small files: removing a copy takes a while
        folder = tmp_path / tag
        folder.mkdir()
        (folder / "u.data").write_bytes(U_DATA)
        (folder / "README").write_bytes(README)
        for i in range(1000):
            (folder / f"{tag}{i:04}").write_bytes(tag.encode())
        copies[tag] = {p.name for p in folder.iterdir()} | {cache.MANIFEST}
    target = import_dataset(entry, tmp_path / "old", home)
    inode = target.stat().st_ino
    child = subprocess.Popen([sys.executable, "-c", _REIMPORT, str(tmp_path / "new"), str(home), _sha(U_DATA),
                              _sha(README)], cwd=REPO)
    try:
        while child.poll() is None:  # kill as soon as the old copy starts to go
            try:
                if target.stat().st_ino != inode or len(os.listdir(target)) < len(copies["old"]):
                    break
            except FileNotFoundError:
                break
    finally:
        child.kill()
        child.wait()
    with cache.locked(home, "toy"):  # what the next fetch or import does first: clear a killed one's leftovers
        pass
    assert set(os.listdir(target)) in (copies["old"], copies["new"])
    assert cache.is_cached(home, entry) and len(load_log(target, "ml-100k")) == 3
    assert sorted(p.name for p in cache.cache_root(home).iterdir()) == [".toy.lock", "toy"]


def test_the_cache_itself_is_not_a_source_and_a_copied_manifest_is_not_data(tmp_path):
    """`datasets import NAME <the cached folder>` recorded the cache as its source and hashed the
    old manifest as one of the files, which the new manifest then replaced."""
    entry, home = _toy("http://unused.invalid/toy.zip"), tmp_path / "home"
    cached = import_dataset(entry, _folder(tmp_path), home)
    with pytest.raises(DatasetError, match=f"{cached} is inside the data-set cache"):
        import_dataset(entry, cached, home)
    copied = shutil.copytree(cached, tmp_path / "copied")  # with the manifest of the copy it came from
    import_dataset(entry, copied, home)
    record = cache.manifest(home, "toy")
    assert record is not None and sorted(record["files"]) == ["README", "u.data"]
    assert record["source"] == str(copied.resolve()) and cache.is_cached(home, entry)


def test_a_folder_cannot_be_imported_when_only_the_archive_is_pinned(tmp_path):
    with pytest.raises(DatasetError, match=r"import the zip \(ml-1m.zip\)"):
        import_dataset(CATALOGUE["ml-1m"], _folder(tmp_path), tmp_path / "home")


# ---------------------------------------------------------------- --data PATH|NAME
def test_a_path_stays_a_path_and_a_name_resolves_to_the_cache(server, tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    assert resolve_data(str(folder), tmp_path) == DataSource(folder)
    monkeypatch.setitem(CATALOGUE, "toy", _toy(_url(server, "/good.zip")))
    with pytest.raises(DatasetError, match="not in the cache"):
        resolve_data("toy", tmp_path / "home", fetch=False)
    source = resolve_data("toy", tmp_path / "home")  # fetched on first use
    assert source == DataSource(tmp_path / "home" / "datasets" / "toy", "ml-100k", "toy")
    with pytest.raises(DatasetError, match="neither an existing file or folder nor a data set"):
        resolve_data("no-such-thing", tmp_path / "home")


# ---------------------------------------------------------------- the command
def _run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), "datasets", *args])
    return result.exit_code, result.output


def test_list_shows_the_movielens_sets_with_their_licences(tmp_path):
    code, out = _run(tmp_path, "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and {"ml-100k", "ml-1m"} <= set(rows)
    for name in ("ml-100k", "ml-1m"):
        row = rows[name]
        assert row["url"] == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert "Harper" in row["license"] and "no redistribution" in row["license"]
        assert row["size"] > 4_000_000 and len(row["archive_sha256"]) == 64 and row["cached"] is False


def test_fetch_through_the_command(server, tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOGUE, "toy", _toy(_url(server, "/good.zip")))
    code, out = _run(tmp_path, "fetch", "toy", "--json")
    result = json.loads(out)
    assert code == 0 and result["cached"] and result["downloaded"]
    assert result["path"] == str(tmp_path / "datasets" / "toy")


def test_fetch_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOGUE, "toy", _toy(f"http://127.0.0.1:{free_port()}/toy.zip"))
    code, out = _run(tmp_path, "fetch", "toy")
    assert code == 1 and out.startswith("Error: cannot download") and out.count("\n") == 1
    code, out = _run(tmp_path, "fetch", "nope")
    assert code == 1 and "unknown data set 'nope'; known: " in out


def test_the_imported_movielens_copy_is_listed_and_read_by_name(ml100k, datasets_home):
    code, out = _run(datasets_home, "list", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "ml-100k")
    assert code == 0 and row["cached"] and row["path"] == str(ml100k)
    assert resolve_data("ml-100k", datasets_home, fetch=False) == DataSource(ml100k, "ml-100k", "ml-100k")
    result = CliRunner().invoke(cli, ["--home", str(datasets_home), "evaluate", "--protocol", "topn",
                                      "--model", "popularity", "--data", "ml-100k"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["hr@10"] == pytest.approx(0.0498, abs=5e-4)  # ANCHORS.md


@pytest.mark.parametrize("ci", ["", "1"])
def test_missing_movielens_skips_or_fails_under_ci(tmp_path, ci):
    env = {**os.environ, "STREAMREC_TEST_ML100K": str(tmp_path / "absent"), "CI": ci}
    if not ci:
        env.pop("CI")
    test = "tests/stream/test_datasets.py::test_the_imported_movielens_copy_is_listed_and_read_by_name"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    if ci:
        assert result.returncode == 1 and "CI is set" in result.stdout, result.stdout[-2000:]
    else:
        assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-2000:]
