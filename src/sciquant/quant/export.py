"""ONNX export of fake-quantized models as QDQ graphs that carry the calibrated qparams.

`export_qdq_onnx` writes, for every quantized Linear (bias b, W [out, in]):

    x ─ QuantizeLinear(s_x, z_x) ─ DequantizeLinear(s_x, z_x) ─┐
    W_q (8-bit initializer) ─ DequantizeLinear(s_w, z_w, axis=0) ─ Gemm(transB=1) ─ y
    b_q (int32, step s_x·s_w) ─ DequantizeLinear ──────────────────┘          (CPU targets)

with the scales and zero points of the torch simulation (nothing is re-calibrated) and the
weight integers that simulation uses, so ONNX Runtime's CPU EP fuses each group into an integer
``QGemm`` and OpenVINO into an int8 FullyConnected. On ONNX Runtime and OpenVINO targets the
bias is the GEMM's int32 input (`sciquant.quant.targets.INTEGER_BIAS_BACKENDS`; the simulation
rounds it to the same grid, `QuantLinear.integer_bias`): no float Add after each GEMM, and ONNX
Runtime then also fuses the next QuantizeLinear into the QGemm (39 → 13 QuantizeLinear nodes in
the default MeshGraphNet). TensorRT takes no int32 DequantizeLinear: a float ``Add(b)`` there
(a MatMul + Add form would first be fused into a float Gemm by ONNX Runtime, hence Gemm + Add).

Message passing: on ONNX Runtime targets (`SPLIT_BACKENDS`) the processor MLPs' first layers
keep the concat trick (`sciquant.models.meshgraphnet.SplitLinear`): the node state is quantized
once, before the gathers, with the concatenated input's per-tensor qparams (quantization
commutes with the concatenation and the gather), and each column block of W is its own
initializer and GEMM; no [E, 3H] Concat and no E-row QuantizeLinear of it.
Activations: uint8 asymmetric (cpu-x86), int8 symmetric (TensorRT, npu-pow2); only 8-bit
activations have a QDQ form (QuantizeLinear saturates to the full 8-bit range). Weights of 2 to
8 bits are stored in 8 bits with their own integer range, so that a w4a8 model also exports.

Weight storage (``weight_dtype``): ``int8`` with zero point 0 is the standard format (TensorRT,
ORT U8S8). On x86 without VNNI, ORT's U8S8 GEMM saturates (`sciquant.runtime.onnxruntime`), so
for the onnxruntime target the default there is ``uint8``: the same integers + 128 with zero
point 128, i.e. the same dequantized weights, run by the exact U8U8 kernel.

Why custom ops: in torch 2.13 neither exporter gives a correct QDQ graph of a MeshGraphNet.
``dynamo=True`` (torch.export) traces ``torch.fake_quantize_*`` into ``*_cachemask`` ops that have
no fake-tensor kernel, so export with dynamic node and edge counts fails
(UnsupportedOperatorException); it also rejects the narrow int8 range [-127, 127] of the weights.
``dynamo=False`` (TorchScript) writes clean Q/DQ pairs but lowers ``index_add_`` to
ScatterElements without ``reduction="add"`` (wrong aggregation, see
``sciquant.models.meshgraphnet.export_onnx``). So each QuantLinear is swapped for an export module
whose forward calls ``sciquant::quantize_linear`` / ``sciquant::dequantize_linear``: custom ops with
ONNX semantics in eager mode, fake kernels for tracing, and a ``custom_translation_table`` that maps
them one-to-one onto QuantizeLinear / DequantizeLinear; the integer weights are buffers, hence
8-bit initializers, with no post-processing of the graph.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset18 as onnx_op
from torch import Tensor, nn

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, SplitLinear, export_onnx
from sciquant.quant.observers import METHOD_LIMITS
from sciquant.quant.pytorch import QuantizedModel, QuantLinear
from sciquant.quant.spec import QuantSpec
from sciquant.quant.targets import INTEGER_BIAS_BACKENDS
from sciquant.runtime.onnxruntime import cpu_has_vnni

__all__ = ["export_fp32_onnx", "export_qdq_onnx", "weight_initializers"]

OPSET = 18
INPUT_NAMES = ("node_features", "edge_features", "edge_index")
OUTPUT_NAME = "delta"
WeightDtype = Literal["int8", "uint8"]
_STORAGE = {"int8": torch.int8, "uint8": torch.uint8}
#: Backends whose QDQ graph keeps the concat trick. Measured with `sciquant bench rollout`'s
#: setup on a Xeon with AMX (1 thread, 1.1 k and 20 k nodes, ratio to FP32 ONNX Runtime): ONNX
#: Runtime INT8 0.86x → 0.98x and 0.77x → 0.98x with it (bias folded: 1.08x, 0.99x); OpenVINO
#: INT8 1.43x → 1.31x and 1.89x → 1.68x (its own fusions prefer one GEMM on the concatenation),
#: so OpenVINO gets the textbook graph. TensorRT keeps its measured textbook graph too.
SPLIT_BACKENDS = ("onnxruntime",)


# -- QuantizeLinear / DequantizeLinear as torch custom ops -------------------------------------


def _broadcast(qparam: Tensor, ndim: int, axis: int) -> Tensor:
    """A per-tensor ([]) or per-axis ([C]) qparam shaped to broadcast along `axis`."""
    if qparam.dim() == 0:
        return qparam
    shape = [1] * ndim
    shape[axis] = -1
    return qparam.reshape(shape)


@torch.library.custom_op("sciquant::quantize_linear", mutates_args=())
def quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), zero_point dtype.

    x: float, any shape; scale, zero_point: [] or [C] along `axis` (uint8 or int8 zero_point).
    """
    limits = torch.iinfo(zero_point.dtype)
    scale = _broadcast(scale, x.dim(), axis)
    zero_point = _broadcast(zero_point, x.dim(), axis)
    x_q = torch.round(x / scale) + zero_point.to(x.dtype)
    return x_q.clamp(limits.min, limits.max).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("sciquant::dequantize_linear", mutates_args=())
