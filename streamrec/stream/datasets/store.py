"""Put a verified copy of a catalogue data set into the cache: downloaded (`fetch_dataset`) or
from a local folder or zip (`import_dataset`). Both stage, verify and install under the data
set's lock (`streamrec.stream.datasets.cache`), so nothing unverified or partial is ever cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from streamrec.stream.datasets import cache
from streamrec.stream.datasets.archive import extract
from streamrec.stream.datasets.catalogue import Dataset, DatasetError
from streamrec.stream.datasets.download import DEFAULT_TIMEOUT, download


def _install_archive(entry: Dataset, archive: Path, staged: Path, home: Path, source: str,
                     archive_sha256: str) -> Path:
    files = staged / "files"
    files.mkdir()
    extract(archive, files, entry.folder, entry.max_extracted_bytes)
    return cache.install(files, home, entry, source, archive_sha256)


def fetch_dataset(entry: Dataset, home: Path, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                  force: bool = False) -> tuple[Path, bool]:
    """(cached folder, whether it was downloaded now). A verified copy is kept unless `force`; a
    damaged one (a file changed or missing since it was installed) is downloaded again."""
    with cache.locked(home, entry.name):
        if cache.is_cached(home, entry) and not force:
            return cache.cached_path(home, entry.name), False
        with cache.staging(home, entry.name) as staged:
            archive = staged / "archive.zip"
            digest = download(entry.url, archive, entry.archive_sha256, entry.size, timeout)
            return _install_archive(entry, archive, staged, home, entry.url, digest), True


def _folder_with_files(entry: Dataset, path: Path) -> Path:
    """`path`, or its `entry.folder` child when the user points at the folder an archive was unpacked in."""
    nested = path / entry.folder
    if entry.folder and nested.is_dir() and not any((path / f).is_file() for f in entry.files):
        return nested
    return path


def import_dataset(entry: Dataset, path: Path, home: Path) -> Path:
    """Copy a local folder of extracted files (verified per file) or the archive (verified by its
    SHA-256, then per file) into the cache, replacing any copy there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"no such file or folder: {path}")
    root = cache.cache_root(home).resolve()
    if path.is_dir() and path.resolve().is_relative_to(root):  # the copy itself: nothing to import from
        raise DatasetError(f"{path} is inside the data-set cache {root}; import from the original "
                           f"copy (or `streamrec datasets fetch {entry.name} --force`)")
    with cache.locked(home, entry.name), cache.staging(home, entry.name) as staged:
        if path.is_file():
            digest = cache.sha256_file(path)
            if entry.archive_sha256 and digest != entry.archive_sha256:
                raise DatasetError(f"{path} has SHA-256 {digest}, expected {entry.archive_sha256} "
                                   f"(the published {entry.url.rsplit('/', 1)[-1]}); refused")
            return _install_archive(entry, path, staged, home, str(path.resolve()), digest)
        if not entry.files:
            raise DatasetError(f"{entry.name} pins only its archive's SHA-256, so a folder cannot be "
                               f"verified; import the zip ({entry.url.rsplit('/', 1)[-1]}) instead")
        source = _folder_with_files(entry, path)
        missing = [name for name in sorted(entry.files) if not (source / name).is_file()]
        if missing:  # named against the user's folder, not the staging copy it would have reached
            raise DatasetError(f"{entry.name}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                               f"missing from {source}")
        files = staged / "files"
        files.mkdir()
        for item in sorted(source.iterdir()):
            if item.name == cache.MANIFEST:  # another copy's record (a cached folder copied elsewhere), not data
                continue
            # pinned files are copied through symbolic links too (DVC and git-annex check data out
            # as links), which were skipped, and their absence was blamed on the staging folder;
            # every pinned file is verified by its SHA-256 all the same
            if item.is_file() and (item.name in entry.files or not item.is_symlink()):
                shutil.copy2(item, files / item.name)
        return cache.install(files, home, entry, str(source.resolve()), None)


def status(entry: Dataset, home: Path) -> dict[str, object]:
    """The catalogue entry plus whether and where it is cached (what `datasets list` shows)."""
    cached = cache.is_cached(home, entry)
    return {**entry.to_json(), "cached": cached,
            "path": str(cache.cached_path(home, entry.name)) if cached else None}
