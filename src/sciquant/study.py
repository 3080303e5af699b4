"""A study config → the study matrix: runs, their coordinates and output paths.

Used by `rules/common.smk` (after JSON-Schema validation) and by the submitit launcher. A run's
coordinates are `dataset, model, seed, target, method, precision`; they name its folder and its row
in the result cube, nothing else does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sciquant.errors import SciquantError
from sciquant.plugins import Evaluation
from sciquant.quant.observers import (
    DYNAMIC_METHODS,
    METHOD_LIMITS,
    METHODS,
    check_method_limits,
)
from sciquant.quant.spec import protection_settings
from sciquant.quant.targets import Plan, fp32_target, get_target
from sciquant.vocabulary import CPU_NODE, MIXED, node_device, schema_document, with_defaults
from sciquant.vocabulary import SCHEMA as SCHEMA  # re-exported
from sciquant.vocabulary import section_with_defaults as section_with_defaults  # re-exported

#: Which model architectures can learn which workloads, and in which framework.
ARCHITECTURE_WORKLOADS = {"meshgraphnet": ("bloodflow",), "icnnmd": ("md",)}
#: The workloads sciquant brings (their settings checked below; a plug-in's by its schema).
BUILT_IN_WORKLOADS = ("bloodflow", "md")
ARCHITECTURE_FRAMEWORK = {"meshgraphnet": "torch", "icnnmd": "keras"}


def architecture_framework(architecture: str) -> str:
    """`torch` or `keras`: the framework of an architecture (a plug-in's from its workload)."""
    if architecture in ARCHITECTURE_FRAMEWORK:
        return ARCHITECTURE_FRAMEWORK[architecture]
    from sciquant.plugins import architecture_workload

    return architecture_workload(architecture).architectures[architecture]


def architecture_workloads(architecture: str) -> tuple[str, ...]:
    """The workloads whose datasets a model of this architecture learns."""
    if architecture in ARCHITECTURE_WORKLOADS:
        return ARCHITECTURE_WORKLOADS[architecture]
    from sciquant.plugins import architecture_workload

    return (architecture_workload(architecture).name,)


def is_plugin_architecture(architecture: str) -> bool:
    """Whether an architecture is a plug-in workload's (not a built-in one)."""
    return architecture not in ARCHITECTURE_FRAMEWORK


#: Smallest pixel-map side the ICNNMD network takes (`sciquant.models.icnnmd.MIN_GRID`, not
#: imported here: Keras takes seconds to import, and dry runs read this module).
ICNNMD_MIN_GRID = 10
#: Every quantization method a sweep may name (`sciquant.quant.observers.METHODS`).
QUANTIZATION_METHODS = METHODS
#: Methods that calibrate or train a fake-quant model (quantized.pt); the rest are dynamic.
CALIBRATED_METHODS = tuple(m for m in METHODS if m not in DYNAMIC_METHODS)


@dataclass(frozen=True, order=True)
class Run:
    """One evaluated model variant: its six coordinates."""

    dataset: str
    model: str
    seed: int
    target: str
    method: str
    precision: str

    @property
    def folder(self) -> str:
        """The run's output folder, relative to the workflow directory."""
        return (
            f"results/{self.dataset}/{self.model}/seed{self.seed}/"
            f"{self.target}/{self.method}/{self.precision}"
        )

    def coordinates(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "seed": self.seed,
            "target": self.target,
            "method": self.method,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class Training:
    """One FP32 training: a model on a dataset with a seed."""

    dataset: str
    model: str
    seed: int

    @property
    def folder(self) -> str:
        return f"results/{self.dataset}/{self.model}/seed{self.seed}/fp32"


class Study:
    """A validated study config and the runs it expands to."""

    def __init__(self, config: dict[str, Any]):
        """`config`: a study config; the study keeps a copy with the schema's defaults filled
        (the workflow's and `load_config`'s configs have them already)."""
        self.config = with_schema_defaults(config)
        check_semantics(self.config)

    @property
    def datasets(self) -> dict[str, dict[str, Any]]:
        return self.config["datasets"]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.config["models"]

    def trainings(self) -> Iterator[Training]:
        for model, spec in sorted(self.models.items()):
            for dataset in spec["datasets"]:
                for seed in self.config["seeds"]:
                    yield Training(dataset=dataset, model=model, seed=seed)

    def framework(self, model: str) -> str:
        """`torch` or `keras`: the framework of a model's architecture."""
        return architecture_framework(self.models[model]["architecture"])

    def is_plugin(self, model: str) -> bool:
        """Whether a model is a plug-in workload's (its stages: `rules/workload.smk`)."""
        return is_plugin_architecture(self.models[model]["architecture"])

    def workload(self, dataset: str) -> str:
        """`bloodflow`, `md`, or an installed plug-in's workload (`sciquant.plugins`)."""
        return self.datasets[dataset]["workload"]

    def quantization_sweep(self, model: str | None = None) -> list[tuple[str, str, str]]:
        """(target, method, precision) of every sweep entry (for `model`: the entries that apply
        to it), in config order, without repeats."""
        combos: dict[tuple[str, str, str], None] = {}
        for entry in self.config["quantize"]["sweeps"]:
            if model is not None and model not in entry.get("models", self.models):
                continue
            for target in entry["targets"]:
                for method in entry["methods"]:
                    for precision in entry["precisions"]:
                        combos[(target, method, precision)] = None
        return list(combos)

    def native_float_targets(self, model: str | None = None) -> list[str]:
        """Swept targets that run FP32 themselves (on their runtime, not the reference)."""
        targets = dict.fromkeys(target for target, _, _ in self.quantization_sweep(model))
        return [
            name
            for name in targets
            if name != "reference" and "fp32" in get_target(name).native_precisions
        ]

    def fp32_targets(self, model: str | None = None) -> list[str]:
        """The targets of the FP32 runs those targets get (their speed-up base): one per FP32
        graph (`fp32_target`: openvino-avx2's FP32 run is openvino-cpu's)."""
        return list(dict.fromkeys(map(fp32_target, self.native_float_targets(model))))

    def float_run_targets(self) -> list[str]:
        """Targets whose float runs (method none: FP32, FP16, BF16) run on their runtime."""
        return list(dict.fromkeys([*self.native_float_targets(), *self.fp32_targets()]))

    def runs(self) -> list[Run]:
        """Every run: per training, the FP32 reference, each target's FP32, the quantized runs."""
        runs = []
        for t in self.trainings():
            runs.append(Run(t.dataset, t.model, t.seed, "reference", "none", "fp32"))
            for target in self.fp32_targets(t.model):
                runs.append(Run(t.dataset, t.model, t.seed, target, "none", "fp32"))
            for target, method, precision in self.quantization_sweep(t.model):
                runs.append(Run(t.dataset, t.model, t.seed, target, method, precision))
            if self.has_sensitivity(t.model):
                sensitivity = self.sensitivity()
                target, method = sensitivity["target"], sensitivity["method"]
                runs.append(Run(t.dataset, t.model, t.seed, target, method, MIXED))
        return runs

    def has_sensitivity(self, model: str) -> bool:
        """Whether the model gets a sensitivity analysis (asked for, for it, a PyTorch model)."""
        sensitivity = self.sensitivity()
        if not sensitivity or self.framework(model) != "torch":
            return False
        return model in sensitivity.get("models", [model])

    def sensitivity(self) -> dict[str, Any] | None:
        """The sensitivity analysis settings (defaults filled), or None when not asked for."""
        return self.config["quantize"].get("sensitivity")

    def plan(self, run: Run) -> Plan:
        """How the run executes (runtime, native or simulated); see `Target.plan`.

        A `mixed` run is planned as its low precision: native only if that one is.
        """
        framework = self.framework(run.model)
        precision = run.precision
        if precision == MIXED:
            precision = self.sensitivity()["precision"]
        return get_target(run.target).plan(precision, framework)

    def node(self, run: Run) -> str:
        """The node type a run's evaluation needs: its target's, or `cpu` for `reference`."""
        return get_target(run.target).node or "cpu"

    def artifacts(self, run: Run) -> dict[str, str]:
        """What a run's evaluation reads besides the prepared data (`evaluation_inputs`)."""
        return evaluation_inputs(self, run)

    def evaluation(self, run: Run) -> Evaluation:
        """What a run's evaluation runs, from its coordinates and the study: its artifacts,
        the runtime of its ONNX file, simulated or not, the paired baseline, its node type's
        device and its workload (`sciquant evaluate --plan`, for the rules and `submit`)."""
        inputs = self.artifacts(run)
        plan = self.plan(run)
        optional = {key: Path(inputs[key]) if key in inputs else None
                    for key in ("onnx", "baseline_checkpoint", "baseline_onnx")}  # fmt: skip
        return Evaluation(
            artifact=Path(inputs["artifact"] if "artifact" in inputs else inputs["checkpoint"]),
            onnx=optional["onnx"],
            runtime=plan.runtime if optional["onnx"] is not None else None,
            simulated=plan.simulated,
            baseline=optional["baseline_checkpoint"],
            baseline_onnx=optional["baseline_onnx"],
            device=run_device(self, run),
            workload=self.workload(run.dataset),
        )

    def node_of(self, stage: str, subject: Run | Training | None = None) -> str:
        """The node type a stage's job for `subject` runs on: the model's `train.node` for a
        training, the run's target's for an evaluation, `cpu` for every other job."""
        if stage == "train" and subject is not None:
            return train_node(self, subject.model)
        if stage == "evaluate" and isinstance(subject, Run):
            return self.node(subject)
        return CPU_NODE

    def resources(self, stage: str, subject: Run | Training | None = None) -> dict[str, Any]:
        """What a stage's job for `subject` asks the scheduler for, first attempt: its node
        type (`node_of`) and that node type's resources (`stage_resources`). The rules and
        `sciquant submit` both ask for these."""
        node = self.node_of(stage, subject)
        return {"node": node, **stage_resources(self.config, stage, node)}

    def config_hash(self) -> str:
        """SHA-256 of the resolved config (defaults filled), the study's provenance in the
        result cube, without what only chooses which runs exist, how they are grouped into jobs
        and how the report reads them (`NOT_HASHED`). A run records the hashes of the sections
        it depends on instead (`settings_hashes`)."""
        science = {key: value for key, value in self.config.items() if key not in NOT_HASHED}
        science["quantize"] = quantize_settings(self.config)
        return _sha256(science)

    def settings_hashes(self, run: Run) -> dict[str, str]:
        """SHA-256 of each config section a run's numbers depend on, by the section's key:
        `datasets.<its dataset>`, `models.<its model>` (without `datasets`, the list of what
        else the model trains on), `evaluate`, `threads`, `nodes.<node type>` of its evaluation
        and of its training (an empty entry where the config has none) and, for every run but
        an FP32 one, `quantize` (without `sweeps`). Recorded in the run's metrics.json and its
        evaluation's command line: a dataset, a model or a sweep entry added to a finished
        study changes no other run's hashes, and so reruns no other run; the report names a
        section whose runs were made under different settings (`mixed_settings_note`)."""
        sections = [f"datasets.{run.dataset}", f"models.{run.model}", "evaluate", "threads"]
        sections += [f"nodes.{n}" for n in sorted({self.node(run), train_node(self, run.model)})]
        if (run.method, run.precision) != ("none", "fp32"):
            sections.append("quantize")
        cache = self.__dict__.setdefault("_section_hashes", {})
        for section in sections:
            if section not in cache:
                cache[section] = _sha256(self._section(section))
        return {section: cache[section] for section in sections}

    def _section(self, key: str) -> Any:
        """The settings `settings_hashes` hashes under `key`."""
        kind, _, name = key.partition(".")
        if kind == "models":
            return train_settings(self, name)
        if kind == "quantize":
            return quantize_settings(self.config)
        if kind == "nodes":
            return self.config.get("nodes", {}).get(name, {})
        return self.config[kind][name] if name else self.config[kind]


def _sha256(value: Any) -> str:
    """SHA-256 of a settings value as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


#: Top-level config keys left out of the config hash: `batch` (how runs are grouped into jobs),
#: `report` (how the report reads the runs), `limits` (bounds the config check applies),
#: `seeds` (which trainings exist; a run's seed is its own coordinate). `quantize.sweeps` is left
#: out too (`quantize_settings`). None of them changes a number of a run.
NOT_HASHED = ("batch", "report", "limits", "seeds")


def settings_json(value: Any) -> str:
    """A stage's settings as JSON for its command line (the rules' params, `sciquant submit`,
    batch jobs), keys sorted: the same settings listed in another order in the config file give
    the same command, and so rerun nothing."""
    return json.dumps(value, sort_keys=True)


def quantize_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config's quantize section as a quantize or sensitivity job gets it: without
    `sweeps`, which choose the study's runs, not how one is quantized (so that a run added to a
    sweep reruns no other run's quantization)."""
    return {key: value for key, value in config["quantize"].items() if key != "sweeps"}


# ------------------------------------------------------------------ what a stage's job asks for

#: First attempt's memory (MB) and time limit (minutes) of each stage's jobs, where the node
#: type's `nodes` entry sets no `mem_mb` / `runtime`. The rules scale both with the attempt
#: (`--retries`); `sciquant submit` asks for the first attempt's.
STAGE_RESOURCES: dict[str, tuple[int, int]] = {
    "synthesize": (2000, 30),
    "fetch": (1000, 120),
    "prepare": (4000, 30),
    "overview": (2000, 10),
    "train": (4000, 120),
    "sensitivity": (4000, 60),
    "quantize": (4000, 60),
    "export": (2000, 10),
    "evaluate": (4000, 60),
    "aggregate": (2000, 10),
    "report": (2000, 10),
}
#: Scheduler settings every job carries (empty or zero where its node type sets none), so a
#: rule whose node type depends on the run has the same keys for every job.
NODE_RESOURCE_DEFAULTS: dict[str, Any] = {
    "slurm_partition": "",
    "constraint": "",
    "gpu": 0,
    "gpu_model": "",
}


def stage_resources(config: dict[str, Any], stage: str, node: str) -> dict[str, Any]:
    """A stage's first-attempt resources on a node type: `mem_mb` and `runtime` (the node type's
    own, else `STAGE_RESOURCES`), and its scheduler settings from `nodes` (every key that some
    node type sets, so that all jobs carry the same keys: empty, zero, or for `cpus_per_task`
    the config's `threads`, where this node type sets none)."""
    if stage not in STAGE_RESOURCES:
        raise SciquantError(f"no stage {stage!r}; stages: {', '.join(STAGE_RESOURCES)}")
    nodes = config.get("nodes", {})
    spec = nodes.get(node, {})
    mem_mb, runtime = STAGE_RESOURCES[stage]
    resources: dict[str, Any] = dict(NODE_RESOURCE_DEFAULTS)
    for other in nodes.values():
        for key in other:
            if key not in resources and key not in ("mem_mb", "runtime"):
                resources[key] = config["threads"] if key == "cpus_per_task" else ""
    resources.update({k: v for k, v in spec.items() if k not in ("mem_mb", "runtime")})
    resources["mem_mb"] = spec.get("mem_mb", mem_mb)
    resources["runtime"] = spec.get("runtime", runtime)
    return resources


# ------------------------------------------------------------------ stage arguments of a run
# What a stage reads and which settings and flags it gets, for the workflow's rules
# (`rules/common.smk`) and for `sciquant submit` (`sciquant.launch`) alike: one definition, so
# the two run every stage with the same arguments.

#: Runtimes that run a blood-flow model from its ONNX export (FP32, or the run's QDQ graph).
ONNX_RUNTIMES = ("onnxruntime", "tensorrt", "openvino")


def train_settings(study: Study, model: str) -> dict[str, Any]:
    """Architecture and training settings of a model (its config minus `datasets`); its
    `train.node` says where it trains (`sciquant train` picks its device from it)."""
    return {key: value for key, value in study.models[model].items() if key != "datasets"}


def train_node(study: Study, model: str) -> str:
    """The node type a model trains on (`models.<name>.train.node`)."""
    return study.models[model]["train"]["node"]


def run_coordinates(study: Study, run: Run) -> dict[str, Any]:
    """The run's coordinates and provenance (`sciquant evaluate --coordinates`): the study's
    name and the hashes of the config sections the run depends on (`Study.settings_hashes`)."""
    coordinates = run.coordinates()
    coordinates.update(study=study.config["study"], settings_hashes=study.settings_hashes(run))
    return coordinates


def quantize_params(study: Study, model: str) -> dict[str, Any]:
    """`sciquant quantize --settings`: the quantize section and the model's settings (QAT
    reuses its training settings)."""
    return {"quantize": quantize_settings(study.config), "model": train_settings(study, model)}


def training_of(run: Run) -> Training:
    """The FP32 training a run's model comes from."""
    return Training(run.dataset, run.model, run.seed)


def sensitivity_folder(training: Training) -> str:
    """Where a training's sensitivity analysis writes recommendation.json and its table."""
    return f"{training.folder.rsplit('/', 1)[0]}/sensitivity"


def fp32_of_target(run: Run) -> Run:
    """The FP32 run of the run's target (its speed-up baseline; float runs' export): that of
    the target running its FP32 graph (`fp32_target`)."""
    return Run(run.dataset, run.model, run.seed, fp32_target(run.target), "none", "fp32")


def quantize_inputs(run: Run) -> dict[str, str]:
    """What a PyTorch run's calibration or QAT reads: the FP32 checkpoint, plus the sensitivity
    recommendation for the `mixed` run."""
    training = training_of(run)
    inputs = {"checkpoint": f"{training.folder}/checkpoint.pt"}
    if run.precision == MIXED:
        inputs["recommendation"] = f"{sensitivity_folder(training)}/recommendation.json"
    return inputs


def is_timed(study: Study, run: Run) -> bool:
    """Whether a run's evaluation is timed: every run a target executes natively."""
    return not study.plan(run).simulated


def is_paired(study: Study, run: Run) -> bool:
    """Whether a run is timed beside its target's FP32 (a timed run that is not that FP32
    itself, on a target with an FP32 run)."""
    return (
        is_timed(study, run)
        and (run.method, run.precision) != ("none", "fp32")
        and fp32_target(run.target) in study.fp32_targets(run.model)
    )


def run_artifacts(study: Study, run: Run) -> dict[str, str]:
    """What a PyTorch run's evaluation reads besides the prepared data.

    `checkpoint`: FP32 checkpoint.pt, or quantized.pt of a calibrated method; `onnx`: model.onnx
    for runs on an ONNX runtime (a dynamic method's only artifact; float runs build from the
    target's FP32 export); `baseline_checkpoint` (+ `baseline_onnx`): the target's FP32
    artifacts of a paired run.
    """
    training = training_of(run).folder
    artifacts = {
        "checkpoint": (
            f"{run.folder}/quantized.pt"
            if run.method in CALIBRATED_METHODS
            else f"{training}/checkpoint.pt"
        )
    }
    plan = study.plan(run)
    fp32 = fp32_of_target(run)
    if plan.runtime in ONNX_RUNTIMES:
        # float runs (method none) all build from the target's FP32 export
        artifacts["onnx"] = f"{(fp32 if run.method == 'none' else run).folder}/model.onnx"
    if is_paired(study, run):
        # timed interleaved with its target's FP32 in the same process (a paired speed-up)
        artifacts["baseline_checkpoint"] = f"{training}/checkpoint.pt"
        if plan.runtime in ONNX_RUNTIMES:
            artifacts["baseline_onnx"] = f"{fp32.folder}/model.onnx"
    return artifacts


def keras_artifacts(study: Study, run: Run) -> dict[str, str]:
    """A Keras run's evaluation input: the FP32 model.keras, or the run's quantization.json
    (+ its target's FP32 run's as `baseline_checkpoint` of a paired run)."""
    if (run.target, run.method, run.precision) == ("reference", "none", "fp32"):
        return {"artifact": f"{training_of(run).folder}/model.keras"}
    artifacts = {"artifact": f"{run.folder}/quantization.json"}
    if is_paired(study, run):  # timed beside its target's FP32 run's artifact
        artifacts["baseline_checkpoint"] = f"{fp32_of_target(run).folder}/quantization.json"
    return artifacts


def evaluation_inputs(study: Study, run: Run) -> dict[str, str]:
    """What a run's evaluation reads besides the prepared data, for its model's framework."""
    if study.framework(run.model) == "keras":
        return keras_artifacts(study, run)
    return run_artifacts(study, run)


def run_device(study: Study, run: Run) -> str:
    """The device a run's evaluation asks for: that of its target's node type."""
    return node_device(study.node(run))


#: Float precisions below FP32: a cast of the FP32 weights, no ranges (method `none`).
FLOAT_CASTS = ("fp16", "bf16")

#: The download and archive limits of `sciquant.data.download.fetch` a config's `limits:` may
#: set (their defaults live there); the fetch rule passes them to `sciquant fetch --limits`.
FETCH_LIMITS = (
    "max_download_bytes",
    "max_archive_members",
    "max_unpacked_bytes",
    "max_compression_ratio",
)

#: Bounds on sizes that run for days or fill the disk when mistyped: `max_*` are the largest
#: values allowed, `min_*` the smallest. A config's `limits:` mapping replaces any of them (the
#: schema's `limits` documents each, with these values as its defaults).
LIMITS: dict[str, int | float] = {
    "max_simulations": 2000,
    "max_md_frames": 50000,
    "max_seeds": 20,
    "min_prepare_dt": 0.001,
}

#: `nodes` keys whose text reaches the sbatch command line (the Slurm executor plugin runs it
#: through a shell) or an `#SBATCH` line of a job script (`sciquant submit`).
SBATCH_TEXT_KEYS = ("slurm_partition", "constraint", "gpu_model", "gres", "slurm_extra")
#: One `slurm_extra` option: `--option` or `--option=value`, the value free of anything a shell
#: or a job script treats specially (quotes, spaces, newlines, `;&|$<>` and backticks).
SLURM_OPTION = re.compile(r"--(?P<name>[a-z][a-z0-9-]*)(?:=(?P<value>[A-Za-z0-9_.,:@%+/=-]+))?")
#: What `slurm_extra` may hold, in words (for error messages and the schema's description).
SLURM_EXTRA_ALLOWED = (
    "long sbatch options only, `--option` or `--option=value`, separated by spaces; values of "
    "letters, digits and _ . , : @ % + / = - (no quotes, spaces, newlines, $, `, ;, &, |, <, >)"
)
#: sbatch options the workflow sets itself (the Slurm executor plugin and submitit), with the
#: `nodes` key that sets them where a node type has one. sbatch takes any unambiguous prefix of
#: a long option, so a prefix of one of these is refused too.
MANAGED_SBATCH_OPTIONS: dict[str, str | None] = {
    "partition": "slurm_partition",
    "constraint": "constraint",
    "gres": "gpu and gpu_model, or gres",
    "gpus": "gpu and gpu_model, or gres",
    "time": "runtime",
    "mem": "mem_mb",
    "mem-per-cpu": "mem_mb",
    "cpus-per-task": "cpus_per_task",
    "cpus-per-gpu": "cpus_per_task",
    "account": None,
    "qos": None,
    "clusters": None,
    "nodes": None,
    "ntasks": None,
    "ntasks-per-gpu": None,
    "job-name": None,
    "output": None,
    "error": None,
    "comment": None,
    "export": None,
    "chdir": None,
    "workdir": None,
    "parsable": None,
    "wrap": None,
}
#: A newline or another control character: text holding one is not a single sbatch argument.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def check_semantics(config: dict[str, Any]) -> None:
    """What JSON Schema cannot say: cross references, impossible values, text that would reach a
    shell, and sizes beyond their `LIMITS`. Reads a copy of `config` with the schema's defaults
    filled (`with_schema_defaults`): no default is repeated here."""
    config = with_schema_defaults(config)
    for node, spec in config.get("nodes", {}).items():
        check_node(node, spec)
    _check_limits(config)
    datasets = config.get("datasets", {})
    for name, dataset in datasets.items():
        source = dataset.get("source", {})
        given = [k for k in ("embedded", "files") if k in source]
        if len(given) != 1:
            raise SciquantError(
                f"config key datasets.{name}.source: give exactly one of `embedded` or `files` "
                f"(found {given or 'neither'})"
            )
        if dataset.get("workload") not in BUILT_IN_WORKLOADS:
            continue  # a plug-in's settings: its schema's to check
        split = dataset["prepare"]["split"]
        fractions = [split[k] for k in ("train", "valid", "test")]
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise SciquantError(
                f"config key datasets.{name}.prepare.split: train + valid + test must add up to 1 "
                f"(they add up to {sum(fractions):g})"
            )
        if split["train"] <= 0 or split["test"] <= 0:
            raise SciquantError(
                f"config key datasets.{name}.prepare.split: train and test fractions must be > 0"
            )
        files = source.get("files", [])
        if files:
            # The names fetch saves them under (one function for fetch, this check and prepare):
            # two entries on one name, or one on manifest.json, fail here, before any download.
            from sciquant.data.download import check_local_names

            check_local_names(files, key=f"datasets.{name}.source.files")
        if dataset.get("workload") == "md":
            _check_md_dataset(name, dataset)
            continue
        embedded = source.get("embedded")
        if embedded is not None:
            _check_simulator(name, embedded.get("parameters", {}))
            n_test = int(embedded["n_simulations"] * split["test"])
            if n_test < 1:
                raise SciquantError(
                    f"config key datasets.{name}.source.embedded.n_simulations: too few "
                    f"simulations for a test split of {split['test']:g}; raise it"
                )

    _check_sweep(config)
    _check_report(config)
    for name, model in config.get("models", {}).items():
        allowed = architecture_workloads(model["architecture"])
        for dataset in model["datasets"]:
            if dataset not in datasets:
                raise SciquantError(
                    f"config key models.{name}.datasets: unknown dataset '{dataset}'; "
                    f"defined datasets are: {', '.join(sorted(datasets)) or 'none'}"
                )
            workload = datasets[dataset]["workload"]
            if workload not in allowed:
                raise SciquantError(
                    f"config key models.{name}.datasets: a {model['architecture']} cannot learn "
                    f"dataset '{dataset}' (workload {workload}); it learns: {', '.join(allowed)}"
                )
            if model["architecture"] == "icnnmd":
                _check_icnnmd_grid(name, dataset, datasets[dataset])
        train = model["train"]
        if "learning_rate_min" in train and train["learning_rate_min"] > train["learning_rate"]:
            raise SciquantError(
                f"config key models.{name}.train.learning_rate_min: must not exceed learning_rate"
            )
        node = train["node"]
        if node != "cpu" and node not in config.get("nodes", {}):
            raise SciquantError(
                f"config key models.{name}.train.node: node type '{node}' has no entry in `nodes`; "
                f"add nodes.{node} with its Slurm resources"
            )


def check_node(node: str, spec: dict[str, Any]) -> None:
    """A node type's Slurm settings stay sbatch arguments: every text that reaches the sbatch
    command or an `#SBATCH` line is one line, and `slurm_extra` holds sbatch options only."""
    for key in SBATCH_TEXT_KEYS:
        if key == "slurm_extra":
            slurm_extra_options(node, spec.get(key, ""))
        elif isinstance(spec.get(key), str):
            check_one_line(f"config key nodes.{node}.{key}", spec[key])


def check_one_line(label: str, text: str) -> None:
    """SciquantError naming `label` if `text` holds a newline or another control character: it
    would end an `#SBATCH` line and start a command of the job script."""
    if CONTROL_CHARACTER.search(text):
        raise SciquantError(
            f"{label}: must be one line, with no newline or other control character (it becomes "
            f"an sbatch argument and an #SBATCH line); got {text!r}"
        )


def slurm_extra_options(node: str, text: str) -> list[tuple[str, str | None]]:
    """`nodes.<node>.slurm_extra` as (option, value or None) pairs, in order.

    SciquantError naming the key unless the text is `SLURM_EXTRA_ALLOWED` and sets no option of
    `MANAGED_SBATCH_OPTIONS`: the Slurm executor plugin pastes the text into an sbatch command
    line run by a shell, and `sciquant submit` writes each option as an `#SBATCH` line.
    """
    key = f"config key nodes.{node}.slurm_extra"
    options = []
    for token in text.split(" "):
        if not token:
            continue
        match = SLURM_OPTION.fullmatch(token)
        if match is None:
            raise SciquantError(f"{key}: {token!r} is not allowed; give {SLURM_EXTRA_ALLOWED}")
        name = match["name"]
        managed = [option for option in MANAGED_SBATCH_OPTIONS if option.startswith(name)]
        if managed:
            option = name if name in managed else managed[0]
            source = MANAGED_SBATCH_OPTIONS.get(option)
            where = f"give it as nodes.{node}.{source}" if source else "leave it out"
            shown = f"--{name}" if name == option else f"--{name} (sbatch's --{option})"
            raise SciquantError(f"{key}: {shown} is set by the workflow itself; {where}")
        options.append((name, match["value"]))
    return options


def _check_limits(config: dict[str, Any]) -> None:
    """Sizes beyond `LIMITS` (or the config's own `limits:`) fail here, before any job runs."""
    limits = {**LIMITS, **config.get("limits", {})}
    seeds = config["seeds"]
    _at_most("config key seeds", len(seeds), "max_seeds", limits,
             "seeds (every model is trained, quantized and evaluated once per seed)")  # fmt: skip
    for name, dataset in config.get("datasets", {}).items():
        key = f"config key datasets.{name}"
        embedded = dataset.get("source", {}).get("embedded")
        if dataset.get("workload") not in BUILT_IN_WORKLOADS:
            continue
        if dataset.get("workload") == "md":
            if embedded is not None:
                _at_most(f"{key}.source.embedded.frames", embedded["frames"],
                         "max_md_frames", limits, "frames per state")  # fmt: skip
            continue
        if embedded is not None:
            _at_most(f"{key}.source.embedded.n_simulations", embedded["n_simulations"],
                     "max_simulations", limits, "simulations")  # fmt: skip
        dt = dataset["prepare"]["dt"]
        if dt < limits["min_prepare_dt"]:
            smallest = _number(limits["min_prepare_dt"])
            raise SciquantError(
                f"{key}.prepare.dt: {_number(dt)} s is below the limit of {smallest} s (a "
                f"cardiac cycle of T seconds becomes T/dt steps in every graph sample and every "
                f"rollout); raise it, or lower the limit on purpose with "
                f"`limits: {{min_prepare_dt: {_number(dt)}}}`"
            )


def _at_most(key: str, value: int, limit: str, limits: dict[str, Any], what: str) -> None:
    if value > limits[limit]:
        raise SciquantError(
            f"{key}: {value} {what} exceed the limit of {_number(limits[limit])}; lower it, or "
            f"raise the limit on purpose with `limits: {{{limit}: {value}}}`"
        )


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _check_md_dataset(name: str, dataset: dict[str, Any]) -> None:
    """An md dataset needs one topology and labelled trajectories of at least two states, and
    enough frames per trajectory for every split."""
    key = f"config key datasets.{name}"
    files = dataset["source"].get("files")
    if files is not None:
        topologies = [f for f in files if f["role"] == "topology"]
        if len(topologies) != 1:
            raise SciquantError(
                f"{key}.source.files: exactly one file needs `role: topology` "
                f"(found {len(topologies)})"
            )
        for i, entry in enumerate(files):
            if entry["role"] == "trajectory" and "label" not in entry:
                raise SciquantError(
                    f"{key}.source.files.{i}.label: a trajectory needs its state label (0, 1, ...)"
                )
        labels = {f["label"] for f in files if f["role"] == "trajectory"}
        if len(labels) < 2:
            raise SciquantError(
                f"{key}.source.files: trajectories of at least two labels are needed to classify "
                f"states (found labels {sorted(labels)})"
            )
    prepare = dataset["prepare"]
    frames = prepare["frames_per_trajectory"]
    embedded = dataset["source"].get("embedded")
    if embedded is not None and frames > embedded["frames"]:
        raise SciquantError(
            f"{key}.prepare.frames_per_trajectory: {frames} frames asked, but the embedded "
            f"simulation writes {embedded['frames']} per trajectory; lower it or raise "
            f"{key}.source.embedded.frames"
        )
    if frames:
        split = prepare["split"]
        usable = frames - 2 * prepare["gap"]
        if min(split["train"], split["test"]) * usable < 1:
            raise SciquantError(
                f"{key}.prepare.frames_per_trajectory: {frames} frames leave no frame for a split "
                f"after the gaps of {prepare['gap']} frames; raise it or lower `gap`"
            )


def _check_icnnmd_grid(model: str, name: str, dataset: dict[str, Any]) -> None:
    """The ICNNMD network pools twice: it needs pixel maps of at least ICNNMD_MIN_GRID² pixels.

    Known before any job for the embedded chain (every bead is one CA atom, so any selection
    that keeps atoms keeps all).
    """
    embedded = dataset.get("source", {}).get("embedded")
    if embedded is None:
        return
    beads = embedded["n_beads"]
    if math.isqrt(beads - 1) + 1 < ICNNMD_MIN_GRID:
        raise SciquantError(
            f"config key datasets.{name}.source.embedded.n_beads: {beads} beads make "
            f"{math.isqrt(beads - 1) + 1}×{math.isqrt(beads - 1) + 1} pixel maps, too small for "
            f"model {model} (ICNNMD needs {ICNNMD_MIN_GRID}×{ICNNMD_MIN_GRID}: more than "
            f"{(ICNNMD_MIN_GRID - 1) ** 2} beads)"
        )


def _check_simulator(dataset: str, parameters: dict[str, Any]) -> None:
    """Impossible simulator values (e.g. a range with min > max) fail the dry run, not the job."""
    from sciquant.workloads.bloodflow.sim_params import params_from_mapping

    try:
        params_from_mapping(parameters)
    except SciquantError as error:
        key = f"config key datasets.{dataset}.source.embedded.parameters"
        raise SciquantError(f"{key}: {error}") from None


def _check_report(config: dict[str, Any]) -> None:
    """The report's error budget: every constraint a metric and a bound (its metric names are
    checked against the result cube by the report stage, the first to know them); the QAT
    degree protection's probabilities (`quantize.qat.degree_protection`), before any job."""
    protection_settings(config["quantize"]["qat"])
    budget = config["report"].get("budget")
    if budget is not None:
        from sciquant.report.cube import parse_budget

        try:
            parse_budget(budget)
        except SciquantError as error:
            raise SciquantError(f"config key report.budget: {error}") from None


def _check_sweep(config: dict[str, Any]) -> None:
    """Every (target, precision) must be runnable for each model the entry applies to; nodes
    and models must exist."""
    nodes = config.get("nodes", {})
    models = config.get("models", {})
    for i, entry in enumerate(config["quantize"]["sweeps"]):
        key = f"config key quantize.sweeps.{i}"
        for model in entry.get("models", []):
            if model not in models:
                raise SciquantError(
                    f"{key}.models: unknown model '{model}'; defined models are: "
                    f"{', '.join(sorted(models)) or 'none'}"
                )
        chosen = entry.get("models", sorted(models))
        frameworks = {architecture_framework(models[m]["architecture"]): m for m in chosen}
        _check_plugin_methods(key, entry, {m: models[m] for m in chosen})
        for target_name in entry["targets"]:
            try:
                target = get_target(target_name)
            except SciquantError as error:
                raise SciquantError(f"{key}.targets: {error}") from None
            node = target.node or "cpu"
            if node != "cpu" and node not in nodes:
                raise SciquantError(
                    f"{key}.targets: target {target_name} runs on node type '{node}', which has "
                    f"no entry in `nodes`; add nodes.{node} with its Slurm resources"
                )
            for precision in entry["precisions"]:
                for framework, model in sorted(frameworks.items()):
                    try:
                        plan = target.plan(precision, framework)
                        _check_keras_export(plan)
                    except SciquantError as error:
                        hint = _models_hint(entry, model)
                        raise SciquantError(f"{key}: {error}{hint}") from None
        for method in entry["methods"]:
            if method in DYNAMIC_METHODS:
                _check_dynamic(key, method, entry, frameworks)
            elif method in METHOD_LIMITS:
                _check_method_limits(key, method, entry, frameworks)
        casts = [p for p in entry["precisions"] if p in FLOAT_CASTS]
        integer = [p for p in entry["precisions"] if p not in FLOAT_CASTS]
        if "none" in entry["methods"] and integer:
            raise SciquantError(
                f"{key}.methods: `none` (no ranges, a plain cast) goes with fp16 / bf16 only, not "
                f"with {', '.join(integer)}; the FP32 baseline is always included"
            )
        methods = [m for m in entry["methods"] if m != "none"]
        if casts and methods:
            raise SciquantError(
                f"{key}.methods: {', '.join(casts)} is a cast with no ranges to choose, so "
                f"{', '.join(methods)} would do nothing; give it its own entry with "
                "`methods: [none]`"
            )
    sensitivity = config["quantize"].get("sensitivity")
    if sensitivity:
        for model in sensitivity.get("models", []):
            if config.get("models", {}).get(model, {}).get("architecture") != "meshgraphnet":
                raise SciquantError(
                    f"config key quantize.sensitivity.models: {model!r} is not a PyTorch model "
                    f"of `models` (meshgraphnet); analysable: "
                    + ", ".join(
                        name
                        for name, m in config.get("models", {}).items()
                        if m.get("architecture") == "meshgraphnet"
                    )
                )
        try:
            target = get_target(sensitivity["target"])
            if "torch" not in target.frameworks:
                raise SciquantError(
                    f"target {target.name!r} takes {', '.join(sorted(target.frameworks))} models "
                    "only; the sensitivity analysis is of PyTorch models"
                )
        except SciquantError as error:
            raise SciquantError(f"config key quantize.sensitivity.target: {error}") from None
        for key in ("precision", "fallback"):
            try:
                target.plan(sensitivity[key], "torch")
            except SciquantError as error:
                raise SciquantError(f"config key quantize.sensitivity.{key}: {error}") from None


def _check_plugin_methods(key: str, entry: dict[str, Any], models: dict[str, Any]) -> None:
    """A plug-in workload's models take the methods its workload lists (`methods`), and no
    mixed precision (that needs the MeshGraphNet sensitivity analysis)."""
    from sciquant.plugins import architecture_workload

    for name, model in sorted(models.items()):
        if not is_plugin_architecture(model["architecture"]):
            continue
        workload = architecture_workload(model["architecture"])
        known = workload.methods
        methods = [m for m in entry["methods"] if m != "none" and m not in known]
        if methods:
            raise SciquantError(
                f"{key}.methods: {', '.join(methods)} is not available for {name} (workload "
                f"{workload.name}); its methods: {', '.join(known) or 'none'}"
                f"{_models_hint(entry, name)}"
            )
        if MIXED in entry["precisions"]:
            raise SciquantError(
                f"{key}.precisions: `mixed` needs the sensitivity analysis of a MeshGraphNet; "
                f"{name} (workload {workload.name}) has none{_models_hint(entry, name)}"
            )
        runtimes = workload.runtimes
        for target in entry["targets"]:
            for precision in entry["precisions"]:
                try:
                    plan = get_target(target).plan(
                        precision, architecture_framework(model["architecture"])
                    )
                except SciquantError:
                    continue  # an impossible plan: the sweep's own check names it
                if runtimes is not None and not plan.simulated and plan.runtime not in runtimes:
                    raise SciquantError(
                        f"{key}.targets: {target} runs {precision} on {plan.runtime}, which "
                        f"workload {workload.name} does not run ({', '.join(runtimes)}); "
                        f"leave {name} out of this entry{_models_hint(entry, name)}"
                    )


def _check_dynamic(
    key: str, method: str, entry: dict[str, Any], frameworks: dict[str, str]
) -> None:
    """A dynamic method runs natively on its engine or not at all: every target, precision and
    model of the entry must be one it runs."""
    for target in entry["targets"]:
        for precision in entry["precisions"]:
            for framework, model in sorted(frameworks.items()):
                try:
                    DYNAMIC_METHODS[method].check(method, target, precision, framework)
                except SciquantError as error:
                    hint = _models_hint(entry, model)
                    raise SciquantError(f"{key}.methods: {error}{hint}") from None


def _check_method_limits(
    key: str, method: str, entry: dict[str, Any], frameworks: dict[str, str]
) -> None:
    """A calibrated method built for some frameworks or scale grids only (`METHOD_LIMITS`)."""
    for target in entry["targets"]:
        for framework, model in sorted(frameworks.items()):
            try:
                check_method_limits(method, target, framework)
            except SciquantError as error:
                hint = _models_hint(entry, model)
                raise SciquantError(f"{key}.methods: {error}{hint}") from None


def _models_hint(entry: dict[str, Any], model: str) -> str:
    """What to add to a sweep entry's error when it names no `models` (it applies to all)."""
    if "models" in entry:
        return ""
    return (
        f" (the entry applies to every model, {model} included; list the ones it is for under "
        "`models`)"
    )


def _check_keras_export(plan: Plan) -> None:
    """Keras models reach ONNX Runtime and TensorRT through an ONNX export, which needs tf2onnx;
    without it such a run fails the dry run instead of its job."""
    import importlib.util

    if plan.framework != "keras" or plan.runtime not in ("onnxruntime", "tensorrt"):
        return
    if importlib.util.find_spec("tf2onnx") is None:
        raise SciquantError(
            f"target {plan.target.name!r} runs precision {plan.precision} of a Keras model "
            f"natively through an ONNX export, which needs tf2onnx (not installed; its releases "
            f"pin a protobuf older than TensorFlow 2.21's); use litert-cpu for Keras models, a "
            f"sub-8-bit precision (simulated), or name the PyTorch models under `models`"
        )


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    and drops the first without a word: a second `quantize:` block would replace the first)."""


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping, on (1-based) lines `first` and `second`."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool):
            if key in seen:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_config_file(path: Path) -> dict[str, Any]:
    """A study config file's mapping (empty file: {}); SciquantError naming the file for a
    missing or unreadable file, text that is not UTF-8 YAML, a key given twice in one mapping,
    or a document that is not a mapping of keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: config file not found") from error
    except IsADirectoryError as error:
        raise SciquantError(f"{path}: is a folder; give the study's YAML file") from error
    except UnicodeDecodeError as error:
        raise SciquantError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from error
    except OSError as error:
        raise SciquantError(f"{path}: cannot read the config file ({error})") from error
    try:
        config = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as error:
        raise SciquantError(
            f"{path}: line {error.second}: key {error.key!r} is given a second time in the same "
            f"mapping (first on line {error.first}); YAML would keep only the last, so a study "
            "config refuses it: merge the two"
        ) from None
    except yaml.YAMLError as error:
        raise SciquantError(f"{path}: not valid YAML: {error}") from error
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SciquantError(
            f"{path}: a study config is a mapping of keys (study:, datasets:, models:, ...), "
            f"not a {type(config).__name__}"
        )
    return config


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a study YAML, validate it against the schema (filling defaults) and check semantics.

    The same validation the workflow applies, for use outside Snakemake (submitit, tests).
    """
    config = read_config_file(Path(path))
    config.update(overrides or {})
    validate_config(config, source=str(path))
    check_semantics(config)
    return config


def validate_config(config: dict[str, Any], source: str = "config") -> None:
    """Validate against the JSON Schema, filling defaults; errors name the key path."""
    errors = schema_errors(config)
    if errors:
        raise SciquantError(f"{source}: invalid study config:\n" + "\n".join(errors))


def with_schema_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with the schema's defaults filled where it leaves keys out (the config
    itself is left as it is; schema violations are `validate_config`'s to report)."""
    import jsonschema

    filled = copy.deepcopy(config)
    for _ in with_defaults(jsonschema.Draft202012Validator)(schema_document()).iter_errors(filled):
        pass
    return filled


