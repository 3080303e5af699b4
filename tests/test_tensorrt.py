"""The TensorRT backend (sciquant.runtime.tensorrt).

Runs everywhere: engine cache keys, the Volta version gate, `available()`, the QDQ check, the
incoming-edge table and the ScatterND(add) -> Gather + ReduceSum rewrite (checked with ONNX
Runtime on the CPU). Tests marked `gpu` build real engines and are skipped without TensorRT/CUDA.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sciquant.errors import SciquantError
from sciquant.runtime.tensorrt import (
    INCOMING_EDGES,
    TrtRunner,
    TrtStep,
    available,
    build_engine,
    check_qdq_for_tensorrt,
    check_version,
    engine_cache_key,
    graph_profile,
    incoming_edges,
    rewrite_scatter_add,
)

TRT_OK, TRT_REASON = available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and CUDA: {TRT_REASON}")

PROFILE = {"node_features": ((2, 18), (500, 18), (1000, 18))}
KEY_ARGS = {"precision": "fp16", "gpu_name": "NVIDIA GeForce RTX 3090", "trt_version": "10.13.0"}


# -- engine cache keys -------------------------------------------------------------------------


@pytest.fixture
def onnx_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not parsed, only hashed" * 100)
    return path


def test_cache_key_is_stable_for_the_same_inputs(onnx_bytes, tmp_path):
    key = engine_cache_key(onnx_bytes, profile=PROFILE, **KEY_ARGS)
    assert key == engine_cache_key(onnx_bytes, profile=PROFILE, **KEY_ARGS)
    assert len(key) == 64 and int(key, 16) >= 0  # sha256 hex
    copy = tmp_path / "elsewhere.onnx"  # the name and place of the file do not matter
    copy.write_bytes(onnx_bytes.read_bytes())
    assert engine_cache_key(copy, profile=PROFILE, **KEY_ARGS) == key
    # the profile's shapes count, not the container types or the order of the inputs
    two = {"b": ([1, 2], [3, 2], [4, 2]), **PROFILE}
    reordered = {**PROFILE, "b": ((1, 2), (3, 2), (4, 2))}
    assert engine_cache_key(onnx_bytes, profile=two, **KEY_ARGS) == engine_cache_key(
        onnx_bytes, profile=reordered, **KEY_ARGS
    )


@pytest.mark.parametrize(
    "change",
    [
        {"precision": "int8"},
        {"precision": "fp32"},
        {"gpu_name": "Tesla V100-SXM2-32GB"},
        {"trt_version": "10.4.0"},
        {"profile": {"node_features": ((2, 18), (500, 18), (2000, 18))}},
        {"extra": {"optimization_level": 5}},
    ],
)
def test_cache_key_changes_with_every_build_input(onnx_bytes, change):
    base = engine_cache_key(onnx_bytes, profile=PROFILE, **KEY_ARGS)
    arguments = {"profile": PROFILE, **KEY_ARGS, **change}
    assert engine_cache_key(onnx_bytes, **arguments) != base


def test_cache_key_changes_with_the_onnx_bytes(onnx_bytes):
    base = engine_cache_key(onnx_bytes, profile=PROFILE, **KEY_ARGS)
    onnx_bytes.write_bytes(onnx_bytes.read_bytes() + b"\0")
    assert engine_cache_key(onnx_bytes, profile=PROFILE, **KEY_ARGS) != base


def test_cache_key_rejects_bad_arguments(onnx_bytes, tmp_path):
    with pytest.raises(SciquantError, match="precision must be one of"):
        engine_cache_key(onnx_bytes, profile=PROFILE, **{**KEY_ARGS, "precision": "int4"})
    with pytest.raises(SciquantError, match="min <= opt <= max"):
        engine_cache_key(onnx_bytes, profile={"x": ((4,), (2,), (8,))}, **KEY_ARGS)
    with pytest.raises(SciquantError, match="does not exist"):
        engine_cache_key(tmp_path / "missing.onnx", profile=PROFILE, **KEY_ARGS)


def test_graph_profile_covers_the_batched_test_graph():
    profile = graph_profile(1200, 3100, 6)
    assert profile["node_features"] == ((2, 53), (1200, 53), (1200, 53))
    assert profile["edge_index"] == ((2, 2), (2, 3100), (2, 3100))
    assert profile[INCOMING_EDGES] == ((2, 1), (1200, 6), (1200, 6))


# -- version gate and availability -------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.5.0", "10.13.0.35", "11.4.0"])
@pytest.mark.parametrize("capability", [(7, 0), (7, 2)])
def test_volta_refuses_tensorrt_10_5_and_later(capability, version):
    with pytest.raises(SciquantError) as error:
        check_version(capability, version)
    message = str(error.value)
    assert "dropped in TensorRT 10.5" in message and "envs/tensorrt-volta.yaml" in message


@pytest.mark.parametrize(
    ("capability", "version"),
    [((7, 0), "10.4.0.26"), ((7, 0), "10.0.1"), ((8, 6), "10.13.0.35"), ((7, 5), "10.13.0")],
)
def test_supported_combinations_pass(capability, version):
    assert check_version(capability, version) is None


def test_tensorrt_before_10_is_refused():
    with pytest.raises(SciquantError, match="older than 10.0"):
        check_version((8, 6), "8.6.1")


@pytest.mark.skipif(TRT_OK, reason="TensorRT and CUDA are present on this node")
def test_unavailable_here_with_a_reason(tmp_path):
    ok, reason = available()
    assert ok is False and reason
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt" in reason
    elif not torch.cuda.is_available():
        assert "CUDA" in reason
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    message = "TensorRT is not available on this node: .*run this stage on a GPU node"
    with pytest.raises(SciquantError, match=message):
        build_engine(path, precision="fp16", profile=PROFILE)
    with pytest.raises(SciquantError, match=message):
        TrtStep(tmp_path / "model.engine")
    with pytest.raises(SciquantError, match=message):
        TrtRunner(path)


# -- the incoming-edge table and the ScatterND rewrite -----------------------------------------


def test_incoming_edges_sum_equals_index_add():
    edge_index = torch.tensor([[0, 1, 2, 3, 0, 3], [1, 2, 1, 1, 3, 0]])
    table = incoming_edges(edge_index, num_nodes=5)
    assert table.dtype == torch.int32 and table.shape == (5, 3)  # node 1 has 3 incoming edges
    assert table[1].tolist() == [0, 2, 3]  # ascending edge ids
    assert table[4].tolist() == [6, 6, 6]  # no incoming edge: all padding (E)
    values = torch.randn(6, 4, dtype=torch.float64)
    padded = torch.cat([values, torch.zeros(1, 4, dtype=torch.float64)])
    expected = torch.zeros(5, 4, dtype=torch.float64).index_add_(0, edge_index[1], values)
    torch.testing.assert_close(padded[table.long()].sum(dim=1), expected)


def test_incoming_edges_rejects_out_of_range_nodes():
    with pytest.raises(SciquantError, match="outside"):
        incoming_edges(torch.tensor([[0, 1], [1, 7]]), num_nodes=3)


def _aggregating_model(path, zero_data: bool = True, row: int = 1):
    """A tiny MeshGraphNet-like ONNX: delta = scatter-add of Linear(edge features) to
    edge_index[row], onto zeros (zero_data) or onto Linear(node features)."""
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("we", TensorProto.FLOAT, [9, 2], rng.normal(size=18).tolist()),
        helper.make_tensor("wn", TensorProto.FLOAT, [18, 2], rng.normal(size=36).tolist()),
        helper.make_tensor("row", TensorProto.INT64, [], [row]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("first", TensorProto.INT64, [1], [0]),
        helper.make_tensor("second", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
    ]
    nodes = [
        helper.make_node("MatMul", ["edge_features", "we"], ["updates"]),
        helper.make_node("MatMul", ["node_features", "wn"], ["projected"]),
        helper.make_node("Gather", ["edge_index", "row"], ["dst"], axis=0),
        helper.make_node("Unsqueeze", ["dst", "axis"], ["indices"]),
        helper.make_node("Shape", ["node_features"], ["node_shape"]),
        helper.make_node("Slice", ["node_shape", "first", "second"], ["count"]),
        helper.make_node("Concat", ["count", "two"], ["delta_shape"], axis=0),
        helper.make_node("Expand", ["zero", "delta_shape"], ["zeros"]),
        helper.make_node(
            "ScatterND",
            ["zeros" if zero_data else "projected", "indices", "updates"],
            ["scattered"],
            reduction="add",
        ),
        helper.make_node("Relu", ["scattered"], ["delta"]),
    ]
    graph = helper.make_graph(
        nodes,
        "aggregate",
        [
            helper.make_tensor_value_info("node_features", TensorProto.FLOAT, ["num_nodes", 18]),
            helper.make_tensor_value_info("edge_features", TensorProto.FLOAT, ["num_edges", 9]),
            helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "num_edges"]),
        ],
        [helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["num_nodes", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("zero_data", [True, False])
def test_rewrite_gives_the_same_outputs_in_onnx_runtime(tmp_path, zero_data):
    source = _aggregating_model(tmp_path / "scatter.onnx", zero_data)
    target = rewrite_scatter_add(source, tmp_path / "gather.onnx")  # verify=True checks too
    proto = onnx.load(str(target))
    ops = [node.op_type for node in proto.graph.node]
    assert "ScatterND" not in ops and {"Gather", "ReduceSum", "ConstantOfShape"} <= set(ops)
    assert ("Add" in ops) is not zero_data  # zeros need no Add
    inputs = {value.name: value.type.tensor_type.elem_type for value in proto.graph.input}
    assert inputs["edge_index"] == TensorProto.INT32 and inputs[INCOMING_EDGES] == TensorProto.INT32

    generator = torch.Generator().manual_seed(3)
    n = 50
    child = torch.arange(1, n)
    parent = (torch.rand(n - 1, generator=generator) * child).long()
    edge_index = torch.stack([torch.cat([parent, child]), torch.cat([child, parent])])
    x = torch.randn(n, 18, generator=generator).numpy()
    e = torch.randn(edge_index.shape[1], 9, generator=generator).numpy()
    before = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (expected,) = before.run(
        None, {"node_features": x, "edge_features": e, "edge_index": edge_index.numpy()}
    )
    (actual,) = after.run(
        None,
        {
            "node_features": x,
            "edge_features": e,
            "edge_index": edge_index.numpy().astype(np.int32),
            INCOMING_EDGES: incoming_edges(edge_index, n).numpy(),
        },
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_rewrite_refuses_a_scatter_that_is_not_the_sum_over_incoming_edges(tmp_path):
    source = _aggregating_model(tmp_path / "scatter.onnx", row=0)  # to the sources
    with pytest.raises(SciquantError, match="does not scatter to edge_index"):
        rewrite_scatter_add(source, tmp_path / "gather.onnx")
    assert not (tmp_path / "gather.onnx").exists()


# -- the QDQ check -----------------------------------------------------------------------------


def _qdq_model(path, zero_point_dtype: int, zero_point: int):
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("zero_point", zero_point_dtype, [], [zero_point]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], name="q0"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], name="dq0"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        inits,
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        str(path),
    )
    return path


def test_qdq_check_accepts_symmetric_int8_and_refuses_uint8(tmp_path):
    assert check_qdq_for_tensorrt(_qdq_model(tmp_path / "int8.onnx", TensorProto.INT8, 0)) == 1
    with pytest.raises(SciquantError, match="trt-rtx3090 or trt-v100"):
        check_qdq_for_tensorrt(_qdq_model(tmp_path / "uint8.onnx", TensorProto.UINT8, 128))
    with pytest.raises(SciquantError, match="zero point 0"):
        check_qdq_for_tensorrt(_qdq_model(tmp_path / "asym.onnx", TensorProto.INT8, 3))


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mgn(tmp_path_factory):
    """A small MeshGraphNet, its FP32 export, and a trt-rtx3090 W8A8 QDQ export."""
    from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, export_onnx
    from sciquant.models.meshgraphnet import random_tree_graph as tree
    from sciquant.quant.export import export_qdq_onnx
    from sciquant.quant.pytorch import calibrate, quantize_model

    folder = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    model = MeshGraphNet(MeshGraphNetConfig(hidden=32, processor_size=2)).eval()
    fp32 = export_onnx(model, folder / "fp32.onnx")
    qmodel = calibrate(
        quantize_model(model, "trt-rtx3090", "w8a8"), [tree(200, s) for s in range(4)]
    )
    int8 = export_qdq_onnx(qmodel, folder / "int8.onnx", tree(64, 0), weight_dtype="int8")
    return model, qmodel, fp32, int8, folder


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 1e-2)])
def test_trt_step_matches_torch(tiny_mgn, precision, tolerance):
    from sciquant.models.meshgraphnet import random_tree_graph

    model, _, fp32, _, folder = tiny_mgn
    graph = random_tree_graph(300, 9)
    step = TrtStep.from_onnx(
        fp32,
        precision=precision,
        num_nodes=400,
        num_edges=800,
        max_in_degree=32,
        cache_dir=folder / "cache",
    )
    with torch.inference_mode():
        expected = model(*graph)
    actual = step(*graph)
    assert actual.device.type == "cpu" and actual.shape == expected.shape
    assert _relative_error(actual.float(), expected) <= tolerance
    step(*graph)
    summary = step.timing_summary()
    assert summary["calls"] == 2 and summary["compute_median"] > 0 and summary["d2h_median"] > 0
    # kept on the device: the same numbers, a CUDA tensor, no download
    resident = TrtStep(step.path, keep_on_device=True)
    on_gpu = resident(*(t.cuda() for t in graph))
    assert on_gpu.is_cuda and resident.timings[-1]["d2h"] == 0.0
    torch.testing.assert_close(on_gpu.cpu(), actual)


@pytest.mark.gpu
@needs_trt
def test_trt_int8_agrees_with_the_fake_quant_model(tiny_mgn):
    """TensorRT's INT8 engine vs the simulation it was exported from, in output steps.

    With the FP16 flag the non-quantized layers (LayerNorm, adds) run in half precision, so
    more activation codes flip than on ONNX Runtime; 99 % of outputs within one step of the
    last layer's output is the bound (as in `sciquant.benchmarks.rollout._int8_agreement`).
    """
    from sciquant.benchmarks.rollout import _int8_agreement, _one_output_step
    from sciquant.models.meshgraphnet import random_tree_graph

    _, qmodel, _, int8, folder = tiny_mgn
    graph = random_tree_graph(300, 9)
    step = TrtStep.from_onnx(
        int8,
        precision="int8",
        num_nodes=400,
        num_edges=800,
        max_in_degree=32,
        cache_dir=folder / "cache",
    )
    with torch.inference_mode():
        simulated = qmodel(*graph)
        one_step = _one_output_step(qmodel)
    steps = (step(*graph).float() - simulated).abs() / one_step
    assert _int8_agreement(steps)["frac_within_step"] >= 0.99


@pytest.mark.gpu
@needs_trt
def test_engines_are_cached(tiny_mgn):
    _, _, fp32, _, folder = tiny_mgn
    target = rewrite_scatter_add(fp32, folder / "rewritten.onnx")
    profile = graph_profile(100, 200, 8)
    first = build_engine(target, precision="fp16", profile=profile, cache_dir=folder / "c2")
    stamp = first.stat().st_mtime_ns
    again = build_engine(target, precision="fp16", profile=profile, cache_dir=folder / "c2")
    assert again == first and again.stat().st_mtime_ns == stamp


@pytest.mark.gpu
@needs_trt
def test_trt_runner_classifies_and_times(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.dense = torch.nn.Linear(4 * 8 * 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # NHWC, as Keras exports it
            y = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
            return torch.softmax(self.dense(y.flatten(1)), dim=1)

    path = tmp_path / "cnn.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        Tiny().eval(),
        (torch.rand(4, 8, 8, 3),),
        str(path),
        input_names=["x"],
        output_names=["probabilities"],
        dynamo=True,
        dynamic_shapes=({0: batch},),
    )
    runner = TrtRunner(path, precision="fp16", batch_size=16, cache_dir=tmp_path / "cache")
    frames = np.random.default_rng(0).random((40, 8, 8, 3), dtype=np.float32)
    probabilities = runner.predict(frames, batch_size=16)
    assert probabilities.shape == (40, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-2)
    timing = runner.time_batch1(frames, repeats=5, warmup=2)
    assert {"h2d_ms", "compute_ms", "d2h_ms", "total_ms", "total_ms_min", "total_ms_max"} <= set(
        timing
    )
    assert timing["total_ms_min"] <= timing["total_ms"] <= timing["total_ms_max"]
