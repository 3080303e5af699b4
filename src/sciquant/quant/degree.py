"""Graph-aware quantization of MeshGraphNet (method ``qat-degree``): Degree-Quant's protective
masking in QAT and per-node-type activation ranges.

    qmodel = quantize_model(model, "reference", "w4a4", "qat-degree")  # a DegreeQuantizedModel
    calibrate(qmodel, inputs)                        # two input ranges per node-row layer
    enable_degree_qat(qmodel, p_min=0.0, p_max=0.2, seed=0)   # then fine-tune (train.fit)
    delta = qmodel(node_features, edge_features, edge_index)

Why: a processor block sums the messages of a node's incoming edges, so the input of a node MLP
(``[h, agg]``) of a node with many incoming edges spans a wider range than that of the others.
One per-tensor scale sized for the widest rows wastes resolution on all others (Tailor et al.,
Degree-Quant, ICLR 2021).

Node-row layers. The layers whose input rows are the graph's nodes: every Linear of the node
encoder, of the node MLPs (their first one sees ``[h, agg]``) and of the decoder
(`node_row_layers`). Edge-row layers (edge encoder, edge MLPs) stay plain `QuantLinear`: one
scale, no protection. A node-row layer is a `NodeGroupQuantLinear`.

Node groups. `DegreeQuantizedModel.forward` takes the float model's arguments
``(node_features [N, F], edge_features, edge_index [2, E])``, counts every node's in-degree d
(the edges whose destination it is; ``bincount(edge_index[1])``, once per forward) and hands
the groups to its node-row layers through a context variable set for the duration of that
forward (`current_groups`); the float MeshGraphNet and its ``concat_trick`` are untouched (a
`QuantLinear` is not exactly ``nn.Linear``, so the quantized MLPs take the ``linear(cat(...))``
path, whose node-MLP input rows are the nodes). A node-row layer called outside that forward,
or on a tensor whose rows are not the N nodes, raises a SciquantError.

- *Junction* rows: in-degree >= `JUNCTION_DEGREE` (3); the others are the second group. In a
  tree whose edges run both ways that is the junctions; the prepared blood-flow graphs also
  join every inlet and outlet to the nodes 2..3 hops away (``prepare.boundary_edge_hops``), so
  there the high-degree group also holds the inlets, outlets and the branch nodes those
  boundary edges reach (the sum over incoming edges is what widens the range, whatever the
  node's anatomical type).
- Per-node-type activation ranges: a node-row layer has two input scales and zero points,
  ``input_scale`` / ``input_zero_point`` for the other rows (the names of `QuantLinear`'s own,
  so code that reads those still gets a valid scale) and ``input_junction_scale`` /
  ``input_junction_zero_point`` for the junction rows. Calibration gives each group its own
  observer of the layer's kind (MSE unless ``qat_init`` says min/max), fed only that group's
  rows; a group that saw no rows takes the other group's qparams. Training and inference
  quantize every row with its group's scale (`fake_quantize_affine` over rows, axis 0). This is a
  simulation: a QDQ graph has one scale per tensor, so the method runs only on targets whose
  backend is ``simulated`` or ``eager`` (npu-pow2, reference; `METHOD_LIMITS` says so).
- Protective masking (Degree-Quant), training mode only: in every node-row layer, each call,
  each node's input row passes unquantized (float) with probability

      p(d) = p_min + (p_max - p_min) · (d - d_lo) / (d_hi - d_lo)

  linear in the degree's *value* between the lowest (d_lo) and highest (d_hi) in-degree of the
  forward's graph (a batch of graphs is one graph), so the lowest-degree nodes get exactly p_min
  and the highest exactly p_max; if every node has the same degree, p = p_min. (The authors'
  code interpolates over the nodes' *rank* by in-degree, the degrees' empirical CDF, instead;
  there the lowest degree gets more than p_min.) Masks are independent per layer call and per
  forward, Bernoulli draws from the model's own generator (seeded by `enable_degree_qat`; its
  state is in the ``state_dict``, so a resumed fine-tuning draws what an uninterrupted one
  would). Weights are always quantized; edge-row layers are never protected. In eval mode
  nothing is protected. The scale gradients (LSQ) come from the unprotected rows only.

Training mode of qat-degree: LSQ (both group scales and, for asymmetric specs, zero points
learned; the LSQ gradient factor 1 / sqrt(n · qmax) uses each group's own element count n)
where the target's scales are float, the STE of quantize mode (frozen scales) on power-of-two
targets (npu-pow2), whose grid LSQ would leave.

Settings: ``quantize.qat.degree_protection`` {p_min, p_max} of the config; the schema holds the
defaults (`protection_settings` reads them from it).

State: the junction qparams are buffers (parameters in lsq mode) of the layer, so they are in
the ``state_dict`` like the others; p_min, p_max and the mask generator's state are the
model's ``_extra_state``. `quantize_model(..., method="qat-degree")` followed by
``load_state_dict`` restores the model (what `sciquant.workloads.bloodflow.quantize.load_quantized`
does).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sciquant.errors import SciquantError
from sciquant.quant.observers import Observer, check_lsq_specs
from sciquant.quant.pytorch import (
    _MIN_SCALE,
    QuantizedModel,
    QuantLinear,
    _effective_qparams,
    fake_quantize_affine,
    quantize_layers,
    set_mode,
)
from sciquant.quant.spec import Precision, protection_settings
from sciquant.quant.targets import Target

__all__ = [
    "quantize_degree_model",
    "JUNCTION_DEGREE",
    "METHOD",
    "DegreeQuantizedModel",
    "NodeGroupQuantLinear",
    "NodeGroups",
    "current_groups",
    "enable_degree_qat",
    "in_degree",
    "make_degree_aware",
    "node_groups",
    "node_row_layers",
    "protection_probability",
    "protection_settings",
]

#: The method this module implements.
METHOD = "qat-degree"
#: Nodes with at least this in-degree form the junction group (their own activation scale).
JUNCTION_DEGREE = 3
#: Module prefixes of MeshGraphNet's node-row layers (inputs [N, *]).
NODE_ROW_PREFIXES = ("node_encoder.", "node_mlps.", "decoder.")
#: The config section of the protection settings (for error messages).


@dataclass(frozen=True)
class NodeGroups:
    """The node groups of one forward: ``degree`` [N] int64 in-degree, ``junction`` [N] bool,
    ``probability`` [N] float32 protection probability (None: protect nothing), ``generator``
    the CPU generator the masks are drawn from."""

    degree: Tensor
    junction: Tensor
    probability: Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.degree.shape[0])

    def draw_protection(self) -> Tensor:
        """A fresh mask [N] bool (CPU): True where the row stays float, P = probability."""
        if self.probability is None:
            return torch.zeros(self.num_nodes, dtype=torch.bool)
        draws = torch.rand(self.num_nodes, generator=self.generator)
        return draws < self.probability


_CURRENT: ContextVar[NodeGroups | None] = ContextVar("sciquant_node_groups", default=None)


def current_groups() -> NodeGroups | None:
    """The node groups of the `DegreeQuantizedModel` forward now running (None outside one)."""
    return _CURRENT.get()


@contextmanager
def node_groups(groups: NodeGroups) -> Iterator[NodeGroups]:
    """Run the node-row layers inside this block with `groups` (what the model's forward does)."""
    token = _CURRENT.set(groups)
    try:
        yield groups
    finally:
        _CURRENT.reset(token)


def in_degree(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Incoming edges per node [N] int64 (edge_index rows: source, destination)."""
    return torch.bincount(edge_index[1].reshape(-1).cpu(), minlength=num_nodes)[:num_nodes]


def protection_probability(degree: Tensor, p_min: float, p_max: float) -> Tensor:
    """p(d) = p_min + (p_max - p_min) (d - d_lo) / (d_hi - d_lo), float32 [N], d_lo and d_hi the
    lowest and highest degree of `degree`; p_min everywhere when they are equal."""
    degree = degree.double()
    if degree.numel() == 0:
        return torch.zeros(0)
    lo, hi = degree.min(), degree.max()
    if hi == lo:
        return torch.full(degree.shape, float(p_min))
    fraction = (degree - lo) / (hi - lo)
    return (p_min + (p_max - p_min) * fraction).float()


def node_row_layers(names: list[str]) -> list[str]:
    """The names among `names` of MeshGraphNet layers whose input rows are nodes."""
    return [name for name in names if name.startswith(NODE_ROW_PREFIXES)]


class NodeGroupQuantLinear(QuantLinear):
    """A `QuantLinear` over node rows with two input scales: junction rows and the others, and
    Degree-Quant's protective masking in training (module docstring). Weight as `QuantLinear`.

    Extra state: ``input_junction_scale`` float32 [] and ``input_junction_zero_point`` int32 []
    (parameters in lsq mode), and ``junction_observer`` for calibration. Needs the groups of
    the running `DegreeQuantizedModel` forward in every mode but float.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.integer_bias:
            raise SciquantError(
                f"{METHOD}: an integer bias needs one input scale per tensor; node-row layers "
                "have two (a simulation for targets without an integer runtime)"
            )
        device = self.weight.device
        self.register_buffer("input_junction_scale", torch.ones((), device=device))
        self.register_buffer(
            "input_junction_zero_point", torch.zeros((), dtype=torch.int32, device=device)
        )
        self.junction_observer = self._new_input_observer()

    @classmethod
    def of(cls, layer: QuantLinear) -> NodeGroupQuantLinear:
        """A node-group layer with `layer`'s weight, bias and specs (uncalibrated, observe)."""
        return cls(
            layer,
            layer.weight_spec,
            layer.activation_spec,
            activation_method=layer.activation_method,
            weight_method=layer.weight_method,
            integer_bias=layer.integer_bias,
        )

    # -- modes and calibration -----------------------------------------------------------------

    def check_mode(self, mode: str) -> None:
        if mode == "tqt":
            raise SciquantError(
                f"{METHOD} keeps two activation scales per node-row layer; TQT (one threshold "
                "per tensor) is not available for it"
            )
        super().check_mode(mode)

    def reset_observer(self) -> None:
        super().reset_observer()
        self.junction_observer = self._new_input_observer()

    def freeze(self) -> None:
        """Both groups' input qparams from their own observers (an empty group takes the other's),
        the weight qparams, then quantize mode."""
        junction: Observer = self.junction_observer
        others: Observer = self.input_observer
        if others.min_val is None and junction.min_val is not None:
            self.input_observer = junction  # no low-degree rows seen: both from the junctions
        elif junction.min_val is None:
            junction = others
        if junction.min_val is not None:
            scale, zero_point = junction.qparams(self.activation_spec)
            self._copy_qparams("input_junction", scale, zero_point)
        super().freeze()  # SciquantError when no row was seen at all

    def junction_input_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 [], zero_point int32 []) of the junction rows in effect; detached."""
        return _effective_qparams(
            self.input_junction_scale, self.input_junction_zero_point, self.activation_spec
        )

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "float":
            return F.linear(x, self.weight, self.bias)
        groups = self._groups(x)
        if self._mode == "observe":
            values = x.detach().float().cpu()
            junction = groups.junction.cpu()
            self.input_observer.update(values[~junction].numpy())
            self.junction_observer.update(values[junction].numpy())
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.fake_quantize_input(x), self.fake_quantize_weight(), self.used_bias())

    def fake_quantize_input(self, x: Tensor) -> Tensor:
        """Every row on its group's grid; in training, protected rows (drawn now) stay float."""
        groups = self._groups(x)
        junction = groups.junction.to(x.device)
        spec = self.activation_spec
        if self._mode == "lsq":
            quantized = self._learnable_rows(x, junction)
        else:
            scale = torch.where(junction, self.input_junction_scale, self.input_scale)
            zero_point = torch.where(
                junction, self.input_junction_zero_point, self.input_zero_point
            )
            quantized = fake_quantize_affine(x, scale.float(), zero_point.to(torch.int32), spec, 0)
        if self.training and groups.probability is not None:
            protected = groups.draw_protection().to(x.device)
            quantized = torch.where(protected.unsqueeze(-1), x, quantized)
        return quantized

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, junction rows: in-degree >= {JUNCTION_DEGREE}"

    # -- internals -----------------------------------------------------------------------------

    def _groups(self, x: Tensor) -> NodeGroups:
        groups = current_groups()
        if groups is None:
            raise SciquantError(
                f"{METHOD}: a node-row layer ran outside its DegreeQuantizedModel's forward, so "
                "it does not know the node degrees; call the quantized model, not its parts"
            )
        if x.shape[0] != groups.num_nodes:
            raise SciquantError(
                f"{METHOD}: a node-row layer got {x.shape[0]} rows, but the graph has "
                f"{groups.num_nodes} nodes"
            )
        return groups

    def _learnable_rows(self, x: Tensor, junction: Tensor) -> Tensor:
        """LSQ fake-quant of x [N, ...] with the two learnable group scales (and zero points)."""
        spec = self.activation_spec
        scales = torch.stack([self.input_scale, self.input_junction_scale]).float()
        scales = scales.abs().clamp_min(_MIN_SCALE)
        zero_points = torch.stack([self.input_zero_point, self.input_junction_zero_point]).float()
        index = junction.long()
        per_row = max(1, x[0].numel()) if x.shape[0] else 1
        counts = torch.bincount(index, minlength=2).clamp_min(1).double() * per_row
        factor = (1.0 / torch.sqrt(counts * spec.qmax)).to(scales.dtype)
        scales = _scaled_gradient(scales, factor)
        zero_points = _scaled_gradient(zero_points, factor)
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scales[index], zero_points[index], 0, spec.qmin, spec.qmax, 1.0
        )

    def _learnable_names(self) -> list[str]:
        names = [*super()._learnable_names(), "input_junction_scale"]
        if not self.activation_spec.symmetric:
            names.append("input_junction_zero_point")
        return names


