"""`streamrec infra up|down|status|secrets`: the local broker and Redis for a laptop or a CI machine."""

from __future__ import annotations

from pathlib import Path

import click

from streamrec.app import infra as local
from streamrec.app.infra_secrets import SecretsExist, default_env_path, write_secrets
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


@infra.command("secrets")
@click.option("--path", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the file to write [default: .env beside the nearest docker-compose.yml]")
@click.option("--force", is_flag=True, help="replace an existing file (every secret changes)")
@click.option("--json", "as_json", is_flag=True)
def infra_secrets(path: Path | None, force: bool, as_json: bool) -> None:
    """Random parameter-server token, Redis and Grafana admin passwords and API token into the .env
    file docker compose reads (mode 0600). Values are written, never printed."""
    try:
        written = write_secrets(path or default_env_path(Path.cwd()), force)
    except (SecretsExist, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    show(written, as_json)


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(infra)
