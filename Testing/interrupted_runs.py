"""Runs interrupted by a real signal at the worst moment: while an output file is being written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def signal_while_writing(script: Path, body: str, args: list[str], marker: Path,
                         signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Run Python ``body`` as a child whose SimpleITK writes stall once written; signal it then.

    ``SimpleITK.WriteImage`` is patched in the child to write the file, record its path in ``marker``
    and hang, so ``signum`` arrives while a (temporary) output exists. Returns the child's exit code
    and standard error.
    """
    script.write_text(
        "import os, sys, time\nimport SimpleITK as sitk\n"
        "real = sitk.WriteImage\n"
        "def slow(image, path, *args):\n"
        "    real(image, path, *args)\n"
        f"    open({str(marker)!r} + '.tmp', 'w').write(str(path))\n"
        f"    os.replace({str(marker)!r} + '.tmp', {str(marker)!r})\n"
        "    time.sleep(300)\n"
        "sitk.WriteImage = slow\n" + body,
        encoding="utf-8",
    )
    child = subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never started writing (exit code {child.poll()})"
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, err
