"""The web console at /ui in a real browser (Playwright driving Debian's chromium, headless)
against a whole running pipeline (tests/e2e/console_stack.py).

A user is picked, and several items of a genre (a planted item group of the synthetic log) the
user never touched are clicked through the page (POST /events -> broker -> online trainer ->
parameter server -> serving's 1 s poll). The test then waits until the page's recommendations, the
clicked items left out, hold more of that genre than before, with at least two of them items that
were not even in the user's top 10 + clicks before the clicks: the seen-filter alone only removes
the clicked items, so it could bring in nothing below that rank. Screenshots are saved under
$STREAMREC_TEST_ARTIFACTS (else the test's tmp dir); $STREAMREC_CONSOLE_SCREENSHOT names a file
that gets a copy of the final one (docs/console.png is made this way).
"""

from __future__ import annotations

import collections
import os
import shutil
import time
from pathlib import Path

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from streamrec.core.config import Settings
from streamrec.serving.console.catalogue import Catalogue
from streamrec.serving.console.figures import Reading, Totals, figures
from streamrec.stream.synthetic import synthetic_log
from tests.e2e.console_stack import Stack, console_stack

CHROMIUM = Path("/usr/bin/chromium")
CLUSTERS = 6
CLICKS = 6
SHIFT_TIMEOUT_S = 90


def genre(item: str) -> int:
    """The planted group of a synthetic item (`streamrec.stream.synthetic`: item index % clusters)."""
    return int(item[1:]) % CLUSTERS


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure under CI, where chromium must be installed)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        reason = f"playwright is not installed: {exc}"
    else:
        if CHROMIUM.exists():
            return sync_playwright
        reason = f"{CHROMIUM} not found (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ.get("STREAMREC_TEST_ARTIFACTS") or tmp_path / "artifacts") / "console"
    root.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {root}")
    return root


def pick_user(log) -> tuple[str, int, list[str]]:
    """A user with a modest history, a genre they never touched and that genre's most popular
    items (those the model has learned best)."""
    users = collections.Counter(log.user_id.tolist())
    touched: dict[str, set[int]] = {}
    for user, item in zip(log.user_id.tolist(), log.item_id.tolist()):
        touched.setdefault(user, set()).add(genre(item))
    popularity = collections.Counter(log.item_id.tolist())
    for user, count in sorted(users.items(), key=lambda uc: (uc[1], uc[0])):
        untouched = sorted(set(range(CLUSTERS)) - touched[user])
        if count >= 8 and untouched:
            target = untouched[0]
            items = [i for i, _ in popularity.most_common() if genre(i) == target][:CLICKS]
            return user, target, items
    raise AssertionError("no user with an untouched genre in the log")


def shown(page) -> list[str]:
    return page.eval_on_selector_all("#recs tbody tr", "rows => rows.map(r => r.dataset.itemId)")


