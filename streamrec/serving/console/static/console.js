// streamrec console: plain JavaScript, no dependencies (the page must work offline).
// Every figure comes from the serving API; the token (if the server sets one) is kept in
// localStorage and sent as `Authorization: Bearer`. ?poll=SECONDS sets the refresh period,
// ?user=ID opens a user. Ids go to the server as query parameters, never as path segments: the
// URL parser resolves a segment "." or ".." away (the user ".." asked for another endpoint).
"use strict";

const params = new URLSearchParams(location.search);
const DEFAULT_POLL_S = 2, MIN_POLL_S = 0.25;
// an hour at most: setInterval takes a 32-bit delay, and a larger one (?poll=1e9, ?poll=Infinity)
// overflowed to a poll about every millisecond
const MAX_POLL_S = 3600;

function pollMs(value) {
  const seconds = parseFloat(value);
  if (!Number.isFinite(seconds) || seconds <= 0) return 1000 * DEFAULT_POLL_S;  // absent, garbage, Infinity
  return 1000 * Math.min(MAX_POLL_S, Math.max(MIN_POLL_S, seconds));
}

const POLL_MS = pollMs(params.get("poll"));
const MAX_POINTS = 300;
const CHARTS = [
  ["events_per_s", "events / s (trainer)", (v) => v.toFixed(1)],
  ["consumer_lag", "consumer lag (events)", (v) => v.toFixed(0)],
  ["hr10", "live hr@10 (prequential)", (v) => v.toFixed(3)],
  ["serving_p99_ms", "serving p99 /recommend (ms)", (v) => v.toFixed(1)],
  ["staleness_s", "staleness (s)", (v) => v.toFixed(1)],
  ["ps_rows", "parameter-server rows", (v) => v.toFixed(0)],
];

const $ = (id) => document.getElementById(id);
const ui = { token: localStorage.getItem("streamrec.token") || "", user: params.get("user") || "",
  series: [], lastT: 0, catalogue: false, meta: new Map(), clicked: new Set(), previousRecs: new Set(),
  recsBusy: false, overviewBusy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function banner(text) { $("banner").hidden = !text; $("banner").textContent = text || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (ui.token) headers.Authorization = "Bearer " + ui.token;
  const reply = await fetch(path, { ...options, headers });
  if (reply.status === 401) { banner("The API needs a token: enter it above (it is kept in this browser only)."); throw new Error("401"); }
  return reply;
}

async function json(path) {
  const reply = await api(path);
  if (!reply.ok) throw new Error(`${path}: ${reply.status}`);
  return reply.json();
}

// ---- pipeline health -------------------------------------------------------------------------
function buildCharts() {
  for (const [key, name] of CHARTS) {
    $("charts").append(el("div", { class: "chart", id: "chart-" + key },
      el("div", { class: "head" }, el("span", { class: "name" }, name), el("span", { class: "value" }, "–")),
      document.createElementNS("http://www.w3.org/2000/svg", "svg"),
      el("div", { class: "range" }, el("span"), el("span"))));
  }
}

function drawChart(key, format) {
  const box = $("chart-" + key), svg = box.querySelector("svg");
  const points = ui.series.filter((s) => s[key] != null).map((s) => [s.t, s[key]]);
  const last = points.length ? points[points.length - 1][1] : null;
  box.querySelector(".value").textContent = last == null ? "–" : format(last);
  box.dataset.value = last == null ? "" : String(last);
  svg.replaceChildren();
  const [low, high] = box.querySelectorAll(".range span");
  if (points.length < 2) { low.textContent = high.textContent = ""; return; }
  const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
  let min = Math.min(...points.map((p) => p[1])), max = Math.max(...points.map((p) => p[1]));
  if (max === min) { max += 1; min = Math.max(0, min - 1); }
  const w = 300, h = 60;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(([t, v]) =>
    `${((t - t0) / (t1 - t0 || 1) * w).toFixed(1)},${(h - 2 - (v - min) / (max - min) * (h - 4)).toFixed(1)}`).join(" "));
  svg.append(line);
  low.textContent = `min ${format(min)} · ${Math.round(t1 - t0)} s`;
  high.textContent = `max ${format(max)}`;
}

