"""`sciquant <stage> ...`: one subcommand per workflow stage; every rule calls one of these.

Stages are plain functions in the package; this module only parses arguments and turns a
`SciquantError` (a bad config, a missing or corrupt file) into a one-paragraph message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sciquant.errors import SciquantError
from sciquant.quant.observers import METHODS as QUANTIZATION_METHODS
from sciquant.vocabulary import (
    COORDINATES,
    section_with_defaults,
)


def _is_file(text: str) -> bool:
    """Whether `text` names an existing file (False for text no path can be, e.g. too long)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _json_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = (
            " (this is a file's path: the option takes the JSON text itself, e.g. "
            '"$(cat FILE)" for a JSON file)'
            if _is_file(text)
            else ""
        )
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text[:80]}{hint}") from error


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object argument ({...}); argparse names the option for anything else."""
    value = _json_argument(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object {{...}}, got a {type(value).__name__}: {text[:80]}"
        )
    return value


def _json_objects(text: str) -> list[dict[str, Any]]:
    """A JSON list of objects ([{...}, ...])."""
    value = _json_argument(text)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of objects [{{...}}], got {text[:80]}"
        )
    return value


def _count(text: str, what: str) -> int:
    """A whole number ≥ 1 of `what`, or argparse's error saying so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a {what} count is a whole number ≥ 1, got {text!r}")
    return value


def _threads(text: str) -> int:
    """A positive thread count."""
    return _count(text, "thread")


def _simulations(text: str) -> int:
    """A positive number of simulations to plot."""
    return _count(text, "simulation")


def _missing_coordinates(coordinates: dict[str, Any]) -> list[str]:
    """The run coordinates (`COORDINATES`) a `--coordinates` object leaves out."""
    return [key for key in COORDINATES if key not in coordinates]


def _add_settings(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--settings",
        type=_json_object,
        default={},
        help=f"{what} as JSON (the study config's section; defaults fill what is left out)",
    )


#: What a stage's `workload` argument takes.
WORKLOAD_HELP = "bloodflow, md, or an installed plug-in's (entry point group sciquant.workloads)"


def _add_workload_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        default=None,
        help="the dataset's workload where it is a plug-in's (entry point group "
        "sciquant.workloads); default: the built-in workload the artifact is for",
    )


#: The commands that are a workload's stages (`sciquant.workloads.Workload`).
WORKLOAD_STAGES = ("synthesize", "prepare", "overview", "train", "quantize", "export", "evaluate")


#: `sciquant evaluate`'s flags that a `--plan` holds (and their defaults).
PLAN_FLAGS = {
    "checkpoint": None, "onnx": None, "runtime": None, "simulated": False,
    "baseline_checkpoint": None, "baseline_onnx": None, "device": None, "workload": None,
}  # fmt: skip


def evaluation_plan(args: argparse.Namespace) -> Any:
    """What `sciquant evaluate` runs (`sciquant.plugins.Evaluation`): its `--plan`, as the rules
    and `sciquant submit` pass it, or the plan its flags give by hand."""
    from sciquant.plugins import Evaluation

    given = [name for name, default in PLAN_FLAGS.items() if getattr(args, name) != default]
    if args.plan is not None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise SciquantError(
                f"evaluate: --plan holds what {flags} would say; give either the plan or flags"
            )
        return Evaluation.from_json(args.plan)
    if args.checkpoint is None:
        raise SciquantError("evaluate: give the model to evaluate (--checkpoint) or a --plan")
    return Evaluation(
        artifact=args.checkpoint, onnx=args.onnx,
        runtime=(args.runtime or "onnxruntime") if args.onnx is not None else None,
        simulated=args.simulated, baseline=args.baseline_checkpoint,
        baseline_onnx=args.baseline_onnx, device=args.device or "cpu", workload=args.workload,
    )  # fmt: skip


