"""Batched runs: one job quantizes, exports and evaluates several runs of one FP32 training.

A study of thousands of runs would be two or three Snakemake jobs per run (quantize, export,
evaluate): tens of thousands of Slurm jobs, more than a site lets one user submit, and a DAG that
takes half a minute to build. Batching puts the runs of one training (dataset, model, seed) that
run on one node type into jobs of `batch.size` runs each, in study order, the timed runs (on a
real runtime) in batches of their own: run locally, a batch that times a run holds every core,
as a timed evaluation does, and the simulated runs kept out of it run beside other jobs. Every
run's files stay outputs of its batch's job one by one (its `metrics.json` among them), so a
rerun sees exactly which runs exist and redoes a batch one of whose files is gone. The job
writes a manifest last (`Batch.manifest`: its runs and their metrics.json's SHA-256), and the
cube's job waits for the manifests, one per batch, instead of every metrics.json (and for the
metrics.json missing from a batch whose manifest exists: `get_aggregate_inputs` in
`rules/common.smk`): Snakemake matches each input of a job to the rule that makes it, and for
10,000 runs that matching was a third of a dry run's time.

`batch.size` left out (null) picks itself: 1, the per-run jobs of the rules, while the study's
jobs fit in `batch.max_jobs`; otherwise the smallest size that keeps the study at or under it.

A batch job (`sciquant run-batch`) runs each run's stages in its own process, one after another,
with the same arguments as the per-run rules (`sciquant.launch.stage_commands`), each stage's
output in the run's own log (`logs/<run>/<stage>.log`, as the per-run rules write them). A run
that fails does not stop the others; the job fails at the end and names them.

Recovery. A run is finished when its last stage has written `metrics.json` (atomically). Its
files are then also linked (hard links; copies where the file system has none) under
`results/.finished/<recipe>/`, where `recipe` is a SHA-256 of the run's stage commands and of the
content of every file they read from outside the run. Snakemake deletes the outputs of a failed
job; the rerun of the batch links every run whose recipe is kept back into place instead of
computing it again, and computes only the rest. A changed setting, checkpoint or input changes
the recipe, so nothing stale comes back. A batch that succeeds drops its kept runs. A killed batch
leaves at most one run without its `metrics.json` (its files are deleted before it starts again),
and Snakemake marks the job incomplete, so its rerun redoes exactly that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sciquant.errors import SciquantError
from sciquant.study import (
    CALIBRATED_METHODS,
    Run,
    Study,
    architecture_workloads,
    evaluation_inputs,
    is_timed,
    quantize_inputs,
    training_of,
)

#: Where finished runs of a batch wait (hard links) until the batch succeeds.
FINISHED = Path("results/.finished")
#: Figures `sciquant evaluate` writes beside metrics.json, by workload.
FIGURES = {"bloodflow": ("pressure.png", "flowrate.png"), "md": ("confusion.png",)}


@dataclass(frozen=True)
class Step:
    """One stage of a run: its `sciquant` arguments, the files it writes, its log."""

    stage: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    log: str


#: The seed of a batch rule's file patterns (a Snakemake wildcard).
SEED = "{seed}"
#: Where batch jobs write their manifests (`Batch.manifest`).
MANIFESTS = "results/.batches"
#: Where a batch job finds the study config (`sciquant run-batch` without `--config`): the
#: workflow sets it as it is read (`rules/batch.smk`), so that the config is no param of a batch
#: rule, which would rerun every batch on any change to the config.
STUDY_CONFIG_ENV = "SCIQUANT_STUDY_CONFIG"


@dataclass(frozen=True)
class Batch:
    """Runs of one training, on one node type, that one job runs one after another.

    A batch is the same for every seed of its dataset and model (their sweeps are), so it is
    given by its runs' targets, methods and precisions; `runs(seed)` are those of one training,
    `runs(SEED)` the pattern of its Snakemake rule.
    """

    dataset: str
    model: str
    node: str
    index: int
    combos: tuple[tuple[str, str, str], ...]

    def runs(self, seed: int | str) -> list[Run]:
        return [Run(self.dataset, self.model, seed, *combo) for combo in self.combos]  # type: ignore[arg-type]

    @property
    def rule(self) -> str:
        """The Snakemake rule of the batch (its jobs: one per seed)."""
        return f"batch_{self.dataset}_{self.model}_{self.node}_{self.index:04d}"

    def log(self, seed: int | str) -> str:
        return (
            f"logs/batches/{self.dataset}/{self.model}/seed{seed}/{self.node}/{self.index:04d}.log"
        )

    def manifest(self, seed: int | str) -> str:
        """The file a batch job writes last, once every run of it is done (`write_batch_manifest`):
        what the cube's job reads instead of every run's metrics.json, so that Snakemake
        matches one input per batch to its producer, not one per run."""
        return MANIFESTS + (
            f"/{self.dataset}/{self.model}/seed{seed}/{self.node}/{self.index:04d}.json"
        )


# ------------------------------------------------------------------ the study → batches


def settings(study: Study) -> dict[str, Any]:
    """The config's `batch` section with its defaults (the schema's)."""
    section = dict(study.config.get("batch") or {})
    section.setdefault("size", None)
    section.setdefault("max_jobs", 1000)
    section.setdefault("minutes_per_run", 15)
    return section


def fixed_jobs(study: Study) -> int:
    """Jobs that batching leaves as they are: per dataset its raw data, prepare and overview;
    per training its training and sensitivity analysis; the cube, the report and `all`."""
    jobs = 3 * len(study.datasets) + 3
    for training in study.trainings():
        jobs += 1 + int(study.has_sensitivity(training.model))
    return jobs


def per_run_jobs(study: Study) -> int:
    """Jobs of the runs without batching: each run's quantize, export and evaluate jobs."""
    from sciquant.launch import needed_jobs

    runs = study.runs()
    needed = needed_jobs(study, runs)
    return len(runs) + len(needed["quantize"]) + len(needed["export"])


