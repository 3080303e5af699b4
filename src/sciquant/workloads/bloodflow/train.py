"""FP32 training of MeshGraphNet on prepared blood-flow graphs.

Adam with a cosine learning-rate schedule; each step draws `batch_size` (sample, start time)
windows, batches them as one disjoint graph, adds Gaussian noise to the input pressure and flow
(not to the imposed inlet flow), and rolls the model out `rollout_steps` steps on its own
predictions with the inlet flow imposed; each step's input carries the increment of the step
before (the data's at the window's start, then the model's own), as the evaluation rollout's
do. The network predicts each step's correction to the lumped tree's own step
(`sciquant.workloads.bloodflow.features.step_increments`). The loss of step k is the weighted mean
squared error of the predicted normalized increment (lumped step + correction) against the one that
reaches the true next state, with weight 1 for k = 0 and `rollout_weight`
after; inlet/outlet nodes weigh `boundary_weight` times more, and a node's flow term is weighted
by its cross-section area to the power `flow_area_exponent` (normalized to mean 1 over the
batch): the rollout's flow error is dominated by the large vessels (their flows are largest)
while most nodes sit in small distal ones.

Determinism and resume: every epoch draws from generators seeded by (seed, epoch), so an epoch
computes the same whether it runs after the previous one or after a resume from its checkpoint.
A resume checkpoint (`resume.pt`) is written atomically after every epoch; a killed run restarts
from the last finished epoch. SIGTERM/SIGUSR1 (Slurm preemption with `--signal`) stop training
after the current step; the epoch is then redone on resume.

Device: the model and every batch live on `cuda` where the training's node type
(`train.node`) has a GPU and CUDA is present, else on the CPU; a GPU node type without CUDA
trains on the CPU with a warning in the log (`sciquant.provenance.select_device`). The noise is
drawn on the CPU either way (the same draws on every device). Checkpoints hold CPU tensors, so
a training resumes, and its checkpoint is evaluated or quantized, on either device.
`training.json` (and the checkpoint's `device`) records the device used.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sciquant.data.download import sha256_of
from sciquant.errors import SciquantError, first_line
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig
from sciquant.provenance import (
    atomic_path,
    describe_device,
    provenance,
    select_device,
    write_csv,
    write_json,
)
from sciquant.vocabulary import section_with_defaults
from sciquant.workloads.bloodflow.data import load_index, load_sample
from sciquant.workloads.bloodflow.features import (
    GraphTensors,
    Normalizer,
    boundary_mask,
    feature_count,
    state_increment,
    step_increments,
    step_inputs,
    to_tensors,
)

CHECKPOINT_FORMAT = "sciquant-meshgraphnet"
# 3: 33 node features (tree hemodynamics), flow scaled per node; 4: 42 (the inlet impedance, the
# previous step's increments); 5: 46 (the lumped tree's step and the state's departure from it);
# 6: the output is the correction to the lumped step; 7: the formulation (residual or reference);
# 8: 53 (the graph's expansion losses, the calibrated prior's fit)
CHECKPOINT_VERSION = 8
# What a resume checkpoint must share with the run that resumes it: the settings, the model's
# shape, and what it learns from (the prepared data's index.json; for QAT the FP32 checkpoint).
RESUME_KEYS = ("settings", "architecture", "data_sha256", "source_sha256")
LOG_COLUMNS = ("epoch", "train_loss", "valid_loss", "learning_rate", "seconds")
TRAINING_FORMAT = "sciquant-training"


@dataclass(frozen=True)
class TrainSettings:
    """The config's `models.<name>.train` section, every key given (see the schema for each;
    its defaults are filled by `model_settings`, the one place they live)."""

    epochs: int
    batch_size: int
    steps_per_epoch: int
    learning_rate: float
    learning_rate_min: float
    weight_decay: float
    noise_std: float
    flow_area_exponent: float
    rollout_steps: int
    rollout_weight: float
    boundary_weight: float
    gradient_clip: float
    node: str
    # QAT only (quantize.qat.threshold_learning_rate, not a train key): the learning rate of
    # TQT's log2 thresholds, which no weight decay touches; None: no such parameters
    threshold_learning_rate: float | None = None

    @classmethod
    def of(cls, settings: dict[str, Any]) -> TrainSettings:
        """The `train` section of a MeshGraphNet's settings (`model_settings` fills the rest)."""
        return cls(**model_settings(settings)["train"])


