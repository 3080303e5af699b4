"""Workloads: what a dataset is and which surrogates learn it, as plug-ins of one interface.

A workload is a `Workload`: its name (the config's ``datasets.<name>.workload``), the
architectures that learn it (``models.<name>.architecture``), the JSON Schema of its settings,
and the stages the workflow calls — synthesize, prepare, overview, train, quantize, export,
evaluate. The two built-in workloads, ``bloodflow`` (MeshGraphNet, PyTorch) and ``md`` (ICNNMD,
Keras), are plug-ins of it (`sciquant.workloads.bloodflow`, `sciquant.workloads.md`).

Any other is found through the entry point group `ENTRY_POINTS`: an installed package that
declares ::

    [project.entry-points."sciquant.workloads"]
    oscillator = "oscillator_workload:Oscillator"

makes ``workload: oscillator`` usable in a study config: the schema takes its settings, the
workflow runs its stages, the cube and the report hold its runs. A PyTorch surrogate subclasses
`sciquant.workloads.pytorch.TorchWorkload` and writes only its data, its model and its metrics;
calibration, PTQ, QAT, the ONNX QDQ export, ONNX Runtime / OpenVINO execution and paired timings
are sciquant's (the README's "Add your own surrogate" has a complete example).

This module is the interface and the registry, on the ground floor: it imports nothing of
sciquant but its errors, and a workload's own modules only when that workload is asked for, so
the config checks (`sciquant.vocabulary`, `sciquant.study`) can read the plug-ins' schemas
without importing torch or TensorFlow. Plug-in authors import it as `sciquant.workloads`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from sciquant.errors import SciquantError

__all__ = [
    "BUILT_IN",
    "ENTRY_POINTS",
    "Evaluation",
    "Workload",
    "architecture_workload",
    "get_workload",
    "plugin_workloads",
    "workload_names",
]

#: The entry point group through which an installed package adds a workload: each entry point
#: is named after the workload and names its `Workload` subclass (``module:Class``).
ENTRY_POINTS = "sciquant.workloads"

#: The workloads sciquant brings, by name: the class of each (imported only when used).
BUILT_IN: Mapping[str, str] = {
    "bloodflow": "sciquant.workloads.bloodflow:BloodFlow",
    "md": "sciquant.workloads.md:MolecularDynamics",
}


@dataclass(frozen=True)
class Evaluation:
    """What one run's evaluation runs, as data: the plan of `sciquant evaluate`.

    The rules and `sciquant submit` build it from the run's coordinates and the study
    (`sciquant.study.Study.evaluation`) and pass it whole (`sciquant evaluate --plan`); by hand,
    the command's flags build it.

    artifact: the model to judge (FP32 checkpoint, a calibrated run's quantized model, or a
    Keras run's model / quantization.json). onnx: the ONNX file a runtime runs instead (FP32 or
    the run's QDQ graph), and runtime: which one (`onnxruntime`, `tensorrt`, `openvino`; None
    without `onnx`: the framework runs the artifact itself, eager or fake-quant, or LiteRT as a
    Keras run's quantization.json says). simulated: the results are a fake-quant simulation of
    the target (untimed). baseline (+ baseline_onnx): the target's FP32 artifacts, timed
    interleaved with the run (a paired speed-up). device: the device of the run's node type.
    workload: the dataset's workload (None: the built-in one the artifact is for).
    """

    artifact: Path
    onnx: Path | None = None
    runtime: str | None = None
    simulated: bool = False
    baseline: Path | None = None
    baseline_onnx: Path | None = None
    device: str = "cpu"
    workload: str | None = None

    PATHS: ClassVar[tuple[str, ...]] = ("artifact", "onnx", "baseline", "baseline_onnx")

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON values (paths as text; keys that hold nothing left out)."""
        values = asdict(self)
        return {
            key: str(value) if key in self.PATHS else value
            for key, value in values.items()
            if value is not None
        }

    @classmethod
    def from_json(cls, values: Mapping[str, Any], where: str = "evaluate --plan") -> Evaluation:
        """The plan from `to_json`'s values; an unknown or missing key is named."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SciquantError(
                f"{where}: unknown key {', '.join(unknown)}; a plan has {', '.join(sorted(known))}"
            )
        if "artifact" not in values:
            raise SciquantError(f"{where}: no artifact (the model file to evaluate)")
        return cls(**{
            key: Path(value) if key in cls.PATHS and value is not None else value
            for key, value in values.items()
        })  # fmt: skip


class Workload:
    """One kind of dataset and the surrogates that learn it: the stages the workflow calls.

    A subclass sets `name` and `architectures` and implements the stages. Paths are folders
    unless said otherwise; `settings` are the config's sections with the schema's defaults
    filled. Every stage raises `SciquantError` with a message that names the file or the config
    key at fault and what to do.
    """

    #: The config's ``datasets.<name>.workload``.
    name: ClassVar[str] = ""
    #: Architecture name → framework (``torch`` or ``keras``): the models that learn it.
    architectures: ClassVar[Mapping[str, str]] = {}
    #: JSON Schema of ``datasets.<name>.source.embedded`` (the embedded simulator's settings);
    #: None: the workload has no embedded data (its datasets are downloaded, `source.files`).
    simulation_schema: ClassVar[dict[str, Any] | None] = None
    #: JSON Schema of ``datasets.<name>.prepare``.
    prepare_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}
    #: Per architecture, JSON Schema properties of a model's keys besides `architecture`,
    #: `datasets` and `train` (e.g. ``{"hidden": {"type": "integer", "default": 32}}``).
    model_properties: ClassVar[Mapping[str, dict[str, Any]]] = {}
    #: The quantization methods its `quantize` takes (the config check refuses the others).
    methods: ClassVar[tuple[str, ...]] = ()
    #: The runtimes its `evaluate` runs natively (None: every runtime of its targets).
    runtimes: ClassVar[tuple[str, ...] | None] = None

    def synthesize(self, out: Path, settings: dict[str, Any]) -> None:
        """Write the embedded simulator's raw files into `out` (settings: ``source.embedded``)."""
        raise SciquantError(f"workload {self.name} has no embedded data; give `source.files`")

    def prepare(self, raw: Path, out: Path, settings: dict[str, Any]) -> None:
        """Raw files → `out`/index.json and what training and evaluation read."""
        raise NotImplementedError

    def overview(self, raw: Path, prepared: Path | None, out: Path, *, count: int = 4) -> None:
        """A figure of the data at `out` (a .png file; `count`: samples to show where the
        figure shows some)."""
        raise NotImplementedError

    def train(
        self, prepared: Path, out: Path, settings: dict[str, Any], *, seed: int,
        threads: int | None, device: str | None,
    ) -> None:  # fmt: skip
        """FP32 training; writes the model's FP32 artifact into `out` (settings: the model's
        config minus `datasets`)."""
        raise NotImplementedError

    def quantize(
        self, artifact: Path, prepared: Path, out: Path, *, target: str, method: str,
        precision: str, settings: dict[str, Any], seed: int, threads: int | None,
        recommendation: Path | None,
    ) -> None:  # fmt: skip
        """One run's PTQ calibration or QAT; writes its quantized artifact into `out`
        (settings: ``{"quantize": ..., "model": ...}``)."""
        raise NotImplementedError

    def export(self, artifact: Path, prepared: Path | None, out: Path) -> None:
        """An FP32 or quantized artifact as ONNX at `out` (a .onnx file)."""
        raise SciquantError(f"workload {self.name} has no ONNX export")

    def evaluate(
        self, plan: Evaluation, prepared: Path, out: Path, *, settings: dict[str, Any],
        coordinates: dict[str, Any], threads: int | None,
    ) -> None:  # fmt: skip
        """Judge one run, as its `plan` says, on the test split; writes `out`/metrics.json
        (settings: the config's ``evaluate`` section)."""
        raise NotImplementedError


def _load(name: str, reference: str, where: str) -> Workload:
    module_name, _, attribute = reference.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as error:  # a broken plug-in: name it, and what it said
        raise SciquantError(
            f"workload {name!r} ({reference}, {where}) cannot be loaded: "
            f"{type(error).__name__}: {error}"
        ) from error
    workload = found() if isinstance(found, type) else found
    if not isinstance(workload, Workload):
        raise SciquantError(
            f"workload {name!r} ({reference}) is a {type(workload).__name__}, not a "
            "sciquant.workloads.Workload"
        )
    if workload.name != name:
        raise SciquantError(
            f"workload entry point {name!r} ({reference}) names a workload called "
            f"{workload.name!r}; the entry point's name must be the workload's"
        )
    return workload


@functools.lru_cache(maxsize=1)
def _plugin_references() -> dict[str, str]:
    from importlib.metadata import entry_points

    references: dict[str, str] = {}
    for point in entry_points(group=ENTRY_POINTS):
        if point.name in BUILT_IN:
            raise SciquantError(
                f"workload plug-in {point.value} is called {point.name!r}, a built-in "
                "workload's name; rename it"
            )
        references[point.name] = point.value
    return references


def workload_names() -> list[str]:
    """Every workload a config may name: the built-in ones, then the installed plug-ins."""
    return [*BUILT_IN, *sorted(_plugin_references())]


@functools.cache
def get_workload(name: str) -> Workload:
    """The workload called `name`; SciquantError listing the known ones otherwise."""
    if name in BUILT_IN:
        return _load(name, BUILT_IN[name], "built in")
    references = _plugin_references()
    if name not in references:
        raise SciquantError(
            f"unknown workload {name!r}; known: {', '.join(workload_names())} (a plug-in is "
            f"found once its package, declaring the entry point group {ENTRY_POINTS}, is "
            "installed)"
        )
    return _load(name, references[name], f"entry point group {ENTRY_POINTS}")


def plugin_workloads() -> list[Workload]:
    """The installed plug-ins' workloads (not the built-in ones), loaded."""
    return [get_workload(name) for name in sorted(_plugin_references())]


#: The built-in architectures and their workloads (no import needed to tell them).
BUILT_IN_ARCHITECTURES = {"meshgraphnet": "bloodflow", "icnnmd": "md"}


def architecture_workload(architecture: str) -> Workload:
    """The workload whose models have this architecture."""
    if architecture in BUILT_IN_ARCHITECTURES:
        return get_workload(BUILT_IN_ARCHITECTURES[architecture])
    for workload in plugin_workloads():
        if architecture in workload.architectures:
            return workload
    raise SciquantError(f"no workload has the architecture {architecture!r}")


def schema_fragments() -> dict[str, Any]:
    """The plug-ins' part of the config schema: ``{"workloads": {name: dataset schema},
    "architectures": {name: model schema}, "definitions": {name: schema}}`` (the settings
    sections their schemas refer to; `sciquant.vocabulary.schema_document` merges them all
    into the schema file's ``$defs``)."""
    datasets: dict[str, Any] = {}
    models: dict[str, Any] = {}
    definitions: dict[str, Any] = {}
    for workload in plugin_workloads():
        # named as the built-in ones' (`<workload>_simulation`, `<workload>_prepare`): the
        # stages fill a section's defaults from its definition, whichever workload it is
        definitions[f"{workload.name}_prepare"] = {**workload.prepare_schema}
        if workload.simulation_schema is not None:
            definitions[f"{workload.name}_simulation"] = {**workload.simulation_schema}
        source: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "description": "Exactly one of `embedded` or `files`.",
            "properties": {"files": {"$ref": "#/$defs/source/properties/files"}},
        }
        if workload.simulation_schema is not None:
            source["properties"]["embedded"] = {"$ref": f"#/$defs/{workload.name}_simulation"}
        datasets[workload.name] = {
            "type": "object",
            "additionalProperties": False,
            "description": f"A dataset of the plug-in workload `{workload.name}`.",
            "properties": {
                "workload": {"const": workload.name},
                "source": {
                    **source,
                    "default": {"embedded": {}} if workload.simulation_schema else {},
                },
                "prepare": {"$ref": f"#/$defs/{workload.name}_prepare", "default": {}},
            },
        }
        for architecture in workload.architectures:
            if architecture in BUILT_IN_ARCHITECTURES:
                raise SciquantError(
                    f"workload {workload.name}: its architecture {architecture!r} is a "
                    "built-in one's name; rename it"
                )
            properties = dict(workload.model_properties.get(architecture, {}))
            clash = sorted(set(properties) & {"architecture", "datasets", "train"})
            if clash:
                raise SciquantError(
                    f"workload {workload.name}: model_properties of {architecture} give "
                    f"{', '.join(clash)}, which sciquant defines"
                )
            models[architecture] = {
                "type": "object",
                "additionalProperties": False,
                "description": f"A model of the plug-in workload `{workload.name}`.",
                "properties": {
                    "architecture": {"const": architecture},
                    "datasets": {"$ref": "#/$defs/meshgraphnet_model/properties/datasets"},
                    "train": {"$ref": "#/$defs/plugin_train", "default": {}},
                    **properties,
                },
            }
    return {"workloads": datasets, "architectures": models, "definitions": definitions}
