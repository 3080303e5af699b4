"""TensorRT (10.x Python API) as a rollout step function and a classifier runner, on CUDA.

    ok, reason = available()                              # (False, "...") without TensorRT/CUDA
    step = TrtStep.from_onnx("model.onnx", precision="fp16", num_nodes=1200, num_edges=3100,
                             max_in_degree=6)
    delta = step(node_features, edge_features, edge_index)  # torch in, torch out (CPU or CUDA)
    step.timing_summary()                                   # h2d / compute / d2h, CUDA-event ms
    runner = TrtRunner("icnnmd.onnx", precision="int8")     # classifiers: predict, time_batch1

`tensorrt` is imported lazily: this module imports (and its pure functions run) without it.
Everything that needs TensorRT raises `SciquantError` naming the reason when it is missing.

Engines
-------
`build_engine` parses an ONNX file into a network (TensorRT 10 networks are always explicit
batch; the EXPLICIT_BATCH creation flag is deprecated and not passed), with one optimization
profile for the dynamic dimensions (node and edge counts, or the batch), and serializes the
engine to ``<cache_dir>/<key>.engine`` (written to a temporary file, then renamed). The key
(`engine_cache_key`) is a sha256 over the ONNX bytes, the GPU name, the TensorRT version, the
precision's builder flags and the profile shapes, so a rebuild happens exactly when one changes.
Precisions: ``fp32`` (strict FP32: the TF32 flag, on by default on Ampere, is cleared), ``fp16``
(BuilderFlag.FP16), ``int8`` (FP16 + INT8 from an explicit-QDQ ONNX that carries our own scales:
no calibrator; TensorRT's implicit calibrators are deprecated since 10.1 and removed in 11). The
INT8 file must hold symmetric int8 Q/DQ (zero point 0): the `trt-v100` / `trt-rtx3090` targets;
`check_qdq_for_tensorrt` refuses the uint8 activations of `cpu-x86` with the fix. (TensorRT 10.12
deprecates these weakly-typed precision flags; they still work in the 10.x pinned here.)

The MeshGraphNet graph and TensorRT
-----------------------------------
The exported MeshGraphNet aggregates messages with ``ScatterND(reduction="add")`` (from
``index_add_``). TensorRT's ONNX parser refuses the ``reduction`` attribute of ScatterND
(``UNSUPPORTED_NODE_ATTR``, reported up to 10.7 and later; ScatterElements with a reduction needs
as many outputs as indices, which E > N breaks). `rewrite_scatter_add` therefore rewrites every
such node into ops every TensorRT parses, exactly the same sum:

    agg = data + ReduceSum(Gather(Concat(updates, zero_row), incoming_edges), axis=1)

with a new int input ``incoming_edges [num_nodes, max_in_degree]``: row i lists the ids of the
edges whose destination is i, padded with E (the zero row). `incoming_edges` computes it from
``edge_index`` on the host; `TrtStep` does that once per graph. Blood-flow graphs are trees
with in-degree <= ~4 (random trees: ~log N), so the table is small. The rewrite also makes the
integer inputs int32 (a Cast to int64 inside the graph): TensorRT's native integer type, half the
bytes to copy. The rewritten file is checked against the original with ONNX Runtime (CPU).

Step functions on the GPU
-------------------------
`TrtStep` takes torch tensors. CPU inputs are copied to the device (``h2d``, timed with CUDA
events on the step's own stream); the inputs that do not change during a rollout
(``edge_features``, ``edge_index`` and the derived ``incoming_edges``) are copied once per tensor
and reused while the same tensor object is passed unmodified (checked by identity and torch's
version counter), so a rollout pays one [N, F] upload per step. Integer inputs are converted to
the engine's integer type on the host before the copy. ``execute_async_v3`` runs with
``set_input_shape`` / ``set_tensor_address`` on torch-allocated CUDA buffers; the output comes
back through a pinned buffer (``d2h``) unless ``keep_on_device=True``, which returns the CUDA
tensor: a rollout that keeps its state on the GPU then pays no transfer at all (pass CUDA inputs).
Every call synchronizes its stream to read the event times; a rollout step depends on the
previous one anyway. CUDA-graph capture of a step is not done: shapes are dynamic per call (every
graph size is one profile), and the gain would be the launch overhead of ~40 small kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path
from sciquant.runtime.latency import batch1_latency, timing_summary

__all__ = [
    "DEFAULT_CACHE_DIR",
    "INCOMING_EDGES",
    "PRECISIONS",
    "TrtRunner",
    "TrtStep",
    "available",
    "build_engine",
    "check_qdq_for_tensorrt",
    "check_version",
    "engine_cache_key",
    "graph_dims",
    "graph_profile",
    "incoming_edges",
    "precision_flags",
    "rewrite_scatter_add",
]

Precision = Literal["fp32", "fp16", "int8"]
#: The engine precision of each run precision a TensorRT target runs natively: the keys are the
#: TensorRT rows' `native_precisions` of the targets table (a test holds them equal).
BUILD_PRECISIONS: Mapping[str, Precision] = {"fp32": "fp32", "fp16": "fp16", "w8a8": "int8"}


def build_precision(precision: str) -> Precision:
    """The engine precision of run precision `precision`; SciquantError for one TensorRT does
    not run natively."""
    if precision not in BUILD_PRECISIONS:
        raise SciquantError(
            f"precision {precision} does not run natively on TensorRT "
            f"(native: {', '.join(BUILD_PRECISIONS)}); evaluate it as a simulation"
        )
    return BUILD_PRECISIONS[precision]


PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: Optimization-profile shapes per input name: (min, opt, max), each a shape tuple.
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

DEFAULT_CACHE_DIR = Path("~/.cache/sciquant/trt")
INCOMING_EDGES = "incoming_edges"
_CACHE_FORMAT = "sciquant-trt-engine-v1"
_VOLTA = {(7, 0), (7, 2)}
_VOLTA_LAST = (10, 4)


# -- availability and versions -----------------------------------------------------------------


def available() -> tuple[bool, str]:
    """(True, "TensorRT x on GPU") when `tensorrt` imports and CUDA is usable, else (False, why)."""
    try:
        import tensorrt as trt
    except ImportError as error:
        return False, f"the tensorrt package does not import ({error})"
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        return False, f"CUDA is not available to torch {torch.__version__} ({build})"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def _require() -> Any:
    """The `tensorrt` module, or SciquantError saying why this node cannot run TensorRT."""
    ok, reason = available()
    if not ok:
        raise SciquantError(
            f"TensorRT is not available on this node: {reason}; run this stage on a GPU node "
            "(see the study's `nodes`)"
        )
    import tensorrt as trt

    capability = torch.cuda.get_device_capability()
    check_version(capability, trt.__version__)
    return trt


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise SciquantError(f"cannot read the TensorRT version {version!r} (expected e.g. 10.13.0)")
    return int(match.group(1)), int(match.group(2))


def check_version(gpu_compute_capability: tuple[int, int], trt_version: str) -> None:
    """Refuse TensorRT versions that cannot run on this GPU; None when they can.

    Volta (sm70, V100; sm72) is supported up to TensorRT 10.4: 10.5 dropped it. TensorRT before
    10.0 lacks the API used here (named tensors, ``execute_async_v3``).
    """
    version = _version_tuple(trt_version)
    capability = tuple(int(v) for v in gpu_compute_capability)
    if version < (10, 0):
        raise SciquantError(
            f"TensorRT {trt_version} is older than 10.0, whose API sciquant uses; create the "
            "environment envs/tensorrt.yaml (envs/tensorrt-volta.yaml on V100)"
        )
    if capability in _VOLTA and version > _VOLTA_LAST:
        raise SciquantError(
            f"TensorRT {trt_version} cannot run on this Volta GPU (sm{capability[0]}"
            f"{capability[1]}, e.g. V100): Volta support was dropped in TensorRT 10.5; use the "
            "environment envs/tensorrt-volta.yaml (TensorRT 10.4) on Volta nodes"
        )


# -- cache keys and profiles -------------------------------------------------------------------


def precision_flags(precision: str) -> tuple[str, ...]:
    """The builder flags a precision sets ("-TF32": cleared), as recorded in the cache key."""
    flags = {"fp32": ("-TF32",), "fp16": ("FP16",), "int8": ("FP16", "INT8")}
    if precision not in flags:
        raise SciquantError(
            f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return flags[precision]


def _normalized_profile(profile: Profile) -> dict[str, list[list[int]]]:
    normalized: dict[str, list[list[int]]] = {}
    for name in sorted(profile):
        shapes = profile[name]
        if len(shapes) != 3:
            raise SciquantError(f"profile of {name!r} must be (min, opt, max) shapes, got {shapes}")
        lo, opt, hi = ([int(d) for d in shape] for shape in shapes)
        if not len(lo) == len(opt) == len(hi):
            raise SciquantError(f"profile of {name!r}: min, opt, max differ in rank: {shapes}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise SciquantError(f"profile of {name!r} needs min <= opt <= max per dim: {shapes}")
        normalized[name] = [lo, opt, hi]
    return normalized


def engine_cache_key(
    onnx_path: str | Path,
    *,
    precision: str,
    gpu_name: str,
    trt_version: str,
    profile: Profile,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """sha256 (hex) over the ONNX bytes, GPU name, TensorRT version, precision flags, profile.

    extra: further build settings that change the engine (e.g. the optimization level).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise SciquantError(f"ONNX model {path} does not exist; export it first")
    settings = {
        "format": _CACHE_FORMAT,
        "gpu": gpu_name,
        "tensorrt": trt_version,
        "flags": list(precision_flags(precision)),
        "profile": _normalized_profile(profile),
        "extra": dict(sorted((extra or {}).items())),
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(b"\0")
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def graph_profile(
    num_nodes: int,
    num_edges: int,
    max_in_degree: int,
    node_features: int = 53,
    edge_features: int = 9,
    min_nodes: int = 2,
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The optimization profile of a rewritten MeshGraphNet: dims up to the given graph's.

    Give the batched test graph's node and edge counts and in-degree (`incoming_edges`): they
    are the profile's opt and max (every rollout step has exactly that shape); min is tiny, so
    smaller graphs run too.
    """
    if min(num_nodes, num_edges, max_in_degree) < 1:
        raise SciquantError(
            f"profile sizes must be positive: nodes {num_nodes}, edges {num_edges}, "
            f"in-degree {max_in_degree}"
        )
    lo_nodes = min(min_nodes, num_nodes)
    lo_edges = min(2, num_edges)
    return {
        "node_features": ((lo_nodes, node_features),) + ((num_nodes, node_features),) * 2,
        "edge_features": ((lo_edges, edge_features),) + ((num_edges, edge_features),) * 2,
        "edge_index": ((2, lo_edges),) + ((2, num_edges),) * 2,
        INCOMING_EDGES: ((lo_nodes, 1),) + ((num_nodes, max_in_degree),) * 2,
    }


# -- the aggregation rewrite -------------------------------------------------------------------


def incoming_edges(edge_index: Tensor, num_nodes: int) -> Tensor:
    """[num_nodes, K] int32: row i = ids of the edges with destination i, padded with E.

    K is the largest in-degree (at least 1); ids within a row ascend (the order of the
    sequential sum). Gathering rows of ``[edge values; zeros]`` with it and summing over K equals
    ``zeros.index_add_(0, edge_index[1], edge values)``.
    """
    dst = torch.as_tensor(edge_index)[1].to(torch.int64).cpu()
    num_edges = dst.numel()
    if num_edges and (int(dst.min()) < 0 or int(dst.max()) >= num_nodes):
        raise SciquantError(
            f"edge_index refers to nodes outside 0..{num_nodes - 1}; the graph is inconsistent"
        )
    counts = torch.bincount(dst, minlength=num_nodes)
    width = max(int(counts.max()) if num_edges else 0, 1)
    order = torch.argsort(dst, stable=True)
    sorted_dst = dst[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(num_edges) - starts[sorted_dst]
    table = torch.full((num_nodes, width), num_edges, dtype=torch.int32)
    table[sorted_dst, slot] = order.to(torch.int32)
    return table


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _reads_destinations(name: str, producers: dict[str, Any], constants: dict) -> bool:
    """Whether tensor `name` is edge_index[1] (through Unsqueeze / Reshape / Cast / Squeeze)."""
    node = producers.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Reshape", "Cast", "Squeeze"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gather" or node.input[0] != "edge_index":
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    index = constants.get(node.input[1])
    return axis == 0 and index is not None and index.size == 1 and int(index.reshape(())) == 1


def _is_zeros(name: str, producers: dict[str, Any], constants: dict) -> bool:
    """Whether tensor `name` is all zeros (an Expand / ConstantOfShape of a zero constant)."""
    node = producers.get(name)
    if node is None:
        return False
    if node.op_type == "Expand":
        value = constants.get(node.input[0])
        return value is not None and not np.any(value)
    if node.op_type == "ConstantOfShape":
        from onnx import numpy_helper

        values = [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
        return not values or not np.any(values[0])
    return False


def rewrite_scatter_add(onnx_path: str | Path, out_path: str | Path, verify: bool = True) -> Path:
    """Write `onnx_path` with every ScatterND(add) as Gather + ReduceSum (module docstring).

    The result has a fourth input ``incoming_edges [num_nodes, max_in_degree]`` (int32, see
    `incoming_edges`), and int32 ``edge_index``. Works for FP32 and QDQ exports alike (the
    Q/DQ nodes are untouched). verify: run both files with ONNX Runtime on a random tree and
    raise SciquantError if they disagree (they differ by float summation order only; a QDQ
    model may in addition flip single activation codes, hence the loose 1 % bound).
    """
    import onnx
    from onnx import TensorProto, helper

    source = Path(onnx_path)
    if not source.is_file():
        raise SciquantError(f"ONNX model {source} does not exist; export it first")
    model = onnx.load(str(source))
    graph = model.graph
    inputs = {value.name: value for value in graph.input}
    if "edge_index" not in inputs:
        raise SciquantError(
            f"{source}: no `edge_index` input; not a MeshGraphNet export (export_onnx, "
            "export_qdq_onnx)"
        )
    producers = {output: node for node in graph.node for output in node.output}
    constants = _constant_values(graph)
    nodes = []
    rewritten = 0
    for node in graph.node:
        reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        if node.op_type != "ScatterND" or reduction != "add":
            nodes.append(node)
            continue
        data, indices, updates = node.input
        if not _reads_destinations(indices, producers, constants):
            raise SciquantError(
                f"{source}: ScatterND {node.name!r} does not scatter to edge_index[1]; only "
                "MeshGraphNet's sum over incoming edges can be rewritten for TensorRT"
            )
        p = f"sciquant_agg{rewritten}_"
        graph.initializer.extend(
            helper.make_tensor(p + name, TensorProto.INT64, [1], [value])
            for name, value in (("one", 1), ("from", 1), ("to", 2), ("axis1", 1))
        )
        zero = helper.make_tensor(p + "zero_value", TensorProto.FLOAT, [1], [0.0])
        summed = node.output[0] if _is_zeros(data, producers, constants) else p + "sum"
        nodes += [
            helper.make_node("Shape", [updates], [p + "shape"]),
            helper.make_node("Slice", [p + "shape", p + "from", p + "to"], [p + "width"]),
            helper.make_node("Concat", [p + "one", p + "width"], [p + "zero_shape"], axis=0),
            helper.make_node("ConstantOfShape", [p + "zero_shape"], [p + "zero"], value=zero),
            helper.make_node("Concat", [updates, p + "zero"], [p + "padded"], axis=0),
            helper.make_node("Gather", [p + "padded", INCOMING_EDGES], [p + "gathered"], axis=0),
            helper.make_node("ReduceSum", [p + "gathered", p + "axis1"], [summed], keepdims=0),
        ]
        if summed != node.output[0]:
            nodes.append(helper.make_node("Add", [data, summed], [node.output[0]]))
        rewritten += 1
    # int32 integer inputs: edge_index is read through one Cast to int64 inside the graph
    cast_name = "sciquant_edge_index_int64"
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == "edge_index":
                node.input[i] = cast_name
    nodes.insert(0, helper.make_node("Cast", ["edge_index"], [cast_name], to=TensorProto.INT64))
    inputs["edge_index"].type.tensor_type.elem_type = TensorProto.INT32
    if rewritten:
        dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        graph.input.append(
            helper.make_tensor_value_info(
                INCOMING_EDGES, TensorProto.INT32, [dims[0] if dims else "num_nodes", "in_degree"]
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale after the rewrite; shape inference redoes it
    out = Path(out_path)
    with atomic_path(out) as partial:
        onnx.save(model, str(partial))
        onnx.checker.check_model(str(partial), full_check=True)
        if verify:
            _verify_rewrite(source, partial)
    return out


def _verify_rewrite(original: Path, rewritten: Path, num_nodes: int = 97) -> None:
    import onnxruntime as ort

    from sciquant.models.meshgraphnet import random_tree_graph

    def session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    first, second = session(original), session(rewritten)
    widths = [value.shape[1] for value in first.get_inputs()[:2]]
    x, e, edge_index = random_tree_graph(num_nodes, 0, *widths)
    feeds = {"node_features": x.numpy(), "edge_features": e.numpy()}
    (expected,) = first.run(None, {**feeds, "edge_index": edge_index.numpy()})
    names = {value.name for value in second.get_inputs()}
    feeds["edge_index"] = edge_index.numpy().astype(np.int32)
    if INCOMING_EDGES in names:
        feeds[INCOMING_EDGES] = incoming_edges(edge_index, num_nodes).numpy()
    (actual,) = second.run(None, feeds)
    scale = float(np.abs(expected).max()) + 1e-6
    error = float(np.abs(actual - expected).max())
    if actual.shape != expected.shape or error > 1e-2 * scale:
        raise SciquantError(
            f"{original}: the TensorRT rewrite changes the model's output (max error {error:.3g} "
            f"of {scale:.3g}); report this with the ONNX file"
        )


# -- QDQ checks and engine building ------------------------------------------------------------


def check_qdq_for_tensorrt(onnx_path: str | Path) -> int:
    """Number of QuantizeLinear nodes; SciquantError unless they are int8 with zero point 0.

    TensorRT runs explicit quantization with symmetric int8 only (the `trt-*` targets);
    an export for ONNX Runtime (`cpu-x86`, uint8 activations) is refused with the fix.
    """
    import onnx

    path = Path(onnx_path)
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = _constant_values(graph)
    count = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += node.op_type == "QuantizeLinear"
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None:
            continue
        if zero_point.dtype != np.int8 or np.any(zero_point != 0):
            raise SciquantError(
                f"{path}: {node.op_type} {node.name!r} uses {zero_point.dtype} with zero point "
                f"{zero_point.ravel()[:4].tolist()}; TensorRT needs symmetric int8 (zero point 0): "
                "quantize for target trt-rtx3090 or trt-v100 and export that model"
            )
    return count


class _Logger:
    """One TensorRT logger per process (TensorRT wants a single one)."""

    instance: Any = None

    @classmethod
    def get(cls, trt: Any) -> Any:
        if cls.instance is None:
            cls.instance = trt.Logger(trt.Logger.WARNING)
        return cls.instance


def _cache_dir(cache_dir: str | Path | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    return folder.expanduser()


def build_engine(
    onnx_path: str | Path,
    *,
    precision: Precision,
    profile: Profile,
    cache_dir: str | Path | None = None,
    optimization_level: int | None = None,
    workspace_bytes: int | None = None,
) -> Path:
    """The serialized engine for `onnx_path` (built, or found in the cache); its path.

    profile: input name -> (min, opt, max) shapes for every dynamic input (`graph_profile`
    for a rewritten MeshGraphNet). optimization_level: None keeps TensorRT's default (3).
    """
    trt = _require()
    path = Path(onnx_path)
    flags = precision_flags(precision)
    if precision == "int8" and check_qdq_for_tensorrt(path) == 0:
        raise SciquantError(
            f"{path}: INT8 needs an explicit-QDQ ONNX (QuantizeLinear/DequantizeLinear with our "
            "scales); export the quantized model (`sciquant export`), not the FP32 one"
        )
    extra = {} if optimization_level is None else {"optimization_level": optimization_level}
    key = engine_cache_key(
        path,
        precision=precision,
        gpu_name=torch.cuda.get_device_name(),
        trt_version=trt.__version__,
        profile=profile,
        extra=extra,
    )
    folder = _cache_dir(cache_dir)
    engine_path = folder / f"{key}.engine"
    if engine_path.is_file():
        return engine_path
    logger = _Logger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        hint = (
            "\n(a MeshGraphNet export needs rewrite_scatter_add first; TrtStep.from_onnx does it)"
            if any("ScatterND" in error for error in errors)
            else ""
        )
        raise SciquantError(
            f"TensorRT cannot parse {path}:\n  "
            + "\n  ".join(errors or ["(no error reported)"])
            + hint
        )
    config = builder.create_builder_config()
    if "-TF32" in flags:
        config.clear_flag(trt.BuilderFlag.TF32)
    if "FP16" in flags:
        config.set_flag(trt.BuilderFlag.FP16)
    if "INT8" in flags:
        config.set_flag(trt.BuilderFlag.INT8)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, opt, hi) in _normalized_profile(profile).items():
        if name not in network_inputs:
            raise SciquantError(
                f"profile names input {name!r}, which {path} does not have "
                f"(inputs: {', '.join(sorted(network_inputs))})"
            )
        optimization_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SciquantError(
            f"TensorRT could not build an engine from {path} ({precision}); its log above says "
            "why (often: a profile outside the model's valid shapes, or too little GPU memory)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(memoryview(serialized))
        os.replace(partial, engine_path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return engine_path


def _parser_error(error: Any) -> str:
    where = []
    for attribute in ("node_name", "node_operator"):
        getter = getattr(error, attribute, None)
        try:
            value = getter() if callable(getter) else None
        except Exception:  # older bindings lack or break these accessors
            value = None
        if value:
            where.append(str(value))
    return (f"[{' '.join(where)}] " if where else "") + str(error.desc())


# -- execution ---------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if dtype not in table:
        raise SciquantError(f"TensorRT I/O type {dtype} is not supported by sciquant's runner")
    return table[dtype]


class _Session:
    """One deserialized engine, its execution context, a CUDA stream and four timing events."""

    def __init__(self, engine_path: str | Path, device: int | None = None) -> None:
        trt = _require()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise SciquantError(f"TensorRT engine {self.path} does not exist; build it first")
        self.device = torch.device(
            "cuda", torch.cuda.current_device() if device is None else device
        )
        runtime = trt.Runtime(_Logger.get(trt))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SciquantError(
                f"{self.path}: TensorRT cannot load this engine (corrupt, or built by another "
                "TensorRT/GPU); delete it and rerun to rebuild"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=self.device)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        self._pinned: dict[str, Tensor] = {}

    def profile_range(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(lo), tuple(hi)

    def run(
        self, feeds: Mapping[str, Tensor], to_device: Any, keep_on_device: bool
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Outputs by name and {"h2d", "compute", "d2h"} ms. `to_device(name, tensor)` uploads."""
        start, uploaded, computed, downloaded = self.events
        with torch.cuda.device(self.device):
            # Order after the caller's pending work (it may still use buffers we reuse).
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                start.record(self.stream)
                device_inputs = {name: to_device(name, feeds[name]) for name in self.inputs}
                uploaded.record(self.stream)
                for name, tensor in device_inputs.items():
                    if not self.context.set_input_shape(name, tuple(tensor.shape)):
                        lo, hi = self.profile_range(name)
                        raise SciquantError(
                            f"{self.path}: input {name} of shape {tuple(tensor.shape)} is outside "
                            f"the engine's profile ({lo} to {hi}); rebuild the engine with a "
                            "profile that covers this graph"
                        )
                    self.context.set_tensor_address(name, tensor.data_ptr())
                outputs = {}
                for name in self.outputs:
                    shape = tuple(self.context.get_tensor_shape(name))
                    outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                    self.context.set_tensor_address(name, outputs[name].data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise SciquantError(f"{self.path}: TensorRT execution failed (see its log)")
                computed.record(self.stream)
                if not keep_on_device:
                    outputs = {name: self._download(name, t) for name, t in outputs.items()}
                downloaded.record(self.stream)
            self.stream.synchronize()
        timing = {
            "h2d": start.elapsed_time(uploaded),
            "compute": uploaded.elapsed_time(computed),
            "d2h": 0.0 if keep_on_device else computed.elapsed_time(downloaded),
        }
        if not keep_on_device:  # the pinned buffers are reused by the next call
            outputs = {name: tensor.clone() for name, tensor in outputs.items()}
        return outputs, timing

    def _download(self, name: str, tensor: Tensor) -> Tensor:
        host = self._pinned.get(name)
        if host is None or host.shape != tensor.shape:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._pinned[name] = host
        host.copy_(tensor, non_blocking=True)
        return host


def _host_cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` as `dtype`, contiguous; integer narrowing checked (int64 ids -> int32)."""
    tensor = torch.as_tensor(tensor)
    if tensor.dtype != dtype and not dtype.is_floating_point and tensor.numel():
        info = torch.iinfo(dtype)
        if int(tensor.min()) < info.min or int(tensor.max()) > info.max:
            raise SciquantError(f"integer input does not fit the engine's {dtype}")
    return tensor.to(dtype).contiguous()


class TrtStep:
    """A TensorRT engine of a (rewritten) MeshGraphNet as a StepFunction: ``(node_features
    [N, F], edge_features [E, 9], edge_index [2, E]) -> delta [N, 2]``, torch in and out.

    CPU inputs are uploaded (static ones once, see the module docstring); CUDA inputs are used
    in place. The output is a CPU tensor, or the CUDA tensor with ``keep_on_device=True``. Every
    call appends ``{"h2d", "compute", "d2h"}`` (CUDA-event milliseconds) to ``timings``.
    """

    STATIC = ("edge_features", "edge_index", INCOMING_EDGES)

    def __init__(
        self, engine_path: str | Path, *, keep_on_device: bool = False, device: int | None = None
    ) -> None:
        self.session = _Session(engine_path, device)
        self.path = self.session.path
        self.keep_on_device = keep_on_device
        expected = {"node_features", "edge_features", "edge_index"}
        if not expected <= set(self.session.inputs) <= expected | {INCOMING_EDGES}:
            raise SciquantError(
                f"{self.path}: inputs {self.session.inputs} are not a MeshGraphNet's "
                "(node_features, edge_features, edge_index[, incoming_edges])"
            )
        if len(self.session.outputs) != 1:
            raise SciquantError(f"{self.path}: expected one output, got {self.session.outputs}")
        self.timings: list[dict[str, float]] = []
        self._static: dict[str, tuple[Tensor, int, Tensor]] = {}
        self._table: tuple[Tensor, int, int, Tensor] | None = None

    @classmethod
    def from_onnx(
        cls,
        onnx_path: str | Path,
        *,
        precision: Precision,
        num_nodes: int,
        num_edges: int,
        max_in_degree: int,
        cache_dir: str | Path | None = None,
        keep_on_device: bool = False,
    ) -> TrtStep:
        """Rewrite (`rewrite_scatter_add`), build or reuse the engine, and load it.

        num_nodes, num_edges, max_in_degree: the largest graph it will run (the batched test
        graph; `graph_dims`). The rewritten ONNX is cached beside the engines.
        """
        _require()
        source = Path(onnx_path)
        if not source.is_file():
            raise SciquantError(f"ONNX model {source} does not exist; export it first")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        rewritten = _cache_dir(cache_dir) / "onnx" / f"{digest}.onnx"
        if not rewritten.is_file():
            rewrite_scatter_add(source, rewritten)
        import onnx

        graph = onnx.load(str(rewritten), load_external_data=False).graph
        widths = {
            value.name: value.type.tensor_type.shape.dim[1].dim_value for value in graph.input
        }
        profile = graph_profile(
            num_nodes,
            num_edges,
            max_in_degree,
            node_features=widths["node_features"],
            edge_features=widths["edge_features"],
        )
        if INCOMING_EDGES not in widths:
            del profile[INCOMING_EDGES]
        engine = build_engine(rewritten, precision=precision, profile=profile, cache_dir=cache_dir)
        return cls(engine, keep_on_device=keep_on_device)

    def __call__(self, node_features: Tensor, edge_features: Tensor, edge_index: Tensor) -> Tensor:
        feeds = {
            "node_features": node_features,
            "edge_features": edge_features,
            "edge_index": edge_index,
        }
        if INCOMING_EDGES in self.session.inputs:
            feeds[INCOMING_EDGES] = self._incoming(edge_index, int(node_features.shape[0]))
        outputs, timing = self.session.run(feeds, self._to_device, self.keep_on_device)
        self.timings.append(timing)
        return outputs[self.session.outputs[0]]

    def timing_summary(self) -> dict[str, float]:
        """Median and interquartile range (ms) of each timing over the recorded calls."""
        return timing_summary(self.timings)

    def _incoming(self, edge_index: Tensor, num_nodes: int) -> Tensor:
        cached = self._table
        if (
            cached is not None
            and cached[0] is edge_index
            and cached[1] == edge_index._version
            and cached[2] == num_nodes
        ):
            return cached[3]
        table = incoming_edges(edge_index, num_nodes)
        self._table = (edge_index, edge_index._version, num_nodes, table)
        return table

    def _to_device(self, name: str, tensor: Tensor) -> Tensor:
        static = name in self.STATIC
        if static:
            cached = self._static.get(name)
            if cached is not None and cached[0] is tensor and cached[1] == tensor._version:
                return cached[2]
        dtype, device = self.session.dtypes[name], self.session.device
        if tensor.device == device:
            uploaded = tensor.to(dtype).contiguous()  # already there: no transfer
        else:
            uploaded = _host_cast(tensor, dtype).to(device, non_blocking=True)
        if static:
            self._static[name] = (tensor, tensor._version, uploaded)
        return uploaded


def graph_dims(edge_index: Tensor, num_nodes: int) -> dict[str, int]:
    """{"num_nodes", "num_edges", "max_in_degree"} of a graph, for `TrtStep.from_onnx`."""
    return {
        "num_nodes": int(num_nodes),
        "num_edges": int(edge_index.shape[1]),
        "max_in_degree": int(incoming_edges(edge_index, num_nodes).shape[1]),
    }


# -- classifiers -------------------------------------------------------------------------------


class TrtRunner:
    """A classifier ONNX (e.g. the ICNNMD CNN) on TensorRT; the Keras/LiteRT runner interface.

    The input's first dimension is the batch: dynamic in the ONNX gives a profile of 1 to
    `batch_size`, static runs that batch only. Other input dimensions must be static.
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        precision: Precision = "fp16",
        batch_size: int = 256,
        cache_dir: str | Path | None = None,
        device: int | None = None,
    ) -> None:
        _require()
        import onnx

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise SciquantError(f"ONNX model {self.path} does not exist; export it first")
        graph = onnx.load(str(self.path), load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        inputs = [value for value in graph.input if value.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise SciquantError(f"{self.path}: a classifier has one input and one output")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in _dims(inputs[0])]
        if not dims or any(d < 1 for d in dims[1:]):
            raise SciquantError(
                f"{self.path}: input dims {dims} must be static except the batch (first) dim"
            )
        self.input_name = inputs[0].name
        rest = tuple(dims[1:])
        if dims[0] < 1:
            self.max_batch = batch_size
            profile = {self.input_name: ((1, *rest), (batch_size, *rest), (batch_size, *rest))}
        else:
            self.max_batch = dims[0]
            profile = {self.input_name: ((dims[0], *rest),) * 3}
        self.fixed_batch = dims[0] if dims[0] >= 1 else None
        self._input_shape = rest
        self.precision = precision
        engine = build_engine(self.path, precision=precision, profile=profile, cache_dir=cache_dir)
        self.session = _Session(engine, device)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def _to_device(self, name: str, tensor: Tensor) -> Tensor:
        return _host_cast(tensor, self.session.dtypes[name]).to(
            self.session.device, non_blocking=True
        )

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        count = len(batch)
        if self.fixed_batch is not None and count != self.fixed_batch:
            padded = np.zeros((self.fixed_batch, *batch.shape[1:]), dtype=batch.dtype)
            padded[:count] = batch
            batch = padded
        feeds = {self.input_name: torch.from_numpy(np.ascontiguousarray(batch))}
        outputs, timing = self.session.run(feeds, self._to_device, keep_on_device=False)
        output = outputs[self.session.outputs[0]].float().numpy()
        return output[:count], timing

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, n_classes) float32, computed up to `batch_size` at a time."""
        x = np.asarray(x, dtype=np.float32)
        step = max(1, min(batch_size, self.max_batch))
        outputs = [self._run(x[i : i + step])[0] for i in range(0, len(x), step)]
        if not outputs:
            raise SciquantError("no frames to classify; the test split is empty")
        return np.concatenate(outputs)

    def time_batch1(self, x: np.ndarray, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
        """Batch-1 latency over `repeats` single frames (cycling through `x`) after `warmup`.

        Medians in ms: h2d_ms (host frame -> device, CUDA events), compute_ms (the engine),
        d2h_ms (result -> pinned host buffer), total_ms (wall clock of the whole call, with the
        synchronization), total_ms_min / total_ms_max, repeats.
        """

        def time_one(frame: np.ndarray) -> dict[str, float]:
            _, timing = self._run(frame)
            return {f"{key}_ms": timing[key] for key in ("h2d", "compute", "d2h")}

        return batch1_latency(time_one, np.asarray(x, dtype=np.float32), repeats, warmup)


def _dims(value: Any) -> list[Any]:
    return list(value.type.tensor_type.shape.dim)