def _stage_workload(args: argparse.Namespace, plan: Any = None) -> Any:
    """The workload whose stage a command runs: named (`workload`, `--workload`, the evaluation
    `plan`'s), or the one of the model's architecture (train, quantize), or the built-in one of
    the artifact."""
    from sciquant.plugins import architecture_workload, get_workload
    from sciquant.workloads.md import is_keras_artifact

    command = args.command
    if command in ("synthesize", "prepare", "overview"):
        return get_workload(args.workload)
    if command == "evaluate":
        if plan.workload is not None:
            return get_workload(plan.workload)
        return get_workload("md" if is_keras_artifact(plan.artifact) else "bloodflow")
    if command == "export" and args.workload is not None:
        return get_workload(args.workload)
    if command in ("quantize", "export") and is_keras_artifact(args.checkpoint):
        return get_workload("md")
    if command in ("train", "quantize"):
        settings = args.settings.get("model", {}) if command == "quantize" else args.settings
        if "architecture" in settings:
            return architecture_workload(settings["architecture"])
    return get_workload("bloodflow")  # a MeshGraphNet's checkpoint.pt / quantized.pt


def _run_stage(args: argparse.Namespace) -> None:
    """Run a workload's stage with the command's arguments."""
    from sciquant.vocabulary import schema_document

    command = args.command
    plan = evaluation_plan(args) if command == "evaluate" else None
    workload = _stage_workload(args, plan)
    if command == "synthesize":
        from sciquant.data.manifest import write_manifest

        definition = f"{workload.name}_simulation"
        if definition not in schema_document()["$defs"]:
            raise SciquantError(
                f"workload {workload.name} has no embedded data; give its datasets `source.files`"
            )
        settings = section_with_defaults(args.settings, definition, "source.embedded")
        workload.synthesize(args.out, settings)
        write_manifest(args.out, source={"embedded": settings})
    elif command == "prepare":
        settings = section_with_defaults(args.settings, f"{workload.name}_prepare", "prepare")
        workload.prepare(args.raw, args.out, settings)
    elif command == "overview":
        workload.overview(args.raw, args.prepared, args.out, count=args.simulations)
    elif command == "train":
        workload.train(args.prepared, args.out, args.settings, seed=args.seed,
                       threads=args.threads, device=args.device)  # fmt: skip
    elif command == "quantize":
        workload.quantize(
            args.checkpoint, args.prepared, args.out, target=args.target, method=args.method,
            precision=args.precision, settings=args.settings, seed=args.seed,
            threads=args.threads, recommendation=args.recommendation,
        )  # fmt: skip
    elif command == "export":
        workload.export(args.checkpoint, args.prepared, args.out)
    else:
        missing = _missing_coordinates(args.coordinates)
        if missing:
            raise SciquantError(
                f"evaluate --coordinates: no {', '.join(missing)}; a run's coordinates are "
                f"{', '.join(COORDINATES)}"
            )
        workload.evaluate(
            plan, args.prepared, args.out, settings=args.settings,
            coordinates=args.coordinates, threads=args.threads,
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sciquant",
        description="Quantization studies of scientific ML surrogates: the workflow's stages.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synthesize = commands.add_parser(
        "synthesize", help="write the embedded dataset (simulated, in the real raw format)"
    )
    synthesize.add_argument("workload", help=WORKLOAD_HELP)
    _add_settings(
        synthesize,
        "simulator settings (bloodflow: n_simulations, seed, parameters; md: n_beads, frames,"
        " seed; a plug-in: its schema's)",
    )
    synthesize.add_argument("--out", type=Path, required=True, help="raw data folder to write")

    fetch = commands.add_parser("fetch", help="download raw files by URL, verify sha256, unpack")
    fetch.add_argument(
        "--files",
        type=_json_objects,
        required=True,
        help='JSON list of {"url", "sha256", "name"?, "extract"?} (md files also "role", "label")',
    )
    fetch.add_argument(
        "--limits",
        type=_json_object,
        default={},
        help="JSON object raising (or lowering) download and archive limits: "
        "max_download_bytes, max_archive_members, max_unpacked_bytes, max_compression_ratio "
        "(the config's `limits:`; defaults far above real VMR / GPCRmd data)",
    )
    fetch.add_argument("--out", type=Path, required=True, help="raw data folder to write")

    prepare = commands.add_parser(
        "prepare",
        help="raw files → graph samples (bloodflow), pixel maps (md) or a plug-in's samples; "
        "splits",
    )
    prepare.add_argument("workload", help=WORKLOAD_HELP)
    prepare.add_argument(
        "--raw",
        type=Path,
        required=True,
        help="raw data folder (bloodflow: vtps/*.vtp + dataset_info.json; md: topology + "
        "trajectories, listed in dataset_info.json (synthesized) or manifest.json (fetched))",
    )
    _add_settings(prepare, "preparation settings")
    prepare.add_argument("--out", type=Path, required=True, help="prepared data folder to write")

    overview = commands.add_parser(
        "overview", help="figure of the data (bloodflow: inlet and outlets; md: pixel maps)"
    )
    overview.add_argument("workload", help=WORKLOAD_HELP)
    overview.add_argument("--raw", type=Path, required=True, help="raw data folder")
    overview.add_argument(
        "--prepared", type=Path, default=None, help="prepared data folder (md: the pixel maps)"
    )
    overview.add_argument("--out", type=Path, required=True, help="PNG file to write")
    overview.add_argument(
        "--simulations", type=_simulations, default=4, help="simulations to plot (≥ 1)"
    )

    train = commands.add_parser("train", help="train the FP32 model (resumes from a checkpoint)")
    train.add_argument("--prepared", type=Path, required=True, help="prepared data folder")
    _add_settings(train, "model architecture and training settings")
    train.add_argument("--seed", type=int, default=0, help="training seed")
    train.add_argument("--threads", type=_threads, default=None, help="torch threads")
    train.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device to ask for (default: what the node type `train.node` in --settings has: "
        "cuda on a GPU node type, cpu on `cpu`); cuda without CUDA trains on the CPU with a "
        "warning. Keras models: TensorFlow places them itself",
    )
    train.add_argument("--out", type=Path, required=True, help="training folder to write")

    evaluate = commands.add_parser(
        "evaluate",
        help="roll out the test simulations (bloodflow), classify the test frames (md), or a "
        "plug-in's own metrics; metrics.json",
    )
    evaluate.add_argument(
        "--plan",
        type=_json_object,
        default=None,
        help="the run's plan (JSON, as the rules and `sciquant submit` pass it: artifact, "
        "onnx, runtime, simulated, baseline, baseline_onnx, device, workload); by hand, the "
        "flags below say the same",
    )
    evaluate.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint.pt / quantized.pt, or model.keras / a run's quantization.json (md)",
    )
    evaluate.add_argument("--prepared", type=Path, required=True, help="prepared data folder")
    _add_settings(evaluate, "evaluation settings")
    evaluate.add_argument(
        "--coordinates", type=_json_object, required=True, help="the run's coordinates (JSON)"
    )
    evaluate.add_argument("--threads", type=_threads, default=None, help="torch threads")
    evaluate.add_argument(
        "--onnx", type=Path, default=None, help="run this ONNX file instead, on --runtime"
    )
    evaluate.add_argument(
        "--runtime",
        choices=["onnxruntime", "tensorrt", "openvino"],
        default=None,
        help="what runs --onnx (default onnxruntime): ONNX Runtime (CPU), TensorRT (GPU node; "
        "engine cached) or "
        "OpenVINO (CPU; fp32, bf16 under the bf16 hint, w8a8 from the QDQ graph)",
    )
    evaluate.add_argument(
        "--simulated", action="store_true", help="label the run as a fake-quant simulation"
    )
    evaluate.add_argument(
        "--baseline-checkpoint",
        type=Path,
        default=None,
        help="the FP32 artifact of the run's target: checkpoint.pt (bloodflow), or model.keras "
        "/ the FP32 run's quantization.json (md); the run is then timed interleaved with it "
        "in this process (a paired speed-up)",
    )
    evaluate.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="the device the run's node type has (default cpu; a plan says cuda for runs on a "
        "GPU node type): PyTorch rollouts run there if CUDA is present, else on the "
        "CPU with a warning; TensorRT always runs on the GPU, ONNX Runtime and OpenVINO on the "
        "CPU; Keras models: TensorFlow places them itself",
    )
    evaluate.add_argument(
        "--baseline-onnx",
        type=Path,
        default=None,
        help="bloodflow: the target's FP32 model.onnx (ONNX Runtime / TensorRT targets), run "
        "as the paired timing's baseline",
    )
    _add_workload_option(evaluate)
    evaluate.add_argument("--out", type=Path, required=True, help="run folder to write")

    quantize = commands.add_parser(
        "quantize",
        help="PTQ or QAT of a trained model for a target, method and precision "
        "(ptq-dynamic: writes the dynamically quantized model.onnx, no calibration)",
    )
    quantize.add_argument(
        "--checkpoint", type=Path, required=True, help="FP32 checkpoint.pt or model.keras"
    )
    quantize.add_argument("--prepared", type=Path, required=True, help="prepared data folder")
    quantize.add_argument("--target", required=True, help="hardware target (e.g. cpu-x86)")
    quantize.add_argument(
        "--method",
        required=True,
        choices=("none", *QUANTIZATION_METHODS),
        metavar="METHOD",
        help=f"one of {', '.join(QUANTIZATION_METHODS)}, or none (a float conversion)",
    )
    quantize.add_argument(
        "--precision", required=True,
        help="wXaY (e.g. w8a8, w4a8), fp16 or bf16, or mixed (with --recommendation)",
    )  # fmt: skip
    _add_settings(quantize, '{"quantize": the config\'s quantize section, "model": the model\'s}')
    quantize.add_argument("--seed", type=int, default=0, help="seed of QAT fine-tuning")
    quantize.add_argument(
        "--recommendation",
        type=Path,
        default=None,
        help="recommendation.json of `sensitivity` (for --precision mixed)",
    )
    quantize.add_argument("--threads", type=_threads, default=None, help="torch threads")
    quantize.add_argument("--out", type=Path, required=True, help="run folder to write")

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer sensitivity and a mixed-precision recommendation"
    )
    sensitivity.add_argument("--checkpoint", type=Path, required=True, help="FP32 checkpoint")
    sensitivity.add_argument("--prepared", type=Path, required=True, help="prepared data folder")
    _add_settings(sensitivity, "the config's quantize section")
    sensitivity.add_argument("--threads", type=_threads, default=None, help="torch threads")
    sensitivity.add_argument("--out", type=Path, required=True, help="folder to write")

    export = commands.add_parser(
        "export", help="model → ONNX (FP32, or QDQ carrying a quantized model's own scales)"
    )
    export.add_argument(
        "--checkpoint", type=Path, required=True, help="FP32 checkpoint.pt or quantized.pt"
    )
    export.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="prepared data (a quantized export traces a test graph)",
    )
    _add_workload_option(export)
    export.add_argument("--out", type=Path, required=True, help="ONNX file to write")

    aggregate = commands.add_parser(
        "aggregate", help="every run's metrics.json → result cube (NetCDF) + CSV"
    )
    aggregate.add_argument(
        "--metrics", type=Path, nargs="+", required=True, help="metrics.json files"
    )
    aggregate.add_argument("--out-nc", type=Path, required=True, help="NetCDF cube to write")
    aggregate.add_argument("--out-csv", type=Path, required=True, help="tidy CSV (one row per run)")
    aggregate.add_argument(
        "--study-info", type=_json_object, default={}, help="study attributes (JSON)"
    )

    report = commands.add_parser("report", help="result cube → self-contained HTML report")
    report.add_argument("--cube", type=Path, required=True, help="NetCDF cube from `aggregate`")
    report.add_argument("--out", type=Path, required=True, help="HTML file to write")
    report.add_argument(
        "--budget", type=_json_argument, default=None, help="error budget (JSON; null: default)"
    )
    report.add_argument("--figures", type=Path, nargs="*", default=[], help="figures to embed")
    report.add_argument(
        "--sensitivity", type=Path, nargs="*", default=[], help="per-layer sensitivity CSVs"
    )

    batch = commands.add_parser(
        "run-batch",
        help="quantize, export and evaluate several runs of one training, one after another "
        "(the workflow's batch jobs; see the config's `batch`)",
    )
    batch.add_argument(
        "--config",
        type=_json_object,
        default=None,
        help="the study config as JSON; left out: the environment's SCIQUANT_STUDY_CONFIG (the "
        "workflow sets it to its resolved config)",
    )
    batch.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="run folders (results/<dataset>/<model>/seed<s>/<target>/<method>/<precision>)",
    )
    batch.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="where to write the batch's manifest (its runs and their metrics.json's SHA-256) "
        "once every run is done; the cube's job reads it",
    )

    check = commands.add_parser("check-config", help="validate a study config file")
    check.add_argument("config", type=Path, help="the study's YAML file (workflow/config/*.yaml)")

    bench = commands.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bench.add_argument("what", choices=["mgn", "rollout", "cnn", "aggregate", "report", "dryrun"])
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats after warm-up")
    bench.add_argument("--runs", type=int, default=1000, help="runs of the generated study")
    bench.add_argument("--threads", type=_threads, default=None, help="torch threads")
    bench.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="rollout: prepared bloodflow data (its test simulations; default random trees)",
    )
    bench.add_argument(
        "--checkpoint", type=Path, default=None, help="rollout: FP32 checkpoint.pt to time"
    )
    bench.add_argument(
        "--work-dir", type=Path, default=None, help="rollout: where ONNX exports are kept"
    )
    bench.add_argument(
        "--json",
        type=Path,
        default=None,
        help="rollout: also write the table's rows to this JSON file (a list with, per case and "
        "variant: variant, num_nodes, median_ms, iqr_ms, speedup_vs_fp32_ort, "
        "speedup_vs_own_fp32, paired_vs_fp32_ort and its _ci, max_abs_error, error_bound, "
        "agrees, the CPU and its flags)",
    )
    bench.add_argument(
        "--no-physicsnemo",
        action="store_true",
        help="mgn: do not time PhysicsNeMo's MeshGraphNet in this run, even if importable",
    )

    from sciquant.launch import add_submit_parser

    add_submit_parser(commands)
    return parser


