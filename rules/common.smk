# Helpers shared by every stage: validation, wildcard constraints, input and param functions.
import json
import math
import os
from pathlib import Path

from sciquant.batch import SEED as BATCH_SEED
from sciquant.batch import STUDY_CONFIG_ENV as BATCH_STUDY_CONFIG_ENV
from sciquant.batch import commands_digest as batch_commands_digest
from sciquant.batch import batch_files
from sciquant.batch import plan as batch_plan
from sciquant.batch import settings as batch_settings
from sciquant.errors import SciquantError
from sciquant.quant.observers import DYNAMIC_METHODS
from sciquant.quant.targets import TARGETS
from sciquant.vocabulary import CPU_NODE
from sciquant.study import (
    BUILT_IN_WORKLOADS,
    CALIBRATED_METHODS,
    FETCH_LIMITS,
    QUANTIZATION_METHODS,
    Run,
    Study,
    Training,
    is_timed,
    keras_artifacts,
    quantize_inputs,
    quantize_params,
    quantize_settings,
    read_config_file,
    run_artifacts,
    run_coordinates,
    schema_errors,
    settings_json,
    stage_resources,
    train_settings,
)

# A study is one file: two --configfile paths would be merged key by key into a study no file
# describes (the Snakefile's comment; README).
_study_files = [str(p) for p in workflow.overwrite_configfiles or []]
if len(_study_files) > 1:
    raise WorkflowError(
        f"--configfile got {len(_study_files)} files ({', '.join(_study_files)}); a study is "
        "one file, never a merge: give one, or copy what you need of the others into it"
    )
#: The study file the errors below name.
STUDY_FILE = ", ".join(str(p) for p in workflow.configfiles) or "the study config"
# Snakemake's YAML reader keeps the last of a key given twice; the study's own reader refuses it.
for _configfile in workflow.configfiles:
    try:
        read_config_file(Path(_configfile))
    except SciquantError as error:
        raise WorkflowError(str(error)) from None
# The schema file with the installed workload plug-ins' parts (`sciquant.workloads`); its
# defaults are filled into `config` as it is checked, as snakemake's `validate` would.
try:
    _errors = schema_errors(config)
except SciquantError as error:
    raise WorkflowError(str(error)) from None
if _errors:
    raise WorkflowError(f"invalid study config {STUDY_FILE}:\n" + "\n".join(_errors))
try:
    study = Study(config)
    BATCHES = batch_plan(study)
except SciquantError as error:
    raise WorkflowError(f"{STUDY_FILE}: {error}") from None
BATCH_SETTINGS = batch_settings(study)
#: The seeds of the per-run quantize / export / evaluate rules: every seed, or none at all while
#: the runs are batched (rules/batch.smk then writes every run's files).
RUN_SEED = r"(?!x)x" if BATCHES else r"\d+"


def dataset_names(source=None):
    """Names of the datasets (with the given raw source kind: `embedded` or `files`)."""
    return sorted(
        name
        for name, spec in study.datasets.items()
        if source is None or source in spec["source"]
    )


def datasets_of(workload):
    """Names of the datasets of a workload (`bloodflow` or `md`)."""
    return [name for name in dataset_names() if study.workload(name) == workload]


def models_of(framework):
    """Names of the built-in models of a framework (`torch` or `keras`)."""
    return [
        name
        for name in sorted(study.models)
        if study.framework(name) == framework and not study.is_plugin(name)
    ]


def plugin_models():
    """Names of the models of plug-in workloads (their stages: rules/workload.smk)."""
    return [name for name in sorted(study.models) if study.is_plugin(name)]


def plugin_datasets():
    """Names of the datasets of plug-in workloads."""
    return [
        name
        for name in dataset_names()
        if study.workload(name) not in BUILT_IN_WORKLOADS
    ]


def alternatives(names):
    """A wildcard regex matching exactly these names (one that matches nothing if empty)."""
    return "|".join(names) if names else "(?!x)x"


