"""The first-run install inside 3D Slicer carried out step by step, with every Slicer action injected.

install.py decides *what* to install; this module decides *in which order*, *what to ask* and *what
to clean up* — the part that used to live in the Qt widget, untested:

- ask once (the plan's text); a refusal installs nothing;
- torch first, then a fresh plan, so that the torch just installed is pinned for the other packages;
- the other packages with a temporary constraints file, removed however pip ends;
- one error dialog when pip fails: the flow's own, except where Slicer has shown one already (5.12's
  ``slicer.util.pip_install``; its ``pip_ensure`` with ``skip_packages`` shows none);
- a restart offered only when the plan needs one and plain pip installed the packages
  (``slicer.packaging.pip_ensure`` offers its own);
- the optional fused CUDA kernels, offered only where they can run.

The Slicer calls (dialogs, pip, slicer.packaging, the PyTorch extension, restart, the wait cursor,
the log) come in as an :class:`InstallActions` of callables: the module file builds the real one,
tests build recording fakes. This module imports neither Qt nor slicer.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as platform_module
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..errors import SegMambaError
from ..io.atomic import OutputError, write_text_atomic
from ..models.cache import cache_dir
from . import install
from .install import InstallPlan

if TYPE_CHECKING:
    from packaging.requirements import Requirement

#: Window titles and slicer.packaging's ``requester``: who asks the user.
REQUESTER = "SegMamba"
_DECLINED_KERNELS = "fused_kernels_declined"
#: Slicer's pip_install and pip_ensure print pip's output to the Python console (slicer.util.logProcessOutput).
PIP_FAILED = "Installing the Python packages failed. pip's output is in the Python console (View > Python Console)."


@dataclass(frozen=True)
class InstallActions:
    """What the flow asks of Slicer; each field names the Slicer call it stands for.

    The flow calls each with the arguments Slicer's function takes, so the real actions can be the
    Slicer functions themselves.
    """

    slicer_version: Callable[[], tuple[int, int]]  # (slicer.app.majorVersion, slicer.app.minorVersion)
    has_pytorch_extension: Callable[[], bool]  # the PyTorch extension (PyTorchUtils) is loaded
    confirm: Callable[[str, str], bool]  # slicer.util.confirmOkCancelDisplay(text, windowTitle)
    ask_yes_no: Callable[[str], bool]  # slicer.util.confirmYesNoDisplay(text)
    busy: Callable[[], AbstractContextManager[object]]  # slicer.util.WaitCursor()
    install_torch: Callable[[str], object]  # PyTorchUtilsLogic().installTorch(...); None on failure
    pip_install: Callable[[list[str]], object]  # slicer.util.pip_install(arguments)
    #: slicer.packaging.pip_ensure(requirements, constraints, skip_packages, requester); the skipped ones.
    pip_ensure: Callable[[list[str], str, list[str], str], list[str] | None]
    restart: Callable[[], object]  # slicer.util.restart()
    log: Callable[[str], None]  # the module's log panel
    show_error: Callable[[str, Exception], None]  # the module's error dialog (called inside ``except``)


class _ShownBySlicer(Exception):
    """pip failed inside Slicer, which has already shown its own error dialog with pip's log.

    Only Slicer ≥ 5.12's ``slicer.util.pip_install`` does that (``slicer.packaging._pip_install_with_dialog``,
    v5.12.0 to v5.12.3). ``slicer.packaging.pip_ensure`` with ``skip_packages`` installs through
    ``_pip_install_with_skips_dialog``, which closes its progress dialog and raises with no error dialog,
    and 5.10's ``pip_install`` shows none either: those failures the flow shows itself.
    """


def _imported_top_level_modules() -> set[str]:
    """Top-level names of the modules this Python has imported (an upgrade of one needs a restart)."""
    return {name.split(".")[0] for name in sys.modules}


def _write_constraints(plan: InstallPlan) -> str:
    """A new temporary pip constraints file pinning what Slicer has (``plan.constraints``); its path."""
    handle, path = tempfile.mkstemp(prefix="segmamba-constraints-", suffix=".txt")
    with os.fdopen(handle, "w") as stream:
        stream.write("\n".join(plan.constraints) + "\n")
    return path


@contextmanager
def constraints_file(plan: InstallPlan) -> Iterator[str]:
    """A temporary pip constraints file pinning what Slicer has (``plan.constraints``); always removed."""
    path = _write_constraints(plan)
    try:
        yield path
    finally:
        os.remove(path)


def launch_pip(arguments: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """``pip install ARGUMENTS`` in Slicer's Python as a background process writing to ``log``."""
    from ..run.worker import python_executable

    return subprocess.Popen([python_executable(), "-m", "pip", "install", *arguments], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@dataclass
class KernelBuild:
    """A fused-kernel install running in the background; the constraints file lives until it ends."""

    process: subprocess.Popen[bytes]
    constraints: str
    log: IO[bytes]

    def poll(self) -> int | None:
        """The exit code once pip has ended, else None (never blocks)."""
        return self.process.poll()

    def finish(self, tail_lines: int = 40) -> tuple[int, str]:
        """Wait for the end, remove the constraints file; (exit code, the last lines of pip's output)."""
        code = self.process.wait()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.constraints)
        lines = output.decode("utf-8", errors="replace").splitlines()
        return code, "\n".join(lines[-tail_lines:])


