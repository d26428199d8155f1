"""Table aliases: a refit's item and user tables published as one version, switched in one write.

A refit used to assign its vectors into fixed tables (`refit_<model>_items`, then `_users`), in
place. A serving poll between the two writes, or a refit killed between them, served new item
vectors against old user vectors (a different factor space: rankings as good as random), and
rows of ids that had left the log stayed in the tables for ever.

Now each refit writes new tables, `<logical>.v<version>-<token>`, and only once every row is in
does it put one blob, `tables/<logical item table>`, naming the physical tables of both sides. A
blob lives on one shard and is replaced in one step, so a reader resolving the alias gets both
sides of one version or both of the one before; a refit that dies half-way leaves tables that
nothing names (the next publish drops them). The tables of the version before stay until the
next publish, so a serving worker in the middle of reading them finishes its poll. The alias is
put only if it is still the version read before the tables were written (compare and set): of two
refits of one model publishing at once (two replicas of a refit service), one wins and the other
fails and drops its own tables, so the alias never names tables a concurrent publish dropped.

The blob is JSON: {"version": int, "tables": {logical name: physical name}}. It is keyed by the
item table because serving retrieves with the items and reads users to match them.
"""

from __future__ import annotations

import re
import secrets

import orjson

from streamrec.param_server.client import ParamClient, ParamServerError

ALIAS_PREFIX = "tables/"
MAX_ALIAS_BYTES = 64 * 1024  # two names and a version: anything larger is not an alias
_PHYSICAL = re.compile(r"\.v\d+-[0-9a-f]+")


class AliasError(ValueError):
    """An alias blob that is not the JSON `encode_alias` writes."""


def alias_blob(item_table: str) -> str:
    return ALIAS_PREFIX + item_table


def physical_name(logical: str, version: int) -> str:
    """A new table name for one published version of `logical`; the random token keeps two
    publishes with the same version (a loop restarted within a period) apart."""
    return f"{logical}.v{version}-{secrets.token_hex(4)}"


def is_version_of(table: str, logical: str) -> bool:
    """Whether `table` is `logical` itself (a release before aliases) or one published version of it."""
    return table == logical or (table.startswith(logical) and _PHYSICAL.fullmatch(table[len(logical):]) is not None)


def logical_name(table: str) -> str:
    """The name a published version stands for (`refit_als_items.v17-0a1b2c3d` -> `refit_als_items`),
    any other table's own name: per-table metrics keep one series per logical table, not a new
    one per refit."""
    match = _PHYSICAL.search(table)
    return table[: match.start()] if match is not None and match.end() == len(table) else table


def encode_alias(version: int, tables: dict[str, str]) -> bytes:
    return orjson.dumps({"version": version, "tables": tables})


def decode_alias(data: bytes) -> tuple[int, dict[str, str]]:
    """(version, logical -> physical) of an alias blob; AliasError for anything else (blobs are put by peers)."""
    if len(data) > MAX_ALIAS_BYTES:
        raise AliasError(f"table alias of {len(data):,} bytes (at most {MAX_ALIAS_BYTES:,})")
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise AliasError(f"table alias is not JSON: {exc}") from exc
    tables = decoded.get("tables") if isinstance(decoded, dict) else None
    version = decoded.get("version") if isinstance(decoded, dict) else None
    if (not isinstance(version, int) or not isinstance(tables, dict)
            or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in tables.items())):
        raise AliasError('table alias must be {"version": int, "tables": {name: name}}')
    foreign = sorted(f"{k} -> {v}" for k, v in tables.items() if not is_version_of(v, k))
    if foreign:  # an alias names versions of its own tables, never another model's
        raise AliasError(f"table alias maps names to tables that are no version of them: {', '.join(foreign)}")
    return version, tables


def read_alias(client: ParamClient, item_table: str) -> tuple[int, dict[str, str]]:
    """The alias published for `item_table`: (0, {}) when there is none (an online model's tables,
    read by their own names). AliasError, or ParamServerError "BadSignature" with a token, for a
    blob that is no alias."""
    blob = client.find_blob(alias_blob(item_table))
    return (0, {}) if blob is None else (blob.version, decode_alias(blob.data)[1])


def unreadable(exc: Exception) -> bool:
    """Whether `exc` says the alias blob is there but cannot be used (not an outage)."""
    return isinstance(exc, AliasError) or (isinstance(exc, ParamServerError) and exc.kind == "BadSignature")


def resolve(aliases: dict[str, str], item_table: str, user_table: str) -> tuple[str, str]:
    """The physical (item, user) tables behind configured names, given an alias's map."""
    return aliases.get(item_table, item_table), aliases.get(user_table, user_table)


def resolve_tables(client: ParamClient, item_table: str, user_table: str) -> tuple[str, str]:
    """`resolve` with the alias read now (one round trip)."""
    return resolve(read_alias(client, item_table)[1], item_table, user_table)
