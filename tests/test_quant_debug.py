"""Quantization debugging (`sciquant.quant.debug`): per-layer output SQNR against FP32 on hand-made
cases, the simulation's agreement with a deployed runtime (and that it catches a mismatch), the
metrics.json keys the evaluate stages write, and the report's table of them."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sciquant.provenance import write_json  # noqa: E402
from sciquant.quant.debug import (  # noqa: E402
    describe,
    output_agreement,
    sqnr_db,
    sqnr_metrics,
    torch_layer_sqnr,
    torch_outputs,
)
from sciquant.quant.pytorch import calibrate, quantize_model  # noqa: E402
from sciquant.report.cube import read_metrics  # noqa: E402
from sciquant.workloads.bloodflow import evaluate as evaluate_bloodflow  # noqa: E402
from sciquant.workloads.bloodflow import quantize as quant_bloodflow  # noqa: E402

#: Inputs whose quantization error on the grid of step 0.5 is known by hand (no ties).
X = np.array([0.3, 1.1, -0.7, 2.0], dtype=np.float32)


def on_grid(x: np.ndarray, scale: float) -> np.ndarray:
    """Round to the grid of `scale` (half to even; X has no ties), float64."""
    return np.rint(np.asarray(x, np.float64) / scale) * scale


def expected_sqnr(reference: np.ndarray, quantized: np.ndarray) -> float:
    reference, quantized = np.asarray(reference, np.float64), np.asarray(quantized, np.float64)
    return 10 * math.log10(np.sum(reference**2) / np.sum((quantized - reference) ** 2))


# -- the definitions -------------------------------------------------------------------------


def test_sqnr_db_and_its_edges() -> None:
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf  # exact
    assert sqnr_db(0.0, 0.0) == math.inf  # exact, silent
    assert sqnr_db(0.0, 1.0) == -math.inf  # noise on a silent layer
    metrics = sqnr_metrics({"a": 30.0, "b": 12.5, "c": math.inf}, inputs=3)
    assert metrics == {
        "layer_sqnr_db": {"a": 30.0, "b": 12.5, "c": math.inf},
        "layer_sqnr_db_worst": 12.5,
        "layer_sqnr_worst_layer": "b",
        "layer_sqnr_inputs": 3,
    }
    assert sqnr_metrics({}, inputs=3) == {}


def test_output_agreement_in_steps_and_relative_to_rms() -> None:
    simulated = np.array([[0.25, 0.75], [0.5, 0.5]])
    deployed = np.array([[0.25, 0.75], [0.5 + 2 / 256, 0.5 - 1 / 256]])
    steps = output_agreement(simulated, deployed, step=1 / 256, inputs=2)
    assert steps["sim_vs_deployed_max_steps"] == pytest.approx(2.0)
    assert steps["sim_vs_deployed_median_steps"] == pytest.approx(0.5)  # of 0, 0, 2, 1
    assert steps["sim_vs_deployed_max_abs"] == pytest.approx(2 / 256)
    assert (steps["sim_vs_deployed_unit"], steps["sim_vs_deployed_unit_value"]) == (
        "output_step",
        1 / 256,
    )
    assert steps["sim_vs_deployed_outputs"] == 4 and steps["sim_vs_deployed_inputs"] == 2
    assert not any(key.endswith("rel_rms") for key in steps)

    relative = output_agreement(simulated, deployed)
    rms = math.sqrt(np.mean(simulated**2))
    assert relative["sim_vs_deployed_unit"] == "output_rms"
    assert relative["sim_vs_deployed_unit_value"] == pytest.approx(rms)
    assert relative["sim_vs_deployed_max_rel_rms"] == pytest.approx(2 / 256 / rms)
    assert relative["sim_vs_deployed_median_rel_rms"] == pytest.approx(0.5 / 256 / rms)
    assert not any(key.endswith("_steps") for key in relative)
    assert "simulation vs runtime: max 2, median 0.5 output steps" in describe(steps)
    from sciquant.errors import SciquantError

    with pytest.raises(SciquantError, match="shape"):
        output_agreement(simulated, deployed[:1])


# -- PyTorch: hand-made layers ----------------------------------------------------------------


def linear(weight: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(weight)
    return layer


def hand_quantized(model: nn.Module, input_scales: dict[str, float], layers=None):
    """`model` fake-quantized on the reference target (uint8 activations, zero point 128 here;
    int8 weights at step 0.25, which hold the weights 1.5 and 2 exactly), with the given input
    steps."""
    qmodel = quantize_model(model, "reference", "w8a8", "ptq-minmax", layers=layers)
    calibrate(qmodel, [(torch.from_numpy(X[:, None]),)])
    with torch.no_grad():
        for name, layer in qmodel.quant_linears().items():
            layer.input_scale.fill_(input_scales[name])
            layer.input_zero_point.fill_(128)
            layer.weight_scale.fill_(0.25)
            layer.weight_zero_point.fill_(0)
    return qmodel


def test_one_layer_sqnr_is_the_hand_computed_one() -> None:
    qmodel = hand_quantized(nn.Sequential(linear(1.5)), {"0": 0.5})
    sqnr = torch_layer_sqnr(qmodel, [(torch.from_numpy(X[:, None]),)])
    # y = 1.5 x in FP32, 1.5 · x on the 0.5 grid quantized: errors 0.2, -0.1, 0.2, 0 (× 1.5)
    expected = expected_sqnr(1.5 * X, 1.5 * on_grid(X, 0.5))
    assert expected == pytest.approx(10 * math.log10(5.79 / 0.09))
    assert sqnr == {"0": pytest.approx(expected, rel=1e-5)}
    # two inputs: sums over both, not a mean of two SQNRs
    halves = [(torch.from_numpy(X[:2, None]),), (torch.from_numpy(X[2:, None]),)]
    assert torch_layer_sqnr(qmodel, halves)["0"] == pytest.approx(expected, rel=1e-5)
    assert qmodel.quant_linears()["0"].mode == "quantize"  # modes are restored


def test_moved_weights_are_measured_against_the_fp32_ones() -> None:
    """A method that moves the weight (AdaRound, bias correction) keeps the FP32 layers: the
    float pass runs them, so the noise is against 1.5 x, not against the moved weight in float;
    the layer's own weight is back afterwards."""
    qmodel = hand_quantized(nn.Sequential(linear(1.5)), {"0": 0.5})
    layer = qmodel.quant_linears()["0"]
    with torch.no_grad():
        layer.weight.fill_(1.25)  # "moved"
    x = torch.from_numpy(X[:, None])
    fp32 = {"0": {"weight": torch.tensor([[1.5]])}}
    sqnr = torch_layer_sqnr(qmodel, [(x,)], float_layers=fp32)
    assert sqnr["0"] == pytest.approx(expected_sqnr(1.5 * X, 1.25 * on_grid(X, 0.5)), rel=1e-5)
    assert layer.weight.item() == 1.25
    # without them: against the moved weight in float (only the input rounding is noise)
    own = torch_layer_sqnr(qmodel, [(x,)])["0"]
    assert own == pytest.approx(expected_sqnr(1.25 * X, 1.25 * on_grid(X, 0.5)), rel=1e-5)
    from sciquant.errors import SciquantError

    with pytest.raises(SciquantError, match="not a quantized layer"):
        torch_layer_sqnr(qmodel, [(x,)], float_layers={"1": {"weight": torch.ones(1, 1)}})


