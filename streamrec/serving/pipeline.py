"""The request pipeline: candidates from several sources -> union -> rescore -> seen-filter ->
MMR -> top k; plus rescoring given candidates and similar items. Everything is computed from one
`ServingState`, vectorised over candidates (the only Python loops are MMR's k picks, building the
k result objects, and the hash lookups of a short list of history ids, see `rows_of`)."""

from __future__ import annotations

import time
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd

from streamrec.param_server.replica import TableMirror
from streamrec.serving.config import ServingConfig
from streamrec.serving.context import NO_CONTEXT, ContextPopularity, RequestContext
from streamrec.serving.experiments import Arm
from streamrec.serving.explore import ExplorationPool, closest, slots, thompson
from streamrec.serving.filters import NO_FILTER, ItemFilter
from streamrec.serving.history import History
from streamrec.serving.index import index_rows, query_rows
from streamrec.serving.metrics import ServingMetrics
from streamrec.serving.mmr import mmr
from streamrec.serving.state import ServingState
from streamrec.trainer.online.feature_store import SessionState, UserHistory
from streamrec.trainer.online.session import faded_weight

SOURCES = ("ann", "item_knn", "trending")  # bit i of a candidate's source mask
ALL_SOURCES = frozenset(SOURCES)
SOURCE_BITS = np.array(  # source mask -> its bit per source, so counts per source are one matrix product
    [[mask >> i & 1 for i in range(len(SOURCES))] for mask in range(1 << len(SOURCES))])
_SOURCE_LISTS = [[s for i, s in enumerate(SOURCES) if mask >> i & 1] for mask in range(1 << len(SOURCES))]
SMALL_LOOKUP = 64  # id lists up to this long are looked up one id at a time (rows_of)
FILTER_OVERFETCH = 4  # a filtered request first takes this many times its ANN candidates, then keeps the allowed


class Unavailable(RuntimeError):
    """Nothing to answer with yet (no model loaded and no fallback): HTTP 503."""


class UnknownItem(KeyError):
    """An item neither the item table nor the kNN artifact knows: HTTP 404."""


def _note_redis(degraded: list[str]) -> None:
    if "redis" not in degraded:
        degraded.append("redis")


def rows_of(mirror: TableMirror, ids: list[str]) -> np.ndarray:
    """Rows of `ids`, -1 where unknown or deleted. A request's recent items are ~10 ids:
    `TableMirror.positions` first builds a pandas Index of them (~60 us a call in the profile), one
    hash lookup per id costs ~0.3 us, so short lists are looked up one by one."""
    if len(ids) > SMALL_LOOKUP:
        return mirror.positions(ids)
    return np.fromiter((mirror.position(item) for item in ids), np.int64, len(ids))


def _unseen(ids: list[str], scores: list[float], seen: set[str], k: int, source: str) -> list[dict[str, Any]]:
    """The first k of `ids` not in `seen`, as answer items from `source`."""
    unseen = ((i, s) for i, s in zip(ids, scores) if i not in seen)
    return [{"item_id": i, "score": float(s), "sources": [source]} for i, s in islice(unseen, k)]


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


def allowed_rows(state: ServingState | None, rules: ItemFilter, requested: ItemFilter) -> np.ndarray | None:
    """The item rows a request may return: the configured `rules` the catalogue can apply and the
    request's own filter (FilterError when it names what the catalogue lacks); None when nothing
    restricts the answer."""
    catalogue = state.artifacts.catalogue if state is not None else None
    requested.check(catalogue)
    combined = rules.applicable(catalogue).merged(requested)
    if not combined or state is None:
        return None
    return state.allowed_rows(combined, time.time())