async function pollOverview() {
  if (ui.overviewBusy) return;  // the previous poll has not answered yet: skip this tick, never stack polls
  ui.overviewBusy = true;
  try {
    const body = await json("/ui/api/overview");
    const fresh = (ui.series.length ? [body.now] : body.history).filter((s) => s.t > ui.lastT);
    ui.series.push(...fresh);
    if (ui.series.length > MAX_POINTS) ui.series.splice(0, ui.series.length - MAX_POINTS);
    if (ui.series.length) ui.lastT = ui.series[ui.series.length - 1].t;
    for (const [key, , format] of CHARTS) drawChart(key, format);
    $("sources").replaceChildren(...body.now.sources.map((s) =>
      el("span", { class: "source " + (s.up ? "up" : "down"), title: s.error || s.url || "this worker",
        "data-source": s.name }, `${s.name} ${s.up ? "up" : "down"}`)));
  } finally {
    ui.overviewBusy = false;
  }
}

// ---- items: catalogue titles and genres, click and similar buttons ----------------------------
async function describe(ids) {
  const missing = ids.filter((i) => !ui.meta.has(i));
  if (!ui.catalogue || !missing.length) return;
  const query = missing.slice(0, 200).map((i) => "ids=" + encodeURIComponent(i)).join("&");
  const body = await json("/ui/api/items/info?" + query);
  // own properties only: an id such as "valueOf" or "__proto__" read through `[]` found Object.prototype's
  for (const i of missing) ui.meta.set(i, Object.hasOwn(body.items, i) ? body.items[i] : null);
}

function itemLabel(id) {
  const info = ui.meta.get(id);
  return el("span", { class: "item" }, el("code", {}, id),
    info ? el("span", { class: "title" }, " " + info.title + " ") : null,
    ...(info ? info.genres.map((g) => el("span", { class: "genre" }, g)) : []));
}

function itemButtons(id) {
  return el("span", { class: "buttons" },
    el("button", { class: "click-btn", type: "button", title: "send a click on this item as the selected user",
      onclick: () => sendClick(id) }, "click"), " ",
    el("button", { class: "similar-btn", type: "button", onclick: () => showSimilar(id) }, "similar"));
}

async function sendClick(itemId) {
  if (!ui.user) { $("click-status").textContent = "pick a user first"; return; }
  const reply = await api("/events", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: ui.user, item_id: itemId, event_type: "click" }) });
  if (reply.ok) ui.clicked.add(itemId);
  const status = $("click-status");
  status.textContent = reply.ok ? `click on ${itemId} as ${ui.user} accepted (${reply.status}); ` +
    "the recommendations follow once the trainer has learned it and serving has polled."
    : `click on ${itemId} refused: ${reply.status} ${await reply.text()}`;
  status.dataset.clicks = String(ui.clicked.size);
}

async function showSimilar(itemId) {
  $("similar-of").textContent = itemId;
  const reply = await api("/ui/api/similar?k=10&item_id=" + encodeURIComponent(itemId));
  const body = reply.ok ? await reply.json() : { items: [], item_knn: null };
  const lists = [body.items || [], body.item_knn || []];
  await describe(lists.flat().map((e) => e.item_id));
  for (const [target, entries] of [["similar", lists[0]], ["similar-knn", lists[1]]]) {
    $(target).replaceChildren(...entries.map((e) => el("li", { "data-item-id": e.item_id },
      itemLabel(e.item_id), el("span", { class: "muted" }, ` ${e.score.toFixed(3)} `), itemButtons(e.item_id))));
  }
  if (!reply.ok) $("similar").replaceChildren(el("li", { class: "muted" }, `${reply.status}: ${(await reply.json()).detail}`));
}

async function searchItems() {
  const q = $("item-search").value.trim();
  if (!q) { $("search-results").replaceChildren(); return; }
  const body = await json("/ui/api/items?limit=20&q=" + encodeURIComponent(q));
  await describe(body.items.map((e) => e.item_id));
  $("search-results").replaceChildren(...body.items.map((e) => el("li", { "data-item-id": e.item_id },
    itemLabel(e.item_id), e.served ? " " : el("span", { class: "muted" }, " (no vector yet) "), itemButtons(e.item_id))));
}

// ---- the selected user ------------------------------------------------------------------------
const num = (v) => el("td", { class: "num" }, v == null ? "" : Number(v).toFixed(3));

