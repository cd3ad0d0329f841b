"""Resumable, checksum-verified HTTP(S) downloads of model weights with the standard library only.

Weights are hundreds of megabytes and hospital networks are often slow, proxied or flaky, so a download
streams into ``<dest>.part``, resumes it with an HTTP ``Range`` request after a dropped connection or in a
later session, and only a complete file whose SHA-256 matches is renamed onto ``dest``. A corrupt or
partial file therefore never appears under the final name. Proxies come from the usual environment
variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), read afresh for every download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import CancelCallback, SegMambaError

#: Bytes read per network call; also the granularity of progress and cancel checks.
CHUNK_SIZE = 64 * 1024
#: First pause (s) before a retry; doubles after each further failure.
RETRY_BACKOFF_S = 0.5
#: HTTP statuses that usually mean "try again later" rather than "wrong address".
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "segmamba-slicer-downloader/1"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")

#: Download progress: ``(bytes so far, total bytes or None when the server does not say)``.
DownloadProgress = Callable[[int, int | None], None]


class DownloadError(SegMambaError):
    """A download failed; ``url`` and, for HTTP errors, ``status`` say which request and why."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the expected SHA-256; the partial file has been deleted."""


class DownloadCancelled(DownloadError):
    """The caller cancelled; the ``.part`` file is kept so the next attempt resumes it."""


class _TransientError(Exception):
    """A failure worth retrying (connection drop, timeout, 5xx); never leaves this module."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def sha256_file(path: Path) -> str:
    """Lower-case hex SHA-256 of a file, read in chunks so large weights need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    sha256: str | None,
    progress: DownloadProgress | None = None,
    cancel: CancelCallback | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives; ``cancel()`` is polled
    between chunks and a true result raises :class:`DownloadCancelled`. ``timeout`` is the socket timeout
    per network operation; ``retries`` is how many failed attempts (connection errors, timeouts,
    truncated transfers, HTTP 408/429/5xx) are retried, each resuming where the last one stopped. If
    ``dest`` already exists with the expected ``sha256`` nothing is downloaded. Without ``sha256`` the
    file is only checked for completeness against the server's announced length.
    """
    expected = _normalise_sha256(sha256)
    _check_url(url)
    dest = Path(dest)
    if expected and dest.is_file() and sha256_file(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener()  # a fresh ProxyHandler reads the proxy variables now
    failures = 0
    while True:
        _raise_if_cancelled(cancel, url, part)
        status = None
        try:
            if _fetch_into(opener, url, part, progress, cancel, timeout):
                break
            reason = "the connection closed before the whole file arrived"
        except _TransientError as exc:
            reason, status = str(exc), exc.status
        failures += 1
        if failures > retries:
            raise DownloadError(
                f"Could not download {url} after {failures} attempts: {reason}. Check the network "
                f"connection or proxy settings (HTTPS_PROXY / HTTP_PROXY); any partial file {part} is "
                "kept and the next download resumes it.",
                url=url,
                status=status,
            )
        time.sleep(RETRY_BACKOFF_S * 2 ** (failures - 1))
    _commit(part, dest, expected, url)
    return dest


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a SHA-256 checksum as cards write it: 64 hexadecimal characters, any case."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value.lower()) is not None


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not is_sha256(value):
        raise DownloadError(
            f"The expected checksum {sha256!r} is not a SHA-256 (64 hexadecimal characters); fix the weights "
            "sha256 in the model card."
        )
    return value


def _check_url(url: str) -> None:
    """Refuse other schemes before any request: ``file://`` or ``ftp://`` would bypass the checks here."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"Cannot download {url!r}: only http:// and https:// addresses can be downloaded; fix the weights "
            "url in the model card.",
            url=url,
        )


def _raise_if_cancelled(cancel: CancelCallback | None, url: str, part: Path) -> None:
    if cancel is not None and cancel():
        raise DownloadCancelled(
            f"Download of {url} was cancelled; the partial file {part} is kept and the next download "
            "resumes it.",
            url=url,
        )


