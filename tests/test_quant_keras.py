"""Keras fake-quantization (`sciquant.quant.keras`), TFLite conversion, the LiteRT runner, and
the md quantize stage.

The models here are small ICNNMD-shaped CNNs (the same layer types: Conv2D, Activation,
MaxPooling2D, Dropout, Flatten, Dense) so that the whole file runs in well under a minute on two
cores; TensorFlow and LiteRT are limited to one thread.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")

from sciquant.errors import SciquantError  # noqa: E402
from sciquant.quant import keras as qk  # noqa: E402
from sciquant.quant import tflite  # noqa: E402
from sciquant.quant.observers import make_observer  # noqa: E402
from sciquant.quant.spec import PerChannel, PerTensor, QuantSpec, fake_quantize  # noqa: E402
from sciquant.runtime.litert import LiteRTRunner  # noqa: E402
from sciquant.workloads.md import quantize as quant_md  # noqa: E402

try:  # limit TensorFlow to one thread; impossible once another test has started it
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

GRID = 12


def tiny_cnn(
    grid: int = GRID, n_out: int = 2, softmax: bool = True, seed: int = 0, spread: bool = True
):
    """ICNNMD's layer sequence with fewer filters; `spread`: logits scaled to a std of a few
    units and centred."""
    init = iter(range(seed * 100, seed * 100 + 100))

    def glorot():
        return keras.initializers.GlorotUniform(seed=next(init))

    layers = keras.layers
    inputs = keras.Input((grid, grid, 3), name="pixelmap")
    x = layers.Conv2D(8, 3, padding="same", kernel_initializer=glorot(), name="conv1")(inputs)
    x = layers.Conv2D(8, 3, kernel_initializer=glorot(), name="conv2")(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25, seed=next(init))(x)
    x = layers.Conv2D(16, 3, padding="same", kernel_initializer=glorot(), name="conv3")(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, kernel_initializer=glorot(), name="dense1")(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(0.5, seed=next(init))(x)
    x = layers.Dense(n_out, kernel_initializer=glorot(), name="logits")(x)
    if softmax:
        x = layers.Activation("softmax", name="softmax")(x)
    model = keras.Model(inputs, x)
    if not spread:
        return model
    # Random weights give nearly constant logits on random pixel maps: scale and centre them
    # so that the classes and the probabilities spread across (0, 1).
    logits = model.get_layer("logits")
    logits.kernel.assign(logits.kernel.numpy() * 30.0)
    probe = keras.Model(inputs, logits.output)
    logits.bias.assign(-probe(frames(64, grid, seed=99)).numpy().mean(axis=0))
    return model


def frames(n: int, grid: int = GRID, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, grid, grid, 3), dtype=np.float32)


# -- TF fake-quant ops against the core ------------------------------------------------------


def _qparams(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    observer = make_observer("minmax", spec.granularity)
    observer.update(x * 0.9)  # some values clip
    return observer.qparams(spec)


def _assert_matches_core(got: np.ndarray, x: np.ndarray, scale, zero_point, spec) -> None:
    """Equal to the float64 core to float32 rounding; a value that lies within float32 error of
    a rounding boundary (x/s + zp = n + 1/2) may land one step away (the TF op rounds half up),
    which random data essentially never hits."""
    reference = fake_quantize(x.astype(np.float64), scale.astype(np.float64), zero_point, spec)
    axis = spec.granularity.axis if isinstance(spec.granularity, PerChannel) else None
    step = scale.astype(np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        step = step.reshape(shape)
    step = np.broadcast_to(step, x.shape)
    ratio = x / step
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    error = np.abs(got.astype(np.float64) - reference)
    # float32 rounding of the op's arithmetic on values up to the range ends (2^bits steps)
    tolerance = 8 * np.finfo(np.float32).eps * (np.abs(x) + 2**spec.bits * step)
    assert np.all(error[~near_tie] <= tolerance[~near_tie])
    assert np.all(error[near_tie] <= step[near_tie] * (1 + 1e-5))


CASES = {
    "weights symmetric per-channel narrow int8": QuantSpec(
        8, True, PerChannel(-1), narrow_range=True
    ),
    "weights symmetric per-channel narrow int4": QuantSpec(
        4, True, PerChannel(-1), narrow_range=True
    ),
    "weights symmetric per-channel full int8 [-128, 127]": QuantSpec(8, True, PerChannel(-1)),
    "activations asymmetric uint8 (zero-point nudging)": QuantSpec(8, False, PerTensor()),
    "activations asymmetric signed int8 (TFLite)": QuantSpec(8, False, PerTensor(), signed=True),
    "activations symmetric full int8": QuantSpec(8, True, PerTensor()),
    "activations asymmetric uint4": QuantSpec(4, False, PerTensor()),
    "pow2 symmetric per tensor": QuantSpec(8, True, PerTensor(), scale_kind="pow2"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tf_fake_quant_matches_core(name: str) -> None:
    spec = CASES[name]
    rng = np.random.default_rng(0)
    if isinstance(spec.granularity, PerChannel):
        x = (rng.normal(size=(3, 3, 8, 16)) * rng.uniform(0.1, 2, 16)).astype(np.float32)
    else:
        x = (rng.normal(size=(4, 6, 6, 8)) * 2 + 0.7).astype(np.float32)
    scale, zero_point = _qparams(x, spec)
    got = qk.fake_quantize_tf(tf.constant(x), scale, zero_point.astype(np.float32), spec).numpy()
    _assert_matches_core(got, x, scale, zero_point, spec)


def test_dense_kernel_transposed_per_channel_matches_core() -> None:
    """QuantDense quantizes the (out, in) kernel along axis 0 (QuantizeAndDequantizeV3)."""
    spec = QuantSpec(8, True, PerChannel(-1), narrow_range=True)
    kernel = np.random.default_rng(2).normal(size=(40, 24)).astype(np.float32)
    scale, zero_point = _qparams(kernel, spec)
    transposed = QuantSpec(8, True, PerChannel(0), narrow_range=True)
    got = qk.fake_quantize_tf(tf.constant(kernel.T), scale, zero_point, transposed).numpy().T
    _assert_matches_core(got, kernel, scale, zero_point, spec)


def test_pow2_ties_round_half_to_even_like_the_core() -> None:
    """Dyadic data at a power-of-two scale sits exactly on ties: the plain-op path used for
    pow2 matches the core exactly, TF's fake-quant op (half up) would not."""
    spec = QuantSpec(8, True, PerTensor(), scale_kind="pow2")
    x = (np.arange(-400, 400) / 8).astype(np.float32)
    scale, zero_point = np.float32(0.25), np.int32(0)
    reference = fake_quantize(x, scale, zero_point, spec)
    got = qk.fake_quantize_tf(tf.constant(x), scale, zero_point, spec).numpy()
    np.testing.assert_array_equal(got, reference)
    lo, hi = qk.tf_min_max(scale, zero_point, spec)
    op = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8).numpy()
    assert np.any(op != reference)


