"""Malformed study configs: `snakemake -n` refuses each, naming the key, before touching anything.

Complements `tests/test_workflow.py::BAD_CONFIGS` (no case repeated): every config here is the
`ci` study with one change, dry-run in its own empty working directory; the run must fail with
the key (or what is wrong) in its message, without a Python traceback, and leave no `results/`
or `resources/` behind. The dry runs are independent: they run two at a time, once per module,
and each case is then its own test.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import snakemake.cli
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CI = yaml.safe_load((ROOT / "workflow" / "config" / "ci.yaml").read_text())
SHA = "0" * 64


def dataset(**change) -> dict:
    return {"datasets": {"bloodflow": {**CI["datasets"]["bloodflow"], **change}}}


def files(*entries: dict) -> dict:
    return dataset(source={"files": list(entries)})


def train(**change) -> dict:
    model = copy.deepcopy(CI["models"]["meshgraphnet"])
    model["train"].update(change)
    return {"models": {**CI["models"], "meshgraphnet": model}}


def model(**change) -> dict:
    return {"models": {**CI["models"], "meshgraphnet": {**CI["models"]["meshgraphnet"], **change}}}


def sweep(**change) -> dict:
    entry = {"targets": ["cpu-x86"], "methods": ["ptq-minmax"], "precisions": ["w8a8"], **change}
    return {"quantize": {"sweeps": [{k: v for k, v in entry.items() if v is not None}]}}


def md(dataset: dict | None = None, sweeps: list | None = None, icnnmd: dict | None = None) -> dict:
    """The ci study plus an md dataset `gpcr` (changed by `dataset`) and an `icnnmd` model."""
    gpcr = {"workload": "md", **(dataset or {})}
    models = {**CI["models"], "icnnmd": {"architecture": "icnnmd", "datasets": ["gpcr"]}}
    models["icnnmd"].update(icnnmd or {})
    change = {"datasets": {**CI["datasets"], "gpcr": gpcr}, "models": models}
    if sweeps is not None:
        change["quantize"] = {"sweeps": sweeps}
    return change


def md_file(name: str, role: str = "trajectory", label: int | None = None) -> dict:
    entry = {"url": f"https://example.org/{name}", "sha256": SHA, "role": role}
    return entry if label is None else {**entry, "label": label}


#: (id, change to the ci study (top-level keys replaced) or raw YAML text, expected message)
CASES = [
    # wrong types, empty or repeated values
    ("seeds-duplicate", {"seeds": [0, 0]}, "config key seeds: [0, 0] has non-unique elements"),
    ("seeds-empty", {"seeds": []}, "config key seeds: [] should be non-empty"),
    ("threads-float", {"threads": 1.5}, "config key threads: 1.5 is not of type 'integer'"),
    ("epochs-string", train(epochs="ten"), "config key models.meshgraphnet.train.epochs: 'ten'"),
    ("mem-string", {"nodes": {"cpu": {"mem_mb": "lots"}}}, "config key nodes.cpu.mem_mb: 'lots'"),
    ("datasets-empty", {"datasets": {}}, "config key datasets: {} should be non-empty"),
    ("keep-fraction-zero", dataset(prepare={"keep_fraction": 0}),
     "config key datasets.bloodflow.prepare.keep_fraction"),
    ("range-too-short",
     dataset(source={"embedded": {"parameters": {"branch_count_range": [3]}}}),
     "config key datasets.bloodflow.source.embedded.parameters.branch_count_range"),
    ("budget-zero-ratio", {"report": {"budget": {"metric": "pressure_error_pct",
                                                 "max_ratio_to_fp32": 0}}},
     "config key report.budget"),
    # unknown keys and names
    ("dataset-key-unknown", dataset(colour="red"),
     "config key datasets.bloodflow: Additional properties are not allowed ('colour'"),
    ("train-key-typo", train(epoch=3),
     "config key models.meshgraphnet.train: Additional properties are not allowed ('epoch' was "
     "unexpected); did you mean 'epochs'? The keys allowed here are"),
    ("budget-bound-typo", {"report": {"budget": {"metric": "pressure_error_pct",
                                                 "max_ratio": 1.2}}},
     "config key report.budget: Additional properties are not allowed ('max_ratio' was "
     "unexpected); did you mean 'max_ratio_to_fp32'?"),
    ("node-type-unknown", {"nodes": {"cpu": {}, "a100": {}}}, "config key nodes: 'a100'"),
    ("simulator-key-unknown",
     dataset(source={"embedded": {"parameters": {"viscosityy": 0.04}}}),
     "config key datasets.bloodflow.source.embedded.parameters: Additional properties"),
    # names that would become paths outside their folder
    ("study-name-escapes", {"study": "../escape"}, "config key study: '../escape' does not match"),
    ("dataset-name-dotdot", {"datasets": {"..": CI["datasets"]["bloodflow"]}},
     "config key datasets: '..' does not match"),
    ("dataset-name-slash", {"datasets": {"a/b": CI["datasets"]["bloodflow"]}},
     "config key datasets: 'a/b' does not match"),
    ("file-name-escapes",
     files({"url": "https://example.org/a.zip", "sha256": SHA, "name": "../a.zip"}),
     "config key datasets.bloodflow.source.files.0.name: '../a.zip' does not match"),
    # sources: URLs, hashes, ambiguity
    ("url-without-slashes", files({"url": "file:data.zip", "sha256": SHA}),
     "config key datasets.bloodflow.source.files.0.url: 'file:data.zip'"),
    ("sha256-not-hex", files({"url": "https://example.org/a.zip", "sha256": "g" * 64}),
     "config key datasets.bloodflow.source.files.0.sha256"),
    ("both-sources", dataset(source={"embedded": {}, "files": [
        {"url": "https://example.org/a.zip", "sha256": SHA}]}),
     "config key datasets.bloodflow.source: give exactly one of `embedded` or `files`"),
    ("same-file-name-twice", files({"url": "https://a.org/x/data.zip", "sha256": SHA},
                                   {"url": "https://b.org/data.zip", "sha256": "1" * 64}),
     "datasets.bloodflow.source.files.0 (https://a.org/x/data.zip) needs 'data.zip'"),
    # splits and sizes
    ("split-no-training", dataset(prepare={"split": {"train": 0, "valid": 0, "test": 1}}),
     "config key datasets.bloodflow.prepare.split: train and test fractions must be > 0"),
    ("too-few-simulations", dataset(source={"embedded": {"n_simulations": 3}},
                                    prepare={"split": {"train": 0.8, "valid": 0, "test": 0.2}}),
     "config key datasets.bloodflow.source.embedded.n_simulations: too few simulations"),
    ("learning-rate-min-too-high", train(learning_rate_min=0.1),
     "config key models.meshgraphnet.train.learning_rate_min: must not exceed learning_rate"),
    # quantization sweeps: unknown or impossible combinations, missing nodes
    ("target-unknown", sweep(targets=["tpu-v5"]),
     "config key quantize.sweeps.0.targets: unknown target 'tpu-v5'; known targets are"),
    ("method-none", sweep(methods=["none"]), "config key quantize.sweeps.0.methods: `none`"),
    ("precision-int8", sweep(precisions=["int8"]),
     "quantize.sweeps.0.precisions.0: 'int8' is not a precision: a precision is wXaY with X "
     "weight bits 2–8"),
    ("fp16-on-cpu-x86", sweep(precisions=["fp16"]),
     "config key quantize.sweeps.0: target 'cpu-x86' cannot run precision fp16"),
    ("keras-target-torch-model", sweep(targets=["litert-cpu"]),
     "config key quantize.sweeps.0: target 'litert-cpu' cannot run precision w8a8"),
    ("sweep-targets-empty", sweep(targets=[]),
     "config key quantize.sweeps.0.targets: [] should be non-empty"),
    ("sweep-precisions-missing", sweep(precisions=None),
     "config key quantize.sweeps.0: 'precisions' is a required property"),
    ("gpu-target-without-node", sweep(targets=["trt-v100"]),
     "target trt-v100 runs on node type 'v100', which has no entry in `nodes`"),
    ("sensitivity-fp16", {"quantize": {"sensitivity": {"precision": "fp16"}}},
     "config key quantize.sensitivity.precision: 'fp16'"),
    ("sensitivity-keras-model", {"quantize": {"sensitivity": {"models": ["nope"]}}},
     "config key quantize.sensitivity.models: 'nope' is not a PyTorch model"),
    ("formulation-unknown", model(formulation="graph"), "formulation"),
    ("prior-unknown", dataset(prepare={**CI["datasets"]["bloodflow"]["prepare"], "prior": "exact"}),
     "config key datasets.bloodflow.prepare.prior: 'exact' is not one of"),
    # md datasets, Keras models and sweeps across frameworks
    ("md-keras-onnx-target", md(sweeps=[{"targets": ["cpu-x86"], "methods": ["ptq-minmax"],
                                         "precisions": ["w8a8"]}]),
     "which needs tf2onnx"),
    ("md-files-without-topology",
     md({"source": {"files": [md_file("a.xtc", label=0), md_file("b.xtc", label=1),
                              md_file("c.xtc", label=1)]}}),
     "config key datasets.gpcr.source.files: exactly one file needs `role: topology`"),
    ("md-trajectory-without-label",
     md({"source": {"files": [md_file("t.pdb", "topology"), md_file("a.xtc", label=0),
                              md_file("b.xtc")]}}),
     "config key datasets.gpcr.source.files.2.label"),
    ("md-one-state-only",
     md({"source": {"files": [md_file("t.pdb", "topology"), md_file("a.xtc", label=0),
                              md_file("b.xtc", label=0)]}}),
     "trajectories of at least two labels are needed"),
    ("md-more-frames-than-simulated", md({"prepare": {"frames_per_trajectory": 800}}),
     "config key datasets.gpcr.prepare.frames_per_trajectory: 800 frames asked"),
    ("md-too-many-beads", md({"source": {"embedded": {"n_beads": 500}}}),
     "config key datasets.gpcr.source.embedded.n_beads: 500 is greater than the maximum"),
    ("md-bloodflow-key", md({"prepare": {"keep_fraction": 0.1}}),
     "config key datasets.gpcr.prepare: Additional properties are not allowed"),
    ("icnnmd-on-bloodflow", md(icnnmd={"datasets": ["bloodflow"]}),
     "config key models.icnnmd.datasets: a icnnmd cannot learn dataset 'bloodflow'"),
    ("icnnmd-grid-too-small", md({"source": {"embedded": {"n_beads": 60}}}),
     "config key datasets.gpcr.source.embedded.n_beads: 60 beads make 8×8 pixel maps"),
    ("icnnmd-mgn-key", md(icnnmd={"hidden": 32}),
     "config key models.icnnmd: Additional properties are not allowed"),
    ("sweep-unknown-model", sweep(models=["resnet"]),
     "config key quantize.sweeps.0.models: unknown model 'resnet'"),
    ("fp16-with-a-range-method",
     md(sweeps=[{"models": ["icnnmd"], "targets": ["litert-cpu"], "methods": ["ptq-minmax"],
                 "precisions": ["fp16"]}]),
     "fp16 is a cast with no ranges to choose"),
    # not a study at all
    ("yaml-syntax", "study: ci\nseeds: [0\n", "Config file is not valid JSON or YAML"),
    ("yaml-list", "- study\n- ci\n", "Config file must be given as JSON or YAML with keys"),
    # YAML keeps the last of a key given twice: the second block would replace the first
    ("key-twice", (ROOT / "workflow" / "config" / "ci.yaml").read_text() + "\nquantize: {}\n",
     "key 'quantize' is given a second time in the same mapping"),
    ("simulator-values-impossible",
     dataset(source={"embedded": {"parameters": {"branch_count_range": [9, 3]}}}),
     "config key datasets.bloodflow.source.embedded.parameters"),
]  # fmt: skip


def _case_id(case) -> str:
    return case.id if hasattr(case, "id") else case[0]


def _change(case) -> dict | str:
    return case.values[1] if hasattr(case, "values") else case[1]


def dry_run(workdir: Path, change: dict | str) -> int:
    """`snakemake -n` of the changed ci study in `workdir`; output to `workdir/output.txt`.

    Runs `snakemake.cli.main`, the `snakemake` command's entry point, in a process forked from
    this one, which has imported Snakemake already: the same dry run as the command, without
    paying Snakemake's import time once per case.
    """
    workdir.mkdir()
    text = change if isinstance(change, str) else yaml.safe_dump({**copy.deepcopy(CI), **change})
    (workdir / "study.yaml").write_text(text)
    output = open(workdir / "output.txt", "w")  # closed when the fork exits
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    sys.stdout = sys.stderr = output  # not pytest's capture of the parent
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        snakemake.cli.main(["-s", str(ROOT / "Snakefile"), "-n", "--configfile",
                            str(workdir / "study.yaml"), "--directory", str(workdir)])  # fmt: skip
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    output.flush()
    return code


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Every case's dry run, two at a time, each in a fresh fork (no state shared)."""
    root = tmp_path_factory.mktemp("malformed")
    names = [_case_id(case) for case in CASES]
    jobs = [(root / name, _change(case)) for name, case in zip(names, CASES, strict=True)]
    codes = forked_dry_runs(jobs)
    return {name: (root / name, code) for name, code in zip(names, codes, strict=True)}


