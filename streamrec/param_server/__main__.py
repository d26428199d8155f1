"""`python -m streamrec.param_server [OPTIONS]` = `streamrec param-server [OPTIONS]` (no console script needed)."""

import sys

import click

from streamrec.core.config import load_settings
from streamrec.core.parent_watch import exit_with_parent
from streamrec.param_server.cli import register


@click.group()
@click.pass_context
def _root(ctx: click.Context) -> None:
    ctx.obj = load_settings()


register(_root, click.Group("bench"))
exit_with_parent()
_root(["param-server", *sys.argv[1:]], prog_name="python -m streamrec.param_server")