def test_tf_min_max_round_trips_scale_and_zero_point() -> None:
    spec = QuantSpec(8, False, PerTensor(), signed=True)
    lo, hi = qk.tf_min_max(np.float32(0.02), np.int32(-30), spec)
    assert lo == pytest.approx(-98 * 0.02) and hi == pytest.approx(157 * 0.02)


def test_lsq_gradient_scale() -> None:
    """d/ds of sum(fq(x)): round(x/s) - x/s where round(x/s) is inside [qmin, qmax], qmin or
    qmax (- zp) where it is clamped, times 1 / sqrt(n · qmax) (LSQ; as torch's kernel)."""
    spec = QuantSpec(4, True, PerTensor())
    x = tf.constant(np.linspace(-1.5, 1.5, 64, dtype=np.float32))
    scale = tf.Variable(0.1)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(qk._fake_quantize_lsq(x, scale, tf.constant(0.0), spec, False))
    gradient = tape.gradient(total, scale).numpy()
    v = x.numpy() / 0.1
    inside = (np.rint(v) >= spec.qmin) & (np.rint(v) <= spec.qmax)  # clamped after rounding
    expected = np.where(inside, np.rint(v) - v, np.clip(v, spec.qmin, spec.qmax)).sum()
    assert gradient == pytest.approx(expected / np.sqrt(64 * spec.qmax), rel=1e-4)


# -- quantize_model, calibrate, save/load ----------------------------------------------------


@pytest.fixture(scope="module")
def raw_model():
    """Random weights as initialized: logits of order one."""
    return tiny_cnn(softmax=False, spread=False)


