"""The framework-independent quantization core: specs, the affine quantizer, observers, targets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sciquant.errors import SciquantError
from sciquant.quant import targets as targets_module
from sciquant.quant.observers import (
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _kl_divergences,
    _MagnitudeHistogram,
    make_observer,
    qparams_from_range,
)
from sciquant.quant.spec import (
    PerChannel,
    PerTensor,
    Precision,
    QuantSpec,
    dequantize,
    fake_quantize,
    parse_precision,
    quantize,
)
from sciquant.quant.targets import TARGETS, fp32_target, get_target

INT8_SYM = QuantSpec(8, symmetric=True, granularity=PerTensor())
UINT8_ASYM = QuantSpec(8, symmetric=False, granularity=PerTensor())


# --- QuantSpec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "symmetric", "narrow_range", "signed", "expected"),
    [
        (8, True, False, None, (-128, 127)),
        (8, True, True, None, (-127, 127)),
        (8, False, False, None, (0, 255)),
        (8, False, True, None, (1, 255)),
        (8, False, False, True, (-128, 127)),
        (8, True, False, False, (0, 255)),
        (4, True, False, None, (-8, 7)),
        (2, True, True, None, (-1, 1)),
        (16, False, False, None, (0, 65535)),
    ],
)
def test_qmin_qmax_conventions(bits, symmetric, narrow_range, signed, expected):
    spec = QuantSpec(bits, symmetric, PerTensor(), narrow_range=narrow_range, signed=signed)
    assert (spec.qmin, spec.qmax) == expected


def test_signed_defaults_to_symmetric_and_specs_are_immutable_values():
    assert QuantSpec(8, True, PerTensor()).signed is True
    assert QuantSpec(8, False, PerTensor()).signed is False
    assert QuantSpec(8, True, PerTensor()) == QuantSpec(8, True, PerTensor(), signed=True)
    assert PerChannel(0) == PerChannel(0) and PerChannel(0) != PerChannel(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        INT8_SYM.bits = 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"symmetric": 1}, "symmetric"),
        ({"granularity": "per-tensor"}, "granularity"),
        ({"scale_kind": "log2"}, "scale_kind"),
        ({"narrow_range": None}, "narrow_range"),
        ({"signed": "yes"}, "signed"),
    ],
)
def test_quant_spec_rejects_bad_fields_naming_them(kwargs, field):
    arguments = {"bits": 8, "symmetric": True, "granularity": PerTensor()} | kwargs
    with pytest.raises(SciquantError, match=f"QuantSpec.{field}"):
        QuantSpec(**arguments)


def test_per_channel_axis_must_be_an_int():
    with pytest.raises(SciquantError, match="axis"):
        PerChannel(1.0)


# --- the affine quantizer against an independent reference ---------------------------------------


def reference_fake_quantize(x, scale, zero_point, qmin, qmax, axis=None):
    """Element by element in float64 with Python's round (half to even)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    codes = np.empty(x.shape, dtype=np.int64)
    for index in np.ndindex(x.shape):
        c = 0 if axis is None else index[axis]
        s = float(np.ravel(scale)[c])
        z = int(np.ravel(zero_point)[c])
        q = min(max(round(float(x[index]) / s) + z, qmin), qmax)
        codes[index] = q
        out[index] = (q - z) * s
    return out, codes


def test_rounding_is_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001])
    codes = quantize(x, np.array(1.0), np.array(0), INT8_SYM)
    assert codes.tolist() == [0, 2, 2, 0, -2, -2, 2, 3]


def test_fake_quantize_per_tensor_asymmetric_matches_reference_with_ties_and_clamping():
    rng = np.random.default_rng(0)
    scale, zero_point = 0.05, 100
    ties = (np.arange(-20, 20) + 0.5) * scale  # exactly halfway between codes
    x = np.concatenate([rng.normal(0, 3, 500), ties, [-50.0, 50.0, 0.0]])
    expected, codes = reference_fake_quantize(x, [scale], [zero_point], 0, 255)
    got = fake_quantize(x, np.array(scale), np.array(zero_point), UINT8_ASYM)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        quantize(x, np.array(scale), np.array(zero_point), UINT8_ASYM), codes
    )
    assert got.min() == (0 - zero_point) * scale and got.max() == (255 - zero_point) * scale