def _scaled_gradient(value: Tensor, factor: Tensor) -> Tensor:
    """`value` exactly, with its gradient multiplied by `factor` (LSQ's gradient scaling)."""
    detached = value.detach()
    return detached + (value - detached) * factor


class DegreeQuantizedModel(QuantizedModel):
    """A `QuantizedModel` of a MeshGraphNet whose node-row layers are `NodeGroupQuantLinear`:
    its forward computes the node groups from ``edge_index`` and runs the model with them.

    ``p_min``, ``p_max``: the protection probabilities in training (the schema's defaults
    until `enable_degree_qat` sets them); ``generator``: the masks' CPU generator.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.p_min, self.p_max = protection_settings({})
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, node_features: Tensor, edge_features: Tensor, edge_index: Tensor) -> Tensor:
        with node_groups(self.node_groups(node_features.shape[0], edge_index)):
            return self.model(node_features, edge_features, edge_index)

    def node_groups(self, num_nodes: int, edge_index: Tensor) -> NodeGroups:
        """The groups of a graph of `num_nodes` nodes; protection only in training mode."""
        degree = in_degree(edge_index, num_nodes)
        junction = (degree >= JUNCTION_DEGREE).to(edge_index.device)
        probability = None
        if self.training and self.p_max > 0.0:
            probability = protection_probability(degree, self.p_min, self.p_max)
        return NodeGroups(degree, junction, probability, self.generator)

    def set_protection(self, p_min: float, p_max: float, seed: int | None = None) -> None:
        """Set the protection probabilities (and reseed the mask generator)."""
        if not 0.0 <= p_min <= p_max <= 1.0:
            raise SciquantError(f"need 0 <= p_min <= p_max <= 1, got {p_min}, {p_max}")
        self.p_min, self.p_max = float(p_min), float(p_max)
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def node_group_layers(self) -> dict[str, NodeGroupQuantLinear]:
        """The node-row layers by name."""
        return {
            name: layer
            for name, layer in self.quant_linears().items()
            if isinstance(layer, NodeGroupQuantLinear)
        }

    def get_extra_state(self) -> dict[str, Any]:
        return {"p_min": self.p_min, "p_max": self.p_max, "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.p_min, self.p_max = float(state["p_min"]), float(state["p_max"])
        self.generator.set_state(state["generator"])


def quantize_degree_model(
    model: nn.Module,
    target: Target | str,
    precision: Precision | str,
    precisions: Mapping[str, Precision | str] | None = None,
    qat_init: str | None = None,
) -> DegreeQuantizedModel:
    """`sciquant.quant.pytorch.quantize_model` for method qat-degree: a fake-quantized copy of a
    MeshGraphNet with two activation scales in its node-row layers; run `calibrate` next.
    qat_init: where calibration starts (`sciquant.quant.observers.QAT_INITS`; None: MSE)."""
    qmodel = quantize_layers(
        model, target, precision, METHOD, precisions=precisions, qat_init=qat_init
    )
    return make_degree_aware(qmodel)


def make_degree_aware(qmodel: QuantizedModel) -> DegreeQuantizedModel:
    """`qmodel` (fresh from `quantize_model`, uncalibrated) with its node-row layers made
    `NodeGroupQuantLinear`, as a `DegreeQuantizedModel` (same float copy, same layers)."""
    from sciquant.models.meshgraphnet import MeshGraphNet

    if not isinstance(qmodel.model, MeshGraphNet):
        raise SciquantError(
            f"method {METHOD} is for MeshGraphNet (node and edge rows, an edge_index), not "
            f"{type(qmodel.model).__name__}"
        )
    for name in node_row_layers(list(qmodel.quant_linears())):
        layer = qmodel.model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(qmodel.model.get_submodule(parent_name), child, NodeGroupQuantLinear.of(layer))
    return DegreeQuantizedModel(
        qmodel.model, qmodel.target, qmodel.precision, qmodel.method, qmodel.layer_precisions
    )


def enable_degree_qat(
    qmodel: DegreeQuantizedModel, p_min: float, p_max: float, seed: int = 0
) -> DegreeQuantizedModel:
    """Prepare a calibrated qat-degree model for fine-tuning: protection (p_min, p_max, masks
    seeded by `seed`) and LSQ mode where the scales are float, quantize mode (STE) on pow2 ones.

    Build the optimizer after this call (LSQ makes the qparams new parameters).
    """
    if not isinstance(qmodel, DegreeQuantizedModel):
        raise SciquantError(f"enable_degree_qat needs a {METHOD} model (quantize_model)")
    qmodel.set_protection(p_min, p_max, seed)
    layers = qmodel.quant_linears().values()
    try:
        for layer in layers:
            check_lsq_specs(layer.weight_spec, layer.activation_spec)
    except SciquantError:
        return set_mode(qmodel, "quantize")
    return set_mode(qmodel, "lsq")
