"""The OpenVINO runner (sciquant.runtime.openvino) against the models it deploys: FP32 against
eager torch, INT8 (our QDQ graph) against the fake-quant model it was exported from, BF16
against FP32, and which precision OpenVINO's layers really run in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sciquant.benchmarks.rollout import _int8_agreement, _one_output_step
from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.export import export_fp32_onnx, export_qdq_onnx
from sciquant.quant.pytorch import calibrate, quantize_model
from sciquant.runtime.onnxruntime import cpu_has_vnni
from sciquant.runtime.openvino import OvStep, available, bf16_native, overflow_risk

pytestmark = pytest.mark.skipif(not available()[0], reason=available()[1])
CONFIG = MeshGraphNetConfig(hidden=32, processor_size=2)


def shapes_of(inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, ...]]:
    names = ("node_features", "edge_features", "edge_index")
    return {name: tuple(value.shape) for name, value in zip(names, inputs, strict=True)}


@pytest.fixture(scope="module")
def model() -> MeshGraphNet:
    torch.manual_seed(0)
    return MeshGraphNet(CONFIG).eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    return random_tree_graph(300, 7, CONFIG.node_features, CONFIG.edge_features)


@pytest.fixture(scope="module")
def fp32_onnx(model: MeshGraphNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ov") / "fp32.onnx"
    export_fp32_onnx(model, path)
    return path


@pytest.mark.parametrize("static", [False, True])
def test_fp32_matches_eager_torch(model, inputs, fp32_onnx, static: bool) -> None:  # noqa: ANN001
    step = OvStep(fp32_onnx, "fp32", shapes=shapes_of(inputs) if static else None)
    with torch.inference_mode():
        reference = model(*inputs)
    output = step(*inputs)
    assert output.shape == reference.shape
    assert float((output - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert step.timings and step.timings[-1]["compute"] > 0


@pytest.mark.parametrize("target", ["openvino-cpu", "openvino-avx2"])
def test_int8_runs_integer_kernels_and_agrees_with_its_fake_quant_model(
    model,
    inputs,
    tmp_path: Path,
    target: str,  # noqa: ANN001
) -> None:
    """openvino-avx2's 7-bit weights agree on every CPU; openvino-cpu's full-range ones where
    the CPU has VNNI, and on a CPU without it the risk is named and the outputs do differ."""
    calibration = [random_tree_graph(200, 100 + i, CONFIG.node_features, CONFIG.edge_features)
                   for i in range(3)]  # fmt: skip
    qmodel = calibrate(quantize_model(model, target, "w8a8"), calibration)
    weights = [layer.weight_spec for layer in qmodel.quant_linears().values()]
    assert {(spec.qmin, spec.qmax) for spec in weights} == (
        {(-63, 63)} if target == "openvino-avx2" else {(-127, 127)}
    )
    path = tmp_path / "w8a8.onnx"
    export_qdq_onnx(qmodel, path, random_tree_graph(64, 0, CONFIG.node_features,
                                                    CONFIG.edge_features))  # fmt: skip
    step = OvStep(path, "w8a8", shapes=shapes_of(inputs))
    kernels = step.kernels()
    integer = {k: n for k, n in kernels.items() if k.startswith("FullyConnected/")}
    assert integer and all(k.endswith(("/u8", "/i8")) for k in integer), kernels
    assert sum(integer.values()) == len(qmodel.quant_linears())
    # The risk follows the weights and the CPU alone, whichever CPU runs this.
    assert (overflow_risk(path, vnni=False) is None) == (target == "openvino-avx2")
    assert overflow_risk(path, vnni=True) is None
    # uint8 weights (zero point 128): OpenVINO multiplies them in FP32, no int8 GEMM to saturate
    unsigned = tmp_path / "w8a8-uint8.onnx"
    export_qdq_onnx(qmodel, unsigned, random_tree_graph(64, 0, CONFIG.node_features,
                                                        CONFIG.edge_features),
                    weight_dtype="uint8")  # fmt: skip
    assert overflow_risk(unsigned, vnni=False) is None
    exposed = target == "openvino-cpu" and not cpu_has_vnni()
    assert (step.overflow_risk is not None) == exposed
    with torch.inference_mode():
        reference = qmodel(*inputs)
    agreement = _int8_agreement((step(*inputs) - reference).abs() / _one_output_step(qmodel))
    if exposed:  # saturated pair sums: the runtime computes something else
        assert agreement["max_error_steps"] > 1.5, agreement
        return
    assert agreement["median_error_steps"] <= 1e-3, agreement
    assert agreement["frac_within_step"] >= 0.99, agreement


@pytest.mark.skipif(not bf16_native(), reason="no amx_bf16 / avx512_bf16 on this CPU")
def test_bf16_runs_in_bf16_and_stays_close_to_fp32(model, inputs, fp32_onnx) -> None:  # noqa: ANN001
    step = OvStep(fp32_onnx, "bf16", shapes=shapes_of(inputs))
    assert step.execution_precision == "bf16"
    assert any(k.startswith("FullyConnected/") and k.endswith("bf16") for k in step.kernels())
    with torch.inference_mode():
        reference = model(*inputs)
    relative = float((step(*inputs) - reference).norm() / reference.norm())
    # bfloat16 keeps 8 significant bits: a real bf16 run differs from FP32 (> 1e-4), but by
    # far less than a broken one would (< 3e-2).
    assert 1e-4 < relative < 3e-2


@pytest.mark.skipif(bf16_native(), reason="this CPU runs bf16 natively")
def test_bf16_without_a_bf16_unit_is_refused(fp32_onnx) -> None:  # noqa: ANN001
    with pytest.raises(SciquantError, match="not native"):
        OvStep(fp32_onnx, "bf16")


def test_unknown_precision_and_missing_file(fp32_onnx, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(SciquantError, match="fp16"):
        OvStep(fp32_onnx, "fp16")
    with pytest.raises(SciquantError, match="not found"):
        OvStep(tmp_path / "missing.onnx")


def test_graph_inputs_bound_once_and_rebound_when_they_change(model, fp32_onnx) -> None:  # noqa: ANN001
    """The edge inputs are bound once per rollout; a modified or another graph is bound anew,
    so every call's output is that of its own inputs."""
    step = OvStep(fp32_onnx, "fp32")
    x, e, edge_index = random_tree_graph(120, 3, CONFIG.node_features, CONFIG.edge_features)
    with torch.inference_mode():
        first = step(x, e, edge_index)
        bound = step._bound[2][2]
        again = step(x + 0.5, e, edge_index)  # new node features, same graph
        assert step._bound[2][2] is bound  # the edge index was not bound again
        assert torch.allclose(again, model(x + 0.5, e, edge_index), atol=1e-4)
        e.mul_(2.0)  # modified in place: a new version, bound again
        changed = step(x, e, edge_index)
        assert torch.allclose(changed, model(x, e, edge_index), atol=1e-4)
        assert not torch.allclose(changed, first, atol=1e-4)
        other = random_tree_graph(90, 4, CONFIG.node_features, CONFIG.edge_features)
        assert torch.allclose(step(*other), model(*other), atol=1e-4)  # another graph's size


def test_float_graphs_compile_without_snippets(fp32_onnx, inputs) -> None:  # noqa: ANN001
    """FP32 (and BF16) run without the plugin's snippets, measured faster with equal outputs;
    the QDQ graph keeps them (its FakeQuantize fusions need them)."""
    import openvino as ov

    shapes = shapes_of(inputs)
    kernels = OvStep(fp32_onnx, "fp32", shapes=shapes).kernels()
    assert not any(key.startswith("Subgraph/") for key in kernels), kernels
    # the same graph compiled with the plugin's defaults fuses element-wise ops into snippets
    core = ov.Core()
    graph = core.read_model(str(fp32_onnx))
    graph.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
    default = core.compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": 1})
    layer_types = {
        op.get_rt_info()["layerType"].astype(str)
        for op in default.get_runtime_model().get_ordered_ops()
    }
    assert "Subgraph" in layer_types
