"""OpenVINO (CPU plugin) as a rollout step function: FP32, BF16 and INT8 from our own graphs.

    step = OvStep("model.onnx", precision="bf16", threads=1)
    delta = step(node_features, edge_features, edge_index)   # torch in, torch out
    step.timings[-1]                                         # {"h2d": 0.0, "compute": ms, ...}

The same ONNX files as ONNX Runtime runs: the FP32 export (`fp32`, and `bf16`, which is that
graph compiled with OpenVINO's inference precision hint `bf16`: weights and activations in
bfloat16, accumulation in FP32, on AMX or AVX-512-BF16 units), and the QDQ export of a
calibrated fake-quant model for `w8a8` (OpenVINO turns each QuantizeLinear/DequantizeLinear pair
into a FakeQuantize and its low-precision transformations run the GEMMs in int8 with our
scales; nothing is recalibrated). Dynamic node and edge counts: one compiled model serves every
graph size.

`bf16` is native only where the CPU has `amx_bf16` or `avx512_bf16` (`bf16_native`); elsewhere
OpenVINO would quietly run FP32 under the hint, so `OvStep` refuses it and the study evaluates
bf16 as a simulation instead (`sciquant.quant.targets`).

INT8 on x86 without VNNI (AVX2, or AVX-512 without VNNI): the CPU plugin multiplies uint8
activations by int8 weights with ``vpmaddubsw``, which saturates the int16 sum of two
neighbouring products (255 · 127 · 2 > 32767), so full-range weights give other outputs than the
QDQ graph defines (measured on an AMD EPYC: up to 6.6 output steps off on a small MeshGraphNet;
on the oscillator example a 22 % rollout error where ONNX Runtime's exact kernel gives 9 %).
Storing the weights as uint8 does not help: OpenVINO then decompresses them and computes in
FP32. `overflow_risk` says when a QDQ graph is exposed (its weights beyond [-63, 63] on such a
CPU); target `openvino-avx2` quantizes weights to that 7-bit range, which such a CPU computes as
the simulation does, to rounding.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sciquant.errors import SciquantError
from sciquant.runtime.latency import timing_summary

__all__ = [
    "OVERFLOW_SAFE_WEIGHT",
    "PRECISIONS",
    "OvStep",
    "available",
    "bf16_native",
    "overflow_risk",
]

#: What OvStep compiles: the precision label → OpenVINO's inference precision hint.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "w8a8": "f32"}
#: Precisions of the float graph, compiled without the CPU plugin's snippets (its generated
#: kernels of fused element-wise subgraphs): measured on the trained MeshGraphNet (1 thread,
#: Xeon with AMX), identical outputs and 7 % (502 nodes) / 4 % (20,000 nodes) less time per
#: step in BF16 and FP32 without them. The QDQ graph keeps them: its FakeQuantize fusions
#: run through snippets (without them: 40 % more time, other roundings).
FLOAT_PRECISIONS = ("fp32", "bf16")


def available() -> tuple[bool, str]:
    """Whether OpenVINO's CPU plugin loads here, and a sentence saying why not / which one."""
    try:
        import openvino as ov
    except ImportError as error:  # pragma: no cover - openvino is a dependency
        return False, f"openvino is not installed ({error})"
    try:
        devices = ov.Core().available_devices
    except Exception as error:  # noqa: BLE001 - any plugin failure means: not here
        return False, f"OpenVINO's CPU plugin does not load: {error}"
    if "CPU" not in devices:
        return False, f"OpenVINO sees no CPU device (devices: {devices})"
    return True, f"OpenVINO {ov.__version__}"