def schema_errors(config: dict[str, Any], limit: int = 10) -> list[str]:
    """The config's schema violations, one line each naming the dotted key (defaults filled)."""
    import jsonschema

    validator_class = with_defaults(jsonschema.Draft202012Validator)
    errors = sorted(
        validator_class(schema_document()).iter_errors(config), key=lambda e: list(e.path)
    )
    # Without its `workload` / `architecture` a dataset or model is checked against another
    # kind's keys: the missing key is the error, the other kind's complaints below it are not.
    undecided = [
        list(e.absolute_path)
        for e in errors
        if e.validator == "required" and set(e.validator_value) & set(DISCRIMINATORS)
        and any(key not in e.instance for key in DISCRIMINATORS if key in e.validator_value)
    ]  # fmt: skip
    errors = [
        e
        for e in errors
        if e.validator == "required"
        or not any(list(e.absolute_path)[: len(path)] == path for path in undecided)
    ]
    return [describe(error) for error in errors[:limit]]


#: The keys that say which kind a dataset (`workload`) or a model (`architecture`) is.
DISCRIMINATORS = ("workload", "architecture")


#: What the schema's pattern of a sweep precision (`quantize.sweeps.N.precisions.M`) means.
PRECISION_WORDS = (
    "a precision is wXaY with X weight bits 2–8 and Y activation bits 4–8 (w8a8, w4a8, "
    "w4a4, ...), fp16 or bf16; FP32 runs in every study as the baseline without a sweep entry, "
    "and mixed precision comes from quantize.sensitivity"
)