def groups(study: Study) -> dict[tuple[str, str, str], list[tuple[str, str, str]]]:
    """(target, method, precision) of the runs of each dataset, model and node type (the same
    for every seed), in study order."""
    first = min(study.config["seeds"])
    grouped: dict[tuple[str, str, str], list[tuple[str, str, str]]] = {}
    for run in study.runs():
        if run.seed == first:
            key = (run.dataset, run.model, study.node(run))
            grouped.setdefault(key, []).append((run.target, run.method, run.precision))
    return grouped


def parts(study: Study) -> dict[tuple[str, str, str], list[list[tuple[str, str, str]]]]:
    """Each group's runs as batches take them: its simulated runs, then its timed ones, each in
    study order (batches of one part never hold runs of the other).

    A batch that times a run holds every local core for all its runs (`rules/batch.smk`), as a
    timed evaluation does; simulated runs kept apart run beside other jobs. Where a run reads a
    run of the other kind (none does today: a target's FP32 export is read by runs on the same
    runtime), the group stays one part, so that no two batches read each other's files."""
    first = min(study.config["seeds"])
    split = {}
    for (dataset, model, node), combos in groups(study).items():
        runs = [Run(dataset, model, first, *combo) for combo in combos]
        timed = {run.folder: is_timed(study, run) for run in runs}
        crossing = any(
            timed.get(path.rpartition("/")[0], timed[run.folder]) != timed[run.folder]
            for run in runs
            for path in evaluation_inputs(study, run).values()
        )
        if crossing:
            split[(dataset, model, node)] = [combos]
            continue
        chosen = [
            [combo for combo, run in zip(combos, runs, strict=True) if timed[run.folder] is kind]
            for kind in (False, True)
        ]
        split[(dataset, model, node)] = [part for part in chosen if part]
    return split


def batch_size(study: Study) -> int:
    """Runs per batch: `batch.size`, or the smallest that keeps the jobs ≤ `batch.max_jobs`
    (1 = per-run jobs); SciquantError naming `batch.max_jobs` when no size can."""
    chosen = settings(study)
    if chosen["size"] is not None:
        return int(chosen["size"])
    cap = int(chosen["max_jobs"])
    fixed = fixed_jobs(study)
    if fixed + per_run_jobs(study) <= cap:
        return 1
    seeds = len(study.config["seeds"])
    sizes = [len(part) for split in parts(study).values() for part in split]
    if fixed + seeds * len(sizes) > cap:
        raise SciquantError(
            f"config key batch.max_jobs: the study needs at least {fixed + seeds * len(sizes)} "
            f"jobs ({fixed} for data, trainings and the report, and a batch per training, node "
            f"type and kind of run: simulated or timed), more than {cap}; raise batch.max_jobs "
            "or split the study"
        )
    low, high = 2, max(sizes)
    while low < high:  # the job count falls as the size grows
        middle = (low + high) // 2
        if fixed + seeds * sum(math.ceil(n / middle) for n in sizes) <= cap:
            high = middle
        else:
            low = middle + 1
    return low


