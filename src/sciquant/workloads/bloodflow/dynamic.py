"""Dynamic INT8 quantization (`ptq-dynamic`): the seed study's method, on ONNX Runtime.

The seed study quantized MeshGraphNet with PyTorch's ``torch.ao.quantization.quantize_dynamic``
on its Linear layers: int8 weights fixed offline, activations quantized on the fly, per batch,
from the range of each Linear's input at run time; executed on the CPU. ``torch.ao`` is
deprecated, so the same method runs here as ONNX Runtime's own dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``) of the model's FP32 ONNX export, executed by
ONNX Runtime's integer kernels (``DynamicQuantizeMatMul`` after its graph optimizations).

For every Linear layer (x [N, in], W [out, in], b [out]), with the MatMul's weight B = Wᵀ:

    weights (offline, per tensor, symmetric int8 in [-127, 127]):
        s_w = max|B| / 127            B_q = clamp(round(B / s_w), -127, 127)     z_w = 0
    activations (every call, over the whole input tensor x of the MatMul, asymmetric uint8):
        lo, hi = min(min x, 0), max(max x, 0)
        s_x = (hi - lo) / 255         z_x = clamp(round(-lo / s_x), 0, 255)
        x_q = clamp(round(x / s_x) + z_x, 0, 255)
    y = s_x · s_w · ((x_q - z_x) @ (B_q - z_w)) + b      (int32 accumulation, float output)

Rounding is half to even. Per tensor, as the seed: ``quantize_dynamic``'s default qconfig is
``per_tensor_symmetric`` int8 weights (``per_channel=True`` is available here, one scale per
output column of B). Two differences to the seed's kernel remain, both inherent to the engines:
FBGEMM computes the activation range on 7 bits (``reduce_range``) where ONNX Runtime uses all 8,
and torch's symmetric int8 weights span [-128, 127] where ONNX Runtime's span [-127, 127].

The FP32 export is the textbook one (``concat_trick=False``): each Linear is one Gemm on its
concatenated input (e.g. [e, h_src, h_dst]), so each layer gets one activation range as in the
seed's PyTorch model; the concat trick would split a layer into three products with three ranges.
ONNX Runtime's dynamic quantizer takes MatMul, not Gemm, so each Gemm becomes MatMul(x, Wᵀ) + Add(b)
first (the same numbers). The quantized graph stores, per Linear ``<name>``, the initializers
``<name>.weight.T_quantized`` (B_q), ``<name>.weight.T_scale`` (s_w) and
``<name>.weight.T_zero_point`` (z_w).

Weight storage: on x86 without VNNI, ONNX Runtime's U8S8 GEMM saturates
(`sciquant.runtime.onnxruntime`), so there the int8 weights are stored as uint8 (the same integers
+ 128, zero point 128: the same dequantized weights, run by the exact U8U8 kernel), as
`sciquant.quant.export` does for the static models. No calibration data is needed: the ranges of
the activations are those of each batch.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sciquant.errors import SciquantError, first_line
from sciquant.quant.observers import DYNAMIC_METHODS
from sciquant.runtime.onnxruntime import cpu_has_vnni

__all__ = [
    "DYNAMIC_METHOD",
    "WEIGHT_SUFFIX",
    "gemm_to_matmul",
    "is_dynamic",
    "quantize_dynamic_onnx",
    "run",
]

DYNAMIC_METHOD = "ptq-dynamic"
#: What a Linear's weight initializer is renamed to when its Gemm becomes MatMul(x, Wᵀ).
WEIGHT_SUFFIX = ".T"
WeightDtype = Literal["int8", "uint8"]
_METADATA_METHOD = "sciquant.method"


def gemm_to_matmul(proto: onnx.ModelProto) -> int:
    """Rewrite, in place, every Gemm(x, W, b) with transB=1 (a Linear) as MatMul(x, Wᵀ) + Add(b).

    Wᵀ is a new initializer ``<W's name>.T`` [in, out]; W goes. Returns how many were rewritten;
    a Gemm of another form (alpha, beta ≠ 1, transA, a weight that is not an initializer) is a
    SciquantError, since it would silently stay float.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, weight, *bias = node.input
        plain = (
            attributes.get("alpha", 1.0) == 1.0
            and attributes.get("beta", 1.0) == 1.0
            and attributes.get("transA", 0) == 0
            and attributes.get("transB", 0) == 1
            and weight in initializers
            and all(b in initializers for b in bias)
        )
        if not plain:
            raise SciquantError(
                f"Gemm node {node.name!r} is not a Linear layer (x Wᵀ + b with W an "
                f"initializer); dynamic quantization would leave it float"
            )
        transposed = numpy_helper.to_array(initializers[weight]).T
        name = weight + WEIGHT_SUFFIX
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(transposed), name))
        replaced.add(weight)
        product = node.output[0] + "_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [x, name], [product], name=node.name + "_matmul"))
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias[0]], list(node.output), name=node.name)
            )
    del graph.node[:]
    graph.node.extend(nodes)
    _drop(graph.initializer, replaced)
    _drop(graph.value_info, replaced)  # the old [out, in] shapes would contradict [in, out]
    return len(replaced)


