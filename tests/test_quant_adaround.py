"""AdaRound and empirical bias correction (sciquant.quant.adaround) on hand-made layers, and
where the methods are allowed to run (sciquant.quant.observers.METHOD_LIMITS)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import yaml
from torch import nn

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.adaround import (
    AdaRoundSettings,
    adaround,
    correct_bias,
    execution_order,
    layer_inputs,
    reconstruction_blocks,
    rectified_sigmoid,
    soft_weight,
)
from sciquant.quant.observers import check_method_limits
from sciquant.quant.pytorch import calibrate, quantize_model, set_mode
from sciquant.study import load_config
from sciquant.workloads.bloodflow.quantize import load_quantized
from sciquant.workloads.bloodflow.train import load_model
from tests.test_quant_dynamic import ROOT, _sciquant
from tests.test_quant_dynamic import ci_training as ci_training  # the fixture, shared


def _set_grid(layer, weight_scale: float, input_scale: float) -> None:
    """Put a calibrated QuantLinear on a hand-chosen grid (symmetric: zero points 0)."""
    with torch.no_grad():
        layer.weight_scale.fill_(weight_scale)
        layer.weight_zero_point.zero_()
        layer.input_scale.fill_(input_scale)
        layer.input_zero_point.zero_()


def _collinear_inputs(rows: int = 64) -> torch.Tensor:
    """x = [a, 2a] with a on the input grid (multiples of 1/32 in [0.5, 1.5])."""
    a = torch.arange(rows, dtype=torch.float32) % 33 / 32 + 0.5
    return torch.stack([a, 2 * a], dim=1)


def test_rectified_sigmoid_and_soft_weight_by_hand():
    v = torch.tensor([-100.0, 0.0, 100.0])
    # σ(0)·1.2 − 0.1 = 0.5; the stretch clamps to exactly 0 and 1 far out
    assert rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]
    weight = torch.tensor([[0.6, -0.7], [2.2, 9.4]])
    scale, zero = torch.tensor([[1.0], [0.5]]), torch.zeros(2, 1)
    h = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # row 0 on the grid of 1: ⌊0.6⌋ + 0 = 0, ⌊−0.7⌋ + 1 = 0; row 1 on 0.5: ⌊4.4⌋ + 1 = 5 → 2.5,
    # ⌊18.8⌋ + 1 = 19 clamped to qmax 7 → 3.5
    expected = torch.tensor([[0.0, 0.0], [2.5, 3.5]])
    assert torch.equal(soft_weight(weight, scale, zero, -8, 7, h), expected)


def test_adaround_finds_the_rounding_nearest_misses_on_a_2x2_layer():
    """W = [[0.6, 0.7], [0.45, 0.3]] on a grid of 1 with inputs x = [a, 2a]: a row's error is
    a·(r1 + 2·r2 − (w1 + 2·w2)) for the rounded row r, so nearest rounding ([[1, 1], [0, 0]])
    is off by a·1.0 and a·1.05, while [[0, 1], [1, 0]] is off by 0 and a·0.05 (the inputs sit on
    the input grid). Brute force over the 16 roundings agrees."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.6, 0.7], [0.45, 0.3]]))
    x = _collinear_inputs()
    qmodel = quantize_model(model, "reference", "w4a8", "ptq-adaround")
    calibrate(qmodel, [(x,)])
    layer = qmodel.quant_linears()["0"]
    _set_grid(layer, weight_scale=1.0, input_scale=1 / 32)

    def error(w: torch.Tensor) -> float:
        return float((x @ w.T - x @ model[0].weight.detach().T).pow(2).mean())

    nearest = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(layer.fake_quantize_weight(), nearest)
    candidates = [
        torch.tensor(c, dtype=torch.float32).reshape(2, 2)
        for c in itertools.product([0.0, 1.0], repeat=4)
    ]
    best = min(candidates, key=error)
    assert torch.equal(best, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert error(best) < 0.01 < 0.5 < error(nearest)

    summary = adaround(
        qmodel, model, [(x,)], AdaRoundSettings(iterations=2000, learning_rate=0.01), None
    )
    assert torch.equal(layer.weight.detach(), best)
    # the chosen integers are what the fake-quant forward (and so every export) uses
    assert torch.equal(layer.fake_quantize_weight(), best)
    assert summary["0"]["flipped"] == 0.5
    assert summary["0"]["mse_adaround"] == pytest.approx(error(best), rel=1e-4)
    assert summary["0"]["mse_nearest"] == pytest.approx(error(nearest), rel=1e-4)
    # the float model is untouched
    assert torch.equal(model[0].weight, torch.tensor([[0.6, 0.7], [0.45, 0.3]]))


def test_adaround_lowers_the_layers_reconstruction_errors_on_a_meshgraphnet():
    """Layer by layer (the quantity AdaRound minimises); the rollouts of the study measure what
    it does to the science."""
    torch.manual_seed(0)
    model = MeshGraphNet(MeshGraphNetConfig(hidden=16, processor_size=2)).eval()
    graphs = [random_tree_graph(80, seed) for seed in range(3)]
    qmodel = quantize_model(model, "reference", "w3a8", "ptq-adaround")
    calibrate(qmodel, graphs)
    nearest = {
        name: layer.fake_quantize_weight().detach().clone()
        for name, layer in qmodel.quant_linears().items()
    }
    summary = adaround(
        qmodel, model, graphs, AdaRoundSettings(iterations=300, learning_rate=0.01), None
    )
    assert set(summary) == set(qmodel.quant_linears())
    improved = [n for n, s in summary.items() if s["mse_adaround"] < 0.9 * s["mse_nearest"]]
    assert len(improved) >= 0.8 * len(summary), summary
    for name, layer in qmodel.quant_linears().items():
        # never worse than nearest rounding (a layer where it would be keeps nearest)
        assert summary[name]["mse_adaround"] <= summary[name]["mse_nearest"], name
        if summary[name]["kept_nearest"]:
            assert summary[name]["flipped"] == 0, name
        # on the grid, at most one step from nearest rounding (clipped weights included)
        scale = layer.weight_qparams()[0][:, None]
        assert (layer.weight.detach() - nearest[name]).abs().le(scale * 1.0001).all(), name
        assert torch.equal(layer.fake_quantize_weight(), layer.weight.detach()), name


class _Holder(nn.Module):
    """A model holding its layers in a block (an MLP without its ReLUs) and one layer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_blocks_are_the_modules_holding_the_layers_but_not_the_model():
    mgn = MeshGraphNet(MeshGraphNetConfig(node_features=5, hidden=8, processor_size=2))
    order = ["node_encoder.layers.0", "node_encoder.layers.1", "node_encoder.layers.2",
             "edge_mlps.0.layers.0", "edge_mlps.0.layers.1", "edge_mlps.0.layers.2",
             "node_mlps.0.layers.0", "decoder.layers.0"]  # fmt: skip
    assert reconstruction_blocks(mgn, order) == [
        ("node_encoder", order[:3]), ("edge_mlps.0", order[3:6]), ("node_mlps.0", [order[6]]),
        ("decoder", [order[7]]),
    ]  # fmt: skip
    assert reconstruction_blocks(_Holder(), ["block.0", "block.1", "head"]) == [
        ("block", ["block.0", "block.1"]), ("head", ["head"]),
    ]  # fmt: skip
    # the model's own layers (a Sequential model, every layer of a Keras model): one each
    assert reconstruction_blocks(nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)), ["0", "1"]) == [
        ("0", ["0"]), ("1", ["1"]),
    ]  # fmt: skip


class _Centred(nn.Module):
    """Linear, then each column centred over the rows (rows not independent), then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layers[0](x)
        return self.layers[1](z - z.mean(dim=0))


class _CallsInside(nn.Module):
    """Holds a block but calls its layers itself: the block's own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp[2](torch.relu(self.mlp[0](x)))


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (nn.Sequential(_Centred()), (80, 4)),
        (_CallsInside(), (80, 4)),
        (nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))),
         (80, 3, 4)),
    ],
    ids=["rows-coupled", "forward-never-called", "not-rows"],
)  # fmt: skip
def test_a_block_that_is_not_a_map_of_rows_is_rounded_layer_by_layer(model, inputs):
    """Blocks whose rows cannot be sampled independently (coupled rows, a forward that never
    runs, an input that is not [rows, features]) get layer-wise AdaRound, the same rounding as
    `reconstruction: layer` (the same rows, the same seeds), and say so."""
    torch.manual_seed(0)
    x = torch.randn(*inputs)
    rounded, said = {}, []
    for reconstruction in ("layer", "block"):
        qmodel = quantize_model(model, "reference", "w3a8", "ptq-adaround")
        calibrate(qmodel, [(x,)])
        settings = AdaRoundSettings(iterations=100, learning_rate=0.01,
                                    reconstruction=reconstruction)  # fmt: skip
        adaround(qmodel, model, [(x,)], settings, progress=said.append)
        layers = qmodel.quant_linears()
        rounded[reconstruction] = {n: layer.weight.detach() for n, layer in layers.items()}
    for name, weight in rounded["layer"].items():
        assert torch.equal(weight, rounded["block"][name]), name
    assert any("rounded one by one" in line for line in said), said


def test_nested_blocks_leave_the_outer_ones_layers_to_themselves():
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3), inner, nn.Linear(3, 2)))
    assert reconstruction_blocks(model, ["0.0", "0.1.0", "0.1.2", "0.2"]) == [
        ("0.0", ["0.0"]), ("0.1", ["0.1.0", "0.1.2"]), ("0.2", ["0.2"]),
    ]  # fmt: skip


def test_a_block_of_one_layer_rounds_as_layer_wise_adaround_does():
    """Block reconstruction of a single-layer block is AdaRound on that layer: same rows, same
    seed, the same soft weights, so the same rounding bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5)), nn.Sequential(nn.Linear(5, 3)))
    x = torch.randn(200, 6)
    rounded = {}
    for reconstruction in ("layer", "block"):
        qmodel = quantize_model(model, "reference", "w3a8", "ptq-adaround")
        calibrate(qmodel, [(x,)])
        settings = AdaRoundSettings(iterations=200, learning_rate=0.01,
                                    reconstruction=reconstruction)  # fmt: skip
        summary = adaround(qmodel, model, [(x,)], settings, progress=None)
        assert set(summary) == {"0.0", "1.0"}
        layers = qmodel.quant_linears()
        rounded[reconstruction] = {n: layer.weight.detach() for n, layer in layers.items()}
        assert any(s["flipped"] > 0 for s in summary.values())
    for name, weight in rounded["layer"].items():
        assert torch.equal(weight, rounded["block"][name]), name


