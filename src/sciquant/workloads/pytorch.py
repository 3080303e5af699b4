"""A PyTorch surrogate as a workload: the plug-in writes its data, its model and its metrics;
sciquant trains, calibrates, quantizes (PTQ and QAT), exports, runs and times it.

A subclass of `TorchWorkload` gives:

- `name`, `architectures` (``{"my_arch": "torch"}``), the JSON Schemas of its settings
  (`simulation_schema`, `prepare_schema`, `model_properties`, see `sciquant.workloads.Workload`);
- `simulate(out, settings)`: the embedded raw data (any files) in `out`;
- `make_splits(raw, settings)`: raw files → ``{"train", "valid", "test"}`` `Split`s, each the
  model's inputs (a tuple of arrays, samples along axis 0), its targets and any `extra` arrays
  its metrics need (saved together in ``data.npz``);
- `build_model(settings)`: the float ``torch.nn.Module`` (settings: the model's config with the
  schema's defaults; its forward takes the inputs in order, one tensor each);
- `metrics(predict, test)`: what the surrogate is judged by, from ``predict(inputs) -> outputs``
  (numpy in and out) — one-step errors, rollouts, anything; and `baselines(test)`: the same
  metrics of the no-network baselines (DESIGN: every accuracy number stands beside them).

For the retained gain (`sciquant.report.gain`), optionally: `sample_errors(predict, test)` and
`baseline_sample_errors(test)`, errors (lower is better) per test sample ``{metric: [n]}``, named
as the metrics they stand beside (``rollout_error_pct`` → ``retained_gain_rollout_pct``), and
`gain_baseline`, the baseline (a key of `baselines`) the gain is measured against. With them,
every quantized run's retained gain and its paired bootstrap CI enter the cube and the report.

Optionally `loss` (default mean squared error), `input_names` / `output_name` (the ONNX graph's)
and `overview`. Every `torch.nn.Linear` is quantized; the other layers stay float.

The stages: `train` (Adam, the best validation epoch kept; ``checkpoint.pt``), `quantize`
(calibration on the first training samples, then PTQ refinements or QAT fine-tuning with the
same loss; ``quantized.pt``), `export` (FP32 or QDQ ONNX with a dynamic batch axis), `evaluate`
(the run's runtime: eager torch, the fake-quant simulation, ONNX Runtime or OpenVINO; a timed
run beside its target's FP32, interleaved in one process; ``metrics.json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sciquant.data.download import sha256_of
from sciquant.errors import SciquantError
from sciquant.provenance import write_csv
from sciquant.workloads import Evaluation, Workload

__all__ = ["Split", "TorchWorkload"]

#: Methods a plug-in's model takes: every calibrated method that needs no architecture of its
#: own (`ptq-cle` needs MeshGraphNet's ReLU pairs, `qat-degree` its graph; `ptq-dynamic` is
#: ONNX Runtime's rewrite of the MeshGraphNet graph).
METHODS = (
    "ptq-minmax", "ptq-percentile", "ptq-mse", "ptq-entropy", "ptq-adaround", "ptq-biascorr",
    "qat-ste", "qat-lsq", "qat-tqt",
)  # fmt: skip
SPLITS = ("train", "valid", "test")
#: Samples per batch of the quantization debugging (`debug_inputs` such batches).
DEBUG_BATCH = 256
MODEL_FORMAT = "sciquant-workload-model"
#: The columns of training_log.csv / qat_log.csv (one row per epoch).
LOG_COLUMNS = ("epoch", "train_loss", "valid_loss")
QUANTIZED_FORMAT = "sciquant-workload-quantized"


@dataclass
class Split:
    """One split of a prepared dataset: the model's inputs (arrays, samples along axis 0), its
    targets, and any arrays the workload's metrics need besides (`extra`)."""

    inputs: tuple[np.ndarray, ...]
    targets: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)


