"""Words every layer of sciquant shares, defined once.

`COORDINATES`: the six coordinates of a run, in the order of its folder
(``results/<dataset>/<model>/seed<seed>/<target>/<method>/<precision>``), of `metrics.json`'s
``coordinates`` and of the result cube's dimensions. `sciquant.study.Run` has them as fields
(a test checks that they agree). `MIXED`: the precision label of the sensitivity analysis'
mixed-precision run. `SCHEMA`: the config schema, where every setting's default lives.
`CPU_NODE` and `node_device`: what a node type asks for.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COORDINATES", "CPU_NODE", "MIXED", "SCHEMA", "node_device"]

COORDINATES = ("dataset", "model", "seed", "target", "method", "precision")
#: Precision label of the run that evaluates the sensitivity analysis' mixed assignment.
MIXED = "mixed"
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
#: The node type with no GPU; every other node type (v100, rtx3090) is a GPU node.
CPU_NODE = "cpu"


def node_device(node: str) -> str:
    """The device a stage on node type `node` asks for: `cuda` on a GPU node type (any node
    type but `cpu`), `cpu` on `cpu` (a CPU node never asks for a GPU)."""
    return "cpu" if node == CPU_NODE else "cuda"
