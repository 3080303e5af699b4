"""AdaRound and empirical bias correction for Keras models (sciquant.quant.keras_adaround): the
hand-made cases of tests/test_quant_adaround.py in Keras, a tiny ICNNMD, and the md quantize
stage with ptq-adaround / ptq-biascorr (LiteRT included)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from sciquant.errors import SciquantError  # noqa: E402
from sciquant.quant import keras as quant_keras  # noqa: E402
from sciquant.quant.keras_adaround import (  # noqa: E402
    AdaRoundSettings,
    adaround_keras,
    correct_bias_keras,
    rectified_sigmoid,
)
from sciquant.quant.observers import check_method_limits  # noqa: E402


def _set_grid(layer, weight_scale: float, input_scale: float) -> None:
    """Put a calibrated QuantDense on a hand-chosen grid (zero points 0)."""
    layer.weight_scale.assign(np.full(layer.weight_scale.shape, weight_scale, np.float32))
    layer.weight_zero_point.assign(np.zeros(layer.weight_zero_point.shape, np.float32))
    layer.input_scale.assign(input_scale)
    layer.input_zero_point.assign(0.0)


def _dense_chain(*kernels: np.ndarray, biases: list[float] | None = None) -> keras.Model:
    inputs = keras.Input((kernels[0].shape[0],))
    y = inputs
    for index, kernel in enumerate(kernels):
        layer = keras.layers.Dense(kernel.shape[1], use_bias=biases is not None, name=f"d{index}")
        y = layer(y)
        layer.kernel.assign(kernel)
        if biases is not None:
            layer.bias.assign(np.full((kernel.shape[1],), biases[index], np.float32))
    return keras.Model(inputs, y)


def _collinear_inputs(rows: int = 64) -> np.ndarray:
    """x = [a, 2a] with a on the input grid (multiples of 1/32 in [0.5, 1.5])."""
    a = np.arange(rows, dtype=np.float32) % 33 / 32 + 0.5
    return np.stack([a, 2 * a], axis=1)


def _fake_quantized_kernel(layer) -> np.ndarray:
    from sciquant.quant.keras_adaround import _quantized_kernel

    return np.asarray(_quantized_kernel(layer).numpy())


def test_rectified_sigmoid_and_settings_match_the_torch_version():
    assert rectified_sigmoid(np.array([-100.0, 0.0, 100.0], np.float32)).numpy().tolist() == [
        0.0,
        0.5,
        1.0,
    ]
    from sciquant.quant import adaround as torch_adaround

    # one definition, shared without importing a framework
    assert AdaRoundSettings is torch_adaround.AdaRoundSettings
    with pytest.raises(SciquantError, match="warmup"):
        AdaRoundSettings(warmup=1.5)


def test_the_module_does_not_import_torch():
    code = (
        "import sys; import sciquant.quant.keras_adaround, sciquant.workloads.md.quantize; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adaround_finds_the_rounding_nearest_misses_on_a_2x2_dense():
    """The torch test's case: W = [[0.6, 0.7], [0.45, 0.3]] (a Keras kernel is W.T), grid 1,
    inputs [a, 2a] on the input grid. Nearest is [[1, 1], [0, 0]]; AdaRound finds
    [[0, 1], [1, 0]], the best of the 16 roundings."""
    weight = np.array([[0.6, 0.7], [0.45, 0.3]], np.float32)
    model = _dense_chain(weight.T)
    x = _collinear_inputs()
    qmodel = quant_keras.quantize_model(model, "reference", "w4a8", "ptq-adaround")
    quant_keras.calibrate(qmodel, [x])
    layer = qmodel.get_layer("d0")
    _set_grid(layer, weight_scale=1.0, input_scale=1 / 32)

    def error(w: np.ndarray) -> float:  # w as [out, in]
        return float(np.mean((x @ w.T - x @ weight.T) ** 2))

    nearest = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(_fake_quantized_kernel(layer).T, nearest)
    candidates = [
        np.array(c, np.float32).reshape(2, 2) for c in itertools.product([0, 1], repeat=4)
    ]
    best = min(candidates, key=error)
    np.testing.assert_array_equal(best, [[0.0, 1.0], [1.0, 0.0]])
    assert error(best) < 0.01 < 0.5 < error(nearest)

    summary = adaround_keras(
        qmodel, model, [x], AdaRoundSettings(iterations=2000, learning_rate=0.01), None
    )
    np.testing.assert_array_equal(layer.kernel.numpy().T, best)
    # the chosen integers are what the fake-quant forward uses
    np.testing.assert_array_equal(_fake_quantized_kernel(layer).T, best)
    np.testing.assert_allclose(qmodel(x).numpy(), x @ best.T, atol=1e-6)
    assert summary["d0"]["flipped"] == 0.5
    assert summary["d0"]["mse_adaround"] == pytest.approx(error(best), rel=1e-4)
    assert summary["d0"]["mse_nearest"] == pytest.approx(error(nearest), rel=1e-4)
    np.testing.assert_array_equal(model.get_layer("d0").kernel.numpy(), weight.T)  # untouched


def test_bias_correction_adds_the_mean_shift_and_runs_in_order():
    """As in torch: layer 0's w = 0.3 rounds to 0 on a grid of 1, so its bias gains exactly
    0.3·mean(x); layer 1 (w = 1, exact) then needs at most half an input step."""
    model = _dense_chain(
        np.array([[0.3]], np.float32), np.array([[1.0]], np.float32), biases=[0.25, 0.0]
    )
    x = (np.arange(40, dtype=np.float32) / 16).reshape(-1, 1)  # on the 1/16 grid
    qmodel = quant_keras.quantize_model(model, "reference", "w4a8", "ptq-biascorr")
    quant_keras.calibrate(qmodel, [x])
    first, second = qmodel.get_layer("d0"), qmodel.get_layer("d1")
    _set_grid(first, weight_scale=1.0, input_scale=1 / 16)
    _set_grid(second, weight_scale=1.0, input_scale=1 / 64)
    shifts = correct_bias_keras(qmodel, model, [x], progress=None)
    expected = 0.3 * float(x.mean())
    assert float(first.bias.numpy()[0]) == pytest.approx(0.25 + expected, abs=1e-6)
    assert shifts["d0"] == pytest.approx(expected, abs=1e-6)
    assert abs(float(second.bias.numpy()[0])) <= 0.5 / 64 + 1e-6
    difference = float(np.mean(qmodel(x).numpy() - model(x).numpy()))
    assert difference == pytest.approx(0.0, abs=0.5 / 64 + 1e-6)


def test_adaround_refuses_an_uncalibrated_model():
    model = _dense_chain(np.ones((2, 2), np.float32))
    qmodel = quant_keras.quantize_model(model, "reference", "w4a8", "ptq-adaround")
    with pytest.raises(SciquantError, match="calibrate the model first"):
        adaround_keras(qmodel, model, [np.ones((3, 2), np.float32)])


@pytest.mark.parametrize("method", ["ptq-adaround", "ptq-biascorr"])
def test_keras_models_may_take_the_methods(method):
    check_method_limits(method, "litert-cpu", "keras")
    check_method_limits(method, "reference", "keras")


def test_adaround_lowers_each_layers_reconstruction_error_on_a_tiny_icnnmd():
    from sciquant.models.icnnmd import build_icnnmd

    model = build_icnnmd(10, seed=0)
    x = np.random.default_rng(3).random((48, 10, 10, 3), dtype=np.float32)
    batches = [x[:24], x[24:]]
    qmodel = quant_keras.quantize_model(model, "reference", "w3a8", "ptq-adaround")
    quant_keras.calibrate(qmodel, batches)
    layers = {
        name: layer
        for name, layer in quant_keras.quant_layers(qmodel).items()
        if isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense)
    }
    nearest = {name: _fake_quantized_kernel(layer) for name, layer in layers.items()}
    summary = adaround_keras(
        qmodel, model, batches, AdaRoundSettings(iterations=200, learning_rate=0.01), None
    )
    assert list(summary) == ["conv1", "conv2", "conv3", "conv4", "dense1", "logits"]
    improved = [n for n, s in summary.items() if s["mse_adaround"] < 0.9 * s["mse_nearest"]]
    assert len(improved) >= 4, summary
    for name, layer in layers.items():
        assert summary[name]["mse_adaround"] <= summary[name]["mse_nearest"], name
        kernel = layer.kernel.numpy()
        scale = layer.qparams("weight")[0]
        # on the grid (the fake-quant returns the kernel), at most one step from nearest
        np.testing.assert_allclose(_fake_quantized_kernel(layer), kernel, atol=1e-6, rtol=0)
        assert np.all(np.abs(kernel - nearest[name]) <= scale * 1.0001), name
    assert any(s["flipped"] > 0 for s in summary.values())


def _tiny_md(root):
    """56 random 10×10 pixel maps (40 train, 8 valid, 8 test) and an untrained ICNNMD."""
    from sciquant.models.icnnmd import build_icnnmd

    prepared = root / "prepared"
    prepared.mkdir()
    x = np.random.default_rng(11).random((56, 10, 10, 3), dtype=np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0.5).astype(np.int64)
    split = np.array([0] * 40 + [1] * 8 + [2] * 8, dtype=np.int8)
    np.savez(prepared / "pixelmaps.npz", x=x, y=y, trajectory=y, frame=np.arange(56), split=split)
    index = {"format": "sciquant-md-pixelmaps", "version": 1, "grid": 10}
    (prepared / "index.json").write_text(json.dumps(index))
    checkpoint = root / "fp32" / "model.keras"
    checkpoint.parent.mkdir()
    build_icnnmd(10, seed=0).save(checkpoint)
    return prepared, checkpoint


def test_md_quantize_stage_runs_adaround_for_reference_and_litert(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from sciquant.runtime.keras import load_keras_model
    from sciquant.workloads.md import evaluate as evaluate_md
    from sciquant.workloads.md import quantize as quant_md

    prepared, checkpoint = _tiny_md(tmp_path)

    def run(target: str, method: str, precision: str) -> tuple[dict, dict, object]:
        out = tmp_path / target / method / precision
        artifact = quant_md.run(
            checkpoint, prepared, out, target=target, method=method, precision=precision,
            calibration_samples=24, batch_size=16, seed=0, threads=1,
            adaround={"iterations": 60, "learning_rate": 0.01},
        )  # fmt: skip
        coordinates = {"dataset": "g", "model": "i", "seed": 0, "target": target,
                       "method": method, "precision": precision}  # fmt: skip
        path = evaluate_md.run(
            prepared, artifact, out / "metrics.json", coordinates=coordinates,
            simulated=target == "reference", repeats=1, threads=1, debug_inputs=4,
        )  # fmt: skip
        summary = json.loads((out / "quantization.json").read_text())
        return json.loads(path.read_text())["metrics"], summary, artifact

    metrics, summary, artifact = run("reference", "ptq-adaround", "w4a8")
    assert artifact.name == "model.keras"
    assert summary["weights"]["settings"]["iterations"] == 60
    assert set(summary["weights"]["layers"]) == {"conv1", "conv2", "conv3", "conv4", "dense1",
                                                 "logits"}  # fmt: skip
    assert 0.0 <= metrics["accuracy"] <= 1.0

    metrics, summary, artifact = run("litert-cpu", "ptq-adaround", "w8a8")
    assert artifact.name == "model.tflite"
    assert any(s["flipped"] > 0 for s in summary["weights"]["layers"].values())
    simulation = load_keras_model(artifact.parent / summary["simulation"])
    fp32 = load_keras_model(checkpoint)
    moved = 0
    for name, layer in quant_keras.quant_layers(simulation).items():
        if isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense):
            kernel = layer.kernel.numpy()
            np.testing.assert_allclose(_fake_quantized_kernel(layer), kernel, atol=1e-6, rtol=0)
            moved += int(np.any(kernel != fp32.get_layer(name).kernel.numpy()))
    assert moved >= 1
    # the .tflite carries AdaRound's integers: the deployed model agrees with the simulation
    assert metrics["sim_vs_deployed_unit"] == "output_step"
    assert metrics["sim_vs_deployed_max_steps"] <= 1.0 + 1e-6
    assert summary["tflite"]["adopted_fake_quant_ranges"] is True

    metrics, summary, _ = run("reference", "ptq-biascorr", "w4a8")
    assert set(summary["weights"]["layers"]) == {"conv1", "conv2", "conv3", "conv4", "dense1",
                                                 "logits"}  # fmt: skip