@pytest.fixture(scope="module")
def logits_model():
    return tiny_cnn(softmax=False)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_quantize_model_w8a8_close_and_w4_coarser(raw_model) -> None:
    x = frames(96)
    reference = raw_model(x[64:]).numpy()
    errors = {}
    for precision in ("w8a8", "w4a8"):
        qmodel = qk.quantize_model(raw_model, "reference", precision, "ptq-minmax")
        assert [type(layer).__name__ for layer in qk.quant_layers(qmodel).values()] == [
            "QuantConv2D",
            "QuantConv2D",
            "QuantConv2D",
            "QuantDense",
            "QuantDense",
        ]
        qk.calibrate(qmodel, [x[:32], x[32:64]])
        assert {layer.mode for layer in qk.quant_layers(qmodel).values()} == {"quantize"}
        errors[precision] = _relative_error(qmodel(x[64:]).numpy(), reference)
        conv1 = qk.quant_layers(qmodel)["conv1"]
        assert conv1.qparams("weight")[0].shape == (8,)  # per output channel
    assert errors["w8a8"] < 0.03  # measured 0.012
    assert errors["w8a8"] < errors["w4a8"] < 0.3  # measured 0.12


def test_qat_starts_from_mse_ranges_unless_told_minmax(raw_model) -> None:
    """quantize.qat.init on the Keras side: QAT calibrates as ptq-mse by default and as
    ptq-minmax with ``minmax`` (the same table as torch)."""
    x = frames(64)

    def qparams(method: str, **kwargs) -> list[np.ndarray]:
        qmodel = qk.quantize_model(raw_model, "reference", "w4a4", method, **kwargs)
        qk.calibrate(qmodel, [x[:32], x[32:]])
        return [
            array
            for layer in qk.quant_layers(qmodel).values()
            for which in ("input", "weight")
            for array in layer.qparams(which)
        ]

    mse, minmax = qparams("ptq-mse"), qparams("ptq-minmax")
    for got, want in zip(qparams("qat-lsq"), mse, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(qparams("qat-lsq", qat_init="minmax"), minmax, strict=True):
        np.testing.assert_array_equal(got, want)
    assert float(mse[0]) < float(minmax[0])  # conv1's 4-bit input: MSE clips


def test_fp16_simulation_and_impossible_combinations(raw_model) -> None:
    x = frames(8)
    qmodel = qk.quantize_model(raw_model, "trt-v100", "fp16", "none")
    np.testing.assert_allclose(qmodel(x).numpy(), raw_model(x).numpy(), rtol=1e-2, atol=1e-2)
    with pytest.raises(SciquantError, match="npu-pow2"):
        qk.quantize_model(raw_model, "npu-pow2", "fp16", "none")
    with pytest.raises(SciquantError, match="fp16 only"):
        qk.quantize_model(raw_model, "reference", "w8a8", "none")
    with pytest.raises(SciquantError, match="calibration"):
        qk.set_mode(qk.quantize_model(raw_model, "reference", "w8a8"), "quantize")


def test_quantized_model_round_trips_through_keras_file(tmp_path, raw_model) -> None:
    x = frames(40)
    qmodel = qk.quantize_model(raw_model, "npu-pow2", "w6a8", "ptq-mse")
    qk.calibrate(qmodel, [x[:32]])
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x[32:]).numpy(), qmodel(x[32:]).numpy())
    assert qk.layer_summary(loaded) == qk.layer_summary(qmodel)
    assert qk.model_info(loaded)["target"] == "npu-pow2"


def test_litert_model_with_output_quantizers_round_trips(tmp_path, softmax_model) -> None:
    x = frames(40)
    qmodel = qk.quantize_model(softmax_model, "litert-cpu", "w8a8", "ptq-percentile")
    qk.calibrate(qmodel, [x[:32]])
    layers = qk.quant_layers(qmodel)
    assert layers["logits"].quantize_output and not layers["dense1"].quantize_output
    assert isinstance(layers["softmax"], qk.QuantActivation)
    qmodel.save(tmp_path / "litert.keras")
    loaded = keras.models.load_model(tmp_path / "litert.keras")
    np.testing.assert_array_equal(loaded(x[32:]).numpy(), qmodel(x[32:]).numpy())
    assert np.all(
        np.abs(loaded(x[32:]).numpy() * 256 - np.rint(loaded(x[32:]).numpy() * 256)) < 1e-4
    )


# -- TFLite and the LiteRT runner ------------------------------------------------------------


@pytest.fixture(scope="module")
def softmax_model():
    return tiny_cnn(softmax=True, seed=3)


def _litert_int8(model, tmp_path, name: str):
    x = frames(160, seed=5)
    qmodel = qk.quantize_model(model, "litert-cpu", "w8a8", "ptq-minmax")
    qk.calibrate(qmodel, [x[:64], x[64:128]])
    path = tflite.convert(qmodel, tmp_path / name, "w8a8")
    return qmodel, path, x[128:]  # held-out inputs