def test_exact_layer_is_infinite_and_reads_back_from_json(tmp_path: Path) -> None:
    exact = np.array([0.5, -1.0, 2.0, 3.5], dtype=np.float32)  # on the grid: no rounding
    qmodel = hand_quantized(
        nn.Sequential(linear(1.5), nn.ReLU(), linear(2.0)), {"0": 0.5, "2": 0.5}
    )
    qmodel.quant_linears()["2"].input_scale.fill_(0.4)  # 0.75 / 0.4 = 1.875: rounded
    sqnr = torch_layer_sqnr(qmodel, [(torch.from_numpy(exact[:, None]),)])
    assert sqnr["0"] == math.inf and math.isfinite(sqnr["2"])
    metrics = sqnr_metrics(sqnr, 1)
    assert metrics["layer_sqnr_worst_layer"] == "2"
    # JSON has no infinity: null, listed as "inf" under the file's non_finite
    coordinates = {"dataset": "d", "model": "m", "seed": 0, "target": "reference",
                   "method": "ptq-minmax", "precision": "w8a8"}  # fmt: skip
    everything_exact = sqnr_metrics({"0": math.inf}, 1)
    path = write_json(
        tmp_path / "metrics.json",
        {"coordinates": coordinates, "metrics": {**metrics, "layer_sqnr_db_worst": math.inf}},
    )
    written = json.loads(path.read_text())
    assert written["metrics"]["layer_sqnr_db"]["0"] is None
    assert written["non_finite"]["/metrics/layer_sqnr_db/0"] == "inf"
    record = read_metrics(path)
    assert record.layer_sqnr_db == {"0": math.inf, "2": pytest.approx(sqnr["2"])}
    assert record.metrics["layer_sqnr_db_worst"] == math.inf
    assert record.diverged == []  # an exact layer is not a diverged run
    assert everything_exact["layer_sqnr_db_worst"] == math.inf