def plan(study: Study) -> list[Batch]:
    """The study's batches; none when the size is 1 (the per-run rules run every run)."""
    size = batch_size(study)
    if size <= 1:
        return []
    batches = []
    for (dataset, model, node), split in parts(study).items():
        chunks = [
            part[start : start + size] for part in split for start in range(0, len(part), size)
        ]
        for index, chunk in enumerate(chunks):
            batches.append(Batch(dataset, model, node, index, tuple(chunk)))
    return batches


def job_count(study: Study) -> int:
    """The jobs of the study (Snakemake's job table, `all` included) at its batch size."""
    batches = plan(study)
    if not batches:
        return fixed_jobs(study) + per_run_jobs(study)
    return fixed_jobs(study) + len(batches) * len(study.config["seeds"])


# ------------------------------------------------------------------ a run's stages and files


def _stages(study: Study, run: Run) -> tuple[bool, bool]:
    """Whether the run has a quantize stage and an export stage of its own (the jobs its
    evaluation needs that write into its folder)."""
    from sciquant.launch import needed_jobs

    needed = needed_jobs(study, [run])
    return run in needed["quantize"], run in needed["export"]


def run_steps(study: Study, run: Run) -> list[Step]:
    """The run's own stages in order, exactly as the per-run rules run them: quantize (or a
    Keras conversion), the ONNX export it needs, evaluate."""
    from sciquant.launch import stage_commands

    quantize, export = _stages(study, run)
    logs = f"logs/{run.folder.removeprefix('results/')}"
    steps = []
    for stage, wanted, outputs in (
        ("quantize", quantize, _quantize_outputs(study, run)),
        ("export", export, (f"{run.folder}/model.onnx",)),
        ("evaluate", True, _evaluate_outputs(study, run)),
    ):
        if wanted:  # the stage's command for this run (not the one of its target's FP32)
            (argv,) = [
                argv
                for label, _, argv in stage_commands(stage, study, [run])
                if f"results/{label}".startswith(run.folder)
            ]
            steps.append(Step(stage, tuple(argv), outputs, f"{logs}/{stage}.log"))
    return steps


def _quantize_outputs(study: Study, run: Run) -> tuple[str, ...]:
    if study.framework(run.model) == "keras":
        return (f"{run.folder}/quantization.json",)
    if run.method in CALIBRATED_METHODS:
        return (f"{run.folder}/quantized.pt",)
    return (f"{run.folder}/model.onnx",)  # a dynamic method's model


def _workload(study: Study, run: Run) -> str:
    """The run's workload, from its model's architecture (a pattern's dataset is a wildcard)."""
    return architecture_workloads(study.models[run.model]["architecture"])[0]


def _evaluate_outputs(study: Study, run: Run) -> tuple[str, ...]:
    figures = FIGURES.get(_workload(study, run), ())  # a plug-in's evaluation: metrics.json
    return (f"{run.folder}/metrics.json", *(f"{run.folder}/{name}" for name in figures))


def run_outputs(study: Study, run: Run) -> list[str]:
    """Every file the run's stages write, metrics.json last (deleted first, kept last)."""
    quantize, export = _stages(study, run)
    outputs = list(_quantize_outputs(study, run)) if quantize else []
    if export:
        outputs.append(f"{run.folder}/model.onnx")
    figures, metrics = list(_evaluate_outputs(study, run)[1:]), f"{run.folder}/metrics.json"
    return list(dict.fromkeys([*outputs, *figures, metrics]))


def run_inputs(study: Study, run: Run) -> list[str]:
    """Files the run's stages read that it does not write itself: the prepared data, the FP32
    model, the sensitivity recommendation, its target's FP32 export (another run's)."""
    own = set(run_outputs(study, run))
    paths = [f"results/{run.dataset}/prepared/index.json"]
    if _workload(study, run) == "md":
        paths.append(f"results/{run.dataset}/prepared/pixelmaps.npz")
    training = training_of(run).folder
    paths.append(
        f"{training}/model.keras"
        if study.framework(run.model) == "keras"
        else f"{training}/checkpoint.pt"
    )
    if study.framework(run.model) == "torch" and run.method != "none":
        paths += quantize_inputs(run).values()  # + the mixed run's recommendation
    paths += evaluation_inputs(study, run).values()
    return [p for p in dict.fromkeys(paths) if p not in own]


