"""The console page's own faults, in a real browser (Playwright driving Debian's chromium, as
tests/e2e/test_console.py does) against a real `streamrec serve` on loopback whose model holds ids
a page can trip on ("valueOf", "__proto__", ".", "..") and an item catalogue that lacks them.

Pinned: item ids read through `body.items[id]` found Object.prototype's members and broke every
list that showed them; "." and ".." in a path segment were resolved away by the URL parser;
`?poll=` overflowed setInterval (a poll about every millisecond) and polls stacked while one hung;
the page could be framed by any site.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.e2e.test_console import CHROMIUM, browser_or_skip
from tests.serving.conftest import Serving, serving_factory, write_history
from tests.serving.console_fakes import AWKWARD_IDS, fake_sources, model_server, text

TOKEN = "console-page"
PROTOTYPE_IDS = [i for i in AWKWARD_IDS if i not in (".", "..")]  # Object.prototype's names; not in the catalogue
WAIT_MS = 15_000  # a bound on what the page should do at once, never a measurement
STORE_TOKEN = f'localStorage.setItem("streamrec.token", "{TOKEN}");'
# the page's setInterval recorded, not scheduled: the test reads the period and runs the ticks itself;
# overview fetches counted, and held unanswered while window.__holdOverview is set
DRIVE_TICKS = """
window.__intervals = [];
window.setInterval = (fn, ms) => { window.__intervals.push({ fn, ms }); return 0; };
window.__overviewFetches = 0;
window.__held = [];
const realFetch = window.fetch.bind(window);
window.fetch = (input, init) => {
  if (String(input).startsWith("/ui/api/overview")) {
    window.__overviewFetches += 1;
    if (window.__holdOverview) {
      return new Promise((resolve, reject) => window.__held.push(() => realFetch(input, init).then(resolve, reject)));
    }
  }
  return realFetch(input, init);
};
"""


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Serving]:
    """A worker with a catalogue of ordinary items only, and Redis history for the user ".."."""
    home = tmp_path_factory.mktemp("console-page")
    catalogue = home / "items.csv"
    catalogue.write_text("item_id,title,genres\n" + "".join(f"i{n:03d},Movie {n},Drama\n" for n in range(10)))
    prefix = f"console-page-{uuid.uuid4().hex[:8]}"
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))
    write_history(store, [("..", "i001", 1.0), ("..", "i002", 2.0)])
    start, _ = serving_factory(home / "serve")
    with model_server(home / "ps") as server:
        serving = start(server.address, redis_url, prefix, api_token=TOKEN, args=("--item-catalogue", str(catalogue)))
        try:
            yield serving
        finally:
            serving.stop()
            store.clear()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A page whose console messages are kept in `page.messages`; a screenshot on failure."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.messages = []
    page.on("console", lambda message: page.messages.append(message.text))
    page.add_init_script(STORE_TOKEN)
    yield page
    page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    context.close()


def open_console(page: Any, serving: Serving, query: str = "") -> None:
    page.goto(f"{serving.url}/ui/{query}")
    page.wait_for_selector("body[data-ready='1']", timeout=WAIT_MS)


def search(page: Any, text: str, item: str) -> None:
    page.fill("#item-search", text)
    page.wait_for_selector(f"#search-results li[data-item-id='{item}']", timeout=WAIT_MS)


def test_ids_named_like_object_members_are_listed(page: Any, console: Serving) -> None:
    """`body.items[i] || null` gave "valueOf", "hasOwnProperty", "__proto__"... Object.prototype's
    members as their catalogue entries; itemLabel threw on them and the whole list stayed empty."""
    open_console(page, console)
    for item in PROTOTYPE_IDS:
        search(page, item, item)
        assert page.inner_text(f"#search-results li[data-item-id='{item}'] code") == item
    search(page, "i00", "i001")  # a catalogue item keeps its title
    assert "Movie 1" in page.inner_text("#search-results li[data-item-id='i001']")
    assert not [m for m in page.messages if "Content Security Policy" in m], page.messages  # the CSP lets it run


def test_dot_ids_reach_the_server_from_the_page(page: Any, console: Serving) -> None:
    """The user ".." asked for /ui/api/users/../history, which the URL parser made /ui/api/history;
    "similar" for the item "." asked for /similar/ (404)."""
    open_console(page, console)
    page.fill("#user", "..")
    page.click("#user-form button")
    page.wait_for_selector("#recs[data-user='..']", timeout=WAIT_MS)
    page.wait_for_selector("#history li[data-item-id='i002']", timeout=WAIT_MS)
    assert page.eval_on_selector_all("#history li", "items => items.map(i => i.dataset.itemId)") == ["i002", "i001"]
    for item in (".", ".."):
        search(page, ".", item)
        page.click(f"#search-results li[data-item-id='{item}'] .similar-btn")
        page.wait_for_function(f"() => document.querySelector('#similar-of').textContent === '{item}' && "
                               "document.querySelectorAll('#similar li[data-item-id]').length > 0", timeout=WAIT_MS)


def test_the_poll_period_is_clamped(page: Any, console: Serving) -> None:
    """?poll=1e308 or Infinity gave setInterval an infinite (overflowing) delay: the page polled
    about every millisecond. Now at most an hour; a value that is not a finite number is ignored."""
    expected = {"Infinity": 2_000, "1e308": 3_600_000, "1e7": 3_600_000, "abc": 2_000, "0.01": 250, "5": 5_000}
    page.add_init_script(DRIVE_TICKS)
    periods = {}
    for poll in expected:
        open_console(page, console, f"?poll={poll}")
        page.wait_for_function("() => window.__intervals.length > 0", timeout=WAIT_MS)
        periods[poll] = page.evaluate("() => window.__intervals.map(i => i.ms)")
    assert periods == {poll: [ms] for poll, ms in expected.items()}


def test_a_poll_in_flight_skips_the_ticks_until_it_answers(page: Any, console: Serving) -> None:
    """pollOverview had no in-flight guard: while /ui/api/overview hung, every tick added one more."""
    page.add_init_script(DRIVE_TICKS)
    open_console(page, console, "?poll=1")
    page.wait_for_function("() => window.__intervals.length > 0", timeout=WAIT_MS)
    before = page.evaluate("() => window.__overviewFetches")
    # fetch is called synchronously by each tick, so the count is final when this returns
    fetched = page.evaluate("""() => {
      window.__holdOverview = true;
      for (let n = 0; n < 3; n++) window.__intervals[0].fn();
      return window.__overviewFetches;
    }""")
    assert fetched == before + 1
    page.evaluate("() => { window.__holdOverview = false; window.__held.forEach((answer) => answer()); }")
    page.wait_for_function("() => !ui.overviewBusy", timeout=WAIT_MS)
    assert page.evaluate("() => { window.__intervals[0].fn(); return window.__overviewFetches; }") == before + 2


def test_the_page_cannot_be_framed(page: Any, console: Serving) -> None:
    """No response forbade framing: any site could frame the console (whose token is in its storage).
    The framing page is served by another local HTTP server (another origin)."""
    other_site = f'<!doctype html><iframe src="{console.url}/ui/"></iframe>'
    refused = ("X-Frame-Options", "frame-ancestors")
    with fake_sources({"/framing": text(other_site, content_type="text/html")}) as site:
        with page.expect_console_message(lambda m: any(r in m.text for r in refused), timeout=WAIT_MS):
            page.goto(site.url("/framing"))
        assert page.frames[1].query_selector("#token") is None
