"""A study of a few hundred runs on the real local Slurm cluster, batched (config `batch`).

(a) 222 runs (3 seeds × 74) under `batch.max_jobs: 20` submit exactly the jobs the planner
    predicts, at most 20, with one status query (`squeue`) per poll for all of them: the queries
    follow the wall time, not the runs;
(b) the same study run locally (`snakemake --cores 2`, seed 0's 74 runs, from the Slurm run's
    trainings) writes the same metrics;
(c) a batch whose run fails (SCIQUANT_FAIL_STAGE, passed through Slurm) keeps its finished runs;
    the rerun submits that batch alone (and the cube and report), links its finished runs back,
    computes the failed one, and its metrics equal the clean run's.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from sciquant import batch
from sciquant.study import Study, load_config

from .test_workflow_slurm import (
    BIN,
    FAULT,
    REPO,
    copy_upstream,
    run_to_end,
    science,
    slurm_jobs,
    start,
)

CAP = 20
SEEDS = [0, 1, 2]
RUNS_PER_TRAINING = 1 + 2 * 35 + 3
#: A run of seed 1 whose evaluation fails in scenario (c), and its batch's log.
FAILING = "results/bloodflow/meshgraphnet/seed1/reference/ptq-percentile/w4a6"
COUNTER = """\
#!/bin/sh
# {name} of the cluster, each call counted in {calls}
echo "$*" >> {calls}
exec {real} "$@"
"""


def write_config(workdir: Path) -> Path:
    """The ci study's residual model, trained on CPU nodes, under a sweep of 74 runs a
    training: PTQ min/max and percentile at every weight × activation width (simulated),
    OpenVINO's FP32, BF16 and paired INT8."""
    config = yaml.safe_load((REPO / "workflow" / "config" / "ci.yaml").read_text())
    config["study"] = "batches"
    config["seeds"] = SEEDS
    config["models"] = {"meshgraphnet": config["models"]["meshgraphnet"]}
    widths = [f"w{w}a{a}" for w in range(2, 9) for a in range(4, 9)]
    config["quantize"] = {
        "sweeps": [
            {"targets": ["reference"], "methods": ["ptq-minmax", "ptq-percentile"],
             "precisions": widths},
            {"targets": ["openvino-cpu"], "methods": ["none"], "precisions": ["bf16"]},
            {"targets": ["openvino-cpu"], "methods": ["ptq-minmax"], "precisions": ["w8a8"]},
        ]
    }  # fmt: skip
    config["nodes"] = {"cpu": {"slurm_partition": "cpu"}}
    config["batch"] = {"max_jobs": CAP}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def counting_path(cluster, folder: Path) -> str:
    """A PATH whose `squeue` and `sbatch` count their calls (in folder/<name>.calls)."""
    folder.mkdir(parents=True)
    path = cluster.env()["PATH"]
    for name in ("squeue", "sbatch"):
        real = shutil.which(name, path=path)
        assert real, f"{name} not on the cluster's PATH"
        wrapper = folder / name
        wrapper.write_text(COUNTER.format(name=name, calls=folder / f"{name}.calls", real=real))
        wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{BIN}{os.pathsep}{path}"


