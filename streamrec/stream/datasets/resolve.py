"""`--data PATH|NAME` for every command that reads a log: an existing path, else a catalogue name
resolved to its cached copy (downloaded first when missing).

It sits in the stream layer, beside the loaders, so each floor's command module can use the same
option type and no command grows its own idea of where data lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from streamrec.core.config import Settings, home_dir
from streamrec.stream.datasets import cache
from streamrec.stream.datasets.catalogue import CATALOGUE, DatasetError, dataset


@dataclass(frozen=True)
class DataSource:
    """Where a log lives. `format` is the catalogue's for a name, None for a path (then the
    command's `--format` applies); `name` is the catalogue name, if one was given."""

    path: Path
    format: str | None = None
    name: str | None = None

    def format_or(self, fallback: str) -> str:
        return self.format or fallback


def resolve_data(value: str | Path, home: Path, fetch: bool = True) -> DataSource:
    """An existing path as is; a catalogue name as its cached copy, verified file by file (fetched
    when missing or damaged and `fetch`). Raises DatasetError with a one-line reason otherwise."""
    path = Path(value).expanduser()
    if path.exists():
        return DataSource(path)
    name = str(value)
    if name not in CATALOGUE:
        raise DatasetError(f"{value} is neither an existing file or folder nor a data set "
                           f"({', '.join(sorted(CATALOGUE))}; see `streamrec datasets list`)")
    entry = dataset(name)
    problem = cache.problem(home, entry)  # every file re-hashed: a copy changed since its install is not used
    if problem is not None:
        if not fetch:
            raise DatasetError(f"{problem}: run `streamrec datasets fetch {name}` or `datasets import {name} PATH`")
        # imported here: httpx only when a download is due, so `streamrec --help` stays fast
        from streamrec.stream.datasets.store import fetch_dataset

        click.echo(f"{problem}: downloading {name} from {entry.url} ({entry.license})", err=True)
        try:
            fetch_dataset(entry, home)
        except DatasetError as exc:
            raise DatasetError(f"{exc}; offline? `streamrec datasets import {name} PATH` takes a local copy") from exc
    return DataSource(cache.cached_path(home, name), entry.format, name)


def home_of(ctx: click.Context | None) -> Path:
    """The state directory of this invocation: the root group's Settings, else STREAMREC_HOME."""
    settings = ctx.find_root().obj if ctx is not None else None
    return Path(settings.home) if isinstance(settings, Settings) else home_dir()


class DataParam(click.ParamType):
    """Click type of `--data`: a path or a data-set name, converted to a DataSource."""

    name = "PATH|NAME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> DataSource:
        if isinstance(value, DataSource):
            return value
        try:
            return resolve_data(str(value), home_of(ctx))
        except DatasetError as exc:
            self.fail(str(exc), param, ctx)


DATA = DataParam()
