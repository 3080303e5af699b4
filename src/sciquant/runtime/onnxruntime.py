"""ONNX Runtime (CPU execution provider) as a rollout step function, with timings and kernels.

    step = OrtStep("model.onnx", intra_op_num_threads=2)
    delta = step(node_features, edge_features, edge_index)  # torch in, torch out
    step.timings[-1]                         # {"h2d": 0.0, "compute": ms, "d2h": 0.0}
    kernel_summary("model.onnx")             # {"QGemm": 21, "Gather": 4, ...}

Sessions use every graph optimization (``ORT_ENABLE_ALL``): for a QDQ model that is what turns
DequantizeLinear → Gemm ← DequantizeLinear groups into integer kernels (``QGemm``,
``MatMulIntegerToFloat``, ``QLinearMatMul``). `kernel_summary` counts the op types of the graph
after those rewrites, which shows whether integer kernels actually run.

On x86 CPUs without VNNI (AVX2 only), MLAS computes U8S8 products with ``vpmaddubsw``, which
saturates the int16 sum of two neighbouring products (255 · 127 · 2 > 32767): uint8 activations
with full-range int8 weights give wrong results there, silently. `cpu_has_vnni` tells which
case a host is; `sciquant.quant.export` then stores weights as uint8 (U8U8, exact everywhere).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from sciquant.errors import SciquantError
from sciquant.runtime.latency import timing_summary

__all__ = [
    "INTEGER_OPS",
    "OrtStep",
    "cpu_has_vnni",
    "has_reducing_scatter",
    "integer_kernels",
    "kernel_summary",
]

#: Op types of ONNX Runtime's integer kernels (default and com.microsoft domains).
INTEGER_OPS = frozenset(
    {
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "ConvInteger",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
    }
)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True if the CPU has an int8 dot-product extension (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Reads the Linux ``flags`` line; False where that file cannot be read (the safe answer).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _VNNI_FLAGS)


def _session_options(intra_op_num_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the optimized-model-file warning is expected, not news
    return options


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise SciquantError(f"ONNX model {path} does not exist; export it first")


class OrtStep:
    """An ONNX model as a StepFunction: ``(node_features [N, F], edge_features [E, 9],
    edge_index [2, E]) -> delta [N, 2]``, torch tensors in and out, on the CPU EP.

    intra_op_num_threads: threads of one op (0: ONNX Runtime's default, all cores); forced to 1
    for graphs with a reducing scatter (the aggregation of message passing), whose multi-threaded
    CPU kernel races and gives wrong sums (`has_reducing_scatter`). Every call
    appends ``{"h2d": 0.0, "compute": ms, "d2h": 0.0}`` to ``timings`` (milliseconds; the CPU EP
    reads the inputs in place and returns host memory, so there is no transfer).
    """

    def __init__(self, path: str | Path, intra_op_num_threads: int = 1) -> None:
        self.path = Path(path)
        _check_file(self.path)
        if intra_op_num_threads != 1 and has_reducing_scatter(self.path):
            # ONNX Runtime's ScatterND with reduction="add" races between threads (its issues
            # 18048 and 23396): results change from run to run. One thread is exact.
            intra_op_num_threads = 1
        self.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(
            str(self.path),
            _session_options(intra_op_num_threads),
            providers=["CPUExecutionProvider"],
        )
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.timings: list[dict[str, float]] = []

    def __call__(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"{self.path.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        feeds = {
            name: _to_numpy(value) for name, value in zip(self.input_names, inputs, strict=True)
        }
        start = time.perf_counter()
        (output,) = self.session.run([self.output_name], feeds)
        compute_ms = (time.perf_counter() - start) * 1e3
        self.timings.append({"h2d": 0.0, "compute": compute_ms, "d2h": 0.0})
        return torch.from_numpy(output)

    def timing_summary(self) -> dict[str, float]:
        """Median and interquartile range (ms) of each timing over the recorded calls."""
        return timing_summary(self.timings)


def has_reducing_scatter(path: str | Path) -> bool:
    """Whether the ONNX graph has a ScatterND/ScatterElements with a reduction (add, mul, ...),
    which ONNX Runtime's CPU kernels compute correctly only on one thread."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.node:
        if node.op_type in ("ScatterND", "ScatterElements"):
            for attribute in node.attribute:
                if attribute.name == "reduction" and attribute.s not in (b"", b"none"):
                    return True
    return False


def _to_numpy(value: Tensor) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.int64:
        array = array.astype(np.int64)
    return np.ascontiguousarray(array)


def kernel_summary(path: str | Path, intra_op_num_threads: int = 1) -> dict[str, int]:
    """Op type → count in the graph ONNX Runtime runs after its optimizations (CPU EP).

    The session writes its optimized model (``optimized_model_filepath``) to a temporary file,
    which is read back and counted; ops of subgraphs are not counted (the models here have none).
    """
    path = Path(path)
    _check_file(path)
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = _session_options(intra_op_num_threads)
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
        counts = Counter(node.op_type for node in graph.node)
    return dict(sorted(counts.items()))


def integer_kernels(summary: dict[str, int]) -> dict[str, int]:
    """The integer-kernel entries (`INTEGER_OPS`) of a `kernel_summary`."""
    return {op: count for op, count in summary.items() if op in INTEGER_OPS}