def test_error_propagates_through_two_layers() -> None:
    """Layer 2's SQNR counts layer 1's quantization error too: its quantized input is layer 1's
    quantized output, rounded again on its own grid."""
    model = nn.Sequential(linear(1.5), linear(2.0))
    scales = {"0": 0.5, "1": 0.35}
    inputs = [(torch.from_numpy(X[:, None]),)]
    both = torch_layer_sqnr(hand_quantized(model, scales), inputs)
    y1_fp32, y1_q = 1.5 * X, 1.5 * on_grid(X, 0.5)
    y2_fp32, y2_q = 2.0 * y1_fp32, 2.0 * on_grid(y1_q, 0.35)
    assert both["0"] == pytest.approx(expected_sqnr(y1_fp32, y1_q), rel=1e-5)
    assert both["1"] == pytest.approx(expected_sqnr(y2_fp32, y2_q), rel=1e-5)
    # quantizing layer 2 alone: its own rounding of the float y1 only
    alone = torch_layer_sqnr(hand_quantized(model, scales, layers=["1"]), inputs)
    assert alone["1"] == pytest.approx(expected_sqnr(y2_fp32, 2.0 * on_grid(y1_fp32, 0.35)))
    assert both["1"] < alone["1"] - 3  # the propagated error dominates here


def test_float_reference_of_a_ptq_model_is_the_fp32_model() -> None:
    from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph

    torch.manual_seed(0)
    model = MeshGraphNet(MeshGraphNetConfig(hidden=16, processor_size=2)).eval()
    graphs = [random_tree_graph(40, seed=s) for s in range(3)]
    qmodel = calibrate(quantize_model(model, "cpu-x86", "w8a8", "ptq-minmax"), graphs[:2])
    sqnr = torch_layer_sqnr(qmodel, graphs[2:])
    assert list(sqnr) == qmodel.quantized_layers()
    assert all(15 < value < 80 for value in sqnr.values()), sqnr
    from sciquant.quant.pytorch import set_mode

    with torch.no_grad():
        quantized = qmodel(*graphs[2])
        set_mode(qmodel, "float")
        torch.testing.assert_close(qmodel(*graphs[2]), model(*graphs[2]), rtol=1e-5, atol=1e-5)
        set_mode(qmodel, "quantize")
        assert torch.equal(qmodel(*graphs[2]), quantized)
    lower = calibrate(quantize_model(model, "cpu-x86", "w4a8", "ptq-minmax"), graphs[:2])
    assert torch_layer_sqnr(lower, graphs[2:])["decoder.layers.2"] < sqnr["decoder.layers.2"]


