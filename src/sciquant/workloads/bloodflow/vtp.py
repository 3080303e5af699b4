"""Read and write 1D centerline PolyData (`.vtp`) as the VMR / bloodflow_1d_mgn raw data ships it.

A centerline file holds points (x, y, z in cm), line cells of two point ids (the 1D segments) and
point-data arrays: `area` (cm²), `BranchIdTmp` (branch id, -1 on junction points), `BifurcationId`
(junction id on junction points, -1 elsewhere) and one array per stored step, `pressure_<k>`
(dyn/cm²) and `flow_<k>` (cm³/s; older files call it `velocity_<k>`), k the step index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray, vtk_to_numpy
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader, vtkXMLPolyDataWriter

from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path


@dataclass
class Centerline:
    """One centerline: `points` [N, 3], `edges` [E, 2] point ids, `point_data` name → [N] array."""

    points: np.ndarray
    edges: np.ndarray
    point_data: dict[str, np.ndarray]


def write_centerline(path: Path, centerline: Centerline) -> None:
    """Write a centerline as binary, zlib-compressed XML PolyData (what vtk and ParaView read)."""
    poly = vtkPolyData()
    points = vtkPoints()
    points.SetData(
        numpy_to_vtk(np.ascontiguousarray(centerline.points, dtype=np.float64), deep=True)
    )
    poly.SetPoints(points)

    edges = np.asarray(centerline.edges, dtype=np.int64)
    offsets = np.arange(0, 2 * len(edges) + 1, 2, dtype=np.int64)
    lines = vtkCellArray()
    lines.SetData(
        numpy_to_vtkIdTypeArray(offsets, deep=True),
        numpy_to_vtkIdTypeArray(np.ascontiguousarray(edges.reshape(-1)), deep=True),
    )
    poly.SetLines(lines)

    for name, values in centerline.point_data.items():
        array = numpy_to_vtk(np.ascontiguousarray(values), deep=True)
        array.SetName(name)
        poly.GetPointData().AddArray(array)

    with atomic_path(path) as tmp:
        writer = vtkXMLPolyDataWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(poly)
        writer.SetDataModeToBinary()
        writer.SetCompressorTypeToZLib()
        if writer.Write() != 1:
            raise SciquantError(f"{path}: vtk could not write the file; check free disk space")


def read_centerline(path: Path) -> Centerline:
    """Read a centerline `.vtp`; raise SciquantError naming the file if it is not one."""
    if not path.is_file():
        raise SciquantError(f"{path}: file not found")
    reader = vtkXMLPolyDataReader()
    if not reader.CanReadFile(str(path)):
        raise SciquantError(f"{path}: not a VTK XML PolyData (.vtp) file")
    reader.SetFileName(str(path))
    reader.Update()
    poly = reader.GetOutput()
    if poly is None or poly.GetNumberOfPoints() == 0:
        raise SciquantError(f"{path}: the file holds no points (truncated or empty .vtp)")

    points = vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    lines = poly.GetLines()
    offsets = vtk_to_numpy(lines.GetOffsetsArray())
    connectivity = vtk_to_numpy(lines.GetConnectivityArray())
    if len(offsets) < 2:
        raise SciquantError(f"{path}: the file holds no line cells (centerline segments)")
    edges = [
        (connectivity[a + i], connectivity[a + i + 1])
        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        for i in range(b - a - 1)
    ]
    point_data = {}
    pd = poly.GetPointData()
    for i in range(pd.GetNumberOfArrays()):
        array = pd.GetArray(i)
        if array is not None:
            point_data[array.GetName()] = vtk_to_numpy(array).copy()
    return Centerline(points=points, edges=np.asarray(edges, dtype=np.int64), point_data=point_data)
