"""`streamrec infra up|down|status`: the local broker and Redis for a laptop or a CI machine."""

from __future__ import annotations

import click

from streamrec.app import infra as local
from streamrec.core.cli import settings_from, show


# ---------------------------------------------------------------- infra
@click.group()
def infra() -> None:
    """Local infrastructure: embedded Kafka-compatible broker (Tansu, memory only) and Redis."""


@infra.command("up")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def infra_up(ctx: click.Context, as_json: bool) -> None:
    """Start (or reuse) a broker and Redis and record their addresses; idempotent."""
    root = ctx.find_root().params
    try:
        show(local.up(settings_from(ctx), root.get("kafka_bootstrap"), root.get("redis_url")), as_json)
    except local.InfraError as exc:
        raise click.ClickException(str(exc)) from exc


@infra.command("down")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def infra_down(ctx: click.Context, as_json: bool) -> None:
    """Stop only what `infra up` started."""
    show(local.down(settings_from(ctx)), as_json)


@infra.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def infra_status(ctx: click.Context, as_json: bool) -> None:
    """Addresses, reachability and what was started locally."""
    show(local.status(settings_from(ctx)), as_json)



def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(infra)