# -- Keras: the same hand-made layer ----------------------------------------------------------


def test_keras_dense_sqnr_is_the_hand_computed_one() -> None:
    keras = pytest.importorskip("keras")
    from sciquant.quant import keras as quant_keras
    from sciquant.quant.debug import keras_layer_sqnr

    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False, name="d")(inputs))
    model.get_layer("d").kernel.assign([[1.5]])
    qmodel = quant_keras.quantize_model(model, "reference", "w8a8", "ptq-minmax")
    quant_keras.calibrate(qmodel, [X[:, None]])
    layer = qmodel.get_layer("d")
    layer.input_scale.assign(0.5)
    layer.input_zero_point.assign(128.0)
    layer.weight_scale.assign(np.full(layer.weight_scale.shape, 0.25, np.float32))
    sqnr = keras_layer_sqnr(qmodel, [X[:2, None], X[2:, None]])
    assert sqnr == {"d": pytest.approx(expected_sqnr(1.5 * X, 1.5 * on_grid(X, 0.5)), rel=1e-5)}
    assert layer.mode == "quantize"


# -- the blood-flow evaluate stage ------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny FP32 MeshGraphNet, a simulated run (reference w8a8) and an ONNX Runtime INT8 run
    (cpu-x86 w8a8), each quantized and evaluated with 3 debugging inputs."""
    from sciquant.workloads.bloodflow import train as train_bloodflow
    from tests.test_train_bloodflow import TINY, tiny_prepared

    root = tmp_path_factory.mktemp("debug-flow")
    prepared = tiny_prepared(root)
    checkpoint = train_bloodflow.run(prepared, root / "fp32", TINY, seed=0, progress=False)
    settings = {"quantize": {"calibration_samples": 2, "calibration_steps": 4}, "model": TINY}
    coordinates = {"dataset": "flow", "model": "mgn", "seed": 0, "method": "ptq-minmax",
                   "precision": "w8a8"}  # fmt: skip
    evaluate = {"repeats": 1, "figure_simulations": 1, "debug_inputs": 3}
    runs = {"prepared": prepared}
    for target in ("reference", "cpu-x86"):
        out = root / target / "ptq-minmax" / "w8a8"
        quantized = quant_bloodflow.run(
            checkpoint, prepared, out, target, "ptq-minmax", "w8a8", settings, progress=False
        )
        onnx = None
        if target == "cpu-x86":
            onnx = quant_bloodflow.export(quantized, prepared, out / "model.onnx")
        path = evaluate_bloodflow.run(
            quantized, prepared, out, evaluate, {**coordinates, "target": target},
            threads=1, onnx=onnx, simulated=target == "reference",
        )  # fmt: skip
        runs[target] = {"quantized": quantized, "onnx": onnx,
                        "metrics": json.loads(path.read_text())["metrics"]}  # fmt: skip
    return runs


def test_simulated_run_has_layer_sqnr_and_no_agreement(flow_runs: dict) -> None:
    metrics = flow_runs["reference"]["metrics"]
    qmodel, _ = quant_bloodflow.load_quantized(flow_runs["reference"]["quantized"])
    table = metrics["layer_sqnr_db"]
    assert list(table) == qmodel.quantized_layers()
    assert all(isinstance(v, float) and 10 < v < 100 for v in table.values()), table
    assert metrics["layer_sqnr_db_worst"] == min(table.values())
    assert table[metrics["layer_sqnr_worst_layer"]] == metrics["layer_sqnr_db_worst"]
    assert metrics["layer_sqnr_inputs"] == 3
    assert not any(key.startswith("sim_vs_deployed") for key in metrics)


def test_onnxruntime_run_has_layer_sqnr_and_agreement(flow_runs: dict) -> None:
    metrics = flow_runs["cpu-x86"]["metrics"]
    assert metrics["layer_sqnr_worst_layer"] in metrics["layer_sqnr_db"]
    assert metrics["sim_vs_deployed_unit"] == "output_rms"
    assert metrics["sim_vs_deployed_unit_value"] > 0
    assert metrics["sim_vs_deployed_inputs"] == 3
    assert metrics["sim_vs_deployed_outputs"] % 3 == 0 and metrics["sim_vs_deployed_outputs"] > 0
    # the same integer arithmetic: agreement to float rounding for all but a flipped code
    assert 0 <= metrics["sim_vs_deployed_median_rel_rms"] < 1e-4
    assert 0 <= metrics["sim_vs_deployed_max_rel_rms"] < 0.2
    assert metrics["sim_vs_deployed_max_abs"] == pytest.approx(
        metrics["sim_vs_deployed_max_rel_rms"] * metrics["sim_vs_deployed_unit_value"]
    )
    assert not any(key.endswith("_steps") for key in metrics)


def test_agreement_catches_a_deployed_scale_that_is_not_the_simulations(
    flow_runs: dict, tmp_path: Path
) -> None:
    """The deployed model's last weight scale 3 % off: the agreement must see it."""
    import onnx
    from onnx import numpy_helper

    from sciquant.runtime.onnxruntime import OrtStep
    from sciquant.workloads.bloodflow.features import Normalizer, merge_graphs

    run = flow_runs["cpu-x86"]
    qmodel, state = quant_bloodflow.load_quantized(run["quantized"])
    norm = Normalizer.of_checkpoint(state)
    graphs = evaluate_bloodflow.test_graphs(flow_runs["prepared"], norm)
    inputs = evaluate_bloodflow.teacher_forced_inputs(merge_graphs(graphs)[0], 3, norm)
    simulated = torch_outputs(qmodel, inputs)

    proto = onnx.load(str(run["onnx"]))
    last = qmodel.quantized_layers()[-1]
    (initializer,) = [i for i in proto.graph.initializer if i.name == f"{last}.weight_scale"]
    initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) * 1.03,
                                                 initializer.name))  # fmt: skip
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(perturbed))

    same = output_agreement(simulated, torch_outputs(OrtStep(run["onnx"]), inputs))
    off = output_agreement(simulated, torch_outputs(OrtStep(perturbed), inputs))
    assert same["sim_vs_deployed_median_rel_rms"] < 1e-4
    assert off["sim_vs_deployed_median_rel_rms"] > 1e-3
    assert off["sim_vs_deployed_median_rel_rms"] > 30 * same["sim_vs_deployed_median_rel_rms"]
    assert off["sim_vs_deployed_max_rel_rms"] > same["sim_vs_deployed_max_rel_rms"]