@pytest.mark.parametrize("axis", [1, -2])
def test_fake_quantize_per_channel_broadcasts_along_the_channel_axis(axis):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, size=(3, 4, 5))
    scale = np.array([0.01, 0.1, 0.02, 0.5])
    zero_point = np.zeros(4, dtype=np.int32)
    spec = QuantSpec(4, True, PerChannel(axis), narrow_range=True)
    expected, codes = reference_fake_quantize(x, scale, zero_point, -7, 7, axis=1)
    np.testing.assert_array_equal(fake_quantize(x, scale, zero_point, spec), expected)
    np.testing.assert_array_equal(quantize(x, scale, zero_point, spec), codes)
    np.testing.assert_array_equal(dequantize(codes, scale, zero_point, spec), expected)
    assert codes.min() == -7  # channel 0 (scale 0.01) clamps at the narrow range


def test_fake_quantize_keeps_float32_and_quantize_gives_int32():
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    assert fake_quantize(x, np.array(0.1, np.float32), np.array(0), INT8_SYM).dtype == np.float32
    assert quantize(x, np.array(0.1, np.float32), np.array(0), INT8_SYM).dtype == np.int32


def test_qparams_shape_must_match_the_granularity():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="PerChannel"):
        fake_quantize(x, np.ones(2), np.zeros(2), QuantSpec(8, True, PerChannel(1)))
    with pytest.raises(ValueError, match="PerTensor"):
        fake_quantize(x, np.ones(3), np.zeros(3), INT8_SYM)
    with pytest.raises(ValueError, match="positive"):
        fake_quantize(x, np.array(0.0), np.array(0), INT8_SYM)


# --- Precision ---------------------------------------------------------------------------------


def test_parse_precision_reads_the_three_forms():
    assert parse_precision("w4a8") == Precision(kind="int", weight_bits=4, activation_bits=8)
    assert parse_precision("fp16") == Precision(kind="float", weight_bits=16, activation_bits=16)
    bf16 = parse_precision("bf16")
    assert bf16 == Precision(kind="float", weight_bits=16, activation_bits=16, bfloat=True)
    assert bf16 != parse_precision("fp16") and str(bf16) == "bf16"
    assert parse_precision("fp32").kind == "float"


def test_every_allowed_precision_round_trips():
    names = ["fp32", "fp16", "bf16"] + [f"w{w}a{a}" for w in range(2, 9) for a in range(4, 9)]
    assert [str(parse_precision(name)) for name in names] == names


@pytest.mark.parametrize("text", ["w9a8", "w1a8", "w8a3", "w8a16", "W8A8", "w08a8", "fp8", "int8"])
def test_bad_precisions_name_the_string_and_what_is_allowed(text):
    with pytest.raises(SciquantError, match=f"'{text}'.*allowed are fp32, fp16, bf16 and wXaY"):
        parse_precision(text)


# --- observers ---------------------------------------------------------------------------------

HAND = np.array([[-1.0, 2.0, 0.5], [0.25, 4.0, -3.0]])


def test_minmax_per_tensor_symmetric_and_asymmetric_by_hand():
    observer = MinMaxObserver()
    observer.update(HAND)
    scale, zero_point = observer.qparams(INT8_SYM)
    assert scale.shape == () and zero_point.shape == ()
    assert scale == np.float32(4.0 / 127) and zero_point == 0
    scale, zero_point = observer.qparams(UINT8_ASYM)
    assert scale == np.float32(7.0 / 255)
    assert zero_point == 109  # round(0 + 3 / (7 / 255)) = round(109.29)
    assert scale.dtype == np.float32 and zero_point.dtype == np.int32


def test_minmax_per_channel_reduces_every_other_axis():
    for axis, amax in [(0, [2.0, 4.0]), (1, [1.0, 4.0, 3.0]), (-1, [1.0, 4.0, 3.0])]:
        observer = MinMaxObserver(PerChannel(axis))
        observer.update(HAND)
        spec = QuantSpec(8, True, PerChannel(axis), narrow_range=True)
        scale, zero_point = observer.qparams(spec)
        np.testing.assert_array_equal(scale, np.float32(np.array(amax) / 127))
        assert zero_point.tolist() == [0] * len(amax)


def test_observers_accumulate_over_updates():
    observer = MinMaxObserver(PerChannel(0))
    observer.update(HAND[:, :1])
    observer.update(HAND[:, 1:])
    assert observer.min_val.tolist() == [-1.0, -3.0]
    assert observer.max_val.tolist() == [2.0, 4.0]