def dequantize_linear(x_q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """ONNX DequantizeLinear: (x_q - zero_point) * scale, in scale's dtype."""
    scale = _broadcast(scale, x_q.dim(), axis)
    zero_point = _broadcast(zero_point, x_q.dim(), axis)
    return (x_q.to(torch.int32) - zero_point.to(torch.int32)).to(scale.dtype) * scale


@dequantize_linear.register_fake
def _(x_q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x_q, dtype=scale.dtype)


def _onnx_quantize_linear(x, scale, zero_point, axis: int):
    return onnx_op.QuantizeLinear(x, scale, zero_point, axis=axis)


def _onnx_dequantize_linear(x_q, scale, zero_point, axis: int):
    return onnx_op.DequantizeLinear(x_q, scale, zero_point, axis=axis)


_TRANSLATIONS = {
    torch.ops.sciquant.quantize_linear.default: _onnx_quantize_linear,
    torch.ops.sciquant.dequantize_linear.default: _onnx_dequantize_linear,
}


# -- the export module of one quantized Linear -------------------------------------------------


class _QDQLinear(SplitLinear):
    """A calibrated QuantLinear as QuantizeLinear/DequantizeLinear ops; [*, in] -> [*, out].

    `blocks`: column boundaries of the input (e.g. (0, 64, 128, 192) for [e, h_src, h_dst]):
    the weight is stored as one integer initializer per block, so the model can project each
    part of its input on its own (`SplitLinear`, the concat trick) and every block's GEMM is
    still DequantizeLinear → Gemm, which the runtimes fuse. `fold_bias`: the bias as an int32
    initializer with scale s_x·s_w (zero point 0), an input of the integer GEMM (ONNX Runtime's
    QGemm adds it in the accumulator; no float Add after it); it differs from the float bias by
    at most half a step s_x·s_w, far below one quantization step of the layer's output.
    """

    def __init__(
        self,
        layer: QuantLinear,
        weight_dtype: WeightDtype,
        blocks: Sequence[int] | None = None,
        fold_bias: bool = False,
    ) -> None:
        super().__init__()
        input_scale, input_zero_point = layer.input_qparams()
        activation_dtype = _activation_storage(layer.activation_spec)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_zero_point", input_zero_point.to(activation_dtype))
        weight_scale, weight_zero_point = layer.weight_qparams()
        weight_q = _weight_integers(layer, weight_scale, weight_zero_point)
        shift = _storage_shift(layer.weight_spec, weight_dtype)
        storage = _STORAGE[weight_dtype]
        self.blocks = tuple(blocks) if blocks else (0, layer.in_features)
        if self.blocks[0] != 0 or self.blocks[-1] != layer.in_features:
            raise SciquantError(f"column blocks {self.blocks} do not cover {layer.in_features}")
        for i, (start, stop) in enumerate(zip(self.blocks[:-1], self.blocks[1:], strict=True)):
            block = (weight_q[:, start:stop] + shift).to(storage).contiguous()
            self.register_buffer(f"weight_q{i}", block)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", (weight_zero_point + shift).to(storage))
        bias = None if layer.bias is None else layer.bias.detach().clone().float()
        self.fold_bias = fold_bias and bias is not None
        if self.fold_bias:
            bias_scale = (input_scale * weight_scale).float().reshape(-1)
            if bias_scale.numel() == 1:
                bias_scale = bias_scale.reshape(())
            self.register_buffer("bias_scale", bias_scale)
            self.register_buffer("bias_q", torch.round(bias / bias_scale).to(torch.int32))
            self.register_buffer("bias_zero_point", torch.zeros_like(bias_scale, dtype=torch.int32))
            self.register_buffer("bias", None)
        else:
            self.register_buffer("bias", bias)

    def prepare(self, x: Tensor) -> Tensor:
        """QuantizeLinear → DequantizeLinear with the layer's (whole input's) qparams."""
        # axis 1 is QuantizeLinear's default; it is unused with per-tensor qparams
        x_q = torch.ops.sciquant.quantize_linear(x, self.input_scale, self.input_zero_point, 1)
        return torch.ops.sciquant.dequantize_linear(x_q, self.input_scale, self.input_zero_point, 1)

    def _bias(self) -> Tensor | None:
        if self.fold_bias:
            return torch.ops.sciquant.dequantize_linear(
                self.bias_q, self.bias_scale, self.bias_zero_point, 0
            )
        return self.bias

    def columns(self, x: Tensor, start: int, stop: int, bias: bool) -> Tensor:
        """The weight's columns start:stop (one stored block) on `x` (already `prepare`d)."""
        try:
            index = list(zip(self.blocks[:-1], self.blocks[1:], strict=True)).index((start, stop))
        except ValueError:
            raise SciquantError(
                f"columns {start}:{stop} are not a block of {self.blocks}"
            ) from None
        weight = torch.ops.sciquant.dequantize_linear(
            getattr(self, f"weight_q{index}"), self.weight_scale, self.weight_zero_point, 0
        )
        b = self._bias() if bias else None
        if b is not None and self.fold_bias:
            return F.linear(x, weight, b)  # the bias is the integer GEMM's third input
        y = F.linear(x, weight)
        return y if b is None else y + b

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare(x)
        if len(self.blocks) == 2:
            return self.columns(x, 0, self.blocks[1], bias=True)
        parts = [
            self.columns(x[:, start:stop], start, stop, bias=i == 0)
            for i, (start, stop) in enumerate(zip(self.blocks[:-1], self.blocks[1:], strict=True))
        ]
        return torch.stack(parts).sum(0)


def _activation_storage(spec: QuantSpec) -> torch.dtype:
    ranges = {(0, 255): torch.uint8, (-128, 127): torch.int8}
    dtype = ranges.get((spec.qmin, spec.qmax))
    if dtype is None:
        raise SciquantError(
            f"activations of {spec.bits} bits in [{spec.qmin}, {spec.qmax}] have no ONNX QDQ "
            "form (QuantizeLinear saturates to the full uint8/int8 range); export 8-bit "
            "activations, run the others as simulation"
        )
    return dtype


def _weight_integers(layer: QuantLinear, scale: Tensor, zero_point: Tensor) -> Tensor:
    """The integers the simulation uses, int32 [out, in].

    Read back from the fake-quantized weight, (x_q - z)·s → x_q, exact since x_q - z is an
    integer far below 2^24; this keeps the ONNX weights bit-identical to the simulation's.
    """
    with torch.no_grad():
        weight_hat = layer.fake_quantize_weight().float()
    axis = 0
    scale_b = _broadcast(scale, weight_hat.dim(), axis)
    zero_point_b = _broadcast(zero_point, weight_hat.dim(), axis)
    return (torch.round(weight_hat / scale_b) + zero_point_b).to(torch.int32)


def _storage_shift(spec: QuantSpec, weight_dtype: WeightDtype) -> int:
    """What to add to the spec's integers to store them in `weight_dtype` (0 or ±128)."""
    native = "int8" if spec.signed else "uint8"
    shift = {("int8", "uint8"): 128, ("uint8", "int8"): -128}.get((native, weight_dtype), 0)
    limits = torch.iinfo(_STORAGE[weight_dtype])
    if spec.bits > 8 or not limits.min <= spec.qmin + shift <= spec.qmax + shift <= limits.max:
        raise SciquantError(
            f"weights in [{spec.qmin}, {spec.qmax}] do not fit {weight_dtype} storage; "
            "export weights of at most 8 bits"
        )
    return shift


def _default_weight_dtype(qmodel: QuantizedModel) -> WeightDtype:
    if qmodel.target.backend == "onnxruntime" and not cpu_has_vnni():
        return "uint8"
    return "int8"


def _check_calibrated(qmodel: QuantizedModel) -> dict[str, QuantLinear]:
    layers = qmodel.quant_linears()
    pending = [
        name for name, layer in layers.items() if layer.mode == "observe" or not layer.calibrated
    ]
    if pending:
        raise SciquantError(
            f"layers {', '.join(pending)} are not calibrated; run calibrate(qmodel, inputs) "
            "before exporting"
        )
    return layers


def _column_blocks(model: nn.Module, name: str) -> tuple[int, ...] | None:
    """A processor MLP's first Linear is split on its input's parts (the concat trick):
    [e, h_src, h_dst] for an edge MLP, [h, agg] for a node MLP; None for every other layer."""
    config = getattr(model, "config", None)
    if not isinstance(model, MeshGraphNet) or config is None:
        return None
    hidden = config.hidden
    for prefix, parts in (("edge_mlps.", 3), ("node_mlps.", 2)):
        if name.startswith(prefix) and name.endswith(".layers.0"):
            return tuple(hidden * i for i in range(parts + 1))
    return None


def _qdq_copy(
    qmodel: QuantizedModel, weight_dtype: WeightDtype, fold_bias: bool = False, split: bool = True
) -> nn.Module:
    """A copy of the inner model with every quantizing QuantLinear as a `_QDQLinear`
    (with `split`, processor MLPs' first layers in column blocks: the concat trick)."""
    layers = _check_calibrated(qmodel)
    model = copy.deepcopy(qmodel.model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if layer.mode == "float":  # switched off: exported as the float Linear it stands for
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight, linear.bias = layer.weight, layer.bias
            setattr(parent, child, linear)
        else:
            blocks = _column_blocks(model, name) if split else None
            setattr(parent, child, _QDQLinear(layer, weight_dtype, blocks, fold_bias))
    if isinstance(model, MeshGraphNet):
        model.concat_trick = split
    return model.eval()


def export_qdq_onnx(
    qmodel: QuantizedModel,
    path: str | Path,
    example_inputs: Sequence[Tensor],
    weight_dtype: WeightDtype | None = None,
    input_names: Sequence[str] = INPUT_NAMES,
    output_name: str = OUTPUT_NAME,
    dynamic_shapes: Sequence[dict[int, Any]] | None = None,
) -> Path:
    """Write the calibrated fake-quant `qmodel` as an ONNX QDQ graph (opset 18) and check it.

    Inputs ``node_features [N, F_n]`` float32, ``edge_features [E, F_e]`` float32,
    ``edge_index [2, E]`` int64 with N and E symbolic (``num_nodes``, ``num_edges``; any graph
    with N, E >= 2 runs); output ``delta [N, outputs]``. `example_inputs` is one such graph, for
    tracing. weight_dtype: ``int8`` or ``uint8`` weight storage; None picks ``uint8`` for the
    onnxruntime target on a CPU without VNNI, else ``int8`` (module docstring). The model's
    metadata records target, precision, method and weight storage.

    Another model (a plug-in workload's, `sciquant.workloads.pytorch`) names its own
    `input_names`, `output_name` and `dynamic_shapes` (per input, ``{axis: torch.export.Dim}``;
    None: the graph's node and edge counts above).
    """
    limits = METHOD_LIMITS.get(qmodel.method)
    if limits is not None and limits.backends is not None:
        raise SciquantError(
            f"a {qmodel.method} model ({limits.description}) is a simulation: an ONNX QDQ graph "
            "has one scale per tensor and could not carry it; evaluate it with --simulated"
        )
    weight_dtype = weight_dtype or _default_weight_dtype(qmodel)
    if weight_dtype not in _STORAGE:
        raise SciquantError(f"weight_dtype must be int8 or uint8, got {weight_dtype!r}")
    if len(example_inputs) != len(input_names):
        raise SciquantError(
            f"example_inputs must be ({', '.join(input_names)}), got {len(example_inputs)} tensors"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fold_bias = qmodel.target.backend in INTEGER_BIAS_BACKENDS
    model = _qdq_copy(qmodel, weight_dtype, fold_bias, qmodel.target.backend in SPLIT_BACKENDS)
    if dynamic_shapes is None:
        nodes = torch.export.Dim("num_nodes", min=2)
        edges = torch.export.Dim("num_edges", min=2)
        dynamic_shapes = ({0: nodes}, {0: edges}, {1: edges})
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(example_inputs),
            str(path),
            input_names=list(input_names),
            output_names=[output_name],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=tuple(dynamic_shapes),
            custom_translation_table=_TRANSLATIONS,
            verbose=False,
        )
    proto = onnx.load(str(path))
    metadata = {
        "sciquant.target": qmodel.target.name,
        "sciquant.precision": str(qmodel.precision),
        "sciquant.method": qmodel.method,
        "sciquant.weight_dtype": weight_dtype,
        "sciquant.bias": "int32, in the integer GEMM" if fold_bias else "float Add",
        "sciquant.concat_trick": "yes" if qmodel.target.backend in SPLIT_BACKENDS else "no",
        "sciquant.layer_precisions": json.dumps(
            {name: str(precision) for name, precision in qmodel.layer_precisions.items()}
        ),
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_fp32_onnx(
    model: nn.Module,
    path: str | Path,
    num_nodes_example: int = 64,
    concat_trick: bool | None = None,
) -> Path:
    """The float model as ONNX (same inputs and output as `export_qdq_onnx`).

    concat_trick: False gives one Gemm per Linear on its concatenated input, the graph that
    ONNX-side quantizers (`sciquant.workloads.bloodflow.dynamic`) see layer by layer; None keeps the
    model's.
    """
    return export_onnx(model, path, num_nodes_example=num_nodes_example, concat_trick=concat_trick)


def weight_initializers(path: str | Path) -> dict[str, np.ndarray]:
    """The 8-bit initializers of an exported model (the integer weights and zero points)."""
    proto = onnx.load(str(path))
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return {
        tensor.name: onnx.numpy_helper.to_array(tensor)
        for tensor in proto.graph.initializer
        if tensor.data_type in eight_bit
    }
