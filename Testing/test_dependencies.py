"""First-run dependency decisions: what gets installed, how, and that Slicer's own packages are never touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from SegMambaSlicerLib.slicer.install import (
    PACKAGING_INSTALLER,
    PIP,
    PIP_INSTALLER,
    PYTORCH_EXTENSION,
    RequirementsFileError,
    describe_missing,
    describe_plan,
    fused_kernel_offer,
    has_slicer_packaging,
    import_name,
    installed_versions,
    parse_requirements,
    pip_install_arguments,
    plan_install,
    read_requirements,
)

ROOT = Path(__file__).resolve().parents[1]
CORE = [Requirement(r) for r in ("torch>=2.1", "numpy>=1.24", "SimpleITK>=2.2", "scipy>=1.10", "monai>=1.3",
                                 "dynamic-network-architectures>=0.2,<0.4")]
# A Slicer 5.8-like Python: its own numpy/SimpleITK/vtk/requests, an old scipy, nothing of ours.
FRESH_SLICER = {"numpy": "1.23.5", "simpleitk": "2.4.0", "vtk": "9.2.20230607", "requests": "2.31.0",
                "scipy": "1.9.3", "torch": None, "monai": None, "dynamic-network-architectures": None}


def test_requirements_file_matches_pyproject_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert sorted(map(str, read_requirements())) == sorted(str(Requirement(d)) for d in declared)


def test_requirement_lines_skip_comments_and_options_and_name_bad_lines() -> None:
    lines = ["# comment", "", "-c constraints.txt", "monai>=1.3  # trailing comment", "--index-url x", "scipy"]
    assert [str(r) for r in parse_requirements(lines)] == ["monai>=1.3", "scipy"]
    with pytest.raises(RequirementsFileError, match="line 2: 'monai >= = 1' is not a valid requirement"):
        parse_requirements(["scipy", "monai >= = 1"])
    with pytest.raises(RequirementsFileError, match="missing"):
        read_requirements(ROOT / "no-such-requirements.txt")


def test_fresh_slicer_512_installs_torch_by_extension_and_never_touches_slicer_packages() -> None:
    plan = plan_install(CORE, FRESH_SLICER, (5, 12), pytorch_extension=True, imported={"numpy", "vtk"})
    assert plan.needed
    assert (plan.torch, plan.torch_installer, plan.installer) == ("torch>=2.1", PYTORCH_EXTENSION,
                                                                  PACKAGING_INSTALLER)
    assert plan.packages == ("scipy>=1.10", "monai>=1.3", "dynamic-network-architectures<0.4,>=0.2")
    assert plan.left_alone == ("numpy>=1.24 (Slicer has 1.23.5)",)  # too old, yet not replaced
    assert plan.constraints == ("SimpleITK==2.4.0", "numpy==1.23.5", "vtk==9.2.20230607", "requests==2.31.0")
    assert set(plan.skip_packages) == {"SimpleITK", "numpy", "vtk", "requests"}
    assert not plan.restart_needed  # scipy is installed but not imported yet


def test_upgrading_an_imported_package_needs_a_restart_and_installed_torch_is_pinned() -> None:
    installed = {**FRESH_SLICER, "numpy": "1.26.4", "torch": "2.5.1+cu124"}
    plan = plan_install(CORE, installed, (5, 10), pytorch_extension=False, imported={"scipy", "numpy"})
    assert plan.torch is None and plan.installer == PIP_INSTALLER and plan.torch_installer == PIP
    assert plan.restart_needed and plan.left_alone == ()
    assert "torch==2.5.1+cu124" in plan.constraints


def test_nothing_to_do_when_everything_is_satisfied_and_markers_are_honoured() -> None:
    installed = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "simpleitk": "2.5.7", "scipy": "1.17.1",
                 "monai": "1.6.1", "dynamic-network-architectures": "0.3.1"}
    windows_only = Requirement('pywin32>=300; sys_platform == "nonexistent-os"')
    plan = plan_install([*CORE, windows_only], installed, (5, 12), pytorch_extension=True)
    assert not plan.needed and plan.packages == () and plan.torch is None
    too_new = plan_install([Requirement("dynamic-network-architectures>=0.2,<0.3")], installed, (5, 12), True)
    assert too_new.packages == ("dynamic-network-architectures<0.3,>=0.2",)  # 0.3.1 is outside the range


def test_slicer_version_decides_the_installer_and_pip_arguments_keep_paths_whole() -> None:
    assert has_slicer_packaging((5, 12)) and has_slicer_packaging((6, 0))
    assert not has_slicer_packaging((5, 10)) and not has_slicer_packaging((5, 8))
    constraints = Path("/tmp/Slicer temp/constraints.txt")
    assert pip_install_arguments(["monai>=1.3"], constraints, ["--no-build-isolation"]) == [
        "-c", str(constraints), "--no-build-isolation", "monai>=1.3"]
    assert pip_install_arguments(["scipy"], None) == ["scipy"]


def test_fused_kernels_are_offered_only_with_cuda_on_linux() -> None:
    none_installed = {"mamba-ssm": None, "causal-conv1d": None}
    assert fused_kernel_offer(True, "linux", none_installed) == ("mamba-ssm", "causal-conv1d")
    assert fused_kernel_offer(True, "linux", {"mamba-ssm": "2.2.4", "causal-conv1d": None}) == ("causal-conv1d",)
    assert fused_kernel_offer(False, "linux", none_installed) == ()
    assert fused_kernel_offer(True, "win32", none_installed) == ()
    assert fused_kernel_offer(True, "darwin", none_installed) == ()


def test_plan_description_lists_what_happens_and_when_a_restart_is_needed() -> None:
    plan = plan_install(CORE, FRESH_SLICER, (5, 12), pytorch_extension=True)
    text = describe_plan(plan)
    assert "PyTorch (torch>=2.1), through the PyTorch extension" in text
    assert "  • monai>=1.3" in text and "kept exactly as they are" in text
    assert "numpy>=1.24 (Slicer has 1.23.5)" in text
    assert "restarted" not in text
    upgraded = plan_install(CORE, FRESH_SLICER, (5, 12), pytorch_extension=False, imported={"scipy"})
    assert "with pip" in describe_plan(upgraded) and "must be restarted" in describe_plan(upgraded)


def test_banner_names_the_missing_packages_torch_first() -> None:
    plan = plan_install(CORE, FRESH_SLICER, (5, 12), pytorch_extension=True)
    assert describe_missing(plan) == ("SegMamba needs Python packages that are not installed yet: torch>=2.1, "
                                      "scipy>=1.10, monai>=1.3, dynamic-network-architectures<0.4,>=0.2.")
    no_torch = plan_install(CORE, {**FRESH_SLICER, "torch": "2.5.1"}, (5, 12), pytorch_extension=True)
    assert describe_missing(no_torch).endswith("not installed yet: scipy>=1.10, monai>=1.3, "
                                               "dynamic-network-architectures<0.4,>=0.2.")


def test_installed_versions_and_import_names_in_this_environment() -> None:
    versions = installed_versions(["numpy", "No-Such_Package.x"])
    assert versions == {"numpy": np.__version__, "no-such-package-x": None}
    assert import_name("SimpleITK") == "SimpleITK"
    assert import_name("dynamic-network-architectures") == "dynamic_network_architectures"
    assert import_name("mamba_ssm") == "mamba_ssm"
