"""The shared words (sciquant.vocabulary) are the ones every layer uses."""

from __future__ import annotations

import dataclasses

from sciquant.vocabulary import COORDINATES


def test_every_layer_uses_the_one_coordinates_tuple():
    from sciquant import launch
    from sciquant.report import cube
    from sciquant.study import Run
    from sciquant.workloads.bloodflow import evaluate as bloodflow
    from sciquant.workloads.md import evaluate as md

    assert tuple(field.name for field in dataclasses.fields(Run)) == COORDINATES
    assert cube.COORDINATES is COORDINATES and launch.COORDINATES is COORDINATES
    assert md.COORDINATE_KEYS is COORDINATES and bloodflow.COORDINATES is COORDINATES
    run = Run("d", "m", 3, "t", "x", "w8a8")
    assert run.folder.split("/")[1:] == ["d", "m", "seed3", "t", "x", "w8a8"]


def test_tensorrt_builds_exactly_the_precisions_its_targets_run_natively():
    import pytest

    from sciquant.errors import SciquantError
    from sciquant.quant.targets import TARGETS
    from sciquant.runtime.tensorrt import BUILD_PRECISIONS, build_precision

    rows = [t for t in TARGETS.values() if t.backend == "tensorrt"]
    assert rows
    for target in rows:
        assert set(target.native_precisions) == set(BUILD_PRECISIONS), target.name
    assert build_precision("w8a8") == "int8"
    with pytest.raises(SciquantError, match="w4a8 does not run natively on TensorRT"):
        build_precision("w4a8")