def run(args: argparse.Namespace) -> None:
    """Dispatch to the stage function (imported here so `--help` stays fast)."""
    if args.command in WORKLOAD_STAGES:
        _run_stage(args)
    elif args.command == "fetch":
        from sciquant.data.download import RemoteFile, fetch
        from sciquant.data.manifest import write_manifest

        fields = ("url", "sha256", "name", "extract")
        for i, spec in enumerate(args.files):
            missing = [key for key in ("url", "sha256") if key not in spec]
            if missing:
                raise SciquantError(
                    f"fetch --files: entry {i} has no {' or '.join(missing)}; every file needs "
                    "its url and sha256"
                )
        files = [
            RemoteFile(**{k: v for k, v in spec.items() if k in fields}) for spec in args.files
        ]
        from sciquant.study import FETCH_LIMITS

        unknown = sorted(set(args.limits) - set(FETCH_LIMITS))
        if unknown:
            raise SciquantError(
                f"fetch --limits: unknown {', '.join(unknown)}; known: {', '.join(FETCH_LIMITS)}"
            )
        fetch(files, args.out, **args.limits)
        write_manifest(args.out, source={"files": args.files})
    elif args.command == "sensitivity":
        from sciquant.workloads.bloodflow import sensitivity

        sensitivity.run(
            args.checkpoint, args.prepared, args.out, args.settings, threads=args.threads
        )
    elif args.command == "aggregate":
        from sciquant.report import cube

        cube.aggregate(args.metrics, args.out_nc, args.out_csv, args.study_info)
    elif args.command == "report":
        from sciquant.report import html

        html.build_report(args.cube, args.out, args.budget, args.figures, args.sensitivity)
    elif args.command == "run-batch":
        _run_batch(args)
    elif args.command == "check-config":
        from sciquant.batch import batch_size, job_count
        from sciquant.study import Study, load_config

        study = Study(load_config(args.config))
        try:
            size, jobs = batch_size(study), job_count(study)
        except SciquantError as error:
            raise SciquantError(f"{args.config}: {error}") from None
        layout = f"batches of {size} runs" if size > 1 else "one job per stage and run"
        print(f"{args.config}: valid; {len(study.runs())} runs, {jobs} jobs ({layout})")
    elif args.command == "bench" and args.what == "mgn":
        from sciquant.benchmarks import mgn

        rows = mgn.run(
            repeats=args.repeats, threads=args.threads, physicsnemo=not args.no_physicsnemo
        )
        print(mgn.format_table(rows))
    elif args.command == "bench" and args.what == "rollout":
        from sciquant.benchmarks import rollout

        rows = rollout.run(
            prepared=args.prepared, checkpoint=args.checkpoint,
            repeats=args.repeats if args.repeats != 20 else 10, threads=args.threads or 1,
            work_dir=args.work_dir,
        )  # fmt: skip
        print(rollout.format_table(rows))
        if args.json is not None:
            from sciquant.provenance import write_json

            print(f"rows written to {write_json(args.json, rows)}")
    elif args.command == "bench" and args.what == "cnn":
        from sciquant.benchmarks import cnn

        print(cnn.format_table(cnn.run(repeats=max(args.repeats, 50), threads=args.threads or 1)))
    elif args.command == "bench" and args.what == "dryrun":
        from sciquant.benchmarks import dryrun

        print(dryrun.format_table(dryrun.run(n_runs=max(args.runs, 10_000))))
    elif args.command == "submit":
        from sciquant.launch import run_submit

        run_submit(args)
    elif args.command == "bench":
        from sciquant.report import cube, html

        measure = cube.bench_aggregate if args.what == "aggregate" else html.bench_report
        print(f"{args.what} of {args.runs} generated runs: {measure(args.runs):.2f} s")


