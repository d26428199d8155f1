"""Fixtures shared from the other suites (pytest finds fixtures by name in a conftest)."""

from tests.param_server.conftest import start_server  # noqa: F401
