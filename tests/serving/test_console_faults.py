"""The console's server side against faults: real `streamrec serve` workers on loopback whose
metrics sources are real HTTP servers of this test (tests/serving/console_fakes.py), a real
parameter server, the real sync thread and item catalogue.

Each test names the fault it pins: /ui/api/overview broken for good by one bad source, a half-parsed
source counted while shown as down, a trickling source holding every overview, a spike of events/s
when one trainer misses a scrape, item ids sorted in a request after every swap, the catalogue's title
search building every match, static files without Cache-Control or framing guards, "." and ".." ids
unreachable in a path.
"""

from __future__ import annotations

import concurrent.futures
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from streamrec.param_server.client import ParamClient
from streamrec.serving.config import ServingConfig
from streamrec.serving.console.catalogue import Catalogue
from streamrec.serving.console.search import PrefixSearch
from streamrec.serving.metrics import serving_metrics
from streamrec.serving.state import StateHolder
from streamrec.serving.sync import Syncer
from streamrec.serving.users import UserCache
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import Serving, serving_factory, wait_for, write_history
from tests.serving.console_fakes import (
    DIM,
    ITEMS,
    add_item,
    fake_sources,
    flood,
    model_server,
    sources_env,
    text,
    trickle,
)

TOKEN = "console-faults"
GOOD = 'streamrec_param_server_table_rows{table="bpr_users"} 10\n'
NO_LE = ('# TYPE streamrec_serving_request_seconds histogram\n'
         'streamrec_serving_request_seconds_bucket{endpoint="/recommend"} 3\n')
HALF = ('streamrec_trainer_events_consumed_total 1000000\n'
        'streamrec_param_server_table_rows{table="bpr_users"} 777777\n'
        'this is { not metrics\n')
TYPO = "http://127.0.0.1:9101:metrics"  # httpx.InvalidURL: "Invalid port"
SLOW_CLIENT_S = 30.0  # a bound on a request that used to hang for ever, never a measurement
MAX_BODY_BYTES = 4 << 20  # streamrec.serving.console.overview.MAX_BODY_BYTES (not imported: the old code lacks it)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with model_server(tmp_path_factory.mktemp("console-faults-ps")) as server:
        yield server


@pytest.fixture
def serve(model: ServerProcess, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Serving]]:
    """serve(sources) -> a `streamrec serve` worker on the module's model and the test's feature
    prefix, with the API token and `sources` as STREAMREC_METRICS_SOURCES; stopped at the end."""
    start, started = serving_factory(tmp_path / "home")

    def serve(sources: dict[str, str] | None = None) -> Serving:
        return start(model.address, redis_url, prefix, api_token=TOKEN, extra_env=sources_env(sources or {}))

    yield serve
    for serving in started:
        serving.stop()


@pytest.fixture(scope="module")
def plain(model: ServerProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """One worker without metrics sources, shared by the tests of the page's routes and headers
    (`plain.prefix`: its feature-store prefix)."""
    start, _ = serving_factory(tmp_path_factory.mktemp("console-faults-plain"))
    prefix = f"console-faults-{uuid.uuid4().hex[:8]}"
    serving = start(model.address, redis_url, prefix, api_token=TOKEN)
    serving.prefix = prefix
    yield serving
    serving.stop()
    FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)).clear()


def api(serving: Serving, path: str, timeout: float = 10.0, **params: object) -> httpx.Response:
    return httpx.get(serving.url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=timeout)


def overview(serving: Serving, timeout: float = 10.0) -> dict[str, Any]:
    reply = api(serving, "/ui/api/overview", timeout)
    assert reply.status_code == 200, reply.text
    return reply.json()["now"]


