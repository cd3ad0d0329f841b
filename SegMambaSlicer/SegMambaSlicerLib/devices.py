"""Choosing and describing the compute device (CUDA, Apple MPS, CPU)."""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda[:N]" | "mps" to an available torch device, or explain why not."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise DeviceError(
                f"CUDA was requested but no usable NVIDIA GPU was found (torch {torch.__version__} is {build}). "
                "Choose device 'cpu' or install a CUDA build of PyTorch that supports your GPU."
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"GPU {device.index} does not exist; this machine has {torch.cuda.device_count()}.")
        return device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError("Apple MPS was requested but is not available; choose 'cpu'.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.")


def describe_device(device: torch.device) -> str:
    """One line for logs and the GUI: device, GPU name and memory, torch build."""
    text = f"torch {torch.__version__}, device {device}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda})"
    return text
