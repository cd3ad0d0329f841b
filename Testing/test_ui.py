"""Static checks of the Qt side: every widget the module uses exists in the .ui with the expected class,
and every parameter-node binding in the .ui names a parameter of a fitting type."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "SegMambaSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "SegMambaSlicer.ui"
MODULE_FILE = MODULE / "SegMambaSlicer.py"

# The class each widget used from Python must have: the code calls these classes' methods on them.
EXPECTED_CLASSES = {
    "dependenciesFrame": "QFrame",
    "dependenciesLabel": "QLabel",
    "installDependenciesButton": "QPushButton",
    "modelSelector": "QComboBox",
    "loadCheckpointButton": "QPushButton",
    "modelInfoLabel": "QLabel",
    "inputVolumesWidget": "QWidget",
    "loadSampleButton": "QPushButton",
    "deviceSelector": "QComboBox",
    "deviceInfoLabel": "QLabel",
    "installKernelsButton": "QPushButton",
    "segmentButton": "QPushButton",
    "saveReportButton": "QPushButton",
    "exportDicomSegButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "estimateLabel": "QLabel",
    "showRegionsRadioButton": "QRadioButton",
    "show3DCheckBox": "QCheckBox",
    "showConfidenceCheckBox": "QCheckBox",
    "confidenceThresholdSpinBox": "QDoubleSpinBox",
    "priorSelector": "qMRMLNodeComboBox",
    "volumesTable": "QTableWidget",
    "reviewNotesLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
}
# Widget classes the parameter node wrapper can bind to each parameter type.
BINDABLE = {
    "bool": {"QCheckBox"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox"},
    "str": {"QComboBox", "QLineEdit"},
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
}
_QT_STANDARD = {"QWidget", "QFrame", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QRadioButton",
                "QCheckBox", "QTableWidget", "QPlainTextEdit", "QSpinBox", "QDoubleSpinBox", "QLineEdit"}


def _ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui().iter("widget")}


def _ui_attributes_used() -> set[str]:
    """Names X in every ``self.ui.X`` of the module file."""
    used = set()
    for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def _parameter_types() -> dict[str, str]:
    """Field name -> annotated type (innermost name) of the @parameterNodeWrapper class."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                   and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list))
    fields = {}
    for item in wrapper.body:
        if isinstance(item, ast.AnnAssign):
            annotation = item.annotation
            if isinstance(annotation, ast.Subscript):  # Annotated[float, WithinRange(...)]
                annotation = annotation.slice.elts[0]
            fields[item.target.id] = annotation.id
    return fields


def _bound_widgets() -> dict[str, str]:
    """Parameter name -> widget class for every widget with a SlicerParameterName property."""
    bound = {}
    for widget in _ui().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    return bound


def test_every_widget_the_module_uses_exists_with_the_expected_class() -> None:
    used = _ui_attributes_used()
    assert used == set(EXPECTED_CLASSES), (
        f"declare new widgets here with their class: {sorted(used - set(EXPECTED_CLASSES))}; "
        f"no longer used: {sorted(set(EXPECTED_CLASSES) - used)}")
    widgets = _widgets()
    wrong = {name: (widgets.get(name), cls) for name, cls in EXPECTED_CLASSES.items() if widgets.get(name) != cls}
    assert not wrong, f"(in .ui, expected): {wrong}"


def test_root_is_a_qmrmlwidget_and_names_are_unique() -> None:
    root = _ui()
    assert root.find("class").text == "SegMambaSlicer"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "SegMambaSlicer")
    names = [w.get("name") for w in root.iter("widget")] + [lay.get("name") for lay in root.iter("layout")]
    assert len(names) == len(set(names))


def test_parameter_bindings_name_parameters_of_a_fitting_type() -> None:
    fields, bound = _parameter_types(), _bound_widgets()
    assert bound, "the .ui binds no widget to the parameter node"
    for parameter, widget_class in bound.items():
        assert parameter in fields, f"{parameter} is bound in the .ui but not a parameter node field"
        assert widget_class in BINDABLE[fields[parameter]], (parameter, widget_class, fields[parameter])


def test_custom_widgets_are_declared_and_connections_name_real_widgets() -> None:
    root = _ui()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = set(_widgets().values())
    assert used - _QT_STANDARD <= declared, f"undeclared custom widgets: {sorted(used - _QT_STANDARD - declared)}"
    widgets = _widgets()
    for connection in root.iter("connection"):
        assert connection.find("sender").text in widgets and connection.find("receiver").text in widgets
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, cls in widgets.items() if cls == "qMRMLNodeComboBox"}
    assert mrml_widgets <= receivers, "every qMRMLNodeComboBox in the .ui must receive the scene"


def test_review_panel_offers_the_priors_the_logic_reads_and_a_0_to_1_threshold() -> None:
    """The prior selector lists what ``mrml.prior_labelmap`` converts; the threshold spans the confidence range."""
    widgets = {w.get("name"): w for w in _ui().iter("widget")}

    def prop(widget: str, name: str) -> ET.Element:
        return next(p for p in widgets[widget].findall("property") if p.get("name") == name)

    node_types = [item.text for item in prop("priorSelector", "nodeTypes").iter("string")]
    assert node_types == ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"]
    assert float(prop("confidenceThresholdSpinBox", "maximum").find("double").text) == 1.0
    minimum = [p for p in widgets["confidenceThresholdSpinBox"].findall("property") if p.get("name") == "minimum"]
    assert not minimum  # QDoubleSpinBox's default minimum, 0
    assert float(prop("confidenceThresholdSpinBox", "value").find("double").text) == 0.5


def _parameter_default_and_range(name: str) -> tuple[object, tuple[object, ...]]:
    """The default and the ``WithinRange(low, high)`` of one parameter node field, from the module file."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    field = next(n for n in ast.walk(tree)
                 if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == name)
    within = field.annotation.slice.elts[1]
    return ast.literal_eval(field.value), tuple(ast.literal_eval(arg) for arg in within.args)


def test_the_keep_loaded_setting_matches_the_parameter_and_the_workers_default_timeout() -> None:
    """The spin box shows the parameter's default and range (minutes), the warm worker's own default, and
    names 0 (the worker frees its memory after each run) instead of showing a bare 0."""
    from SegMambaSlicerLib.run.worker import DEFAULT_IDLE_TIMEOUT

    widget = next(w for w in _ui().iter("widget") if w.get("name") == "workerIdleSpinBox")
    props = {p.get("name"): p for p in widget.findall("property")}
    number = {key: int(props[key].find("number").text) for key in ("value", "minimum", "maximum")}
    default, (low, high) = _parameter_default_and_range("workerIdleMinutes")
    assert number["value"] == default == DEFAULT_IDLE_TIMEOUT / 60
    assert (number["minimum"], number["maximum"]) == (low, high) and low == 0
    assert props["specialValueText"].find("string").text
