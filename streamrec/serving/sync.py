"""Polling the parameter server and swapping new state in atomically (double buffering).

Each worker keeps two buffers, each an item replica and a FAISS index. A poll fetches the item
table's delta and any changed artifact blob, applies them to the standby buffer, swaps a new
`ServingState` over it in, waits until requests have left the old state, then applies the same
delta to the old buffer, so both are identical again and the next poll can start from either.
Requests never wait for a sync; a sync costs twice the apply work and the replicas take twice the
memory, which the catalogue bounds. Users are not mirrored: the poll streams the user table's delta
into the worker's bounded `UserCache`, which keeps only the users it holds (streamrec.serving.users).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamrec.core.allocator import HeapTrimmer
from streamrec.param_server.client import Delta, ParamClient, ParamServerError
from streamrec.param_server.replica import TableMirror
from streamrec.param_server.table_alias import AliasError, alias_blob, decode_alias, resolve, unreadable
from streamrec.serving.artifacts import ArtifactError, Artifacts
from streamrec.serving.config import ServingConfig
from streamrec.serving.filters import ItemFilter
from streamrec.serving.index import ItemIndex, MemoCounts
from streamrec.serving.metrics import ServingMetrics
from streamrec.serving.state import ServingState, StateHolder
from streamrec.serving.users import UserCache

log = logging.getLogger(__name__)
GAUGE_REFRESH_S = 1.0  # the staleness gauge is refreshed at least this often between polls
USER_CHUNK_ROWS = 8192  # user delta rows per chunk: bounds the memory and the cache lock's hold per chunk
MAX_FOLLOW_UPS = 8  # deltas since a torn item delta's version, before the poll gives up (the last state stays)
# a user pull that found the refit version it reads gone (users.py) makes the sync poll this soon
# after its last poll, checked this often, not after the poll interval
EARLY_POLL_MIN_S, EARLY_POLL_CHECK_S = 1.0, 0.1
FIRST_RETRY_S = 0.25  # a starting worker without a model retries a failed poll this soon (for first_poll_wait_s)


@dataclass
class Buffer:
    items: TableMirror
    index: ItemIndex


def _changed(delta: Delta) -> bool:
    return bool(delta.full or len(delta.ids) or len(delta.deleted))


class TornDelta(RuntimeError):
    """Item deltas kept holding rows newer than their version: no exact version to serve."""


class Syncer:
    def __init__(self, config: ServingConfig, holder: StateHolder, metrics: ServingMetrics, users: UserCache,
                 between_polls: tuple[Callable[[], object], ...] = ()) -> None:
        """`between_polls`: other upkeep of the worker run on this thread after each poll (re-reading
        the experiments file), never inside a request."""
        self.config, self.holder, self.metrics, self.users = config, holder, metrics, users
        # set by any user cache of this worker (the one in use may be a retired one, until a swap)
        # whose refit version is gone: the run loop polls early (EARLY_POLL_MIN_S)
        self.version_gone = users.version_gone
        self.between_polls = between_polls
        self._memo_counts = MemoCounts(metrics.search_memo.labels("hit"), metrics.search_memo.labels("miss"))
        # the (item, user) tables read: the configured names, or the version a refit's alias names
        self.tables = (config.item_table, config.user_table)
        self._alias_version = 0
        self._retired_users: UserCache | None = None  # the cache of tables switched away from, in use until a swap
        self.buffers = [self._buffer(), self._buffer()]
        self.standby = 0
        self.item_since: int | tuple[int, ...] = 0
        self.user_since: int | tuple[int, ...] | None = None  # None: the first poll, which fills the cache
        self.artifacts = Artifacts()
        self._client: ParamClient | None = None
        # set once the worker has something to serve, or the parameter server answered that no shard has
        # the item table (a new cluster: no worker could serve either); a failed poll never sets it
        self.ready = threading.Event()
        self._refused_versions: dict[str, int] = {}  # blob name -> the newest version that did not decode
        for blob in (config.knn_blob, config.ranker_blob, config.catalogue_blob, alias_blob(config.item_table)):
            metrics.artifact_refusals.labels(blob)  # every blob's series from the start, at 0
        self._rules = ItemFilter.parse_rules(config.item_rules)  # ServingConfig has checked them
        self._trimmer = HeapTrimmer()  # replaced buffers and index rebuilds free memory each poll

    def _buffer(self) -> Buffer:
        c = self.config
        return Buffer(TableMirror(None, self.tables[0], compact=True),
                      ItemIndex(c.index, c.nprobe, c.ivf_min_items, c.rebuild_fraction,
                                int(c.search_memo_mb * 2**20), self._memo_counts))

    def _connect(self) -> ParamClient:
        if self._client is None:
            self._client = ParamClient(self.config.param_servers, token=self.config.param_server_token,
                                       timeout=30.0, retries=1, retry_backoff=0.1)
        return self._client

    def _follow_alias(self, client: ParamClient, published: dict[str, int]) -> None:
        """Switch to the tables a refit's alias names (`streamrec.param_server.table_alias`) when
        its version is another than the one followed (older too: a shard restored from a
        checkpoint brings an older alias back, naming the tables it has): new buffers and a new
        user cache, filled from scratch by this poll and swapped in with the item state, so no
        request pairs users of one version with items of another. The state before keeps serving
        until the new one is whole. A blob that is no alias is refused once, like an artefact
        (logged, counted, named in /readyz): the poll goes on with the tables it had."""
        name = alias_blob(self.config.item_table)
        version = published.get(name, 0)
        if version == self._alias_version:
            return
        tables = self.tables if version else (self.config.item_table, self.config.user_table)
        if version:
            try:
                blob = client.find_blob(name)
                if blob is None:
                    return
                version, aliases = blob.version, decode_alias(blob.data)[1]
            except (AliasError, ParamServerError) as exc:
                if not unreadable(exc):
                    raise
                self._alias_version = version
                self.holder.refused_artifacts = {**self.holder.refused_artifacts, name: str(exc)}
                self.metrics.artifact_refusals.labels(name).inc()
                log.error("table alias %s version %d refused: %s; serving goes on with %s / %s", name, version, exc,
                          *self.tables)
                return
            tables = resolve(aliases, self.config.item_table, self.config.user_table)
        self.holder.refused_artifacts = {k: v for k, v in self.holder.refused_artifacts.items() if k != name}
        self._alias_version = version
        if tables == self.tables:
            return
        log.info("switching to tables %s / %s (alias version %d)", *tables, version)
        self.tables = tables
        self.buffers = [self._buffer(), self._buffer()]
        self.item_since, self.user_since = 0, None
        if self._retired_users is None:
            self._retired_users = self.users  # the current state's: closed once a new state replaces it
        else:
            self.users.close()  # a switch that no state ever used
        self.users = UserCache(self.config, self.metrics, table=tables[1], version_gone=self.version_gone)

    def _fetch_artifacts(self, client: ParamClient, published: dict[str, int]) -> Artifacts:
        """Artifacts with every configured blob that has a newer version decoded. A version that
        does not decode is refused once (logged, counted, named in /readyz) and not fetched again:
        the version before stays in use, and the poll goes on, item and user deltas included (it
        used to fail the whole poll, at every poll, until someone published a good blob)."""
        artifacts = self.artifacts
        for name, kind in ((self.config.knn_blob, "knn"), (self.config.ranker_blob, "ranker"),
                           (self.config.catalogue_blob, "catalogue")):
            version = published.get(name)
            if version is None or version <= max(artifacts.versions.get(name, 0), self._refused_versions.get(name, 0)):
                continue
            blob = client.get_blob(name, since=artifacts.versions.get(name, 0))
            if blob is None:
                continue
            try:
                artifacts = artifacts.with_blob(name, kind, blob.data, blob.version)
            except ArtifactError as exc:
                self._refused_versions[name] = blob.version
                self.holder.refused_artifacts = {**self.holder.refused_artifacts, name: str(exc)}
                self.metrics.artifact_refusals.labels(name).inc()
                log.error("%s; serving goes on with version %s", exc, artifacts.versions.get(name, "none"))
            else:
                self.holder.refused_artifacts = {k: v for k, v in self.holder.refused_artifacts.items() if k != name}
                if kind == "catalogue":
                    self._check_rules(artifacts)
        return artifacts

    def _check_rules(self, artifacts: Artifacts) -> None:
        """Configured rules the new catalogue cannot apply are skipped (rules come before any
        catalogue), so each such catalogue says which, in the log and in /readyz."""
        inert = self._rules.inert(artifacts.catalogue)
        if inert and inert != self.holder.inert_rules:
            log.error("configured item rules not applied with catalogue version %s: %s",
                      artifacts.versions.get(self.config.catalogue_blob), "; ".join(inert))
        self.holder.inert_rules = inert

    def poll(self) -> bool:
        """One poll; True when a new state was swapped in. Raises on parameter-server errors, and
        when some shards have a table that others lack (a shard restarted empty): the last state stays."""
        started = time.perf_counter()
        client = self._connect()
        try:
            published = client.blobs()
            self._follow_alias(client, published)
            item_table, user_table = self.tables
            tables = client.tables()
            if item_table not in tables and self.holder.current is None:
                # nothing trained yet, on any shard: nothing to wait for. A worker with a model goes
                # on below and fails (the shards restarted empty): it keeps that model, and its
                # staleness and last_error say so
                self.ready.set()
                self.holder.confirmed_at, self.holder.last_error = time.time(), None
                return False
            # the item delta first: `synced_version` is its version, and the users followed after it
            # have every row of that version, so "synced past v" holds for the user cache too (the
            # other way round a push landing between the two left a new user's row out of the cache
            # while the version said it was in: answers depended on timing)
            deltas = [client.delta(item_table, self.item_since)]
            # a torn delta (pushes reached its later chunks while they were read) is the table as of no
            # version: a state built from it alone labelled model_version v held rows newer than v, and
            # two workers answered the same request differently under one model_version. Deltas since
            # its version on top make the copy exact again (they are small: one chunk, never torn)
            while deltas[-1].torn:
                if len(deltas) > MAX_FOLLOW_UPS:
                    raise TornDelta(f"{len(deltas)} item deltas in a row held rows newer than their version")
                deltas.append(client.delta(item_table, deltas[-1].version))
            delta = deltas[-1]
            self._follow_users(client, user_table, tables.get(user_table))
            artifacts = self._fetch_artifacts(client, published)
        except OSError:
            client.close()  # reconnect next time
            raise
        changed = any(map(_changed, deltas)) or artifacts is not self.artifacts or self.holder.current is None
        if changed:
            self._swap_in(deltas, artifacts)
        self.item_since = delta.version
        self.artifacts = artifacts
        self.holder.synced_version = int(sum(delta.version))
        self.holder.confirmed_at, self.holder.last_error = time.time(), None
        self.ready.set()
        self.metrics.sync_seconds.observe(time.perf_counter() - started)
        self.metrics.staleness.set(0.0)
        return changed

    def _follow_users(self, client: ParamClient, table: str, info: dict[str, Any] | None) -> None:
        """The user table's changes since the last poll, into the cache; the first poll streams the
        whole table to fill it (chunk by chunk: never the whole table at once). `info` is the
        table's merged info, None when no shard has it (no user has a row: nothing to follow)."""
        self.holder.user_rows = info["rows"] if info is not None else 0
        if info is None:
            return
        chunks = client.delta_chunks(table, self.user_since or 0, USER_CHUNK_ROWS)
        self.user_since = self.users.follow(chunks, client.shard_of, fill=self.user_since is None)

    def _apply(self, buffer: Buffer, deltas: list[Delta], rebuilt_from: ItemIndex | None) -> bool:
        """Apply the item deltas, in order, to one buffer; the index is cloned from `rebuilt_from` when given."""
        rebuilt = False
        for items in filter(_changed, deltas):
            changes = buffer.items.apply(items)
            if rebuilt_from is None and buffer.index.update(changes, buffer.items):
                self.metrics.index_rebuilds.inc()
                rebuilt = True
        if rebuilt_from is not None and any(map(_changed, deltas)):
            buffer.index = rebuilt_from.clone()
            return True
        return rebuilt

    def _swap_in(self, deltas: list[Delta], artifacts: Artifacts) -> None:
        standby = self.buffers[self.standby]
        rebuilt = self._apply(standby, deltas, None)
        state = ServingState.build(self.users, standby.items, standby.index, artifacts, int(sum(deltas[-1].version)))
        old = self.holder.swap(state)
        self.metrics.model_version.set(state.version)
        self.metrics.index_items.set(standby.index.size)
        if old is not None:
            self.holder.wait_unused(old)
        if self._retired_users is not None:  # no request holds a state with the cache switched away from
            self._retired_users.close()
            self._retired_users = None
        other = self.buffers[1 - self.standby]
        self._apply(other, deltas, standby.index if rebuilt else None)
        self.standby = 1 - self.standby  # the buffer just caught up is the next standby

    def run(self, stop: threading.Event) -> None:
        """Poll every `poll_interval` seconds until `stop` is set; never raises. Until the worker is
        ready, a failed poll is retried after FIRST_RETRY_S (a worker replacing a killed one while a
        shard restarts gets its model as soon as the shard is back); after `first_poll_wait_s` it
        polls every `poll_interval` again, so a long outage costs no more than a short one.
        A worker without a model whose poll succeeded (no shard has the item table yet) also polls
        every FIRST_RETRY_S: the first model is picked up at once, not a poll interval (a minute by
        default) after a sibling worker began serving it."""
        hurry_until = time.monotonic() + self.config.first_poll_wait_s
        early = False  # this poll was made early, for a version gone
        while not stop.is_set():
            started = time.monotonic()
            alias_before = self._alias_version
            self.version_gone.clear()  # this poll follows the alias, if there is a newer one
            answered = False
            try:
                self.poll()
                answered = True
            except Exception as exc:  # noqa: BLE001 - the sync thread must survive any failure and keep the last state
                self.metrics.sync_failures.inc()
                self.holder.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("parameter-server poll failed: %s", self.holder.last_error)
            self._upkeep()
            self._trimmer.trim_if_due()  # on this thread, between polls: never inside a request
            hurry = ((not self.ready.is_set() and started < hurry_until)
                     or (answered and self.holder.current is None))
            next_poll = started + (min(self.config.poll_interval, FIRST_RETRY_S) if hurry else self.config.poll_interval)
            # an early poll that found no other alias (or failed) is not repeated before the next
            # regular one: a version missing for good (a shard restored without it) costs one extra
            # poll per interval, not one a second
            may_poll_early = not early or self._alias_version != alias_before
            early = False
            gauge_at = 0.0
            while not stop.wait(max(0.0, min(EARLY_POLL_CHECK_S, next_poll - time.monotonic()))):
                now = time.monotonic()
                if now >= gauge_at:
                    gauge_at = now + GAUGE_REFRESH_S
                    staleness = self.holder.staleness()
                    if staleness is not None:
                        self.metrics.staleness.set(staleness)
                if now >= next_poll:
                    break
                if may_poll_early and self.version_gone.is_set() and now >= started + EARLY_POLL_MIN_S:
                    early = True
                    break

    def _upkeep(self) -> None:
        """Run each `between_polls` step; one that raises is logged and counted as a sync failure and
        the next step and the next poll go on. Unguarded, one unexpected exception (a 2,000-level
        nested experiments file broke PyYAML with RecursionError) ended this thread for good: no
        more polls, no more reloads, and nothing said so."""
        for upkeep in self.between_polls:
            try:
                upkeep()
            except Exception:  # noqa: BLE001 - the sync thread must survive any failure of an upkeep step
                self.metrics.sync_failures.inc()
                log.exception("upkeep between polls failed (%s); the sync thread goes on",
                              getattr(upkeep, "__name__", upkeep))

    def close(self) -> None:
        self.users.close()
        if self._retired_users is not None:
            self._retired_users.close()
        if self._client is not None:
            self._client.close()
