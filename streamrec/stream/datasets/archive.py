"""Safe zip extraction: no absolute paths, no `..`, no links, no member that is both a file and a
folder (or there twice), and a cap on the bytes written."""

from __future__ import annotations

import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from streamrec.stream.datasets.catalogue import DatasetError

CHUNK = 1 << 20


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    path = PurePosixPath(name)
    if not path.parts or name.startswith("/") or "\\" in name or ":" in path.parts[0] or ".." in path.parts:
        raise DatasetError(f"archive member {name!r} would be written outside the target folder; refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(f"archive member {name!r} is a symbolic link; refused")
    return path


def _reject_conflicts(archive_path: Path, paths: list[PurePosixPath]) -> None:
    """Refuse two members at one path, or a file at a path another member needs as a folder
    (`u.data` and `u.data/x`): extraction would fail half way or let one member replace another."""
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for path in paths:
        if path in files:
            raise DatasetError(f"{archive_path} holds {path} twice; refused")
        files.add(path)
        folders.update(path.parents)
    clash = min(files & folders, default=None)
    if clash is not None:
        raise DatasetError(f"{archive_path} holds {clash} both as a file and as a folder; refused")


def extract(archive_path: Path, target: Path, folder: str, max_bytes: int) -> int:
    """Write the files under `folder/` in the archive (all files when `folder` is empty) into
    `target`, without that prefix. Returns the bytes written; raises DatasetError on an unsafe
    member, on more than `max_bytes` (declared or actual), or when the folder is absent."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive_path} is not a zip archive: {exc}") from exc
    with archive:
        chosen: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in archive.infolist():
            path = _member_path(info)  # every member is checked, also those not extracted
            if info.is_dir():
                continue
            if folder:
                if path.parts[0] != folder or len(path.parts) < 2:
                    continue  # e.g. __MACOSX/ metadata beside the data folder
                path = PurePosixPath(*path.parts[1:])
            chosen.append((info, path))
        if not chosen:
            raise DatasetError(f"{archive_path} has no files under {folder or 'its root'}/")
        _reject_conflicts(archive_path, [path for _, path in chosen])
        declared = sum(info.file_size for info, _ in chosen)
        if declared > max_bytes:
            raise DatasetError(f"{archive_path} would extract to {declared:,} bytes, over the {max_bytes:,} cap")
        written = 0
        for info, path in chosen:
            out_path = target.joinpath(*path.parts)
            try:
                out_path.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, out_path.open("wb") as out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:  # sizes in the directory can lie
                            raise DatasetError(f"{archive_path} extracts to more than the {max_bytes:,} byte cap")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise DatasetError(f"{archive_path}: member {info.filename} is corrupt: {exc}") from exc
            except (NotImplementedError, RuntimeError) as exc:  # a compression method zipfile lacks; encryption
                raise DatasetError(f"{archive_path}: member {info.filename} cannot be read: {exc}") from exc
            except OSError as exc:  # disk full, a name the file system refuses, a read error
                raise DatasetError(f"{archive_path}: cannot extract member {info.filename} to {out_path}: {exc}") from exc
        return written
