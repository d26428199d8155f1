"""HTTP download of one archive: streamed to a file, hashed while written, with connect and read timeouts.

The caller chooses where the bytes land (a staging folder in the cache) and decides what happens
to them; this module only guarantees that a returned download is complete and has the pinned
size and SHA-256, and that any failure is one DatasetError with a one-line reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from streamrec.core.progress import progress_bar
from streamrec.stream.datasets.catalogue import DatasetError

# An offline machine fails at once (DNS or connect); a stalled server within READ seconds.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=30.0, write=30.0, pool=10.0)
CHUNK = 1 << 16


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return "no data within the read timeout"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"transfer interrupted ({exc})"
    return str(exc) or type(exc).__name__


def _announced_length(response: httpx.Response) -> int | None:
    """The body's length in bytes as the server announces it, or None when it does not (or the
    header is not a number, or the body is content-encoded, so the header counts other bytes)."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def download(url: str, dest: Path, sha256: str | None, size: int | None,
             timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> str:
    """Fetch `url` into `dest`; return the SHA-256 of what arrived after checking it against
    `sha256` and `size` where pinned. Raises DatasetError (the caller removes `dest`).

    A pinned `size` also bounds what is written: a server (a bad mirror, a redirect) announcing
    another length is refused before its body is read, and one sending more than `size` bytes
    is cut off at the first chunk past it, so a wrong answer cannot fill the disk."""
    digest = hashlib.sha256()
    received = 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise DatasetError(f"cannot download {url}: HTTP {response.status_code}")
            announced = _announced_length(response)
            if size is not None and announced is not None and announced != size:
                raise DatasetError(f"download of {url} announces {announced:,} bytes, expected {size:,}; refused")
            name = url.rsplit("/", 1)[-1]
            with dest.open("wb") as out, progress_bar(f"download {name}", announced or size) as advance:
                for chunk in response.iter_bytes(CHUNK):
                    received += len(chunk)
                    if size is not None and received > size:
                        raise DatasetError(f"download of {url} sends more than the expected {size:,} bytes; refused")
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
    except httpx.HTTPError as exc:
        raise DatasetError(f"cannot download {url}: {_reason(exc)}") from exc
    if size is not None and received != size:
        raise DatasetError(f"download of {url} has {received:,} bytes, expected {size:,}; refused")
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256:
        raise DatasetError(f"download of {url} has SHA-256 {actual}, expected {sha256}; refused")
    return actual
