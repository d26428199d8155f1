"""The `streamrec` console script: one subcommand per process or job.

Each package contributes its commands through a `register(cli, bench)` function in its own
`cli` module, so this file only assembles them; heavy imports (torch, faiss) stay inside the
commands that need them and `streamrec --help` starts fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click
import orjson

from streamrec.config import Settings, load_settings

COMMAND_MODULES = (
    "stream.cli", "param_server.cli", "trainer.cli", "trainer.online.cli", "serving.cli", "streamrec.demo_cli",
)


def print_json(obj: Any) -> None:
    """Machine-readable output goes to stdout as one JSON document; everything else to stderr."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


def settings_from(ctx: click.Context) -> Settings:
    """The Settings built by the root group from env vars and global flags."""
    return ctx.find_root().obj


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


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(cli, bench)


_register_all()


def main() -> None:
    cli(prog_name="streamrec")