def calls(folder: Path, name: str) -> list[str]:
    log = folder / f"{name}.calls"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def batched_run(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("batched")
    write_config(workdir)
    counters = workdir / "counters"
    path = counting_path(slurm_cluster, counters)
    sm = start(slurm_cluster, workdir, name="batched", env={"PATH": path})
    rc = sm.wait(timeout=900)
    return workdir, sm, rc, sm.elapsed, counters


def test_batched_study_submits_at_most_the_cap(slurm_cluster, batched_run, record_property):
    workdir, sm, rc, elapsed, counters = batched_run
    assert rc == 0, sm.text()[-6000:]
    study = Study(load_config(workdir / "config.yaml"))
    assert len(study.runs()) == len(SEEDS) * RUNS_PER_TRAINING == 222
    assert len(list((workdir / "results").glob("*/*/seed*/*/*/*/metrics.json"))) == 222

    jobs = slurm_jobs(slurm_cluster, sm)
    submitted = len(calls(counters, "sbatch"))
    queries = [line for line in calls(counters, "squeue") if "--name" in line]
    print(
        f"\n222 runs on Slurm: {len(jobs)} jobs (cap {CAP}, batch size "
        f"{batch.batch_size(study)}), {len(queries)} status queries in {elapsed:.0f} s"
    )
    record_property("batched_slurm_jobs", len(jobs))
    record_property("batched_status_queries", len(queries))
    record_property("batched_wall_s", round(elapsed, 1))
    # every job but the local `all`, each submitted once, all completed
    assert len(jobs) == submitted == batch.job_count(study) - 1 <= CAP, jobs
    assert all(job["State"] == "COMPLETED" for job in jobs), jobs
    rules = [job["rule"] for job in jobs]
    assert sum(rule.startswith("batch_") for rule in rules) == len(SEEDS) * len(batch.plan(study))
    assert not {"quantize", "evaluate_run", "evaluate_fp32"} & set(rules)
    # one query per poll for all active jobs: at most one per 2 s (the first poll's delay)
    assert 1 <= len(queries) <= elapsed / 2 + 2, queries
    assert len(queries) < 222 / 2


@pytest.fixture(scope="module")
def scenarios(slurm_cluster, batched_run, tmp_path_factory):
    """(b) and (c), started together on copies of the batched run."""
    clean, _, rc, _, _ = batched_run
    if rc != 0:
        pytest.skip("the batched run failed (see test_batched_study_submits_at_most_the_cap)")
    with ThreadPoolExecutor(2) as pool:
        local = pool.submit(local_scenario, clean, tmp_path_factory.mktemp("local"))
        fault = pool.submit(fault_scenario, slurm_cluster, clean, tmp_path_factory.mktemp("fault"))
        yield {"local": local, "fault": fault}


def local_scenario(clean: Path, workdir: Path) -> dict:
    """Seed 0's runs with the default (local) profile, from the Slurm run's training."""
    import subprocess

    copy_upstream(clean, workdir, "resources", "results/bloodflow/prepared",
                  "results/bloodflow/meshgraphnet/seed0/fp32")  # fmt: skip
    write_config(workdir)
    targets = [
        f"{run.folder}/metrics.json"
        for run in Study(load_config(workdir / "config.yaml")).runs()
        if run.seed == 0
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(FAULT, None)
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), *targets, "--cores", "2",
         "--directory", str(workdir), "--configfile", str(workdir / "config.yaml")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    return {"workdir": workdir, "result": result, "runs": targets}


def fault_scenario(cluster, clean: Path, workdir: Path) -> dict:
    """The clean run's results less one run; that run's evaluation fails; then the rerun."""
    shutil.copytree(clean / "resources", workdir / "resources")
    shutil.copytree(clean / "results", workdir / "results")
    write_config(workdir)
    # its batch must run again, and the cube and report that read it
    for path in (f"{FAILING}/metrics.json", "results/summary/metrics.nc",
                 "results/summary/metrics.csv", "results/report/index.html"):  # fmt: skip
        (workdir / path).unlink()
    fault = {FAULT: f"evaluate:{FAILING.removeprefix('results/')}"}
    failed, failed_rc = run_to_end(cluster, workdir, "--retries", "0", name="fault", timeout=600,
                                   env=fault)  # fmt: skip
    finished = workdir / batch.FINISHED
    kept = len(list(finished.glob("*/complete"))) if finished.is_dir() else 0
    study = Study(load_config(workdir / "config.yaml"))
    (owner,) = [b for b in batch.plan(study) if FAILING in {run.folder for run in b.runs(1)}]
    failed_log = (workdir / owner.log(1)).read_text()
    rerun, rerun_rc = run_to_end(cluster, workdir, "--retries", "0", name="rerun", timeout=600)
    return {"workdir": workdir, "failed": failed, "failed_rc": failed_rc, "kept": kept,
            "owner": owner, "failed_log": failed_log, "rerun": rerun,
            "rerun_rc": rerun_rc}  # fmt: skip


def test_local_run_writes_the_same_metrics(batched_run, scenarios) -> None:
    clean = batched_run[0]
    local = scenarios["local"].result()
    result = local["result"]
    assert result.returncode == 0, result.stderr[-6000:]
    assert len(local["runs"]) == RUNS_PER_TRAINING
    for metrics in local["runs"]:
        assert science(local["workdir"] / metrics) == science(clean / metrics), metrics


def test_failed_batch_reruns_alone_and_links_its_finished_runs_back(
    slurm_cluster, batched_run, scenarios
) -> None:
    clean = batched_run[0]
    fault = scenarios["fault"].result()
    workdir, failed, rerun = fault["workdir"], fault["failed"], fault["rerun"]
    assert fault["failed_rc"] != 0, failed.text()[-4000:]
    owner = fault["owner"]
    size = len(owner.combos)
    assert fault["kept"] == size - 1  # every other run of the batch, finished and kept
    log = fault["failed_log"]
    assert f"{FAILING}: FAILED in evaluate" in log and f"1 of {size} runs failed" in log, log
    assert log.count(": done in") == size - 1, log

    assert fault["rerun_rc"] == 0, rerun.text()[-4000:]
    rules = sorted(job["rule"] for job in slurm_jobs(slurm_cluster, rerun))
    assert rules == sorted([owner.rule, "aggregate", "report"]), rules
    log = (workdir / owner.log(1)).read_text()
    assert log.count("linked back") == size - 1, log
    assert f"{FAILING}: done" in log and log.count(": done in") == 1, log
    for run in owner.runs(1):
        metrics = f"{run.folder}/metrics.json"
        assert science(workdir / metrics) == science(clean / metrics), metrics
