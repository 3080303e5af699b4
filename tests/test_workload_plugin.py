"""A third workload through the public interface only: the example oscillator plug-in.

The package in examples/oscillator is installed with pip into a folder of its own (its entry
point in the group `sciquant.workloads` is all that registers it) and the workflow runs its
study end to end: simulation, FP32 training, PTQ and QAT, the QDQ export on ONNX Runtime INT8
timed beside its FP32, a W4A8 simulation, the cube and the report. Nothing of the plug-in lives
in sciquant's tree, and the run writes nothing there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sciquant.quant.debug import OVERFLOW_RISK
from sciquant.runtime.onnxruntime import cpu_has_vnni

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "oscillator"
BIN = Path(sys.executable).parent


def _env(site: Path | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def _python(code: str, site: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(site), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plug-in installed by pip (no dependencies, no network) into its own folder."""
    base = tmp_path_factory.mktemp("plugin")
    source = base / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return target


@pytest.fixture(scope="module")
def study_run(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example study, run by the workflow with the plug-in on the path."""
    folder = tmp_path_factory.mktemp("oscillator-study")
    before = _git_status()
    result = subprocess.run(
        ["snakemake", "--snakefile", str(ROOT / "Snakefile"), "--cores", "2",
         "--configfile", str(EXAMPLE / "study.yaml"), "--directory", str(folder)],
        env=_env(site), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert _git_status() == before, "the plug-in's study wrote into sciquant's tree"
    return folder


def _git_status() -> str:
    if not (ROOT / ".git").exists():
        return ""
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip


def _metrics(folder: Path, run: str) -> dict:
    return json.loads((folder / "results/oscillator/mlp/seed0" / run / "metrics.json").read_text())


def test_entry_point_registers_the_workload(site: Path) -> None:
    code = (
        "from sciquant.workloads import workload_names, get_workload;"
        "print(workload_names()); w = get_workload('oscillator');"
        "print(type(w).__module__, sorted(w.architectures))"
    )
    found = _python(code, site)
    assert found.returncode == 0, found.stderr
    assert "'bloodflow', 'md', 'oscillator'" in found.stdout
    assert "oscillator_workload ['oscillator_mlp']" in found.stdout
    missing = _python(code, None)  # without the package: not known, and said so
    assert missing.returncode != 0
    assert "unknown workload 'oscillator'" in missing.stderr
    assert "sciquant.workloads" in missing.stderr
    check = (
        "from pathlib import Path; from sciquant.study import load_config;"
        f"load_config(Path({str(EXAMPLE / 'study.yaml')!r}))"
    )
    unknown = _python(check, None)  # a config naming it: the key, and what to install
    assert unknown.returncode != 0
    assert "config key datasets.oscillator.workload" in unknown.stderr
    assert "entry point group sciquant.workloads" in unknown.stderr


def test_config_checks_reach_the_plugin(site: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    check = (
        "import sys; from pathlib import Path; from sciquant.study import Study, load_config;"
        "Study(load_config(Path(sys.argv[1])))"
    )

    def refused(change: dict) -> str:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({**config, **change}))
        result = subprocess.run(
            [sys.executable, "-c", check, str(path)], env=_env(site), capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode != 0
        return result.stderr

    # a setting of the plug-in's own schema, by its dotted key
    datasets = {"oscillator": {**config["datasets"]["oscillator"]}}
    datasets["oscillator"]["source"] = {"embedded": {"trajectories": 1}}
    assert "datasets.oscillator.source.embedded.trajectories" in refused({"datasets": datasets})
    # sciquant's part of the model (train) is checked for it too
    models = {"mlp": {**config["models"]["mlp"], "train": {"epochs": 0}}}
    assert "models.mlp.train.epochs" in refused({"models": models})
    # a method its workload does not take, named with the sweep entry
    sweeps = [{"targets": ["reference"], "methods": ["qat-degree"], "precisions": ["w8a8"]}]
    message = refused({"quantize": {"sweeps": sweeps}})
    assert "quantize.sweeps.0.methods" in message and "qat-degree" in message
    # a target whose runtime the workload does not run (TensorRT), refused before any job
    sweeps = [{"targets": ["trt-v100"], "methods": ["ptq-minmax"], "precisions": ["w8a8"]}]
    nodes = {"cpu": {}, "v100": {"gpu": 1}}
    message = refused({"quantize": {"sweeps": sweeps}, "nodes": nodes})
    assert "quantize.sweeps.0.targets" in message and "tensorrt" in message
    # a model on another workload's dataset
    bloodflow = {"bloodflow": {"workload": "bloodflow"}}
    models = {"mlp": {**config["models"]["mlp"], "datasets": ["bloodflow"]}}
    message = refused({"datasets": {**config["datasets"], **bloodflow}, "models": models})
    assert "models.mlp.datasets" in message and "oscillator" in message


def test_study_end_to_end(study_run: Path) -> None:
    fp32 = _metrics(study_run, "reference/none/fp32")
    euler = fp32["baselines"]["euler"]
    # the surrogate learned the dynamics: its rollouts beat the explicit Euler step's
    assert fp32["metrics"]["rollout_error_pct"] < 0.5 * euler["rollout_error_pct"]
    assert fp32["metrics"]["step_error_pct"] < euler["step_error_pct"]
    assert fp32["workload"] == "oscillator" and fp32["runtime"] == "torch"

    for target, method, runtime in (
        ("cpu-x86", "ptq-minmax", "onnxruntime"),
        ("cpu-x86", "qat-lsq", "onnxruntime"),
        ("openvino-cpu", "ptq-minmax", "openvino"),
    ):
        run = _metrics(study_run, f"{target}/{method}/w8a8")
        assert run["runtime"] == runtime and not run["simulated"]
        metrics = run["metrics"]
        # timed beside its target's FP32 in one process: a paired speed-up with its interval
        assert metrics["paired_speedup_ci_low"] <= metrics["paired_speedup"]
        assert metrics["paired_speedup"] <= metrics["paired_speedup_ci_high"]
        assert "host" in run
        # INT8 stays close to FP32 and well ahead of the baseline, where the runtime computes
        # what the simulation does: OpenVINO's full-range int8 weights on a CPU without VNNI
        # saturate (sciquant.runtime.openvino), and the run says so instead
        exposed = runtime == "openvino" and not cpu_has_vnni()
        assert metrics.get(OVERFLOW_RISK) == (float(exposed) if runtime == "openvino" else None)
        if exposed:
            assert metrics["sim_vs_deployed_max_rel_rms"] > 0.01
        else:
            assert metrics["rollout_error_pct"] < 0.5 * euler["rollout_error_pct"]
        # the deployed graph agrees with its simulation; every layer has its SQNR
        assert metrics["sim_vs_deployed_inputs"] > 0
        assert set(metrics["layer_sqnr_db"]) == {"0", "2", "4"}
        assert metrics["layer_sqnr_db_worst"] > 20.0

    from sciquant.runtime.onnxruntime import integer_kernels, kernel_summary

    onnx = study_run / "results/oscillator/mlp/seed0/cpu-x86/ptq-minmax/w8a8/model.onnx"
    kernels = integer_kernels(kernel_summary(onnx))
    assert sum(kernels.values()) >= 3, kernels  # the three Linear layers run in int8

    simulated = _metrics(study_run, "reference/ptq-mse/w4a8")
    assert simulated["simulated"] and "latency_ms_median" not in simulated["metrics"]
    corrected = _metrics(study_run, "reference/ptq-biascorr/w4a8")["metrics"]
    # bias correction moved the biases; its SQNR is measured against the FP32 layers
    assert corrected["layer_sqnr_db"].keys() == simulated["metrics"]["layer_sqnr_db"].keys()
    assert corrected["step_error_pct"] != simulated["metrics"]["step_error_pct"]

    import xarray as xr

    with xr.open_dataset(study_run / "results/summary/metrics.nc") as cube:
        assert list(cube["dataset"].values) == ["oscillator"]
        assert {"ptq-minmax", "qat-lsq", "ptq-mse"} <= set(cube["method"].values)
        fp32_run = {"dataset": "oscillator", "model": "mlp", "seed": 0,
                    "target": "reference", "method": "none", "precision": "fp32"}  # fmt: skip
        value = cube["rollout_error_pct"].sel(fp32_run)
        assert float(value) == pytest.approx(fp32["metrics"]["rollout_error_pct"])
        # the retained gain over the plug-in's own baseline (the Euler step), per trajectory
        assert fp32["gain_baseline"] == "euler"
        network = fp32["metrics"]["per_simulation"]
        assert network.keys() == euler["per_simulation"].keys() and len(network) >= 20
        assert float(cube["network_gain_rollout_pct_ci_low"].sel(fp32_run)) > 0
        b = np.array([euler["per_simulation"][k]["rollout_error_pct"] for k in sorted(network)])
        f = np.array([network[k]["rollout_error_pct"] for k in sorted(network)])
        for target, method, precision in (("cpu-x86", "ptq-minmax", "w8a8"),
                                          ("reference", "ptq-mse", "w4a8")):  # fmt: skip
            run = _metrics(study_run, f"{target}/{method}/{precision}")["metrics"]
            q = np.array([run["per_simulation"][k]["rollout_error_pct"] for k in sorted(network)])
            at = {**fp32_run, "target": target, "method": method, "precision": precision}
            kept = float(cube["retained_gain_rollout_pct"].sel(at))
            assert kept == pytest.approx(100 * np.mean(b - q) / np.mean(b - f), rel=1e-9)
            low = float(cube["retained_gain_rollout_pct_ci_low"].sel(at))
            high = float(cube["retained_gain_rollout_pct_ci_high"].sel(at))
            assert low <= kept <= high
    report = (study_run / "results/report/index.html").read_text()
    assert "oscillator" in report and "rollout error" in report.replace("_", " ")
    assert "euler: the baseline of the retained gain" in report
    assert "retained gain rollout" in report.replace("_", " ").lower()
    # OpenVINO INT8 with full-range weights evaluated on a CPU without VNNI: named as such
    assert ("int8 overflow: openvino-cpu · ptq-minmax · w8a8" in report) == (not cpu_has_vnni())
    assert (study_run / "results/oscillator/overview.png").stat().st_size > 0


def test_submit_runs_the_same_commands(site: Path, study_run: Path, tmp_path: Path) -> None:
    """`sciquant submit` (local processes here, Slurm job arrays on a cluster) runs the plug-in's
    stages with the rules' arguments: the same deterministic FP32 and INT8 results."""
    result = subprocess.run(
        [str(BIN / "sciquant"), "submit", "--config", str(EXAMPLE / "study.yaml"),
         "--stage", "all", "--executor", "local", "--workdir", str(tmp_path),
         "--runs", "target=reference,cpu-x86", "method=none,ptq-minmax"],
        env=_env(site), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for run in ("reference/none/fp32", "cpu-x86/none/fp32", "cpu-x86/ptq-minmax/w8a8"):
        ours = _metrics(tmp_path, run)["metrics"]
        theirs = _metrics(study_run, run)["metrics"]
        for key in ("step_error_pct", "rollout_error_pct"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (run, key)


def test_a_broken_plugin_is_named(tmp_path: Path) -> None:
    """A plug-in whose module does not import: the error names its entry point and the cause."""
    info = tmp_path / "broken_workload-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-workload\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sciquant.workloads]\nbroken = no_such_module:Broken\n")
    result = subprocess.run(
        [str(BIN / "sciquant"), "check-config", str(ROOT / "workflow/config/ci.yaml")],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "workload 'broken' (no_such_module:Broken" in result.stderr
    assert "ModuleNotFoundError" in result.stderr and "Traceback" not in result.stderr


def test_per_sample_errors_must_pair_with_the_networks() -> None:
    from sciquant.errors import SciquantError
    from sciquant.workloads.pytorch import TorchWorkload

    class Tiny(TorchWorkload):
        name = "tiny"

    workload = Tiny()
    table = workload._per_sample("sample_errors", {"rollout_error_pct": np.array([1.0, 2.5])})
    assert table == {"sample_00000": {"rollout_error_pct": 1.0},
                     "sample_00001": {"rollout_error_pct": 2.5}}  # fmt: skip
    # a baseline with another number of errors than the network's cannot be paired
    with pytest.raises(SciquantError, match="3 values of rollout_error_pct where the network"):
        workload._per_sample("baseline_sample_errors['euler']", {"rollout_error_pct": [1, 2, 3]}, 2)
    with pytest.raises(SciquantError, match="tiny: sample_errors gives 0 values"):
        workload._per_sample("sample_errors", {"rollout_error_pct": []})
