"""`streamrec infra secrets`: the `.env` file docker compose reads, with fresh random secrets.

docker-compose.yml refuses to start without them: the parameter server's token, Redis' password and
Grafana's admin password (there is no default password to forget to change). The API token is
optional for compose: serving enforces it when it is non-empty.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

COMPOSE_FILE = "docker-compose.yml"
ENV_FILE = ".env"
# name -> what it protects; every value is a 256-bit URL-safe token, so it fits a redis:// URL as is
SECRETS = {
    "STREAMREC_PARAM_SERVER_TOKEN": "parameter server: every call presents it",
    "REDIS_PASSWORD": "Redis: requirepass, and the password in every STREAMREC_REDIS_URL",
    "GRAFANA_ADMIN_PASSWORD": "Grafana: the admin user's password",
    "STREAMREC_API_TOKEN": "serving HTTP API: Authorization: Bearer <token> (empty: open)",
}


class SecretsExist(FileExistsError):
    """The .env file is already there and --force was not given."""


def default_env_path(start: Path) -> Path:
    """`.env` beside the docker-compose.yml in `start` or the nearest directory above it."""
    for directory in (start, *start.parents):
        if (directory / COMPOSE_FILE).is_file():
            return directory / ENV_FILE
    raise FileNotFoundError(f"no {COMPOSE_FILE} in {start} or above: run in the checkout or pass --path")


def write_secrets(path: Path, force: bool = False) -> dict[str, object]:
    """Write fresh secrets to `path` (mode 0600, atomically); the values are never returned or printed."""
    if path.exists() and not force:
        raise SecretsExist(f"{path} exists; --force replaces every secret in it (restart the stack afterwards)")
    lines = ["# written by `streamrec infra secrets`; keep private (mode 0600), never commit"]
    for name, purpose in SECRETS.items():
        lines += [f"# {purpose}", f"{name}={secrets.token_urlsafe(32)}"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return {"path": str(path), "mode": "0600", "secrets": list(SECRETS)}