def test_block_reconstruction_fits_an_mlps_output_better_than_layer_by_layer():
    """On a MeshGraphNet at W3A8: the first MLP (whose inputs, the model's, are the same for
    both) reproduces its float output better when its three layers are rounded together than
    one at a time; every block's error below nearest rounding's on its rows, most by 10 %; the
    model's output closer to the float model's than with nearest rounding; every layer on its
    grid, the parameters trainable again after."""
    torch.manual_seed(0)
    model = MeshGraphNet(MeshGraphNetConfig(hidden=16, processor_size=2)).eval()
    graphs = [random_tree_graph(80, seed) for seed in range(3)]
    first = layer_inputs(model, "node_encoder", graphs)
    with torch.no_grad():
        first_target = model.node_encoder(first)

    def output_error(qmodel) -> float:  # noqa: ANN001
        with torch.no_grad():
            return sum(float((qmodel(*g) - model(*g)).pow(2).mean()) for g in graphs)

    first_error, summaries = {}, {}
    for reconstruction in ("layer", "block"):
        qmodel = quantize_model(model, "reference", "w3a8", "ptq-adaround")
        calibrate(qmodel, graphs)
        nearest = output_error(qmodel)
        settings = AdaRoundSettings(iterations=300, learning_rate=0.01,
                                    reconstruction=reconstruction)  # fmt: skip
        summaries[reconstruction] = summary = adaround(qmodel, model, graphs, settings, None)
        assert set(summary) == set(qmodel.quant_linears())
        assert output_error(qmodel) < nearest
        with torch.no_grad():
            first_error[reconstruction] = float(
                (qmodel.model.node_encoder(first) - first_target).pow(2).mean()
            )
    assert first_error["block"] < 0.9 * first_error["layer"], first_error
    summary = summaries["block"]
    blocks = {name.rsplit(".layers.", 1)[0]: s for name, s in summary.items()}
    assert len(blocks) == 7
    assert all(s["mse_adaround"] <= s["mse_nearest"] for s in blocks.values())
    assert sum(s["mse_adaround"] < 0.9 * s["mse_nearest"] for s in blocks.values()) >= 5, blocks
    for name, layer in qmodel.quant_linears().items():
        assert torch.equal(layer.fake_quantize_weight(), layer.weight.detach()), name
    assert all(p.requires_grad for p in qmodel.parameters())
    assert model.concat_trick and qmodel.model.concat_trick


