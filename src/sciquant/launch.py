"""`sciquant submit`: run workflow stages as submitit job arrays (Slurm, or local processes).

Every job runs the `sciquant` command of its stage (`run_stage`, in the job's process) with the
same arguments as the stage's rule, in the working directory, so the same files appear under
`resources/` and `results/`. One job array per stage and node type; with `--stage all` (or
several stages) the stages run in dependency order, each waiting for the previous one. Slurm
resources come from the config's `nodes:` mapping (partition, constraint, GPUs), command-line
options override them.

    sciquant submit --config workflow/config/ci.yaml --stage all --runs seed=0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sciquant.errors import SciquantError
from sciquant.study import (
    Run,
    Study,
    Training,
    check_node,
    check_one_line,
    load_config,
    slurm_extra_options,
)

#: Stages in dependency order (`fetch` is the raw stage of datasets with a `files` source).
STAGES = ("synthesize", "fetch", "prepare", "train", "evaluate")
COORDINATES = ("dataset", "model", "seed", "target", "method", "precision")
#: First-attempt (mem_mb, runtime in minutes) of each stage, as in its rule, unless `nodes` says.
STAGE_RESOURCES = {
    "synthesize": (2000, 30),
    "fetch": (1000, 120),
    "prepare": (4000, 30),
    "train": (4000, 120),
    "evaluate": (4000, 60),
}


# ------------------------------------------------------------------ the stage function (in the job)


def run_stage(argv: list[str]) -> None:
    """Run one stage exactly as its rule does: the `sciquant` command with these arguments
    (which picks the workload's code), in this process; SciquantError if it fails."""
    from sciquant.cli import main

    if main(argv) != 0:
        raise SciquantError(f"sciquant {' '.join(argv[:2])} failed; its message is above")


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
    """The study's runs whose coordinates match every `key=value` filter."""
    wanted: dict[str, str] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in COORDINATES:
            raise SciquantError(
                f"--runs {item!r}: give key=value with key one of {', '.join(COORDINATES)}"
            )
        wanted[key] = value
    runs = [
        run
        for run in study.runs()
        if all(str(getattr(run, key)) == value for key, value in wanted.items())
    ]
    if not runs:
        raise SciquantError(f"--runs {' '.join(filters)}: no run of the study matches")
    return runs


def stage_tasks(stage: str, study: Study, runs: list[Run], workdir: str) -> list[Task]:
    """The jobs of one stage for the selected runs (the rules' inputs, outputs and params)."""
    config = study.config
    datasets = sorted({run.dataset for run in runs})
    raw = "resources/{}/raw".format
    prepared = "results/{}/prepared".format
    tasks = []
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
            tasks.append(Task(stage, name, "cpu", run_stage, {"argv": argv}, workdir))
    elif stage == "prepare":
        for name in datasets:
            argv = [
                "prepare", study.workload(name), "--raw", raw(name),
                "--settings", _json(study.datasets[name]["prepare"]), "--out", prepared(name),
            ]  # fmt: skip
            tasks.append(Task(stage, name, "cpu", run_stage, {"argv": argv}, workdir))
    elif stage == "train":
        for dataset, model, seed in sorted({(r.dataset, r.model, r.seed) for r in runs}):
            spec = study.models[model]
            settings = {key: value for key, value in spec.items() if key != "datasets"}
            argv = [
                "train", "--prepared", prepared(dataset), "--settings", _json(settings),
                "--seed", str(seed), "--threads", str(config["threads"]),
                "--out", Training(dataset, model, seed).folder,
            ]  # fmt: skip
            label = f"{dataset}/{model}/seed{seed}"
            node = spec["train"]["node"]
            tasks.append(Task(stage, label, node, run_stage, {"argv": argv}, workdir))
    elif stage == "evaluate":
        fp32 = [
            r for r in runs if (r.target, r.method, r.precision) == ("reference", "none", "fp32")
        ]
        if len(fp32) < len(runs):
            print(
                f"evaluate: skipping {len(runs) - len(fp32)} run(s) other than the FP32 "
                "reference: quantization stages are not in `submit` yet (use Snakemake)"
            )
        for run in fp32:
            coordinates = {
                "study": config["study"],
                "config_hash": study.config_hash(),
                **run.coordinates(),
            }
            artifact = "model.keras" if study.framework(run.model) == "keras" else "checkpoint.pt"
            argv = [
                "evaluate",
                "--checkpoint", f"{Training(run.dataset, run.model, run.seed).folder}/{artifact}",
                "--prepared", prepared(run.dataset), "--settings", _json(config["evaluate"]),
                "--coordinates", _json(coordinates), "--threads", str(config["threads"]),
                "--out", run.folder,
            ]  # fmt: skip
            label = run.folder.removeprefix("results/")
            tasks.append(Task(stage, label, study.node(run), run_stage, {"argv": argv}, workdir))
    return tasks


def _json(value: Any) -> str:
    return json.dumps(value)


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
    mem_mb, runtime = STAGE_RESOURCES[stage]
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
        "timeout_min": args.timeout_min or spec.get("runtime", runtime),
        "mem_gb": args.mem_gb or spec.get("mem_mb", mem_mb) / 1000,
        "cpus_per_task": args.cpus or spec.get("cpus_per_task", config["threads"]),
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
        help=f"only runs whose coordinates match ({', '.join(COORDINATES)}), e.g. seed=0",
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