def batch_files(study: Study, batches: list[Batch]) -> dict[Batch, tuple[list[str], list[str]]]:
    """(inputs, outputs) of each batch's rule, as patterns with `{seed}`.

    Inputs: what its runs read from outside the batch. Outputs: every run's metrics.json, the
    FP32 reference run's figures (the report embeds them), and the files that runs of other
    batches read (a target's FP32 export); a run's other files (quantized.pt, its own
    model.onnx, figures) are written and kept with it, but not declared, which keeps the DAG of
    a study of thousands of runs quick to build.
    """
    reads: dict[Batch, list[str]] = {}
    writes: dict[Batch, set[str]] = {}
    for batch in batches:
        runs = batch.runs(SEED)
        writes[batch] = {path for run in runs for path in run_outputs(study, run)}
        reads[batch] = [
            path for run in runs for path in run_inputs(study, run) if path not in writes[batch]
        ]
    wanted = {path for paths in reads.values() for path in paths}
    files = {}
    for batch in batches:
        outputs = []
        for run in batch.runs(SEED):
            if (run.target, run.method, run.precision) == ("reference", "none", "fp32"):
                outputs += _evaluate_outputs(study, run)[1:]
            outputs += [path for path in run_outputs(study, run) if path in wanted]
            outputs.append(f"{run.folder}/metrics.json")
        files[batch] = (list(dict.fromkeys(reads[batch])), list(dict.fromkeys(outputs)))
    return files


def find_runs(study: Study, names: list[str]) -> list[Run]:
    """The study's runs named by their folders (`results/<dataset>/.../<precision>`)."""
    runs = {run.folder: run for run in study.runs()}
    missing = [name for name in names if name not in runs]
    if missing:
        raise SciquantError(
            f"--runs: {', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} not a run "
            "of this study config (give run folders as results/<dataset>/<model>/seed<s>/"
            "<target>/<method>/<precision>)"
        )
    return [runs[name] for name in names]


def commands_digest(study: Study, batch: Batch) -> str:
    """SHA-256 of every stage command of the batch's runs (`run_steps`, for its seed pattern):
    the batch rule's param, so that its jobs rerun when a command of one of their runs changes
    (a setting, the config hash) and not when the config changes elsewhere."""
    commands = [step.argv for run in batch.runs(SEED) for step in run_steps(study, run)]
    return hashlib.sha256(json.dumps(commands).encode()).hexdigest()


# ------------------------------------------------------------------ running a batch


