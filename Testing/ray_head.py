"""A Ray cluster of our own for the tests that join an existing cluster: ``ray start --head`` on 127.0.0.1.

Started the way a user starts one (Ray's own command), in a private temporary folder and a new process
session, so that stopping it kills exactly the processes it started (its process group, and any process
naming its private folder) and never another Ray instance on the machine, which ``ray stop`` would. It
requires a token of its own (Ray's token authentication, given in the environment), so that neither it nor
its clients read or write the user's ``~/.ray/auth_token``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RayHead:
    """A running head: its address (``127.0.0.1:PORT``), private folder, process group and token."""

    address: str
    temp_dir: Path
    group: int
    token: str

    def client_env(self) -> dict[str, str]:
        """What a process joining the cluster needs in its environment besides the address."""
        return ray_env(self.token)


def ray_env(token: str) -> dict[str, str]:
    """Ray's settings for the head and its clients: token authentication with ``token``, no usage
    statistics, single-machine mode (every port on the loopback address)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, object_store_bytes: int = 80 * 1024**2) -> Iterator[RayHead]:
    """A one-node Ray cluster listening on 127.0.0.1 only, without dashboard or usage statistics.

    The folder is short (Ray's socket paths must fit in 107 bytes), the single-machine mode keeps every
    port on the loopback address (as ``run/ray_engine.start_local_ray`` does).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="segray", dir="/tmp"))
    port, token = free_port(), secrets.token_hex(32)
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(port), "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_bytes),
               "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    start = subprocess.Popen(command, env={**os.environ, **ray_env(token)}, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    head = RayHead(f"127.0.0.1:{port}", temp_dir, start.pid, token)  # the session's processes keep its group
    try:
        out, _ = start.communicate(timeout=120)
        if start.returncode != 0:
            raise RuntimeError(f"ray start failed ({start.returncode}):\n{out[-3000:]}")
        yield head
    finally:
        if start.poll() is None:
            start.kill()
        stop(head)


def stop(head: RayHead, grace_s: float = 2.0) -> None:
    """Stop the head's processes: SIGTERM to its group, SIGKILL to what is left; then remove its folder."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(head):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while processes_of(head) and time.monotonic() < deadline:
            time.sleep(0.1)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def processes_of(head: RayHead) -> list[int]:
    """The live processes of the head: in its process group, or naming its private folder (its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        if fields[0] == "Z":  # a zombie waits for its parent, nothing left to stop
            continue
        if int(fields[2]) == head.group or str(head.temp_dir).encode() in command:
            found.append(int(entry.name))
    return found