async function refreshUser() {
  if (!ui.user || ui.recsBusy) return;
  ui.recsBusy = true;
  try {
    const user = encodeURIComponent(ui.user);
    const [reply, history] = await Promise.all([api(`/recommend?user_id=${user}&k=10&explain=true`),
      json(`/ui/api/history?n=15&user_id=${user}`)]);
    const recs = reply.ok ? await reply.json() : null;
    const ids = recs ? recs.items.map((e) => e.item_id) : [];
    await describe([...ids, ...history.items.map((e) => e.item_id)]);
    const table = $("recs");
    table.querySelector("tbody").replaceChildren(...(recs ? recs.items : []).map((e, n) => el("tr",
      { "data-item-id": e.item_id, class: (ui.previousRecs.size && !ui.previousRecs.has(e.item_id) ? "new " : "") +
        (ui.clicked.has(e.item_id) ? "clicked" : "") },
      el("td", {}, String(n + 1)), el("td", {}, itemLabel(e.item_id)), num(e.score), num(e.dot), num(e.bias),
      num(e.knn_score), num(e.popularity), el("td", {}, ...e.sources.map((s) => el("span", { class: "tag" }, s))),
      el("td", {}, itemButtons(e.item_id)))));
    ui.previousRecs = new Set(ids);
    table.dataset.updates = String(Number(table.dataset.updates) + 1);
    table.dataset.user = ui.user;
    const explain = recs && recs.explain;
    $("recs-meta").textContent = !recs ? `${reply.status}` : [
      `model v${recs.model_version}`, `staleness ${recs.staleness_seconds} s`, recs.cold_start ? "cold start (trending)" : null,
      explain ? `candidates ann ${explain.candidates.ann} · kNN ${explain.candidates.item_knn} · trending ${explain.candidates.trending}` : null,
      explain ? `union ${explain.union} · seen-filtered ${explain.seen_filtered}` : null,
      explain && explain.ranker ? `ranker ${explain.ranker}` : null,
      recs.degraded.length ? "degraded: " + recs.degraded.join(", ") : null].filter(Boolean).join(" · ");
    $("history").replaceChildren(...history.items.map((e) => el("li", { "data-item-id": e.item_id }, itemLabel(e.item_id))));
    $("history-meta").textContent = history.redis_down ? "Redis is not reachable" : `${history.items.length} newest`;
  } finally {
    ui.recsBusy = false;
  }
}

function selectUser(id) {
  ui.user = id.trim();
  ui.previousRecs = new Set();
  ui.clicked = new Set();
  $("recs").dataset.updates = "0";
  $("user").value = ui.user;
  $("user-info").textContent = ui.user ? `showing ${ui.user}` : "";
  const url = new URL(location.href);
  if (ui.user) url.searchParams.set("user", ui.user); else url.searchParams.delete("user");
  window.history.replaceState(null, "", url);
  return refreshUser();
}

async function suggestUsers() {
  const body = await json("/ui/api/users?limit=20&prefix=" + encodeURIComponent($("user").value.trim()));
  $("user-list").replaceChildren(...body.users.map((u) => el("option", { value: u })));
}

// ---- wiring -----------------------------------------------------------------------------------
async function tick() {
  try {
    await Promise.all([pollOverview(), refreshUser()]);
    $("status").textContent = `updated ${new Date().toLocaleTimeString()} · refresh every ${POLL_MS / 1000} s`;
    if (!$("banner").textContent.startsWith("The API")) banner("");
  } catch (error) {
    $("status").textContent = `last refresh failed: ${error.message}`;
  }
}

async function start() {
  buildCharts();
  $("token").value = ui.token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ui.token = $("token").value.trim();
    localStorage.setItem("streamrec.token", ui.token);
    banner("");
    init();
  });
  $("user-form").addEventListener("submit", (e) => { e.preventDefault(); selectUser($("user").value).catch(() => {}); });
  $("user").addEventListener("input", () => suggestUsers().catch(() => {}));
  $("item-search").addEventListener("input", () => searchItems().catch(() => {}));
  $("item-form").addEventListener("submit", (e) => { e.preventDefault(); searchItems().catch(() => {}); });
  await init();
  setInterval(tick, POLL_MS);
}

async function init() {
  try {
    const info = await json("/ui/api/info");
    ui.catalogue = info.catalogue_items > 0;
    document.body.dataset.ready = "1";
    if (ui.user) await selectUser(ui.user);
    await tick();
  } catch (error) {
    $("status").textContent = `not connected: ${error.message}`;
  }
}

start();
