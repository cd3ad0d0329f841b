"""First-run dependency setup inside 3D Slicer: what to install, how, and what never to touch.

Installing packages into Slicer's Python is where AI extensions most often break Slicer itself: pip
replaces Slicer's own SimpleITK, numpy, vtk or requests with wheels built for a different Slicer
(docs/user-guide.md, "In 3D Slicer"). Every decision is therefore a pure function of the requirements, the installed
versions, the Slicer version and the GPU state, with unit tests; install_flow.py asks the user once
and carries the plan out:

1. torch, when missing or too old, through the PyTorch extension (which picks the CUDA build for the
   GPU) or plain pip when that extension is absent;
2. then, with a fresh plan (so the new torch is pinned too), the other requirements with a constraints
   file that pins everything Slicer already has — ``slicer.packaging.pip_ensure`` on Slicer ≥ 5.12,
   ``slicer.util.pip_install`` of only the missing requirements on older versions;
3. optionally, the fused CUDA kernels (mamba-ssm, causal-conv1d), offered only where they can run.

This module imports neither Qt, slicer nor torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # Slicer releases before 5.12 ship pip (with its own copy) but may lack packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name

from ..errors import SegMambaError
from ..models.resources import resources_dir

#: Slicer's own builds of these are never installed, upgraded or replaced.
PROTECTED = ("SimpleITK", "numpy", "vtk", "requests")
TORCH = "torch"
#: Optional fused CUDA kernels of the selective scan (Linux + CUDA only).
FUSED_KERNELS = ("mamba-ssm", "causal-conv1d")
#: Their build needs the installed torch, not a second one pip would fetch into an isolated build.
FUSED_KERNEL_PIP_OPTIONS = ("--no-build-isolation",)
#: First Slicer release with slicer.packaging (pip_ensure with constraints and skip_packages).
SLICER_PACKAGING_SINCE = (5, 12)
PACKAGING_INSTALLER, PIP_INSTALLER = "slicer.packaging", "slicer.util.pip_install"
PYTORCH_EXTENSION, PIP = "PyTorch extension", "pip"
# Import names that differ from the distribution name with '-' replaced by '_'.
_IMPORT_NAMES = {"simpleitk": "SimpleITK"}


class RequirementsFileError(SegMambaError):
    """The extension's requirements.txt is missing or has a line pip would not accept."""


def requirements_file() -> Path:
    """Resources/requirements.txt: the core requirements (same list as pyproject.toml's dependencies)."""
    return resources_dir() / "requirements.txt"


def parse_requirements(lines: Iterable[str], source: str = "requirements") -> list[Requirement]:
    """Requirements from requirements.txt lines; comments, blank lines and pip options are skipped."""
    found = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            found.append(Requirement(line))
        except InvalidRequirement as exc:
            raise RequirementsFileError(
                f"{source}, line {number}: {line!r} is not a valid requirement ({exc})."
            ) from None
    return found


def read_requirements(path: Path | None = None) -> list[Requirement]:
    """Parse a requirements file (default: the extension's own)."""
    path = path or requirements_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequirementsFileError(f"The extension's requirements file {path} is missing; reinstall it.") from None
    return parse_requirements(text.splitlines(), source=str(path))


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), keyed by canonical name."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[canonicalize_name(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[canonicalize_name(name)] = None
    return versions


def import_name(distribution: str) -> str:
    """Top-level module a distribution provides (for knowing whether it is already imported)."""
    canonical = canonicalize_name(distribution)
    return _IMPORT_NAMES.get(canonical, canonical.replace("-", "_"))


