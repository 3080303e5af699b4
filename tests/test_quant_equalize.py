"""Cross-layer equalization (sciquant.quant.equalize) on hand-made and MeshGraphNet layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.equalize import equalize, equalize_pair, relu_chains
from sciquant.quant.pytorch import quantize_model


def test_a_pair_gets_the_geometric_mean_of_its_ranges_by_hand():
    """Row ranges of W1: 4 and 0.25; column ranges of W2: 1 and 4. s = sqrt(r1 / r2) = 2 and
    0.25; both ranges become sqrt(r1 · r2) = 2 and 1."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[4.0, -1.0], [0.25, 0.125]]))
        first.bias.copy_(torch.tensor([2.0, -0.5]))
        second.weight.copy_(torch.tensor([[1.0, -4.0]]))
    scale = equalize_pair(first, second)
    assert torch.equal(scale, torch.tensor([2.0, 0.25]))
    assert torch.equal(first.weight, torch.tensor([[2.0, -0.5], [1.0, 0.5]]))
    assert torch.equal(first.bias, torch.tensor([1.0, -2.0]))
    assert torch.equal(second.weight, torch.tensor([[2.0, -1.0]]))


def test_a_dead_channel_keeps_scale_one():
    first, second = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        second.weight.copy_(torch.tensor([[3.0, 4.0]]))
    assert equalize_pair(first, second)[0] == 1.0


def test_equalized_meshgraphnet_computes_the_same_function_with_closer_ranges():
    torch.manual_seed(0)
    model = MeshGraphNet(MeshGraphNetConfig(hidden=16, processor_size=2)).eval()
    with torch.no_grad():  # spread the channels' ranges, as training does
        for chain in relu_chains(model):
            for layer in chain:
                layer.weight.mul_(torch.logspace(-1, 1, layer.out_features)[:, None])
    equalized = equalize(model)
    graph = random_tree_graph(90, 1)
    with torch.no_grad():
        torch.testing.assert_close(equalized(*graph), model(*graph), rtol=1e-4, atol=1e-5)
    for before, after in zip(relu_chains(model), relu_chains(equalized), strict=True):
        for a, b in zip(before[:-1], after[:-1], strict=True):
            spread = lambda w: float(w.abs().amax(1).max() / w.abs().amax(1).min())  # noqa: E731
            assert spread(b.weight) < spread(a.weight)
    # the float model is untouched, the copy quantizes like any float model
    assert not torch.equal(relu_chains(model)[0][0].weight, relu_chains(equalized)[0][0].weight)
    quantize_model(equalized, "npu-pow2", "w8a8", "ptq-cle")


def test_equalize_refuses_a_quantized_model_and_a_model_without_chains():
    model = MeshGraphNet(MeshGraphNetConfig(hidden=8, processor_size=1))
    qmodel = quantize_model(model, "reference", "w8a8")
    with pytest.raises(SciquantError, match="before quantize_model"):
        equalize(qmodel.model)
    with pytest.raises(SciquantError, match="no Linear–ReLU–Linear chain"):
        equalize(nn.Sequential(nn.Linear(2, 2)))
