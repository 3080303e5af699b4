"""TQT (trained power-of-two quantization thresholds) in sciquant.quant.pytorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sciquant.errors import SciquantError
from sciquant.quant.export import _qdq_copy
from sciquant.quant.pytorch import (
    QuantLinear,
    calibrate,
    disable_tqt,
    enable_tqt,
    quantize_model,
    set_mode,
    tqt_fake_quantize,
    tqt_parameters,
    tqt_scale,
)
from sciquant.quant.spec import PerChannel, PerTensor, QuantSpec
from sciquant.quant.targets import get_target

LN2 = math.log(2.0)
INT4 = QuantSpec(bits=4, symmetric=True, granularity=PerTensor(), scale_kind="pow2")
INT8 = QuantSpec(bits=8, symmetric=True, granularity=PerTensor(), scale_kind="pow2")


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def _scale_by_hand(log2_threshold: float, bits: int) -> float:
    """2^ceil(log2 t) / 2^(b-1), in Python integers and ldexp."""
    return math.ldexp(1.0, math.ceil(log2_threshold) - (bits - 1))


# -- the quantizer on hand-made tensors --------------------------------------------------------

# int4: qmin = -8, qmax = 7; log2 t = 1 gives s = 2^1 / 2^3 = 0.25, range [-2.0, 1.75].
# x, x / s, r = round(x / s), q = clamp(r) · s, the local log2-t derivative / (s·ln2), dq/dx
HAND_CASES = [
    (0.3125, 1.25, 1, 0.25, -0.25, 1.0),  # inside: r - x/s
    (0.4375, 1.75, 2, 0.5, 0.25, 1.0),  # inside, rounded up
    (2.0, 8.0, 8, 1.75, 7.0, 0.0),  # above: qmax
    (-2.5, -10.0, -10, -2.0, -8.0, 0.0),  # below: qmin
    (-1.90625, -7.625, -8, -2.0, -0.375, 1.0),  # r = qmin: still inside
    # beyond qmax·s = 1.75, but r = 7 = qmax: inside (the paper decides on the rounded code)
    (1.84375, 7.375, 7, 1.75, -0.375, 1.0),
    (0.0, 0.0, 0, 0.0, 0.0, 1.0),
]


def test_tqt_gradients_match_the_hand_computed_values():
    x = torch.tensor([case[0] for case in HAND_CASES], requires_grad=True)
    log2_t = torch.tensor(1.0, requires_grad=True)
    assert tqt_scale(log2_t, INT4).item() == 0.25
    q = tqt_fake_quantize(x, log2_t, INT4)
    np.testing.assert_array_equal(q.detach().numpy(), [case[3] for case in HAND_CASES])
    weights = torch.arange(1.0, len(HAND_CASES) + 1)  # a distinct upstream gradient per element
    (q * weights).sum().backward()
    # dL/dx_i = w_i · (1 inside, 0 outside)
    np.testing.assert_array_equal(
        x.grad.numpy(), [w * case[5] for w, case in zip(weights.tolist(), HAND_CASES, strict=True)]
    )
    # dL/d(log2 t) = Σ w_i · s·ln2·local_i
    expected = 0.25 * LN2 * sum(w * case[4] for w, case in zip(weights, HAND_CASES, strict=True))
    assert log2_t.grad.item() == pytest.approx(float(expected), rel=1e-6)
    # element by element: s·ln2·(r - x/s) inside, s·ln2·qmin below, s·ln2·qmax above
    for value, _, _, _, local, _ in HAND_CASES:
        one = torch.tensor([value])
        threshold = torch.tensor(1.0, requires_grad=True)
        tqt_fake_quantize(one, threshold, INT4).sum().backward()
        assert threshold.grad.item() == pytest.approx(0.25 * LN2 * local, abs=1e-7), value


def test_tqt_gradient_scales_with_the_step_and_keeps_the_threshold_shape():
    # log2 t = 3 on int4: s = 1; above the range the derivative is s·ln2·qmax = 7·ln2
    threshold = torch.tensor([3.0], requires_grad=True)  # a [1] threshold gets a [1] gradient
    tqt_fake_quantize(torch.tensor([100.0, -100.0]), threshold, INT4).sum().backward()
    assert threshold.grad.shape == (1,)
    assert threshold.grad.item() == pytest.approx((7 - 8) * LN2, rel=1e-6)


@pytest.mark.parametrize(
    ("log2_t", "bits", "scale"),
    [
        (2.3, 8, 2.0**-4),  # ceil(2.3) = 3 (round or floor would give 2^-5)
        (3.0, 8, 2.0**-4),  # an integer stays (ceil(3) = 3, not 4)
        (-0.7, 8, 2.0**-7),  # ceil(-0.7) = 0
        (0.01, 4, 2.0**-2),  # ceil(0.01) = 1
    ],
)
def test_forward_is_clamp_round_times_an_exact_power_of_two(log2_t, bits, scale):
    spec = QuantSpec(bits=bits, symmetric=True, granularity=PerTensor(), scale_kind="pow2")
    threshold = torch.tensor(log2_t)
    s = tqt_scale(threshold, spec)
    assert s.dtype == torch.float32 and s.item() == scale == _scale_by_hand(log2_t, bits)
    assert _is_power_of_two(s.item())
    torch.manual_seed(0)
    x = torch.randn(4000) * scale * 2 ** (bits - 1) * 0.8  # about 5 % beyond the range
    q = tqt_fake_quantize(x, threshold, spec)
    expected = torch.clamp(torch.round(x / scale), spec.qmin, spec.qmax) * scale
    np.testing.assert_array_equal(q.numpy(), expected.numpy())
    assert (x.abs() > spec.qmax * scale).any()  # the clamp was exercised
    # and torch's own kernel with that scale agrees bit for bit
    kernel = torch.fake_quantize_per_tensor_affine(x, scale, 0, spec.qmin, spec.qmax)
    np.testing.assert_array_equal(q.numpy(), kernel.numpy())


# -- QuantLinear and QuantizedModel in tqt mode ------------------------------------------------


def _toy_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    teacher = torch.randn(4, 8, generator=generator)
    return x, torch.tanh(x @ teacher.T) + 0.1


def _toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _calibrated(precision: str = "w4a8", target: str = "npu-pow2", seed: int = 0):
    model = _toy_model(seed)
    x, _ = _toy_data()
    qmodel = quantize_model(model, target, precision, "qat-ste")
    return model, calibrate(qmodel, [(x[:128],), (x[128:],)])


def test_entering_tqt_starts_from_the_calibrated_scales_and_changes_nothing():
    _, qmodel = _calibrated("w4a8")
    x, _ = _toy_data()
    with torch.no_grad():
        before = qmodel(x)
    scales = {
        name: (layer.input_scale.item(), layer.weight_scale.item())
        for name, layer in qmodel.quant_linears().items()
    }
    enable_tqt(qmodel)
    assert len(tqt_parameters(qmodel)) == 2 * len(scales)
    for name, layer in qmodel.quant_linears().items():
        input_scale, weight_scale = scales[name]
        # log2 t = log2(s) + (b - 1), exactly an integer
        assert layer.input_log2_threshold.item() == math.log2(input_scale) + 7
        assert layer.weight_log2_threshold.item() == math.log2(weight_scale) + 3
        assert layer.input_qparams()[0].item() == input_scale
        assert layer.weight_qparams()[0].item() == weight_scale
    with torch.no_grad():
        np.testing.assert_array_equal(qmodel(x).numpy(), before.numpy())


def test_leaving_tqt_freezes_exact_powers_of_two_with_identical_outputs():
    """Thresholds off the integers; integer bias on, so the bias grid must follow too."""
    torch.manual_seed(1)
    npu = get_target("npu-pow2")
    layer = QuantLinear(
        nn.Linear(16, 8), npu.weight_spec(8), npu.activation_spec(8), integer_bias=True
    )
    with torch.no_grad():
        layer.bias.uniform_(-0.5, 0.5)
        layer(torch.randn(300, 16) * 3)
    layer.freeze()
    layer.set_mode("tqt")
    with torch.no_grad():
        layer.input_log2_threshold.add_(-1.6)  # ceil moves it down by 1
        layer.weight_log2_threshold.add_(1.3)  # this up by 2: s_x·s_w doubles
    thresholds = (layer.input_log2_threshold.item(), layer.weight_log2_threshold.item())
    x = torch.randn(200, 16) * 3
    with torch.no_grad():
        in_tqt = layer(x)
        qparams = (layer.input_qparams()[0].item(), layer.weight_qparams()[0].item())
    assert qparams != (layer.input_scale.item(), layer.weight_scale.item())  # buffers are stale
    layer.set_mode("quantize")
    assert layer.input_log2_threshold is None and layer.weight_log2_threshold is None
    frozen = (layer.input_scale.item(), layer.weight_scale.item())
    assert frozen == qparams == tuple(_scale_by_hand(t, 8) for t in thresholds)
    assert all(_is_power_of_two(scale) for scale in frozen)
    with torch.no_grad():
        np.testing.assert_array_equal(layer(x).numpy(), in_tqt.numpy())


def test_adam_on_a_toy_regression_lowers_the_loss_and_keeps_powers_of_two():
    _, qmodel = _calibrated("w4a8")
    x, y = _toy_data()
    enable_tqt(qmodel)
    thresholds = tqt_parameters(qmodel)
    assert {id(t) for t in thresholds} <= {id(p) for p in qmodel.parameters()}
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    qmodel.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (qmodel(x) - y).square().mean()
        loss.backward()
        assert all(t.grad is not None and torch.isfinite(t.grad) for t in thresholds)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    learned = [t.item() for t in thresholds]
    assert any(value != math.floor(value) for value in learned)  # they did move off the grid
    with torch.no_grad():
        in_tqt = qmodel.eval()(x)
    disable_tqt(qmodel)
    assert tqt_parameters(qmodel) == []
    for layer in qmodel.quant_linears().values():
        assert layer.mode == "quantize"
        for scale in (layer.input_scale, layer.weight_scale):
            value = scale.item()
            assert _is_power_of_two(value) and math.log2(value) == round(math.log2(value))
    with torch.no_grad():
        np.testing.assert_array_equal(qmodel(x).numpy(), in_tqt.numpy())


def test_training_only_the_thresholds_recovers_from_clipping():
    """Frozen weights, thresholds 3 octaves too small: their gradient alone must open them."""
    _, qmodel = _calibrated("w8a8")
    x, _ = _toy_data()
    with torch.no_grad():
        target = qmodel(x)  # the calibrated quantized model's own output
    enable_tqt(qmodel)
    thresholds = tqt_parameters(qmodel)
    with torch.no_grad():
        for threshold in thresholds:
            threshold.sub_(3.0)
    threshold_ids = {id(threshold) for threshold in thresholds}
    for parameter in qmodel.parameters():
        parameter.requires_grad_(id(parameter) in threshold_ids)
    optimizer = torch.optim.Adam(thresholds, lr=0.1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = (qmodel(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    # every threshold grew back by more than two octaves from where it was put
    _, fresh = _calibrated("w8a8")
    enable_tqt(fresh)
    for learned, calibrated in zip(thresholds, tqt_parameters(fresh), strict=True):
        assert learned.item() > calibrated.item() - 1.0


def test_state_dict_round_trip_in_tqt_mode(tmp_path):
    model, qmodel = _calibrated("w8a8")
    enable_tqt(qmodel)
    with torch.no_grad():
        for i, threshold in enumerate(tqt_parameters(qmodel)):
            threshold.add_(0.37 if i % 2 else -0.61)  # off the integers, some ceil changes
    path = tmp_path / "tqt.pt"
    torch.save(qmodel.state_dict(), path)
    fresh = quantize_model(model, "npu-pow2", "w8a8", "qat-ste")
    fresh.load_state_dict(torch.load(path))
    assert {layer.mode for layer in fresh.quant_linears().values()} == {"tqt"}
    loaded = tqt_parameters(fresh)
    assert [t.item() for t in loaded] == [t.item() for t in tqt_parameters(qmodel)]
    assert all(isinstance(t, nn.Parameter) and t.requires_grad for t in loaded)
    x, _ = _toy_data(seed=3)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), qmodel(x).numpy())
    # a tqt model loaded into one in tqt mode that was saved after disable_tqt: buffers win
    disable_tqt(qmodel)
    enable_tqt(fresh)
    fresh.load_state_dict(qmodel.state_dict())
    assert tqt_parameters(fresh) == []
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), qmodel(x).numpy())


def test_export_copy_of_a_tqt_model_uses_the_learned_scales():
    _, qmodel = _calibrated("w8a8")
    enable_tqt(qmodel)
    with torch.no_grad():
        for threshold in tqt_parameters(qmodel):
            threshold.add_(0.5)
    x, _ = _toy_data(seed=4)
    with torch.no_grad():
        expected = qmodel(x)
        in_tqt = _qdq_copy(qmodel, "int8", fold_bias=False)(x)
        disable_tqt(qmodel)
        frozen = _qdq_copy(qmodel, "int8", fold_bias=False)(x)
    np.testing.assert_array_equal(in_tqt.numpy(), frozen.numpy())
    np.testing.assert_allclose(in_tqt.numpy(), expected.numpy(), rtol=0, atol=1e-5)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["reference", "cpu-x86"])
def test_tqt_is_refused_on_targets_without_power_of_two_scales(target):
    _, qmodel = _calibrated("w8a8", target=target)
    with pytest.raises(SciquantError, match=r"qat-tqt.*npu-pow2"):
        enable_tqt(qmodel)
    # all or nothing: no layer switched, no threshold created
    assert {layer.mode for layer in qmodel.quant_linears().values()} == {"quantize"}
    assert tqt_parameters(qmodel) == []


def test_tqt_is_refused_before_calibration():
    qmodel = quantize_model(_toy_model(), "npu-pow2", "w8a8", "qat-ste")
    with pytest.raises(SciquantError, match="before calibration"):
        enable_tqt(qmodel)
    with pytest.raises(SciquantError, match="before calibration"):
        next(iter(qmodel.quant_linears().values())).set_mode("tqt")


def test_tqt_is_refused_for_per_channel_power_of_two_weights():
    per_channel = QuantSpec(bits=8, symmetric=True, granularity=PerChannel(0), scale_kind="pow2")
    layer = QuantLinear(nn.Linear(6, 3), per_channel, INT8)
    layer(torch.randn(10, 6))
    layer.freeze()
    with pytest.raises(SciquantError, match="per tensor"):
        layer.set_mode("tqt")
    assert layer.mode == "quantize" and layer.input_log2_threshold is None


def test_set_mode_tqt_on_a_model_sets_every_layer():
    _, qmodel = _calibrated("w8a8")
    set_mode(qmodel, "tqt")
    assert {layer.mode for layer in qmodel.quant_linears().values()} == {"tqt"}
    set_mode(qmodel, "float")  # leaving to float freezes too
    assert tqt_parameters(qmodel) == []
    assert all(
        _is_power_of_two(layer.input_scale.item()) for layer in qmodel.quant_linears().values()
    )