def test_asymmetric_range_always_holds_zero_and_signed_zero_point():
    observer = MinMaxObserver()
    observer.update(np.array([1.0, 2.0, 5.0]))
    scale, zero_point = observer.qparams(UINT8_ASYM)
    assert scale == np.float32(5.0 / 255) and zero_point == 0
    int8_asym = QuantSpec(8, False, PerTensor(), signed=True)
    scale, zero_point = qparams_from_range(np.array(-1.0), np.array(3.0), int8_asym)
    assert scale == np.float32(4.0 / 255)
    assert zero_point == -64  # round(-128 + 1 / (4 / 255)) = round(-64.25)


def test_pow2_scale_rounds_in_the_log2_domain():
    pow2 = QuantSpec(8, True, PerTensor(), scale_kind="pow2")
    # 4/127 = 2^-4.99 → 2^-5; 3/127 = 2^-5.40 → 2^-5 (up); 7/127 = 2^-4.18 → 2^-4 (up)
    for amax, expected in [(4.0, 2.0**-5), (3.0, 2.0**-5), (7.0, 2.0**-4), (5.8, 2.0**-4.0)]:
        scale, zero_point = qparams_from_range(np.array(-amax), np.array(amax), pow2)
        assert scale == expected and zero_point == 0
    # 5/127 = 2^-4.67 → 2^-5: rounding down clips the top of the range
    scale, _ = qparams_from_range(np.array(0.0), np.array(5.0), pow2)
    assert scale == 2.0**-5


def test_zero_range_gets_scale_one():
    observer = MinMaxObserver(PerChannel(0))
    observer.update(np.array([[0.0, 0.0], [-1.0, 1.0]]))
    scale, zero_point = observer.qparams(QuantSpec(8, False, PerChannel(0)))
    assert scale[0] == 1.0 and zero_point[0] == 0
    assert scale[1] == np.float32(2.0 / 255)


def test_percentile_on_uniform_integers_by_hand():
    values = np.arange(1001, dtype=np.float64)  # percentile p sits at rank p/100 * 1000
    observer = PercentileObserver()
    observer.update(values)
    scale, _ = observer.qparams(INT8_SYM)
    assert scale == np.float32(999.9 / 127)
    scale, zero_point = observer.qparams(UINT8_ASYM)
    assert scale == np.float32(999.9 / 255) and zero_point == 0
    per_channel = PercentileObserver(PerChannel(0), percentile=99.9)
    per_channel.update(np.stack([values, -2.0 * values]))
    scale, _ = per_channel.qparams(QuantSpec(8, True, PerChannel(0)))
    np.testing.assert_allclose(scale, np.array([999.0, 1998.0]) / 127, rtol=1e-6)


def test_percentile_beyond_max_samples_uses_a_uniform_reservoir():
    rng = np.random.default_rng(2)
    batches = [rng.uniform(0.0, 1.0, 20_000) for _ in range(10)]
    observer = PercentileObserver(percentile=99.0, max_samples=20_000)
    for batch in batches:
        observer.update(batch)
    scale, _ = observer.qparams(INT8_SYM)
    assert abs(scale * 127 - 0.99) < 0.005
    # a reservoir that kept only the first batch would miss a later, larger batch
    late = PercentileObserver(percentile=99.0, max_samples=20_000)
    late.update(rng.uniform(0.0, 1.0, 20_000))
    late.update(rng.uniform(0.0, 10.0, 180_000))
    scale, _ = late.qparams(INT8_SYM)
    assert scale * 127 > 9.0


def test_mse_keeps_the_max_on_uniform_data_and_clips_heavy_tails():
    rng = np.random.default_rng(3)
    uniform = rng.uniform(-1.0, 1.0, 50_000)
    heavy = rng.standard_t(df=3, size=50_000)
    observer = MSEObserver(PerChannel(0))
    observer.update(np.stack([uniform, heavy]))
    scale, _ = observer.qparams(QuantSpec(8, True, PerChannel(0)))
    # for uniform data the optimum sits about half a step below the max: within 1 %
    assert 0.99 <= scale[0] * 127 / np.abs(uniform).max() <= 1.0
    assert scale[1] * 127 < 0.9 * np.abs(heavy).max()


