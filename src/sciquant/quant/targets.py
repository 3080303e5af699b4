"""The hardware targets: one table, one row per target (like MQBench's platform table).

A `Target` says where a quantized model runs (backend, node), which model frameworks reach it,
how it quantizes weights and activations (a `Scheme` each: a `QuantSpec` without its bit-width),
and which precisions it runs natively. Adding a target is adding a row to `TARGETS`.

`Target.plan(precision, framework)` decides how a run executes; there are three outcomes:

- native: the precision is one the target runs (`precision in native_precisions`); the runtime
  is the target's backend (for `reference`, the model's own framework).
- simulated: an integer precision the target does not run natively (any sub-8-bit precision,
  w8a8 on `reference` and `npu-pow2`): fake-quantization in the model's framework under the
  target's scheme, labelled `simulated` in the results.
- impossible (SciquantError): the target does not accept the model's framework (`litert-cpu` is
  for Keras models only), or a float precision the target does not run natively (fp16 on
  `cpu-x86`, `npu-pow2`, `reference`; fp32 on `npu-pow2`). A float format has no simulation path
  under an integer scheme, and fp32 of an integer-only accelerator is just the `reference`
  baseline, which already is its own run.

Weights are quantized per output channel where the scheme says `per_channel`; the channel axis
depends on the framework's layout, so `weight_spec` takes it (0 for torch Linear/Conv weights,
-1 for Keras Dense/Conv kernels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from sciquant.errors import SciquantError
from sciquant.quant.spec import PerChannel, PerTensor, Precision, QuantSpec, parse_precision

__all__ = [
    "FRAMEWORKS",
    "INTEGER_BIAS_BACKENDS",
    "TARGETS",
    "Plan",
    "Scheme",
    "Target",
    "get_target",
]

Backend = Literal["eager", "tensorrt", "onnxruntime", "openvino", "litert", "simulated"]
Node = Literal["cpu", "v100", "rtx3090"]
Framework = Literal["torch", "keras"]
FRAMEWORKS: tuple[Framework, ...] = ("torch", "keras")
_BACKENDS = ("eager", "tensorrt", "onnxruntime", "openvino", "litert", "simulated")
_NODES = ("cpu", "v100", "rtx3090")


@dataclass(frozen=True)
class Scheme:
    """A `QuantSpec` template without bits: what a target does to every weight or activation."""

    symmetric: bool
    per_channel: bool = False
    scale_kind: Literal["float", "pow2"] = "float"
    narrow_range: bool = False
    signed: bool | None = None
    # The most bits of integer range the scheme uses, whatever the precision asks for (7: an
    # 8-bit weight in [-63, 63], so that u8 × s8 pair sums fit int16 on CPUs without VNNI).
    max_bits: int | None = None

    def spec(self, bits: int, channel_axis: int = 0) -> QuantSpec:
        """The QuantSpec for `bits` (at most `max_bits`); `channel_axis` is used only by
        per-channel schemes."""
        granularity = PerChannel(channel_axis) if self.per_channel else PerTensor()
        return QuantSpec(
            bits=min(bits, self.max_bits) if self.max_bits else bits,
            symmetric=self.symmetric,
            granularity=granularity,
            scale_kind=self.scale_kind,
            narrow_range=self.narrow_range,
            signed=self.signed,
        )


@dataclass(frozen=True)
class Plan:
    """How one (target, precision, framework) runs.

    runtime: "torch" or "keras" (eager, fake-quant when simulated), "tensorrt", "onnxruntime",
    "openvino", "litert". simulated: True when the results are a fake-quant simulation of the
    target.
    """

    target: Target
    precision: Precision
    framework: Framework
    simulated: bool
    runtime: str

    @property
    def label(self) -> str:
        """`native` or `simulated`, as the results label the run."""
        return "simulated" if self.simulated else "native"


@dataclass(frozen=True)
class Target:
    """One row of the hardware table.

    backend: "eager" (the model's own framework), "tensorrt", "onnxruntime", "openvino",
    "litert", or
    "simulated" (no runtime here; everything runs as fake-quant). node: "cpu", "v100",
    "rtx3090", or None for the run's own node. native_precisions: precision strings such as
    "fp32", "fp16", "w8a8".
    """

    name: str
    backend: Backend
    node: Node | None
    frameworks: frozenset[Framework]
    weight_scheme: Scheme
    activation_scheme: Scheme
    native_precisions: frozenset[str]
    description: str

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"target {self.name!r}: unknown backend {self.backend!r}")
        if self.node is not None and self.node not in _NODES:
            raise ValueError(f"target {self.name!r}: unknown node {self.node!r}")
        if not self.frameworks or not self.frameworks <= set(FRAMEWORKS):
            raise ValueError(f"target {self.name!r}: frameworks must be a subset of {FRAMEWORKS}")
        for precision in self.native_precisions:
            parse_precision(precision)

    def weight_spec(self, bits: int, channel_axis: int = 0) -> QuantSpec:
        """How this target quantizes weights to `bits`; `channel_axis` = output-channel axis."""
        return self.weight_scheme.spec(bits, channel_axis)

    def activation_spec(self, bits: int) -> QuantSpec:
        """How this target quantizes activations to `bits` (per tensor on every target)."""
        return self.activation_scheme.spec(bits)

    def plan(self, precision: str, framework: str) -> Plan:
        """Native, simulated, or SciquantError naming target, precision and why not."""
        parsed = parse_precision(precision)
        if framework not in FRAMEWORKS:
            raise SciquantError(
                f"framework {framework!r} is unknown; known frameworks are {', '.join(FRAMEWORKS)}"
            )
        if framework not in self.frameworks:
            accepted = " and ".join(sorted(self.frameworks))
            raise SciquantError(
                f"target {self.name!r} cannot run precision {parsed} of a {framework} model: "
                f"it takes {accepted} models only"
            )
        if str(parsed) in self.native_precisions:
            runtime = framework if self.backend in ("eager", "simulated") else self.backend
            return Plan(self, parsed, framework, simulated=False, runtime=runtime)
        if parsed.kind == "float":
            native = ", ".join(sorted(self.native_precisions)) or "none"
            hint = "; the FP32 baseline is target 'reference'" if str(parsed) == "fp32" else ""
            raise SciquantError(
                f"target {self.name!r} cannot run precision {parsed}: it is not native there "
                f"(native: {native}) and a float format has no simulation under an integer "
                f"scheme{hint}"
            )
        return Plan(self, parsed, framework, simulated=True, runtime=framework)


#: Backends whose integer GEMM takes the bias as int32 with scale s_x·s_w (ONNX Runtime's QGemm,
#: OpenVINO): the simulation rounds the bias likewise (`QuantLinear.integer_bias`) and the QDQ
#: export folds it into the GEMM. TensorRT adds a float bias (no int32 DequantizeLinear there).
INTEGER_BIAS_BACKENDS = ("onnxruntime", "openvino")

_TENSORRT_WEIGHTS = Scheme(symmetric=True, per_channel=True, narrow_range=True)
_TENSORRT_ACTIVATIONS = Scheme(symmetric=True)
_TENSORRT_SCHEME = (
    "explicit-QDQ ONNX: symmetric int8, weights per output channel in [-127, 127], activations "
    "per tensor, float scales; FP16 and INT8 native"
)

_OPENVINO_CPU = Target(
    name="openvino-cpu",
    backend="openvino",
    node="cpu",
    frameworks=frozenset({"torch"}),
    weight_scheme=Scheme(symmetric=True, per_channel=True, narrow_range=True),
    activation_scheme=Scheme(symmetric=False),
    native_precisions=frozenset({"fp32", "bf16", "w8a8"}),
    description=(
        "OpenVINO's CPU plugin, compiled for the rollout's graph size: FP32; BF16 (the FP32 "
        "graph under the bf16 inference hint, on AMX / AVX-512-BF16; a host without them "
        "evaluates it as a simulation); INT8 from our own QDQ graph and scales (int8 weights "
        "per channel in [-127, 127], uint8 activations per tensor, asymmetric)"
    ),
)

_ROWS = (
    Target(
        name="reference",
        backend="eager",
        node=None,
        frameworks=frozenset(FRAMEWORKS),
        weight_scheme=Scheme(symmetric=True, per_channel=True),
        activation_scheme=Scheme(symmetric=False),
        native_precisions=frozenset({"fp32"}),
        description=(
            "the model's framework (PyTorch / Keras eager) on the run's node: the FP32 baseline, "
            "and fake-quant under an academic scheme (any bits; symmetric per-channel weights, "
            "asymmetric per-tensor activations, float scales)"
        ),
    ),
    Target(
        name="trt-v100",
        backend="tensorrt",
        node="v100",
        frameworks=frozenset(FRAMEWORKS),
        weight_scheme=_TENSORRT_WEIGHTS,
        activation_scheme=_TENSORRT_ACTIVATIONS,
        native_precisions=frozenset({"fp32", "fp16", "w8a8"}),
        description=(
            f"TensorRT on V100 (sm70) from {_TENSORRT_SCHEME}; Volta needs TensorRT <= 10.4 "
            "(10.5+ dropped it)"
        ),
    ),
    Target(
        name="trt-rtx3090",
        backend="tensorrt",
        node="rtx3090",
        frameworks=frozenset(FRAMEWORKS),
        weight_scheme=_TENSORRT_WEIGHTS,
        activation_scheme=_TENSORRT_ACTIVATIONS,
        native_precisions=frozenset({"fp32", "fp16", "w8a8"}),
        description=f"TensorRT on RTX 3090 (sm86, INT8 tensor cores) from {_TENSORRT_SCHEME}",
    ),
    Target(
        name="cpu-x86",
        backend="onnxruntime",
        node="cpu",
        frameworks=frozenset(FRAMEWORKS),
        weight_scheme=Scheme(symmetric=True, per_channel=True, narrow_range=True),
        activation_scheme=Scheme(symmetric=False),
        native_precisions=frozenset({"fp32", "w8a8"}),
        description=(
            "ONNX Runtime static QDQ U8S8 on x86 (VNNI/AMX): int8 weights per channel, symmetric "
            "in [-127, 127]; uint8 activations per tensor, asymmetric; INT8 native"
        ),
    ),
    _OPENVINO_CPU,
    replace(
        _OPENVINO_CPU,
        name="openvino-avx2",
        weight_scheme=replace(_OPENVINO_CPU.weight_scheme, max_bits=7),
        description=(
            "openvino-cpu for x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI): INT8 "
            "weights in a 7-bit range [-63, 63] (stored as int8), so that the u8 × s8 pair "
            "sums of the int8 GEMM fit int16 (vpmaddubsw saturates them; with full-range "
            "weights such a CPU computes something else than the simulation); half the weight "
            "resolution of openvino-cpu on every CPU, agreeing with its simulation to rounding "
            "on all of them"
        ),
    ),
    Target(
        name="litert-cpu",
        backend="litert",
        node="cpu",
        frameworks=frozenset({"keras"}),
        weight_scheme=Scheme(symmetric=True, per_channel=True, narrow_range=True),
        activation_scheme=Scheme(symmetric=False, signed=True),
        native_precisions=frozenset({"fp32", "fp16", "w8a8"}),
        description=(
            "LiteRT (TFLite) full-integer int8 for Keras models: weights per channel, symmetric "
            "in [-127, 127]; int8 activations per tensor, asymmetric; FP16 and INT8 native"
        ),
    ),
    Target(
        name="npu-pow2",
        backend="simulated",
        node="cpu",
        frameworks=frozenset(FRAMEWORKS),
        weight_scheme=Scheme(symmetric=True, scale_kind="pow2"),
        activation_scheme=Scheme(symmetric=True, scale_kind="pow2"),
        native_precisions=frozenset(),
        description=(
            "Vitis/Quark-style DPU: symmetric int8, per tensor, power-of-two scales for weights "
            "and activations; no DPU here, so every precision runs as simulation"
        ),
    ),
)

#: The entry point group through which an installed package adds rows: each entry point names a
#: `Target` or an iterable of them (e.g. ``[project.entry-points."sciquant.targets"]`` ``mynpu =
#: "mypackage.targets:ROWS"``).
TARGET_ENTRY_POINTS = "sciquant.targets"


def _plugin_rows() -> list[Target]:
    """The rows that installed packages add through `TARGET_ENTRY_POINTS`."""
    from importlib.metadata import entry_points

    rows: list[Target] = []
    for point in entry_points(group=TARGET_ENTRY_POINTS):
        try:
            loaded = point.load()
        except Exception as error:  # a broken plug-in: name it, and what it said
            raise SciquantError(
                f"target plug-in {point.name!r} ({point.value}, entry point group "
                f"{TARGET_ENTRY_POINTS}) cannot be loaded: {type(error).__name__}: {error}"
            ) from error
        if isinstance(loaded, Target) or not isinstance(loaded, Iterable):
            items = [loaded]
        else:
            items = list(loaded)
        for item in items:
            if not isinstance(item, Target):
                raise SciquantError(
                    f"target plug-in {point.name!r} ({point.value}) gives {type(item).__name__}, "
                    "not sciquant.quant.targets.Target rows"
                )
        rows.extend(items)
    return rows


def _table(rows: list[Target]) -> Mapping[str, Target]:
    table: dict[str, Target] = {}
    for row in rows:
        if row.name in table:
            raise SciquantError(f"two target rows are called {row.name!r}; rename one")
        table[row.name] = row
    return MappingProxyType(table)


#: Every hardware target by name, in display order: the rows above, then those of installed
#: plug-ins. Adding a target is adding a row: the config's checks, the workflow's wildcards and
#: the result cube's order all read this table.
TARGETS: Mapping[str, Target] = _table([*_ROWS, *_plugin_rows()])


def fp32_target(name: str) -> str:
    """The target whose FP32 run stands for `name`'s: the first row with the same backend, node
    and frameworks. Targets that differ only in how they quantize run one FP32 graph, so a study
    runs it once (openvino-avx2's FP32 run is openvino-cpu's); every other target is its own."""
    target = get_target(name)
    if "fp32" not in target.native_precisions or name == "reference":
        return name
    # never the reference: its FP32 run is the study's FP32 network, with a rule of its own
    return next(
        row.name
        for row in TARGETS.values()
        if "fp32" in row.native_precisions
        and row.name != "reference"
        and (row.backend, row.node, row.frameworks)
        == (target.backend, target.node, target.frameworks)
    )


def get_target(name: str) -> Target:
    """The target called `name`; SciquantError listing the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise SciquantError(
            f"unknown target {name!r}; known targets are {', '.join(sorted(TARGETS))}"
        ) from None
