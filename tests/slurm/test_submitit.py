"""`sciquant submit` (submitit job arrays) produces the files the Snakemake workflow produces.

The reference is the `ci` study's residual model (training on node type `v100`) with its
quantization sweep, run by Snakemake locally up to the metrics.json of a selection of runs: the
FP32 reference, a fake-quant PTQ run, OpenVINO's FP32 and its INT8 from our QDQ export (every
stage: quantize, export of the FP32 and the QDQ model, paired timing). `sciquant submit --stage
all` runs the same selection with the local executor (no Slurm needed: that test does not use
the cluster fixture), and the FP32 run on the local Slurm cluster; the same metrics.json files
must appear, raw data, prepared data and the training log must be identical, the metrics equal
within float tolerance (timings and provenance excepted). Every command `submit` runs is the
command of its rule in Snakemake's dry run (ci, default and paper studies, every stage). A
failing job makes `submit` fail naming the job's stderr file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_cluster import sacct_rows, wait_for_job
from .test_workflow_slurm import CHECKPOINT, FP32_RUN, assert_same_science, science
from .test_workflow_slurm import write_config as write_fp32_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAINING_LOG = str(Path(CHECKPOINT).with_name("training_log.csv"))
RUNS = "results/bloodflow/meshgraphnet/seed0"
#: `--runs` selection of the local test, and the metrics.json files it makes
SELECTION = ("precision=fp32,w8a8",)
SELECTED = [
    f"{FP32_RUN}/metrics.json",
    f"{RUNS}/reference/ptq-minmax/w8a8/metrics.json",
    f"{RUNS}/openvino-cpu/none/fp32/metrics.json",
    f"{RUNS}/openvino-cpu/ptq-minmax/w8a8/metrics.json",
]


def write_config(workdir: Path) -> Path:
    """The FP32 study of the Slurm tests (residual model, trained on `v100`) with the ci study's
    quantization sweep entries for that model."""
    path = write_fp32_config(workdir)
    config = yaml.safe_load(path.read_text())
    ci = yaml.safe_load((REPO / "workflow" / "config" / "ci.yaml").read_text())
    sweeps = [entry for entry in ci["quantize"]["sweeps"] if "meshgraphnet" in entry["models"]]
    config["quantize"] = {"sweeps": sweeps}
    path.write_text(yaml.safe_dump(config))
    return path


def with_bin(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def submit(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sciquant"), "submit", "--config", str(workdir / "config.yaml"),
         "--workdir", str(workdir), *args],
        cwd=workdir, capture_output=True, text=True, timeout=400, env=env or with_bin(os.environ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The selected runs made by Snakemake (local cores), as the files to reproduce."""
    workdir = tmp_path_factory.mktemp("snakemake")
    write_config(workdir)
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
         "--configfile", str(workdir / "config.yaml"), "--directory", str(workdir), *SELECTED],
        cwd=workdir, capture_output=True, text=True, timeout=600, env=with_bin(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def assert_same_files(ours: Path, theirs: Path) -> None:
    def read(root: Path, path: str) -> dict:
        return json.loads((root / path).read_text())

    manifest = "resources/bloodflow/raw/manifest.json"
    assert read(ours, manifest) == read(theirs, manifest)  # every raw file's sha256
    index = "results/bloodflow/prepared/index.json"
    assert read(ours, index) == read(theirs, index)

    def losses(root: Path) -> list[dict]:
        with open(root / TRAINING_LOG) as stream:
            return [
                {k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(stream)
            ]

    assert losses(ours) == losses(theirs)
    assert_same_science(ours / FP32_RUN / "metrics.json", theirs / FP32_RUN / "metrics.json")


def metrics_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "results").rglob("metrics.json"))


def test_local_executor_matches_snakemake(reference, tmp_path):
    """Every stage, quantized runs included: the files Snakemake makes for the selection."""
    write_config(tmp_path)
    result = submit(tmp_path, "--executor", "local", "--stage", "all", "--runs", *SELECTION)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = dict(re.findall(r"^(\w+): (\d+) job\(s\) on \w+ \(local\)", result.stdout, re.M))
    # quantize: the two PTQ runs; export: OpenVINO's FP32 model (its float runs and the INT8
    # run's paired baseline) and the INT8 run's QDQ graph
    expected = {"synthesize": "1", "prepare": "1", "train": "1", "quantize": "2", "export": "2"}
    assert jobs == {**expected, "evaluate": "4"}, result.stdout
    assert metrics_files(tmp_path) == metrics_files(reference) == sorted(SELECTED)
    assert_same_files(tmp_path, reference)
    for path in SELECTED[1:]:
        assert_same_results(tmp_path / path, reference / path)
    # training on node type `v100` without CUDA: on the CPU, said in the job's log and recorded
    assert "its node type asks for a GPU" in result.stdout + result.stderr + _job_logs(tmp_path)
    training = json.loads((tmp_path / CHECKPOINT).with_name("training.json").read_text())
    assert training["provenance"]["device_requested"] == "cuda"


