"""The built-in molecular-dynamics workload: frames of one molecule's trajectories in two
functional states (GPCRmd layout), classified by the ICNNMD CNN in Keras.

Its stages are those of the workload interface (`sciquant.workloads.Workload`), and the code they
run is this package's: the embedded simulator (`sim`), the pixel maps (`data`), training
(`train`), PTQ / QAT and the LiteRT conversion (`quantize`), classification metrics (`evaluate`).
What it shares lives in the layers below: the ICNNMD architecture (`sciquant.models`), the Keras
quantization core (`sciquant.quant.keras`), the runtimes (`sciquant.runtime`). Keras models run
where TensorFlow places them; `--device` applies to PyTorch models only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sciquant.workloads import Evaluation, Workload

__all__ = ["MolecularDynamics", "is_keras_artifact"]


def is_keras_artifact(path: Path) -> bool:
    """A Keras model, a LiteRT flatbuffer, or a Keras run's quantization.json."""
    return path.suffix in (".keras", ".tflite") or path.name == "quantization.json"


def _device_note(device: str | None) -> None:
    """Keras stages leave the device to TensorFlow (it uses a GPU it sees); say so on a GPU node
    type, where the log would otherwise not say what ran where."""
    if device not in (None, "cpu"):
        print(
            "note: a Keras model runs where TensorFlow places it (a GPU it sees, else the CPU); "
            f"--device {device} is applied to PyTorch models only",
            file=sys.stderr,
        )


class MolecularDynamics(Workload):
    """Molecular-dynamics frames in two states, classified by ICNNMD."""

    name = "md"
    architectures = {"icnnmd": "keras"}

    def synthesize(self, out: Path, settings: dict[str, Any]) -> None:
        from sciquant.workloads.md import sim as md_sim

        md_sim.synthesize(
            out, n_beads=settings["n_beads"], frames=settings["frames"], seed=settings["seed"]
        )

    def prepare(self, raw: Path, out: Path, settings: dict[str, Any]) -> None:
        """The embedded simulation's dataset_info.json lists its files and labels; a download
        lists them in manifest.json (the config's `role` and `label`)."""
        from sciquant.data.manifest import MANIFEST, check_delivered, embedded_source
        from sciquant.errors import SciquantError
        from sciquant.workloads.md import data as md

        options = {
            "selection": settings["selection"],
            "frames_per_trajectory": settings["frames_per_trajectory"],
            "split": tuple(settings["split"][k] for k in ("train", "valid", "test")),
            "gap": settings["gap"],
        }
        check_delivered(raw)
        if (raw / "dataset_info.json").is_file():
            md.prepare_from_info(raw, out, **options)
            return
        if embedded_source(raw):
            raise SciquantError(
                f"{raw / 'dataset_info.json'}: not found, though {raw / MANIFEST} records "
                "embedded (synthesized) data, whose files and labels that file lists; rerun "
                "synthesis (`snakemake --forcerun synthesize`)"
            )
        # The files are looked up under the names fetch saved them as (download.local_name).
        md.prepare_from_manifest(raw, out, **options)

    def overview(self, raw: Path, prepared: Path | None, out: Path, *, count: int = 4) -> None:
        from sciquant.errors import SciquantError
        from sciquant.workloads.bloodflow import overview

        if prepared is None:
            raise SciquantError("overview md: give --prepared (the folder with pixelmaps.npz)")
        overview.plot_md(prepared, out)

    def train(
        self, prepared: Path, out: Path, settings: dict[str, Any], *, seed: int,
        threads: int | None, device: str | None,
    ) -> None:  # fmt: skip
        from sciquant.vocabulary import node_device, section_with_defaults
        from sciquant.workloads.md import train as train_md

        train = section_with_defaults(settings, "icnnmd_model", "model")["train"]
        _device_note(device or node_device(train["node"]))
        train_md.run(
            prepared, out, epochs=train["epochs"], batch_size=train["batch_size"],
            learning_rate=train["learning_rate"], seed=seed, folds=train["folds"],
            threads=threads,
        )  # fmt: skip

    def quantize(
        self, artifact: Path, prepared: Path, out: Path, *, target: str, method: str,
        precision: str, settings: dict[str, Any], seed: int, threads: int | None,
        recommendation: Path | None,
    ) -> None:  # fmt: skip
        from sciquant.vocabulary import quantize_section, section_with_defaults
        from sciquant.workloads.md import quantize as quantize_md

        section = quantize_section(settings)
        model = section_with_defaults(settings.get("model", {}), "icnnmd_model", "model")
        qat = section["qat"]
        quantize_md.run(
            artifact, prepared, out, target=target, method=method, precision=precision,
            calibration_samples=section["calibration_frames"], qat_epochs=qat["epochs"],
            qat_learning_rate=qat["learning_rate"], qat_init=qat["init"],
            batch_size=model["train"]["batch_size"],
            seed=seed, threads=threads, adaround=section["adaround"],
        )  # fmt: skip

    def evaluate(
        self, plan: Evaluation, prepared: Path, out: Path, *, settings: dict[str, Any],
        coordinates: dict[str, Any], threads: int | None,
    ) -> None:  # fmt: skip
        from sciquant.vocabulary import section_with_defaults
        from sciquant.workloads.md import evaluate as evaluate_md
        from sciquant.workloads.md.quantize import artifact_for

        artifact, baseline = plan.artifact, plan.baseline
        _device_note(plan.device)
        if artifact.suffix == ".json":
            artifact = artifact_for(artifact.parent)
        if baseline is not None and baseline.suffix == ".json":
            baseline = artifact_for(baseline.parent)
        coordinates = dict(coordinates)
        study = coordinates.pop("study", None)
        settings_hashes = coordinates.pop("settings_hashes", None)
        settings = section_with_defaults(settings, "evaluate", "evaluate")
        evaluate_md.run(
            prepared, artifact, out / "metrics.json", coordinates=coordinates,
            simulated=plan.simulated, repeats=settings["latency_repeats"], threads=threads,
            study=study, settings_hashes=settings_hashes, baseline=baseline,
            debug_inputs=settings["debug_inputs"],
        )  # fmt: skip
