"""Commands of the event stream: topics, produce, replay, bench stream."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import click

from streamrec.core.cli import print_json, settings_from, show
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def _broker_failure(bootstrap: str, exc: Exception) -> str:
    """One line for a broker that does not answer (the clients' own errors name no address)."""
    return f"the Kafka broker at {bootstrap} did not answer: {str(exc).strip() or type(exc).__name__}"


# ---------------------------------------------------------------- topics
@click.group()
def topics() -> None:
    """Create, list and describe topics."""


@topics.command("create")
@click.argument("names", nargs=-1)
@click.option("--partitions", type=int, help="partitions per topic [settings.topic_partitions]")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def topics_create(ctx: click.Context, names: tuple[str, ...], partitions: int | None, as_json: bool) -> None:
    """Create NAMES (default: the interaction topic, its dead-letter topic and serving's impressions topic)."""
    from streamrec.stream.topics import create_topics

    settings = settings_from(ctx)
    names = names or (settings.topic, settings.dlq_topic, settings.impressions_topic)
    result = create_topics(settings.kafka_bootstrap, list(names), partitions or settings.topic_partitions)
    show(result, as_json)


@topics.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def topics_list(ctx: click.Context, as_json: bool) -> None:
    """Topics on the broker."""
    from streamrec.stream.topics import list_topics

    names = list_topics(settings_from(ctx).kafka_bootstrap)
    if as_json:
        print_json(names)
    else:
        click.echo("\n".join(names))


@topics.command("describe")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def topics_describe(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Partitions, end offsets, message count, and per consumer group committed offsets and lag."""
    from streamrec.stream.topics import describe_topic

    settings = settings_from(ctx)
    try:
        data = describe_topic(settings.kafka_bootstrap, name or settings.topic)
    except KeyError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        print_json(data)
        return
    click.echo(f"topic {data['topic']}: {data['messages']} messages")
    for row in data["partitions"]:
        click.echo(f"  partition {row['partition']}: offsets {row['beginning_offset']}..{row['end_offset']}")
    for group, info in data["groups"].items():
        click.echo(f"  group {group}: lag {info['total_lag']} {info['lag']}")


# ---------------------------------------------------------------- produce / replay
@click.command("produce")
@click.argument("file", type=click.File("rb"), default="-")
@click.option("--topic", "topic_flag", help="target topic [settings.topic]")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def produce(ctx: click.Context, file: BinaryIO, topic_flag: str | None, as_json: bool) -> None:
    """Send JSON lines from FILE (or stdin) to the topic; invalid lines go to the dead-letter topic."""
    from streamrec.stream.kafka import BROKER_ERRORS
    from streamrec.stream.publish import EventPublisher

    settings = settings_from(ctx)
    name = getattr(file, "name", "-")
    lines = 0
    try:
        publisher = EventPublisher.from_settings(settings, "produce", topic_flag)
        for lines, raw in enumerate(file, start=1):
            publisher.publish_raw(raw.rstrip(b"\r\n"), {"file": name, "line": lines})
        publisher.close()
    except BROKER_ERRORS as exc:  # a traceback from the client's bootstrap said no more than this
        raise _fail(_broker_failure(settings.kafka_bootstrap, exc)) from exc
    result = {"lines": lines, **publisher.summary(), "topic": publisher.topic}
    if as_json:
        print_json(result)
    else:
        click.echo(f"{result['accepted']} accepted, {result['dead_lettered']} dead-lettered to {publisher.topic}{settings.dlq_suffix}")


@click.command("replay")
@click.option("--data", "data", required=True, type=DATA,
              help="log file or folder (ml-100k: the folder or u.data), or a data-set name (`streamrec datasets list`)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k",
              help="format of a PATH (a data-set name brings its own)")
@click.option("--topic", "topic_flag", help="target topic [settings.topic]")
@click.option("--speed", type=float, default=0.0, show_default=True,
              help="event-time seconds per wall second (finite, >= 0); 0 = as fast as possible")
@click.option("--limit", type=click.IntRange(min=0), help="replay only the first N events (in time order)")
@click.option("--map", "mapping", multiple=True, help="field=column, e.g. user_id=userId,item_id=movieId")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay_cmd(ctx: click.Context, data: DataSource, fmt: str, topic_flag: str | None, speed: float,
               limit: int | None, mapping: tuple[str, ...], as_json: bool) -> None:
    """Replay a historical log into the topic in timestamp order (ties: user, then item).

    The log needs a timestamp column: events carry their time. Exits 1 (after the summary) when
    every event was dead-lettered, which is a wrong log or mapping, not a replay."""
    from streamrec.core.progress import progress_bar
    from streamrec.stream.kafka import BROKER_ERRORS
    from streamrec.stream.loaders import load_log, parse_map_option
    from streamrec.stream.publish import EventPublisher
    from streamrec.stream.replay import replay

    if not math.isfinite(speed) or speed < 0:  # nan passed `speed < 0` and paced nothing
        raise click.BadParameter("must be a finite number >= 0 (0: as fast as possible)", param_hint="--speed")
    settings = settings_from(ctx)
    fmt = data.format_or(fmt)
    try:
        log = load_log(data.path, fmt, parse_map_option(mapping), require_timestamp=True)
    except (ValueError, KeyError) as exc:
        raise _fail(f"cannot read {data.path} as {fmt}: {exc}") from exc
    try:
        publisher = EventPublisher.from_settings(settings, "replay", topic_flag)  # creates the topics
        total = min(len(log), limit) if limit is not None else len(log)
        with progress_bar(f"replay -> {publisher.topic}", total) as advance:
            result = replay(log, publisher, speed, limit, advance)
        publisher.close()
    except (*BROKER_ERRORS, TimeoutError) as exc:
        raise _fail(_broker_failure(settings.kafka_bootstrap, exc)) from exc
    summary = result.to_json()
    if as_json:
        print_json(summary)
    else:
        click.echo(
            f"replayed {summary['produced']} events ({summary['dead_lettered']} dead-lettered) in "
            f"{summary['seconds']} s, {summary['events_per_second']} events/s; event time "
            f"{summary['first_timestamp']} .. {summary['last_timestamp']}"
        )
    if result.dead_lettered and not result.produced:
        raise _fail(f"every event ({result.dead_lettered}) was dead-lettered to {publisher.dead_letters.topic}; "
                    "each dead letter's reason and detail say why (a wrong --format or --map?)")


# ---------------------------------------------------------------- bench
@click.command("stream")
@click.option("--events", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--client", type=click.Choice(["kafka-python", "confluent"]), help="[settings.kafka_client]")
@click.option("--partitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_stream_cmd(ctx: click.Context, events: int, client: str | None, partitions: int, as_json: bool) -> None:
    """Produce and consume (decode + validate) EVENTS through the configured broker."""
    from streamrec.stream.bench import bench_stream

    settings = settings_from(ctx)
    print_json(bench_stream(settings, events, client or settings.kafka_client, partitions))


# ---------------------------------------------------------------- export
@click.command("export")
@click.option("--to", "target_format", type=click.Choice(["parquet"]), required=True, help="file format to write")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--from", "source", default="topic", show_default=True,
              help="topic (the interaction topic from its beginning), topic:NAME, or a log file / data-set name")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a file given to --from (a data-set name brings its own)")
@click.pass_context
def export_cmd(ctx: click.Context, target_format: str, path: str, source: str, fmt: str) -> None:
    """Write the interaction log to PATH (Parquet: the input of `refit --engine spark`); prints JSON."""
    from streamrec.stream.kafka import BROKER_ERRORS
    from streamrec.stream.reader import is_topic_source, read_event_log

    try:
        from streamrec.stream.export import export_parquet
    except ImportError as exc:
        raise _fail(f"Parquet needs pyarrow: pip install 'streamrec[parquet]' ({exc})") from exc

    if path.endswith(("/", os.sep)):  # Path() drops the slash: "out/new/" wrote a file named "new"
        raise click.BadParameter(f"{path!r} names a folder; PATH is the file to write, e.g. {path}log.parquet",
                                 param_hint="PATH")
    settings = settings_from(ctx)
    if not is_topic_source(source):
        data = DATA.convert(source, None, ctx)
        source, fmt = str(data.path), data.format_or(fmt)
    try:
        log = read_event_log(settings, source, fmt)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    except (*BROKER_ERRORS, TimeoutError) as exc:
        raise _fail(_broker_failure(settings.kafka_bootstrap, exc)) from exc
    try:
        written = export_parquet(log, Path(path))
    except OSError as exc:  # the folder is a file, not writable, or the disk is full
        raise _fail(f"cannot write {path}: {exc}") from exc
    print_json(written)


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(export_cmd)
    cli.add_command(topics)
    cli.add_command(produce)
    cli.add_command(replay_cmd)
    bench.add_command(bench_stream_cmd)
