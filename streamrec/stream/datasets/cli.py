"""`streamrec datasets list|fetch|import`: public data sets by name, verified, in the local cache."""

from __future__ import annotations

from pathlib import Path

import click

from streamrec.core.cli import print_json, settings_from


def _home(ctx: click.Context) -> Path:
    return Path(settings_from(ctx).home)


@click.group("datasets")
def datasets() -> None:
    """Public data sets: list them, download them (verified by SHA-256) or import a local copy.

    Copies live in $STREAMREC_HOME/datasets/NAME; `--data NAME` of demo, evaluate, replay and refit
    reads them from there. Each data set has its own licence: `datasets list` shows it."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Known data sets: size, licence, URL, and whether (and where) each is cached."""
    from streamrec.stream.datasets.catalogue import CATALOGUE
    from streamrec.stream.datasets.store import status

    rows = [status(entry, _home(ctx)) for entry in CATALOGUE.values()]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        size = f"{row['size'] / 1e6:.1f} MB" if row["size"] else "size unknown"
        where = f"cached at {row['path']}" if row["cached"] else "not cached"
        click.echo(f"{row['name']}: {row['title']}\n  {size}, {row['url']}\n  {where}\n  licence: {row['license']}")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@datasets.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="download again even when a copy is cached")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def fetch_cmd(ctx: click.Context, name: str, force: bool, as_json: bool) -> None:
    """Download NAME from its publisher, verify its SHA-256 and cache it."""
    from streamrec.stream.datasets.catalogue import DatasetError, dataset
    from streamrec.stream.datasets.store import fetch_dataset, status

    try:
        entry = dataset(name)
    except DatasetError as exc:
        raise _fail(exc) from exc
    try:
        path, downloaded = fetch_dataset(entry, _home(ctx), force=force)
    except DatasetError as exc:
        raise click.ClickException(f"{exc} (offline? `streamrec datasets import {name} PATH` "
                                   "caches a local copy)") from exc
    result = {**status(entry, _home(ctx)), "downloaded": downloaded}
    if as_json:
        print_json(result)
    else:
        click.echo(f"{name} {'downloaded and verified' if downloaded else 'already cached'}: {path}")
        click.echo(f"licence: {entry.license}")


@datasets.command("import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_cmd(ctx: click.Context, name: str, path: Path, as_json: bool) -> None:
    """Put a local copy of NAME (a folder of extracted files, or the zip) into the cache after
    checking its SHA-256 sums."""
    from streamrec.stream.datasets.catalogue import DatasetError, dataset
    from streamrec.stream.datasets.store import import_dataset, status

    try:
        entry = dataset(name)
        cached = import_dataset(entry, path, _home(ctx))
    except DatasetError as exc:
        raise _fail(exc) from exc
    if as_json:
        print_json({**status(entry, _home(ctx)), "imported_from": str(path)})
    else:
        click.echo(f"{name} imported and verified: {cached}")
        click.echo(f"licence: {entry.license}")


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(datasets)
