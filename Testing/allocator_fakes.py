"""A stand-in for glibc that records the allocator settings instead of changing this test process's.

Used by the ``fake_libc`` fixture (conftest.py) to check when :func:`devices.reuse_freed_cpu_memory`
keeps freed memory and when it gives it back.
"""

from __future__ import annotations


class FakeLibc:
    """Records mallopt / malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


#: mallopt(3): M_MMAP_MAX = -4 set to 0, M_TRIM_THRESHOLD = -1 set to -1 (never trim) ...
KEEP = [("mallopt", -4, 0), ("mallopt", -1, -1)]
#: ... and back to glibc's documented defaults, then the free pages are returned.
RESTORE = [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
#: Low memory: M_MMAP_THRESHOLD = -3 set to the bound (blocks from 64 MiB are mapped on their own), never trim ...
KEEP_BOUNDED = [("mallopt", -3, 64 * 2**20), ("mallopt", -1, -1)]
#: ... and glibc's defaults back.
RESTORE_BOUNDED = [("mallopt", -3, 128 * 1024), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