def _unknown_keys(error: Any) -> str:
    """An `additionalProperties` violation with, for each unknown key, the closest allowed one,
    and the keys allowed there."""
    import difflib

    allowed = sorted(error.schema.get("properties", {}))
    instance = error.instance if isinstance(error.instance, dict) else {}
    unknown = [k for k in instance if k not in allowed]
    if not unknown or not allowed:
        return error.message
    close = [
        f"{match[0]!r}" + (f" for {name!r}" if len(unknown) > 1 else "")
        for name in unknown
        for match in [difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)]
        if match
    ]
    hint = f"; did you mean {', '.join(close)}? The" if close else "; the"
    return f"{error.message}{hint} keys allowed here are {', '.join(allowed)}"


def describe(error: Any) -> str:
    """One line per schema violation: the dotted key and what is wrong."""
    import jsonschema

    if error.validator in ("oneOf", "anyOf") and error.context:
        # the alternative that came closest says what is wrong, not "valid under none of them"
        # (a branch of another type, e.g. the list form of a single constraint, is not it)
        fitting = [e for e in error.context if e.validator != "type" or e.relative_path]
        return describe(jsonschema.exceptions.best_match(fitting or error.context))
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message
    if error.validator == "additionalProperties":
        message = _unknown_keys(error)
    if error.validator == "pattern" and list(error.absolute_path)[-2:-1] == ["precisions"]:
        message = f"{error.instance!r} is not a precision: {PRECISION_WORDS}"
    if error.validator == "enum" and list(error.absolute_path)[-1:] in (
        ["workload"],
        ["architecture"],
    ):
        # a plug-in's workload or architecture is known once its package is installed
        message += (
            "; a plug-in workload's is known once its package (entry point group "
            "sciquant.workloads) is installed in this environment"
        )
    return f"  config key {key}: {message}"