def assert_same_results(ours: Path, theirs: Path) -> None:
    """`assert_same_science`, also without a runtime's own timings (`*_ms`: OpenVINO's)."""
    a, b = ({k: v for k, v in science(p).items() if not k.endswith("_ms")} for p in (ours, theirs))
    assert a.keys() == b.keys(), (a, b)
    floats = [key for key, value in b.items() if isinstance(value, float)]
    assert {k: a[k] for k in floats} == pytest.approx({k: b[k] for k in floats}, rel=1e-9)
    assert {k: v for k, v in a.items() if k not in floats} == {
        k: v for k, v in b.items() if k not in floats
    }


def _job_logs(workdir: Path) -> str:
    return "".join(p.read_text() for p in (workdir / "logs" / "submitit").rglob("*.err"))


@pytest.mark.parametrize("study", ["ci", "default", "paper"])
def test_submit_runs_the_commands_of_the_rules(study, tmp_path):
    """Every job of every stage `submit` runs for the whole study is a job of Snakemake's dry
    run with the same `sciquant` command (settings, inputs, runtime flags, `--device`), and the
    other way round, on the same node type (the dry run's GPU model; none: `cpu`), asking for
    the same memory and time (`Study.resources`)."""
    import argparse

    from sciquant.launch import STAGES, executor_parameters, stage_commands
    from sciquant.study import Study, load_config

    config = REPO / "workflow" / "config" / f"{study}.yaml"
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-n", "-p",
         "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(config),
         "--directory", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=with_bin(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = "|".join(STAGES)
    theirs = {}
    for block in result.stdout.split("\n\n"):
        command = re.search(rf"^(?:Shell command: )?(sciquant (?:{stages}) .*)$", block, re.M)
        if command:
            gpu_model = re.search(r"gpu_model=([^,\s]+)", block)
            mem_mb = re.search(r"\bmem_mb=(\d+)", block)
            runtime = re.search(r"\bruntime=(\d+)", block)
            argv = tuple(shlex.split(command[1].split(" > ")[0])[1:])
            theirs[argv] = (gpu_model[1] if gpu_model else "cpu", int(mem_mb[1]), int(runtime[1]))
    loaded = Study(load_config(config))
    defaults = argparse.Namespace(partition=None, constraint=None, account=None, timeout_min=None,
                                  mem_gb=None, cpus=None, array_parallelism=4)  # fmt: skip
    ours = {}
    for stage in STAGES:
        for _, node, argv in stage_commands(stage, loaded, loaded.runs()):
            asked = executor_parameters(loaded.config, stage, node, defaults)
            ours[tuple(argv)] = (node, round(asked["mem_gb"] * 1000), asked["timeout_min"])
    assert len(theirs) > 10 and set(ours) == set(theirs)
    assert ours == theirs
    if study == "paper":
        on_gpu = [argv for argv in ours if any('"device": "cuda"' in arg for arg in argv)]
        assert len(on_gpu) == 3 * 2 * 5  # TensorRT runs' GPU nodes
        assert {ours[argv][0] for argv in on_gpu} == {"v100", "rtx3090"}
    assert {(mem, minutes) for _, mem, minutes in ours.values()} >= {(4000, 60), (2000, 10)}


def test_failed_job_is_reported_with_its_stderr(tmp_path):
    write_config(tmp_path)  # no raw data in tmp_path: prepare must fail
    result = submit(tmp_path, "--executor", "local", "--stage", "prepare")
    assert result.returncode == 2, result.stdout + result.stderr
    message = re.search(r"prepare bloodflow \(job \S+\): see (\S+)", result.stderr)
    assert message and "1 job(s) failed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "resources/bloodflow/raw" in Path(message[1]).read_text()  # what went wrong


def test_bad_filter_names_the_coordinates(tmp_path):
    write_config(tmp_path)
    result = submit(tmp_path, "--executor", "local", "--runs", "seeds=0")
    assert result.returncode == 2 and "key one of dataset, model, seed" in result.stderr
    result = submit(tmp_path, "--executor", "local", "--runs", "seed=7")
    assert result.returncode == 2 and "no run of the study matches" in result.stderr


def test_slurm_job_arrays_match_snakemake(slurm_cluster, reference, tmp_path):
    write_config(tmp_path)
    result = submit(
        tmp_path, "--executor", "slurm",
        "--runs", "dataset=bloodflow", "seed=0", "target=reference", "precision=fp32",
        "--stage", "synthesize", "prepare", "train", "evaluate",
        env=with_bin(slurm_cluster.env()),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_files(tmp_path, reference)

    arrays = dict(re.findall(r"^(\w+): 1 job\(s\) on \w+ \(\w+\): (\d+)$", result.stdout, re.M))
    assert set(arrays) == {"synthesize", "prepare", "train", "evaluate"}, result.stdout
    for stage, array in arrays.items():
        wait_for_job(slurm_cluster, array, timeout=60)  # the record is complete
        fields = "JobID,JobName,State,Partition,ReqTRES,Constraints"
        (row,) = sacct_rows(slurm_cluster, "-j", array, fields=fields)
        assert row["State"] == "COMPLETED" and row["JobName"] == f"sciquant-{stage}", row
        if stage == "train":  # nodes.v100: partition, constraint and GPU from the config
            assert row["Partition"] == "gpu" and row["Constraints"] == "v100", row
            assert "gres/gpu:v100=1" in row["ReqTRES"], row
        else:
            assert row["Partition"] == "cpu" and "gres/gpu" not in row["ReqTRES"], row