def model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A MeshGraphNet's settings (`models.<name>` without `datasets`, as `sciquant train
    --settings` takes them) with the schema's defaults filled, validated: SciquantError naming
    the key for a value the schema refuses."""
    return section_with_defaults(settings, "meshgraphnet_model", "model")


def architecture_from_settings(
    settings: dict[str, Any], node_features: int = MeshGraphNetConfig.node_features
) -> MeshGraphNetConfig:
    """The model's hyper-parameters; `node_features`: the prepared index's feature count."""
    settings = model_settings(settings)
    return MeshGraphNetConfig(
        node_features=node_features,
        hidden=settings["hidden"],
        processor_size=settings["processor_size"],
        mlp_hidden_layers=settings["mlp_hidden_layers"],
    )


@dataclass
class Batch:
    """Windows of several samples as one disjoint graph; time series are [R+1, N_total]."""

    static: torch.Tensor
    edge_features: torch.Tensor
    edge_index: torch.Tensor
    pressure: torch.Tensor
    flowrate: torch.Tensor
    linear_pressure: torch.Tensor
    linear_flowrate: torch.Tensor
    pressure_before: torch.Tensor  # [N_total] the state one step before the window's start
    flowrate_before: torch.Tensor  # (the start itself where the window starts at step 0)
    loading: torch.Tensor
    next_inlet: torch.Tensor
    inlet_now: torch.Tensor
    inlet: torch.Tensor
    weight: torch.Tensor


def make_batch(
    graphs: list[GraphTensors], picks: list[tuple[int, int]], steps: int, boundary_weight: float
) -> Batch:
    """Stack windows [t, t + steps] of the picked (graph, t) pairs into one disjoint graph."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Batch.__dataclass_fields__}
    offset = 0
    for graph_id, start in picks:
        g = graphs[graph_id]
        window = slice(start, start + steps + 1)
        n = g.num_nodes
        inlet = g.inlet
        parts["static"].append(g.static)
        parts["edge_features"].append(g.edge_features)
        parts["edge_index"].append(g.edge_index + offset)
        parts["pressure"].append(g.pressure[window])
        parts["flowrate"].append(g.flowrate[window])
        parts["linear_pressure"].append(g.linear_pressure[window])
        parts["linear_flowrate"].append(g.linear_flowrate[window])
        parts["pressure_before"].append(g.pressure[max(start - 1, 0)])
        parts["flowrate_before"].append(g.flowrate[max(start - 1, 0)])
        parts["loading"].append(g.loading[window, None].expand(-1, n))
        # Input of step k carries the inlet flow of step k + 1 (imposed, known in advance).
        inlet_next = g.flowrate[start + 1 : start + steps + 2, inlet][:, :1]
        parts["next_inlet"].append(inlet_next.expand(-1, n))
        parts["inlet_now"].append(g.flowrate[window, inlet][:, :1].expand(-1, n))
        parts["inlet"].append(inlet)
        boundary = boundary_mask(g.node_type).float()
        parts["weight"].append(1.0 + (boundary_weight - 1.0) * boundary)
        offset += n
    return Batch(
        static=torch.cat(parts["static"]),
        edge_features=torch.cat(parts["edge_features"]),
        edge_index=torch.cat(parts["edge_index"], dim=1),
        pressure=torch.cat(parts["pressure"], dim=1),
        flowrate=torch.cat(parts["flowrate"], dim=1),
        linear_pressure=torch.cat(parts["linear_pressure"], dim=1),
        linear_flowrate=torch.cat(parts["linear_flowrate"], dim=1),
        pressure_before=torch.cat(parts["pressure_before"]),
        flowrate_before=torch.cat(parts["flowrate_before"]),
        loading=torch.cat(parts["loading"], dim=1),
        next_inlet=torch.cat(parts["next_inlet"], dim=1),
        inlet_now=torch.cat(parts["inlet_now"], dim=1),
        inlet=torch.cat(parts["inlet"]),
        weight=torch.cat(parts["weight"]),
    )


def rollout_loss(
    model: torch.nn.Module,
    batch: Batch,
    norm: Normalizer,
    settings: TrainSettings,
    noise: torch.Generator | None,
) -> torch.Tensor:
    """Weighted multi-step loss of one batch (see the module docstring)."""
    pressure = batch.pressure[0].clone()
    flowrate = batch.flowrate[0].clone()
    device = pressure.device
    if noise is not None and settings.noise_std > 0:
        # drawn on the CPU generator whatever the device: the same noise on every device
        n = pressure.shape[0]
        pressure = pressure + settings.noise_std * torch.randn(n, generator=noise).to(device)
        flow_noise = settings.noise_std * torch.randn(n, generator=noise).to(device)
        flowrate = flowrate + torch.where(batch.inlet, 0.0, flow_noise)
    total = torch.zeros((), device=device)
    weights_sum = batch.weight.sum()
    flow_weight = torch.ones((), device=device)
    if settings.flow_area_exponent:
        area = norm.denormalize("area", batch.static[:, 0]).clamp(min=1e-6)
        flow_weight = area**settings.flow_area_exponent
        flow_weight = flow_weight / flow_weight.mean()
    # The increment into the start is the true one: the noise stands for a rollout's drift, which
    # moves the state far more than it changes the state's last increment.
    previous = state_increment(
        batch.pressure[0], batch.flowrate[0], batch.pressure_before, batch.flowrate_before, norm
    )
    for k in range(settings.rollout_steps):
        # The inlet's flow is imposed (never noised), so its current value is the true one.
        x, prior_step = step_inputs(
            norm, batch.static, pressure, flowrate, batch.loading[k], batch.next_inlet[k],
            batch.inlet_now[k], previous,
            (batch.linear_pressure[k], batch.linear_flowrate[k]),
            (batch.linear_pressure[k + 1], batch.linear_flowrate[k + 1]),
        )  # fmt: skip
        pressure_before, flowrate_before = pressure, flowrate
        delta = step_increments(model(x, batch.edge_features, batch.edge_index), prior_step)
        # Increment (normalized-delta units) that takes the current state to the true next one.
        needed_p = (batch.pressure[k + 1] - pressure) * norm.std["pressure"]
        needed_q = (batch.flowrate[k + 1] - flowrate) * norm.std["flowrate"]
        error_p = delta[:, 0] - norm.normalize("delta_pressure", needed_p)
        error_q = delta[:, 1] - norm.normalize("delta_flowrate", needed_q)
        # The inlet flow is imposed, so its prediction does not count.
        error = error_p**2 + torch.where(batch.inlet, 0.0, flow_weight * error_q**2)
        step_weight = 1.0 if k == 0 else settings.rollout_weight
        total = total + step_weight * (batch.weight * error).sum() / weights_sum
        pressure = pressure + norm.denormalize("delta_pressure", delta[:, 0]) / norm.std["pressure"]
        flowrate = flowrate + norm.denormalize("delta_flowrate", delta[:, 1]) / norm.std["flowrate"]
        flowrate = torch.where(batch.inlet, batch.flowrate[k + 1], flowrate)
        previous = state_increment(pressure, flowrate, pressure_before, flowrate_before, norm)
    return total / (1.0 + settings.rollout_weight * (settings.rollout_steps - 1))


class _StopRequest:
    """Set by SIGTERM/SIGUSR1 so training stops cleanly after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signal = signum

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self)


def load_graphs(prepared: Path, names: list[str], norm: Normalizer) -> list[GraphTensors]:
    return [to_tensors(name, load_sample(prepared, name), norm) for name in names]


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a `.part` file, then rename: a crash never leaves half a checkpoint.

    Every tensor is saved on the CPU (a GPU training's too), so any machine loads the file.
    """
    with atomic_path(path) as tmp:
        torch.save(on_cpu(obj), tmp)


def on_cpu(obj: Any) -> Any:
    """`obj` with every tensor in its dicts, lists and tuples moved to the CPU (CPU tensors are
    kept as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        moved = type(obj)((key, on_cpu(value)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions
            moved._metadata = obj._metadata
        return moved
    if isinstance(obj, list):
        return [on_cpu(value) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(on_cpu(value) for value in obj)
    return obj


def load_checkpoint(
    path: Path,
    expected_format: str = CHECKPOINT_FORMAT,
    version: int = CHECKPOINT_VERSION,
    label: str = "sciquant MeshGraphNet",
) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); errors name the file and the fix."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: checkpoint not found; run the train stage first") from error
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise SciquantError(
            f"{path}: not a readable sciquant checkpoint ({first_line(error)}); delete it and "
            "rerun the train stage"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format:
        raise SciquantError(f"{path}: not a {label} checkpoint; delete it and rerun its stage")
    if checkpoint.get("version") != version:
        raise SciquantError(
            f"{path}: checkpoint version {checkpoint.get('version')} is not {version}; "
            "rerun its stage with this sciquant"
        )
    return checkpoint


def load_model(path: Path) -> tuple[MeshGraphNet, dict[str, Any]]:
    """The trained model (eval mode) and its checkpoint dict (statistics, settings)."""
    checkpoint = load_checkpoint(path)
    model = MeshGraphNet(MeshGraphNetConfig(**checkpoint["architecture"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint


def validation_loss(model, graphs, norm, settings) -> float:  # noqa: ANN001
    """Mean rollout loss over fixed windows of the validation samples (no noise)."""
    if not graphs:
        return float("nan")
    losses = []
    with torch.no_grad():
        for graph_id, g in enumerate(graphs):
            last = g.num_steps - settings.rollout_steps - 2
            for start in np.linspace(g.loading_steps, last, 4).astype(int):
                batch = make_batch(
                    graphs,
                    [(graph_id, int(start))],
                    settings.rollout_steps,
                    settings.boundary_weight,
                )  # noqa: E501
                losses.append(float(rollout_loss(model, batch, norm, settings, noise=None)))
    return float(np.mean(losses))


def run(
    prepared: Path,
    out: Path,
    settings: dict[str, Any],
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Train (or resume training) and write `checkpoint.pt`, `training_log.csv` and
    `training.json` into `out`.

    `device` (`cpu` / `cuda`): what to ask for; None: what the node type `train.node` of
    `settings` has (`sciquant.study.node_device`). `cuda` without CUDA trains on the CPU with a
    warning (`sciquant.provenance.select_device`); training.json records the device used.
    """
    from sciquant.vocabulary import node_device

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    settings = model_settings(settings)
    train_settings = TrainSettings(**settings["train"])
    wanted = device or node_device(train_settings.node)
    used = select_device(wanted, f"train (node type {train_settings.node})")
    index = load_index(prepared)
    formulation = settings["formulation"]
    architecture = architecture_from_settings(settings, feature_count(formulation, index))
    norm = Normalizer.from_statistics(index["statistics"], formulation)
    train_graphs = load_graphs(prepared, index["samples"]["train"], norm)
    valid_graphs = load_graphs(prepared, index["samples"]["valid"], norm)
    torch.manual_seed(seed)
    model = MeshGraphNet(architecture)
    data_sha256 = sha256_of(prepared / "index.json")

    def final_state(trained: torch.nn.Module) -> dict[str, Any]:
        return _final_state(trained, architecture, index, settings, seed, data_sha256)

    log_rows = fit(
        model, train_graphs, valid_graphs, norm, train_settings, seed, out, final_state,
        progress, device=used,
    )  # fmt: skip
    target = out / "checkpoint.pt"
    described = describe_device(used)
    save_atomic({**final_state(model), "device": described}, target)
    summary = {
        "format": TRAINING_FORMAT,
        "version": 1,
        "settings": settings,
        "seed": seed,
        "node": train_settings.node,
        "data_sha256": data_sha256,
        "epochs": len(log_rows),
        "final": log_rows[-1] if log_rows else None,
        "provenance": provenance(
            time.perf_counter() - started, torch.get_num_threads(), used, wanted
        ),
    }
    write_json(out / "training.json", summary)
    print(f"{target}: trained on {described}")
    return target


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """CPU float arithmetic with subnormal numbers flushed to zero inside; torch's default
    (subnormals kept) after. Does nothing where the CPU cannot flush them.

    Weight decay pulls every weight that no loss gradient holds toward zero until it is
    subnormal (nonzero below 1.2e-38 in float32), and x86 CPUs compute with subnormal operands
    many times slower. Measured on the default study's residual model with `train.weight_decay`
    1e-4: with subnormals kept, 11,793 of its 216,962 weights were subnormal by epoch 24 and an
    epoch took 58 s instead of 6 s; flushed, the same epochs took 5.3-6.4 s. A flushed weight
    is 0, from which it differed by less than 1.2e-38. Without weight decay nothing changes: the
    default study's checkpoint is bit-identical either way. `fit` runs inside, so FP32 training
    and QAT fine-tuning alike. The flag is the calling thread's: torch's other intra-op threads
    (`threads` > 1) keep subnormals in the work they take (large tensors); with one thread (the
    studies' setting) there are none.
    """
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


# Weight decay drives weights that no gradient holds to subnormal values (`flushing_denormals`).
@flushing_denormals()
def fit(
    model: torch.nn.Module,
    train_graphs: list[GraphTensors],
    valid_graphs: list[GraphTensors],
    norm: Normalizer,
    settings: TrainSettings,
    seed: int,
    out: Path,
    checkpoint_state: Any,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """The training loop (FP32 training and QAT): epochs of rollout-loss steps, resumable.

    `checkpoint_state(model)` gives what the resume checkpoint stores besides the optimizer
    (format, weights, settings). Writes `resume.pt` every epoch and `training_log.csv` at the end;
    returns the log rows. `device`: where the model (moved there, in place) and the batches
    live; checkpoints hold CPU tensors whatever it is, so a resume may run on another device
    (not bit-identical then: it says so, as for the thread count below).

    `resume.pt` also records torch's intra-op thread count. CPU kernels sum in an order that
    depends on it, so a resume is bit-identical to an uninterrupted run only with the same
    count. A resume with another count still resumes (a requeued job may land on another node,
    and its finished epochs are kept), and prints that the result will not be bit-identical,
    naming both counts; `--threads` (the config's `threads`) set to the recorded count keeps
    the resume bit-identical.
    """
    steps = settings.rollout_steps
    too_short = [g.name for g in train_graphs if g.num_steps < steps + 3]
    if too_short:
        raise SciquantError(
            f"train.rollout_steps={steps} is longer than samples {too_short[:3]} allow; lower it"
        )
    device = torch.device(device)
    model.to(device)  # before the optimizer sees its parameters (fused Adam runs where they are)
    train_graphs = [g.to(device) for g in train_graphs]
    valid_graphs = [g.to(device) for g in valid_graphs]
    # fused: one kernel for all parameters (≈ 4 ms less per step than the per-tensor loop here,
    # 5 % of a default-study step); still deterministic, so resumes stay bit-identical.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    thresholds = [p for n, p in trainable if n.endswith("log2_threshold")]
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in trainable if not n.endswith("log2_threshold")]}
    ]
    if thresholds:
        groups.append(
            {
                "params": thresholds,
                "lr": settings.threshold_learning_rate or settings.learning_rate,
                "weight_decay": 0.0,
            }
        )
    optimizer = torch.optim.Adam(
        groups,
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        fused=True,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer,
        T_max=settings.epochs * settings.steps_per_epoch,
        eta_min=settings.learning_rate_min,
    )

    out.mkdir(parents=True, exist_ok=True)
    resume_path = out / "resume.pt"
    log_rows: list[dict[str, float]] = []
    first_epoch = 0
    if resume_path.exists():
        expected = checkpoint_state(model)
        try:
            state = load_checkpoint(resume_path, expected["format"], expected["version"])
        except SciquantError as error:  # e.g. left by an older sciquant: only a cache
            state = None
            print(f"{error}\n{resume_path}: not resumable; starting from scratch")
        if state is None:
            pass
        elif any(state.get(key) != expected.get(key) for key in RESUME_KEYS) or (
            state["seed"] != seed
        ):
            print(
                f"{resume_path}: written with other settings, inputs or seed; starting from scratch"
            )
        else:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            log_rows = list(state["log"])
            first_epoch = int(state["epoch"]) + 1
            print(f"resuming from {resume_path} after epoch {first_epoch}")
            recorded_device = state.get("device_type")
            if recorded_device is not None and recorded_device != device.type:
                print(
                    f"note: {resume_path} was written on {recorded_device}, this run uses "
                    f"{device.type}; the result will not be bit-identical to an uninterrupted run"
                )
            recorded, threads = state.get("torch_threads"), torch.get_num_threads()
            if recorded is not None and recorded != threads:
                print(
                    f"note: {resume_path} was written with {_threads(recorded)}, this run uses"
                    f" {_threads(threads)}; the result will not be bit-identical to an"
                    " uninterrupted run (CPU sums depend on the thread count). Rerun with"
                    f" --threads {recorded} (the config's `threads`) to keep it bit-identical."
                )

    stop = _StopRequest()
    stop.install()
    print(
        f"training {sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters on "
        f"{len(train_graphs)} samples ({len(valid_graphs)} validation), epochs "
        f"{first_epoch + 1}..{settings.epochs}, on {describe_device(str(device))}"
    )
    for epoch in range(first_epoch, settings.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        model.train()
        losses = []
        bar = tqdm(
            range(settings.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            mininterval=2.0,
        )
        for _ in bar:
            picks = []
            for graph_id in rng.integers(len(train_graphs), size=settings.batch_size):
                g = train_graphs[graph_id]
                picks.append((int(graph_id), int(rng.integers(g.num_steps - steps - 1))))
            batch = make_batch(train_graphs, picks, steps, settings.boundary_weight)
            loss = rollout_loss(model, batch, norm, settings, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.gradient_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if stop.signal is not None:
                print(f"signal {stop.signal}: stopping; epoch {epoch + 1} reruns on resume")
                raise SystemExit(128 + stop.signal)
        if not math.isfinite(losses[-1]):
            raise SciquantError(
                f"training diverged (loss {losses[-1]}) in epoch {epoch + 1}; lower "
                "train.learning_rate or raise train.gradient_clip"
            )
        model.eval()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "valid_loss": validation_loss(model, valid_graphs, norm, settings),
            "learning_rate": schedule.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
        }
        log_rows.append(row)
        print(", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        save_atomic(
            {
                **checkpoint_state(model),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch,
                "log": log_rows,
                "torch_threads": torch.get_num_threads(),
                "device_type": device.type,
            },
            resume_path,
        )
    _write_log(out / "training_log.csv", log_rows)
    return log_rows


def _threads(count: int) -> str:
    """A thread count in words: "1 torch thread", "2 torch threads"."""
    return f"{count} torch thread" + ("" if count == 1 else "s")


def _final_state(model, architecture, index, settings, seed, data_sha256) -> dict[str, Any]:  # noqa: ANN001
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": asdict(architecture),
        "state_dict": model.state_dict(),
        "statistics": index["statistics"],
        "formulation": settings["formulation"],
        "settings": settings,
        "seed": seed,
        "data_sha256": data_sha256,
    }


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    write_csv(path, rows, LOG_COLUMNS)