def forked_dry_runs(jobs: list[tuple[Path, Any]], timeout: float = 300.0) -> list[int]:
    """`dry_run` of every (workdir, change), two at a time, each in a fresh fork.

    The forks are made here, on the main thread, with no helper threads alive: a pool forks its
    replacement workers from a thread of its own, and a fork taken while another thread holds a
    lock can hang on that lock for good (seen once in CI). A fork that outlives `timeout`
    seconds is killed and run once more alone; killed again, its case fails with code -9.
    """
    # Objects of this process (TensorFlow's, where an earlier test loaded it) must not be
    # collected in a fork: their finalizers call into a runtime whose threads did not fork.
    gc.collect()
    gc.freeze()
    context = multiprocessing.get_context("fork")
    codes: list[int] = [0] * len(jobs)
    try:
        for start in range(0, len(jobs), 2):
            running = []
            for index in range(start, min(start + 2, len(jobs))):
                process = context.Process(target=_exit_with_dry_run, args=jobs[index])
                process.start()
                running.append((index, process))
            for index, process in running:
                codes[index] = _joined(process, timeout)
                if codes[index] == -9:  # hung: once more, alone
                    retry = context.Process(target=_exit_with_dry_run, args=jobs[index])
                    retry.start()
                    codes[index] = _joined(retry, timeout)
    finally:
        gc.unfreeze()
    return codes


def _joined(process: Any, timeout: float) -> int:
    """The exit status of a fork, killed (-9) where it runs past `timeout` seconds."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        return -9
    return process.exitcode


def _exit_with_dry_run(workdir: Path, change: Any) -> None:
    """A fork's whole life: one dry run, its exit status the fork's."""
    os._exit(dry_run(workdir, change))


def test_cases_are_many_and_new() -> None:
    from tests.test_workflow import BAD_CONFIGS

    assert len(CASES) >= 20
    old = [yaml.safe_dump(change) for change, _ in BAD_CONFIGS]
    for case in CASES:
        if isinstance(_change(case), dict):
            assert yaml.safe_dump(_change(case)) not in old, _case_id(case)


@pytest.mark.parametrize(("name", "change", "message"), CASES, ids=[_case_id(c) for c in CASES])
def test_malformed_config_fails_dry_run_naming_the_key(dry_runs, name, change, message) -> None:
    workdir, code = dry_runs[name]
    output = (workdir / "output.txt").read_text()
    assert code != 0, output
    assert message in output, output
    assert "Traceback" not in output, output
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()