def test_teacher_forced_inputs_of_one_sample_are_its_calibration_inputs(flow_runs: dict) -> None:
    from sciquant.workloads.bloodflow.features import Normalizer

    _, state = quant_bloodflow.load_quantized(flow_runs["reference"]["quantized"])
    norm = Normalizer.of_checkpoint(state)
    (graph,) = evaluate_bloodflow.test_graphs(flow_runs["prepared"], norm)[:1]
    ours = evaluate_bloodflow.teacher_forced_inputs(graph, 5, norm)
    theirs = list(quant_bloodflow.calibration_inputs([graph], 5, norm))
    for a, b in zip(ours, theirs, strict=True):
        for tensor_a, tensor_b in zip(a, b, strict=True):
            assert torch.equal(tensor_a, tensor_b)


def test_debug_is_off_at_zero_inputs_and_for_fp32(flow_runs: dict) -> None:
    from sciquant.workloads.bloodflow.features import Normalizer

    quantized = flow_runs["reference"]["quantized"]
    _, state = quant_bloodflow.load_quantized(quantized)
    norm = Normalizer.of_checkpoint(state)
    prepared = flow_runs["prepared"]
    fp32 = quantized.parents[3] / "fp32" / "checkpoint.pt"
    assert fp32.is_file()
    assert evaluate_bloodflow.quant_debug(quantized, prepared, norm, None, [], 0) == {}
    assert evaluate_bloodflow.quant_debug(fp32, prepared, norm, None, [], 3) == {}


