"""`sciquant submit`: run workflow stages as submitit job arrays (Slurm, or local processes).

Every job runs the `sciquant` command of its stage (`run_stage`, a child of the job) with the
same arguments as the stage's rule (both take them from `sciquant.study`: settings, inputs,
runtime flags, `--device`), in the working directory, so the same files appear under
`resources/` and `results/`. Every stage of the rules is here: synthesize / fetch, prepare,
train, sensitivity (the mixed-precision run's recommendation), quantize (calibration and QAT,
dynamic quantization, Keras conversion), export (ONNX of the FP32 model and of quantized models)
and evaluate. A stage's jobs are what the selected runs' evaluations need, as Snakemake would
find them. One job array per stage and node type; with `--stage all` (or several stages) the
stages run in dependency order, each waiting for the previous one. Slurm resources come from
the config's `nodes:` mapping (partition, constraint, GPUs), command-line options override them;
a job on a GPU node type (training on `train.node`, evaluation on its target's node) uses the
GPU, as under Snakemake.

    sciquant submit --config workflow/config/ci.yaml --stage all --runs seed=0
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sciquant.errors import SciquantError
from sciquant.quant.targets import TARGETS, fp32_target
from sciquant.study import (
    CALIBRATED_METHODS,
    Run,
    Study,
    Training,
    check_node,
    check_one_line,
    fp32_of_target,
    load_config,
    quantize_inputs,
    quantize_params,
    quantize_settings,
    run_coordinates,
    sensitivity_folder,
    slurm_extra_options,
    stage_resources,
    train_node,
    train_settings,
    training_of,
)
from sciquant.study import settings_json as _json
from sciquant.vocabulary import COORDINATES, CPU_NODE

#: Stages in dependency order (`fetch` is the raw stage of datasets with a `files` source).
STAGES = (
    "synthesize", "fetch", "prepare", "train", "sensitivity", "quantize", "export", "evaluate",
)  # fmt: skip
# ------------------------------------------------------------------ the stage function (in the job)


def run_stage(argv: list[str]) -> None:
    """Run one stage exactly as its rule does: the `sciquant` command with these arguments
    (which picks the workload's code), as a child of the job's process with this Python, its
    output in the job's log; SciquantError if it fails."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sciquant.cli", *argv], check=False)
    if result.returncode != 0:
        raise SciquantError(
            f"sciquant {' '.join(argv[:2])} failed (exit status {result.returncode}); its "
            "message is above"
        )


@dataclass
class Task:
    """One job: a stage function, its keyword arguments, where it runs (folder, node type)."""

    stage: str
    label: str
    node: str
    function: Callable[..., None]
    kwargs: dict[str, Any]
    workdir: str = "."

    def __call__(self) -> str:
        os.chdir(self.workdir)  # relative paths, exactly as the rules give them
        self.function(**self.kwargs)
        return self.label


def _execute(task: Task) -> str:
    return task()


# ------------------------------------------------------------------ the study → tasks


def select_runs(study: Study, filters: list[str]) -> list[Run]:
    """The study's runs whose coordinates match every `key=value` filter (`key=a,b`: either).

    `target=X` also takes the FP32 run X shares with another target (`fp32_target`:
    `target=openvino-avx2` takes `openvino-cpu/none/fp32`, its speed-up and budget base)."""
    wanted: dict[str, set[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in COORDINATES:
            raise SciquantError(
                f"--runs {item!r}: give key=value with key one of {', '.join(COORDINATES)}"
            )
        wanted[key] = set(value.split(","))
    shared_fp32 = {fp32_target(t) for t in wanted.get("target", ()) if t in TARGETS}

    def matches(run: Run, key: str, values: set[str]) -> bool:
        if str(getattr(run, key)) in values:
            return True
        shared = (run.method, run.precision) == ("none", "fp32") and run.target in shared_fp32
        return key == "target" and shared

    runs = [
        run
        for run in study.runs()
        if all(matches(run, key, values) for key, values in wanted.items())
    ]
    if not runs:
        raise SciquantError(f"--runs {' '.join(filters)}: no run of the study matches")
    return runs


def stage_tasks(stage: str, study: Study, runs: list[Run], workdir: str) -> list[Task]:
    """The jobs of one stage for the selected runs (the rules' inputs, outputs and params)."""
    return [
        Task(stage, label, node, run_stage, {"argv": argv}, workdir)
        for label, node, argv in stage_commands(stage, study, runs)
    ]


def stage_commands(stage: str, study: Study, runs: list[Run]) -> list[tuple[str, str, list[str]]]:
    """(label, node type, `sciquant` arguments) of each job of a stage for the selected runs:
    the command its rule runs, with the same arguments (`sciquant.study`'s stage arguments)."""
    config = study.config
    threads = str(config["threads"])
    datasets = sorted({run.dataset for run in runs})
    raw = "resources/{}/raw".format
    prepared = "results/{}/prepared".format
    commands: list[tuple[str, str, list[str]]] = []
    if stage in ("synthesize", "fetch"):
        kind = "embedded" if stage == "synthesize" else "files"
        for name in datasets:
            source = study.datasets[name]["source"]
            if kind == "embedded" and kind in source:
                argv = ["synthesize", study.workload(name), "--settings", _json(source[kind])]
            elif kind in source:
                argv = ["fetch", "--files", _json(source[kind])]
            else:
                continue
            argv += ["--out", raw(name)]
            commands.append((name, CPU_NODE, argv))
    elif stage == "prepare":
        for name in datasets:
            argv = [
                "prepare", study.workload(name), "--raw", raw(name),
                "--settings", _json(study.datasets[name]["prepare"]), "--out", prepared(name),
            ]  # fmt: skip
            commands.append((name, CPU_NODE, argv))
    elif stage == "train":
        for training in sorted({training_of(run) for run in runs}, key=_training_key):
            argv = [
                "train", "--prepared", prepared(training.dataset),
                "--settings", _json(train_settings(study, training.model)),
                "--seed", str(training.seed), "--threads", threads, "--out", training.folder,
            ]  # fmt: skip
            label = training.folder.removeprefix("results/").removesuffix("/fp32")
            commands.append((label, train_node(study, training.model), argv))
    elif stage == "sensitivity":
        for training in needed_jobs(study, runs)["sensitivity"]:
            argv = [
                "sensitivity", "--checkpoint", f"{training.folder}/checkpoint.pt",
                "--prepared", prepared(training.dataset),
                "--settings", _json(quantize_settings(config)), "--threads", threads,
                "--out", sensitivity_folder(training),
            ]  # fmt: skip
            commands.append((sensitivity_folder(training).removeprefix("results/"), CPU_NODE, argv))
    elif stage == "quantize":
        for run in needed_jobs(study, runs)["quantize"]:
            commands.append((_label(run), CPU_NODE, quantize_command(study, run)))
    elif stage == "export":
        for run in needed_jobs(study, runs)["export"]:
            training = training_of(run).folder
            if run.method in CALIBRATED_METHODS:  # the QDQ graph with the run's own scales
                argv = [
                    "export", "--checkpoint", f"{run.folder}/quantized.pt",
                    "--prepared", prepared(run.dataset), "--out", f"{run.folder}/model.onnx",
                ]  # fmt: skip
            else:  # the target's FP32 export (its float runs build from it)
                argv = [
                    "export", "--checkpoint", f"{training}/checkpoint.pt",
                    "--out", f"{run.folder}/model.onnx",
                ]  # fmt: skip
            if study.is_plugin(run.model):  # its workload exports it, tracing a test sample
                argv[-2:-2] = ["--workload", study.workload(run.dataset)]
                if "--prepared" not in argv:
                    argv[-2:-2] = ["--prepared", prepared(run.dataset)]
            commands.append((f"{_label(run)}/model.onnx", CPU_NODE, argv))
    elif stage == "evaluate":
        for run in runs:
            argv = [
                "evaluate", "--plan", _json(study.evaluation(run).to_json()),
                "--prepared", prepared(run.dataset), "--settings", _json(config["evaluate"]),
                "--coordinates", _json(run_coordinates(study, run)),
                "--threads", threads, "--out", run.folder,
            ]  # fmt: skip
            commands.append((_label(run), study.node(run), argv))
    return commands


def quantize_command(study: Study, run: Run) -> list[str]:
    """`sciquant quantize` of a run: calibration / QAT (quantized.pt), dynamic quantization
    (model.onnx) or a Keras model's conversion (quantization.json), as the run's rule runs it."""
    common = [
        "--prepared", f"results/{run.dataset}/prepared", "--target", run.target,
        "--method", run.method, "--precision", run.precision,
    ]  # fmt: skip
    threads = ["--threads", str(study.config["threads"])]
    seed = ["--seed", str(run.seed)]
    settings = ["--settings", _json(quantize_params(study, run.model))]
    training = training_of(run).folder
    if study.framework(run.model) == "keras":
        checkpoint = ["--checkpoint", f"{training}/model.keras"]
        return ["quantize", *checkpoint, *common, *settings, *seed, *threads, "--out", run.folder]
    inputs = quantize_inputs(run)
    checkpoint = ["--checkpoint", inputs["checkpoint"]]
    if run.method not in CALIBRATED_METHODS:  # dynamic: no calibration, no settings
        return ["quantize", *checkpoint, *common, *threads, "--out", run.folder]
    recommendation = (
        ["--recommendation", inputs["recommendation"]] if "recommendation" in inputs else []
    )
    return [
        "quantize", *checkpoint, *common, *settings, *seed, *threads, *recommendation,
        "--out", run.folder,
    ]  # fmt: skip


def needed_jobs(study: Study, runs: list[Run]) -> dict[str, list[Any]]:
    """The sensitivity, quantize and export jobs the runs' evaluations need, found from the
    files they read as Snakemake finds them from the rules' outputs: a run's `quantized.pt`
    (rule quantize) or `quantization.json` (quantize_keras); `model.onnx` of a calibrated run
    (export_onnx, after its quantize), of a dynamic one (quantize_dynamic) or of a target's FP32
    run (export_fp32_onnx); and the sensitivity recommendation of a `mixed` run."""
    quantize: dict[Run, None] = {}
    export: dict[Run, None] = {}
    sensitivity: dict[Training, None] = {}
    owners = {run.folder: run for run in runs}
    owners.update({fp32_of_target(run).folder: fp32_of_target(run) for run in runs})

    def need(path: str) -> None:
        folder, _, name = path.rpartition("/")
        owner = owners.get(folder)
        if owner is None:  # the training's checkpoint.pt / model.keras: the train stage
            return
        if name in ("quantized.pt", "quantization.json"):
            quantize[owner] = None
        elif name == "model.onnx" and owner.method in CALIBRATED_METHODS:
            need(f"{folder}/quantized.pt")
            export[owner] = None
        elif name == "model.onnx" and owner.method != "none":  # a dynamic method's model
            quantize[owner] = None
        elif name == "model.onnx":
            export[owner] = None

    for run in runs:
        for path in study.artifacts(run).values():
            need(path)
    for run in quantize:
        if study.framework(run.model) == "torch" and "recommendation" in quantize_inputs(run):
            sensitivity[training_of(run)] = None
    return {
        "sensitivity": sorted(sensitivity, key=_training_key),
        "quantize": sorted(quantize),
        "export": sorted(export),
    }


def _training_key(training: Training) -> tuple[str, str, int]:
    return (training.dataset, training.model, training.seed)


def _label(run: Run) -> str:
    return run.folder.removeprefix("results/")


# ------------------------------------------------------------------ submission


def executor_parameters(
    config: dict[str, Any], stage: str, node: str, args: argparse.Namespace
) -> dict[str, Any]:
    """submitit parameters of a node type: the config's `nodes` entry, then the CLI overrides.

    submitit writes them as `#SBATCH` lines of the job script, so every text is checked to be
    one line and `slurm_extra` to be sbatch options (`check_node`), also where the config did
    not come through `load_config`.
    """
    spec = config["nodes"].get(node, {})
    check_node(node, spec)
    for option in ("partition", "constraint", "account"):
        if getattr(args, option):
            check_one_line(f"sciquant submit --{option}", getattr(args, option))
    first = stage_resources(config, stage, node)  # as the stage's rules ask for
    extra = {}
    if args.constraint or spec.get("constraint"):
        extra["constraint"] = args.constraint or spec["constraint"]
    if spec.get("gres"):
        extra["gres"] = spec["gres"]
    elif spec.get("gpu"):
        model = f"{spec['gpu_model']}:" if spec.get("gpu_model") else ""
        extra["gres"] = f"gpu:{model}{spec['gpu']}"
    for key, value in slurm_extra_options(node, spec.get("slurm_extra", "")):
        extra[key] = value or True
    params = {
        "name": f"sciquant-{stage}",
        "timeout_min": args.timeout_min or first["runtime"],
        "mem_gb": args.mem_gb or first["mem_mb"] / 1000,
        "cpus_per_task": args.cpus or first.get("cpus_per_task", config["threads"]),
        "slurm_array_parallelism": args.array_parallelism,
        "slurm_additional_parameters": extra,
    }
    partition = args.partition or spec.get("slurm_partition")
    if partition:
        params["slurm_partition"] = partition
    if args.account:
        params["slurm_account"] = args.account
    return params


def make_executor(args: argparse.Namespace, folder: Path) -> Any:
    import submitit

    cluster = None if args.executor == "auto" else args.executor
    try:
        return submitit.AutoExecutor(folder=folder, cluster=cluster)
    except (RuntimeError, ValueError) as error:
        raise SciquantError(f"--executor {args.executor}: {error}") from error


def submit_stage(tasks: list[Task], config: dict[str, Any], args: argparse.Namespace) -> None:
    """Submit one stage's tasks (one array per node type) and wait; raise if any job failed."""
    import submitit

    folder = Path(args.workdir, args.folder)
    jobs = []
    for node in sorted({task.node for task in tasks}):
        group = [task for task in tasks if task.node == node]
        executor = make_executor(args, folder)
        params = executor_parameters(config, group[0].stage, node, args)
        if executor.cluster != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**params)
        submitted = executor.map_array(_execute, group)
        where = params.get("slurm_partition", executor.cluster)
        print(
            f"{group[0].stage}: {len(group)} job(s) on {node} ({where}): "
            f"{submitted[0].job_id.split('_')[0]}",
            flush=True,
        )
        jobs += zip(submitted, group, strict=True)
    failures = []
    for job in submitit.helpers.as_completed([job for job, _ in jobs], poll_frequency=1):
        task = next(task for j, task in jobs if j is job)
        error = job.exception()
        status = "done" if error is None else f"FAILED (stderr: {job.paths.stderr})"
        print(f"  {task.stage} {task.label} [{job.job_id}]: {status}", flush=True)
        if error is not None:
            failures.append(f"{task.stage} {task.label} (job {job.job_id}): see {job.paths.stderr}")
    if failures:
        raise SciquantError(f"{len(failures)} job(s) failed:\n  " + "\n  ".join(failures))


def run_submit(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    study = Study(config)
    runs = select_runs(study, args.runs)
    stages = STAGES if "all" in args.stage else [s for s in STAGES if s in args.stage]
    workdir = str(Path(args.workdir).resolve())
    print(f"{args.config}: {len(runs)} run(s); stages {', '.join(stages)}; workdir {workdir}")
    for stage in stages:
        tasks = stage_tasks(stage, study, runs, workdir)
        if not tasks:
            continue
        started = time.monotonic()
        submit_stage(tasks, config, args)
        print(f"{stage}: {len(tasks)} job(s) finished in {time.monotonic() - started:.0f} s")


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "submit",
        help="run stages of a study as submitit job arrays (Slurm or local)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", type=Path, required=True, help="study config (YAML)")
    add(
        "--stage",
        nargs="+",
        default=["all"],
        choices=[*STAGES, "all"],
        help="stage(s) to run, in dependency order (default: all)",
    )
    add(
        "--runs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"only runs whose coordinates match ({', '.join(COORDINATES)}), e.g. seed=0 "
        "precision=fp32,w8a8 (a comma: any of the values; target=X also takes the FP32 run "
        "X shares, as openvino-avx2 openvino-cpu's); the stages run what their evaluations "
        "need",
    )
    add(
        "--executor",
        choices=["auto", "slurm", "local"],
        default="auto",
        help="where jobs run (auto: Slurm when sbatch is available, else local processes)",
    )
    add("--folder", default="logs/submitit/%j", help="submitit logs, relative to --workdir")
    add("--partition", help="Slurm partition (default: from the config's `nodes`)")
    add("--constraint", help="Slurm constraint (default: from the config's `nodes`)")
    add("--account", help="Slurm account (default: the user's default account)")
    add("--array-parallelism", type=int, default=64, help="jobs of an array running at once")
    add("--timeout-min", type=int, help="time limit per job (default: the stage's runtime)")
    add("--mem-gb", type=float, help="memory per job (default: the stage's mem_mb)")
    add("--cpus", type=int, help="CPUs per job (default: the config's threads)")
    add("--workdir", type=Path, default=Path("."), help="where resources/ and results/ go")
    return parser
