"""The HTTP API against hostile or careless clients, on a real `streamrec serve`: body caps (declared
and streamed), candidate limits, the bearer token, and a feature store behind a Redis password."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from streamrec.app import infra
from streamrec.core.config import load_settings
from streamrec.param_server.client import ParamClient
from streamrec.serving.cli import open_api_warning
from streamrec.serving.config import ServingConfig
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.serving.conftest import Serving, load_model, serving_factory, start_param_server, write_history

TOKEN = "test-token-" + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex
SMALL_RESCORE_CAP = 2000  # the locked server's /rescore cap, small enough to stream past in a test
ITEMS = [f"i{j}" for j in range(20)]


@dataclass
class Servers:
    open: Serving  # defaults: no token, /rescore 4 MiB, 64 KiB elsewhere; Redis without a password
    locked: Serving  # STREAMREC_API_TOKEN set, /rescore capped at SMALL_RESCORE_CAP
    guarded_redis: Serving  # its feature store is a Redis that requires a password
    wrong_password: Serving  # the same Redis, the URL without the password


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Servers]:
    home = tmp_path_factory.mktemp("serving-security")
    param_server = start_param_server(home / "ps")
    redis = infra.start_redis(home / "redis", password=PASSWORD)
    private_url = f"redis://:{PASSWORD}@{redis.host}:{redis.port}/0"
    prefix = f"test-serving-{uuid.uuid4().hex[:10]}"
    start, started = serving_factory(home)
    try:
        rng = np.random.default_rng(3)
        with ParamClient([param_server.address]) as client:
            load_model(client, {"u1": rng.normal(size=4).astype(np.float32)},
                       {item: rng.normal(size=4).astype(np.float32) for item in ITEMS})
        write_history(FeatureStore.from_url(private_url, FeatureStoreConfig(prefix=prefix)), [("u1", "i3", 1e9)])
        yield Servers(
            open=start(param_server.address, redis_url, prefix),
            locked=start(param_server.address, redis_url, prefix, api_token=TOKEN,
                         args=("--body-limit", f"/rescore={SMALL_RESCORE_CAP}", "--body-read-timeout", "1")),
            guarded_redis=start(param_server.address, private_url, prefix),
            wrong_password=start(param_server.address, f"redis://{redis.host}:{redis.port}/0", prefix),
        )
    finally:
        for serving in started:
            serving.stop()
        param_server.kill()
        infra.stop(redis.to_json())


def raw_exchange(serving: Serving, head: str) -> tuple[int, bytes]:
    """Send only a request head (no body) and read the answer: a declared oversize body must be
    refused before the server waits for a single body byte."""
    host, port = serving.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(("method", "path", "declared"), [
    ("POST", "/rescore", 4 * 1024 * 1024 + 1), ("POST", "/rescore", 3 * 1024 ** 3),
    ("GET", "/recommend?user_id=u1", 64 * 1024 + 1), ("GET", "/healthz", 64 * 1024 + 1),
])
def test_declared_body_over_the_cap_is_refused_unread(servers: Servers, method: str, path: str, declared: int) -> None:
    status, body = raw_exchange(servers.open, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                              f"\r\nContent-Length: {declared}\r\n\r\n")
    assert status == 413 and b"limit" in body


def test_streamed_body_over_the_cap_is_refused(servers: Servers) -> None:
    """Chunked transfer declares no length: the cap is counted as the body arrives."""
    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u1", "candidates": ['
        for _ in range(SMALL_RESCORE_CAP // 100):
            yield b'"' + b"x" * 100 + b'",'
        yield b'"i1"]}'

    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    reply = servers.locked.http.post("/rescore", content=chunks(), headers=auth)
    assert reply.status_code == 413 and "limit" in reply.json()["detail"]
    small = servers.locked.http.post("/rescore", json={"user_id": "u1", "candidates": ["i1"]}, headers=auth)
    assert small.status_code == 200, small.text  # the same connection pool still works


def test_a_body_that_stops_arriving_is_answered_408(servers: Servers) -> None:
    """A Content-Length larger than what is sent: uvicorn waits for the rest as long as the client
    likes, so each such request held a connection and its handler for ever."""
    head = (f"POST /rescore HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    started = time.monotonic()
    status, body = raw_exchange(servers.locked, head + '{"user_id": "u1", ')
    assert status == 408 and b"no part of the request body arrived for 1 s" in body
    assert time.monotonic() - started < 8
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    slow = servers.locked.http.post("/rescore", json={"user_id": "u1", "candidates": ["i1"]}, headers=auth)
    assert slow.status_code == 200, slow.text  # a whole body is not timed out


def _dripped_reply(serving: Serving, send: list[bytes], pause: float = 0.0, timeout: float = 30.0) -> tuple[bytes, float]:
    """Send the parts (pausing between them), then read until the server closes; (reply, seconds)."""
    host, port = serving.url.removeprefix("http://").split(":")
    started = time.monotonic()
    reply = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            for part in send:
                sock.sendall(part)
                sock.settimeout(pause or 0.001)  # an answer while still sending ends the sending
                try:
                    reply += sock.recv(65536)
                except TimeoutError:
                    continue
                if reply:
                    break
            sock.settimeout(timeout)
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):  # refused while still sending
            pass
    return reply, time.monotonic() - started


def test_a_trickled_body_is_answered_408(servers: Servers) -> None:
    """A byte every half second restarted the body's read timeout each time (1 s on this server),
    so the request was held as long as the client kept dripping; the body must now average
    64 KiB/s after its first second."""
    head = (f"POST /rescore HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    reply, seconds = _dripped_reply(servers.locked, [head] + [b" "] * 40, pause=0.5)
    assert reply.startswith(b"HTTP/1.1 408") and b"slower than" in reply, (reply[:200], seconds)
    assert seconds < 12


def test_a_head_that_never_ends_is_refused_431(servers: Servers) -> None:
    """A header line that never ends was buffered whole: 300 MB of it grew a worker by 357 MB."""
    reply, _ = _dripped_reply(servers.open, [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"x" * (1 << 18)] * 12)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert servers.open.fresh_get("/healthz").status_code == 200


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "slowloris"])
def test_a_head_not_complete_in_10s_is_answered_408(servers: Servers, drip: bool) -> None:
    """A connection that sends nothing, or a head a line at a time, was never closed by uvicorn:
    enough of them take every file descriptor of the worker."""
    parts = [b"GET /healthz HTTP/1.1\r\n"] + ([b"X-A: b\r\n"] * 15 if drip else [])
    reply, seconds = _dripped_reply(servers.open, parts, pause=1.0 if drip else 0.0)
    assert reply.startswith(b"HTTP/1.1 408") and b"within 10 s" in reply, reply[:200]
    assert 9 < seconds < 14


def test_percent_encoding_that_is_not_utf8_is_refused(servers: Servers) -> None:
    """caf%E9, caf%E8 and caf%FF were all decoded to the user "caf\ufffd": one history for all."""
    for path in ("/recommend?user_id=caf%E9", "/recommend?user_id=caf%FF&exclude_seen=yes",
                 "/similar/caf%E9", "/ui/api/users/caf%E8/history"):
        reply = servers.open.http.get(path)
        assert reply.status_code == 400 and "UTF-8" in reply.json()["detail"], (path, reply.text)
    assert servers.open.http.get("/recommend?user_id=caf%C3%A9").status_code == 200  # "café", UTF-8


def test_an_item_id_with_a_slash_is_found(servers: Servers) -> None:
    """/similar/cat%2Fa did not match the route (uvicorn decodes %2F before routing): 404 "Not
    Found" for an item the same server recommends; an id with a newline must match as well."""
    for path, item in (("/similar/cat%2Fa", "cat/a"), ("/similar/cat/a", "cat/a"), ("/similar/a%0Ab", "a\nb")):
        reply = servers.open.http.get(path)
        assert reply.status_code == 404 and reply.json()["detail"] == f"unknown item {item!r}", reply.text
    assert servers.open.get("/similar/i1").status_code == 200