# -- the md evaluate stage (LiteRT) -----------------------------------------------------------


def test_md_litert_and_simulated_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    from sciquant.quant.debug import rebuild_keras_simulation
    from sciquant.runtime.keras import load_keras_model
    from sciquant.workloads.md import evaluate as evaluate_md
    from sciquant.workloads.md import quantize as quant_md
    from tests.test_quant_keras_adaround import _tiny_md

    root = tmp_path_factory.mktemp("debug-md")
    prepared, checkpoint = _tiny_md(root)

    def run(target: str, method: str, simulated: bool) -> tuple[dict, Path]:
        out = root / target / method / "w8a8"
        artifact = quant_md.run(
            checkpoint, prepared, out, target=target, method=method, precision="w8a8",
            calibration_samples=24, batch_size=16, qat_epochs=1, seed=0, threads=1,
        )  # fmt: skip
        coordinates = {"dataset": "g", "model": "i", "seed": 0, "target": target,
                       "method": method, "precision": "w8a8"}  # fmt: skip
        path = evaluate_md.run(
            prepared, artifact, out / "metrics.json", coordinates=coordinates,
            simulated=simulated, repeats=2, threads=1, debug_inputs=4,
        )  # fmt: skip
        return json.loads(path.read_text())["metrics"], out

    simulated, _ = run("reference", "ptq-minmax", simulated=True)
    assert list(simulated["layer_sqnr_db"]) == ["conv1", "conv2", "conv3", "conv4", "dense1",
                                                 "logits"]  # fmt: skip
    assert simulated["layer_sqnr_inputs"] == 4
    assert not any(key.startswith("sim_vs_deployed") for key in simulated)

    litert, out = run("litert-cpu", "ptq-minmax", simulated=False)
    assert set(litert["layer_sqnr_db"]) == {*simulated["layer_sqnr_db"], "softmax"}
    # the same FP32 weights and calibration frames: the same layers' SQNR up to the output
    # quantizer that only the LiteRT simulation has (of the logits)
    for name in ("conv1", "conv2", "conv3", "conv4", "dense1"):
        assert litert["layer_sqnr_db"][name] == pytest.approx(simulated["layer_sqnr_db"][name],
                                                              rel=1e-4)  # fmt: skip
    assert litert["sim_vs_deployed_unit"] == "output_step"
    assert litert["sim_vs_deployed_unit_value"] == pytest.approx(1 / 256)
    assert litert["sim_vs_deployed_inputs"] == 8 and litert["sim_vs_deployed_outputs"] == 16
    # TFLite adopted the simulation's scales: within one output step (see test_quant_keras)
    assert litert["sim_vs_deployed_max_steps"] <= 1.0 + 1e-6
    assert litert["sim_vs_deployed_median_steps"] == 0.0

    # the rebuilt simulation is the one the quantize stage converted: same qparams
    summary = json.loads((out / "quantization.json").read_text())
    rebuilt = rebuild_keras_simulation(load_keras_model(checkpoint), summary)
    from sciquant.quant import keras as quant_keras

    assert quant_keras.layer_summary(rebuilt) == summary["layers"]

    # a QAT run: the quantize stage keeps the fine-tuned fake-quant model beside the .tflite,
    # and the deployed model agrees with it (not with the FP32 weights' rebuild)
    qat, qat_out = run("litert-cpu", "qat-ste", simulated=False)
    assert json.loads((qat_out / "quantization.json").read_text())["simulation"] == (
        "simulation.keras"
    )
    assert "quant_debug_note" not in qat
    assert set(qat["layer_sqnr_db"]) == set(litert["layer_sqnr_db"])
    assert qat["sim_vs_deployed_max_steps"] <= 1.0 + 1e-6

    # without the kept model (a run quantized before it was kept), a QAT run cannot be rebuilt
    # from the FP32 weights, and says so
    (qat_out / "simulation.keras").unlink()
    artifact = qat_out / "model.tflite"
    coordinates = {"dataset": "g", "model": "i", "seed": 0, "target": "litert-cpu",
                   "method": "qat-ste", "precision": "w8a8"}  # fmt: skip
    path = evaluate_md.run(
        prepared, artifact, qat_out / "metrics.json", coordinates=coordinates,
        simulated=False, repeats=2, threads=1, debug_inputs=4,
    )  # fmt: skip
    qat = json.loads(path.read_text())["metrics"]
    assert "qat-ste" in qat["quant_debug_note"] and "cannot be rebuilt" in qat["quant_debug_note"]
    assert not any(key.startswith(("layer_sqnr", "sim_vs_deployed")) for key in qat)