def ann_within(state: ServingState, query: np.ndarray, want: int, enough: int, allowed: np.ndarray) -> np.ndarray:
    """Up to `want` ANN candidates among the allowed rows. First an over-fetch (FILTER_OVERFETCH
    times `want`) keeping the allowed ones; when fewer than `enough` survive, a FAISS search
    restricted to the allowed rows by an ID selector; when the index's probes still miss some (the
    IVF lists probed hold too few allowed items), an exact search over the allowed rows, so a
    filtered request gets `enough` candidates whenever that many items are allowed."""
    index = state.index
    fetched = min(index.size, want * FILTER_OVERFETCH)
    _, found = index.search(query, fetched)
    rows = found[0][found[0] >= 0]
    rows = rows[allowed[rows]]
    if len(rows) >= enough or fetched >= index.size:
        return rows[:want]
    _, found = index.search_within(query, want, allowed)
    rows = found[0][found[0] >= 0]
    if len(rows) >= min(enough, int(allowed.sum())):
        return rows
    candidates = np.flatnonzero(allowed)
    return candidates[top_order(index_rows(state.items, candidates) @ query[0], want)]


class CandidatePipeline:
    """Answers /recommend, /rescore and /similar from one `ServingState` per request: gathers
    candidates from every source, scores them with the published ranker (or the retrieval model)
    and picks the top k, optionally diversified with MMR."""

    def __init__(self, config: ServingConfig, history: History, metrics: ServingMetrics,
                 explore: ExplorationPool | None = None, context: ContextPopularity | None = None) -> None:
        self.config, self.history, self.explore, self.context = config, history, explore, context
        self._explored = metrics.recommended.labels("explore")
        self._contextual = metrics.recommended.labels("context")
        self._rng = np.random.default_rng(config.explore_seed)
        self._candidates = [metrics.candidates.labels(s) for s in SOURCES]
        self._recommended = [metrics.recommended.labels(s) for s in SOURCES]
        self._fallback = {r: metrics.degraded.labels(r) for r in ("cold_start", "prior", "param_server")}
        self._trending_cache: tuple[ServingState, list, np.ndarray, np.ndarray] | None = None
        self.rules = ItemFilter.parse_rules(config.item_rules)  # ServingConfig has checked them

    # ---- shared -------------------------------------------------------------------------------
    def _user(self, state: ServingState, user_id: str, degraded: list[str],
              session: SessionState | None = None) -> tuple[np.ndarray, float] | None:
        """(p_u, b_u) of a user with a vector, else None; "param_server" joins `degraded` when the
        user is not cached and the parameter server did not answer (the user is served as unknown).
        `session`: the feature store's count of the user's events and the position of their newest
        (`UserCache.get` pulls a row that lags them)."""
        users, dim = state.users, state.items.dim
        values, reachable = (users.get(user_id) if session is None
                             else users.get(user_id, session.events, session.position))
        if not reachable:
            degraded.append("param_server")
            self._fallback["param_server"].inc()
        if values is None:
            return None
        if users.dim != dim:
            raise Unavailable(f"user table dim {users.dim} != item table dim {dim}: check user_table/item_table")
        return values[:dim].astype(np.float32), float(values[dim]) if len(values) > dim else 0.0

    @staticmethod
    def _scores(state: ServingState, rows: np.ndarray, user: tuple[np.ndarray, float]) -> dict[str, np.ndarray]:
        items, (p_u, b_u) = state.items, user
        values = items.values[rows]
        dot = values[:, : items.dim] @ p_u
        bias = values[:, items.dim] if items.scalars else np.zeros(len(rows), np.float32)
        return {"dot": dot.astype(np.float64), "bias": bias.astype(np.float64) + b_u}

    def _rank(self, state: ServingState, user_id: str, rows: np.ndarray, features: dict[str, np.ndarray],
              interacted: set[str] | None) -> np.ndarray:
        """The published ranking model's scores, else the retrieval model's (dot + biases).
        `interacted`: the user's items now (Redis), for a ranker that pools them; None without Redis."""
        ranker = state.artifacts.ranker
        if ranker is None:
            return features["dot"] + features["bias"]
        return np.asarray(ranker.score(features, user_id, state.item_ids[rows], interacted), dtype=np.float64)

    @staticmethod
    def _ranker_reads_history(state: ServingState | None) -> bool:
        return state is not None and state.artifacts.ranker is not None and state.artifacts.ranker.uses_history

    # ---- /recommend ---------------------------------------------------------------------------
    def history_wanted(self, state: ServingState | None, exclude_seen: bool,
                       user_id: str) -> tuple[int, bool, bool]:
        """What `recommend` needs from the user's history: (recent items for item-kNN candidates,
        for the fold-in of a user not known to have a row and for the session of one who may have
        one; whether the seen set is needed: the seen filter or a ranker that pools the user's
        items; whether the session's state is needed)."""
        if state is None:
            return 0, exclude_seen, False
        fold_in = 0 if state.users.cached_with_row(user_id) else self.config.fold_in_events
        session = self.config.session_weight > 0  # the row may come with the request (a pull)
        recent = max(self._knn_recent(state), fold_in, self.config.session_items if session else 0)
        return recent, exclude_seen or self._ranker_reads_history(state), session

    def _knn_recent(self, state: ServingState | None) -> int:
        """Recent items whose neighbours are candidates: none without an item-kNN artifact."""
        wants_recent = state is not None and state.artifacts.knn is not None and self.config.knn_per_item
        return self.config.knn_recent if wants_recent else 0

    def recommend(self, state: ServingState | None, user_id: str, k: int, exclude_seen: bool,
                  diversity: float, explain: bool, history: UserHistory | None,
                  item_filter: ItemFilter = NO_FILTER, arm: Arm | None = None,
                  context: RequestContext = NO_CONTEXT) -> dict[str, Any]:
        """`history`: what `history_wanted` asked of Redis (`History.user_history_async`), None
        when Redis did not answer (the request is served without it and says so). `item_filter`
        and the configured rules restrict every candidate source; FilterError when the filter
        cannot be applied. `arm`, the user's experiment arm, may replace the list's source
        (popularity), the diversity and the candidate sources. `context` (device, hour) picks
        the popularity slices a user without a row is served from (streamrec.serving.context)."""
        if arm is not None and arm.diversity is not None:
            diversity = arm.diversity
        sources = frozenset(arm.candidates) if arm is not None and arm.candidates else ALL_SOURCES
        allowed = allowed_rows(state, self.rules, item_filter)
        degraded: list[str] = []
        wants_seen = exclude_seen or self._ranker_reads_history(state)
        interacted: set[str] | None = None
        if history is None:
            _note_redis(degraded)
            history = UserHistory([], set())
        elif wants_seen:
            interacted = history.seen
        recent, seen = history.recent, history.seen if exclude_seen else set()
        user = self._user(state, user_id, degraded, history.session) if state is not None else None
        folded, in_session, popular = 0, 0, arm is not None and arm.source == "popularity"
        if user is None and state is not None and recent and not popular:
            user, folded = self._fold_in(state, recent[: self.config.fold_in_events])
        elif user is not None and state is not None and not popular:
            user, in_session = self._with_session(state, user, history)
        recent = recent[: self._knn_recent(state)]  # the rest was read for the fold-in only
        if user is None or popular:
            body = self._cold_start(state, k, seen, degraded, allowed, None if popular else context)
            body["cold_start"] = user is None
        else:
            body = self._personal(state, user_id, recent, user, k, seen, interacted, diversity, explain, degraded,
                                  allowed, sources)
            if folded:
                body.update(cold_start=True, fold_in=folded)
            elif in_session:
                body["session"] = in_session
        share = arm.explore if arm is not None and arm.explore is not None else self.config.explore_share
        if share and state is not None and self.explore is not None:
            self._explore(state, body, k, share, seen, allowed, None if popular else user)
        if "redis" in degraded:
            self.history.count_degraded()
        body["degraded"] = degraded
        return body

    def _fold_in(self, state: ServingState, recent: list[str]) -> tuple[tuple[np.ndarray, float] | None, int]:
        """A user without a row but with events: `fold_in_weight` times the mean vector of their
        most recent items that have rows (the online BPR's own scoring of a new user's session),
        and how many items it took; (None, 0) when none of them has a row."""
        rows = rows_of(state.items, recent)
        rows = rows[rows >= 0]
        if not len(rows):
            return None, 0
        vectors = index_rows(state.items, rows)[:, : state.items.dim].astype(np.float32)
        return (self.config.fold_in_weight * vectors.mean(axis=0), 0.0), len(rows)

    def _with_session(self, state: ServingState, user: tuple[np.ndarray, float], history: UserHistory,
                      ) -> tuple[tuple[np.ndarray, float], int]:
        """The user's row plus their current session's mean item vector, weighted as the online
        model weighs it (`faded_weight`, by the user's events), and how many items it took: the
        model's own score of the user. A row the trainer learned from a burst's first few events
        ranks little of what the burst was about, while the session already holds all of it
        (docs/performance.md, "Freshness"). No session (none read, ended, or no item with a row):
        the row alone."""
        if history.session is None:
            return user, 0
        config = self.config
        clock = self.history.clock()
        items = history.session_items(history.session.last_seen if clock is None else clock, config.session_gap,
                                      config.session_items)
        rows = rows_of(state.items, items)
        rows = rows[rows >= 0]
        if not len(rows):
            return user, 0
        weight = faded_weight(config.session_weight, config.session_fade, float(history.session.events))
        mean = index_rows(state.items, rows)[:, : state.items.dim].mean(axis=0)
        p_u, b_u = user
        return ((p_u + weight * mean).astype(np.float32), b_u), len(rows)

    def _explore(self, state: ServingState, body: dict[str, Any], k: int, share: float, seen: set[str],
                 allowed: np.ndarray | None, user: tuple[np.ndarray, float] | None) -> None:
        """Give the answer's last slots (`share` of k) to fresh items by Thompson sampling
        (streamrec.serving.explore); items seen, excluded or already listed are not drawn. With a
        `user` vector the draws are among the `explore_candidates` eligible items it scores highest."""
        n = slots(share, k, self._rng)
        fresh, rows = self.explore.rows(state) if n else (None, None)
        if fresh is None or not len(fresh):
            return
        eligible = rows >= 0
        if allowed is not None:
            eligible &= allowed[np.maximum(rows, 0)]
        listed = [entry["item_id"] for entry in body["items"]]
        eligible &= ~pd.Index(fresh.ids).isin([*listed, *seen])
        if user is not None and self.config.explore_candidates and eligible.sum() > self.config.explore_candidates:
            scores = index_rows(state.items, np.maximum(rows, 0)) @ query_rows(user[0][None], state.items)[0]
            eligible = closest(scores, eligible, self.config.explore_candidates)
        picks, draws = thompson(fresh, eligible, n, self.config.explore_prior, self._rng)
        if not len(picks):
            return
        kept = body["items"][: max(0, min(len(listed), k - len(picks)))]
        body["items"] = kept + [{"item_id": item, "score": draw, "sources": ["explore"]}
                                for item, draw in zip(fresh.ids[picks].tolist(), draws.tolist())]
        self._explored.inc(len(picks))

    def _cold_start(self, state: ServingState | None, k: int, seen: set[str], degraded: list[str],
                    allowed: np.ndarray | None, context: RequestContext | None = None) -> dict[str, Any]:
        """A user without a vector: the items popular in the request's `context` where its slices
        have proven useful, then trending items, then (to fill k, and all of them without Redis) the
        items with the largest bias.
        Filtered, the allowed ones among trending, then the allowed items by bias until there are k."""
        if allowed is not None and state is not None:
            return self._cold_start_within(state, k, seen, degraded, allowed)
        ranked = self.context.rank(context, k + len(seen)) if context is not None and self.context is not None \
            else None
        if ranked is not None:
            return self._cold_start_in_context(state, k, seen, degraded, *ranked)
        trending = self.history.trending(k + len(seen))
        if trending is None:
            _note_redis(degraded)
        by_bias = state if state is not None and len(state.prior) else None
        if not trending and by_bias is None:
            raise Unavailable("no model loaded yet and no trending items")
        self._fallback["cold_start"].inc()
        items: list[dict[str, Any]] = []
        if trending:
            items = _unseen([item for item, _ in trending], [score for _, score in trending], seen, k, "trending")
        if len(items) < k and by_bias is not None:  # a short trending list is filled by the items of largest bias
            listed = {*seen, *(item["item_id"] for item in items)}
            head = by_bias.prior[: k + len(listed)]  # enough however many of them are listed
            ids = by_bias.item_ids[head]
            scores = by_bias.items.values[head, by_bias.items.dim] if by_bias.items.scalars else np.zeros(len(ids))
            extra = _unseen(ids.tolist(), np.asarray(scores, float).tolist(), listed, k - len(items), "prior")
            if extra:  # counted as the filtered path counts it: when the prior gave items
                self._fallback["prior"].inc()
            items += extra
        return {"cold_start": True, "items": items}

    def _cold_start_in_context(self, state: ServingState | None, k: int, seen: set[str], degraded: list[str],
                               ids: np.ndarray, scores: np.ndarray, slices: list[str]) -> dict[str, Any]:
        """The context's list without the seen items; trending items fill it to k when it is short."""
        keep = ~pd.Index(ids).isin(list(seen)) if seen else np.ones(len(ids), bool)
        ids, scores = ids[keep][:k], scores[keep][:k]
        items = [{"item_id": i, "score": s, "sources": ["context"]} for i, s in zip(ids.tolist(), scores.tolist())]
        self._contextual.inc(len(items))
        if len(items) < k:
            rest = self._cold_start(state, k, {*seen, *ids.tolist()}, degraded, None)["items"]
            items += rest[: k - len(items)]
        else:
            self._fallback["cold_start"].inc()
        return {"cold_start": True, "context": slices, "items": items}

    def _cold_start_within(self, state: ServingState, k: int, seen: set[str], degraded: list[str],
                           allowed: np.ndarray) -> dict[str, Any]:
        allowed = allowed.copy()
        seen_rows = rows_of(state.items, list(seen))
        allowed[seen_rows[seen_rows >= 0]] = False
        trending = self.history.trending(self.config.trending_candidates + k + len(seen))
        if trending is None:
            _note_redis(degraded)
            trending = []
        rows, popularity = self._trending_rows(state, trending) if trending else (np.zeros(0, np.int64), np.zeros(0))
        keep = allowed[rows]
        rows, popularity = rows[keep][:k], popularity[keep][:k]
        sources = ["trending"] * len(rows)
        if len(rows) < k:  # the rest by the learned item bias (the model's popularity prior)
            allowed[rows] = False
            candidates = np.flatnonzero(allowed)
            bias = index_rows(state.items, candidates)[:, -1] if state.items.scalars else np.zeros(len(candidates))
            order = top_order(bias, k - len(rows))
            extra = candidates[order]
            rows, popularity = np.concatenate([rows, extra]), np.concatenate([popularity, bias[order]])
            sources += ["prior"] * len(extra)
            if len(extra):
                self._fallback["prior"].inc()
        self._fallback["cold_start"].inc()
        return {"cold_start": True, "items": [{"item_id": i, "score": float(s), "sources": [source]}
                                                for i, s, source in zip(state.item_ids[rows].tolist(),
                                                                        popularity.tolist(), sources)]}

    def _trending_rows(self, state: ServingState, trending: list[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and popularity of the trending list, computed once per (state, trending list)."""
        cached = self._trending_cache
        if cached is not None and cached[0] is state and cached[1] is trending:
            return cached[2], cached[3]
        rows = state.items.positions([item for item, _ in trending])
        popularity = np.array([score for _, score in trending])[rows >= 0]
        rows = rows[rows >= 0]
        self._trending_cache = (state, trending, rows, popularity)
        return rows, popularity

    def _item_knn(self, state: ServingState, recent_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and scores of the neighbours of the user's recent items (artifact order)."""
        knn, per_item = state.artifacts.knn, self.config.knn_per_item
        rows = state.knn_item_row[recent_rows]
        rows = rows[rows >= 0]
        neighbors, scores = knn.neighbors[rows, :per_item].ravel(), knn.scores[rows, :per_item].ravel()
        valid = neighbors >= 0
        item_rows = state.knn_neighbor_row[neighbors[valid]]
        return item_rows[item_rows >= 0], scores[valid][item_rows >= 0]

    def _personal(self, state: ServingState, user_id: str, recent: list[str], user: tuple[np.ndarray, float], k: int,
                  seen: set[str], interacted: set[str] | None, diversity: float, explain: bool,
                  degraded: list[str], allowed: np.ndarray | None, sources: frozenset[str]) -> dict[str, Any]:
        c, items = self.config, state.items
        looked_up = rows_of(items, [*recent, *seen])
        recent_rows, seen_rows = looked_up[: len(recent)], looked_up[len(recent) :]
        recent_rows, seen_rows = recent_rows[recent_rows >= 0], seen_rows[seen_rows >= 0]
        # sources
        query, want = query_rows(user[0][None], items), max(c.ann_candidates, k) + len(seen_rows)
        ann = np.zeros(0, np.int64)
        if "ann" in sources and allowed is None:
            _, ann = state.index.search(query, want)
            ann = ann[0][ann[0] >= 0]
        elif "ann" in sources:
            ann = ann_within(state, query, want, k + len(seen_rows), allowed)
        knn_rows, knn_scores = (self._item_knn(state, recent_rows) if len(recent_rows) and "item_knn" in sources
                                else (np.zeros(0, np.int64), np.zeros(0)))
        trending = self.history.trending(c.trending_candidates) if "trending" in sources else []
        trend_rows, trend_pop = np.zeros(0, np.int64), np.zeros(0)
        if trending is None:
            _note_redis(degraded)
        elif trending:
            trend_rows, trend_pop = self._trending_rows(state, trending)
        if allowed is not None:
            keep_knn, keep_trend = allowed[knn_rows], allowed[trend_rows]
            knn_rows, knn_scores = knn_rows[keep_knn], knn_scores[keep_knn]
            trend_rows, trend_pop = trend_rows[keep_trend], trend_pop[keep_trend]
        # union, with per-candidate source bits and source features
        sizes = (len(ann), len(knn_rows), len(trend_rows))
        for counter, size in zip(self._candidates, sizes):
            if size:  # each increment is a locked write to the shared metrics file
                counter.inc(size)
        rows, inverse = np.unique(np.concatenate([ann, knn_rows, trend_rows]), return_inverse=True)
        bits = np.zeros(len(rows), np.uint8)
        np.bitwise_or.at(bits, inverse, np.repeat(np.array([1, 2, 4], np.uint8), sizes))
        knn_score = np.zeros(len(rows))
        np.maximum.at(knn_score, inverse[sizes[0] : sizes[0] + sizes[1]], knn_scores)
        popularity = np.zeros(len(rows))
        popularity[inverse[sizes[0] + sizes[1] :]] = trend_pop
        union = len(rows)
        if len(seen_rows):
            keep = ~np.isin(rows, seen_rows)
            rows, bits, knn_score, popularity = rows[keep], bits[keep], knn_score[keep], popularity[keep]
        # rescore, then pick
        features = self._scores(state, rows, user)
        features.update({"ann": (bits & 1).astype(np.float64), "item_knn": (bits >> 1 & 1).astype(np.float64),
                         "trending": (bits >> 2 & 1).astype(np.float64), "knn_score": knn_score,
                         "popularity": popularity})
        score = self._rank(state, user_id, rows, features, interacted)
        lam = 1.0 - diversity
        mmr_values = None
        if diversity > 0 and len(rows) > 1:
            by_score = np.argsort(-score, kind="stable")  # ties between equal MMR values go to relevance
            picks, mmr_values = mmr(score[by_score], items.values[rows[by_score], : items.dim], k, lam)
            order = by_score[picks]
        else:
            order = top_order(score, k)
        src = bits[order]
        for counter, count in zip(self._recommended, np.bincount(src, minlength=len(SOURCE_BITS)) @ SOURCE_BITS):
            if count:
                counter.inc(int(count))
        ids, scores = state.item_ids[rows[order]].tolist(), score[order].tolist()
        result: list[dict[str, Any]] = [{"item_id": i, "score": s, "sources": _SOURCE_LISTS[b]}
                                        for i, s, b in zip(ids, scores, src.tolist())]
        body: dict[str, Any] = {"cold_start": False, "items": result}
        if explain:
            columns = {name: features[name][order].tolist() for name in ("dot", "bias", "knn_score", "popularity")}
            if mmr_values is not None:
                columns["mmr"] = mmr_values.tolist()
            for position, entry in enumerate(result):
                entry.update({name: values[position] for name, values in columns.items()})
            body["explain"] = {
                "candidates": dict(zip(SOURCES, sizes)), "union": union, "seen_filtered": union - len(rows),
                "lambda": lam, "ranker": state.artifacts.ranker.name if state.artifacts.ranker else None,
            }
        return body

    # ---- /rescore -----------------------------------------------------------------------------
    def rescore(self, state: ServingState | None, user_id: str, candidates: list[str]) -> dict[str, Any]:
        if state is None:
            raise Unavailable("no model loaded yet")
        ids = pd.unique(np.asarray(candidates, dtype=object))
        rows = state.items.positions(ids)
        known = rows >= 0
        degraded: list[str] = []
        user = self._user(state, user_id, degraded)
        cold = user is None
        if cold:  # a zero user vector: the items' biases, the model's popularity prior
            user = (np.zeros(state.items.dim, np.float32), 0.0)
        features = self._scores(state, rows[known], user)
        zeros = np.zeros(int(known.sum()))
        features.update({name: zeros for name in ("ann", "item_knn", "trending", "knn_score", "popularity")})
        interacted = None
        if self._ranker_reads_history(state):
            history = self.history.user_history(user_id, 0, True)
            if history is None:
                _note_redis(degraded)
                self.history.count_degraded()
            else:
                interacted = history.seen
        score = self._rank(state, user_id, rows[known], features, interacted)
        order = np.argsort(-score, kind="stable")
        return {"cold_start": cold, "degraded": degraded, "unknown": ids[~known].tolist(),
                "items": [{"item_id": i, "score": s} for i, s in zip(ids[known][order].tolist(), score[order].tolist())]}

    # ---- /similar -----------------------------------------------------------------------------
    def similar(self, state: ServingState | None, item_id: str, k: int) -> dict[str, Any]:
        if state is None:
            raise Unavailable("no model loaded yet")
        items, knn = state.items, state.artifacts.knn
        row = items.position(item_id)
        in_knn = knn is not None and item_id in knn.index
        if row < 0 and not in_knn:
            raise UnknownItem(item_id)
        nearest: list[dict[str, Any]] = []
        if row >= 0:
            q = items.values[row, : items.dim].astype(np.float32)
            q = q / max(float(np.linalg.norm(q)), 1e-12)
            # inner product on the vector part only (bias weight 0); over-fetch, then exact cosine
            _, cand = state.index.search(query_rows(q[None], items, bias_weight=0.0), 4 * k + 1)
            cand = cand[0][(cand[0] >= 0) & (cand[0] != row)]
            vectors = items.values[cand, : items.dim]
            cosine = vectors @ q / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
            order = top_order(cosine, k)
            nearest = [{"item_id": i, "score": s}
                       for i, s in zip(state.item_ids[cand[order]].tolist(), cosine[order].astype(float).tolist())]
        neighbours = None
        if in_knn:
            ids, scores = knn.lookup([item_id], k)
            neighbours = [{"item_id": i, "score": s} for i, s in zip(ids.tolist(), scores.astype(float).tolist())]
        return {"item_id": item_id, "items": nearest, "item_knn": neighbours}
