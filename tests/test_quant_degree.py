"""Graph-aware QAT of MeshGraphNet (method qat-degree, sciquant.quant.degree): Degree-Quant's
protection probabilities and masks, the two calibrated activation ranges of node-row layers,
their state, where the method may run, and a quantize + evaluate run on the ci study's data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.degree import (
    DegreeQuantizedModel,
    NodeGroupQuantLinear,
    NodeGroups,
    enable_degree_qat,
    in_degree,
    node_groups,
    protection_probability,
    protection_settings,
    quantize_degree_model,
)
from sciquant.quant.observers import check_method_limits, make_observer, qparams_from_range
from sciquant.quant.pytorch import QuantLinear, calibrate, quantize_model, set_mode
from sciquant.study import load_config
from sciquant.workloads.bloodflow.quantize import load_quantized
from tests.test_quant_dynamic import ROOT, _sciquant
from tests.test_quant_dynamic import ci_training as ci_training  # the fixture, shared

SMALL = MeshGraphNetConfig(node_features=6, edge_features=4, hidden=8, processor_size=2)

#: A hand-made graph: a star (node 0, in-degree 4) with a tail 4 -> 5 -> 6; edges both ways.
#: In-degrees: node 0: 4, nodes 1-3: 1, node 4: 2, node 5: 2, node 6: 1.
STAR = [(0, 1), (0, 2), (0, 3), (0, 4), (4, 5), (5, 6)]


def _both_ways(pairs: list[tuple[int, int]]) -> torch.Tensor:
    a, b = torch.tensor(pairs).T
    return torch.stack([torch.cat([a, b]), torch.cat([b, a])])


def _model() -> MeshGraphNet:
    torch.manual_seed(0)
    return MeshGraphNet(SMALL)


def _graphs(count: int = 3, nodes: int = 40) -> list[tuple[torch.Tensor, ...]]:
    return [random_tree_graph(nodes, seed, 6, 4) for seed in range(count)]


def _calibrated(target: str = "reference", precision: str = "w4a4") -> DegreeQuantizedModel:
    qmodel = quantize_degree_model(_model(), target, precision)
    return calibrate(qmodel, _graphs())


# -- protection probabilities and masks ----------------------------------------------------------


def test_protection_probability_is_linear_in_the_degree_between_p_min_and_p_max():
    degree = torch.tensor([1, 2, 2, 3, 5, 1])
    p = protection_probability(degree, 0.1, 0.5)
    # d_lo = 1 -> p_min, d_hi = 5 -> p_max, linear in between: 0.1 + 0.4 (d - 1) / 4
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx([0.1, 0.2, 0.2, 0.3, 0.5, 0.1], abs=1e-7)
    assert protection_probability(torch.tensor([2, 2, 2]), 0.05, 0.3).tolist() == pytest.approx(
        [0.05] * 3
    )
    # the model's forward: in-degrees of the edge_index, protection only in training
    qmodel = quantize_degree_model(_model(), "reference", "w4a4")
    edge_index = _both_ways(STAR)
    assert in_degree(edge_index, 7).tolist() == [4, 1, 1, 1, 2, 2, 1]
    qmodel.set_protection(0.0, 0.3)
    qmodel.train()
    groups = qmodel.node_groups(7, edge_index)
    assert groups.junction.tolist() == [True] + [False] * 6
    assert groups.probability.tolist() == pytest.approx([0.3, 0, 0, 0, 0.1, 0.1, 0], abs=1e-7)
    qmodel.eval()
    assert qmodel.node_groups(7, edge_index).probability is None


def test_protection_settings_come_from_the_schema_and_are_checked():
    assert protection_settings({}) == (0.0, 0.2)  # the schema's defaults
    assert protection_settings({"degree_protection": {"p_max": 0.4}}) == (0.0, 0.4)
    for bad in ({"p_min": 0.5, "p_max": 0.2}, {"p_max": 1.5}, {"p_mid": 0.1}):
        with pytest.raises(SciquantError, match="quantize.qat.degree_protection"):
            protection_settings({"degree_protection": bad})


def test_protected_rows_pass_float_as_often_as_their_probability_says():
    qmodel = _calibrated()
    layer = qmodel.model.node_encoder.layers[0]
    qmodel.set_protection(0.0, 0.6, seed=3)
    qmodel.train()
    edge_index = _both_ways(STAR)
    degree = in_degree(edge_index, 7)
    probability = protection_probability(degree, 0.0, 0.6)  # [0.6, 0, 0, 0, 0.2, 0.2, 0]
    # inputs well off every grid point, so that a quantized row never equals its float value
    x = torch.linspace(-1.0, 1.0, 7 * 6).reshape(7, 6) * 0.987 + 0.0123
    groups = NodeGroups(degree, degree >= 3, probability, qmodel.generator)
    draws = 4000
    passed = torch.zeros(7)
    with node_groups(groups), torch.no_grad():
        quantized = torch.fake_quantize_per_tensor_affine(
            x, float(layer.input_scale), int(layer.input_zero_point), 0, 15
        )
        assert not (quantized[1:] == x[1:]).all(dim=1).any()
        for _ in range(draws):
            passed += (layer.fake_quantize_input(x) == x).all(dim=1).float()
    frequency = passed / draws
    for p, f in zip(probability.tolist(), frequency.tolist(), strict=True):
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(f - p) <= 5 * sigma + 1e-12, (p, f)
    assert frequency[1:4].sum() == 0 and frequency[6] == 0  # p_min = 0: never protected


def test_eval_mode_protects_nothing():
    qmodel = _calibrated()
    enable_degree_qat(qmodel, 1.0, 1.0, seed=0)  # in training every row would stay float
    x, e, edge_index = _graphs(1)[0]
    layer = qmodel.model.decoder.layers[0]
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    qmodel.eval()
    with torch.no_grad():
        first, second = qmodel(x, e, edge_index), qmodel(x, e, edge_index)
        groups = qmodel.node_groups(x.shape[0], edge_index)
        assert groups.probability is None
        with node_groups(groups):
            for rows in seen:
                assert not torch.equal(layer.fake_quantize_input(rows), rows)
    handle.remove()
    assert torch.equal(first, second)
    qmodel.train()
    with torch.no_grad(), node_groups(qmodel.node_groups(x.shape[0], edge_index)):
        assert torch.equal(layer.fake_quantize_input(seen[0]), seen[0])  # p = 1: all float


# -- two activation ranges ----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_junction_rows_get_their_own_calibrated_range(init):
    x, e, edge_index = random_tree_graph(60, 7, 6, 4)
    junction = in_degree(edge_index, 60) >= 3
    assert 0 < junction.sum() < 60
    x = torch.where(junction[:, None], 8.0 * x + 3.0, x)  # junction rows: a wider range
    qmodel = quantize_degree_model(_model(), "reference", "w4a4", qat_init=init)
    calibrate(qmodel, [(x, e, edge_index)])
    layer = qmodel.model.node_encoder.layers[0]  # its input is the node features themselves
    assert isinstance(layer, NodeGroupQuantLinear)
    spec = layer.activation_spec
    for rows, (scale, zero_point) in (
        (x[~junction], layer.input_qparams()),
        (x[junction], layer.junction_input_qparams()),
    ):
        if init == "minmax":
            expected = qparams_from_range(rows.min().numpy(), rows.max().numpy(), spec)
        else:  # the default start: each group's own MSE-optimal clipping
            observer = make_observer("mse", spec.granularity)
            observer.update(rows.numpy())
            expected = observer.qparams(spec)
            wide = qparams_from_range(rows.min().numpy(), rows.max().numpy(), spec)
            assert float(expected[0]) < float(wide[0])  # it clips
        assert float(scale) == float(expected[0]) and int(zero_point) == int(expected[1])
    assert float(layer.junction_input_qparams()[0]) > 4 * float(layer.input_qparams()[0])
    # edge-row layers keep one scale; node-row layers are the node encoder, node MLPs, decoder
    nodes = set(qmodel.node_group_layers())
    assert nodes == {
        name
        for name in qmodel.quant_linears()
        if name.split(".")[0] != "edge_encoder" and not name.startswith("edge_mlps")
    }
    assert all(type(layer) is QuantLinear for name, layer in qmodel.quant_linears().items()
               if name not in nodes)  # fmt: skip


def test_without_junctions_a_node_row_layer_is_the_plain_layer():
    """On a path (in-degrees <= 2) every row uses the low-degree scale: forward and LSQ gradients
    equal those of a one-scale QuantLinear with the same qparams."""
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    path = _both_ways([(i, i + 1) for i in range(29)])
    qmodel = _calibrated()
    enable_degree_qat(qmodel, 0.0, 0.0)  # LSQ, no protection
    layer = qmodel.model.node_mlps[0].layers[1]
    plain = QuantLinear(torch.nn.Linear(8, 8), layer.weight_spec, layer.activation_spec)
    plain.weight, plain.bias = layer.weight, layer.bias
    plain.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if "junction" not in k}, strict=False
    )
    plain.calibrated = True
    plain.set_mode("lsq")
    with torch.no_grad():
        plain.input_scale.copy_(layer.input_scale)
        plain.input_zero_point.copy_(layer.input_zero_point)
    qmodel.train()
    with node_groups(qmodel.node_groups(30, path)):
        ours = layer(x)
    theirs = plain(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    (ours.square().sum() + theirs.square().sum()).backward()
    assert torch.allclose(layer.input_scale.grad, plain.input_scale.grad, rtol=1e-4, atol=1e-8)
    assert float(layer.input_junction_scale.grad) == 0.0


def test_node_row_layers_need_the_models_forward():
    qmodel = _calibrated()
    layer = qmodel.model.decoder.layers[0]
    with pytest.raises(SciquantError, match="outside its DegreeQuantizedModel"):
        layer(torch.randn(5, 8))
    with node_groups(qmodel.node_groups(7, _both_ways(STAR))):
        with pytest.raises(SciquantError, match="got 5 rows, but the graph has 7 nodes"):
            layer(torch.randn(5, 8))


# -- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lsq", "quantize"])
def test_state_dict_round_trip(mode):
    graphs = _graphs()
    qmodel = _calibrated()
    enable_degree_qat(qmodel, 0.1, 0.5, seed=4)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    for x, e, edge_index in graphs:  # move the scales (LSQ) and the weights
        optimizer.zero_grad()
        qmodel(x, e, edge_index).square().mean().backward()
        optimizer.step()
    set_mode(qmodel, mode)
    state = qmodel.state_dict()
    assert "model.node_mlps.0.layers.0.input_junction_scale" in state
    fresh = quantize_degree_model(_model(), "reference", "w4a4")
    fresh.load_state_dict(state)
    for name, layer in qmodel.node_group_layers().items():
        other = fresh.model.get_submodule(name)
        assert other.mode == mode
        assert torch.equal(layer.junction_input_qparams()[0], other.junction_input_qparams()[0])
        assert torch.equal(layer.input_qparams()[0], other.input_qparams()[0])
    assert (fresh.p_min, fresh.p_max) == (0.1, 0.5)
    for model in (qmodel, fresh):
        model.eval()
    with torch.no_grad():
        for graph in graphs:
            assert torch.equal(qmodel(*graph), fresh(*graph))
    # the mask generator continues where it was
    qmodel.train(), fresh.train()
    with torch.no_grad():
        assert torch.equal(qmodel(*graphs[0]), fresh(*graphs[0]))


def test_pow2_targets_fine_tune_with_the_ste_and_keep_powers_of_two():
    qmodel = _calibrated("npu-pow2", "w4a8")
    enable_degree_qat(qmodel, 0.0, 0.2)
    for name, layer in qmodel.node_group_layers().items():
        assert layer.mode == "quantize", name
        for scale in (layer.input_qparams()[0], layer.junction_input_qparams()[0]):
            assert math.frexp(float(scale))[0] == 0.5, (name, float(scale))


# -- where it runs ------------------------------------------------------------------------------


def test_qat_degree_is_refused_where_one_scale_per_tensor_is_deployed(tmp_path):
    check_method_limits("qat-degree", "reference", "torch")
    check_method_limits("qat-degree", "npu-pow2", "torch")
    for target in ("cpu-x86", "openvino-cpu", "trt-v100"):
        with pytest.raises(SciquantError, match=f"not '{target}'.*use qat-lsq there"):
            check_method_limits("qat-degree", target, "torch")
    with pytest.raises(SciquantError, match="backend eager or simulated \\(npu-pow2, reference\\)"):
        quantize_degree_model(_model(), "cpu-x86", "w8a8")
    with pytest.raises(SciquantError, match="takes torch models only"):
        check_method_limits("qat-degree", "reference", "keras")
    config = yaml.safe_load((ROOT / "workflow/config/default.yaml").read_text())
    config["quantize"]["sweeps"] = [
        {"models": ["meshgraphnet"], "targets": ["cpu-x86"], "methods": ["qat-degree"],
         "precisions": ["w8a8"]}
    ]  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SciquantError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith("config key quantize.sweeps.0.methods: method qat-degree"), message
    assert "not 'cpu-x86'" in message


# -- the quantize stage -------------------------------------------------------------------------


def test_quantize_stage_runs_qat_degree(ci_training, tmp_path):
    """`sciquant quantize --method qat-degree` on the ci study's tiny data, then a simulated
    evaluation of the saved model (its forward computes the node groups itself)."""
    prepared, checkpoint = ci_training
    quantize = {
        "calibration_samples": 2, "calibration_steps": 4,
        "qat": {"epochs": 1, "steps_per_epoch": 3, "degree_protection": {"p_max": 0.3}},
    }  # fmt: skip
    settings = json.dumps(
        {"quantize": quantize, "model": {"train": {"batch_size": 2, "rollout_steps": 2}}}
    )
    out = tmp_path / "qat-degree"
    _sciquant("quantize", "--checkpoint", str(checkpoint), "--prepared", str(prepared),
              "--target", "reference", "--method", "qat-degree", "--precision", "w4a8",
              "--settings", settings, "--threads", "1", "--out", str(out))  # fmt: skip
    qmodel, state = load_quantized(out / "quantized.pt")
    assert state["method"] == "qat-degree" and isinstance(qmodel, DegreeQuantizedModel)
    assert (qmodel.p_min, qmodel.p_max) == (0.0, 0.3)
    layers = qmodel.node_group_layers()
    assert layers and all(layer.mode == "quantize" for layer in layers.values())
    scales = [
        (float(layer.input_qparams()[0]), float(layer.junction_input_qparams()[0]))
        for layer in layers.values()
    ]
    assert any(not np.isclose(low, high) for low, high in scales), scales
    run = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": 0, "target": "reference",
           "method": "qat-degree", "precision": "w4a8"}  # fmt: skip
    _sciquant("evaluate", "--checkpoint", str(out / "quantized.pt"), "--simulated",
              "--prepared", str(prepared), "--settings", json.dumps({"repeats": 1}),
              "--coordinates", json.dumps(run), "--threads", "1", "--out", str(out))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["simulated"] and math.isfinite(metrics["metrics"]["pressure_error_pct"])


def test_quantize_model_points_to_the_degree_builder():
    with pytest.raises(SciquantError, match="use sciquant.quant.degree.quantize_degree_model"):
        quantize_model(_model(), "reference", "w4a4", "qat-degree")


def test_export_refuses_a_simulation_only_model(tmp_path):
    from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
    from sciquant.quant.export import export_qdq_onnx
    from sciquant.quant.pytorch import calibrate

    model = MeshGraphNet(MeshGraphNetConfig(hidden=8, processor_size=1)).eval()
    graph = random_tree_graph(40, 0)
    qmodel = quantize_degree_model(model, "reference", "w8a8")
    calibrate(qmodel, [graph])
    with pytest.raises(SciquantError, match="qat-degree model .* is a simulation"):
        export_qdq_onnx(qmodel, tmp_path / "model.onnx", graph)
