"""The workflow as users drive it: dry runs, lint, formatting, config errors, a tiny full run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sciquant.launch import select_runs
from sciquant.quant.debug import OVERFLOW_RISK
from sciquant.runtime.onnxruntime import cpu_has_vnni
from sciquant.study import Run, Study, is_paired, load_config, run_artifacts

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


def test_dry_run_default_study(tmp_path: Path) -> None:
    # In a fresh directory: the checkout may hold a finished study (`make demo`), and a dry run
    # there has nothing to do.
    result = snakemake("-n", "--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "evaluate_fp32" in result.stdout and "synthesize" in result.stdout
    # openvino-avx2 runs openvino-cpu's FP32 graph: one FP32 run and export for both
    assert "openvino-cpu/none/fp32/metrics.json" in result.stdout
    assert "openvino-avx2/none/fp32" not in result.stdout


def test_validating_a_study_loads_no_solver() -> None:
    """Every Snakemake start (a dry run, each Slurm job) and batch job validates the study: it
    checks the simulator's parameters without importing the simulator, SciPy's optimizers,
    numba or VTK (seconds a process), and still refuses impossible ones."""
    code = (
        "import sys, yaml\n"
        "from sciquant.errors import SciquantError\n"
        "from sciquant.study import Study, load_config\n"
        f"Study(load_config({str(ROOT / 'workflow/config/default.yaml')!r}))\n"
        f"config = yaml.safe_load(open({str(CI_CONFIG)!r}))\n"
        "config['datasets']['bloodflow']['source']['embedded']['parameters'] = "
        "{'length_range': [5.0, 2.0]}\n"
        "try:\n"
        "    Study(config)\n"
        "except SciquantError as error:\n"
        "    print('refused:', error)\n"
        "heavy = ('sciquant.workloads.bloodflow.sim', 'numba', 'vtk', 'scipy.optimize')\n"
        "print('loaded:', sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout
    assert "refused: config key datasets.bloodflow.source.embedded.parameters" in result.stdout
    assert "length_range" in result.stdout and "swap them" in result.stdout, result.stdout


def test_targets_sharing_an_fp32_graph_get_one_fp32_run(tmp_path: Path) -> None:
    """openvino-avx2's W8A8 run is paired with openvino-cpu's FP32 run, also in a study that
    sweeps openvino-avx2 alone; the targets on other runtimes keep their own."""
    config = load_config(ROOT / "workflow" / "config" / "default.yaml")
    study = Study(config)
    fp32 = [r.target for r in study.runs() if r.model == "meshgraphnet" and r.method == "none"
            and r.precision == "fp32"]  # fmt: skip
    assert fp32 == ["reference", "cpu-x86", "openvino-cpu"]
    avx2 = Run("bloodflow", "meshgraphnet", 0, "openvino-avx2", "ptq-mse", "w8a8")
    folder = "results/bloodflow/meshgraphnet/seed0"
    for sweeps in (config["quantize"]["sweeps"], [
        {"models": ["meshgraphnet"], "targets": ["openvino-avx2"], "methods": ["ptq-mse"],
         "precisions": ["w8a8"]},
    ]):  # fmt: skip
        study = Study(config | {"quantize": config["quantize"] | {"sweeps": sweeps}})
        assert Run("bloodflow", "meshgraphnet", 0, "openvino-cpu", "none", "fp32") in study.runs()
        assert is_paired(study, avx2)
        artifacts = run_artifacts(study, avx2)
        assert artifacts["baseline_onnx"] == f"{folder}/openvino-cpu/none/fp32/model.onnx"
        assert artifacts["onnx"] == f"{folder}/openvino-avx2/ptq-mse/w8a8/model.onnx"
    # `sciquant submit --runs target=openvino-avx2` takes that FP32 run too
    selected = select_runs(Study(config), ["target=openvino-avx2", "model=meshgraphnet"])
    assert [r.folder.removeprefix(f"{folder}/") for r in selected] == [
        "openvino-cpu/none/fp32", "openvino-avx2/ptq-mse/w8a8"]  # fmt: skip
    assert select_runs(Study(config), ["target=openvino-avx2", "precision=w8a8"]) == [avx2]


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
    for model in config["models"].values():
        model["datasets"] = ["vessels"]
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
    if "models" in change:  # the ci study's sweeps name models these changes replace
        config.pop("quantize", None)
    config.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_two_study_files_are_refused_not_merged(tmp_path: Path) -> None:
    """A study is one file: two --configfile paths would merge key by key into a study that no
    file describes; the dry run refuses them, naming both, and the invalid one's errors name
    their file."""
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(CI_CONFIG.read_text()), "study": "other"}))
    result = snakemake("-n", "--configfile", str(CI_CONFIG), str(other), "--directory",
                       str(tmp_path))  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"--configfile got 2 files ({CI_CONFIG}, {other}); a study is one file" in output
    other.write_text(yaml.safe_dump({**yaml.safe_load(CI_CONFIG.read_text()), "seed": [0]}))
    result = snakemake("-n", "--configfile", str(other), "--directory", str(tmp_path))
    output = result.stdout + result.stderr
    assert f"invalid study config {other}:" in output and "did you mean 'seeds'?" in output
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
def test_ci_study_end_to_end(ci_study: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp_path, result = ci_study  # run once for this test and test_batch's (tests/conftest.py)
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
    # The no-network baselines beside the run, per test simulation.
    for baseline in ("lumped_model", "calibrated_model"):
        values = metrics["baselines"][baseline]
        assert set(values["per_simulation"]) == set(metrics["metrics"]["per_simulation"])
    # The reference formulation, switched in the config, trains and evaluates too; the seed's
    # dynamic INT8 runs on it on ONNX Runtime.
    reference = tmp_path / "results/bloodflow/meshgraphnet_reference/seed0"
    for run_dir in ("reference/none/fp32", "cpu-x86/ptq-dynamic/w8a8"):
        payload = json.loads((reference / run_dir / "metrics.json").read_text())
        assert payload["metrics"]["flowrate_error_pct"] > 0, run_dir
    # Every timed run beside its target's FP32 in the same process: a paired speed-up with
    # its interval, the contention measured, the CPU's int8/bf16 features recorded.
    residual = tmp_path / "results/bloodflow/meshgraphnet/seed0"
    timed = {
        reference / "cpu-x86/ptq-dynamic/w8a8": "onnxruntime",
        residual / "openvino-cpu/ptq-minmax/w8a8": "openvino",
        residual / "openvino-cpu/none/bf16": "openvino",
    }
    for folder, runtime in timed.items():
        payload = json.loads((folder / "metrics.json").read_text())
        values = payload["metrics"]
        if payload["simulated"]:  # bf16 on a CPU without a bf16 unit: a simulation, untimed
            assert folder.name == "bf16" and "paired_speedup" not in values
            continue
        assert payload["runtime"] == runtime, folder
        assert values["timing_pairs"] == 2 and 0 < values["cpu_share"] <= 1.5
        for name in ("paired_speedup", "paired_step_speedup"):
            assert values[f"{name}_ci_low"] <= values[name] <= values[f"{name}_ci_high"]
        assert set(payload["host"]["cpu_features"]) >= {"avx2", "avx512_vnni", "amx_int8"}
        if runtime == "openvino":  # INT8's saturation on a CPU without VNNI, named (or not)
            exposed = folder.name == "w8a8" and not cpu_has_vnni()
            assert values[OVERFLOW_RISK] == float(exposed), folder
    for folder in (residual / "openvino-cpu/none/fp32", reference / "cpu-x86/none/fp32"):
        values = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert values["paired_speedup"] == 1.0 and values["rollout_time_s_median"] > 0
    # The quantized run of the residual model gets its retained gain in the cube.
    table = (tmp_path / "results/summary/metrics.csv").read_text().splitlines()
    assert "retained_gain_pressure_pct" in table[0] and "paired_step_speedup" in table[0]
    # Nothing to do on a second run.
    again = snakemake("-n", "--configfile", str(CI_CONFIG), "--directory", str(tmp_path))
    assert "Nothing to be done" in again.stdout + again.stderr


def reordered(value):
    """The same mapping with its keys (at every depth) in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


