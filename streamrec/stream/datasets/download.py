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


def download(url: str, dest: Path, sha256: str | None, size: int | None,
             timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> str:
    """Fetch `url` into `dest`; return the SHA-256 of what arrived after checking it against
    `sha256` and `size` where pinned. Raises DatasetError (the caller removes `dest`)."""
    digest = hashlib.sha256()
    received = 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise DatasetError(f"cannot download {url}: HTTP {response.status_code}")
            announced = int(response.headers.get("content-length") or 0) or size
            with dest.open("wb") as out, progress_bar(f"download {url.rsplit('/', 1)[-1]}", announced) as advance:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
    except httpx.HTTPError as exc:
        raise DatasetError(f"cannot download {url}: {_reason(exc)}") from exc
    if size is not None and received != size:
        raise DatasetError(f"download of {url} has {received:,} bytes, expected {size:,}; refused")
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256:
        raise DatasetError(f"download of {url} has SHA-256 {actual}, expected {sha256}; refused")
    return actual
