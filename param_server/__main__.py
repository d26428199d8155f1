"""`python -m param_server [OPTIONS]` = `streamrec param-server [OPTIONS]` (no console script needed)."""

import sys

from streamrec.cli import cli

cli(["param-server", *sys.argv[1:]], prog_name="python -m param_server")
