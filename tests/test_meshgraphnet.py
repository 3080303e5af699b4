"""Tests of sciquant.models.meshgraphnet (and a smoke test of sciquant.benchmarks.mgn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sciquant.models.meshgraphnet import (
    MeshGraphNet,
    MeshGraphNetConfig,
    export_onnx,
    random_tree_graph,
)


def _model(seed: int = 0, config: MeshGraphNetConfig | None = None, **kwargs) -> MeshGraphNet:
    torch.manual_seed(seed)
    model = MeshGraphNet(config, **kwargs)
    # Non-trivial LayerNorm affine parameters, so that a mix-up of them cannot go unnoticed.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


# -- a naive reference, written independently of the model's forward --------------------------


def _mlp_naive(mlp, x: torch.Tensor) -> torch.Tensor:
    linears = list(mlp.layers)
    for i, layer in enumerate(linears):
        x = x @ layer.weight.T + layer.bias
        if i < len(linears) - 1:
            x = torch.clamp(x, min=0)
    if mlp.norm is not None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + mlp.norm.eps) * mlp.norm.weight + mlp.norm.bias
    return x


def _forward_naive(model: MeshGraphNet, x, e, edge_index) -> torch.Tensor:
    """The textbook MeshGraphNet: concat, then MLP; aggregation by a dense incidence matrix."""
    src, dst = edge_index[0], edge_index[1]
    incidence = torch.zeros(x.shape[0], e.shape[0], dtype=x.dtype)  # [N, E], 1 where dst = i
    incidence[dst, torch.arange(e.shape[0])] = 1
    h = _mlp_naive(model.node_encoder, x)
    e = _mlp_naive(model.edge_encoder, e)
    for edge_mlp, node_mlp in zip(model.edge_mlps, model.node_mlps, strict=True):
        e = e + _mlp_naive(edge_mlp, torch.cat([e, h[src], h[dst]], dim=1))
        h = h + _mlp_naive(node_mlp, torch.cat([h, incidence @ e], dim=1))
    return _mlp_naive(model.decoder, h)


# -- tests ------------------------------------------------------------------------------------


def test_parameter_count_of_defaults():
    # Linear(i, o) has i*o + o parameters, LayerNorm(64) has 128.
    # 53 node features: the reference's 18 (9_664 for this encoder, 214_722 in all) + 35.
    node_encoder = (53 * 64 + 64) + 2 * (64 * 64 + 64) + 128  # 11_904
    edge_encoder = (9 * 64 + 64) + 2 * (64 * 64 + 64) + 128  # 9_088
    edge_mlp = (192 * 64 + 64) + 2 * (64 * 64 + 64) + 128  # 20_800, input [e, h_src, h_dst]
    node_mlp = (128 * 64 + 64) + 2 * (64 * 64 + 64) + 128  # 16_704, input [h, agg]
    decoder = 2 * (64 * 64 + 64) + (64 * 2 + 2)  # 8_450, no LayerNorm
    expected = node_encoder + edge_encoder + 5 * (edge_mlp + node_mlp) + decoder
    assert expected == 216_962
    model = MeshGraphNet()
    assert sum(p.numel() for p in model.parameters()) == 216_962
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3 * 13
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 12


def test_output_shape():
    x, e, edge_index = random_tree_graph(37, seed=1)
    assert x.shape == (37, 53) and e.shape == (72, 9) and edge_index.shape == (2, 72)
    assert _model()(x, e, edge_index).shape == (37, 2)
    config = MeshGraphNetConfig(
        node_features=5,
        edge_features=4,
        outputs=3,
        processor_size=2,
        hidden=16,
        mlp_hidden_layers=1,
    )
    x, e, edge_index = random_tree_graph(11, seed=2, node_features=5, edge_features=4)
    model = _model(config=config)
    assert len(model.edge_mlps[0].layers) == 2
    assert model(x, e, edge_index).shape == (11, 3)


def test_random_tree_graph_is_a_reproducible_bidirectional_tree():
    n = 200
    x, e, edge_index = random_tree_graph(n, seed=7)
    src, dst = edge_index
    assert edge_index.dtype == torch.int64
    assert edge_index.shape == (2, 2 * (n - 1))
    # Each edge has its reverse; the first half is parent -> child with parent < child.
    assert torch.equal(edge_index[:, n - 1 :], edge_index.flip(0)[:, : n - 1])
    parent, child = src[: n - 1], dst[: n - 1]
    assert torch.equal(child, torch.arange(1, n))
    assert bool((parent < child).all())
    assert len(set(parent.tolist())) > 1  # not a star or a path by construction
    again = random_tree_graph(n, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((x, e, edge_index), again, strict=True))
    assert not torch.equal(random_tree_graph(n, seed=8)[2], edge_index)


def test_concat_trick_equals_naive_concat_in_float64():
    x, e, edge_index = random_tree_graph(60, seed=3)
    # A few extra edges so that some nodes have in-degree > 2 and the graph is not a tree.
    extra = torch.tensor([[0, 5, 9, 13], [7, 7, 7, 0]])
    edge_index = torch.cat([edge_index, extra], dim=1)
    e = torch.cat([e, torch.randn(4, 9, generator=torch.Generator().manual_seed(0))])
    model = _model(seed=4).double()
    x64, e64 = x.double(), e.double()
    with torch.no_grad():
        reference = _forward_naive(model, x64, e64, edge_index)
        fast = model(x64, e64, edge_index)
        model.concat_trick = False
        plain = model(x64, e64, edge_index)
    scale = reference.abs().max()
    assert scale > 0.1
    assert (fast - reference).abs().max() / scale < 1e-12
    assert (plain - reference).abs().max() / scale < 1e-12
    # float32 with the concat trick against the float64 reference
    model32 = _model(seed=4)
    with torch.no_grad():
        out32 = model32(x, e, edge_index)
    assert (out32.double() - reference).abs().max() / scale < 1e-5


def test_concat_trick_gradients_equal_naive():
    x, e, edge_index = random_tree_graph(40, seed=5)
    target = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    grads = []
    for trick in (True, False):
        model = _model(seed=6, concat_trick=trick).double().train()
        loss = ((model(x.double(), e.double(), edge_index) - target.double()) ** 2).mean()
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-9, atol=1e-12), name


def test_bf16_simulation_runs_the_concat_trick_in_bf16():
    """The bf16 simulation (autocast, what a CPU without a bf16 unit evaluates) takes the
    fast path too: its result differs from FP32 by bf16 rounding (> 1e-4, < 3e-2 relative),
    and from the textbook path under the same autocast by no more than that."""
    from sciquant.workloads.bloodflow.evaluate import Bf16Simulation

    x, e, edge_index = random_tree_graph(80, seed=7)
    model = _model(seed=8)
    with torch.no_grad():
        reference = model(x, e, edge_index)
        fast = Bf16Simulation(model)(x, e, edge_index)
        model.concat_trick = False
        plain = Bf16Simulation(model)(x, e, edge_index)
    assert fast.dtype == torch.float32
    relative = float((fast - reference).norm() / reference.norm())
    assert 1e-4 < relative < 3e-2
    assert float((fast - plain).norm() / reference.norm()) < 3e-2


def test_sum_aggregation_on_hand_made_graph():
    # 3 nodes, edges (source -> destination): 0 -> 2, 1 -> 2, 2 -> 0. Node 1 receives nothing.
    edge_index = torch.tensor([[0, 1, 2], [2, 2, 0]])
    x = torch.randn(3, 53, generator=torch.Generator().manual_seed(0))
    e = torch.randn(3, 9, generator=torch.Generator().manual_seed(1))
    model = _model(config=MeshGraphNetConfig(processor_size=1), concat_trick=False)
    seen = {}
    hooks = [
        model.edge_encoder.register_forward_hook(lambda m, i, o: seen.update(e0=o)),
        model.edge_mlps[0].register_forward_hook(lambda m, i, o: seen.update(de=o)),
        model.node_mlps[0].register_forward_pre_hook(lambda m, i: seen.update(node_in=i[0])),
    ]
    with torch.no_grad():
        out = model(x, e, edge_index)
    for hook in hooks:
        hook.remove()
    updated = seen["e0"] + seen["de"]  # the updated edge features are aggregated
    agg = seen["node_in"][:, 64:]
    torch.testing.assert_close(agg[0], updated[2])
    torch.testing.assert_close(agg[1], torch.zeros(64))
    torch.testing.assert_close(agg[2], updated[0] + updated[1])
    # The fast path aggregates the same way.
    model.concat_trick = True
    with torch.no_grad():
        torch.testing.assert_close(model(x, e, edge_index), out, rtol=1e-5, atol=1e-6)


def test_forward_is_deterministic():
    x, e, edge_index = random_tree_graph(500, seed=9)
    model = _model(seed=2)
    with torch.inference_mode():
        first = model(x, e, edge_index)
        second = model(x, e, edge_index)
    assert torch.equal(first, second)
    with torch.inference_mode():
        assert torch.equal(_model(seed=2)(x, e, edge_index), first)
        assert not torch.equal(_model(seed=3)(x, e, edge_index), first)


def test_wrapped_first_linear_falls_back_to_concat_and_is_called():
    class CountingLinear(nn.Linear):  # stands in for a quantizer's wrapper
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    x, e, edge_index = random_tree_graph(30, seed=11)
    model = _model(seed=7)
    with torch.no_grad():
        expected = model(x, e, edge_index)
    for mlp in list(model.edge_mlps) + list(model.node_mlps):
        old = mlp.layers[0]
        new = CountingLinear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        mlp.layers[0] = new
    with torch.no_grad():
        got = model(x, e, edge_index)
    assert CountingLinear.calls == 10  # every processor MLP took the concat path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    # Two processor blocks instead of five: the same code path (the blocks are identical), at
    # half the export time, which dominates this file's runtime.
    model = _model(seed=8, config=MeshGraphNetConfig(processor_size=2)).train()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "mgn.onnx", num_nodes_example=32)
    assert model.training and model.concat_trick  # the export restores the model's state
    return model.eval(), path


def test_onnx_export_parity_with_dynamic_shapes(onnx_export):
    import onnx
    import onnxruntime as ort

    model, path = onnx_export
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["node_features", "edge_features", "edge_index"]
    assert [o.name for o in graph.output] == ["delta"]
    assert onnx.load(str(path)).opset_import[0].version >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Sizes different from the export example (32 nodes, 62 edges), and a non-tree graph.
    graphs = [random_tree_graph(257, seed=12)]
    x, e, edge_index = random_tree_graph(40, seed=13)
    extra = torch.tensor([[3, 4, 5], [0, 0, 0]])
    graphs.append((x, torch.cat([e, torch.ones(3, 9)]), torch.cat([edge_index, extra], dim=1)))
    for x, e, edge_index in graphs:
        (delta,) = session.run(
            ["delta"],
            {
                "node_features": x.numpy(),
                "edge_features": e.numpy(),
                "edge_index": edge_index.numpy(),
            },
        )
        with torch.no_grad():
            reference = model(x, e, edge_index).numpy()
        assert delta.shape == reference.shape == (x.shape[0], 2)
        assert np.abs(delta - reference).max() / np.abs(reference).max() <= 1e-5


def test_export_rejects_degenerate_example(tmp_path):
    with pytest.raises(ValueError, match="num_nodes_example"):
        export_onnx(MeshGraphNet(), tmp_path / "x.onnx", num_nodes_example=2)


def test_benchmark_smoke():
    from sciquant.benchmarks import mgn

    rows = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1)
    assert [r["mode"] for r in rows] == ["forward", "train_step"]
    assert all(r["median_ms"] > 0 and r["q3_ms"] >= r["q1_ms"] for r in rows)
    table = mgn.format_table(rows)
    assert "not in this run" in table
    assert "50" in table


def test_benchmark_reports_physicsnemo_import_failure_in_one_line(monkeypatch):
    from sciquant.benchmarks import mgn

    def fail():
        raise ImportError("No module named 'physicsnemo'")

    monkeypatch.setattr(mgn, "_import_physicsnemo", fail)
    rows = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1, baseline=False)
    assert not any("physicsnemo_median_ms" in r for r in rows)
    table = mgn.format_table(rows)
    why = [line for line in table.splitlines() if "cannot be imported" in line]
    assert why == [
        "  PhysicsNeMo not timed in this run: it cannot be imported"
        " (ImportError: No module named 'physicsnemo')."
    ]
    assert "PhysicsNeMo (this run)" not in table
    assert "PhysicsNeMo*" in table  # the stored reference column stays

    # --no-physicsnemo: no import attempted, no extra line (the table as before this option)
    off = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1, baseline=False, physicsnemo=False)
    assert not any(key.startswith("physicsnemo") for r in off for key in r)
    assert len(mgn.format_table(off).splitlines()) == len(table.splitlines()) - 1


def _physicsnemo_or_skip():
    from sciquant.benchmarks import mgn

    try:
        mgn._import_physicsnemo()
    except Exception as err:  # what the bench itself treats as "not importable"
        pytest.skip(f"PhysicsNeMo's MeshGraphNet is not importable here: {mgn._one_line(err)}")
    return mgn


def test_benchmark_times_physicsnemo_in_the_same_run():
    mgn = _physicsnemo_or_skip()
    rows = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1, baseline=False)
    assert all(r["physicsnemo_median_ms"] > 0 for r in rows)
    assert "same outputs" in rows[0]["physicsnemo_note"]
    table = mgn.format_table(rows)
    assert "PhysicsNeMo (this run)" in table and "PNM/ours" in table
    assert "max |diff|" in table


def test_benchmark_does_not_time_physicsnemo_when_outputs_differ(monkeypatch):
    mgn = _physicsnemo_or_skip()
    monkeypatch.setattr(mgn, "_copy_mlp", lambda *args: None)  # PhysicsNeMo keeps its own init
    rows = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1, baseline=False)
    assert not any("physicsnemo_median_ms" in r for r in rows)
    assert "outputs DIFFER" in mgn.format_table(rows)
