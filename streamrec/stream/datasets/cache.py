"""The data-set cache, `$STREAMREC_HOME/datasets/<name>/`: verified copies only, installed atomically.

A copy is staged in a `.partial` folder beside its final place, verified, given a manifest, then
renamed into place, so a reader sees either no copy or a complete verified one. A per-name file
lock serialises fetches and imports of one data set across processes: the second waiter finds the
copy the first one installed instead of downloading it again.
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

from streamrec.stream.datasets.catalogue import Dataset, DatasetError

MANIFEST = ".streamrec-dataset.json"


def cache_root(home: Path) -> Path:
    return Path(home) / "datasets"


def cached_path(home: Path, name: str) -> Path:
    return cache_root(home) / name


def is_cached(home: Path, name: str) -> bool:
    """Only an installed copy has a manifest; a folder without one is a leftover, not a copy."""
    return (cached_path(home, name) / MANIFEST).is_file()


def manifest(home: Path, name: str) -> dict[str, object] | None:
    try:
        return json.loads((cached_path(home, name) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


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


@contextmanager
def locked(home: Path, name: str) -> Iterator[None]:
    """Exclusive per-data-set lock; stale staging folders of `name` are removed once it is held."""
    root = cache_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in root.glob(f".{name}.*.partial"):  # left by a killed fetch: nobody else holds the lock
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging(home: Path, name: str) -> Iterator[Path]:
    """A fresh folder in the cache (same file system, so the final rename is atomic), removed
    on the way out unless `install` moved it into place."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=cache_root(home)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install(staged: Path, home: Path, entry: Dataset, source: str, archive_sha256: str | None) -> Path:
    """Verify the staged files, record what was verified, and move them into place (caller holds the lock)."""
    verify_files(staged, entry)
    files = {str(p.relative_to(staged)): sha256_file(p) for p in sorted(staged.rglob("*")) if p.is_file()}
    record = {"name": entry.name, "format": entry.format, "source": source, "archive_sha256": archive_sha256,
              "verified_files": sorted(entry.files), "files": files, "installed_at": time.time()}
    (staged / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    target = cached_path(home, entry.name)
    if target.exists():  # an unverified leftover, or a copy being replaced on purpose
        shutil.rmtree(target)
    staged.rename(target)
    return target
