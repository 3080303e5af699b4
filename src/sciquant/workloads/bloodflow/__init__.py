"""The built-in blood-flow workload: 1D hemodynamics of vascular trees (VMR / PhysicsNeMo
bloodflow_1d_mgn layout), learned by MeshGraphNet in PyTorch.

Its stages are those of the workload interface (`sciquant.workloads.Workload`), and the code they
run is this package's: the embedded simulator (`sim`: the linear circuit, `sim_1d`: the nonlinear
1D equations; `network`: the tree's lumped hemodynamics, `vtp`: the centerline files), the
preparation into graph samples (`data`) and their features (`features`), training (`train`),
PTQ / QAT and the ONNX export (`quantize`; ONNX Runtime's dynamic INT8 in `dynamic`), the
per-layer sensitivity analysis (`sensitivity`), rollouts (`rollout`), their metrics (`evaluate`)
and physics checks and no-network baselines (`physics`), the data's figure (`overview`). What it
shares with other workloads lives in the layers below: the MeshGraphNet architecture
(`sciquant.models`), the quantization core and its methods (`sciquant.quant`), the runtimes
(`sciquant.runtime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sciquant.workloads import Evaluation, Workload

__all__ = ["BloodFlow"]


class BloodFlow(Workload):
    """Blood-flow simulations on vascular trees, learned by MeshGraphNet."""

    name = "bloodflow"
    architectures = {"meshgraphnet": "torch"}

    def synthesize(self, out: Path, settings: dict[str, Any]) -> None:
        from sciquant.workloads.bloodflow import sim as bloodflow_sim

        params = bloodflow_sim.params_from_mapping(settings["parameters"])
        bloodflow_sim.synthesize(
            out, n_simulations=settings["n_simulations"], seed=settings["seed"], params=params
        )

    def prepare(self, raw: Path, out: Path, settings: dict[str, Any]) -> None:
        from sciquant.workloads.bloodflow import data as bloodflow

        bloodflow.prepare(raw, out, bloodflow.PrepareSettings(**settings))

    def overview(self, raw: Path, prepared: Path | None, out: Path, *, count: int = 4) -> None:
        from sciquant.workloads.bloodflow import overview

        overview.plot_bloodflow(raw, out, n_simulations=count)

    def train(
        self, prepared: Path, out: Path, settings: dict[str, Any], *, seed: int,
        threads: int | None, device: str | None,
    ) -> None:  # fmt: skip
        from sciquant.workloads.bloodflow import train as train_bloodflow

        train_bloodflow.run(
            prepared, out, settings=settings, seed=seed, threads=threads, device=device
        )

    def quantize(
        self, artifact: Path, prepared: Path, out: Path, *, target: str, method: str,
        precision: str, settings: dict[str, Any], seed: int, threads: int | None,
        recommendation: Path | None,
    ) -> None:  # fmt: skip
        from sciquant.quant.observers import DYNAMIC_METHODS

        if method in DYNAMIC_METHODS:  # ONNX Runtime's: the model.onnx, no calibration
            from sciquant.workloads.bloodflow import dynamic

            dynamic.run(artifact, out, target, precision, threads=threads)
            return
        from sciquant.workloads.bloodflow import quantize as quantize_bloodflow

        # the stage fills the quantize section from the schema itself
        quantize_bloodflow.run(
            artifact, prepared, out, target, method, precision, settings=settings, seed=seed,
            threads=threads, recommendation=recommendation,
        )  # fmt: skip

    def export(self, artifact: Path, prepared: Path | None, out: Path) -> None:
        from sciquant.workloads.bloodflow import quantize as quantize_bloodflow

        quantize_bloodflow.export(artifact, prepared, out)

    def evaluate(
        self, plan: Evaluation, prepared: Path, out: Path, *, settings: dict[str, Any],
        coordinates: dict[str, Any], threads: int | None,
    ) -> None:  # fmt: skip
        from sciquant.workloads.bloodflow import evaluate as evaluate_bloodflow

        evaluate_bloodflow.run(
            plan.artifact, prepared, out, settings=settings, coordinates=coordinates,
            threads=threads, onnx=plan.onnx, simulated=plan.simulated,
            runtime=plan.runtime if plan.onnx is not None else "torch",
            baseline_checkpoint=plan.baseline, baseline_onnx=plan.baseline_onnx,
            device=plan.device,
        )  # fmt: skip
