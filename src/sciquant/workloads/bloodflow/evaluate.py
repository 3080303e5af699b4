"""Evaluation of a blood-flow surrogate: rollouts of the test simulations, errors, timings.

Device: PyTorch rollouts (the FP32 model, fake-quant simulations) run on `cuda` where the run's
node type has a GPU (`--device cuda`, which the rules and `sciquant submit` pass for runs on a
GPU node type) and CUDA is present, else on the CPU; without CUDA a GPU run says so in its log
and runs on the CPU (`sciquant.provenance.select_device`). TensorRT runs on the GPU always;
ONNX Runtime and OpenVINO on the CPU. metrics.json's `provenance` records the device used.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sciquant.provenance import (  # noqa: E402
    describe_device,
    provenance,
    select_device,
    write_json,
)
from sciquant.quant.debug import DEBUG_INPUTS, describe, overflow_metrics  # noqa: E402
from sciquant.vocabulary import COORDINATES, section_with_defaults  # noqa: E402
from sciquant.workloads.bloodflow.data import INLET, JUNCTION, OUTLET, load_index, load_sample  # noqa: E402
from sciquant.workloads.bloodflow.features import (  # noqa: E402
    GraphTensors,
    Normalizer,
    merge_graphs,
    to_tensors,
    true_state_inputs,
)
from sciquant.workloads.bloodflow.physics import (  # noqa: E402
    BASELINES,
    GAIN_BASELINE,
    baseline_errors,
    mean_checks,
    physics_checks,
)
from sciquant.workloads.bloodflow.rollout import (  # noqa: E402
    StepFunction,
    rollout_all,
    rollout_errors,
)
from sciquant.workloads.bloodflow.train import load_model  # noqa: E402

MMHG = 1333.2  # dyn/cm² per mmHg


def test_samples(prepared: Path) -> dict[str, dict[str, np.ndarray]]:
    """The test split's prepared samples by name (time offset 0 only: the simulation's grid)."""
    index = load_index(prepared)
    return {name: load_sample(prepared, name) for name in index["samples"]["test"]}


def training_errors(
    step: StepFunction,
    prepared: Path,
    norm: Normalizer,
    count: int,
    device: str | None = None,
) -> dict[str, float]:
    """The network's and the calibrated prior's mean errors on up to `count` training
    simulations (their first time offset, evenly spread over the split): beside the test
    simulations' errors, how much of the network's gain is learned physics and how much is
    fitted to the trees it was trained on."""
    names = [n for n in load_index(prepared)["samples"]["train"] if n.endswith("_o0")]
    if count <= 0 or not names:
        return {}
    names = [names[i] for i in np.linspace(0, len(names) - 1, min(count, len(names))).astype(int)]
    samples = {name: load_sample(prepared, name) for name in names}
    graphs = [to_tensors(name, sample, norm) for name, sample in samples.items()]
    predictions = rollout_all(step, graphs, norm, device)
    network = [rollout_errors(p, q, g, norm) for g, (p, q) in zip(graphs, predictions, strict=True)]
    prior = [baseline_errors(sample, GAIN_BASELINE) for sample in samples.values()]
    metrics: dict[str, float] = {"training_simulations": len(graphs)}
    for field in ("pressure_error_pct", "flowrate_error_pct"):
        metrics[f"training_{field}"] = float(np.mean([errors[field] for errors in network]))
        metrics[f"training_calibrated_{field}"] = float(np.mean([e[field] for e in prior]))
    return metrics


def test_graphs(
    prepared: Path,
    norm: Normalizer,
    samples: dict[str, dict[str, np.ndarray]] | None = None,
) -> list[GraphTensors]:
    """The test split's samples as tensors (`samples`: already read by `test_samples`)."""
    samples = test_samples(prepared) if samples is None else samples
    return [to_tensors(name, sample, norm) for name, sample in samples.items()]