def test_bias_correction_adds_the_mean_shift_and_runs_in_order():
    """Layer 0: w = 0.3 on a grid of 1 rounds to 0, so its output loses 0.3·mean(x): the bias
    gains exactly that. Layer 1 (w = 1, exact) then sees the corrected mean and needs no
    shift; corrected from uncorrected inputs it would add the same 0.3·mean(x) again."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.3)
        model[0].bias.fill_(0.25)
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(0.0)
    x = (torch.arange(40, dtype=torch.float32) / 16).reshape(-1, 1)  # on the 1/16 grid
    qmodel = quantize_model(model, "reference", "w4a8", "ptq-biascorr")
    calibrate(qmodel, [(x,)])
    first, second = qmodel.quant_linears().values()
    _set_grid(first, weight_scale=1.0, input_scale=1 / 16)
    _set_grid(second, weight_scale=1.0, input_scale=1 / 64)
    shifts = correct_bias(qmodel, model, [(x,)], progress=None)
    expected = 0.3 * float(x.mean())
    assert first.bias.item() == pytest.approx(0.25 + expected, abs=1e-6)
    assert shifts["0"] == pytest.approx(expected, abs=1e-6)
    # layer 1's input is now (0 + 0.25 + shift) for every row, on the grid of 1/64 up to
    # rounding: what remains is at most half an input step
    assert abs(second.bias.item()) <= 0.5 / 64 + 1e-6
    with torch.no_grad():
        assert float((qmodel(x) - model(x)).mean()) == pytest.approx(0.0, abs=0.5 / 64 + 1e-6)


class _CalledInReverse(nn.Module):
    """Two Linear layers registered in the reverse of the order forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(1, 1)
        self.first = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_layers_run_in_the_order_the_forward_pass_calls_them():
    """The bias-correction case above with the layers registered the other way round: in
    module order, `second` would be corrected on inputs `first` has not shifted yet and add the
    same 0.3·mean(x) again. MeshGraphNet registers its edge MLPs before its node MLPs and calls
    them alternately."""
    model = _CalledInReverse()
    with torch.no_grad():
        model.first.weight.fill_(0.3)
        model.first.bias.fill_(0.25)
        model.second.weight.fill_(1.0)
        model.second.bias.fill_(0.0)
    x = (torch.arange(40, dtype=torch.float32) / 16).reshape(-1, 1)
    qmodel = quantize_model(model, "reference", "w4a8", "ptq-biascorr")
    calibrate(qmodel, [(x,)])
    layers = qmodel.quant_linears()
    assert list(layers) == ["second", "first"]
    _set_grid(layers["first"], weight_scale=1.0, input_scale=1 / 16)
    _set_grid(layers["second"], weight_scale=1.0, input_scale=1 / 64)
    shifts = correct_bias(qmodel, model, [(x,)], progress=None)
    assert list(shifts) == ["first", "second"]
    assert shifts["first"] == pytest.approx(0.3 * float(x.mean()), abs=1e-6)
    assert abs(layers["second"].bias.item()) <= 0.5 / 64 + 1e-6

    mgn = MeshGraphNet(MeshGraphNetConfig(node_features=5, hidden=8, processor_size=2,
                                          mlp_hidden_layers=1))  # fmt: skip
    qmgn = quantize_model(mgn, "reference", "w8a8", "ptq-adaround")
    graph = random_tree_graph(12, seed=0, node_features=5)
    calibrate(qmgn, [graph])
    mlps = [name.rsplit(".layers.", 1)[0] for name in
            execution_order(qmgn.model, qmgn.quant_linears(), graph)]  # fmt: skip
    assert list(dict.fromkeys(mlps)) == [
        "node_encoder", "edge_encoder", "edge_mlps.0", "node_mlps.0", "edge_mlps.1",
        "node_mlps.1", "decoder",
    ]  # fmt: skip
    assert mgn.concat_trick


