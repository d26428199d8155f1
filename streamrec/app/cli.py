"""The `streamrec` console script: one subcommand per process or job.

This is the roof: each layer contributes its commands through a `register(cli, bench)` function
in its own `cli` module, imported explicitly below (no importlib, so the import-layers contract
sees every edge). Heavy imports (torch, faiss) stay inside the commands that need them, so
`streamrec --help` starts fast.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import click

from streamrec.app import bench_cli, chaos_cli, demo_cli, infra_cli, simulate_cli
from streamrec.core.cli import print_json, settings_from
from streamrec.core.config import load_settings
from streamrec.core.parent_watch import exit_with_parent
from streamrec.param_server import catalogue_cli
from streamrec.param_server import cli as param_server_cli
from streamrec.serving import cli as serving_cli
from streamrec.stream import cli as stream_cli
from streamrec.stream.datasets import cli as datasets_cli
from streamrec.trainer import cli as trainer_cli
from streamrec.trainer import content_tower_cli
from streamrec.trainer.online import cli as online_cli
from streamrec.trainer.online import features_cli

CommandRegistrar = Callable[[click.Group, click.Group], None]
COMMAND_GROUPS: tuple[CommandRegistrar, ...] = (
    infra_cli.register, stream_cli.register, datasets_cli.register, param_server_cli.register,
    catalogue_cli.register, trainer_cli.register, content_tower_cli.register,
    online_cli.register, features_cli.register, serving_cli.register, demo_cli.register,
    chaos_cli.register, bench_cli.register, simulate_cli.register,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--kafka-bootstrap", help="Kafka bootstrap servers [env STREAMREC_KAFKA_BOOTSTRAP]")
@click.option(
    "--kafka-client",
    type=click.Choice(["kafka-python", "confluent"]),
    help="Kafka client backend [env STREAMREC_KAFKA_CLIENT]",
)
@click.option("--topic", help="interaction topic [env STREAMREC_TOPIC]")
@click.option("--redis-url", help="feature store URL [env STREAMREC_REDIS_URL]")
@click.option("--home", help="state directory [env STREAMREC_HOME]")
@click.version_option(package_name="streamrec")
@click.pass_context
def cli(ctx: click.Context, **overrides: Any) -> None:
    """streamrec: a real-time recommender (Kafka -> online trainer -> parameter server -> serving)."""
    try:
        ctx.obj = load_settings(**overrides)
    except (ValueError, RuntimeError) as exc:
        raise click.UsageError(f"invalid configuration: {exc}") from exc


@cli.group()
def bench() -> None:
    """Benchmarks; each prints one JSON object."""


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Print the effective configuration (defaults < infra state < env < flags)."""
    data = settings_from(ctx).public_dict()
    if as_json:
        print_json(data)
    else:
        for key, value in data.items():
            click.echo(f"{key} = {value}")


for _register in COMMAND_GROUPS:
    _register(cli, bench)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Python's default SIGTERM ends the interpreter without running `finally` blocks, so a demo,
    bench or chaos run stopped that way would leave its broker topics, parameter server, trainer
    and serving workers behind. SIGTERM raises SystemExit instead, like Ctrl-C: every command
    unwinds and stops what it started. The long-running services (train-online, param-server,
    serve) replace this handler with their own graceful stop."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    exit_with_parent()
    cli(prog_name="streamrec")

