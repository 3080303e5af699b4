"""The workflow as users drive it: dry runs, lint, formatting, config errors, a tiny full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CI_CONFIG = ROOT / "workflow" / "config" / "ci.yaml"


ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the workflow's snakemake with the environment's `sciquant` on PATH."""
    return subprocess.run(
        [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


def test_dry_run_default_study() -> None:
    result = snakemake("-n")
    assert result.returncode == 0, result.stderr
    assert "evaluate_fp32" in result.stdout and "synthesize" in result.stdout


def test_dry_run_with_slurm_profile_needs_no_cluster() -> None:
    result = snakemake("-n", "--profile", str(ROOT / "profiles" / "slurm"))
    assert result.returncode == 0, result.stderr + result.stdout


def test_lint_is_clean() -> None:
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_snakefmt_check_passes() -> None:
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "rules"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_configfile_replaces_default_study(tmp_path: Path) -> None:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["datasets"] = {"vessels": config["datasets"]["bloodflow"]}
    config["models"]["meshgraphnet"]["datasets"] = ["vessels"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "results/vessels/overview.png" in result.stdout
    assert "results/bloodflow/" not in result.stdout


BAD_CONFIGS = [
    ({"seeds": "zero"}, "config key seeds: 'zero' is not of type 'array'"),
    ({"seeds": [-1]}, "config key seeds.0"),
    ({"threads": 0}, "config key threads"),
    ({"colour": "blue"}, "'colour' was unexpected"),
    ({"datasets": {"Bad-Name": {"workload": "bloodflow"}}}, "config key datasets"),
    (
        {"datasets": {"bloodflow": {"workload": "weather"}}},
        "config key datasets.bloodflow.workload",
    ),
    (
        {"models": {"meshgraphnet": {"architecture": "meshgraphnet", "datasets": ["nowhere"]}}},
        "config key models.meshgraphnet.datasets: unknown dataset 'nowhere'",
    ),
    (
        {"datasets": {"bloodflow": {"workload": "bloodflow", "source": {"files": [
            {"url": "ftp://example.org/a.zip", "sha256": "0" * 64}]}}}},
        "config key datasets.bloodflow.source.files.0.url",
    ),
    (
        {"datasets": {"bloodflow": {"workload": "bloodflow", "source": {"files": [
            {"url": "https://example.org/a.zip", "sha256": "abc"}]}}}},
        "config key datasets.bloodflow.source.files.0.sha256",
    ),
    (
        {"datasets": {"bloodflow": {"workload": "bloodflow", "source": {}}}},
        "datasets.bloodflow.source: give exactly one of `embedded` or `files`",
    ),
    (
        {"datasets": {"bloodflow": {"workload": "bloodflow",
                                    "prepare": {"split": {"train": 0.9, "test": 0.3}}}}},
        "train + valid + test must add up to 1",
    ),
    (
        {"models": {"meshgraphnet": {"architecture": "meshgraphnet", "datasets": ["bloodflow"],
                                     "train": {"node": "v100"}}}},
        "models.meshgraphnet.train.node: node type 'v100' has no entry in `nodes`",
    ),
    ({"evaluate": {"repeats": 0}}, "config key evaluate.repeats"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS)
def test_bad_config_fails_dry_run_naming_key(tmp_path: Path, change: dict, message: str) -> None:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_check_config_cli_reports_key_without_traceback(tmp_path: Path) -> None:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["seeds"] = [0, 0]
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(BIN / "sciquant"), "check-config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "config key seeds" in result.stderr and "non-unique" in result.stderr
    assert "Traceback" not in result.stderr
    good = subprocess.run(
        [str(BIN / "sciquant"), "check-config", str(CI_CONFIG)], capture_output=True, text=True
    )
    assert good.returncode == 0 and "valid" in good.stdout


@pytest.mark.slow
def test_ci_study_end_to_end(tmp_path: Path) -> None:
    result = snakemake(
        "--cores", "2", "--configfile", str(CI_CONFIG), "--directory", str(tmp_path),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "results/bloodflow/meshgraphnet/seed0/reference/none/fp32"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["coordinates"] == {
        "dataset": "bloodflow", "model": "meshgraphnet", "seed": 0,
        "target": "reference", "method": "none", "precision": "fp32",
    }  # fmt: skip
    assert metrics["metrics"]["pressure_error_pct"] > 0
    assert metrics["provenance"]["packages"]["torch"].startswith("2.13.0")
    for figure in ("pressure.png", "flowrate.png"):
        assert (run / figure).stat().st_size > 10_000
    assert (tmp_path / "results/bloodflow/overview.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "resources/bloodflow/raw/manifest.json").read_text())
    assert any(f["path"].endswith("dataset_info.json") for f in manifest["files"])
    # Nothing to do on a second run.
    again = snakemake("-n", "--configfile", str(CI_CONFIG), "--directory", str(tmp_path))
    assert "Nothing to be done" in again.stdout + again.stderr