def test_adaround_refuses_an_uncalibrated_model_and_bad_settings():
    model = nn.Sequential(nn.Linear(2, 2))
    qmodel = quantize_model(model, "reference", "w4a8", "ptq-adaround")
    with pytest.raises(SciquantError, match="calibrate the model first"):
        adaround(qmodel, model, [(torch.ones(3, 2),)])
    with pytest.raises(SciquantError, match="warmup"):
        AdaRoundSettings(warmup=1.5)
    with pytest.raises(SciquantError, match="iterations"):
        AdaRoundSettings(iterations=0)


@pytest.mark.parametrize(
    ("method", "target", "framework", "message"),
    [
        ("ptq-cle", "reference", "keras", "takes torch models only"),
        ("ptq-cle", "litert-cpu", "keras", "takes torch models only"),
        ("qat-tqt", "reference", "torch", "targets with pow2 scales \\(npu-pow2\\)"),
        ("qat-tqt", "cpu-x86", "torch", "not 'cpu-x86'; use qat-lsq there"),
        ("qat-lsq", "npu-pow2", "torch", "not 'npu-pow2'; use qat-tqt \\(PyTorch models\\)"),
        ("qat-lsq", "npu-pow2", "keras", "float scales"),
    ],
)
def test_method_limits_name_what_runs_where(method, target, framework, message):
    with pytest.raises(SciquantError, match=message):
        check_method_limits(method, target, framework)