def _drop(container, names: set[str]) -> None:  # noqa: ANN001
    kept = [item for item in container if item.name not in names]
    del container[:]
    container.extend(kept)


def quantize_dynamic_onnx(
    fp32_onnx: str | Path,
    out: str | Path,
    per_channel: bool = False,
    weight_dtype: WeightDtype | None = None,
) -> Path:
    """Dynamically quantize an FP32 ONNX model (module docstring): int8 weights, uint8 activations.

    Every Gemm must be a Linear layer; all of them are quantized (SciquantError otherwise).
    weight_dtype: ``int8`` or ``uint8`` storage; None: uint8 on a CPU without VNNI, else int8.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_dtype = weight_dtype or ("int8" if cpu_has_vnni() else "uint8")
    if weight_dtype not in ("int8", "uint8"):
        raise SciquantError(f"weight_dtype must be int8 or uint8, got {weight_dtype!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(fp32_onnx))
    linears = gemm_to_matmul(proto)
    onnx.checker.check_model(proto, full_check=True)
    # ORT's advice to run its pre-processing concerns shape inference of CNNs, not these graphs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(proto, out, per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(out))
    integer = sum(node.op_type == "MatMulInteger" for node in quantized.graph.node)
    if integer != linears:
        raise SciquantError(
            f"ONNX Runtime quantized {integer} of the {linears} Linear layers of {fp32_onnx}; "
            "the rest would run float"
        )
    if weight_dtype == "uint8":
        _store_weights_unsigned(quantized)
    metadata = {
        _METADATA_METHOD: DYNAMIC_METHOD,
        "sciquant.weight_dtype": weight_dtype,
        "sciquant.per_channel": json.dumps(per_channel),
    }
    helper.set_model_props(quantized, metadata)
    onnx.save(quantized, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def _store_weights_unsigned(proto: onnx.ModelProto) -> None:
    """int8 weights w (zero point 0) → uint8 w + 128 (zero point 128), in place."""
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        for name in (node.input[1], node.input[3]):
            tensor = initializers[name]
            values = numpy_helper.to_array(tensor)
            if values.dtype != np.int8:
                raise SciquantError(f"weight initializer {name!r} is {values.dtype}, not int8")
            shifted = (values.astype(np.int16) + 128).astype(np.uint8)
            tensor.CopyFrom(numpy_helper.from_array(shifted, name))


def is_dynamic(path: str | Path) -> bool:
    """Whether an ONNX file is a `ptq-dynamic` model written by `quantize_dynamic_onnx`."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as error:
        raise SciquantError(
            f"{path}: ONNX file not found; run the run's export (or quantize) stage first"
        ) from error
    except Exception as error:  # protobuf's DecodeError and others for a damaged file
        raise SciquantError(
            f"{path}: not a readable ONNX model ({first_line(error)}); delete it and rerun its "
            "export or quantize stage"
        ) from error
    return any(
        p.key == _METADATA_METHOD and p.value == DYNAMIC_METHOD for p in proto.metadata_props
    )


def dynamic_size(model) -> dict[str, int]:  # noqa: ANN001
    """Parameters and deployed bytes of a model whose Linear weights are int8, the rest float32."""
    from torch import nn

    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    int8 = sum(w.numel() for w in weights)
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "model_bytes": int8 + 4 * (parameters - int8)}


def run(
    checkpoint: Path,
    out: Path,
    target: str,
    precision: str,
    per_channel: bool = False,
    threads: int | None = None,
) -> Path:
    """The FP32 MeshGraphNet of `checkpoint`, exported and quantized dynamically: out/model.onnx."""
    import torch

    from sciquant.quant.export import export_fp32_onnx
    from sciquant.workloads.bloodflow.train import load_model

    DYNAMIC_METHODS[DYNAMIC_METHOD].check(DYNAMIC_METHOD, target, precision, "torch")
    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out) as folder:
        fp32 = export_fp32_onnx(model, Path(folder) / "fp32.onnx", concat_trick=False)
        partial = Path(folder) / "model.onnx"
        quantize_dynamic_onnx(fp32, partial, per_channel=per_channel)
        partial.replace(path)
    print(f"{DYNAMIC_METHOD}: {path} (int8 weights of every Linear, activations per batch)")
    return path
