"""MRML adapter: volume nodes <-> SimpleITK images, label maps -> segmentation nodes.

This is the only module of the library that imports ``slicer``/``vtk``. It works both
inside the 3D Slicer application and on the PyPI ``slicer-core`` package (real MRML
without the application), which is how the tests exercise it: :func:`headless_scene`
builds a scene with the same logics the application would provide.

Geometry convention: MRML stores a volume's voxel-to-world mapping as an IJK-to-RAS
matrix next to image data whose own origin/spacing are ignored; SimpleITK uses LPS
origin/spacing/direction. Both index voxels in the same (i, j, k) order, so the voxel
array is shared unchanged (numpy ``(k, j, i)`` = SimpleITK ``(z, y, x)``) and only the
matrix is converted. Results are therefore always written on the input's own grid.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtkmodules.util import numpy_support

from ..errors import InputImageError, SegMambaError
from ..io.seg_nrrd import label_layer_array, segment_ids, terminology_tag_value
from ..models.cards import LabelSpec

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_BINARY_LABELMAP = "Binary labelmap"



class SceneError(SegMambaError):
    """The scene has no volumes logic bound to it (not Slicer's scene, nor one from :func:`headless_scene`)."""


class NotAVolumeError(InputImageError, ValueError):
    """An image handed to the scene is not a 3-D scalar volume (4-D, vector or colour images are not)."""


@dataclass
class HeadlessScene:
    """A slicer-core scene with the logics that Slicer's application would create for it."""

    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkSlicerApplicationLogic
    volumes_logic: slicer.vtkSlicerVolumesLogic
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic


# Scenes made by headless_scene(), by id(scene): lets load_volume_file find the volumes logic.
_HEADLESS: dict[int, HeadlessScene] = {}


def _build_headless_scene() -> HeadlessScene:
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # The volumes logic looks up the "Colors" module logic to colour label maps.
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    for module_name, logic in (("Volumes", volumes), ("Segmentations", segmentations)):
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(module_name, logic)
    return HeadlessScene(scene, app_logic, volumes, segmentations)


@contextlib.contextmanager
def headless_scene() -> Iterator[HeadlessScene]:
    """A fresh scene with colors, volumes and segmentations logics, outside the Slicer application.

    Outside the application it also installs ``slicer.mrmlScene`` and a minimal
    ``slicer.modules`` (``volumes.logic()``, ``segmentations.logic()``) for the duration, so
    ``slicer.util`` helpers such as ``arrayFromVolume`` or ``getNode`` work; the previous values
    are restored on exit. Inside the application the globals are left alone.
    """
    headless = _build_headless_scene()
    install_globals = not hasattr(slicer, "app")
    missing = object()
    saved = {key: getattr(slicer, key, missing) for key in ("mrmlScene", "modules")}
    if install_globals:
        slicer.mrmlScene = headless.scene
        slicer.modules = types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: headless.volumes_logic),
            segmentations=types.SimpleNamespace(logic=lambda: headless.segmentations_logic),
        )
    _HEADLESS[id(headless.scene)] = headless
    try:
        yield headless
    finally:
        del _HEADLESS[id(headless.scene)]
        if install_globals:
            for key, value in saved.items():
                if value is missing:
                    delattr(slicer, key)
                else:
                    setattr(slicer, key, value)
        headless.scene.Clear(True)
        # The segmentations logic is left bound: unbinding it logs a spurious subject-hierarchy warning,
        # and it is released with the scene.
        for logic in (headless.volumes_logic, headless.app_logic):
            logic.SetMRMLScene(None)


def _volumes_logic(scene: slicer.vtkMRMLScene) -> slicer.vtkSlicerVolumesLogic:
    """The volumes logic bound to ``scene``: from headless_scene() or from the running application."""
    headless = _HEADLESS.get(id(scene))
    if headless is not None and headless.scene is scene:
        return headless.volumes_logic
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "volumes"):
        logic = modules.volumes.logic()
        if logic.GetMRMLScene() is scene:
            return logic
    raise SceneError(
        "No volumes logic is bound to this scene: use the scene of the Slicer application or one "
        "created with SegMambaSlicerLib.slicer.mrml.headless_scene()."
    )


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK image (columns = RAS step of one voxel along i, j, k)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return _LPS_FROM_RAS @ lps


def _set_geometry_from_ijk_to_ras(image: sitk.Image, ras: np.ndarray) -> None:
    lps = _LPS_FROM_RAS @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputImageError("The volume has a zero voxel spacing; its geometry is invalid.")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())