class TorchWorkload(Workload):
    """Base of a PyTorch plug-in workload (see the module docstring for what a subclass gives)."""

    #: The file `prepare` writes the splits to, beside ``index.json`` (which the rules track).
    prepared_file: ClassVar[str] = "data.npz"
    input_names: ClassVar[tuple[str, ...]] = ("x",)
    output_name: ClassVar[str] = "y"
    methods: ClassVar[tuple[str, ...]] = METHODS
    #: Where its runs execute natively (the config check refuses targets of other runtimes):
    #: eager torch (FP32 reference, FP16/BF16 casts), ONNX Runtime and OpenVINO from the ONNX
    #: export. TensorRT would need the GPU engine build of `sciquant.runtime.tensorrt`.
    runtimes: ClassVar[tuple[str, ...]] = ("torch", "onnxruntime", "openvino")

    # --- what a plug-in writes -------------------------------------------------------------

    def simulate(self, out: Path, settings: dict[str, Any]) -> None:
        """Write the embedded raw data into `out`."""
        raise SciquantError(f"workload {self.name} has no embedded data; give `source.files`")

    def make_splits(self, raw: Path, settings: dict[str, Any]) -> dict[str, Split]:
        """Raw files → the train, valid and test splits."""
        raise NotImplementedError

    def build_model(self, settings: dict[str, Any]) -> Any:
        """The float model (a torch.nn.Module) for a model's settings."""
        raise NotImplementedError

    def metrics(self, predict: Callable[..., np.ndarray], test: Split) -> dict[str, float]:
        """The surrogate's metrics on the test split, from `predict(*inputs) -> outputs`."""
        raise NotImplementedError

    def baselines(self, test: Split) -> dict[str, dict[str, float]]:
        """The no-network baselines' metrics on the test split, by baseline name."""
        return {}

    #: The no-network baseline (a key of `baselines`) the retained gain is measured against;
    #: None: no retained gain.
    gain_baseline: ClassVar[str | None] = None

    def sample_errors(
        self, predict: Callable[..., np.ndarray], test: Split
    ) -> dict[str, np.ndarray]:
        """Errors per test sample {metric: [n]} (lower is better) for the retained gain."""
        return {}

    def baseline_sample_errors(self, test: Split) -> dict[str, dict[str, np.ndarray]]:
        """The same errors of the no-network baselines, by baseline name."""
        return {}

    def loss(self, outputs: Any, targets: Any) -> Any:
        """Training and QAT loss (a scalar tensor); mean squared error unless overridden."""
        import torch

        return torch.mean((outputs - targets) ** 2)

    # --- the stages ------------------------------------------------------------------------

    def synthesize(self, out: Path, settings: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.simulate(out, settings)

    def prepare(self, raw: Path, out: Path, settings: dict[str, Any]) -> None:
        splits = self.make_splits(raw, settings)
        missing = [name for name in SPLITS if name not in splits or len(splits[name]) == 0]
        if missing:
            raise SciquantError(
                f"workload {self.name}: make_splits gave no {', '.join(missing)} samples from "
                f"{raw}; check datasets.<name>.prepare"
            )
        arrays: dict[str, np.ndarray] = {}
        for split_name, split in splits.items():
            if len(split.inputs) != len(self.input_names):
                raise SciquantError(
                    f"workload {self.name}: split {split_name} has {len(split.inputs)} inputs, "
                    f"the model takes {len(self.input_names)} ({', '.join(self.input_names)})"
                )
            for i, values in enumerate(split.inputs):
                if len(values) != len(split.targets):
                    raise SciquantError(
                        f"workload {self.name}: split {split_name} has {len(values)} samples of "
                        f"input {self.input_names[i]} but {len(split.targets)} targets"
                    )
                arrays[f"{split_name}/input{i}"] = np.asarray(values)
            arrays[f"{split_name}/targets"] = np.asarray(split.targets)
            for key, values in split.extra.items():
                arrays[f"{split_name}/extra/{key}"] = np.asarray(values)
        out.mkdir(parents=True, exist_ok=True)
        from sciquant.provenance import atomic_path, write_json

        with atomic_path(out / self.prepared_file) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        index = {
            "workload": self.name,
            "settings": settings,
            "samples": {name: len(splits[name]) for name in SPLITS},
            "file": self.prepared_file,
        }
        write_json(out / "index.json", index)
        print(
            f"prepared {self.name}: "
            + ", ".join(f"{len(splits[name])} {name}" for name in SPLITS)
            + f" samples in {out / self.prepared_file}"
        )

    def overview(self, raw: Path, prepared: Path | None, out: Path, *, count: int = 4) -> None:
        """Histograms of the targets of each split."""
        if prepared is None:
            raise SciquantError(f"overview {self.name}: give --prepared (its prepared data)")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in SPLITS:
            targets = self.load_split(prepared, name).targets.ravel()
            ax.hist(targets, bins=40, alpha=0.5, label=f"{name} ({len(targets)} values)")
        ax.set_xlabel("target")
        ax.set_ylabel("count")
        ax.set_title(f"{self.name}: targets by split")
        ax.legend()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)

    def load_split(self, prepared: Path, split: str) -> Split:
        """One split of the prepared data (`prepare`'s file)."""
        path = Path(prepared) / self.prepared_file
        try:
            data = np.load(path)
        except (OSError, ValueError) as error:
            raise SciquantError(
                f"{path}: not readable prepared data ({error}); rerun the prepare stage"
            ) from error
        with data:
            count = sum(1 for key in data.files if key.startswith(f"{split}/input"))
            if f"{split}/targets" not in data.files or count == 0:
                raise SciquantError(f"{path}: no {split} split; rerun the prepare stage")
            inputs = tuple(data[f"{split}/input{i}"] for i in range(count))
            prefix = f"{split}/extra/"
            extra = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
            return Split(inputs, data[f"{split}/targets"], extra)

    def train(
        self, prepared: Path, out: Path, settings: dict[str, Any], *, seed: int,
        threads: int | None, device: str | None,
    ) -> None:  # fmt: skip
        import torch

        from sciquant.provenance import select_device
        from sciquant.vocabulary import node_device, section_with_defaults

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        definition = f"{settings.get('architecture')}_model"
        settings = section_with_defaults(settings, definition, "model")
        train = settings["train"]
        # the node type's device (a GPU node type without CUDA trains on the CPU, saying so)
        chosen = select_device(device or node_device(train["node"]), "train")
        model = self.build_model(settings).to(chosen)
        data = self.load_split(prepared, "train"), self.load_split(prepared, "valid")
        log = _fit(self, model, *data, train["epochs"], train["batch_size"],
                   train["learning_rate"], seed, device=chosen)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "format": MODEL_FORMAT,
            "workload": self.name,
            "settings": settings,
            "seed": seed,
            "device": chosen,
            "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
            "data_sha256": sha256_of(Path(prepared) / "index.json"),
        }
        _save(state, out / "checkpoint.pt")
        write_csv(out / "training_log.csv", log, LOG_COLUMNS)

    def quantize(
        self, artifact: Path, prepared: Path, out: Path, *, target: str, method: str,
        precision: str, settings: dict[str, Any], seed: int, threads: int | None,
        recommendation: Path | None,
    ) -> None:  # fmt: skip
        import torch

        from sciquant.quant.adaround import (
            AdaRoundSettings,
            adaround,
            correct_bias,
            float_layers,
        )
        from sciquant.quant.pytorch import calibrate, enable_lsq, enable_tqt, set_mode
        from sciquant.vocabulary import quantize_section

        if method not in self.methods:
            raise SciquantError(
                f"method {method} is not available for workload {self.name}; its methods: "
                f"{', '.join(self.methods)}"
            )
        if recommendation is not None:
            raise SciquantError(f"workload {self.name} has no mixed-precision runs")
        section = quantize_section(settings)
        if threads:
            torch.set_num_threads(threads)
        model, state = self.load_model(artifact)
        qmodel = self._quantized_copy(model, target, precision, method, section["qat"]["init"])
        train = self.load_split(prepared, "train")
        batches = self._calibration_batches(train, section["calibration_samples"])
        calibrate(qmodel, batches)
        print(f"calibrated {len(qmodel.quantized_layers())} layers on {len(train)} samples")
        moved = None
        if method == "ptq-adaround":
            adaround(qmodel, model, batches, AdaRoundSettings(**section["adaround"], seed=seed))
        elif method == "ptq-biascorr":
            correct_bias(qmodel, model, batches)
        if method in ("ptq-adaround", "ptq-biascorr"):
            moved = float_layers(qmodel, model)  # the per-layer SQNR is against these
        log: list[dict[str, float]] = []
        if method.startswith("qat-"):
            if method == "qat-lsq":
                enable_lsq(qmodel)
            elif method == "qat-tqt":
                enable_tqt(qmodel)
            qat = section["qat"]
            torch.manual_seed(seed)
            log = _fit(
                self, qmodel, train, self.load_split(prepared, "valid"), qat["epochs"],
                state["settings"]["train"]["batch_size"], qat["learning_rate"], seed,
            )  # fmt: skip
            set_mode(qmodel, "quantize")
        out.mkdir(parents=True, exist_ok=True)
        quantized = {
            "format": QUANTIZED_FORMAT,
            "workload": self.name,
            "settings": state["settings"],
            "seed": state["seed"],
            "target": target,
            "method": method,
            "precision": precision,
            "state_dict": qmodel.state_dict(),
            "float_layers": moved,
            "quantize": section,
        }
        _save(quantized, out / "quantized.pt")
        if log:
            write_csv(out / "qat_log.csv", log, LOG_COLUMNS)

    def export(self, artifact: Path, prepared: Path | None, out: Path) -> None:
        import torch

        from sciquant.quant.export import export_qdq_onnx

        model, state = self.load_model(artifact)
        if prepared is None:
            raise SciquantError(f"{artifact}: the export traces a test sample: give --prepared")
        example = tuple(torch.as_tensor(x[:2]) for x in self.load_split(prepared, "test").inputs)
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in self.input_names)
        out.parent.mkdir(parents=True, exist_ok=True)
        if state["format"] == QUANTIZED_FORMAT:
            export_qdq_onnx(
                model, out, example, input_names=self.input_names,
                output_name=self.output_name, dynamic_shapes=shapes,
            )  # fmt: skip
            return
        import onnx

        model.eval()
        with torch.no_grad():
            torch.onnx.export(
                model, example, str(out), input_names=list(self.input_names),
                output_names=[self.output_name], opset_version=18, dynamo=True,
                external_data=False, dynamic_shapes=shapes, verbose=False,
            )  # fmt: skip
        onnx.checker.check_model(str(out), full_check=True)

    def evaluate(
        self, plan: Evaluation, prepared: Path, out: Path, *, settings: dict[str, Any],
        coordinates: dict[str, Any], threads: int | None,
    ) -> None:  # fmt: skip
        import torch

        from sciquant.provenance import provenance, write_json
        from sciquant.runtime.paired import host_facts, paired_timing
        from sciquant.vocabulary import COORDINATES, section_with_defaults

        started = time.perf_counter()
        artifact, onnx, runtime, simulated = plan.artifact, plan.onnx, plan.runtime, plan.simulated
        baseline, baseline_onnx = plan.baseline, plan.baseline_onnx
        settings = section_with_defaults(settings, "evaluate", "evaluate")
        if threads:
            torch.set_num_threads(threads)
        test = self.load_split(prepared, "test")
        loaded = self.load_model(artifact)
        step, label = self._step(artifact, onnx, runtime, coordinates, threads, loaded)

        def predict(*inputs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                tensors = [torch.as_tensor(np.ascontiguousarray(x)) for x in inputs]
                return np.asarray(step(*tensors), dtype=np.float32)

        metrics = dict(self.metrics(predict, test))
        if not simulated:
            # batch-1 calls on the test samples, paired with the target's FP32 where it has one
            sample = [tuple(torch.as_tensor(x[i : i + 1]) for x in test.inputs)
                      for i in range(min(len(test), 64))]  # fmt: skip
            position = {"run": 0, "baseline": 0}

            def call(which: str, timed: Any) -> Callable[[], None]:
                def one() -> None:
                    with torch.no_grad():
                        timed(*sample[position[which] % len(sample)])
                    position[which] += 1

                return one

            repeats = settings["latency_repeats"]
            if baseline is not None:
                base, _ = self._step(baseline, baseline_onnx, runtime, None, threads)
                other = call("baseline", base)
            else:  # the target's FP32 itself: its calls alone (no second side to time)
                other = lambda: None  # noqa: E731
            paired = paired_timing(call("run", step), other, repeats, warmup=5,
                                   threads=threads or 1)  # fmt: skip
            metrics.update(
                latency_ms_median=paired["run_time_s_median"] * 1e3,
                latency_ms_min=paired["run_time_s_min"] * 1e3,
                latency_ms_max=paired["run_time_s_max"] * 1e3,
                latency_repeats=repeats,
                cpu_share=paired["cpu_share"],
                contended=float(paired["contended"]),
            )
            if baseline is not None:
                metrics.update(
                    baseline_latency_ms_median=paired["baseline_time_s_median"] * 1e3,
                    paired_speedup=paired["paired_speedup"],
                    paired_speedup_ci_low=paired["paired_speedup_ci_low"],
                    paired_speedup_ci_high=paired["paired_speedup_ci_high"],
                    timing_pairs=repeats,
                )
            else:
                metrics["paired_speedup"] = 1.0
        metrics.update(self._quant_debug(loaded, onnx, test, predict, settings))
        if onnx is not None:
            from sciquant.quant.debug import overflow_metrics

            metrics.update(overflow_metrics(step))
        baselines = {name: dict(values) for name, values in self.baselines(test).items()}
        gain: dict[str, Any] = {}
        if self.gain_baseline is not None:
            per_sample = self._per_sample("sample_errors", self.sample_errors(predict, test))
            if per_sample:
                metrics["per_simulation"] = per_sample
                gain["gain_baseline"] = self.gain_baseline
            for name, errors in self.baseline_sample_errors(test).items():
                if name not in baselines:
                    raise SciquantError(
                        f"workload {self.name}: baseline_sample_errors gives {name!r}, which "
                        f"baselines() does not ({', '.join(baselines) or 'none'})"
                    )
                baselines[name]["per_simulation"] = self._per_sample(
                    f"baseline_sample_errors[{name!r}]", errors, len(per_sample) or None
                )
        payload: dict[str, Any] = {
            "coordinates": {k: coordinates.get(k) for k in COORDINATES},
            "study": coordinates.get("study"),
            "settings_hashes": coordinates.get("settings_hashes"),
            "workload": self.name,
            "simulated": simulated,
            "runtime": label,
            "metrics": metrics,
            "baselines": baselines,
            **gain,
            "provenance": provenance(time.perf_counter() - started, threads),
        }
        if "latency_ms_median" in metrics:
            payload["host"] = host_facts()
        write_json(out / "metrics.json", payload)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and "latency" not in k)  # fmt: skip
        print(f"{artifact.name} ({label}): {shown}")

    # --- helpers ---------------------------------------------------------------------------

    def load_model(self, artifact: Path) -> tuple[Any, dict[str, Any]]:
        """The float model of a checkpoint.pt, or the quantized one of a quantized.pt (eval)."""
        import torch

        try:
            state = torch.load(artifact, map_location="cpu", weights_only=False)
        except FileNotFoundError as error:
            raise SciquantError(f"{artifact}: not found; run the stage that writes it") from error
        except Exception as error:
            raise SciquantError(
                f"{artifact}: not readable ({type(error).__name__}); delete it and rerun the "
                "stage that writes it"
            ) from error
        known = (MODEL_FORMAT, QUANTIZED_FORMAT)
        if not isinstance(state, dict) or state.get("format") not in known:
            raise SciquantError(f"{artifact}: not a {self.name} model; rerun its train stage")
        if state.get("workload") != self.name:
            raise SciquantError(
                f"{artifact}: a model of workload {state.get('workload')!r}, not {self.name!r}"
            )
        model = self.build_model(state["settings"])
        if state["format"] == QUANTIZED_FORMAT:
            model = self._quantized_copy(model, state["target"], state["precision"],
                                         state["method"])  # fmt: skip
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as error:
            raise SciquantError(
                f"{artifact}: does not fit the model its settings build ({error}); rerun the "
                "stage that writes it"
            ) from error
        return model.eval(), state

    def _per_sample(
        self, source: str, errors: Mapping[str, Any], count: int | None = None
    ) -> dict[str, dict[str, float]]:
        """{sample: {metric: error}} of per-sample error arrays, all of one length (`count`
        where given: the network's, so that the baselines pair with it sample by sample)."""
        table: dict[str, dict[str, float]] = {}
        for metric, values in errors.items():
            values = np.asarray(values, dtype=np.float64).ravel()
            count = len(values) if count is None else count
            if len(values) != count or count == 0:
                raise SciquantError(
                    f"workload {self.name}: {source} gives {len(values)} values of {metric} "
                    f"where the network's errors have {count}; give one per test sample (or "
                    "case), in the same order"
                )
            for i, value in enumerate(values):
                table.setdefault(f"sample_{i:05d}", {})[metric] = float(value)
        return table

    def _quant_debug(
        self, loaded: tuple[Any, dict[str, Any]], onnx: Path | None, test: Split,
        predict: Callable[..., np.ndarray], settings: dict[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        """A quantized run's per-layer output SQNR against FP32 on the first test samples (the
        evaluate section's `debug_inputs` batches of `DEBUG_BATCH`), and for a run on a runtime
        the agreement of its outputs with the simulation's on the same samples."""
        import torch

        from sciquant.quant.debug import output_agreement, sqnr_metrics, torch_layer_sqnr

        count = min(settings["debug_inputs"] * DEBUG_BATCH, len(test))
        if count == 0:
            return {}
        model, state = loaded
        if state["format"] != QUANTIZED_FORMAT:
            return {}
        batches = [
            tuple(torch.as_tensor(x[start : start + DEBUG_BATCH]) for x in test.inputs)
            for start in range(0, count, DEBUG_BATCH)
        ]
        layers = torch_layer_sqnr(model, batches, float_layers=state.get("float_layers"))
        debug = sqnr_metrics(layers, count)
        if onnx is not None:
            with torch.no_grad():
                simulated = torch.cat([model(*batch) for batch in batches]).numpy()
            deployed = predict(*(x[:count] for x in test.inputs))
            debug.update(output_agreement(simulated, deployed, inputs=count))
        return debug

    def _quantized_copy(
        self, model: Any, target: str, precision: str, method: str, qat_init: str | None = None
    ) -> Any:
        from sciquant.quant.pytorch import quantize_model

        return quantize_model(model, target, precision, method, qat_init=qat_init)

    def _calibration_batches(self, train: Split, samples: int) -> list[tuple[Any, ...]]:
        import torch

        count = min(samples, len(train))
        size = max(1, min(256, count))
        return [
            tuple(torch.as_tensor(x[start : start + size]) for x in train.inputs)
            for start in range(0, count, size)
        ]

    def _step(
        self, artifact: Path, onnx: Path | None, runtime: str,
        coordinates: Mapping[str, Any] | None, threads: int | None,
        loaded: tuple[Any, dict[str, Any]] | None = None,
    ) -> tuple[Callable[..., Any], str]:  # fmt: skip
        """What runs the artifact (`loaded`: it, already loaded), and the runtime's label."""
        if onnx is None:  # FP32 in eager torch, or the fake-quant simulation
            model, state = loaded or self.load_model(artifact)
            kind = "fake-quant" if state["format"] == QUANTIZED_FORMAT else "torch"
            return model, kind
        if runtime == "openvino":
            from sciquant.runtime.openvino import OvStep

            precision = (coordinates or {}).get("precision", "fp32")
            ov_precision = precision if precision in ("fp32", "bf16") else "w8a8"
            return OvStep(onnx, ov_precision, threads=threads or 1), "openvino"
        if runtime != "onnxruntime":
            raise SciquantError(
                f"workload {self.name}: runtime {runtime} is not available for plug-in "
                "workloads (onnxruntime, openvino, or a simulation)"
            )
        from sciquant.runtime.onnxruntime import OrtStep

        return OrtStep(onnx, threads or 1), "onnxruntime"


def _batches(
    split: Split, size: int, rng: np.random.Generator | None, device: str = "cpu"
) -> Iterator[tuple]:
    import torch

    order = rng.permutation(len(split)) if rng is not None else np.arange(len(split))
    for start in range(0, len(split), size):
        chosen = order[start : start + size]
        yield (
            tuple(torch.as_tensor(x[chosen], device=device) for x in split.inputs),
            torch.as_tensor(split.targets[chosen], device=device),
        )


def _fit(
    workload: TorchWorkload, model: Any, train: Split, valid: Split, epochs: int,
    batch_size: int, learning_rate: float, seed: int, device: str = "cpu",
) -> list[dict[str, float]]:  # fmt: skip
    """Adam on the workload's loss, cosine learning rate; the best validation epoch's weights
    are kept. Returns one row per epoch."""
    import copy

    import torch

    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=learning_rate)  # fmt: skip
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    best, best_state, log = float("inf"), None, []
    for epoch in range(epochs):
        model.train()
        losses = []
        for inputs, targets in _batches(train, batch_size, rng, device):
            optimizer.zero_grad()
            loss = workload.loss(model(*inputs), targets)
            if not torch.isfinite(loss):
                raise SciquantError(
                    f"workload {workload.name}: the training loss is {loss.item()} at epoch "
                    f"{epoch + 1}; lower train.learning_rate"
                )
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        model.eval()
        with torch.no_grad():
            valid_losses = [
                workload.loss(model(*inputs), targets).item() * len(targets)
                for inputs, targets in _batches(valid, 1024, None, device)
            ]
        valid_loss = sum(valid_losses) / len(valid)
        log.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                    "valid_loss": valid_loss})  # fmt: skip
        print(f"epoch {epoch + 1}/{epochs}: train loss {np.mean(losses):.4g}, "
              f"valid loss {valid_loss:.4g}", flush=True)  # fmt: skip
        if valid_loss < best:
            best, best_state = valid_loss, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return log


def _save(state: dict[str, Any], path: Path) -> None:
    import torch

    from sciquant.provenance import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