def is_satisfied(requirement: Requirement, installed: Mapping[str, str | None]) -> bool:
    """True when the installed version (keys canonical) meets the requirement; markers are honoured."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    version = installed.get(canonicalize_name(requirement.name))
    return version is not None and requirement.specifier.contains(version, prereleases=True)


def has_slicer_packaging(slicer_version: tuple[int, int]) -> bool:
    """Slicer ≥ 5.12 has slicer.packaging.pip_ensure; older releases only slicer.util.pip_install."""
    return tuple(slicer_version[:2]) >= SLICER_PACKAGING_SINCE


@dataclass(frozen=True)
class InstallPlan:
    """What the first-run setup will do; ``needed`` is False when everything is in place."""

    torch: str | None
    torch_installer: str
    packages: tuple[str, ...]
    installer: str
    constraints: tuple[str, ...]
    skip_packages: tuple[str, ...]
    left_alone: tuple[str, ...]
    restart_needed: bool
    #: Why the packages cannot be installed on this computer at all ("" when they can).
    blocked: str = ""

    @property
    def needed(self) -> bool:
        return self.torch is not None or bool(self.packages)

    @property
    def torch_specifier(self) -> str:
        """The version range alone (">=2.1"), as the PyTorch extension's installTorch expects it."""
        return str(Requirement(self.torch).specifier) if self.torch else ""


def pinned(installed: Mapping[str, str | None], names: Iterable[str]) -> tuple[str, ...]:
    """Constraint lines ``name==version`` for the installed ones of ``names``, so pip keeps them."""
    lines = []
    for name in names:
        version = installed.get(canonicalize_name(name))
        if version is not None:
            lines.append(f"{name}=={version}")
    return tuple(lines)


#: Intel Macs: PyTorch's last build (2.2) needs NumPy 1.x, and Slicer 5.10+ ships NumPy 2.
INTEL_MAC = (
    "PyTorch stopped publishing builds for Intel Macs at version 2.2, which needs NumPy 1.x, while Slicer "
    "5.10 and later ship NumPy 2; replacing Slicer's NumPy could break Slicer itself, so SegMamba does not "
    "install PyTorch here. Use an Apple Silicon Mac, Windows or Linux, or run the segmamba-slicer command "
    "in a separate Python environment (docs/user-guide.md, Troubleshooting)."
)


def platform_problem(platform: str, machine: str, torch_installed: bool) -> str:
    """Why PyTorch cannot be installed into Slicer on this computer ("" when it can).

    Only Intel Macs are refused, and only when no PyTorch is there yet: a PyTorch the user installed by
    hand (with a NumPy that suits it) is used as it is.
    """
    if platform == "darwin" and machine.lower() in ("x86_64", "amd64", "i386") and not torch_installed:
        return INTEL_MAC
    return ""


def plan_install(
    requirements: Iterable[Requirement],
    installed: Mapping[str, str | None],
    slicer_version: tuple[int, int],
    pytorch_extension: bool,
    imported: Collection[str] = (),
    machine: tuple[str, str] = ("", ""),
) -> InstallPlan:
    """Decide the installation for the unmet ``requirements``.

    ``installed`` maps canonical distribution names to versions (see :func:`installed_versions`);
    ``imported`` holds the top-level module names already imported in Slicer (``sys.modules``): an
    upgrade of one of those only takes effect after a restart. Protected packages are never
    installed; an unmet protected requirement is reported in ``left_alone`` instead. ``machine`` is
    (``sys.platform``, ``platform.machine()``); computers PyTorch cannot be installed on get ``blocked``.
    """
    protected = {canonicalize_name(n) for n in PROTECTED}
    torch, packages, left_alone, restart = None, [], [], False
    for requirement in requirements:
        if is_satisfied(requirement, installed):
            continue
        name = canonicalize_name(requirement.name)
        have = installed.get(name)
        if name in protected:
            left_alone.append(f"{requirement} (Slicer has {have or 'none'})")
            continue
        if have is not None and import_name(name) in imported:
            restart = True
        if name == TORCH:
            torch = str(requirement)
        else:
            packages.append(str(requirement))
    return InstallPlan(
        torch=torch,
        torch_installer=PYTORCH_EXTENSION if pytorch_extension else PIP,
        packages=tuple(packages),
        installer=PACKAGING_INSTALLER if has_slicer_packaging(slicer_version) else PIP_INSTALLER,
        constraints=pinned(installed, (*PROTECTED, TORCH)),
        skip_packages=PROTECTED,
        left_alone=tuple(left_alone),
        restart_needed=restart,
        blocked=platform_problem(*machine, torch_installed=installed.get(TORCH) is not None),
    )