@pytest.mark.slow
def test_extending_a_finished_study_reruns_only_what_changed(
    ci_study: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """On the finished ci study (a dry run; nothing is changed): its config written with every
    key in another order reruns nothing; another error budget reruns only the report; a seed
    and a sweep entry added run only the new trainings and runs (and the cube and report), and
    so do a dataset and a model added (each run's provenance hashes only the config sections
    it depends on)."""
    workdir, result = ci_study
    assert result.returncode == 0, result.stderr[-4000:]
    config = yaml.safe_load(CI_CONFIG.read_text())

    def dry_run(changed: dict) -> list[dict]:
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        return dry_run_jobs("--configfile", str(path), "--directory", str(workdir))

    assert dry_run(reordered(config)) == []
    budget = {**config, "report": {"budget": {"metric": "pressure_error_pct", "max_value": 50}}}
    assert {job["rule"] for job in dry_run(budget)} == {"report", "all"}

    extended = json.loads(json.dumps(config))
    extended["seeds"] = [0, 1]
    extended["quantize"]["sweeps"].append(
        {"models": ["meshgraphnet"], "targets": ["reference"], "methods": ["ptq-mse"],
         "precisions": ["w8a8"]}
    )  # fmt: skip
    jobs = dry_run(extended)
    assert {"train", "quantize", "evaluate_run", "aggregate", "report"} <= {j["rule"] for j in jobs}
    for job in jobs:
        if job["rule"] in ("aggregate", "report", "all"):
            continue
        wildcards = job["wildcards"]
        new_run = wildcards.get("method") == "ptq-mse"
        assert wildcards.get("seed") == "1" or new_run, job  # nothing of seed 0 but the new run

    grown = json.loads(json.dumps(config))
    grown["datasets"]["bloodflow_b"] = {
        **grown["datasets"]["bloodflow"],
        "source": {"embedded": {"n_simulations": 6, "seed": 2}},
    }
    grown["models"]["meshgraphnet"]["datasets"].append("bloodflow_b")
    grown["models"]["meshgraphnet_b"] = {**grown["models"]["meshgraphnet"], "hidden": 8}
    grown["models"]["meshgraphnet_b"]["datasets"] = ["bloodflow"]
    grown["quantize"]["sweeps"].append(
        {"models": ["meshgraphnet_b"], "targets": ["reference"], "methods": ["ptq-minmax"],
         "precisions": ["w8a8"]}
    )  # fmt: skip
    jobs = dry_run(grown)
    assert {"synthesize", "train", "quantize", "evaluate_fp32", "report"} <= {
        j["rule"] for j in jobs
    }
    for job in jobs:
        if job["rule"] in ("aggregate", "report", "all"):
            continue
        wildcards = job["wildcards"]
        # nothing of the trainings and runs the study had
        new = (wildcards.get("dataset"), wildcards.get("model"))
        assert "bloodflow_b" in new or "meshgraphnet_b" in new, job


@pytest.mark.slow
def test_md_study_end_to_end(tmp_path: Path) -> None:
    """The md workload through every stage: embedded MD → pixel maps → ICNNMD → PTQ/QAT
    simulation and LiteRT FP32/FP16/INT8 → cube and report."""
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["datasets"] = {
        "gpcr": {
            "workload": "md",
            "source": {"embedded": {"n_beads": 90, "frames": 160, "seed": 0}},
            "prepare": {"frames_per_trajectory": 160, "gap": 2},
        }
    }
    config["models"] = {
        "icnnmd": {
            "architecture": "icnnmd",
            "datasets": ["gpcr"],
            "train": {"epochs": 3, "batch_size": 32, "learning_rate": 1e-3},
        }
    }
    config["quantize"] = {
        "sweeps": [
            {
                "targets": ["reference"],
                "methods": ["ptq-minmax", "qat-lsq"],
                "precisions": ["w4a8"],
            },
            {"targets": ["litert-cpu"], "methods": ["ptq-minmax"], "precisions": ["w8a8"]},
            {"targets": ["litert-cpu"], "methods": ["none"], "precisions": ["fp16"]},
        ],
        "qat": {"epochs": 1},
        "calibration_frames": 32,
    }
    config["evaluate"] = {"latency_repeats": 5}
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(
        "--cores", "2", "--configfile", str(path), "--directory", str(tmp_path), timeout=900
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    runs = tmp_path / "results/gpcr/icnnmd/seed0"
    expected = {
        ("reference", "none", "fp32"): ("keras", False),
        ("reference", "ptq-minmax", "w4a8"): ("keras", True),
        ("reference", "qat-lsq", "w4a8"): ("keras", True),
        ("litert-cpu", "none", "fp32"): ("litert", False),
        ("litert-cpu", "none", "fp16"): ("litert", False),
        ("litert-cpu", "ptq-minmax", "w8a8"): ("litert", False),
    }
    for (target, method, precision), (runtime, simulated) in expected.items():
        folder = runs / target / method / precision
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["coordinates"]["precision"] == precision
        assert (metrics["runtime"], metrics["simulated"]) == (runtime, simulated), folder
        values = metrics["metrics"]
        assert 0.0 <= values["accuracy"] <= 1.0
        assert sum(map(sum, values["confusion"])) == values["test_frames"] > 0
        if simulated:  # a simulation's latency would be fake-quant overhead: not timed
            assert "latency_ms_median" not in values
        else:
            assert values["latency_ms_median"] > 0 and values["compute_ms_median"] > 0
            if (target, method, precision) == ("litert-cpu", "ptq-minmax", "w8a8"):
                low, high = values["paired_speedup_ci_low"], values["paired_speedup_ci_high"]
                assert low <= values["paired_speedup"] <= high and values["timing_pairs"] == 5
            elif method == "none" and precision == "fp32":
                assert values["paired_speedup"] == 1.0
        assert (folder / "confusion.png").stat().st_size > 5_000
    assert (runs / "litert-cpu/ptq-minmax/w8a8/model.tflite").is_file()
    assert (tmp_path / "results/gpcr/overview.png").stat().st_size > 10_000
    cube = (tmp_path / "results/summary/metrics.csv").read_text()
    assert cube.count("\ngpcr,icnnmd,0,") == len(expected)
    report = (tmp_path / "results/report/index.html").read_text()
    assert "gpcr · icnnmd" in report and "accuracy" in report

    # Batched (config `batch`, 4 runs a job: Keras conversions and LiteRT in one process),
    # from the same data and training: the same metrics.
    from .slurm.test_workflow_slurm import science

    batched = tmp_path / "batched"
    for part in ("resources", "results/gpcr/prepared", "results/gpcr/overview.png",
                 "results/gpcr/icnnmd/seed0/fp32"):  # fmt: skip
        source, target = tmp_path / part, batched / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    config["batch"] = {"size": 4}
    (batched / "md.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("--cores", "2", "--configfile", str(batched / "md.yaml"),
                       "--directory", str(batched), timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule evaluate_md:" not in result.stdout + result.stderr
    for target, method, precision in expected:
        folder = f"results/gpcr/icnnmd/seed0/{target}/{method}/{precision}"
        assert science(batched / folder / "metrics.json") == science(
            tmp_path / folder / "metrics.json"
        ), folder


def dry_run_jobs(*args: str) -> list[dict]:
    """Every job of a dry run: rule name, wildcards and resources as Snakemake prints them."""
    result = snakemake("-n", *args, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    jobs: list[dict] = []
    for line in result.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            jobs.append({"rule": stripped.split()[1][:-1], "wildcards": {}, "resources": {}})
        elif jobs and stripped.startswith(("wildcards: ", "resources: ")):
            key, _, values = stripped.partition(": ")
            for item in values.split(", "):
                name, _, value = item.partition("=")
                jobs[-1][key][name] = value
    return jobs


def test_paper_study_routes_gpu_targets_to_their_nodes_on_slurm() -> None:
    """Evaluations of TensorRT runs ask for exactly their GPU type; every other job (CPU
    targets, the reference, training, data, report) asks for no GPU."""
    jobs = dry_run_jobs(
        "--profile", str(ROOT / "profiles" / "slurm"),
        "--configfile", str(ROOT / "workflow" / "config" / "paper.yaml"),
    )  # fmt: skip
    nodes = yaml.safe_load((ROOT / "workflow" / "config" / "paper.yaml").read_text())["nodes"]
    seen = {"v100": 0, "rtx3090": 0, "cpu": 0}
    for job in jobs:
        if job["rule"] == "all":
            continue
        target = job["wildcards"].get("target", "")
        node = {"trt-v100": "v100", "trt-rtx3090": "rtx3090"}.get(target, "cpu")
        if not job["rule"].startswith("evaluate"):
            node = "cpu"  # quantization (calibration, QAT) and export run on CPU nodes
        resources = job["resources"]
        expected = nodes[node]
        assert resources["slurm_partition"] == expected["slurm_partition"], job
        if node == "cpu":
            assert resources.get("gpu", "0") == "0", job
            assert resources.get("gpu_model", "") == "" and resources.get("constraint", "") == "", (
                job
            )
        else:
            assert resources["gpu"] == "1", job
            assert resources["gpu_model"] == node and resources["constraint"] == node, job
        seen[node] += 1
    # per seed and GPU type: INT8 of 3 methods, FP16 and FP32 rollouts
    assert seen["v100"] == seen["rtx3090"] == 3 * (3 + 1 + 1), seen
    assert seen["cpu"] > 300, seen


def test_paper_study_batched_routes_gpu_runs_to_their_nodes(tmp_path: Path) -> None:
    """Batched (`batch.size: 8`), a batch holds the runs of one node type: TensorRT runs in
    batches that ask for their GPU type, every other batch for no GPU."""
    from sciquant import batch
    from sciquant.study import Study, load_config

    config = yaml.safe_load((ROOT / "workflow" / "config" / "paper.yaml").read_text())
    config["batch"] = {"size": 8}
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    study = Study(load_config(path))
    for planned in batch.plan(study):
        for run in planned.runs(0):
            assert study.node(run) == planned.node, (planned.rule, run)
    jobs = dry_run_jobs("--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(path))
    seen = {"v100": 0, "rtx3090": 0, "cpu": 0}
    for job in jobs:
        if not job["rule"].startswith("batch_"):
            assert not job["rule"].startswith(("evaluate", "quantize", "export")), job
            continue
        node = next(n for n in seen if f"_{n}_" in job["rule"])
        resources, expected = job["resources"], config["nodes"][node]
        assert resources["slurm_partition"] == expected["slurm_partition"], job
        if node == "cpu":
            assert resources.get("gpu", "0") == "0" and resources.get("constraint", "") == "", job
        else:
            assert resources["gpu"] == "1", job
            assert resources["gpu_model"] == node and resources["constraint"] == node, job
        size = len(next(b for b in batch.plan(study) if b.rule == job["rule"]).combos)
        # minutes_per_run × its runs, or its node type's runtime where larger
        assert int(resources["runtime"]) == max(15 * size, expected.get("runtime", 0)), job
        seen[node] += 1
    seeds = len(config["seeds"])
    # per seed and GPU type one batch: its 5 runs (INT8 of 3 methods, FP16, FP32)
    assert seen["v100"] == seen["rtx3090"] == seeds, seen
    assert seen["cpu"] == seeds * sum(1 for b in batch.plan(study) if b.node == "cpu")
