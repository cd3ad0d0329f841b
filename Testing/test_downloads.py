"""Tests of the resumable downloader against a scripted HTTP server on 127.0.0.1.

The server supports ``Range: bytes=N-`` (206 / 416), and each request can be scripted to fail with an
HTTP status, ignore the Range header, drop the connection after a given byte, or stall. Every request's
path and Range header are recorded so the tests can check what the client actually asked for.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from SegMambaSlicerLib.models import downloads
from SegMambaSlicerLib.models.downloads import (
    ChecksumMismatchError,
    DownloadCancelled,
    DownloadError,
    download_file,
    sha256_file,
)

PAYLOAD = random.Random(1234).randbytes(512 * 1024)  # aperiodic: any misplaced byte changes the hash
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass
class Seen:
    path: str
    range: str | None


@dataclass
class Behaviour:
    """How the server answers one request; the default serves the file honouring Range."""

    status: int | None = None
    ignore_range: bool = False
    truncate_at: int | None = None  # absolute byte position where the connection drops
    stall_s: float = 0.0  # sleep after sending the (possibly truncated) body


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must not block shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.script: collections.deque[Behaviour] = collections.deque()
        self.bytes_sent = 0

    def handle_error(self, request: object, client_address: object) -> None:
        """Cancelled clients close the socket mid-body; that is expected here, not worth a traceback."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.seen.append(Seen(self.path, self.headers.get("Range")))
            plan = self.server.script.popleft() if self.server.script else Behaviour()
        if plan.status is not None:
            self.send_error(plan.status)
            return
        start = self._start(plan)
        if start is None:
            return
        end = len(PAYLOAD) if plan.truncate_at is None else plan.truncate_at
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:end])
        self.wfile.flush()
        with self.server.lock:
            self.server.bytes_sent += max(end - start, 0)
        time.sleep(plan.stall_s)

    def _start(self, plan: Behaviour) -> int | None:
        """Send the status line for the requested range; None when the answer is already complete (416)."""
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match is None or plan.ignore_range:
            self.send_response(200)
            return 0
        start = int(match.group(1))
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        return start


@pytest.fixture(autouse=True)
def _no_proxy_no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback traffic must not go through a proxy from the environment, and retries must not sleep."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(downloads, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=2)


def _url(srv: _Server, name: str = "weights.pt") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_sha256_file_known_vector(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_success_reports_progress_and_leaves_no_part(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "weights.pt"
    reports: list[tuple[int, int | None]] = []
    out = download_file(_url(server), dest, PAYLOAD_SHA.upper(), progress=lambda d, t: reports.append((d, t)))
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert [s.range for s in server.seen] == [None]
    assert reports[0] == (0, len(PAYLOAD)) and reports[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert all(a[0] <= b[0] for a, b in zip(reports, reports[1:]))


def test_truncated_transfer_is_resumed_with_range(server: _Server, tmp_path: Path) -> None:
    server.script.append(Behaviour(truncate_at=200_000))
    dest = tmp_path / "weights.pt"
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.seen] == [None, "bytes=200000-"]
    assert server.bytes_sent == len(PAYLOAD)  # nothing fetched twice


def test_existing_part_is_resumed(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    _part(dest).write_bytes(PAYLOAD[:100_000])
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.seen] == ["bytes=100000-"]
    assert server.bytes_sent == len(PAYLOAD) - 100_000


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    server.script.append(Behaviour(ignore_range=True))
    dest = tmp_path / "weights.pt"
    _part(dest).write_bytes(b"\xff" * 300_000)  # wrong bytes: a resume would corrupt the file
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.seen] == ["bytes=300000-"]


def test_complete_part_from_an_earlier_run_is_committed(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    _part(dest).write_bytes(PAYLOAD)
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.seen] == [f"bytes={len(PAYLOAD)}-"]  # answered 416, nothing sent


def test_stalled_transfer_times_out_and_resumes(server: _Server, tmp_path: Path) -> None:
    server.script.append(Behaviour(truncate_at=65_536, stall_s=1.5))
    dest = tmp_path / "weights.pt"
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=0.3)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.seen] == [None, "bytes=65536-"]