def bf16_native(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX-512-BF16)."""
    from sciquant.runtime.paired import cpu_features

    features = cpu_features(cpuinfo)
    return bool(features["amx_bf16"] or features["avx512_bf16"])


#: The largest |integer weight| whose u8 × s8 pair sums fit int16: 255 · 63 · 2 ≤ 32767.
OVERFLOW_SAFE_WEIGHT = 63


def overflow_risk(path: str | Path, vnni: bool | None = None) -> str | None:
    """Why OpenVINO INT8 of the QDQ graph at `path` may compute other outputs than the graph
    defines on this CPU (see the module), or None: a CPU without an int8 dot-product unit
    (`vnni`: None reads /proc/cpuinfo) and stored int8 GEMM weights beyond
    ±`OVERFLOW_SAFE_WEIGHT`."""
    import onnx
    from onnx import numpy_helper

    from sciquant.runtime.onnxruntime import cpu_has_vnni

    if cpu_has_vnni() if vnni is None else vnni:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name: init for init in graph.initializer}
    largest = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        values = numpy_helper.to_array(initializers[node.input[0]])
        # int8 weights of a GEMM only: uint8 ones OpenVINO decompresses and multiplies in FP32,
        # and a bias or scalar is no GEMM operand. The kernel multiplies the stored integers.
        if values.dtype != np.int8 or values.ndim < 2:
            continue
        largest = max(largest, int(np.abs(values.astype(np.int64)).max(initial=0)))
    if largest <= OVERFLOW_SAFE_WEIGHT:
        return None
    return (
        f"{Path(path).name}: integer weights up to ±{largest} on a CPU without VNNI, where "
        "OpenVINO's int8 GEMM saturates u8 × s8 pair sums in int16: its outputs can differ "
        "from the simulation (see sim_vs_deployed_*); quantize for target openvino-avx2 "
        f"(weights in ±{OVERFLOW_SAFE_WEIGHT}) or evaluate on a CPU with VNNI / AMX"
    )


class OvStep:
    """An ONNX model compiled by OpenVINO for the CPU as a StepFunction (see the module).

    precision: `fp32`, `bf16` (the FP32 graph under the bf16 hint; native hosts only) or
    `w8a8` (a QDQ graph). threads: OpenVINO's inference threads (one stream, latency hint).
    Every call appends ``{"h2d": 0.0, "compute": ms, "d2h": 0.0}`` to ``timings``.
    """

    def __init__(
        self,
        path: str | Path,
        precision: str = "fp32",
        threads: int = 1,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        import openvino as ov

        self.path = Path(path)
        if not self.path.is_file():
            raise SciquantError(f"{self.path}: ONNX file not found; run the export stage first")
        if precision not in PRECISIONS:
            raise SciquantError(
                f"OpenVINO runs {', '.join(PRECISIONS)}, not {precision!r}; "
                "evaluate other precisions as a simulation"
            )
        if precision == "bf16" and not bf16_native():
            raise SciquantError(
                "bf16 is not native on this CPU (no amx_bf16 or avx512_bf16 flag): OpenVINO "
                "would run FP32 under the bf16 hint; evaluate bf16 as a simulation here"
            )
        self.precision = precision
        # Why this INT8 graph may not compute what it defines on this CPU, or None
        self.overflow_risk = overflow_risk(self.path) if precision == "w8a8" else None
        if self.overflow_risk:
            import sys

            print(f"warning: OpenVINO INT8: {self.overflow_risk}", file=sys.stderr)
        core = ov.Core()
        model = core.read_model(str(self.path))
        if shapes:
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": max(int(threads), 1),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if precision in FLOAT_PRECISIONS:
            config["SNIPPETS_MODE"] = "DISABLE"
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self._types = [port.get_element_type().to_dtype() for port in self.compiled.inputs]
        self._tensor = ov.Tensor
        # input index -> (source tensor, a copy of its values, the bound array): the graph's
        # inputs bound once per rollout (see __call__)
        self._bound: dict[int, tuple[Any, Any, np.ndarray]] = {}
        self.timings: list[dict[str, float]] = []

    @property
    def execution_precision(self) -> str:
        """The precision OpenVINO chose to execute in (`f32`, `bf16`), as it reports it."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def kernels(self) -> dict[str, int]:
        """`layer type/runtime precision` → count in the compiled model (e.g.
        `FullyConnected/u8`): which precision each layer really runs in."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            key = f"{info['layerType'].astype(str)}/{info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def __call__(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"{self.path.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        # Every input is shared (OpenVINO reads it in place: measured 0.3 ms less per call at
        # 1.1 k nodes than copying it in). The graph's own inputs (every torch tensor but the
        # node features: edge features, edge index) are bound once and kept while the same
        # tensor comes back with the same values, as at every step of a rollout: 0.15 ms less
        # per call at 502 nodes (BF16: 1.73 -> 1.58 ms; measured beside ONNX Runtime FP32).
        # Values, not version counters, are compared: a rollout's tensors are often inference
        # tensors, which have none.
        for index, (value, dtype) in enumerate(zip(inputs, self._types, strict=True)):
            static = isinstance(value, Tensor) and self.input_names[index] != "node_features"
            if static:
                bound = self._bound.get(index)
                if bound is not None and bound[0] is value and torch.equal(bound[1], value):
                    continue
            array = np.ascontiguousarray(
                (value.detach().cpu().numpy() if isinstance(value, Tensor) else value).astype(
                    dtype, copy=False
                )
            )
            self.request.set_input_tensor(index, self._tensor(array, shared_memory=True))
            # the array must outlive the binding; a static one's source too (ids stay unique)
            snapshot = value.detach().clone() if static else None
            self._bound[index] = (value if static else None, snapshot, array)
        start = time.perf_counter()
        self.request.infer()
        # the output lives in OpenVINO's buffer, which the next call reuses: copied below
        output = self.request.get_output_tensor(0).data
        compute_ms = (time.perf_counter() - start) * 1e3
        self.timings.append({"h2d": 0.0, "compute": compute_ms, "d2h": 0.0})
        return torch.from_numpy(np.array(output, dtype=np.float32, copy=True))

    def timing_summary(self) -> dict[str, float]:
        """Median and interquartile range (ms) of each timing over the recorded calls."""
        return timing_summary(self.timings)