wildcard_constraints:
    dataset=alternatives(dataset_names()),
    model=alternatives(sorted(study.models)),
    seed=r"\d+",
    target=alternatives(sorted(TARGETS)),
    method=alternatives(("none",) + QUANTIZATION_METHODS),
    precision=r"fp32|fp16|bf16|w[2-8]a[4-8]|mixed",


def get_final_output():
    """The report (which needs every run's metrics.json) and each dataset's overview figure."""
    outputs = ["results/report/index.html"]
    outputs += [f"results/{name}/overview.png" for name in dataset_names()]
    return outputs


def get_dataset(wildcards):
    return study.datasets[wildcards.dataset]


def get_simulation_params(wildcards):
    """The embedded simulator's settings for the dataset, as JSON for the command line."""
    return settings_json(get_dataset(wildcards)["source"]["embedded"])


def get_fetch_files(wildcards):
    """The dataset's files (url, sha256, name, extract), as JSON for the command line."""
    return settings_json(get_dataset(wildcards)["source"]["files"])


def get_fetch_limits(wildcards):
    """The config's download and archive limits (`limits:`), as JSON; {} keeps fetch's own."""
    limits = config.get("limits", {})
    return settings_json({key: limits[key] for key in FETCH_LIMITS if key in limits})


def get_dataset_workload(wildcards):
    """The dataset's workload (`bloodflow`, `md` or a plug-in's)."""
    return study.workload(wildcards.dataset)


def get_prepare_params(wildcards):
    return settings_json(get_dataset(wildcards)["prepare"])


def get_model(wildcards):
    return study.models[wildcards.model]


def get_train_settings(wildcards):
    """Architecture and training settings of the model (its config minus `datasets`)."""
    return train_settings(study, wildcards.model)


def get_train_params(wildcards):
    """Architecture and training settings of the model, as JSON for the command line."""
    return settings_json(get_train_settings(wildcards))


def get_evaluate_params(wildcards):
    return settings_json(config["evaluate"])


def run_of(wildcards):
    """The run a job's wildcards name (the FP32 rule's target/method/precision are literal)."""
    return Run(
        wildcards.dataset,
        wildcards.model,
        int(wildcards.seed),
        wildcards.get("target", "reference"),
        wildcards.get("method", "none"),
        wildcards.get("precision", "fp32"),
    )


def get_run_coordinates(wildcards):
    """The run's coordinates and provenance (the study's name, the hashes of the config
    sections it depends on), as JSON for the command line."""
    return settings_json(run_coordinates(study, run_of(wildcards)))


def get_quantize_params(wildcards):
    """The quantize section and the model's settings (QAT reuses its training), as JSON."""
    return settings_json(quantize_params(study, wildcards.model))


def get_quantize_section(wildcards):
    """The config's quantize section without its sweeps (`quantize_settings`), as JSON for the
    command line."""
    return settings_json(quantize_settings(config))


def get_quantize_inputs(wildcards):
    """The FP32 checkpoint, plus the sensitivity recommendation for the `mixed` run."""
    return quantize_inputs(run_of(wildcards))


def get_recommendation_argument(wildcards, input):
    """`--recommendation FILE` for the mixed-precision run, else nothing."""
    return (
        f"--recommendation {input.recommendation}"
        if "recommendation" in input.keys()
        else ""
    )


def get_run_artifacts(wildcards):
    """The run's checkpoint (FP32, or quantized.pt of a calibrated method), plus model.onnx
    for ONNX Runtime runs (a dynamic method's only artifact)."""
    return run_artifacts(study, run_of(wildcards))


def timed_threads(wildcards):
    """Cores a job holds: a timed evaluation holds every local core, so that no other job of
    this workflow shares its CPU while it is timed (its runtime still uses `threads` from the
    config, `params.threads`); on a cluster (Slurm) the job's own allocation isolates it.
    """
    if workflow.local_exec and is_timed(study, run_of(wildcards)):
        try:
            return max(config["threads"], workflow.cores)
        except WorkflowError:  # no --cores given (a dry run)
            return config["threads"]
    return config["threads"]