def test_wrong_checksum_deletes_everything(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumMismatchError) as info:
        download_file(_url(server), dest, wrong, timeout=2.0)
    assert wrong in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert not dest.exists() and not _part(dest).exists()


def test_wrong_checksum_keeps_previous_file_intact(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    dest.write_bytes(b"old weights")
    with pytest.raises(ChecksumMismatchError):
        download_file(_url(server), dest, hashlib.sha256(b"x").hexdigest(), timeout=2.0)
    assert dest.read_bytes() == b"old weights"


def test_valid_existing_file_is_not_downloaded_again(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    dest.write_bytes(PAYLOAD)
    assert download_file(_url(server), dest, PAYLOAD_SHA) == dest
    assert server.seen == []


def test_http_404_fails_at_once_with_status_and_url(server: _Server, tmp_path: Path) -> None:
    server.script.append(Behaviour(status=404))
    dest = tmp_path / "weights.pt"
    url = _url(server)
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, PAYLOAD_SHA, timeout=2.0)
    assert info.value.status == 404 and info.value.url == url
    assert "404" in str(info.value) and url in str(info.value)
    assert len(server.seen) == 1
    assert not dest.exists() and not _part(dest).exists()


def test_http_500_is_retried_then_reported(server: _Server, tmp_path: Path) -> None:
    server.script.extend([Behaviour(status=500)] * 3)
    dest = tmp_path / "weights.pt"
    with pytest.raises(DownloadError) as info:
        download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0, retries=2)
    assert info.value.status == 500 and "500" in str(info.value)
    assert len(server.seen) == 3  # first attempt + 2 retries
    assert not dest.exists()


def test_transient_500_then_success(server: _Server, tmp_path: Path) -> None:
    server.script.append(Behaviour(status=503))
    dest = tmp_path / "weights.pt"
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD and len(server.seen) == 2


def test_refused_connection_raises_download_error(tmp_path: Path) -> None:
    srv = _Server()  # bound but never serving and then closed: the port refuses connections
    port = srv.server_address[1]
    srv.server_close()
    with pytest.raises(DownloadError) as info:
        download_file(f"http://127.0.0.1:{port}/w.pt", tmp_path / "w.pt", None, timeout=1.0, retries=1)
    assert "after 2 attempts" in str(info.value)


def test_cancel_keeps_part_and_next_call_resumes(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights.pt"
    seen: list[int] = []
    with pytest.raises(DownloadCancelled):
        download_file(
            _url(server),
            dest,
            PAYLOAD_SHA,
            progress=lambda done, total: seen.append(done),
            cancel=lambda: bool(seen) and seen[-1] >= 131_072,
            timeout=2.0,
        )
    kept = _part(dest).stat().st_size
    assert 131_072 <= kept < len(PAYLOAD)
    assert _part(dest).read_bytes() == PAYLOAD[:kept]
    assert not dest.exists()
    download_file(_url(server), dest, PAYLOAD_SHA, timeout=2.0)
    assert dest.read_bytes() == PAYLOAD
    assert server.seen[-1].range == f"bytes={kept}-"


def test_proxy_from_environment_is_used(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("no_proxy")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    url = "http://weights.invalid/model.pt"  # never resolved: the proxy receives the request
    download_file(url, tmp_path / "model.pt", PAYLOAD_SHA, timeout=2.0)
    assert [s.path for s in server.seen] == [url]


def test_download_exceptions_share_one_base() -> None:
    assert issubclass(DownloadError, RuntimeError)
    assert issubclass(ChecksumMismatchError, DownloadError)
    assert issubclass(DownloadCancelled, DownloadError)


@pytest.mark.parametrize(
    ("url", "sha", "message"),
    [
        ("ftp://127.0.0.1/w.pt", None, "only http:// and https://"),
        ("file:///etc/hostname", PAYLOAD_SHA, "only http:// and https://"),
        ("http://127.0.0.1/w.pt", "abc", "not a SHA-256"),
        ("http://127.0.0.1/w.pt", "g" * 64, "not a SHA-256"),
    ],
)
def test_invalid_arguments_are_user_errors_before_any_request(url: str, sha: str | None, message: str,
                                                              tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=message):  # a SegMambaError: the CLI prints it and exits 1
        download_file(url, tmp_path / "w.pt", sha)
    assert list(tmp_path.iterdir()) == []
