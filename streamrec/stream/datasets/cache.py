"""The data-set cache, `$STREAMREC_HOME/datasets/<name>/`: verified copies only, installed atomically.

A copy is staged in a `.partial` folder beside its final place, verified, given a manifest, then
renamed into place; a copy it replaces is first renamed aside and only then removed, so a kill at
any moment leaves the old copy or the new one, whole. A copy is trusted only while its files still
have the SHA-256 its manifest recorded (`problem`): hashing every file of MovieLens 100K (16 MB)
takes about 20 ms, against the seconds spent reading it, and a same-size edit (one rating changed)
would pass a check of sizes. A per-name file lock serialises fetches and imports of one data set
across processes: the second waiter finds the copy the first one installed instead of downloading
it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamrec.stream.datasets.catalogue import Dataset, DatasetError

MANIFEST = ".streamrec-dataset.json"
REPLACED = "replaced"  # the old copy, inside a staging-named folder, while a new one takes its place


def cache_root(home: Path) -> Path:
    return Path(home) / "datasets"


def cached_path(home: Path, name: str) -> Path:
    return cache_root(home) / name


def manifest(home: Path, name: str) -> dict[str, Any] | None:
    """The installed copy's record, or None when there is none (or it is not a JSON object)."""
    try:
        record = json.loads((cached_path(home, name) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def problem(home: Path, entry: Dataset) -> str | None:
    """Why the cached copy of `entry` cannot be used (none, or a file changed, missing or not the
    pinned one since it was installed), or None when every file still has its recorded SHA-256."""
    record = manifest(home, entry.name)
    folder = cached_path(home, entry.name)
    if record is None:
        return f"{entry.name} is not in the cache {cache_root(home)}"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return f"the cached copy {folder} has no list of its files"
    for relative, expected in sorted(entry.files.items()):
        if files.get(relative) != expected:
            return f"the cached copy {folder} does not record {relative} with its pinned SHA-256"
    for relative, expected in sorted(files.items()):
        if relative == MANIFEST:  # recorded by imports of the cached folder itself, before they were refused
            continue
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing from the cached copy {folder}"
        if sha256_file(path) != expected:
            return f"{relative} in the cached copy {folder} changed since it was installed"
    return None


def is_cached(home: Path, entry: Dataset) -> bool:
    """True when a verified copy is installed: a folder without a manifest is a leftover, and one
    whose files changed since (see `problem`) is damaged; neither is a copy."""
    return problem(home, entry) is None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder: Path, entry: Dataset) -> None:
    """Every pinned file present with its pinned SHA-256, else a DatasetError naming the first bad one."""
    for relative, expected in sorted(entry.files.items()):
        path = folder / relative
        if not path.is_file():
            raise DatasetError(f"{entry.name}: {relative} is missing from {folder}")
        actual = sha256_file(path)
        if actual != expected:
            raise DatasetError(f"{entry.name}: {relative} has SHA-256 {actual}, expected {expected} (not the published file)")


def _aside(home: Path, name: str) -> Path:
    """A fresh staging-named folder: what is left in one after a kill is removed by `locked`."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=cache_root(home)))


@contextmanager
def locked(home: Path, name: str) -> Iterator[None]:
    """Exclusive per-data-set lock; leftovers of a killed fetch or import of `name` are cleared
    once it is held: a copy renamed aside goes back into place when nothing replaced it (the kill
    fell between `install`'s two renames), then every staging folder is removed."""
    root = cache_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            target = cached_path(home, name)
            for stale in root.glob(f".{name}.*.partial"):  # nobody else holds the lock
                replaced = stale / REPLACED
                if replaced.is_dir() and not target.exists():
                    replaced.rename(target)
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging(home: Path, name: str) -> Iterator[Path]:
    """A fresh folder in the cache (same file system, so the final rename is atomic), removed
    on the way out unless `install` moved it into place."""
    path = _aside(home, name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install(staged: Path, home: Path, entry: Dataset, source: str, archive_sha256: str | None) -> Path:
    """Verify the staged files, record what was verified, and move them into place (caller holds
    the lock). A copy already there is renamed aside first and removed last: removing it in place
    was not atomic, and a kill in the middle left part of it, manifest included."""
    verify_files(staged, entry)
    files = {str(p.relative_to(staged)): sha256_file(p) for p in sorted(staged.rglob("*"))
             if p.is_file() and p.relative_to(staged) != Path(MANIFEST)}  # a manifest copied in is not data
    record = {"name": entry.name, "format": entry.format, "source": source, "archive_sha256": archive_sha256,
              "verified_files": sorted(entry.files), "files": files, "installed_at": time.time()}
    (staged / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    target = cached_path(home, entry.name)
    if not target.exists():
        staged.rename(target)
        return target
    aside = _aside(home, entry.name)
    target.rename(aside / REPLACED)
    staged.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
    return target