def test_litert_int8_agrees_with_simulation_logits(tmp_path, logits_model) -> None:
    """Bound: TFLite computes every Conv/FC exactly in int32 and requantizes onto the same
    grids as the simulation (TFLite adopted our ranges). The two can differ only where a
    value lies within float32 / fixed-point error of a rounding boundary, and then by one code
    of that tensor; upstream one-code differences move the logits by a small fraction of their
    step. So the output (the logits tensor) agrees within ONE output step, and almost always
    exactly."""
    qmodel, path, held_out = _litert_int8(logits_model, tmp_path, "logits.tflite")
    assert tflite.uses_fake_quant_ranges(qmodel, path)
    runner = LiteRTRunner(path, threads=1)
    assert runner.precision == "int8" and runner.input_details["dtype"] == "int8"
    step = runner.output_details["scale"]
    assert step == pytest.approx(qk.layer_summary(qmodel)["logits"]["output"]["scale"])
    difference = np.abs(runner.predict(held_out, batch_size=7) - qmodel(held_out).numpy())
    assert difference.max() <= step * (1 + 1e-4)
    assert np.mean(difference < 1e-3 * step) >= 0.9


def test_litert_int8_softmax_within_one_step(tmp_path, softmax_model) -> None:
    """With a softmax output TFLite writes probabilities on its fixed grid 1/256 (zero point
    -128), which the simulation reproduces (QuantActivation). Given equal logits the two differ
    by at most one 1/256 step (TFLite's fixed-point exp vs float exp, then rounding). A logit
    one code s_l apart (see the bound above) moves a two-class probability by at most
    max p'(l) · s_l = s_l / 4, hence the general bound 1/256 + s_l / 4."""
    qmodel, path, held_out = _litert_int8(softmax_model, tmp_path, "softmax.tflite")
    assert "softmax" in qk.quant_layers(qmodel)
    runner = LiteRTRunner(path, threads=1)
    assert runner.output_details["scale"] == pytest.approx(1 / 256)
    assert runner.output_details["zero_point"] == -128
    probabilities = runner.predict(held_out)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(held_out), 2)
    logit_step = qk.layer_summary(qmodel)["logits"]["output"]["scale"]
    difference = np.abs(probabilities - qmodel(held_out).numpy())
    assert difference.max() <= 1 / 256 + logit_step / 4 + 1e-6
    assert np.mean(difference <= 1 / 256 + 1e-6) >= 0.9
    assert 0.1 < probabilities[:, 1].mean() < 0.9 and probabilities[:, 1].std() > 0.1
    timing = runner.time_batch1(held_out, repeats=3, warmup=1)
    assert set(timing) >= {"h2d_ms", "compute_ms", "d2h_ms", "total_ms", "total_ms_min"}


def test_tflite_fp16_close_to_fp32_and_runner_errors(tmp_path, softmax_model) -> None:
    x = frames(16, seed=7)
    path = tflite.convert(softmax_model, tmp_path / "fp16.tflite", "fp16")
    runner = LiteRTRunner(path, threads=1)
    assert runner.precision == "fp16" and runner.input_details["dtype"] == "float32"
    expected = softmax_model(x).numpy()
    np.testing.assert_allclose(runner.predict(x, batch_size=5), expected, rtol=1e-2, atol=1e-3)

    with pytest.raises(SciquantError, match="not found"):
        LiteRTRunner(tmp_path / "missing.tflite")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(SciquantError, match="garbage.tflite"):
        LiteRTRunner(garbage)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SciquantError, match="truncated.tflite"):
        LiteRTRunner(truncated)
    with pytest.raises(SciquantError, match="w8a8 only"):
        qmodel = qk.quantize_model(softmax_model, "litert-cpu", "w8a8")
        qk.calibrate(qmodel, [x])
        tflite.convert(qmodel, tmp_path / "bad.tflite", "fp16")


# -- the md quantize stage -------------------------------------------------------------------


@pytest.fixture(scope="module")
def md_inputs(tmp_path_factory):
    """A tiny prepared folder (grid 10: 40 train, 8 val, 8 test frames) and an FP32 model."""
    from sciquant.models.icnnmd import build_icnnmd

    root = tmp_path_factory.mktemp("md")
    prepared = root / "prepared"
    prepared.mkdir()
    x = frames(56, grid=10, seed=11)
    y = (x[..., 0].mean(axis=(1, 2)) > 0.5).astype(np.int64)
    split = np.array([0] * 40 + [1] * 8 + [2] * 8, dtype=np.int8)
    n = np.arange(len(x))
    np.savez(prepared / "pixelmaps.npz", x=x, y=y, trajectory=y, frame=n, split=split)
    index = {"format": "sciquant-md-pixelmaps", "version": 1, "grid": 10}
    (prepared / "index.json").write_text(json.dumps(index))
    checkpoint = root / "fp32" / "model.keras"
    checkpoint.parent.mkdir()
    build_icnnmd(10, seed=0).save(checkpoint)
    return checkpoint, prepared, root


