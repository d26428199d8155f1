"""`streamrec param-server` (one shard), `streamrec param-server reshard` and `streamrec bench param-server`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from streamrec.param_server.defaults import (
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_BYTE_BUDGET,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_FRAME_GRACE,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_ROWS,
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_MIN_FRAME_RATE,
)


@click.group("param-server", invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", type=int, default=None, help="port (0: any free one) [default: this shard's port in settings.param_servers]")
@click.option("--shard", type=int, default=0, show_default=True, help="index of this shard")
@click.option("--num-shards", type=int, default=None, help="shards in total [default: len(settings.param_servers)]")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None, help="[default: <home>/param_server]")
@click.option("--no-checkpoints", is_flag=True, help="keep state in memory only")
@click.option("--checkpoint-every", type=float, default=DEFAULT_CHECKPOINT_EVERY, show_default=True, help="seconds between checkpoints (0: only on exit)")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=DEFAULT_KEEP_CHECKPOINTS, show_default=True, help="newest checkpoints kept (a corrupt one falls back to the next)")
@click.option("--max-rows", type=click.IntRange(1, 2**31 - 1), default=DEFAULT_MAX_ROWS, show_default=True, help="row bound per table and shard for tables created without one (least recently updated rows are evicted)")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: off) [default: settings.metrics_port]")
@click.option("--max-header-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_HEADER_BYTES, show_default=True, help="largest frame header accepted")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BODY_BYTES, show_default=True, help="largest frame body accepted")
@click.option("--byte-budget", type=click.IntRange(min=1), default=DEFAULT_BYTE_BUDGET, show_default=True, help="frame bytes in flight over all connections (a frame beyond it waits, then is refused)")
@click.option("--max-connections", type=click.IntRange(min=1), default=DEFAULT_MAX_CONNECTIONS, show_default=True, help="authenticated connections")
@click.option("--max-unauthenticated", type=click.IntRange(min=1), default=DEFAULT_MAX_UNAUTHENTICATED, show_default=True, help="connections still to send their hello frame")
@click.option("--auth-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_AUTH_TIMEOUT, show_default=True, help="seconds a new connection has to send its hello frame")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_IDLE_TIMEOUT, show_default=True, help="seconds an authenticated connection may stay silent")
@click.option("--frame-grace", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_FRAME_GRACE, show_default=True, help="seconds the rest of a frame may take after its prefix, beyond --min-frame-rate")
@click.option("--min-frame-rate", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MIN_FRAME_RATE / (1 << 20), show_default=True, help="MiB/s a frame's bytes must arrive at (a slower peer is cut)")
@click.pass_context
def param_server_cmd(
    ctx: click.Context,
    host: str,
    port: int | None,
    shard: int,
    num_shards: int | None,
    checkpoint_dir: Path | None,
    no_checkpoints: bool,
    checkpoint_every: float,
    keep_checkpoints: int,
    max_rows: int,
    metrics_port: int | None,
    max_header_bytes: int,
    max_body_bytes: int,
    byte_budget: int,
    max_connections: int,
    max_unauthenticated: int,
    auth_timeout: float,
    idle_timeout: float,
    frame_grace: float,
    min_frame_rate: float,
) -> None:
    """Run one parameter-server shard until SIGTERM (which writes a final checkpoint).

    Prints one JSON line when it is listening: {"address": ..., "restored": ..., ...}.
    `streamrec param-server reshard ...` re-splits stopped shards' checkpoints instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from streamrec.core.allocator import tune_allocator
    from streamrec.core.cli import print_json, settings_from
    from streamrec.param_server.limits import ServerLimits
    from streamrec.param_server.protocol import FrameLimits, FramePace
    from streamrec.param_server.server import run

    tune_allocator()
    settings = settings_from(ctx)
    num_shards = num_shards or len(settings.param_servers)
    if port is None:
        port = int(settings.param_servers[shard].rpartition(":")[2]) if shard < len(settings.param_servers) else 7070 + shard
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(
            host=host,
            port=port,
            shard=shard,
            num_shards=num_shards,
            token=settings.param_server_token,
            checkpoint_dir=None if no_checkpoints else (checkpoint_dir or Path(settings.home) / "param_server"),
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            max_rows=max_rows,
            limits=ServerLimits(FrameLimits(max_header_bytes, max_body_bytes), byte_budget, max_connections=max_connections,
                                max_unauthenticated=max_unauthenticated, auth_timeout=auth_timeout, idle_timeout=idle_timeout,
                                pace=FramePace(frame_grace, min_frame_rate * (1 << 20))),
            metrics_port=settings.metrics_port if metrics_port is None else metrics_port,
            ready=print_json,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@param_server_cmd.command("reshard")
@click.option("--from", "source", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="checkpoint directory of the stopped shards (holds shard-<i>-of-<n>/)")
@click.option("--to", "target", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="directory for the new shards' checkpoints (must not hold that layout yet)")
@click.option("--shards", "num_shards", type=click.IntRange(min=1), required=True, help="shards to split into")
@click.option("--from-shards", type=click.IntRange(min=1), default=None,
              help="layout to read when --from holds several [default: the only one there]")
@click.pass_context
def reshard_cmd(ctx: click.Context, source: Path, target: Path, num_shards: int, from_shards: int | None) -> None:
    """Re-split stopped shards' newest checkpoints into NUM_SHARDS shards (rows routed by
    rendezvous hashing, exactly-once watermarks carried over). Prints JSON: rows, moved_rows,
    moved_fraction, per-table rows per new shard, the carried watermarks. Checkpoints are read and
    signed under STREAMREC_PARAM_SERVER_TOKEN when it is set."""
    from streamrec.core.cli import print_json, settings_from
    from streamrec.param_server.reshard import ReshardError, reshard
    from streamrec.param_server.signing import CHECKPOINT_CONTEXT, derived_key

    token = settings_from(ctx).param_server_token
    try:
        print_json(reshard(source, target, num_shards, from_shards=from_shards,
                           key=derived_key(token, CHECKPOINT_CONTEXT) if token else None))
    except ReshardError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("param-server")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the default output is the same JSON, indented)")
@click.option("--ids", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="table size")
@click.option("--dim", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=4096, show_default=True, help="rows per push and pull")
def bench_cmd(as_json: bool, ids: int, dim: int, batch: int) -> None:
    """Table, loopback, delta, checkpoint, memory and collision figures of the parameter server."""
    from streamrec.core.cli import print_json
    from streamrec.param_server.bench import run_benchmark

    result = run_benchmark(num_ids=ids, dim=dim, batch=batch)
    if as_json:
        print_json(result)
    else:
        import json

        click.echo(json.dumps(result, indent=2))


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(param_server_cmd, "param-server")
    bench.add_command(bench_cmd, "param-server")
