"""`streamrec catalogue publish|show|follow|produce`: the item catalogue as a versioned blob.

The catalogue (streamrec.stream.catalogue) is stored under `CATALOGUE_BLOB` in the dense blob
format (JSON header and .npz arrays, streamrec.param_server.artifacts); each publish gets a new
version, and serving workers pick it up on their next poll like any refit artefact. It comes from
a file (`publish`) or from the items topic (`follow`, streamrec.param_server.catalogue_follow;
`produce` sends a file there).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import click
from prometheus_client import start_http_server

from streamrec.core.cli import settings_from, show
from streamrec.param_server.artifacts import (
    CATALOGUE_BLOB,
    decode_catalogue,
    decode_catalogue_marks,
    encode_catalogue,
)
from streamrec.param_server.catalogue_bench import run_benchmark
from streamrec.param_server.catalogue_follow import CatalogueFollower
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.stream.catalogue import CatalogueError, CatalogueFormat, ItemCatalogue, read_catalogue
from streamrec.stream.catalogue_topic import put_records
from streamrec.stream.kafka import BROKER_ERRORS, make_producer
from streamrec.stream.topics import create_topics


def catalogue_file(command: Callable[..., None]) -> Callable[..., None]:
    """PATH, --format and --json: what every command reading a catalogue file takes."""
    for option in reversed((
        click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
        click.option("--format", "fmt", type=click.Choice(get_args(CatalogueFormat)), default="auto",
                     show_default=True, help="auto: u.item, *.csv, *.jsonl / *.ndjson by name"),
        click.option("--json", "as_json", is_flag=True, help="print JSON"),
    )):
        command = option(command)
    return command


@click.group("catalogue")
def catalogue_group() -> None:
    """Item metadata for filters and business rules (u.item, CSV or JSON lines)."""


@catalogue_group.command("publish")
@catalogue_file
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
            version = _replace(client, catalogue)
    except (OSError, ParamServerError) as exc:
        raise click.ClickException(f"parameter server {','.join(settings.param_servers)}: {exc}") from exc
    show({"blob": CATALOGUE_BLOB, "version": version, **catalogue.summary()}, as_json)


def _replace(client: ParamClient, catalogue: ItemCatalogue, attempts: int = 5) -> int:
    """Put `catalogue` in place of the stored one, with the items-topic marks the stored one holds:
    the file replaces everything the follower had taken, and the records after the marks apply on
    top of it (streamrec.param_server.catalogue_follow). Conditional on the version read, so a
    follower's put in between is not lost: the marks are read again and the put retried."""
    for _ in range(attempts):
        blob = client.find_blob(CATALOGUE_BLOB)
        marks = None
        if blob is not None:
            try:
                marks = decode_catalogue_marks(blob.data)[1]
            except CatalogueError:
                pass  # a blob that does not decode holds nothing to keep: the file replaces it
        try:
            return client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue, marks), 0 if blob is None else blob.version)
        except ParamServerError as exc:
            if exc.kind != "BlobConflict":
                raise
    raise click.ClickException(f"the catalogue changed {attempts} times while publishing; is more than one writer busy?")


@catalogue_group.command("follow")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="seconds a change may wait before the next version is published")
@click.option("--metrics-port", type=int, help="Prometheus port [settings.metrics_port]")
@click.pass_context
def follow_cmd(ctx: click.Context, interval_s: float, metrics_port: int | None) -> None:
    """Keep the catalogue blob in step with the items topic (<topic>.items) until stopped.

    Records are JSON objects keyed by item id: a put (a JSON-lines catalogue line), a patch
    ("op": "patch", null removes an attribute) or a delete ("op": "delete", or a tombstone).
    Refused records go to <topic>.items.dlq with their reason."""
    settings = settings_from(ctx)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        start_http_server(port, addr=settings.metrics_host)
    with ParamClient.from_settings(settings) as client:
        follower = CatalogueFollower(settings, client, interval_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: follower.stop.set())
        click.echo(f"following {settings.items_topic} into {CATALOGUE_BLOB} (Ctrl-C to stop)", err=True)
        follower.run()


@catalogue_group.command("produce")
@catalogue_file
@click.pass_context
def produce_cmd(ctx: click.Context, path: Path, fmt: CatalogueFormat, as_json: bool) -> None:
    """Send every item of PATH to the items topic as a put record (a bulk load for the follower)."""
    try:
        records = list(put_records(read_catalogue(path, fmt)))
    except CatalogueError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = settings_from(ctx)
    try:
        create_topics(settings.kafka_bootstrap, [settings.items_topic], settings.topic_partitions)
        with make_producer(settings.kafka_bootstrap, settings.kafka_client) as producer:
            for key, value in records:
                producer.send(settings.items_topic, value, key=key)
            producer.flush()
    except (*BROKER_ERRORS, TimeoutError) as exc:
        raise click.ClickException(f"broker {settings.kafka_bootstrap}: {exc}") from exc
    show({"topic": settings.items_topic, "records": len(records)}, as_json)


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


@click.command("catalogue")
@click.option("--items", type=click.IntRange(min=1), default=100_000, show_default=True, help="put records loaded first")
@click.option("--rate", type=click.FloatRange(min=1), default=200.0, show_default=True, help="patches a second, open loop")
@click.option("--seconds", type=click.FloatRange(min=1), default=20.0, show_default=True, help="how long patches arrive")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="the follower's --interval")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def bench_catalogue_cmd(ctx: click.Context, items: int, rate: float, seconds: float, interval_s: float,
                        as_json: bool) -> None:
    """The items-topic follower: load rate, and a patch's latency to a published version."""
    show(run_benchmark(settings_from(ctx), items, rate, seconds, interval_s), as_json)


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(catalogue_group, "catalogue")
    bench.add_command(bench_catalogue_cmd, "catalogue")
