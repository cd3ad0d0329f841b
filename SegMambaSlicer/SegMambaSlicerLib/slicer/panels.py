"""What the module's panels show, decided without Qt: the device panel, the model list and info line,
the options of a run and the status line after it.

The widget only copies these into its widgets. Everything that needs torch is imported inside the
functions, so the module opens (and offers the install) before PyTorch is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import SegMambaError
from ..models.cards import ModelCard, builtin_cards

if TYPE_CHECKING:
    from ..engine.estimate import Estimate
    from ..engine.pipeline import SegmentationResult, SegmentOptions
    from .logic import SystemInfo

#: What the estimate's advice calls the module's settings.
LOW_MEMORY_HINT = "Low memory (Advanced)"
CPU_HINT = "the CPU (Device)"


@dataclass(frozen=True)
class DevicePanel:
    """The device selector's (value, label) choices, the info line under it, and whether CUDA is usable."""

    choices: tuple[tuple[str, str], ...]
    info: str
    cuda_usable: bool


def device_panel(ready: bool, probe: Callable[[], SystemInfo] | None = None) -> DevicePanel:
    """The devices torch can use; a line saying why there are none when torch is missing or broken.

    ``probe`` (default: :func:`logic.system_info`) is replaced only by tests. A PyTorch that fails
    to import or to probe must not stop the module from loading, so any error becomes the info line.
    """
    if not ready:
        return DevicePanel((), "PyTorch is not installed yet.", False)
    try:
        from .logic import describe_system, device_choices, system_info

        info = (probe or system_info)()
    except Exception as exc:  # noqa: BLE001 - a broken PyTorch install must not stop the module from loading
        return DevicePanel((), f"PyTorch is installed but cannot be loaded: {exc}. Reinstall it.", False)
    return DevicePanel(tuple(device_choices(info)), describe_system(info), info.cuda_usable)


def model_cards(ready: bool) -> tuple[dict[str, ModelCard], str | None]:
    """(cards by id, warning): all registered models once the packages are in place, else the built-in ones.

    Listing imported models needs the installed packages; when it fails (e.g. a broken PyTorch) the
    built-in models still show and the warning says why the others do not.
    """
    if ready:
        try:
            from ..models.registry import all_cards

            return all_cards(), None
        except Exception as exc:  # noqa: BLE001 - e.g. a broken PyTorch; the built-in models still show
            return builtin_cards(), f"Imported models cannot be listed: {exc}"
    return builtin_cards(), None


def model_info_text(card: ModelCard) -> str:
    """The lines under the model selector: what the model is for and whether its weights are there."""
    weights = card.weights_path()
    state = "weights ready" if weights is not None and weights.is_file() else (
        card.weights.instructions or "no weights yet: use Load checkpoint…")
    return f"{card.description}\n{card.intended_use}\n{state}".strip()


class RunParameters(Protocol):
    """The run choices of the module's parameter node (names as Slicer's parameter node has them)."""

    device: str
    overlap: float
    swBatchSize: int
    tta: bool
    mixedPrecision: bool
    fusedKernels: bool
    lowMemory: bool


def segment_options(parameters: RunParameters) -> SegmentOptions:
    """The pipeline options for the choices in the parameter node; no fused kernels means the torch scan.

    The confidence map is always asked for: it comes from the logits the label map is taken from (no extra
    network pass), and the review panel's overlay and low-confidence volumes need it.
    """
    from ..engine.pipeline import SegmentOptions

    p = parameters
    return SegmentOptions(
        device=p.device or "auto", overlap=p.overlap, sw_batch_size=p.swBatchSize, tta=p.tta,
        mixed_precision=p.mixedPrecision, scan_backend=None if p.fusedKernels else "torch", confidence=True,
        low_memory=p.lowMemory)


@dataclass(frozen=True)
class EstimatePanel:
    """The line next to the Segment button, and the warning to confirm before a run that would not fit."""

    text: str
    shortfall: str | None = None


def estimate_panel(compute: Callable[[], Estimate]) -> EstimatePanel:
    """The estimate line for the current inputs, model and options (``compute``: the logic's estimate).

    Before the first run with a model and device no rate is measured yet: the line gives the windows and
    the memory known without it and says that the time follows the first run. An input problem (a missing
    volume, an empty image) becomes the line; any other failure too, so the panel never stops the module.
    """
    from ..engine.estimate import memory_shortfall, shortfall_message, summary

    try:
        est = compute()
    except SegMambaError as exc:
        return EstimatePanel(f"Estimate: {exc}")
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop the module; the run will say more
        return EstimatePanel(f"Estimate unavailable: {type(exc).__name__}: {exc}")
    text = f"Estimate: {summary(est, unknown_time='time: measured after the first run')}."
    short = memory_shortfall(est)
    if short is None:
        return EstimatePanel(text)
    warning = shortfall_message(short, LOW_MEMORY_HINT, CPU_HINT)
    warning = warning[0].upper() + warning[1:]
    return EstimatePanel(f"{text}\nNot enough memory: {warning}", warning)


def finished_status(result: SegmentationResult) -> str:
    """The status line after a run: time, device, windows, and a pointer to the input warnings if any."""
    windows = f"{result.windows} window{'s' if result.windows != 1 else ''}"
    caveat = f" {len(result.warnings)} warning(s) about the inputs: see the log." if result.warnings else ""
    return f"Done in {result.seconds:.0f} s on {result.device} ({windows}).{caveat}"


class ComboBox(Protocol):
    """The calls of a Qt combo box that :func:`refill_combo` makes (``qt.QComboBox`` has them all)."""

    def blockSignals(self, block: bool) -> bool: ...
    def clear(self) -> None: ...
    def addItem(self, text: str, userData: object) -> None: ...
    def findData(self, data: object) -> int: ...
    def setCurrentIndex(self, index: int) -> None: ...


def refill_combo(combo: ComboBox, choices: Iterable[tuple[str, str]], selected: str | None) -> None:
    """Replace a selector's (value, label) choices and select ``selected`` if it is among them.

    Qt emits ``currentIndexChanged`` on ``clear()`` and ``addItem()``; a selector bound to the
    parameter node would then save the first entry over the user's choice (the saved device became
    "auto" at every start). Signals are blocked while refilling; the caller handles the final
    selection (a refill is not a user's choice).
    """
    was_blocked = combo.blockSignals(True)
    try:
        combo.clear()
        for value, label in choices:
            combo.addItem(label, value)
        index = combo.findData(selected) if selected is not None else -1
        if index >= 0:
            combo.setCurrentIndex(index)
    finally:
        combo.blockSignals(was_blocked)