def test_the_fast_path_refuses_a_diversity_fastapi_refuses(servers: Servers) -> None:
    """float() reads non-ASCII digits ("\u0661" is 1 in Arabic-Indic): the fast path applied
    diversity 1 where the FastAPI route answers 422."""
    for value in ("\u0661", "\uff11", "0.\u0665"):
        assert servers.open.get("/recommend", user_id="u1", diversity=value).status_code == 422


def test_rescore_candidate_limits(servers: Servers) -> None:
    http = servers.open.http
    largest = ["i1"] + ["c" * 254 + f"{n:02d}"[-2:] for n in range(9_999)]  # 10,000 ids of <= 256 bytes: 2.6 MB
    reply = http.post("/rescore", json={"user_id": "u1", "candidates": largest})
    assert reply.status_code == 200, reply.text
    assert [item["item_id"] for item in reply.json()["items"]] == ["i1"]
    assert http.post("/rescore", json={"user_id": "u1", "candidates": ["i1"] * 10_001}).status_code == 422
    assert http.post("/rescore", json={"user_id": "u1", "candidates": ["x" * 257]}).status_code == 422
    wide = "é" * 129  # 129 characters, 258 bytes
    assert http.post("/rescore", json={"user_id": "u1", "candidates": [wide]}).status_code == 422
    assert http.post("/rescore", json={"user_id": wide, "candidates": ["i1"]}).status_code == 422  # bytes, as ids are


