"""`streamrec catalogue publish|show`: the item catalogue as a versioned parameter-server blob.

The catalogue (streamrec.stream.catalogue) is stored under `CATALOGUE_BLOB` in the dense blob
format (JSON header and .npz arrays, streamrec.param_server.artifacts); each publish gets a new
version, and serving workers pick it up on their next poll like any refit artefact.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from streamrec.core.cli import settings_from, show
from streamrec.param_server.artifacts import CATALOGUE_BLOB, decode_catalogue, encode_catalogue
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.stream.catalogue import CatalogueError, CatalogueFormat, read_catalogue


@click.group("catalogue")
def catalogue_group() -> None:
    """Item metadata for filters and business rules (u.item, CSV or JSON lines)."""


@catalogue_group.command("publish")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(get_args(CatalogueFormat)), default="auto", show_default=True,
              help="auto: u.item, *.csv, *.jsonl / *.ndjson by name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def publish_cmd(ctx: click.Context, path: Path, fmt: CatalogueFormat, as_json: bool) -> None:
    """Read PATH, check it, and store it as the next version of the catalogue blob."""
    try:
        catalogue = read_catalogue(path, fmt)
    except CatalogueError as exc:  # every malformed file (read_catalogue wraps the parsers' own errors)
        raise click.ClickException(str(exc)) from exc
    settings = settings_from(ctx)
    try:
        with ParamClient.from_settings(settings) as client:
            version = client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
    except (OSError, ParamServerError) as exc:
        raise click.ClickException(f"parameter server {','.join(settings.param_servers)}: {exc}") from exc
    show({"blob": CATALOGUE_BLOB, "version": version, **catalogue.summary()}, as_json)


@catalogue_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def show_cmd(ctx: click.Context, as_json: bool) -> None:
    """The published catalogue's version, size and attributes."""
    settings = settings_from(ctx)
    try:
        with ParamClient.from_settings(settings) as client:
            blob = client.get_blob(CATALOGUE_BLOB)
    except (OSError, ParamServerError) as exc:
        raise click.ClickException(f"parameter server {','.join(settings.param_servers)}: {exc}") from exc
    if blob is None:
        raise click.ClickException("no catalogue is published (streamrec catalogue publish PATH)")
    try:
        catalogue = decode_catalogue(blob.data)
    except CatalogueError as exc:  # a blob someone else put under the name: serving refuses it too
        raise click.ClickException(f"version {blob.version}: {exc}") from exc
    show({"blob": CATALOGUE_BLOB, "version": blob.version, **catalogue.summary()}, as_json)


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(catalogue_group, "catalogue")