def _run_batch(args: argparse.Namespace) -> None:
    """Run the named runs of the study one after another (`sciquant.batch.run_batch`); an
    error naming each run that failed and its log."""
    from sciquant.batch import STUDY_CONFIG_ENV, find_runs, run_batch, write_batch_manifest
    from sciquant.study import Study, validate_config

    config, source = args.config, "--config"
    if config is None:
        text = os.environ.get(STUDY_CONFIG_ENV)
        if not text:
            raise SciquantError(
                f"run-batch: give the study config with --config, or set {STUDY_CONFIG_ENV} to "
                "it (as JSON; the workflow sets it for its batch jobs)"
            )
        try:
            config, source = _json_object(text), STUDY_CONFIG_ENV
        except argparse.ArgumentTypeError as error:
            raise SciquantError(f"{STUDY_CONFIG_ENV}: {error}") from None
    validate_config(config, source=source)
    study = Study(config)
    runs = find_runs(study, args.runs)
    failed = run_batch(study, runs, main, progress=lambda line: print(line, flush=True))
    if failed:
        lines = "\n".join(
            f"  {run.folder}" + (f" (log: {log})" if log else "") for run, log in failed
        )
        raise SciquantError(
            f"{len(failed)} of {len(runs)} runs failed; the others are done and kept, and a "
            f"rerun computes only these:\n{lines}"
        )
    if args.manifest is not None:
        write_batch_manifest(args.manifest, runs)


FAULT_VARIABLE = "SCIQUANT_FAIL_STAGE"


def inject_fault(args: argparse.Namespace, words: Sequence[str]) -> None:
    """Fail on purpose when SCIQUANT_FAIL_STAGE names this stage (for testing recovery).

    `SCIQUANT_FAIL_STAGE=train` fails every `sciquant train`; `train:seed1` only those whose
    arguments contain `seed1` (e.g. the output folder). Nothing is written before the failure.
    """
    wanted = os.environ.get(FAULT_VARIABLE, "")
    if not wanted:
        return
    stage, _, needle = wanted.partition(":")
    if stage == args.command and needle in " ".join(words):
        raise SciquantError(f"injected failure of stage '{stage}' ({FAULT_VARIABLE}={wanted})")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    try:
        inject_fault(args, words)
        run(args)
    except SciquantError as error:
        print(f"sciquant {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