def recipe(study: Study, run: Run, digests: dict[str, str], steps: list[Step] | None = None) -> str:
    """SHA-256 of the run's stage commands (`steps`, default `run_steps`) and of the content
    of the files it reads."""
    steps = run_steps(study, run) if steps is None else steps
    text = json.dumps(
        {
            "steps": [step.argv for step in steps],
            "inputs": {path: _digest(path, digests) for path in run_inputs(study, run)},
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(path: str, digests: dict[str, str]) -> str:
    if path not in digests:
        file = Path(path)
        if not file.is_file():
            raise SciquantError(
                f"{path}: an input of this batch is missing; run the workflow (snakemake) so that "
                "the stage that writes it runs first"
            )
        sha = hashlib.sha256()
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                sha.update(block)
        digests[path] = sha.hexdigest()
    return digests[path]


def restore(outputs: list[str], kept: Path) -> bool:
    """Link a finished run's kept files back to their places; False if it is not kept whole."""
    if not (kept / "complete").is_file():
        return False
    entries = [kept / str(i) for i in range(len(outputs))]
    if not all(entry.is_file() for entry in entries):
        return False
    for entry, path in zip(entries, outputs, strict=True):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
        _link(entry, Path(path))
    return True


def keep(outputs: list[str], kept: Path) -> None:
    """Link a finished run's files under `kept` (numbered as in `outputs`); a complete entry
    has its `complete` marker, written last."""
    if kept.exists():
        shutil.rmtree(kept)
    staging = kept.with_name(f".{kept.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for i, path in enumerate(outputs):
        _link(Path(path), staging / str(i))
    (staging / "complete").write_text(json.dumps(outputs))
    os.replace(staging, kept)


def _link(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # no hard links here (another file system, or none at all)
        shutil.copy2(source, destination)


@contextlib.contextmanager
def _redirected(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python's and the libraries' own) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _execute(step: Step, stage: Callable[[list[str]], int]) -> int:
    """Run one stage in this process, its output in its log; its exit status (0: done)."""
    with _redirected(Path(step.log)):
        try:
            return stage(list(step.argv))
        except SystemExit as error:  # argparse
            return int(error.code or 0) if isinstance(error.code, int) else 2
        except Exception:  # a bug in a stage: its traceback goes to its log
            import traceback

            traceback.print_exc()
            return 1


def run_batch(
    study: Study,
    runs: list[Run],
    stage: Callable[[list[str]], int],
    progress: Callable[[str], None] = print,
) -> list[tuple[Run, str]]:
    """Run the batch's runs one after another; the (run, log) of each that failed.

    `stage` runs one `sciquant` command in this process and returns its exit status
    (`sciquant.cli.main`, which passes itself in: this module sits below the command line).

    A run whose kept files (`results/.finished/<recipe>`) are whole is linked back instead of
    computed; each computed run's files are kept as soon as it finishes. When every run is done,
    the runs' kept entries are dropped (`drop_kept`).
    """
    digests: dict[str, str] = {}
    failed: list[tuple[Run, str]] = []
    started = time.perf_counter()
    for i, run in enumerate(runs, start=1):
        outputs, steps = run_outputs(study, run), run_steps(study, run)
        try:
            kept = FINISHED / recipe(study, run, digests, steps)
        except SciquantError as error:
            progress(f"[{i}/{len(runs)}] {run.folder}: FAILED: {error}")
            failed.append((run, ""))
            continue
        if restore(outputs, kept):
            progress(f"[{i}/{len(runs)}] {run.folder}: finished before, linked back from {kept}")
            continue
        for path in reversed(outputs):  # metrics.json first: no stale run looks finished
            Path(path).unlink(missing_ok=True)
        run_started = time.perf_counter()
        for step in steps:
            status = _execute(step, stage)
            if status != 0:
                progress(
                    f"[{i}/{len(runs)}] {run.folder}: FAILED in {step.stage} (exit status "
                    f"{status}); see {step.log}"
                )
                failed.append((run, step.log))
                break
            # a stage's outputs come from the files the next one reads: forget stale digests
            for path in step.outputs:
                digests.pop(path, None)
        else:
            missing = [path for path in outputs if not Path(path).is_file()]
            if missing:
                progress(f"[{i}/{len(runs)}] {run.folder}: FAILED: did not write {missing[0]}")
                failed.append((run, steps[-1].log))
                continue
            keep(outputs, kept)
            elapsed = time.perf_counter() - started
            progress(
                f"[{i}/{len(runs)}] {run.folder}: done in {time.perf_counter() - run_started:.1f} s"
                f" (batch {elapsed:.0f} s, about {elapsed / i * (len(runs) - i):.0f} s left)"
            )
    if not failed:
        drop_kept(study, runs)
    return failed


def write_batch_manifest(path: Path, runs: list[Run]) -> Path:
    """The batch's manifest (`Batch.manifest`), once every run of it is done: each run's folder
    and the SHA-256 of its metrics.json, written atomically; SciquantError naming the first run
    without its metrics.json."""
    from sciquant.data.download import sha256_of
    from sciquant.provenance import write_json

    digests = {}
    for run in runs:
        metrics = Path(run.folder) / "metrics.json"
        if not metrics.is_file():
            raise SciquantError(f"{metrics}: missing after its batch; no manifest written")
        digests[run.folder] = sha256_of(metrics)
    return write_json(path, {"runs": digests})


def drop_kept(study: Study, runs: list[Run]) -> None:
    """Remove every kept entry of these runs (under any recipe: stale ones of an earlier
    config too), once their batch has succeeded and Snakemake tracks their files."""
    if not FINISHED.is_dir():
        return
    mine = {f"{run.folder}/metrics.json" for run in runs}
    for entry in FINISHED.iterdir():
        try:
            listed = json.loads((entry / "complete").read_text())
        except (OSError, ValueError):
            continue  # a staging folder of a running batch, or a damaged entry
        if mine.intersection(listed):
            shutil.rmtree(entry, ignore_errors=True)