def pip_install_arguments(packages: Iterable[str], constraints_file: str | Path | None,
                          options: Iterable[str] = ()) -> list[str]:
    """Arguments after ``pip install`` (a list, so paths with spaces survive on every platform)."""
    args = ["-c", str(constraints_file)] if constraints_file is not None else []
    return [*args, *options, *packages]


def fused_kernel_offer(cuda_usable: bool, platform: str, installed: Mapping[str, str | None]) -> tuple[str, ...]:
    """The fused-kernel packages worth offering: only with a usable CUDA GPU on Linux, only missing ones.

    mamba-ssm and causal-conv1d are CUDA-only and publish Linux builds only; elsewhere the pure
    PyTorch scan is used and nothing is offered.
    """
    if not cuda_usable or not platform.startswith("linux"):
        return ()
    return tuple(name for name in FUSED_KERNELS if installed.get(canonicalize_name(name)) is None)


def missing_build_tools(which: Callable[[str], str | None] = shutil.which,
                        environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """What a source build of the fused kernels needs and this computer lacks: nvcc and a C++ compiler.

    pip takes a prebuilt wheel of mamba-ssm/causal-conv1d when one matches the installed PyTorch and
    CUDA; otherwise it compiles them, which fails without the CUDA toolkit's nvcc or a C++ compiler.
    """
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    has_nvcc = which("nvcc") is not None or bool(cuda_home and Path(cuda_home, "bin", "nvcc").is_file())
    has_compiler = any(which(name) is not None for name in ("c++", "g++", "clang++"))
    return tuple(tool for tool, ok in (("the CUDA toolkit (nvcc)", has_nvcc), ("a C++ compiler", has_compiler))
                 if not ok)


def describe_kernel_offer(offer: Iterable[str], missing_tools: Iterable[str]) -> str:
    """The question before the fused-kernel install, saying when a source build would be needed."""
    text = (f"Install the optional fused CUDA kernels {', '.join(offer)}? They make the selective scan faster "
            "on NVIDIA GPUs; segmentation works without them. pip uses prebuilt wheels when some match this "
            "PyTorch and CUDA; otherwise it compiles the kernels, which can take a long time.")
    missing = list(missing_tools)
    if missing:
        text += (f" This computer lacks {' and '.join(missing)}, so a build from source would fail here: "
                 "install only if you know prebuilt wheels exist for your PyTorch and CUDA.")
    return text + " Slicer stays usable while they install."


def describe_missing(plan: InstallPlan) -> str:
    """The banner line shown while packages are missing (the install button sits under it)."""
    if plan.blocked:
        return plan.blocked
    return ("SegMamba needs Python packages that are not installed yet: "
            + ", ".join(filter(None, [plan.torch, *plan.packages])) + ".")


def describe_plan(plan: InstallPlan) -> str:
    """The text of the one confirmation dialog (and the log): what will be installed and what will not."""
    lines = ["SegMamba needs these Python packages in Slicer's Python environment:"]
    if plan.torch is not None:
        how = ("through the PyTorch extension, which chooses the build for this computer's GPU"
               if plan.torch_installer == PYTORCH_EXTENSION else
               "with pip (install the PyTorch extension first to get the right CUDA build for your GPU)")
        lines.append(f"  • PyTorch ({plan.torch}), {how}")
    lines += [f"  • {package}" for package in plan.packages]
    lines.append(f"Slicer's own {', '.join(PROTECTED)} are kept exactly as they are.")
    if plan.left_alone:
        lines.append("Not changed although older than requested (replacing them would break Slicer): "
                     + "; ".join(plan.left_alone) + ".")
    lines.append("The download can take several minutes (PyTorch with CUDA is about 2-3 GB).")
    if plan.restart_needed:
        lines.append("Slicer must be restarted afterwards, because older versions are already loaded.")
    return "\n".join(lines)