@dataclass
class KernelPreference:
    """Whether the user declined the fused kernels for good, kept in the cache folder between sessions."""

    path: Path = field(default_factory=lambda: cache_dir() / "slicer-settings.json")

    def declined_for_good(self) -> bool:
        try:
            return bool(json.loads(self.path.read_text(encoding="utf-8")).get(_DECLINED_KERNELS))
        except (OSError, ValueError, AttributeError):
            return False

    def decline_for_good(self) -> None:
        """Remember the refusal; an unwritable cache only means being asked again next time."""
        with contextlib.suppress(OutputError):
            write_text_atomic(self.path, json.dumps({_DECLINED_KERNELS: True}), what="module settings")


@dataclass
class InstallFlow:
    """Plans and carries out the installation the module needs, asking the user through ``actions``.

    ``on_installed`` runs after packages were installed (the widget shows the models and devices);
    the other fields read this Python's state and are replaced only by tests.
    """

    actions: InstallActions
    on_installed: Callable[[], None] = lambda: None
    requirements: Callable[[], list[Requirement]] = install.read_requirements
    installed: Callable[[Iterable[str]], Mapping[str, str | None]] = install.installed_versions
    imported: Callable[[], Collection[str]] = _imported_top_level_modules
    platform: str = field(default_factory=lambda: sys.platform)
    machine: str = field(default_factory=platform_module.machine)
    build_tools: Callable[[], tuple[str, ...]] = install.missing_build_tools
    launch_pip: Callable[[list[str], IO[bytes]], subprocess.Popen[bytes]] = field(
        default_factory=lambda: launch_pip)
    kernel_preference: KernelPreference = field(default_factory=lambda: KernelPreference())

    def plan(self) -> InstallPlan:
        """The plan for this Python now (re-read after each step, since each changes what is installed)."""
        requirements = self.requirements()
        names = [r.name for r in requirements] + [*install.PROTECTED, install.TORCH]
        return install.plan_install(
            requirements, self.installed(names), self.actions.slicer_version(),
            pytorch_extension=self.actions.has_pytorch_extension(), imported=self.imported(),
            machine=(self.platform, self.machine))

    def ensure(self) -> bool:
        """Ask once, then install torch and the other requirements; True when everything is in place."""
        plan = self.plan()
        if not plan.needed:
            return True
        if plan.blocked:
            self.actions.show_error("SegMamba cannot install PyTorch on this computer.", SegMambaError(plan.blocked))
            return False
        description = install.describe_plan(plan)
        if not self.actions.confirm(description, f"{REQUESTER}: install packages"):
            self.actions.log("Package installation declined; segmentation needs these packages.")
            return False
        self.actions.log(description)
        try:
            with self.actions.busy():
                if plan.torch is not None:
                    self._install_torch(plan)
                    plan = self.plan()  # pins the torch just installed
                if plan.packages:
                    self._install_packages(plan)
        except _ShownBySlicer as exc:
            self.actions.log(f"Installing the Python packages failed ({exc.__cause__}); Slicer showed pip's log.")
            return False
        except Exception as exc:  # noqa: BLE001 - pip and PyTorchUtils raise many kinds; all are shown
            self.actions.show_error(PIP_FAILED, exc)
            return False
        self.actions.log("Python packages installed.")
        if plan.restart_needed and plan.installer == install.PIP_INSTALLER:
            if self.actions.ask_yes_no("Slicer must restart to use the updated packages. Restart now?"):
                self.actions.restart()
        self.on_installed()
        return not self.plan().needed

    def kernel_offer(self, cuda_usable: bool) -> tuple[str, ...]:
        """The fused-kernel packages worth offering on this computer (empty: hide the button)."""
        if self.kernel_preference.declined_for_good():
            return ()
        installed = self.installed(install.FUSED_KERNELS)
        return install.fused_kernel_offer(cuda_usable, self.platform, installed)

    def install_kernels(self, cuda_usable: bool) -> KernelBuild | None:
        """Offer the fused kernels; on yes, start pip in the background against the pinned torch.

        The build can take many minutes, so it runs in its own process and Slicer stays usable; the
        widget polls the returned build and calls :meth:`finish_kernels`. On no, the user may decline
        for good, and the button is not shown again.
        """
        offer = self.kernel_offer(cuda_usable)
        if not offer:
            return None
        question = install.describe_kernel_offer(offer, self.build_tools())
        if not self.actions.confirm(question, f"{REQUESTER}: fast GPU kernels"):
            if self.actions.ask_yes_no("Never offer the fused kernels again? (The PyTorch scan is used.)"):
                self.kernel_preference.decline_for_good()
            return None
        constraints = _write_constraints(self.plan())
        arguments = install.pip_install_arguments(offer, constraints, install.FUSED_KERNEL_PIP_OPTIONS)
        self.actions.log("Installing the fused kernels in the background: pip install " + " ".join(arguments))
        log = tempfile.TemporaryFile()
        try:
            return KernelBuild(self.launch_pip(arguments, log), constraints, log)
        except OSError as exc:
            log.close()
            os.remove(constraints)
            self.actions.show_error("Installing the fused kernels failed; the pure PyTorch scan is used.", exc)
            return None

    def finish_kernels(self, build: KernelBuild) -> None:
        """After the background build: offer the restart, or show why it failed (the scan stays usable)."""
        code, output = build.finish()
        if output:
            self.actions.log(output)
        if code == 0:
            if self.actions.ask_yes_no("The fused kernels are installed. Restart Slicer now to use them?"):
                self.actions.restart()
            return
        error = subprocess.CalledProcessError(code, "pip install", output)
        self.actions.show_error("Installing the fused kernels failed; the pure PyTorch scan is used.", error)

    def _install_torch(self, plan: InstallPlan) -> None:
        self.actions.log(f"Installing PyTorch ({plan.torch}) with the {plan.torch_installer}…")
        if plan.torch_installer == install.PYTORCH_EXTENSION:
            if self.actions.install_torch(plan.torch_specifier) is None:
                raise SegMambaError("The PyTorch extension could not install PyTorch; see the Python console.")
        else:
            try:
                self.actions.pip_install(install.pip_install_arguments([plan.torch], None))
            except subprocess.CalledProcessError as exc:
                if plan.installer == install.PACKAGING_INSTALLER:  # 5.12's pip_install showed the log
                    raise _ShownBySlicer() from exc
                raise

    def _install_packages(self, plan: InstallPlan) -> None:
        self.actions.log("Installing " + ", ".join(plan.packages) + " (keeping " + ", ".join(plan.constraints) + ")…")
        with constraints_file(plan) as constraints:
            if plan.installer == install.PACKAGING_INSTALLER:
                # A failure here reaches ensure()'s error dialog: with skip_packages, pip_ensure shows none.
                skipped = self.actions.pip_ensure(list(plan.packages), constraints, list(plan.skip_packages),
                                                  REQUESTER)
                if skipped:
                    self.actions.log("Left to Slicer: " + ", ".join(skipped))
            else:
                self.actions.pip_install(install.pip_install_arguments(plan.packages, constraints))


def slicer_install_actions(log: Callable[[str], None],
                           show_error: Callable[[str, BaseException], None]) -> InstallActions:
    """The real Slicer calls behind :class:`InstallFlow`, each with the arguments of the released Slicer API."""
    import slicer

    def install_torch(specifier: str | None) -> object:
        import PyTorchUtils

        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=specifier)

    def pip_ensure(requirements: list[str], constraints: str, skip_packages: list[str], requester: str) -> object:
        import slicer.packaging  # Slicer >= 5.12 only; the flow uses it only there

        return slicer.packaging.pip_ensure(requirements, constraints=constraints, skip_packages=skip_packages,
                                           prompt_install=False, requester=requester)

    return InstallActions(
        slicer_version=lambda: (slicer.app.majorVersion, slicer.app.minorVersion),
        has_pytorch_extension=lambda: hasattr(slicer.modules, "pytorchutils"),
        confirm=slicer.util.confirmOkCancelDisplay, ask_yes_no=slicer.util.confirmYesNoDisplay,
        busy=slicer.util.WaitCursor, install_torch=install_torch, pip_install=slicer.util.pip_install,
        pip_ensure=pip_ensure, restart=slicer.util.restart, log=log, show_error=show_error)
