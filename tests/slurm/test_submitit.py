"""`sciquant submit` (submitit job arrays) produces the files the Snakemake workflow produces.

The reference is the `ci` study (training on node type `v100`) run by Snakemake locally up to
the FP32 run's metrics.json. `sciquant submit` runs the same stages with the local executor (no
Slurm needed: that test does not use the cluster fixture) and on the local Slurm cluster; raw
data, prepared data and the training log must be identical, the metrics equal within float
tolerance (timings and provenance excepted). A failing job makes `submit` fail naming the job's
stderr file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_cluster import sacct_rows, wait_for_job
from .test_workflow_slurm import CHECKPOINT, FP32_RUN, assert_same_science, write_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAINING_LOG = str(Path(CHECKPOINT).with_name("training_log.csv"))


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
    """The ci study's FP32 run made by Snakemake (local cores), as the files to reproduce."""
    workdir = tmp_path_factory.mktemp("snakemake")
    write_config(workdir)
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
         "--configfile", str(workdir / "config.yaml"), "--directory", str(workdir),
         f"{FP32_RUN}/metrics.json"],
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


def test_local_executor_matches_snakemake(reference, tmp_path):
    write_config(tmp_path)
    result = submit(tmp_path, "--executor", "local")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("synthesize", "prepare", "train", "evaluate"):
        assert re.search(rf"^{stage}: 1 job\(s\) on \w+ \(local\)", result.stdout, re.M), stage
    assert_same_files(tmp_path, reference)


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
        tmp_path, "--executor", "slurm", "--runs", "dataset=bloodflow", "seed=0",
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