@pytest.mark.parametrize(("method", "path", "params"), [
    ("GET", "/recommend", {"user_id": "u1"}), ("GET", "/recommend", {"user_id": "u1", "explain": "true"}),
    ("GET", "/similar/i1", {}), ("POST", "/rescore", {}),
])
def test_token_guards_everything_about_users_and_items(servers: Servers, method: str, path: str, params: dict) -> None:
    body = {"user_id": "u1", "candidates": ["i1"]} if method == "POST" else None
    http = servers.locked.http
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Bearer{TOKEN}"}):
        reply = http.request(method, path, params=params, json=body, headers=headers)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.headers["www-authenticate"] == "Bearer" and "explain" not in reply.text
    granted = http.request(method, path, params=params, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert granted.status_code == 200, granted.text
    for scheme in ("bearer", "BEARER"):  # the scheme in any case; the token only exactly
        assert http.request(method, path, params=params, json=body,
                            headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
    assert servers.open.http.request(method, path, params=params, json=body).status_code == 200  # no token set


def test_probes_and_metrics_stay_open(servers: Servers) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert servers.locked.get(path).status_code == 200, path
    paths = servers.locked.get("/openapi.json").json()["paths"]
    assert {"401", "413", "422", "503"} <= set(paths["/rescore"]["post"]["responses"])
    assert paths["/recommend"]["get"]["security"] == [{"HTTPBearer": []}] and "security" not in paths["/healthz"]["get"]


def test_feature_store_behind_a_redis_password(servers: Servers) -> None:
    """The password in the URL reaches every client serving builds: history read, seen item filtered."""
    reply = servers.guarded_redis.get("/recommend", user_id="u1", k=len(ITEMS)).json()
    assert reply["degraded"] == [] and "i3" not in {item["item_id"] for item in reply["items"]}
    refused = servers.wrong_password.get("/recommend", user_id="u1", k=len(ITEMS)).json()
    assert refused["degraded"] == ["redis"]  # without the password Redis refuses: degraded, not an error


def _tls_redis(tmp_path: Path) -> tuple[list[str], Path] | None:
    """A redis-server command line listening with TLS only, and its CA file; None where this
    machine has no TLS-capable redis-server or no openssl."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if not server or not openssl:
        return None
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return [server, "--port", "0", "--tls-port", "{port}", "--bind", "127.0.0.1", "--save", "", "--requirepass",
            PASSWORD, "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no"], cert


def test_rediss_url_with_password(tmp_path: Path) -> None:
    from streamrec.core import net

    command = _tls_redis(tmp_path)
    if command is None:
        pytest.skip("no redis-server with TLS or no openssl on this machine")
    args, ca = command
    port = net.free_port()
    proc = subprocess.Popen([a.replace("{port}", str(port)) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        for _ in range(200):
            if net.port_open("127.0.0.1", port) or proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.skip(f"redis-server has no TLS support: {proc.stderr.read().decode()[-300:]}")
        assert net.redis_ping(url)
        assert not net.redis_ping(url.replace(PASSWORD, "wrong"))
        assert not net.redis_ping(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")  # plain text to a TLS port
        store = FeatureStore.from_url(url, FeatureStoreConfig(prefix="tls"))
        write_history(store, [("u", "a", 1e9)])
        assert store.recent_items("u") == ["a"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_http_client_timeouts_do_not_leak(servers: Servers) -> None:
    """A client that opens a connection and sends half a request head must not hold a worker:
    others still get answers."""
    host, port = servers.open.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as idle:
        idle.sendall(b"POST /rescore HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert httpx.get(servers.open.url + "/healthz", timeout=10).status_code == 200




@pytest.mark.parametrize("name", ["STREAMREC_API_TOKEN", "STREAMREC_PARAM_SERVER_TOKEN"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_no_token_everywhere_and_serve_says_its_api_is_open(name: str, value: str) -> None:
    """Compose passes `STREAMREC_API_TOKEN=` when `.env` names none. The HTTP guard read "" as no
    token while the direct route read it as a token, and nothing said that the API was open: a
    secret store that handed over nothing went unseen."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(name, value)
        settings = load_settings()
    assert settings.api_token is None and settings.param_server_token is None
    config = ServingConfig(api_token=value)
    assert config.api_token is None
    assert "every route of the HTTP API on 0.0.0.0 is open" in open_api_warning(config, "0.0.0.0")
    assert open_api_warning(ServingConfig(api_token="t0ken"), "0.0.0.0") is None