def by_name(sample: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {source["name"]: source for source in sample["sources"]}


def next_sample(serving: Serving, after: float) -> dict[str, Any]:
    """The first sample taken after `after` (pages share one scrape per 0.5 s)."""
    def newer() -> dict[str, Any] | None:
        sample = overview(serving)
        return sample if sample["t"] > after else None

    return wait_for(newer)


# ---- the overview ----------------------------------------------------------------------------------
def test_a_source_with_a_bad_url_or_a_bucket_without_le_is_down_and_the_overview_answers(serve) -> None:
    """httpx.InvalidURL (a typo in STREAMREC_METRICS_SOURCES) and a latency bucket without `le`
    (KeyError) escaped the scrape: every /ui/api/overview was a 500 for as long as they lasted."""
    with fake_sources({"/good": text(GOOD), "/nole": text(NO_LE)}) as fake:
        serving = serve({"good": fake.url("/good"), "typo": TYPO, "nole": fake.url("/nole")})
        sample = overview(serving)
    sources = by_name(sample)
    assert sources["good"]["up"] and sources["serving"]["up"], sources
    assert not sources["typo"]["up"] and "invalid URL" in sources["typo"]["error"], sources["typo"]
    assert not sources["nole"]["up"] and "le" in sources["nole"]["error"], sources["nole"]
    assert sample["ps_tables"] == {"bpr_users": 10}
    assert "typo" in serving.log.read_text()  # the URL is refused once, when the sources are read


def test_a_source_that_breaks_half_way_adds_nothing(serve) -> None:
    """An unparsable answer's samples above the bad line went into the page's totals while the
    source was shown as down (777,777 more parameter-server rows)."""
    with fake_sources({"/good": text(GOOD), "/half": text(HALF)}) as fake:
        serving = serve({"good": fake.url("/good"), "half": fake.url("/half")})
        sample = overview(serving)
    half = by_name(sample)["half"]
    assert not half["up"] and half["error"].startswith("unparsable metrics"), half
    assert sample["ps_tables"] == {"bpr_users": 10} and sample["ps_rows"] == 10


def test_a_trickling_or_huge_source_is_down_and_every_overview_still_answers(serve) -> None:
    """httpx's timeout is per read: a source sending a line every 0.2 s held the scrape, and every
    overview request queued behind its lock, for ever; a huge answer was read whole."""
    with fake_sources({"/good": text(GOOD), "/trickle": trickle(), "/flood": flood(MAX_BODY_BYTES + (1 << 20))}) as fake:
        serving = serve({"good": fake.url("/good"), "trickle": fake.url("/trickle"), "flood": fake.url("/flood")})
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            samples = list(pool.map(lambda _: overview(serving, SLOW_CLIENT_S), range(3)))
    for sample in samples:
        sources = by_name(sample)
        assert sources["good"]["up"] and sample["ps_tables"] == {"bpr_users": 10}, sample
        assert not sources["trickle"]["up"] and "within" in sources["trickle"]["error"], sources["trickle"]
        assert not sources["flood"]["up"] and "cap" in sources["flood"]["error"], sources["flood"]


def exposition(consumed: float) -> str:
    registry = CollectorRegistry()
    Counter("streamrec_trainer_events_consumed", "", registry=registry).inc(consumed)
    return generate_latest(registry).decode()


def test_events_per_second_is_each_sources_own_rate_summed(serve) -> None:
    """The rate came from the counter summed over sources: when one of two trainers missed a scrape
    and came back, its whole counter counted as new events (2,000,030 events/s instead of 20)."""
    with fake_sources({"/a": text(exposition(30)), "/b": text(exposition(2_000_000))}) as fake:
        serving = serve({"a": fake.url("/a"), "b": fake.url("/b")})
        first = overview(serving)
        assert all(s["up"] for s in first["sources"]), first["sources"]
        fake.answers["/b"] = text("unavailable\n", 503)
        missed = next_sample(serving, first["t"])
        assert not by_name(missed)["b"]["up"]
        fake.answers["/b"] = text(exposition(2_000_000))
        back = next_sample(serving, missed["t"])
    assert by_name(back)["b"]["up"]
    # neither counter moved: no events, whichever source missed a scrape
    assert missed["events_per_s"] == 0.0 and back["events_per_s"] == 0.0, (missed, back)


def test_figures_sum_each_sources_rate_and_latency_interval() -> None:
    """The figures from Readings: each source's rate over its own interval (one that missed a
    scrape spans the two), summed; a counter that went back counts from 0."""
    from streamrec.serving.console.figures import Reading, Totals, figures  # here: the old module lacks Reading

    def reading(consumed: float, at: float) -> Reading:
        return Reading(Totals.parse(exposition(consumed)), at)

    before = {"a": reading(100, 0.0), "b": reading(1000, -2.0)}  # b's last reading is older: it missed one
    now = {"a": reading(120, 1.0), "b": reading(1030, 1.0)}
    assert figures(now, before)["events_per_s"] == pytest.approx(20 + 10)
    assert figures({"a": reading(5, 1.0)}, {"a": reading(100, 0.0)})["events_per_s"] == 5.0  # restarted
    registry = CollectorRegistry()
    latency = Histogram("streamrec_serving_request_seconds", "", ["endpoint"], buckets=(0.01, 1.0), registry=registry)
    latency.labels("/recommend").observe(0.005)
    slow = Totals.parse(generate_latest(registry).decode())
    assert figures({"s": Reading(slow, 1.0)}, {"s": Reading(slow, 0.0)})["serving_p99_ms"] is None


# ---- item search -----------------------------------------------------------------------------------
@contextmanager
def tracing_sorts() -> Iterator[list[str]]:
    """The names of sorting calls made on this thread meanwhile (sorted(), list.sort, np.sort,
    argsort, sort_values, this module's sorted_gently): the structure of a request, not its time."""
    names = {"sort", "sorted", "argsort", "sort_values", "lexsort", "sorted_gently"}
    seen: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        name = getattr(arg, "__name__", "") if event == "c_call" else frame.f_code.co_name if event == "call" else ""
        if name in names:
            seen.append(name)

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def test_item_search_sorts_on_the_sync_thread_never_in_a_request(param_server: ServerProcess, redis_url: str) -> None:
    """The first search after each swap sorted every item id in the request (~450 ms at 300k items,
    ~3 s at 1M, GIL held). The sync thread's upkeep now keeps them sorted; a search in a state newer
    than the last refresh uses the ids sorted so far and says it is incomplete."""
    with ParamClient([param_server.address]) as client:
        rng = np.random.default_rng(1)
        client.create_table("bpr_users", DIM)
        client.create_table("bpr_items", DIM, scalars=1)
        client.assign("bpr_items", ITEMS, rng.normal(size=(len(ITEMS), DIM)).astype(np.float32),
                      np.zeros(len(ITEMS), np.float32))
    metrics = serving_metrics()
    config = ServingConfig(param_servers=[param_server.address], redis_url=redis_url, poll_interval=0.05)
    holder = StateHolder()
    search = PrefixSearch(holder)
    syncer = Syncer(config, holder, metrics, UserCache(config, metrics), between_polls=(search.refresh,))
    try:
        assert syncer.poll()
        with holder.use() as state:  # no refresh yet: a bounded scan of the first rows
            early = search.items(state, "i00", 3)
        assert early.ids == ["i000", "i001", "i002"] and early.complete
        syncer._upkeep()  # what the sync thread runs after each poll
        assert search.full_sorts == 1
        for n in range(3):  # new ids, then a swap to the other buffer: each a new state
            add_item(param_server, f"i00{n}-new", seed=n)
            assert syncer.poll()
            with holder.use() as state, tracing_sorts() as sorts:
                stale = search.items(state, f"i00{n}", 5)
            assert sorts == [], sorts
            assert f"i00{n}-new" not in stale.ids and not stale.complete  # added by this poll, not yet indexed
            syncer._upkeep()
            with holder.use() as state, tracing_sorts() as sorts:
                fresh = search.items(state, f"i00{n}", 5)
            assert sorts == [] and fresh.complete and fresh.ids == [f"i00{n}", f"i00{n}-new"], (sorts, fresh)
            assert fresh.total == len(ITEMS) + n + 1
        assert search.full_sorts == 1  # the refreshes after the first inserted the new ids only
        with holder.use() as state:
            assert search.items(state, "value", 5).ids == ["valueOf"]
            assert search.items(state, ".", 5).ids == [".", ".."]
    finally:
        syncer.close()


def test_item_search_over_http_finds_an_item_added_while_serving(plain: Serving, model: ServerProcess) -> None:
    """The worker's sync thread runs the search's refresh (streamrec.serving.app wires it as an
    upkeep step): an item added to the model is found, and the answer says the search was whole."""
    serving = plain
    first = api(serving, "/ui/api/items", q="i00", limit=3).json()
    assert [e["item_id"] for e in first["items"]] == ["i000", "i001", "i002"]
    add_item(model, "i000-added")

    def both_found() -> dict[str, Any] | None:
        body = api(serving, "/ui/api/items", q="i000", limit=5).json()
        return body if body.get("complete") and len(body["items"]) == 2 else None

    found = wait_for(both_found)
    assert [e["item_id"] for e in found["items"]] == ["i000", "i000-added"]
    assert all(e["served"] for e in found["items"])


class CountedTitles(list):
    """The catalogue's lowered titles, counting how many a search reads."""

    read = 0

    def __iter__(self) -> Iterator[str]:
        for title in super().__iter__():
            self.read += 1
            yield title


def test_title_search_stops_at_the_limit(tmp_path: Path) -> None:
    """title_matches built the list of every matching item before slicing it to `limit`."""
    catalogue_file = tmp_path / "items.csv"
    catalogue_file.write_text("item_id,title,genres\n" + "".join(f"m{n},Movie {n},Drama\n" for n in range(1000)))
    catalogue = Catalogue.load(catalogue_file)
    catalogue._lowered = CountedTitles(catalogue._lowered)
    assert catalogue.title_matches("movie", 5) == ["m0", "m1", "m2", "m3", "m4"]
    assert catalogue._lowered.read == 5


# ---- the page's routes and headers -----------------------------------------------------------------
def test_page_and_static_files_carry_cache_and_framing_headers(plain: Serving) -> None:
    """Static files had no Cache-Control (browsers kept an old console.js after an upgrade by
    heuristic caching), and no response forbade framing or content sniffing."""
    serving = plain
    for path in ("/ui/", "/ui/static/console.js", "/ui/static/console.css"):
        reply = httpx.get(serving.url + path)
        assert reply.status_code == 200, (path, reply.status_code)
        headers = reply.headers
        assert headers.get("cache-control") == "no-cache", (path, headers)
        assert headers.get("x-frame-options") == "DENY", (path, headers)
        assert headers.get("x-content-type-options") == "nosniff", (path, headers)
        assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), (path, headers)
        revalidated = httpx.get(serving.url + path, headers={"If-None-Match": headers.get("etag", "none")})
        if revalidated.status_code == 304:
            assert revalidated.headers.get("cache-control") == "no-cache", (path, revalidated.headers)


def test_ids_reach_the_console_as_query_parameters(plain: Serving, redis_url: str) -> None:
    """The page put user and item ids in a path segment, where "." and ".." are resolved away by
    the browser; the query forms take any id, and the path forms still answer."""
    serving = plain
    write_history(FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=plain.prefix)), [("..", "i001", 5.0)])
    assert [e["item_id"] for e in api(serving, "/ui/api/history", user_id="..").json()["items"]] == ["i001"]
    assert api(serving, "/ui/api/history", user_id=".").json()["items"] == []
    for item in (".", ".."):
        similar = api(serving, "/ui/api/similar", item_id=item, k=3)
        assert similar.status_code == 200 and similar.json()["item_id"] == item and len(similar.json()["items"]) == 3
    assert api(serving, "/ui/api/similar", item_id="nope").status_code == 404
    assert api(serving, "/ui/api/users/u1/history").status_code == 200  # the path forms stay
    assert api(serving, "/similar/i001").status_code == 200