def get_keras_artifacts(wildcards):
    """A Keras run's input: the FP32 model.keras, or the run's quantization.json."""
    return keras_artifacts(study, run_of(wildcards))


def get_evaluation_plan(wildcards):
    """What the run's evaluation runs (`Study.evaluation`: artifacts, runtime, simulated,
    paired baseline, device, workload), as JSON for `sciquant evaluate --plan`."""
    return settings_json(study.evaluation(run_of(wildcards)).to_json())


def job_subject(stage, wildcards):
    """What a stage's job is for, as `Study.resources` takes it: the training of a train job,
    the run of an evaluation, nothing for the jobs that always run on `cpu`."""
    if stage == "train":
        return Training(wildcards.dataset, wildcards.model, int(wildcards.seed))
    if stage == "evaluate":
        return run_of(wildcards)
    return None


def resources_of(stage, node=None):
    """A stage's resources, per job (`Study.resources`, the same `sciquant submit` asks for):
    its node type's scheduler settings, and `mem_mb` / `runtime` that grow with the attempt, so
    `--retries` asks for more each time. `node`: a fixed node type (a batch's); its scheduler
    settings are then plain values (Snakemake inspects every callable resource of every job,
    which for a thousand batch jobs took seconds of a dry run)."""

    def first(wildcards):
        if node is not None:
            return stage_resources(config, stage, node)
        return study.resources(stage, job_subject(stage, wildcards))

    def scaled(key):
        return lambda wildcards, attempt: first(wildcards)[key] * attempt

    def plain(key):
        if node is not None:
            return stage_resources(config, stage, node)[key]
        return lambda wildcards: first(wildcards)[key]

    return {
        key: scaled(key) if key in ("mem_mb", "runtime") else plain(key)
        for key in stage_resources(config, stage, CPU_NODE)
    }


def get_all_metrics():
    """Every run's metrics.json (what the cube's job aggregates)."""
    return [f"{run.folder}/metrics.json" for run in study.runs()]


def get_aggregate_inputs():
    """What the cube's job waits for: every run's metrics.json, or with batched runs every
    batch job's manifest (written once its runs are done), one input per batch instead of one
    per run, which keeps the DAG of a study of thousands of runs quick to build. Where a
    batch's manifest exists, also those of its runs' metrics.json that do not (a run added to
    the batch, or a file deleted): Snakemake reruns a job for a missing output only when some
    job asks for that output."""
    if not BATCHES:
        return get_all_metrics()
    inputs = []
    for batch in BATCHES:
        for seed in config["seeds"]:
            inputs.append(batch.manifest(seed))
            if os.path.exists(inputs[-1]):
                metrics = [f"{run.folder}/metrics.json" for run in batch.runs(seed)]
                inputs += [path for path in metrics if not os.path.exists(path)]
    return inputs


def get_report_figures():
    """Rollout figures of the first seed's FP32 reference run of each dataset × model."""
    first_seed = min(config["seeds"])
    fields = {"bloodflow": ("pressure", "flowrate"), "md": ("confusion",)}
    return [
        f"{run.folder}/{field}.png"
        for run in study.runs()
        if (run.seed, run.target, run.method, run.precision)
        == (first_seed, "reference", "none", "fp32")
        for field in fields.get(study.workload(run.dataset), ())
    ]


def get_sensitivity_tables():
    """Every training's per-layer sensitivity table (empty without a sensitivity analysis)."""
    return [
        f"{t.folder.rsplit('/', 1)[0]}/sensitivity/sensitivity.csv"
        for t in study.trainings()
        if study.has_sensitivity(t.model)
    ]


def get_study_info():
    """The study's name and config hash, as JSON for the command line (cube attributes)."""
    return settings_json({"study": config["study"], "config_hash": study.config_hash()})


def get_report_budget():
    """The error budget of "what to deploy" (JSON; null: the package's default budget)."""
    return settings_json(config.get("report", {}).get("budget"))
