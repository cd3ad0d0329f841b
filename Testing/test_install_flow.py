"""The first-run install flow step by step: what is asked, installed, logged and cleaned up, in which order.

A recording fake stands in for Slicer (dialogs, pip, slicer.packaging, the PyTorch extension, restart,
the wait cursor) and for this Python's installed packages, which each install step changes as the
real one would; every test asserts the exact sequence of actions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import CalledProcessError

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from SegMambaSlicerLib.errors import SegMambaError
from SegMambaSlicerLib.slicer.install import (
    describe_missing,
    describe_plan,
    missing_build_tools,
    plan_install,
)
from SegMambaSlicerLib.slicer.install_flow import (
    PIP_FAILED,
    InstallActions,
    InstallFlow,
    KernelPreference,
    constraints_file,
)

CORE = [Requirement(r) for r in ("torch>=2.1", "numpy>=1.24", "scipy>=1.10", "monai>=1.3")]
SLICER_OWN = {"numpy": "2.0.2", "simpleitk": "2.4.0", "vtk": "9.2.0", "requests": "2.31.0"}
KEEP = "SimpleITK==2.4.0, numpy==2.0.2, vtk==9.2.0, requests==2.31.0"
CONSTRAINTS = "<constraints file>"  # stands for the temporary file's path in the recorded calls
SKIP = ["SimpleITK", "numpy", "vtk", "requests"]
KERNELS = "Install the optional fused CUDA kernels mamba-ssm, causal-conv1d?"


class FakeSlicer:
    """Slicer and this Python for the flow: records each action; pip and torch installs change ``installed``."""

    def __init__(self, installed: dict[str, str | None], version: tuple[int, int] = (5, 12),
                 extension: bool = True, confirm: bool = True, yes: bool = True) -> None:
        self.installed = {canonicalize_name(k): v for k, v in installed.items()}
        self.version, self.extension, self.answer_confirm, self.answer_yes = version, extension, confirm, yes
        self.calls: list[tuple] = []
        self.constraints: list[str] = []  # each constraints file's text when pip saw it
        self.constraint_paths: list[Path] = []
        self.fail_on: str | None = None  # "pip_install", "pip_ensure" or "install_torch" raises
        self.torch_result: object = "torch module"
        self.skipped: list[str] | None = None

    def actions(self) -> InstallActions:
        return InstallActions(
            slicer_version=lambda: self.version, has_pytorch_extension=lambda: self.extension,
            confirm=self._confirm, ask_yes_no=self._ask, busy=self._busy, install_torch=self._install_torch,
            pip_install=self._pip_install, pip_ensure=self._pip_ensure, restart=lambda: self.calls.append(("restart",)),
            log=lambda text: self.calls.append(("log", text)),
            show_error=lambda message, exc: self.calls.append(("error", message, exc)))

    def flow(self, platform: str = "linux", machine: str = "x86_64") -> InstallFlow:
        return InstallFlow(self.actions(), on_installed=lambda: self.calls.append(("refresh",)),
                           requirements=lambda: list(CORE), installed=self._versions,
                           imported=lambda: {"numpy", "scipy"}, platform=platform, machine=machine)

    def _versions(self, names: Iterable[str]) -> dict[str, str | None]:
        return {canonicalize_name(n): self.installed.get(canonicalize_name(n)) for n in names}

    def _confirm(self, text: str, title: str) -> bool:
        self.calls.append(("confirm", text, title))
        return self.answer_confirm

    def _ask(self, question: str) -> bool:
        self.calls.append(("ask", question))
        return self.answer_yes

    @contextmanager
    def _busy(self) -> Iterator[None]:
        self.calls.append(("busy",))
        try:
            yield
        finally:
            self.calls.append(("idle",))

    def _fail(self, action: str, slicer_shows_it: bool = False) -> None:
        if self.fail_on == action:
            if slicer_shows_it:
                self.calls.append(("slicer shows pip's log",))
            raise CalledProcessError(1, ["pip", "install"])

    def _install(self, requirements: Iterable[str]) -> None:
        for line in requirements:
            name = canonicalize_name(Requirement(line).name)
            self.installed[name] = "2.5.1" if name == "torch" else "99.0"

    def _install_torch(self, specifier: str) -> object:
        self.calls.append(("install_torch", specifier))
        self._fail("install_torch")
        if self.torch_result is not None:
            self.installed["torch"] = "2.5.1"
        return self.torch_result

    def _seen(self, path: str) -> str:
        self.constraint_paths.append(Path(path))
        self.constraints.append(Path(path).read_text())
        return CONSTRAINTS

    def _pip_install(self, arguments: list[str]) -> None:
        if arguments[:1] == ["-c"]:
            arguments = ["-c", self._seen(arguments[1]), *arguments[2:]]
        self.calls.append(("pip_install", arguments))
        # Slicer >= 5.12: slicer.util.pip_install -> slicer.packaging.pip_install -> _pip_install_with_dialog,
        # which calls errorDisplay with pip's log before raising (v5.12.0-v5.12.3 Base/Python/slicer/packaging.py);
        # 5.10's pip_install only raises (v5.10.0 Base/Python/slicer/util.py, logProcessOutput).
        self._fail("pip_install", slicer_shows_it=self.version >= (5, 12))
        self._install(a for a in arguments if not a.startswith("-") and a != CONSTRAINTS)

    def _pip_ensure(self, packages: list[str], constraints: str, skip: list[str], requester: str) -> list[str] | None:
        self.calls.append(("pip_ensure", packages, self._seen(constraints), skip, requester))
        # With skip_packages, pip_ensure -> pip_install -> _pip_install_with_skips_dialog, which closes its
        # progress dialog and lets CalledProcessError through with no error dialog (v5.12.0-v5.12.3).
        self._fail("pip_ensure", slicer_shows_it=not skip)
        self._install(packages)
        return self.skipped


def fresh(**kwargs) -> FakeSlicer:
    """A Slicer with its own packages only (and an old scipy already imported)."""
    return FakeSlicer({**SLICER_OWN, "scipy": "1.9.3", "torch": None, "monai": None}, **kwargs)


def _description(fake: FakeSlicer) -> str:
    installed = {**fake._versions(["torch", "numpy", "scipy", "monai", *SKIP])}
    return describe_plan(plan_install(CORE, installed, fake.version, fake.extension, {"numpy", "scipy"}))


def test_nothing_is_asked_or_installed_when_everything_is_there() -> None:
    fake = FakeSlicer({**SLICER_OWN, "torch": "2.5.1", "scipy": "1.14.0", "monai": "1.4.0"})
    assert fake.flow().ensure() is True
    assert fake.calls == []


def test_declining_installs_nothing_and_returns_false() -> None:
    fake = fresh(confirm=False)
    description = _description(fake)
    assert fake.flow().ensure() is False
    assert fake.calls == [("confirm", description, "SegMamba: install packages"),
                          ("log", "Package installation declined; segmentation needs these packages.")]
    assert fake.installed["torch"] is None


def test_slicer_512_installs_torch_by_extension_then_the_rest_by_packaging_with_the_new_torch_pinned() -> None:
    fake = fresh()
    description = _description(fake)
    assert fake.flow().ensure() is True
    assert fake.calls == [
        ("confirm", description, "SegMamba: install packages"),
        ("log", description),
        ("busy",),
        ("log", "Installing PyTorch (torch>=2.1) with the PyTorch extension…"),
        ("install_torch", ">=2.1"),
        ("log", f"Installing scipy>=1.10, monai>=1.3 (keeping {KEEP}, torch==2.5.1)…"),
        ("pip_ensure", ["scipy>=1.10", "monai>=1.3"], CONSTRAINTS, SKIP, "SegMamba"),
        ("idle",),
        ("log", "Python packages installed."),
        ("refresh",),  # no restart question: slicer.packaging offers its own
    ]
    assert fake.constraints == [KEEP.replace(", ", "\n") + "\ntorch==2.5.1\n"]
    assert not fake.constraint_paths[0].exists()


def test_older_slicer_uses_pip_for_torch_and_packages_and_offers_the_restart_an_upgrade_needs() -> None:
    fake = fresh(version=(5, 10), extension=False)
    assert fake.flow().ensure() is True
    assert fake.calls[3:] == [
        ("log", "Installing PyTorch (torch>=2.1) with the pip…"),
        ("pip_install", ["torch>=2.1"]),
        ("log", f"Installing scipy>=1.10, monai>=1.3 (keeping {KEEP}, torch==2.5.1)…"),
        ("pip_install", ["-c", CONSTRAINTS, "scipy>=1.10", "monai>=1.3"]),
        ("idle",),
        ("log", "Python packages installed."),
        ("ask", "Slicer must restart to use the updated packages. Restart now?"),
        ("restart",),
        ("refresh",),
    ]
    assert not fake.constraint_paths[0].exists()


def test_no_restart_when_declined_or_when_nothing_loaded_was_upgraded() -> None:
    declined = fresh(version=(5, 10), yes=False)
    assert declined.flow().ensure() is True
    assert ("ask", "Slicer must restart to use the updated packages. Restart now?") in declined.calls
    assert ("restart",) not in declined.calls
    not_loaded = FakeSlicer({**SLICER_OWN, "torch": "2.5.1", "scipy": None, "monai": None}, version=(5, 10))
    assert not_loaded.flow().ensure() is True
    assert [c[0] for c in not_loaded.calls if c[0] in ("ask", "restart", "install_torch")] == []


def test_skipped_packages_are_logged() -> None:
    fake = fresh()
    fake.skipped = ["numpy>=1.24"]
    assert fake.flow().ensure() is True
    assert ("log", "Left to Slicer: numpy>=1.24") in fake.calls


def test_a_failed_pip_is_shown_once_the_constraints_file_is_removed_and_nothing_is_refreshed() -> None:
    fake = fresh(version=(5, 10))
    fake.fail_on = "pip_install"
    assert fake.flow().ensure() is False
    error = fake.calls[-1]
    assert error[:2] == ("error", PIP_FAILED) and "Python console" in PIP_FAILED
    assert isinstance(error[2], CalledProcessError)
    assert fake.calls[-2] == ("idle",)  # the wait cursor is gone before the error shows
    assert ("refresh",) not in fake.calls and ("log", "Python packages installed.") not in fake.calls
    assert len(fake.constraint_paths) == 1 and not fake.constraint_paths[0].exists()


@pytest.mark.parametrize(("version", "extension", "fail_on", "shown_by"), [
    ((5, 10), False, "pip_install", "flow"),  # torch by pip
    ((5, 10), True, "pip_install", "flow"),  # the other packages by pip
    ((5, 12), False, "pip_install", "slicer"),  # torch by 5.12's pip_install, which shows pip's log
    ((5, 12), True, "pip_ensure", "flow"),  # pip_ensure with skip_packages shows no error dialog
])
def test_every_failed_pip_is_shown_exactly_once(version, extension, fail_on, shown_by) -> None:
    fake = fresh(version=version, extension=extension)
    fake.fail_on = fail_on
    assert fake.flow().ensure() is False
    dialogs = [c for c in fake.calls if c[0] in ("error", "slicer shows pip's log")]
    assert len(dialogs) == 1, fake.calls
    if shown_by == "flow":
        assert dialogs[0][:2] == ("error", PIP_FAILED) and isinstance(dialogs[0][2], CalledProcessError)
    else:
        assert fake.calls[-2:] == [("idle",), ("log", "Installing the Python packages failed (Command '['pip', "
                                               "'install']' returned non-zero exit status 1.); Slicer showed "
                                               "pip's log.")]
    assert ("refresh",) not in fake.calls and not any(path.exists() for path in fake.constraint_paths)


def test_intel_macs_are_told_why_nothing_is_installed() -> None:
    fake = fresh()
    assert fake.flow(platform="darwin", machine="x86_64").ensure() is False
    assert [c[0] for c in fake.calls] == ["error"] and "Intel Macs" in str(fake.calls[0][2])
    plan = fake.flow(platform="darwin", machine="x86_64").plan()
    assert describe_missing(plan) == plan.blocked and "NumPy 1.x" in plan.blocked
    assert not fake.flow(platform="darwin", machine="arm64").plan().blocked
    fake.installed["torch"] = "2.2.2"  # installed by hand with a NumPy that suits it: used as it is
    assert not fake.flow(platform="darwin", machine="x86_64").plan().blocked


def test_the_pytorch_extension_failing_stops_before_the_other_packages() -> None:
    fake = fresh()
    fake.torch_result = None
    assert fake.flow().ensure() is False
    assert [c[0] for c in fake.calls] == ["confirm", "log", "busy", "log", "install_torch", "idle", "error"]
    assert isinstance(fake.calls[-1][2], SegMambaError)
    assert "could not install PyTorch" in str(fake.calls[-1][2])


def test_ensure_is_false_when_the_packages_are_still_missing_afterwards() -> None:
    fake = fresh()
    fake._install = lambda requirements: None  # pip "succeeds" without installing anything
    assert fake.flow().ensure() is False
    assert fake.calls[-1] == ("refresh",)


def _kernel_flow(fake: FakeSlicer, tmp_path: Path, script: str = "print('built')", missing: tuple[str, ...] = (),
                 platform: str = "linux") -> InstallFlow:
    """The flow with a real background process standing in for pip (``script`` runs instead)."""

    def launch(arguments: list[str], log) -> subprocess.Popen[bytes]:  # noqa: ANN001 - a binary file
        fake.calls.append(("launch", ["-c", fake._seen(arguments[1]), *arguments[2:]]))
        return subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)

    flow = fake.flow(platform=platform)
    flow.launch_pip, flow.build_tools = launch, lambda: missing
    flow.kernel_preference = KernelPreference(tmp_path / "settings.json")
    return flow


def test_fused_kernels_are_offered_only_with_cuda_on_linux_only_when_missing_and_not_after_never(tmp_path) -> None:
    fake = FakeSlicer({**SLICER_OWN, "torch": "2.5.1", "mamba-ssm": None, "causal-conv1d": "1.4.0"}, confirm=False)
    assert _kernel_flow(fake, tmp_path).kernel_offer(cuda_usable=True) == ("mamba-ssm",)
    assert _kernel_flow(fake, tmp_path).kernel_offer(cuda_usable=False) == ()
    assert _kernel_flow(fake, tmp_path, platform="win32").kernel_offer(cuda_usable=True) == ()
    assert _kernel_flow(fake, tmp_path).install_kernels(cuda_usable=False) is None and fake.calls == []
    assert _kernel_flow(fake, tmp_path).install_kernels(cuda_usable=True) is None  # declined, then "never"
    assert [c[0] for c in fake.calls] == ["confirm", "ask"] and "Never offer" in fake.calls[1][1]
    assert _kernel_flow(fake, tmp_path).kernel_offer(cuda_usable=True) == ()  # remembered for good


def test_fused_kernels_install_in_the_background_against_the_pinned_torch(tmp_path) -> None:
    fake = FakeSlicer({**SLICER_OWN, "torch": "2.5.1", "scipy": "1.14.0", "monai": "1.4.0"})
    flow = _kernel_flow(fake, tmp_path, "import time; time.sleep(1); print('Successfully installed mamba-ssm')",
                        missing=("the CUDA toolkit (nvcc)",))
    build = flow.install_kernels(cuda_usable=True)
    assert build is not None and build.poll() is None  # returned at once: pip still runs, Slicer stays usable
    question = fake.calls[0][1]
    assert fake.calls[0][2] == "SegMamba: fast GPU kernels" and question.startswith(KERNELS)
    assert "lacks the CUDA toolkit (nvcc), so a build from source would fail here" in question
    assert fake.calls[2] == ("launch", ["-c", CONSTRAINTS, "--no-build-isolation", "mamba-ssm", "causal-conv1d"])
    assert "torch==2.5.1" in fake.constraints[0].splitlines() and fake.constraint_paths[0].exists()
    flow.finish_kernels(build)
    assert fake.calls[3:] == [("log", "Successfully installed mamba-ssm"),
                              ("ask", "The fused kernels are installed. Restart Slicer now to use them?"),
                              ("restart",)]
    assert not fake.constraint_paths[0].exists()


def test_a_failed_kernel_build_is_shown_with_pips_output_and_no_restart(tmp_path) -> None:
    fake = FakeSlicer({**SLICER_OWN, "torch": "2.5.1"})
    flow = _kernel_flow(fake, tmp_path, "import sys; print('error: nvcc was not found'); sys.exit(1)")
    flow.finish_kernels(flow.install_kernels(cuda_usable=True))
    assert [c[0] for c in fake.calls] == ["confirm", "log", "launch", "log", "error"]
    assert fake.calls[-1][1] == "Installing the fused kernels failed; the pure PyTorch scan is used."
    assert "nvcc was not found" in fake.calls[-1][2].output and not fake.constraint_paths[0].exists()


def test_build_tools_are_looked_for_on_the_path_and_in_cuda_home(tmp_path) -> None:
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    nothing = lambda name: None  # noqa: E731
    assert missing_build_tools(nothing, {}) == ("the CUDA toolkit (nvcc)", "a C++ compiler")
    assert missing_build_tools(lambda name: "/usr/bin/g++" if name == "g++" else None,
                               {"CUDA_HOME": str(tmp_path / "cuda")}) == ()


def test_constraints_file_holds_the_pins_and_is_removed_even_when_the_body_raises() -> None:
    plan = plan_install(CORE, {**SLICER_OWN, "torch": "2.5.1"}, (5, 12), pytorch_extension=True)
    with pytest.raises(RuntimeError), constraints_file(plan) as path:
        assert Path(path).read_text() == KEEP.replace(", ", "\n") + "\ntorch==2.5.1\n"
        raise RuntimeError("pip failed")
    assert not os.path.exists(path)