def _world_ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """IJK-to-RAS of a volume including a linear parent transform, i.e. where the user sees it."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _in_world(node, _numpy_matrix(matrix))


def _in_world(node: slicer.vtkMRMLTransformableNode, ras: np.ndarray) -> np.ndarray:
    """An IJK-to-RAS matrix of ``node``'s voxels moved by its linear parent transform (voxels are not resampled)."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return ras
    if not transform_node.IsTransformToWorldLinear():
        raise InputImageError(
            f"'{node.GetName()}' is under a non-linear transform. Harden the transform "
            "(Transforms module, 'Harden transform') before using it."
        )
    to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(to_world)
    return _numpy_matrix(to_world) @ ras


def image_from_volume_node(node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image with its exact world geometry.

    A linear parent transform is applied to the geometry (voxels are never resampled), so
    the network sees the volume where the user sees it.
    """
    image_data = node.GetImageData() if node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "(none)"
        raise InputImageError(f"Volume '{name}' has no voxel data; load or select another volume.")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise InputImageError(
            f"Volume '{node.GetName()}' has {components} components per voxel (colour or vector image); "
            "the model needs a grayscale scalar volume."
        )
    dims = image_data.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    image = sitk.GetImageFromArray(flat.reshape(dims[2], dims[1], dims[0]))
    _set_geometry_from_ijk_to_ras(image, _world_ijk_to_ras(node))
    return image


def _vtk_image_data(array_zyx: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData (origin 0, spacing 1: MRML keeps geometry in the node) owning a copy of the array."""
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def volume_node_from_image(
    image: sitk.Image, scene: slicer.vtkMRMLScene, name: str, labelmap: bool = False
) -> slicer.vtkMRMLVolumeNode:
    """Add a scalar (or label map) volume node holding a copy of a 3-D SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise NotAVolumeError("volume_node_from_image needs a 3-D scalar image.")
    array = sitk.GetArrayFromImage(image)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(image)))
    node.SetAndObserveImageData(_vtk_image_data(array))
    node.CreateDefaultDisplayNodes()
    return node


def load_volume_file(path: str | Path, scene: slicer.vtkMRMLScene, name: str) -> slicer.vtkMRMLVolumeNode:
    """Load an image file with Slicer's own reader (volumes logic), as File > Add Data would.

    Uses the 3-argument ``AddArchetypeVolume(filename, name, loadingOptions)``, a form every released Slicer
    (5.10-5.12) has; the form with a ``userMessages`` collection exists only in slicer-core snapshots, so the
    reason for a failure is worked out by :func:`_unreadable_reason` instead.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputImageError(f"Image file {path} does not exist.")
    single_file = 1 << 2  # do not try to assemble a series from similarly named files
    node = _volumes_logic(scene).AddArchetypeVolume(str(path), name, single_file)
    if node is None:
        raise InputImageError(f"3D Slicer could not read {path} as a volume: {_unreadable_reason(path)}.")
    return node


def _unreadable_reason(path: Path) -> str:
    """A likely reason why Slicer's volume readers rejected ``path``, from ITK's header reader.

    Slicer's readers are ITK's image IO plus a few of its own, so ITK not recognising the header means the file
    is not an image in a known format; a readable header points at the voxel data or an unusual image type.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "it is not an image in a format 3D Slicer reads, or the file is damaged"
    return (f"its header describes a {reader.GetDimension()}-D image with {reader.GetNumberOfComponents()} "
            "value(s) per voxel, but the voxel data could not be loaded (truncated file or unsupported type; "
            "the Slicer log has the reader's message)")


def _oriented_image_data(array_zyx: np.ndarray, image: sitk.Image) -> slicer.vtkOrientedImageData:
    layer = slicer.vtkOrientedImageData()
    layer.ShallowCopy(_vtk_image_data(array_zyx))
    layer.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(image)))
    return layer


def import_labelmap_to_segmentation(
    labelmap: sitk.Image,
    labels: Sequence[LabelSpec],
    scene: slicer.vtkMRMLScene,
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    reference_volume_node: slicer.vtkMRMLScalarVolumeNode | None = None,
    name: str = "SegMamba segmentation",
) -> slicer.vtkMRMLSegmentationNode:
    """Show a label map as a segmentation: one segment per label, all sharing one labelmap layer.

    Sharing one ``vtkOrientedImageData`` with per-segment label values avoids splitting the
    map into one binary image per label (Slicer's generic import is ~50x slower for many
    labels). Every label gets its segment even when empty, so users see "0 mL" rather than
    a missing row. A reused ``segmentation_node`` loses its previous segments. The
    reference geometry (the grid the Segment Editor edits on) is the reference volume's,
    or the label map's own grid when no reference volume is given.
    """
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise NotAVolumeError("import_labelmap_to_segmentation needs a 3-D scalar label map.")
    layer = _oriented_image_data(label_layer_array(sitk.GetArrayViewFromImage(labelmap), labels), labelmap)
    node = segmentation_node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    was_modifying = node.StartModify()
    try:
        segmentation = node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(_BINARY_LABELMAP)
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        else:
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(layer),
            )
        for segment_id, label in zip(segment_ids(labels), labels, strict=True):
            segmentation.AddSegment(_segment(label, layer), segment_id)
        node.CreateDefaultDisplayNodes()
    finally:
        node.EndModify(was_modifying)
    return node


def _segment(label: LabelSpec, layer: slicer.vtkOrientedImageData) -> slicer.vtkSegment:
    segment = slicer.vtkSegment()
    segment.SetName(label.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*label.color)
    segment.SetColorAutoGenerated(False)
    segment.AddRepresentation(_BINARY_LABELMAP, layer)
    segment.SetLabelValue(label.value)
    if label.terminology:
        segment.SetTag(
            slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_tag_value(label.terminology)
        )
    return segment


def prior_labelmap(node: slicer.vtkMRMLNode, labels: Sequence[LabelSpec]) -> sitk.Image:
    """A prior result (segmentation, or label map volume) as a label map with the labels' values, on its own grid.

    Comparing against another scan then resamples the prior once, as the ``measure`` command does.
    """
    if isinstance(node, slicer.vtkMRMLSegmentationNode):
        return _segmentation_labelmap(node, labels)
    return image_from_volume_node(node)


def _segmentation_labelmap(node: slicer.vtkMRMLSegmentationNode, labels: Sequence[LabelSpec]) -> sitk.Image:
    """The label segments of a segmentation merged into one label map.

    Segments are matched to labels by segment ID (this module's and the CLI's .seg.nrrd files use the label
    names), else by segment name or the label's abbreviation (case-insensitive); other segments, such as the
    derived regions, are left out. The grid is the segmentation's reference geometry, grown to hold every
    segment.
    """
    segmentation = node.GetSegmentation()
    chosen = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for label, label_id in zip(labels, segment_ids(labels), strict=True):
        found = _segment_for(segmentation, label, label_id)
        if found:
            chosen.InsertNextValue(found)
            values.InsertNextValue(label.value)
    if chosen.GetNumberOfValues() == 0:
        names = ", ".join(label.name for label in labels)
        raise InputImageError(f"Segmentation '{node.GetName()}' has no segment named after the model's labels "
                              f"({names}); choose a segmentation made with the same model.")
    merged = slicer.vtkOrientedImageData()
    if not (segmentation.CreateRepresentation(_BINARY_LABELMAP) and node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_AND_REFERENCE_GEOMETRY, None,
            chosen, values)):
        raise InputImageError(f"Segmentation '{node.GetName()}' cannot be turned into a label map.")
    return _image_from_oriented(merged, node)


def _segment_for(segmentation: slicer.vtkSegmentation, label: LabelSpec, label_id: str) -> str:
    """The ID of the segment holding ``label`` ("" when none does): by ID, then by name or abbreviation."""
    if segmentation.GetSegment(label_id) is not None:
        return label_id
    for name in filter(None, (label.name, label.abbreviation)):
        found = segmentation.GetSegmentIdBySegmentName(name)
        if found:
            return found
    return ""


def _image_from_oriented(layer: slicer.vtkOrientedImageData, node: slicer.vtkMRMLSegmentationNode) -> sitk.Image:
    """A copy of a segmentation's labelmap as a SimpleITK image in world space (the node's transform applied)."""
    extent = layer.GetExtent()
    dims = [extent[2 * axis + 1] - extent[2 * axis] + 1 for axis in range(3)]
    if min(dims) < 1:
        raise InputImageError(f"Segmentation '{node.GetName()}' is empty: there is nothing to compare with.")
    flat = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())
    image = sitk.GetImageFromArray(flat.reshape(dims[2], dims[1], dims[0]))
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    ras = _numpy_matrix(matrix)
    ras[:, 3] = ras @ np.array([extent[0], extent[2], extent[4], 1.0])  # the array starts at the extent's corner
    _set_geometry_from_ijk_to_ras(image, _in_world(node, ras))
    return image