def _run_md(md_inputs, target: str, method: str, precision: str, **kwargs):
    checkpoint, prepared, root = md_inputs
    out = root / target / method / precision
    settings = {"calibration_samples": 24, "batch_size": 16, "qat_epochs": 1, "seed": 0}
    artifact = quant_md.run(
        checkpoint,
        prepared,
        out,
        target=target,
        method=method,
        precision=precision,
        threads=1,
        **{**settings, **kwargs},
    )
    summary = json.loads((out / "quantization.json").read_text())
    assert quant_md.artifact_for(out) == artifact
    return artifact, summary


def test_md_reference_ptq_simulated_keras(md_inputs) -> None:
    artifact, summary = _run_md(md_inputs, "reference", "ptq-minmax", "w8a8")
    assert artifact.name == "model.keras"
    assert (summary["plan"], summary["runtime"], summary["simulated"]) == (
        "simulated",
        "keras",
        True,
    )
    assert summary["calibration"]["frames"] == 24
    assert summary["layers"]["conv1"]["input"]["zero_point"] == 0  # uint8 pixels from 0
    from sciquant.runtime.keras import load_keras_model

    assert qk.is_quantized(load_keras_model(artifact))


def test_md_litert_int8_native_carries_our_scales(md_inputs) -> None:
    artifact, summary = _run_md(md_inputs, "litert-cpu", "ptq-minmax", "w8a8")
    assert artifact.name == "model.tflite" and summary["plan"] == "native"
    assert summary["runtime"] == "litert"
    assert summary["tflite"]["adopted_fake_quant_ranges"] is True
    assert summary["tflite"]["inputs"][0]["dtype"] == "int8"
    assert summary["tflite"]["inputs"][0]["scale"] == pytest.approx(
        summary["layers"]["conv1"]["input"]["scale"]
    )
    assert LiteRTRunner(artifact, threads=1).precision == "int8"


def test_md_litert_fp16_and_qat_lsq_w4(md_inputs) -> None:
    artifact, summary = _run_md(md_inputs, "litert-cpu", "none", "fp16")
    assert artifact.name == "model.tflite" and summary["layers"] == {}
    assert LiteRTRunner(artifact, threads=1).precision == "fp16"

    artifact, summary = _run_md(md_inputs, "reference", "qat-lsq", "w4a8")
    assert artifact.name == "model.keras" and summary["plan"] == "simulated"
    assert len(summary["qat"]["history"]) == 1
    assert summary["layers"]["dense1"]["weight_spec"]["bits"] == 4


def test_md_impossible_and_unavailable(md_inputs) -> None:
    checkpoint, prepared, root = md_inputs
    with pytest.raises(SciquantError, match="npu-pow2"):
        quant_md.run(
            checkpoint, prepared, root / "x", target="npu-pow2", method="none", precision="fp16"
        )
    with pytest.raises(SciquantError, match="fp16 only"):
        quant_md.run(
            checkpoint, prepared, root / "x", target="litert-cpu", method="none", precision="w8a8"
        )
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        with pytest.raises(SciquantError, match="tf2onnx"):
            quant_md.run(
                checkpoint,
                prepared,
                root / "x",
                target="trt-v100",
                method="ptq-minmax",
                precision="w8a8",
            )
    with pytest.raises(SciquantError, match="no quantized model"):
        quant_md.artifact_for(root / "nothing")


def test_bench_cnn_rows_and_ratios() -> None:
    """`sciquant bench cnn` on the smallest grid: every variant timed, ratios from the times."""
    from sciquant.benchmarks import cnn

    rows = cnn.run(grids=(10,), repeats=3, warmup=1, delegates=(True,))
    assert [row["variant"] for row in rows] == list(cnn.VARIANTS)
    base = rows[0]
    for row in rows:
        assert row["total_ms"] > 0 and row["compute_ms"] > 0 and row["file_bytes"] > 0
        assert row["speedup_total"] > 0
    assert base["speedup_total"] == pytest.approx(1.0)
    by_variant = {row["variant"]: row for row in rows}
    # int8 weights: a quarter of the float32 file (plus graph and scales)
    assert by_variant["int8"]["file_bytes"] < 0.4 * by_variant["fp32"]["file_bytes"]
    assert by_variant["dyn-int8"]["file_bytes"] < 0.4 * by_variant["fp32"]["file_bytes"]
    table = cnn.format_table(rows)
    assert "dyn-int8" in table and "goal" in table