def test_console_clicks_move_recommendations_toward_the_clicked_genre(settings: Settings, tmp_path, artifacts):
    sync_playwright = browser_or_skip()
    log = synthetic_log(events=12_000, users=300, items=240, clusters=CLUSTERS, affinity=0.9, seed=3)
    user, target, clicks = pick_user(log)
    with console_stack(settings, log, tmp_path / "stack") as stack, sync_playwright() as p:
        before = stack.api("/recommend", user_id=user, k=10 + len(clicks)).json()
        assert not before["cold_start"], before
        reachable = {e["item_id"] for e in before["items"]} - set(clicks)  # what the seen-filter alone could show
        share_before = sum(genre(i) == target for i in reachable) / len(reachable)

        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            run_console(page, stack, user, target, clicks, reachable, share_before, artifacts)
        except BaseException:
            page.screenshot(path=str(artifacts / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def run_console(page, stack: Stack, user: str, target: int, clicks: list[str], reachable: set[str],
                share_before: float, artifacts: Path) -> None:
    page.goto(f"{stack.serving.url}/ui/?poll=1")
    page.wait_for_selector("#banner:not([hidden])", timeout=30_000)  # the JSON endpoints want the token
    page.fill("#token", stack.token)
    page.click("#token-form button")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    # pipeline health: every source up and the figures drawn
    for source in ("serving", "trainer", "param_server"):
        page.wait_for_selector(f"#sources [data-source='{source}'].up", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#chart-ps_rows').dataset.value > 0", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#chart-hr10').dataset.value > 0", timeout=30_000)

    # the user picker, the recommendations with their explanations, the history
    page.fill("#user", user)
    page.click("#user-form button")
    page.wait_for_function(f"() => document.querySelector('#recs').dataset.user === '{user}' && "
                           "document.querySelectorAll('#recs tbody tr').length === 10", timeout=30_000)
    page.wait_for_selector("#history li", timeout=30_000)
    # the page's own /recommend polls are serving traffic: the p99 chart draws a line from them
    page.wait_for_function("() => document.querySelector('#chart-serving_p99_ms polyline')", timeout=30_000)
    assert "candidates ann" in page.inner_text("#recs-meta")
    history = page.eval_on_selector_all("#history li", "items => items.map(i => i.dataset.itemId)")
    assert history and all(genre(i) != target for i in history), history
    page.screenshot(path=str(artifacts / "1-before-clicks.png"), full_page=True)

    # search each item of the new genre, look at its similar items, click it as the user
    for n, item in enumerate(clicks, 1):
        page.fill("#item-search", item)
        page.wait_for_selector(f"#search-results li[data-item-id='{item}']", timeout=15_000)
        page.click(f"#search-results li[data-item-id='{item}'] .similar-btn")
        page.wait_for_selector("#similar li[data-item-id]", timeout=15_000)
        page.click(f"#search-results li[data-item-id='{item}'] .click-btn")
        page.wait_for_selector(f"#click-status[data-clicks='{n}']", timeout=15_000)
    assert "accepted (202)" in page.inner_text("#click-status")
    page.screenshot(path=str(artifacts / "2-after-clicks.png"), full_page=True)

    deadline = time.monotonic() + SHIFT_TIMEOUT_S
    others: list[str] = []
    while time.monotonic() < deadline:
        others = [i for i in shown(page) if i not in clicks]
        moved = [i for i in others if genre(i) == target and i not in reachable]
        share = sum(genre(i) == target for i in others) / max(len(others), 1)
        if share > share_before and len(moved) >= 2:
            break
        page.wait_for_timeout(1000)
    else:
        raise AssertionError(f"recommendations did not move toward genre {target} within {SHIFT_TIMEOUT_S} s: "
                             f"before {share_before:.2f} of {sorted(reachable)}, now {others}")
    history = page.eval_on_selector_all("#history li", "items => items.map(i => i.dataset.itemId)")
    assert set(clicks) & set(history), history  # the clicks reached the user's Redis history
    final = artifacts / "3-shifted.png"
    page.screenshot(path=str(final), full_page=True)
    if os.environ.get("STREAMREC_CONSOLE_SCREENSHOT"):
        shutil.copyfile(final, os.environ["STREAMREC_CONSOLE_SCREENSHOT"])


# ---- the pieces the page relies on, without a browser ------------------------------------------
def test_overview_figures_from_exposition_text():
    registry = CollectorRegistry()
    consumed = Counter("streamrec_trainer_events_consumed_total", "", registry=registry)
    lag = Gauge("streamrec_trainer_consumer_lag_events", "", ["partition"], registry=registry)
    hit = Gauge("streamrec_trainer_prequential", "", ["metric", "window"], registry=registry)
    rows = Gauge("streamrec_param_server_table_rows", "", ["table"], registry=registry)
    latency = Histogram("streamrec_serving_request_seconds", "", ["endpoint"], buckets=(0.01, 0.1, 1.0),
                        registry=registry)
    consumed.inc(100)
    before = Totals.parse(generate_latest(registry).decode())
    consumed.inc(50)
    lag.labels("0").set(3)
    lag.labels("1").set(4)
    hit.labels("hr@10", "1000").set(0.4)
    hit.labels("hr@10", "10000").set(0.3)
    rows.labels("bpr_users").set(10)
    rows.labels("bpr_items").set(5)
    for _ in range(98):
        latency.labels("/recommend").observe(0.005)
    latency.labels("/recommend").observe(0.5)
    latency.labels("/recommend").observe(0.5)
    latency.labels("/similar").observe(5.0)  # another endpoint: not in the /recommend p99
    now = Totals.parse(generate_latest(registry).decode())
    result = figures({"trainer": Reading(now, 12.0)}, {"trainer": Reading(before, 10.0)})
    assert result["events_per_s"] == 25.0 and result["consumer_lag"] == 7 and result["hr10"] == 0.4
    assert result["ps_rows"] == 15 and result["ps_tables"] == {"bpr_users": 10, "bpr_items": 5}
    assert 100 < result["serving_p99_ms"] <= 1000  # the 99th of 100 is one of the two slow ones
    assert figures({"s": Reading(now, 1.0)}, {"s": Reading(now, 0.0)})["serving_p99_ms"] is None  # no request since


def test_catalogue_reads_movielens_and_csv(ml100k, tmp_path):
    movies = Catalogue.load(ml100k / "u.item")
    assert len(movies) == 1682
    assert movies.lookup(["1", "nope"]) == {"1": {"title": "Toy Story (1995)",
                                                  "genres": ["Animation", "Children's", "Comedy"]}}
    assert "1" in movies.title_matches("toy story", 5)
    csv = tmp_path / "items.csv"
    csv.write_text("item_id,title,genres\ni1,First,a|b\n")
    assert Catalogue.load(csv).lookup(["i1"]) == {"i1": {"title": "First", "genres": ["a", "b"]}}
    (tmp_path / "bad.csv").write_text("id,name\n1,x\n")
    with pytest.raises(ValueError, match="item_id"):
        Catalogue.load(tmp_path / "bad.csv")