# -- the cube and the report ------------------------------------------------------------------


def test_report_shows_worst_layer_agreement_and_per_layer_table(tmp_path: Path) -> None:
    from html import unescape

    from sciquant.report.cube import LAYER_SQNR, aggregate, headline_metrics, load_cube
    from sciquant.report.html import build_report
    from tests.test_report import write_run

    layers = {"encoder.0": 41.0, "processor.0": 35.5, "decoder.0": 38.0}
    paths = [write_run(tmp_path, seed, "reference", "none", "fp32") for seed in (0, 1)]
    for seed in (0, 1):
        sqnr = {name: value + seed for name, value in layers.items()}
        paths.append(write_run(tmp_path, seed, "reference", "ptq-minmax", "w8a8",
                               **sqnr_metrics(sqnr, 4)))  # fmt: skip
        exact = {**sqnr, "encoder.0": math.inf}
        deployed = output_agreement(np.array([1.0, -1.0]), np.array([1.0, -1.01]), inputs=1)
        paths.append(write_run(tmp_path, seed, "cpu-x86", "ptq-minmax", "w8a8",
                               **sqnr_metrics(exact, 4), **deployed))  # fmt: skip
    nc, csv = tmp_path / "metrics.nc", tmp_path / "metrics.csv"
    aggregate(paths, nc, csv, {"study": "debug"})
    cube = load_cube(nc)
    run = {"dataset": "bloodflow", "model": "meshgraphnet", "method": "ptq-minmax",
           "precision": "w8a8"}  # fmt: skip
    values = cube[LAYER_SQNR].sel(run)  # (`method` is also a keyword of .sel)
    assert float(values.sel(seed=1, target="reference", layer="processor.0")) == 36.5
    assert float(values.sel(seed=0, target="cpu-x86", layer="encoder.0")) == math.inf
    assert bool(values.sel(target="reference").notnull().all())
    assert not any(name.startswith(("layer_sqnr", "sim_vs")) for name in headline_metrics(cube))

    html = build_report(nc, tmp_path / "index.html").read_text()
    assert "<h3>Quantization debugging</h3>" in html
    section = html.split('class="quant-debug"')[1].split("</table>")[0]
    rows = {
        target: section.split(f'data-target="{target}" data-method="ptq-minmax"')[1].split("</tr>")[
            0
        ]
        for target in ("reference", "cpu-x86")
    }
    assert "<code>processor.0</code>" in rows["reference"]
    assert 'data-metric="layer_sqnr_db_worst" data-value="36.0"' in rows["reference"]
    assert 'data-metric="sim_vs_deployed_max_rel_rms">—' in rows["reference"]  # simulated
    found = re.search(r'data-metric="sim_vs_deployed_max_rel_rms" data-value="([^"]+)"',
                      rows["cpu-x86"])  # fmt: skip
    assert found and float(found.group(1)) == pytest.approx(0.01)  # |−1 − (−1.01)| / RMS 1
    per_layer = unescape(html.split('class="layer-sqnr"')[1].split("</table>")[0])
    assert "∞" in per_layer and "<strong>36</strong>" in per_layer
    assert 'data-layer="decoder.0"' in per_layer