def test_mse_clipping_beats_minmax_at_low_bits():
    laplace = np.random.default_rng(8).laplace(size=50_000)
    spec = QuantSpec(4, True, PerTensor())
    observer = MSEObserver()
    observer.update(laplace)
    scale, zero_point = observer.qparams(spec)

    def mse(scale):
        return np.mean((fake_quantize(laplace, scale, zero_point, spec) - laplace) ** 2)

    amax = np.abs(laplace).max()
    assert scale * spec.qmax < 0.5 * amax
    assert mse(scale) < 0.5 * mse(np.float32(amax / spec.qmax))


def test_mse_under_pow2_searches_powers_of_two_including_the_unclipped_one():
    rng = np.random.default_rng(4)
    uniform = rng.uniform(-5.0, 5.0, 20_000)  # 5/127 = 2^-4.67 rounds down to a clipping 2^-5
    spec = QuantSpec(8, True, PerTensor(), scale_kind="pow2")
    observer = MSEObserver()
    observer.update(uniform)
    scale, _ = observer.qparams(spec)
    assert scale == 2.0**-4  # the wider power: clipping 20 % of the range costs more


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8, True, PerTensor()),
        QuantSpec(8, False, PerTensor()),
        QuantSpec(4, True, PerTensor()),
        QuantSpec(3, False, PerTensor()),
        QuantSpec(8, True, PerTensor(), scale_kind="pow2"),
        QuantSpec(4, True, PerChannel(0)),
    ],
)
def test_mse_from_sorted_prefix_sums_picks_what_fake_quantizing_every_candidate_picks(spec):
    """Channels with many samples take the sorted prefix-sum path; forcing every channel onto
    the direct path (each candidate fake-quantizes all samples) picks the same ranges."""
    rng = np.random.default_rng(11)
    channels = 3 if isinstance(spec.granularity, PerChannel) else 1
    for data in (
        rng.standard_t(3, size=(channels, 40_000)) * 4.0,
        np.abs(rng.normal(size=(channels, 40_000))) + 0.2,  # all positive: zero point at qmin
        rng.laplace(size=(channels, 40_000)) + 1.0,
    ):
        data = data.astype(np.float32)
        fast = MSEObserver(spec.granularity)
        fast.update(data if channels > 1 else data[0])
        direct = MSEObserver(spec.granularity)
        direct.update(data if channels > 1 else data[0])
        direct.sorted_threshold = np.inf
        assert 40_000 > fast.sorted_threshold * (spec.qmax - spec.qmin + 1)
        np.testing.assert_array_equal(fast._range(spec), direct._range(spec))


def test_entropy_threshold_sits_below_the_max_for_gaussian_with_outliers():
    rng = np.random.default_rng(5)
    observer = EntropyObserver()
    observer.update(rng.normal(0.0, 1.0, 100_000))
    observer.update(np.array([60.0, -55.0, 70.0]))
    scale, zero_point = observer.qparams(INT8_SYM)
    threshold = scale * 127
    assert 3.0 < threshold < 20.0 and zero_point == 0
    scale, zero_point = observer.qparams(UINT8_ASYM)
    assert scale * 255 < 40.0 and 100 < zero_point < 155


def test_entropy_keeps_about_the_max_for_uniform_data():
    observer = EntropyObserver()
    observer.update(np.random.default_rng(6).uniform(-1.0, 1.0, 100_000))
    scale, _ = observer.qparams(INT8_SYM)
    assert scale * 127 > 0.95


def test_magnitude_histogram_keeps_its_width_then_merges_pairs_past_max_bins():
    histogram = _MagnitudeHistogram(bins=4, max_bins=8)
    histogram.add(np.array([[0.25, -0.75, 2.0, 0.0]]))  # width 2/4; the zero is left out
    assert histogram.width.tolist() == [0.5] and histogram.counts.tolist() == [[1, 1, 0, 1]]
    histogram.add(np.array([[3.2]]))  # more bins of the same width
    assert histogram.counts.tolist() == [[1, 1, 0, 1, 0, 0, 1, 0]]
    histogram.add(np.array([[7.0]]))  # 14 bins > 8: merge pairs, width 1
    assert histogram.width.tolist() == [1.0]
    assert histogram.counts.tolist() == [[2, 1, 0, 1, 0, 0, 1, 0]]  # 3.2 now in [3, 4)


