"""CLI plumbing every command module shares: the Settings of the invocation and JSON output.

It lives on the ground floor so that each layer's command module (`streamrec.stream.cli`, ...) can
use it without importing the roof that assembles them (`streamrec.app.cli`).
"""

from __future__ import annotations

import math
import sys

import click
import orjson

from streamrec.core.config import Settings


def print_json(obj: object) -> None:
    """Machine-readable output goes to stdout as one JSON document; everything else to stderr."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


def show(data: dict[str, object], as_json: bool) -> None:
    """A command's result: one JSON document, or `key: value` lines for a person."""
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if value is not None and key != "started":
            click.echo(f"{key}: {value}")


def settings_from(ctx: click.Context) -> Settings:
    """The Settings built by the root group from env vars and global flags."""
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        raise click.UsageError("no configuration: run this command through the `streamrec` CLI")
    return settings


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN and the infinities. FloatRange compares the bounds
    only, and NaN fails no comparison: `--rate nan` passed min=0 and failed deep inside a bench
    (a subprocess traceback, an OverflowError, a thread that died without a word). Commands of
    every layer take their rates and durations through it."""

    name = "finite float range"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