def _fetch_into(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    progress: DownloadProgress | None,
    cancel: CancelCallback | None,
    timeout: float,
) -> bool:
    """One HTTP request appending to (or restarting) ``part``; True when ``part`` is complete."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        return _handle_http_error(exc, url, part, offset)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _TransientError(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc
    with response:
        start, total = _resume_point(response.status, response.headers, offset, part)
        return _stream(response, part, start, total, progress, cancel, url)


def _resume_point(
    status: int, headers: http.client.HTTPMessage, offset: int, part: Path
) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's total size (None when the server does not say).

    A 200 answer means the server ignored ``Range`` and sends the whole file, so writing restarts at 0.
    """
    length = headers.get("Content-Length")
    body_length = int(length) if length is not None and length.isdigit() else None
    if status != 206:
        return 0, body_length
    match = _CONTENT_RANGE_RE.match((headers.get("Content-Range") or "").strip())
    if not match or match.group(1) is None or int(match.group(1)) != offset:
        part.unlink(missing_ok=True)
        raise _TransientError("the server answered with an unexpected byte range; restarting from zero")
    if match.group(3) != "*":
        return offset, int(match.group(3))
    return offset, None if body_length is None else offset + body_length


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    start: int,
    total: int | None,
    progress: DownloadProgress | None,
    cancel: CancelCallback | None,
    url: str,
) -> bool:
    """Copy the body into ``part`` from byte ``start``; True when the announced length has arrived."""
    done = start
    with open(part, "r+b" if start else "wb") as fh:
        fh.seek(start)
        fh.truncate()
        if progress is not None:
            progress(done, total)
        try:
            while True:
                _raise_if_cancelled(cancel, url, part)
                block = response.read(CHUNK_SIZE)
                if not block:
                    break
                fh.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
        except (http.client.HTTPException, OSError) as exc:
            raise _TransientError(f"the transfer broke off after {done} bytes ({type(exc).__name__})") from exc
        finally:
            fh.flush()
            os.fsync(fh.fileno())
    return total is None or done == total


def _handle_http_error(exc: urllib.error.HTTPError, url: str, part: Path, offset: int) -> bool:
    """Map an HTTP error answer to "part is complete" (True), a retry, or a final :class:`DownloadError`.

    HTTP 416 on a resume means the requested start lies at or past the end of the file: either ``part``
    already holds the whole file (a previous run stopped before renaming it) or it is stale.
    """
    if exc.code == 416 and offset:
        match = _CONTENT_RANGE_RE.match((exc.headers.get("Content-Range") or "").strip())
        if match and match.group(3) == str(offset):
            return True
        part.unlink(missing_ok=True)
        raise _TransientError("the server could not resume the partial file; restarting from zero") from exc
    if exc.code in RETRYABLE_STATUS:
        raise _TransientError(f"the server answered HTTP {exc.code} {exc.reason}", exc.code) from exc
    raise DownloadError(_http_error_message(exc.code, str(exc.reason), url), url=url, status=exc.code) from exc


def _http_error_message(status: int, reason: str, url: str) -> str:
    hint = {
        401: "the link needs a login or has expired",
        403: "access is denied; the link may have expired",
        404: "there is no file at this address; check the URL (e.g. in the model card)",
    }.get(status, "check the URL or try again later")
    return f"HTTP {status} {reason} for {url}: {hint}."


def _commit(part: Path, dest: Path, expected: str | None, url: str) -> None:
    """Verify the checksum of a complete ``part`` and atomically move it to ``dest``."""
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"The file downloaded from {url} has SHA-256 {actual} but {expected} was expected; it was "
                "deleted. Try again; if this persists the file on the server has changed or the expected "
                f"checksum is wrong: check both, or download the file by hand and place it at {dest}.",
                url=url,
            )
    os.replace(part, dest)