def reference_kl(counts, kept, levels):
    """KL(P || Q) for keeping `kept` bins, bin by bin as TensorRT's calibration describes it."""
    total = sum(counts)
    p = list(counts[:kept])
    p[-1] += sum(counts[kept:])
    group = [j * levels // kept for j in range(kept)]
    q = [0.0] * kept
    for g in range(levels):
        members = [j for j in range(kept) if group[j] == g]
        nonempty = [j for j in members if counts[j] > 0]
        for j in nonempty:
            q[j] = sum(counts[k] for k in members) / len(nonempty)
    q_total = sum(q)
    divergence = 0.0
    for j in range(kept):
        if p[j] > 0:
            if q[j] == 0:
                return math.inf
            divergence += p[j] / total * math.log((p[j] / total) / (q[j] / q_total))
    return divergence


def test_kl_divergences_from_prefix_sums_match_the_bin_by_bin_definition():
    rng = np.random.default_rng(7)
    counts = rng.poisson(3.0, 70).astype(float) * (rng.uniform(size=70) > 0.2)
    counts[-1] = 5.0
    kept, divergence = _kl_divergences(counts, levels=8, block=16)
    assert kept.tolist() == list(range(8, 71))
    expected = [reference_kl(counts.tolist(), int(i), 8) for i in kept]
    assert np.isinf(expected).any() and np.isfinite(expected).any()
    np.testing.assert_allclose(divergence, expected, rtol=1e-9, atol=1e-12)


def test_make_observer_maps_method_names():
    assert isinstance(make_observer("minmax", PerTensor()), MinMaxObserver)
    assert isinstance(make_observer("ptq-percentile", PerTensor()), PercentileObserver)
    assert isinstance(make_observer("ptq-mse", PerChannel(0)), MSEObserver)
    assert make_observer("entropy", PerChannel(-1)).granularity == PerChannel(-1)
    with pytest.raises(SciquantError, match="'ptq-adaround'.*minmax, percentile, mse, entropy"):
        make_observer("ptq-adaround", PerTensor())


def test_observer_misuse_is_reported():
    observer = MinMaxObserver(PerChannel(0))
    with pytest.raises(RuntimeError, match="no data"):
        observer.qparams(QuantSpec(8, True, PerChannel(0)))
    observer.update(HAND)
    with pytest.raises(ValueError, match="granularity"):
        observer.qparams(INT8_SYM)
    with pytest.raises(ValueError, match="channels"):
        observer.update(np.ones((3, 2)))
    with pytest.raises(SciquantError, match="NaN"):
        MinMaxObserver().update(np.array([1.0, math.nan]))


# --- targets -----------------------------------------------------------------------------------


def test_the_table_holds_the_design_targets():
    assert set(TARGETS) == {
        "reference",
        "trt-v100",
        "trt-rtx3090",
        "cpu-x86",
        "openvino-cpu",
        "openvino-avx2",
        "litert-cpu",
        "npu-pow2",
    }
    # openvino-avx2: openvino-cpu but for its weights' range, 7 bits at most (w4 stays 4)
    avx2, cpu = get_target("openvino-avx2"), get_target("openvino-cpu")
    assert (avx2.backend, avx2.native_precisions) == (cpu.backend, cpu.native_precisions)
    assert (avx2.weight_spec(8).qmin, avx2.weight_spec(8).qmax) == (-63, 63)
    assert (cpu.weight_spec(8).qmin, cpu.weight_spec(8).qmax) == (-127, 127)
    assert avx2.weight_spec(4).bits == 4 and avx2.activation_spec(8).bits == 8
    assert get_target("trt-v100").node == "v100" and get_target("reference").node is None
    openvino = get_target("openvino-cpu")
    assert openvino.native_precisions == {"fp32", "bf16", "w8a8"}
    assert openvino.plan("bf16", "torch").runtime == "openvino"
    assert openvino.plan("w4a8", "torch").simulated
    with pytest.raises(SciquantError, match="torch models only"):
        openvino.plan("w8a8", "keras")
    assert "10.4" in get_target("trt-v100").description


def test_targets_that_differ_only_in_quantization_share_one_fp32_run(monkeypatch):
    """openvino-avx2 runs openvino-cpu's FP32 graph; targets on another runtime, node or
    without FP32 of their own are their own FP32 target."""
    twins = {name: fp32_target(name) for name in TARGETS}
    assert twins == {name: name for name in TARGETS} | {"openvino-avx2": "openvino-cpu"}
    # a row like the reference (eager, the run's own node) is its own: the reference's FP32
    # run is the study's FP32 network, not a target's
    eager = dataclasses.replace(get_target("reference"), name="eager-copy")
    monkeypatch.setattr(targets_module, "TARGETS", {**TARGETS, "eager-copy": eager})
    assert fp32_target("eager-copy") == "eager-copy"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(SciquantError, match="'trt-a100'.*cpu-x86, litert-cpu, npu-pow2"):
        get_target("trt-a100")


@pytest.mark.parametrize(
    ("target", "precision", "framework", "simulated", "runtime"),
    [
        ("reference", "fp32", "torch", False, "torch"),
        ("reference", "fp32", "keras", False, "keras"),
        ("openvino-cpu", "bf16", "torch", False, "openvino"),
        ("openvino-cpu", "w8a8", "torch", False, "openvino"),
        ("reference", "w8a8", "torch", True, "torch"),
        ("trt-v100", "w8a8", "torch", False, "tensorrt"),
        ("trt-v100", "w5a8", "torch", True, "torch"),
        ("trt-rtx3090", "fp16", "keras", False, "tensorrt"),
        ("cpu-x86", "w8a8", "torch", False, "onnxruntime"),
        ("cpu-x86", "w4a4", "torch", True, "torch"),
        ("litert-cpu", "w8a8", "keras", False, "litert"),
        ("litert-cpu", "fp16", "keras", False, "litert"),
        ("npu-pow2", "w8a8", "torch", True, "torch"),
    ],
)
def test_plans(target, precision, framework, simulated, runtime):
    plan = get_target(target).plan(precision, framework)
    assert (plan.simulated, plan.runtime) == (simulated, runtime)
    assert str(plan.precision) == precision and plan.target.name == target
    assert plan.label == ("simulated" if simulated else "native")


@pytest.mark.parametrize(
    ("target", "precision", "framework", "why"),
    [
        ("litert-cpu", "w8a8", "torch", "keras models only"),
        ("cpu-x86", "fp16", "torch", "no simulation"),
        ("cpu-x86", "bf16", "torch", "no simulation"),
        ("npu-pow2", "fp16", "keras", "no simulation"),
        ("npu-pow2", "fp32", "torch", "baseline is target 'reference'"),
        ("reference", "fp16", "torch", "native: fp32"),
    ],
)
def test_impossible_plans_name_target_precision_and_why(target, precision, framework, why):
    with pytest.raises(SciquantError, match=f"'{target}'.*{precision}.*{why}"):
        get_target(target).plan(precision, framework)


def test_plan_rejects_unknown_frameworks_and_precisions():
    with pytest.raises(SciquantError, match="'jax'"):
        get_target("reference").plan("fp32", "jax")
    with pytest.raises(SciquantError, match="'w8a9'"):
        get_target("reference").plan("w8a9", "torch")


def test_target_schemes_give_the_documented_specs():
    trt = get_target("trt-rtx3090")
    weight = trt.weight_spec(8)
    assert (weight.qmin, weight.qmax, weight.granularity) == (-127, 127, PerChannel(0))
    assert trt.weight_spec(8, channel_axis=-1).granularity == PerChannel(-1)
    activation = trt.activation_spec(8)
    assert (activation.qmin, activation.qmax, activation.granularity) == (-128, 127, PerTensor())
    cpu = get_target("cpu-x86").activation_spec(8)
    assert (cpu.symmetric, cpu.qmin, cpu.qmax) == (False, 0, 255)
    litert = get_target("litert-cpu").activation_spec(8)
    assert (litert.symmetric, litert.qmin, litert.qmax) == (False, -128, 127)
    npu = get_target("npu-pow2")
    assert npu.weight_spec(8).scale_kind == "pow2" and npu.weight_spec(8).granularity == PerTensor()
    assert npu.activation_spec(8).scale_kind == "pow2"
    reference = get_target("reference")
    assert reference.weight_spec(3) == QuantSpec(3, True, PerChannel(0))
    assert reference.activation_spec(5) == QuantSpec(5, False, PerTensor())


def test_a_row_with_a_misspelt_precision_is_refused():
    with pytest.raises(SciquantError, match="'W8A8'"):
        dataclasses.replace(get_target("cpu-x86"), native_precisions=frozenset({"W8A8"}))