def test_method_limits_let_the_allowed_combinations_through():
    check_method_limits("ptq-adaround", "cpu-x86", "torch")
    check_method_limits("qat-tqt", "npu-pow2", "torch")
    check_method_limits("ptq-mse", "litert-cpu", "keras")
    check_method_limits("qat-lsq", "litert-cpu", "keras")
    check_method_limits("qat-lsq", "cpu-x86", "torch")


# -- the config and the quantize stage ---------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"models": ["meshgraphnet"], "targets": ["reference"], "methods": ["qat-tqt"],
             "precisions": ["w8a8"]},
            "methods: method qat-tqt (TQT, trained power-of-two thresholds) is for targets with "
            "pow2 scales (npu-pow2), not 'reference'",
        ),
        (
            {"models": ["icnnmd"], "targets": ["reference"], "methods": ["ptq-cle"],
             "precisions": ["w4a8"]},
            "methods: method ptq-cle (cross-layer equalization of MeshGraphNet's MLPs) takes "
            "torch models only, not a keras model",
        ),
    ],
)  # fmt: skip
def test_the_config_names_the_sweep_entry_a_method_cannot_run(tmp_path, entry, message):
    config = yaml.safe_load((ROOT / "workflow/config/default.yaml").read_text())
    config["quantize"]["sweeps"] = [entry]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SciquantError) as error:
        load_config(path)
    assert str(error.value).startswith(f"config key quantize.sweeps.0.{message}")


