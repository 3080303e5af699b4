"""PyTorch fake-quant (sciquant.quant.pytorch), its ONNX QDQ export and the ONNX Runtime step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.export import export_qdq_onnx, weight_initializers
from sciquant.quant.pytorch import (
    QuantLinear,
    calibrate,
    enable_lsq,
    fake_quantize_affine,
    layer_names,
    lsq_parameters,
    quantize_model,
)
from sciquant.quant.spec import (
    PerChannel,
    PerTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    quantize,
)
from sciquant.quant.targets import get_target
from sciquant.runtime.onnxruntime import (
    OrtStep,
    has_reducing_scatter,
    integer_kernels,
    kernel_summary,
)

SMALL = MeshGraphNetConfig(hidden=16, processor_size=2)


def _small_model(seed: int = 0) -> MeshGraphNet:
    torch.manual_seed(seed)
    return MeshGraphNet(SMALL).eval()


def _calibration_graphs() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [random_tree_graph(120, seed) for seed in range(4)]


def _calibrated_layer(target: str, precision: str = "w8a8", seed: int = 0) -> QuantLinear:
    """A QuantLinear [24 -> 12] calibrated with min/max on shifted normal inputs."""
    torch.manual_seed(seed)
    plan = get_target(target)
    weight_bits, activation_bits = int(precision[1]), int(precision[3])
    layer = QuantLinear(
        nn.Linear(24, 12),
        plan.weight_spec(weight_bits, channel_axis=0),
        plan.activation_spec(activation_bits),
    )
    layer(torch.randn(500, 24) * 2 + 0.5)
    layer.freeze()
    return layer


# -- QuantLinear against the NumPy reference ---------------------------------------------------


def _assert_on_reference_grid(fake: np.ndarray, x: np.ndarray, scale, zero_point, spec) -> None:
    """`fake` (float32, from torch) equals the float64 NumPy reference up to rounding ties.

    torch rounds x · fl(1/s) in float32, a relative error of at most ~2u (u = 2^-24) on x / s;
    only where x / s lies within 3u·|x / s| of a tie may its code differ, and then by one.
    """
    axis = None if isinstance(spec.granularity, PerTensor) else spec.granularity.axis
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    scale64 = np.asarray(scale, dtype=np.float64)
    codes_ref = quantize(x.astype(np.float64), scale64, zero_point, spec)
    # the integers torch used, read back exactly from its float32 output
    codes = np.rint(fake.astype(np.float64) / scale64.reshape(shape)).astype(np.int64)
    codes += np.asarray(zero_point).reshape(shape)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    np.testing.assert_array_equal(fake, dequantize(codes, scale, zero_point, spec))
    ratio = x.astype(np.float64) / scale64.reshape(shape)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) <= 3 * 2.0**-24 * np.abs(ratio)
    assert np.all(np.abs(codes - codes_ref) <= near_tie.astype(np.int64))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8, symmetric=False, granularity=PerTensor()),
        QuantSpec(8, symmetric=True, granularity=PerTensor()),
        QuantSpec(4, symmetric=True, granularity=PerChannel(0)),
        QuantSpec(2, symmetric=False, granularity=PerChannel(0)),
    ],
)
def test_fake_quantize_without_autograd_is_bitwise_torchs_kernel(spec):
    """The element-wise path (no autograd) gives the same bits as torch's fused kernels, on
    random values, on exact rounding ties and beyond the clamp, for many scales."""
    generator = torch.Generator().manual_seed(5)
    channels = 7
    axis = None if isinstance(spec.granularity, PerTensor) else 0
    count = 1 if axis is None else channels
    for trial in range(20):
        scale = torch.exp(torch.randn(count, generator=generator) * 3).float()
        zero_point = torch.randint(spec.qmin, spec.qmax + 1, (count,), generator=generator)
        zero_point = (torch.zeros_like(zero_point) if spec.symmetric else zero_point).int()
        steps = torch.randint(
            -3 * 2**spec.bits, 3 * 2**spec.bits, (channels, 300), generator=generator
        )
        ties = (steps.float() + 0.5) * scale.reshape(-1, 1)  # x / s exactly k + 1/2 (mostly)
        noise = (
            torch.randn(channels, 300, generator=generator) * scale.reshape(-1, 1) * 2**spec.bits
        )
        x = torch.cat([ties, noise], dim=1)
        if axis is None:
            kernel = torch.fake_quantize_per_tensor_affine(
                x, scale[0], zero_point[0], spec.qmin, spec.qmax
            )
            fast = fake_quantize_affine(x, scale[0], zero_point[0], spec, None)
        else:
            kernel = torch.fake_quantize_per_channel_affine(
                x, scale, zero_point, 0, spec.qmin, spec.qmax
            )
            fast = fake_quantize_affine(x, scale, zero_point, spec, 0)
        assert torch.equal(fast, kernel), trial
    # under autograd with a tensor that needs a gradient: torch's kernel and its STE gradient
    x = torch.randn(50, requires_grad=True)
    scale, zero_point = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    out = fake_quantize_affine(x, scale, zero_point, QuantSpec(8, True, PerTensor()), None)
    out.sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() < 12.75).float())


@pytest.mark.parametrize(
    ("target", "precision"),
    [("cpu-x86", "w8a8"), ("reference", "w4a8"), ("trt-v100", "w8a8"), ("npu-pow2", "w8a8")],
)
def test_quant_linear_equals_numpy_reference(target, precision):
    layer = _calibrated_layer(target, precision)
    torch.manual_seed(1)
    x = torch.randn(4000, 24) * 2.5 + 0.5  # wider than calibration: clipping is exercised
    input_scale, input_zero_point = (t.numpy() for t in layer.input_qparams())
    weight_scale, weight_zero_point = (t.numpy() for t in layer.weight_qparams())
    if layer.weight_spec.scale_kind == "pow2":
        for scale in (input_scale, weight_scale):
            assert np.all(np.exp2(np.round(np.log2(scale))) == scale)
    with torch.no_grad():
        x_hat = layer.fake_quantize_input(x).numpy()
        w_hat = layer.fake_quantize_weight().numpy()
        y = layer(x).numpy()
    w = layer.weight.detach().numpy()
    _assert_on_reference_grid(
        x_hat, x.numpy(), input_scale, input_zero_point, layer.activation_spec
    )
    _assert_on_reference_grid(w_hat, w, weight_scale, weight_zero_point, layer.weight_spec)
    # the layer is F.linear of the two: compare with float64 math on the reference values
    ref_x = fake_quantize(
        x.numpy().astype(np.float64), input_scale, input_zero_point, layer.activation_spec
    )
    ref_w = fake_quantize(w.astype(np.float64), weight_scale, weight_zero_point, layer.weight_spec)
    expected = ref_x @ ref_w.T + layer.bias.detach().numpy().astype(np.float64)
    flipped = np.any(np.abs(x_hat - ref_x) > 0.5 * float(input_scale), axis=1)
    assert flipped.sum() <= 2  # ties are rare; rows with one are off by a step, skip them
    np.testing.assert_allclose(y[~flipped], expected[~flipped], rtol=1e-5, atol=1e-5)


def test_minmax_calibration_gives_the_expected_qparams():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.5, -1.27, 0.1], [2.54, 0.0, -0.3]]))
    inputs = [torch.tensor([[-1.0, 0.0, 2.0]]), torch.tensor([[3.0, 0.5, -0.25]])]
    cpu = get_target("cpu-x86")
    layer = QuantLinear(linear, cpu.weight_spec(8), cpu.activation_spec(8))
    for x in inputs:
        layer(x)
    layer.freeze()
    # uint8 asymmetric over [-1, 3]: scale 4/255, zero point round(0 - (-1)/scale) = round(63.75)
    assert layer.input_scale.item() == pytest.approx(4.0 / 255.0, rel=1e-6)
    assert layer.input_zero_point.item() == 64
    # int8 symmetric per output channel: max|w| / 127
    np.testing.assert_allclose(layer.weight_scale.numpy(), [1.27 / 127, 2.54 / 127], rtol=1e-6)
    assert layer.weight_zero_point.tolist() == [0, 0]

    npu = get_target("npu-pow2")
    layer = QuantLinear(nn.Linear(3, 2), npu.weight_spec(8), npu.activation_spec(8))
    for x in inputs:
        layer(x)
    layer.freeze()
    # symmetric: 3 / 127 = 0.0236 -> nearest power of two by ratio, 2^round(-5.40) = 2^-5
    assert layer.input_scale.item() == 2.0**-5
    assert layer.input_zero_point.item() == 0


# -- whole models ------------------------------------------------------------------------------


def _relative_error(qmodel, model, graph) -> float:
    with torch.no_grad():
        reference = model(*graph)
        return float((qmodel(*graph) - reference).norm() / reference.norm())


def test_ptq_w8a8_is_close_to_fp32_and_w4a8_is_further():
    model = _small_model()
    graph = random_tree_graph(300, seed=99)
    errors = {}
    for precision in ("w8a8", "w4a8"):
        qmodel = calibrate(quantize_model(model, "cpu-x86", precision), _calibration_graphs())
        assert qmodel.quantized_layers() == layer_names(model)
        assert all(layer.mode == "quantize" for layer in qmodel.quant_linears().values())
        errors[precision] = _relative_error(qmodel, model, graph)
    assert errors["w8a8"] < 0.05
    assert errors["w4a8"] > 2 * errors["w8a8"]


def test_layer_subset_and_precision_overrides():
    model = _small_model()
    names = layer_names(model)
    assert len(names) == 3 * (2 + 2 * SMALL.processor_size + 1)
    one = names[5]
    qmodel = calibrate(
        quantize_model(model, "cpu-x86", "w8a8", layers={one}), _calibration_graphs()
    )
    assert qmodel.quantized_layers() == [one]
    assert type(qmodel.model.get_submodule(names[0])) is nn.Linear
    assert 0 < _relative_error(qmodel, model, random_tree_graph(100, seed=7)) < 0.05

    mixed = quantize_model(model, "cpu-x86", "w8a8", precisions={names[-1]: "w4a8"})
    last = mixed.quant_linears()[names[-1]]
    assert (last.weight_spec.bits, last.activation_spec.bits) == (4, 8)
    assert mixed.quant_linears()[names[0]].weight_spec.bits == 8
    with pytest.raises(SciquantError, match="unknown layer"):
        quantize_model(model, "cpu-x86", "w8a8", layers={"decoder.layers.9"})
    with pytest.raises(SciquantError, match="not a quantized layer"):
        quantize_model(model, "cpu-x86", "w8a8", layers={one}, precisions={names[0]: "w4a8"})


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_float_precisions_are_refused(precision):
    with pytest.raises(SciquantError, match="float format"):
        quantize_model(_small_model(), "trt-v100", precision)


def _calibrated_qparams(method: str, precision: str = "w4a4", **kwargs) -> list[np.ndarray]:
    qmodel = calibrate(
        quantize_model(_small_model(), "reference", precision, method, **kwargs),
        _calibration_graphs(),
    )
    return [
        t.detach().numpy().copy()
        for layer in qmodel.quant_linears().values()
        for t in (*layer.input_qparams(), *layer.weight_qparams())
    ]


@pytest.mark.parametrize("method", ["qat-lsq", "qat-ste"])
def test_qat_starts_from_mse_ranges_unless_told_minmax(method):
    """quantize.qat.init: QAT calibrates activations and weights as ptq-mse does by default and
    as ptq-minmax does with ``minmax``; the two starts differ at W4A4."""
    mse = _calibrated_qparams("ptq-mse")
    minmax = _calibrated_qparams("ptq-minmax", qat_init="mse")  # ignored by PTQ methods
    both_minmax = _calibrated_qparams("qat-lsq", qat_init="minmax")
    for got, want in zip(_calibrated_qparams(method), mse, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_calibrated_qparams(method, qat_init="mse"), mse, strict=True):
        np.testing.assert_array_equal(got, want)
    # ptq-minmax keeps min/max weights too; qat's minmax start is the same pair
    for got, want in zip(both_minmax, minmax, strict=True):
        np.testing.assert_array_equal(got, want)
    # MSE clips: smaller input scales than min/max on the first layer's 4-bit input
    assert float(mse[0]) < float(minmax[0])
    with pytest.raises(SciquantError, match="quantize.qat.init.*'percentile'"):
        quantize_model(_small_model(), "reference", "w4a4", "qat-lsq", qat_init="percentile")


def test_unknown_method_and_keras_only_target_are_refused():
    with pytest.raises(SciquantError, match="unknown quantization method"):
        quantize_model(_small_model(), "cpu-x86", "w8a8", "adaround")
    with pytest.raises(SciquantError, match="keras"):
        quantize_model(_small_model(), "litert-cpu", "w8a8")


def test_uncalibrated_model_cannot_fake_quantize_or_export(tmp_path):
    qmodel = quantize_model(_small_model(), "cpu-x86", "w8a8")
    with pytest.raises(SciquantError, match="before calibration"):
        enable_lsq(qmodel)
    with pytest.raises(SciquantError, match="not calibrated"):
        export_qdq_onnx(qmodel, tmp_path / "q.onnx", random_tree_graph(16, 0))


# -- QAT hooks and state -----------------------------------------------------------------------


def test_lsq_scales_require_grad_and_get_finite_gradients():
    model = _small_model()
    qmodel = enable_lsq(calibrate(quantize_model(model, "cpu-x86", "w8a8"), _calibration_graphs()))
    learnable = lsq_parameters(qmodel)
    layers = qmodel.quant_linears()
    # per layer: input scale, input zero point (uint8 asymmetric), weight scales (symmetric)
    assert len(learnable) == 3 * len(layers)
    assert all(parameter.requires_grad for parameter in learnable)
    graph = random_tree_graph(80, seed=5)
    with torch.no_grad():
        before = qmodel(*graph)
    qmodel.train()
    loss = qmodel(*graph).square().mean()
    loss.backward()
    for name, layer in layers.items():
        for grad in (layer.input_scale.grad, layer.weight_scale.grad):
            assert grad is not None and torch.all(torch.isfinite(grad)), name
        assert layer.weight_scale.grad.abs().sum() > 0, name
    # LSQ starts from the calibrated qparams: same forward as quantize mode
    with torch.no_grad():
        np.testing.assert_array_equal(before.numpy(), qmodel.eval()(*graph).numpy())


def test_lsq_is_refused_for_power_of_two_scales():
    qmodel = calibrate(quantize_model(_small_model(), "npu-pow2", "w8a8"), _calibration_graphs())
    with pytest.raises(SciquantError, match="power-of-two"):
        enable_lsq(qmodel)


@pytest.mark.parametrize("lsq", [False, True])
def test_state_dict_round_trip(tmp_path, lsq):
    model = _small_model()
    qmodel = calibrate(quantize_model(model, "cpu-x86", "w8a8"), _calibration_graphs())
    if lsq:
        enable_lsq(qmodel)
        with torch.no_grad():  # learned values that are not on the int32 grid any more
            for parameter in lsq_parameters(qmodel):
                parameter.mul_(1.01).add_(0.3)
    path = tmp_path / "qmodel.pt"
    torch.save(qmodel.state_dict(), path)
    fresh = quantize_model(model, "cpu-x86", "w8a8")
    fresh.load_state_dict(torch.load(path))
    graph = random_tree_graph(90, seed=3)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(*graph).numpy(), qmodel(*graph).numpy())
    assert {layer.mode for layer in fresh.quant_linears().values()} == {
        "lsq" if lsq else "quantize"
    }


# -- ONNX QDQ export and ONNX Runtime ----------------------------------------------------------


@pytest.fixture(scope="module")
def exported_w8a8(tmp_path_factory):
    """The calibrated cpu-x86 w8a8 small model and its QDQ export (default weight storage)."""
    qmodel = calibrate(quantize_model(_small_model(), "cpu-x86", "w8a8"), _calibration_graphs())
    path = tmp_path_factory.mktemp("onnx") / "w8a8.onnx"
    export_qdq_onnx(qmodel, path, random_tree_graph(64, seed=0))
    return qmodel, path


def test_ort_int8_agrees_with_the_simulation_within_one_output_step(exported_w8a8):
    """ORT's integer kernels vs the fake-quant simulation, on a graph it was not traced with.

    Both do the same integer arithmetic with the same qparams and weight integers; they differ
    only in float rounding (summation order, x/s vs x·(1/s)), whose only visible effect can be a
    flipped rounding of single activation codes. The bound, per output column j, is one step at
    the output: delta_j = s_in · sum_k |W_hat[j, k]| with s_in the input scale of the decoder's
    last Linear, the most output j moves when every input code of that layer moves by one.
    Observed on the development machine: max error 6e-8 against delta ≈ 1e-2.
    """
    qmodel, path = exported_w8a8
    graph = random_tree_graph(500, seed=123)
    step = OrtStep(path)
    ort_delta = step(*graph)
    with torch.no_grad():
        simulated = qmodel(*graph)
        last = qmodel.quant_linears()["decoder.layers.2"]
        input_scale, _ = last.input_qparams()
        one_step = input_scale * last.fake_quantize_weight().abs().sum(dim=1)
    error = (ort_delta - simulated).abs()
    assert ort_delta.shape == simulated.shape == (500, SMALL.outputs)
    assert torch.all(error <= one_step), (error.max(dim=0).values, one_step)
    # and not merely within a step: most outputs agree to float rounding
    assert error.median() <= 1e-3 * one_step.min()
    assert step.timings[-1]["compute"] > 0 and step.timings[-1]["h2d"] == 0.0

    # every Linear runs as integer kernels (a processor MLP's first one as one per input part:
    # the concat trick); no float GEMM, no DequantizeLinear, no Concat of gathered states and
    # no float bias Add is left
    from sciquant.quant.export import _column_blocks

    summary = kernel_summary(path)
    gemms = sum(len(_column_blocks(qmodel.model, name) or (0, 1)) - 1
                for name in qmodel.quantized_layers())  # fmt: skip
    assert gemms > len(qmodel.quantized_layers())
    assert sum(integer_kernels(summary).values()) == gemms, summary
    assert not {"Gemm", "FusedGemm", "MatMul", "DequantizeLinear", "Concat"} & set(summary), summary
    # adds left: the residual updates, the two gathered projections, the edge part (per block)
    assert summary["Add"] <= 2 * SMALL.processor_size + 3 * SMALL.processor_size


def test_ort_runs_the_message_passing_scatter_on_one_thread(exported_w8a8):
    """ONNX Runtime's ScatterND(reduction=add) races on several threads (wrong sums, different
    from run to run): a graph with one is run single-threaded, whatever was asked for."""
    _, path = exported_w8a8
    assert has_reducing_scatter(path)
    step = OrtStep(path, intra_op_num_threads=2)
    assert step.intra_op_num_threads == 1
    graph = random_tree_graph(3000, seed=7)
    first, second = step(*graph), step(*graph)
    assert torch.equal(first, second)


def test_export_carries_our_integer_weights_and_qparams(exported_w8a8):
    qmodel, path = exported_w8a8
    import onnx

    proto = onnx.load(str(path))
    storage = {p.key: p.value for p in proto.metadata_props}["sciquant.weight_dtype"]
    integers = weight_initializers(path)
    from sciquant.quant.export import _column_blocks

    ops = [node.op_type for node in proto.graph.node]
    linear_count = len(qmodel.quantized_layers())
    # The concat trick: a processor MLP's first layer quantizes its two distinct inputs
    # ([e, h] of the edge MLP, [h, agg] of the node MLP) once each, with one initializer per
    # weight column block; every layer's bias is an int32 DequantizeLinear (CPU target).
    split = [n for n in qmodel.quantized_layers() if _column_blocks(qmodel.model, n)]
    blocks = sum(len(_column_blocks(qmodel.model, n) or (0, 1)) - 1
                 for n in qmodel.quantized_layers())  # fmt: skip
    assert len(split) == 2 * SMALL.processor_size
    assert ops.count("QuantizeLinear") == linear_count + len(split)
    assert ops.count("DequantizeLinear") == (linear_count + len(split)) + blocks + linear_count
    assert [value.name for value in proto.graph.input] == [
        "node_features",
        "edge_features",
        "edge_index",
    ]
    assert [value.name for value in proto.graph.output] == ["delta"]
    # every weight matrix is an 8-bit initializer holding the simulation's integers
    layer = qmodel.quant_linears()["decoder.layers.0"]
    scale, zero_point = layer.weight_qparams()
    with torch.no_grad():
        codes = (
            torch.round(layer.fake_quantize_weight() / scale[:, None]).numpy()
            + zero_point[:, None].numpy()
        )
    shift = 128 if storage == "uint8" else 0
    matrices = [a for a in integers.values() if a.shape == tuple(layer.weight.shape)]
    assert any(np.array_equal(a.astype(np.int32) - shift, codes) for a in matrices)
    assert sum(a.ndim == 2 for a in integers.values()) == blocks
    assert {p.key: p.value for p in proto.metadata_props}["sciquant.concat_trick"] == "yes"


def test_ort_step_rejects_a_missing_file(tmp_path):
    with pytest.raises(SciquantError, match="does not exist"):
        OrtStep(tmp_path / "missing.onnx")