class TimedStep:
    """A step function that adds the wall time of each call to `seconds` (the network alone).

    The rollout around the network (features, the prior's step, the branch fit) is the same
    for every precision; the network's share is what a low-precision kernel speeds up, and what
    `sciquant bench rollout` times. CPU runtimes only: a CUDA call returns before it finishes.
    """

    def __init__(self, step: StepFunction) -> None:
        self.step = step
        self.seconds = 0.0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        output = self.step(*inputs)
        self.seconds += time.perf_counter() - started
        return output


def time_rollouts(
    step: StepFunction,
    graphs: list[GraphTensors],
    norm: Normalizer,
    repeats: int,
    device: str | None = None,
    baseline: tuple[StepFunction, Normalizer] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Rollout timings of all test simulations; with `baseline`, paired with its FP32 baseline.

    The caller has rolled them out once already (the accuracy rollout): that is the warm-up.
    Without a baseline (the run is its target's FP32 baseline itself) the run is timed alone
    and its speed-up is 1 by definition. With one (the target's FP32 step and normalizer), the
    two are timed interleaved in this process on the same graphs
    (`sciquant.runtime.paired.paired_timing`, one more warm-up pair): `paired_speedup` for the
    whole rollout and `paired_step_speedup` for the network's calls alone, each the ratio of
    paired medians with its 95 % bootstrap CI. On a GPU the time ends when the predictions are
    back on the host (a synchronization) and the network's calls are not timed apart.
    """
    from sciquant.runtime.paired import paired_timing, ratio_of_medians

    cpu = device is None
    run_step = TimedStep(step) if cpu else step
    base_step, base_norm = baseline if baseline is not None else (step, norm)
    base_timed = TimedStep(base_step) if cpu else base_step
    steps: dict[str, list[float]] = {"run": [], "baseline": []}

    def timed(which: str, stepper: Any, stepper_norm: Normalizer) -> Any:
        def call() -> None:
            if cpu:
                stepper.seconds = 0.0
            rollout_all(stepper, graphs, stepper_norm, device)
            if cpu:
                steps[which].append(stepper.seconds)

        return call

    if baseline is None:
        # Timed alone (the FP32 baseline of its target); paired with nothing, speed-up 1.
        paired = paired_timing(
            timed("run", run_step, norm), lambda: None, repeats, warmup=0, threads=threads or 1
        )
    else:
        paired = paired_timing(
            timed("run", run_step, norm),
            timed("baseline", base_timed, base_norm),
            repeats,
            warmup=1,
            threads=threads or 1,
        )
    metrics: dict[str, Any] = {
        "rollout_time_s_median": paired["run_time_s_median"],
        "rollout_time_s_min": paired["run_time_s_min"],
        "rollout_time_s_max": paired["run_time_s_max"],
        "rollout_time_repeats": repeats,
        "cpu_share": paired["cpu_share"],
        "contended": float(paired["contended"]),
        "load_average_1min": paired["load_average_1min_after"],
    }
    if baseline is None:
        metrics["paired_speedup"] = 1.0
        if cpu:
            metrics["step_time_s_median"] = statistics.median(steps["run"])
            metrics["paired_step_speedup"] = 1.0
        return metrics
    metrics.update(
        {
            "baseline_rollout_time_s_median": paired["baseline_time_s_median"],
            "paired_speedup": paired["paired_speedup"],
            "paired_speedup_ci_low": paired["paired_speedup_ci_low"],
            "paired_speedup_ci_high": paired["paired_speedup_ci_high"],
            "timing_pairs": repeats,
        }
    )
    if cpu:
        # The warm-up pair's network times are dropped, as paired_timing drops its wall times.
        run_steps, base_steps = steps["run"][1:], steps["baseline"][1:]
        ratio, low, high = ratio_of_medians(np.array(base_steps), np.array(run_steps))
        metrics.update(
            {
                "step_time_s_median": statistics.median(run_steps),
                "baseline_step_time_s_median": statistics.median(base_steps),
                "paired_step_speedup": ratio,
                "paired_step_speedup_ci_low": low,
                "paired_step_speedup_ci_high": high,
            }
        )
    return metrics


def evaluate_step(
    step: StepFunction,
    graphs: list[GraphTensors],
    norm: Normalizer,
    repeats: int,
    device: str | None = None,
    baseline: tuple[StepFunction, Normalizer] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    """Errors per test simulation and aggregated (mean, std, min, max), plus rollout timing.

    All test simulations are rolled out together as one disjoint graph (one step for all); the
    accuracy rollout is the timing's warm-up. `device`: where the rollout state lives (the
    step function's device; None: the CPU); `baseline`: the target's FP32 step and normalizer,
    timed interleaved with this one (`time_rollouts`).
    """
    predictions = rollout_all(step, graphs, norm, device)
    per_simulation = {
        graph.name: rollout_errors(predicted_p, predicted_q, graph, norm)
        for graph, (predicted_p, predicted_q) in zip(graphs, predictions, strict=True)
    }
    metrics: dict[str, Any] = {}
    for field in ("pressure_error_pct", "flowrate_error_pct"):
        values = np.array([errors[field] for errors in per_simulation.values()])
        metrics[field] = float(values.mean())
        metrics[f"{field}_median"] = float(np.median(values))
        metrics[f"{field}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        metrics[f"{field}_min"] = float(values.min())
        metrics[f"{field}_max"] = float(values.max())
    metrics["test_simulations"] = len(graphs)
    if repeats > 0:
        metrics.update(time_rollouts(step, graphs, norm, repeats, device, baseline, threads))
    metrics["per_simulation"] = per_simulation
    return metrics, predictions


def no_network_baselines(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The physics priors alone on the test simulations: mean and median errors, and each
    simulation's.

    Not runs of the study (they have no weights to quantize): what a user gets with no network
    (`sciquant.workloads.bloodflow.physics.BASELINES`), kept beside every run's metrics so a
    surrogate is judged against them; the calibrated one is the baseline of the retained gain.
    """
    baselines: dict[str, Any] = {}
    for baseline in BASELINES:
        per_simulation = {
            name: baseline_errors(sample, baseline)
            for name, sample in zip(names, samples, strict=True)
        }
        baselines[baseline] = {}
        for field in ("pressure_error_pct", "flowrate_error_pct"):
            values = [errors[field] for errors in per_simulation.values()]
            baselines[baseline][field] = float(np.mean(values))
            # A mean over a dozen trees follows its worst one; the median shows the typical tree.
            baselines[baseline][f"{field}_median"] = float(np.median(values))
        baselines[baseline]["per_simulation"] = per_simulation
    return baselines


def rollout_physics(
    samples: list[dict[str, Any]], predictions: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[str, float], dict[str, float]]:
    """The rollouts' physics checks and the data's own (`sciquant.workloads.bloodflow.physics`),
    means."""
    predicted = [physics_checks(s, p, q) for s, (p, q) in zip(samples, predictions, strict=True)]
    data = [physics_checks(s, s["pressure"], s["flowrate"]) for s in samples]
    return mean_checks(predicted), mean_checks(data)


def plot_rollouts(graphs, predictions, norm: Normalizer, out: Path, count: int) -> None:  # noqa: ANN001
    """`pressure.png`, `flowrate.png`: prediction (dashed) vs truth at inlet, junction, outlets."""
    shown = list(zip(graphs, predictions, strict=True))[: max(count, 1)]
    for field, unit, scale, index in (("pressure", "mmHg", MMHG, 0), ("flowrate", "mL/s", 1.0, 1)):
        fig, axes = plt.subplots(1, len(shown), figsize=(4.0 * len(shown), 3.4), squeeze=False)
        for ax, (graph, predicted) in zip(axes[0], shown, strict=True):
            exact = graph.physical(norm, field, getattr(graph, field).numpy())
            dt = 1.0  # steps; the loading ramp is shaded
            steps = np.arange(graph.num_steps) * dt
            for label, node in _plot_nodes(graph):
                line = ax.plot(steps, exact[:, node] / scale, lw=1.4, label=label)[0]
                ax.plot(steps, predicted[index][:, node] / scale, "--", color=line.get_color())
            ax.axvspan(0, graph.loading_steps, color="0.9")
            ax.set_title(graph.name, fontsize=9)
            ax.set_xlabel("time step")
        axes[0, 0].set_ylabel(f"{field} [{unit}]")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{field}: simulation (solid) vs rollout (dashed); grey: loading ramp")
        fig.tight_layout()
        fig.savefig(out / f"{field}.png", dpi=100)
        plt.close(fig)


def _plot_nodes(graph: GraphTensors) -> list[tuple[str, int]]:
    types = graph.node_type.numpy()
    nodes = [("inlet", int(np.flatnonzero(types == INLET)[0]))]
    junctions = np.flatnonzero(types == JUNCTION)
    if len(junctions):
        nodes.append(("junction", int(junctions[0])))
    nodes += [(f"outlet {i}", int(n)) for i, n in enumerate(np.flatnonzero(types == OUTLET)[:3])]
    return nodes


def load_step(
    checkpoint: Path,
    onnx: Path | None,
    threads: int | None,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    graphs: list[GraphTensors] | None = None,
) -> tuple[StepFunction, dict[str, Any], dict[str, Any]]:
    """The step function to roll out, the checkpoint's state, and size metrics of the artifact.

    checkpoint: an FP32 `checkpoint.pt` or a `quantized.pt` (its format says which); onnx: run
    this ONNX file with `runtime` instead (`onnxruntime`, or `tensorrt` on a GPU node, built at
    the run's `precision` for the batched size of `graphs`); the checkpoint then only gives the
    statistics.
    """
    from sciquant.workloads.bloodflow.quantize import is_quantized, load_quantized

    if is_quantized(checkpoint):
        model, state = load_quantized(checkpoint)
        sizes = quantized_size(model)
    else:
        model, state = load_model(checkpoint)
        sizes = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
    if onnx is not None and runtime == "openvino":
        from sciquant.runtime.openvino import OvStep, bf16_native

        sizes["artifact_bytes"] = onnx.stat().st_size
        if precision == "bf16" and not bf16_native():
            # No bf16 unit here: the FP32 model in bfloat16 autocast, a labelled simulation.
            return Bf16Simulation(model), state, sizes
        merged, _ = merge_graphs(graphs or [])
        shapes = {
            "node_features": (merged.num_nodes, state["architecture"]["node_features"]),
            "edge_features": tuple(merged.edge_features.shape),
            "edge_index": tuple(merged.edge_index.shape),
        }
        # Compiled for the batched test graph's size (static shapes), as a rollout deploys it.
        return OvStep(onnx, precision, threads or 1, shapes=shapes), state, sizes
    if onnx is not None and runtime == "tensorrt":
        from sciquant.runtime.tensorrt import TrtStep, build_precision, graph_dims

        engine_precision = build_precision(precision)
        merged, _ = merge_graphs(graphs or [])
        dims = graph_dims(merged.edge_index, merged.num_nodes)
        sizes["artifact_bytes"] = onnx.stat().st_size
        # The rollout keeps its state on the GPU (models.rollout's `device`): outputs stay there.
        step = TrtStep.from_onnx(onnx, precision=engine_precision, keep_on_device=True, **dims)
        return step, state, sizes
    if onnx is not None:
        from sciquant.runtime.onnxruntime import OrtStep
        from sciquant.workloads.bloodflow.dynamic import dynamic_size, is_dynamic

        if is_dynamic(onnx):  # ptq-dynamic: the FP32 checkpoint's Linear weights run in int8
            sizes = dynamic_size(model)
        sizes["artifact_bytes"] = onnx.stat().st_size
        return OrtStep(onnx, intra_op_num_threads=threads or 1), state, sizes
    return model, state, sizes


def teacher_forced_inputs(
    graph: GraphTensors, steps: int, norm: Normalizer
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Model inputs (node features, edge features, edge index) at `steps` evenly spaced true
    states of `graph` (`sciquant.workloads.bloodflow.features.true_state_inputs`)."""
    times = np.linspace(0, graph.num_steps - 2, steps).astype(int)
    return [true_state_inputs(graph, int(t), norm) for t in times]


def quant_debug(
    checkpoint: Path,
    prepared: Path,
    norm: Normalizer,
    deployed: StepFunction | None,
    graphs: list[GraphTensors],
    inputs: int = DEBUG_INPUTS,
    runtime: str = "torch",
    device: str | None = None,
) -> dict[str, Any]:
    """Quantization debugging of a calibrated run (`sciquant.quant.debug`); {} for others.

    For a `quantized.pt` (a calibrated method; not ptq-dynamic, which has no simulation, nor a
    float run): the per-layer output SQNR of its fake-quant model (``layer_sqnr_*``; against
    the FP32 layers a weight-moving PTQ method kept in its quantized.pt) on
    `inputs` calibration inputs, the first calibration sample (training sample 0) at `inputs`
    evenly spaced true states; and where `deployed` is a runtime's step (ONNX Runtime,
    OpenVINO, TensorRT; `device` where it takes its tensors), the agreement of the simulation's
    and the runtime's outputs (``sim_vs_deployed_*``, relative to the output RMS: the network's
    output is float) on the test simulations merged into one graph (the shape the runtime was
    built for) at `inputs` evenly spaced true states. `inputs` 0 turns both off.
    """
    from sciquant.quant.debug import (
        output_agreement,
        sqnr_metrics,
        torch_layer_sqnr,
        torch_outputs,
    )
    from sciquant.workloads.bloodflow.data import load_index
    from sciquant.workloads.bloodflow.quantize import (
        calibration_inputs,
        is_quantized,
        load_quantized,
    )
    from sciquant.workloads.bloodflow.train import load_graphs

    if inputs <= 0 or not is_quantized(checkpoint):
        return {}
    qmodel, state = load_quantized(checkpoint)
    metrics: dict[str, Any] = {}
    train = load_index(prepared)["samples"]["train"][:1]
    if train:
        calibration = list(calibration_inputs(load_graphs(prepared, train, norm), inputs, norm))
        # AdaRound / bias correction moved the weights: measure against the FP32 layers kept
        sqnr = torch_layer_sqnr(qmodel, calibration, float_layers=state.get("float_layers"))
        metrics.update(sqnr_metrics(sqnr, len(calibration)))
    if deployed is not None and runtime != "torch" and not isinstance(deployed, Bf16Simulation):
        merged, _ = merge_graphs(graphs)
        test = teacher_forced_inputs(merged, inputs, norm)
        simulated = torch_outputs(qmodel, test)
        metrics.update(
            output_agreement(simulated, torch_outputs(deployed, test, device), inputs=len(test))
        )
    return metrics


class Bf16Simulation:
    """The FP32 model under bfloat16 autocast (weights and activations of every Linear in
    bf16, accumulation and LayerNorm in FP32): bf16 where the CPU has no bf16 unit, evaluated
    as a simulation (labelled, not timed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16):
            return self.model(*inputs).float()


def step_on(step: StepFunction, device: str) -> StepFunction:
    """A PyTorch step function (a model, a fake-quant model, a bf16 simulation) with its weights
    on `device` (moved in place); other runtimes' steps are returned as they are."""
    if isinstance(step, torch.nn.Module):
        return step.to(device)
    if isinstance(step, Bf16Simulation):
        step.model.to(device)
    return step


def rollout_device(runtime: str, wanted: str, run: str) -> str:
    """The device a run's rollout uses: TensorRT's steps take CUDA tensors (the GPU, always);
    ONNX Runtime and OpenVINO run on the CPU; PyTorch (the FP32 model, fake-quant) where the
    node type asks (`wanted`), if CUDA is there (`select_device`)."""
    if runtime == "tensorrt":
        return "cuda"
    if runtime != "torch":
        if wanted != "cpu":
            print(f"note: {run}: {runtime} runs on the CPU; --device {wanted} is for PyTorch runs")
        return "cpu"
    return select_device(wanted, run)


def quantized_size(qmodel: Any) -> dict[str, Any]:
    """Parameters and deployed bytes: quantized weights at their bit-width, the rest float32."""
    layers = qmodel.quant_linears()
    quantized_weights = {id(layer.weight) for layer in layers.values() if hasattr(layer, "weight")}
    total_bytes = 0.0
    for name, layer in layers.items():
        bits = qmodel.layer_precisions[name].weight_bits
        total_bytes += layer.weight.numel() * bits / 8
    parameters = 0
    for parameter in qmodel.model.parameters():
        parameters += parameter.numel()
        if id(parameter) not in quantized_weights:
            total_bytes += parameter.numel() * 4
    return {"parameters": parameters, "model_bytes": int(round(total_bytes))}


def run(
    checkpoint: Path,
    prepared: Path,
    out: Path,
    settings: dict[str, Any],
    coordinates: dict[str, Any],
    threads: int | None = None,
    onnx: Path | None = None,
    simulated: bool = False,
    runtime: str | None = None,
    baseline_checkpoint: Path | None = None,
    baseline_onnx: Path | None = None,
    device: str = "cpu",
) -> Path:
    """Roll out the test simulations with the artifact; write metrics.json and figures to `out`.

    `baseline_checkpoint` (+ `baseline_onnx` for ONNX Runtime / TensorRT targets): the
    target's FP32 artifact; a timed run is then timed interleaved with it in this process and
    its speed-up is the paired one (`time_rollouts`). Without them a timed run is its target's
    FP32 baseline itself (speed-up 1). `device`: what the run's node type asks for (`cpu`, or
    `cuda` on a GPU node type); `rollout_device` says what runs where. `settings`: the config's
    `evaluate` section; what it leaves out takes the schema's defaults.
    """
    started = time.perf_counter()
    settings = section_with_defaults(settings, "evaluate", "evaluate")
    if threads:
        torch.set_num_threads(threads)
    runtime = runtime or ("onnxruntime" if onnx is not None else "torch")
    label = "evaluate " + "/".join(
        str(coordinates[key]) for key in ("target", "method", "precision") if key in coordinates
    )
    used = rollout_device(runtime, device, label)
    print(f"{label}: {runtime} on {describe_device(used)}", flush=True)
    samples = test_samples(prepared)  # read once: the rollouts, baselines and checks share them
    graphs = None
    if runtime in ("tensorrt", "openvino"):
        # TensorRT's engine and OpenVINO's model are sized for the batched test graph.
        from sciquant.workloads.bloodflow.quantize import is_quantized, load_quantized

        loader = load_quantized if is_quantized(checkpoint) else load_model
        norm = Normalizer.of_checkpoint(loader(checkpoint)[1])
        graphs = test_graphs(prepared, norm, samples)
    step, state, sizes = load_step(
        checkpoint, onnx, threads, runtime, coordinates.get("precision", "fp32"), graphs
    )
    if isinstance(step, Bf16Simulation) and not simulated:
        simulated = True
        print("bf16: this CPU has no bf16 unit (amx_bf16, avx512_bf16); evaluated as a simulation")
    norm = Normalizer.of_checkpoint(state)
    graphs = graphs if graphs is not None else test_graphs(prepared, norm, samples)
    # A simulation's rollout time is fake-quant overhead, not a low-precision kernel's: untimed.
    repeats = 0 if simulated else settings["repeats"]
    # On a GPU (TensorRT's CUDA tensors, a PyTorch model moved there) the rollout state stays
    # on the device; None: the CPU.
    on_device = None if used == "cpu" else used
    if runtime == "torch" and on_device is not None:
        step = step_on(step, on_device)
    baseline = None
    if repeats > 0 and baseline_checkpoint is not None:
        base_step, base_state, _ = load_step(
            baseline_checkpoint, baseline_onnx, threads, runtime, "fp32", graphs
        )
        if runtime == "torch" and on_device is not None:
            base_step = step_on(base_step, on_device)
        baseline = (base_step, Normalizer.of_checkpoint(base_state))
    metrics, predictions = evaluate_step(step, graphs, norm, repeats, on_device, baseline, threads)
    if (coordinates.get("target"), coordinates.get("method")) == ("reference", "none") and (
        coordinates.get("precision") == "fp32"
    ):
        # After the timings: these rollouts are not among the timed ones.
        metrics.update(
            training_errors(step, prepared, norm, settings["training_simulations"], on_device)
        )
    checks, data_checks = rollout_physics(list(samples.values()), predictions)
    metrics.update(checks)
    metrics.update(sizes)
    if hasattr(step, "timing_summary"):
        metrics.update(
            {
                f"{k}_ms" if k != "calls" else "runtime_calls": v
                for k, v in step.timing_summary().items()
            }
        )
    # After the timings: its runtime calls are not among the timed ones.
    debug = quant_debug(
        checkpoint, prepared, norm, None if simulated else step, graphs,
        settings["debug_inputs"], runtime, on_device,
    )  # fmt: skip
    if debug:
        print(describe(debug))
    metrics.update(debug)
    if not simulated:  # whatever the debug settings: why a runtime may not compute its graph
        metrics.update(overflow_metrics(step))
    out.mkdir(parents=True, exist_ok=True)
    plot_rollouts(graphs, predictions, norm, out, settings["figure_simulations"])
    payload = {
        "coordinates": {k: coordinates[k] for k in COORDINATES},
        "study": coordinates.get("study"),
        "settings_hashes": coordinates.get("settings_hashes"),
        "simulated": simulated,
        "runtime": runtime,
        "metrics": metrics,
        "baselines": no_network_baselines(list(samples.values()), list(samples)),
        "gain_baseline": GAIN_BASELINE,
        "data_physics_checks": data_checks,
        "provenance": provenance(time.perf_counter() - started, threads, used, device),
    }
    if repeats > 0:
        from sciquant.runtime.paired import host_facts

        payload["host"] = host_facts()
    timing = "not timed (a simulation)"
    if "rollout_time_s_median" in metrics:
        timing = f"rollout {metrics['rollout_time_s_median']:.3f} s"
        if "paired_step_speedup_ci_low" in metrics:
            timing += (
                f", {metrics['paired_step_speedup']:.2f}x FP32 network step (95 % CI "
                f"{metrics['paired_step_speedup_ci_low']:.2f}-"
                f"{metrics['paired_step_speedup_ci_high']:.2f}), "
                f"{metrics['paired_speedup']:.2f}x whole rollout, paired"
            )
        if metrics["contended"]:
            timing += f" [contended: {metrics['cpu_share']:.0%} of the wall time on the CPU]"
    print(
        f"pressure error {metrics['pressure_error_pct']:.2f} %, flow error "
        f"{metrics['flowrate_error_pct']:.2f} %, {timing}; without a network: "
        + "; ".join(
            f"{name.replace('_', ' ')} {values['pressure_error_pct']:.2f} % / "
            f"{values['flowrate_error_pct']:.2f} %"
            for name, values in payload["baselines"].items()
        )
    )
    return write_json(out / "metrics.json", payload)
