"""Real small file systems for tests: a tmpfs that is full or read-only, mounted where the tests run as root."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(folder: Path, size_kib: int, read_only: bool = False) -> Iterator[Path]:
    """A real small file system (tmpfs) at ``folder``; skips where mounting is not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a real full or read-only file system needs a tmpfs mount: Linux, as root")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_up(folder: Path, leave: int = 0) -> None:
    """Fill the file system of ``folder`` until only ``leave`` bytes are free (0: completely full)."""
    stats = os.statvfs(folder)
    todo = max(stats.f_bavail * stats.f_frsize - leave, 0)
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while todo > 0 or leave == 0:
            todo -= os.write(fd, b"\0" * min(max(todo, 4096), 1 << 20))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