def test_quantize_stage_runs_adaround_biascorr_and_tqt(ci_training, tmp_path):
    """`sciquant quantize` with each new method on the ci study's tiny data: AdaRound's weights
    sit on their grid, bias correction changes only biases, TQT leaves power-of-two scales,
    equalization changes the weights but not the float function; the bias-corrected model runs
    on ONNX Runtime."""
    prepared, checkpoint = ci_training
    fp32 = torch.load(checkpoint, weights_only=False)["state_dict"]
    quantize = {
        "calibration_samples": 2, "calibration_steps": 4,
        "adaround": {"iterations": 40}, "qat": {"epochs": 1, "steps_per_epoch": 3},
    }  # fmt: skip
    model_settings = {"train": {"batch_size": 2, "rollout_steps": 2}}
    settings = json.dumps({"quantize": quantize, "model": model_settings})
    runs = {
        "ptq-adaround": ("reference", "w4a8"),
        "ptq-biascorr": ("cpu-x86", "w8a8"),
        "qat-tqt": ("npu-pow2", "w8a8"),
        "ptq-cle": ("npu-pow2", "w4a8"),
    }
    loaded = {}
    for method, (target, precision) in runs.items():
        out = tmp_path / method
        _sciquant("quantize", "--checkpoint", str(checkpoint), "--prepared", str(prepared),
                  "--target", target, "--method", method, "--precision", precision,
                  "--settings", settings, "--threads", "1", "--out", str(out))  # fmt: skip
        qmodel, state = load_quantized(out / "quantized.pt")
        assert state["method"] == method
        loaded[method] = qmodel
    for name, layer in loaded["ptq-adaround"].quant_linears().items():
        assert torch.equal(layer.fake_quantize_weight(), layer.weight.detach()), name
    # the FP32 layers the two PTQ methods moved are kept for the per-layer SQNR's reference
    for method in ("ptq-adaround", "ptq-biascorr"):
        kept = load_quantized(tmp_path / method / "quantized.pt")[1]["float_layers"]
        assert list(kept) == loaded[method].quantized_layers()
        for name, tensors in kept.items():
            for key, value in tensors.items():
                assert torch.equal(value, fp32[f"{name}.{key}"]), (method, name, key)
    corrected = loaded["ptq-biascorr"].state_dict()
    changed = [k for k in fp32 if not torch.equal(fp32[k], corrected[f"model.{k}"])]
    assert changed and all(k.endswith(".bias") for k in changed), changed
    for name, layer in loaded["qat-tqt"].quant_linears().items():
        assert layer.mode == "quantize", name
        for scale in (layer.input_qparams()[0], layer.weight_qparams()[0]):
            mantissa, _ = math.frexp(float(scale))
            assert mantissa == 0.5, (name, float(scale))
    # equalization: other weights, the same function in float
    equalized = loaded["ptq-cle"]
    assert any(not torch.equal(fp32[k], equalized.state_dict()[f"model.{k}"]) for k in fp32)
    set_mode(equalized, "float")
    float_model, _ = load_model(checkpoint)
    graph = random_tree_graph(60, 3)
    graph = (torch.randn(60, float_model.config.node_features), *graph[1:])
    with torch.no_grad():
        torch.testing.assert_close(equalized(*graph), float_model(*graph), rtol=1e-4, atol=1e-5)
    out = tmp_path / "ptq-biascorr"
    _sciquant("export", "--checkpoint", str(out / "quantized.pt"), "--prepared", str(prepared),
              "--out", str(out / "model.onnx"))  # fmt: skip
    run = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": 0, "target": "cpu-x86",
           "method": "ptq-biascorr", "precision": "w8a8"}  # fmt: skip
    _sciquant("evaluate", "--checkpoint", str(out / "quantized.pt"), "--onnx",
              str(out / "model.onnx"), "--prepared", str(prepared), "--settings",
              json.dumps({"repeats": 1}), "--coordinates", json.dumps(run), "--threads", "1",
              "--out", str(out))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runtime"] == "onnxruntime" and not metrics["simulated"]
    assert math.isfinite(metrics["metrics"]["pressure_error_pct"])
    assert set(metrics["metrics"]["layer_sqnr_db"]) == set(kept)


def test_a_settings_section_gets_the_schemas_defaults_and_its_errors_name_the_key():
    from sciquant.study import section_with_defaults

    filled = section_with_defaults({"qat": {"epochs": 2}}, "quantize", "quantize")
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    qat = schema["$defs"]["quantize"]["properties"]["qat"]["properties"]
    assert filled["qat"]["epochs"] == 2  # given
    assert filled["qat"]["learning_rate"] == qat["learning_rate"]["default"]
    assert filled["adaround"]["iterations"] == 1000
    with pytest.raises(SciquantError, match="config key quantize.adaround.iterations: 0 is less"):
        section_with_defaults({"adaround": {"iterations": 0}}, "quantize", "quantize")
