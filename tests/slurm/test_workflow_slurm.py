"""The sciquant workflow on a real one-node Slurm cluster, through `profiles/slurm`.

(a) the `ci` study runs end to end, one Slurm job per rule instance; the train job (node type
    `v100` in the config's `nodes:`) carries the partition, constraint and GPU request, the others
    request no GPU;
(b) a stage failing (SCIQUANT_FAIL_STAGE=evaluate, passed through Slurm to the job) fails the run
    naming the stage's log; the rerun executes only the failed job and its dependents, and its
    metrics equal the clean run's;
(c) the train job cancelled with `scancel` after its first epoch makes Snakemake fail (not hang);
    the rerun resumes from the last epoch checkpoint;
(d) `--retries` resubmits a failed job with more memory and time (mem_mb/runtime × attempt).

(a) runs first, alone (its wall time is the one to compare); (b), (c) and (d) start from a copy
of (a)'s upstream outputs and run concurrently (their Snakemake processes mostly wait for status
polls). Every wait is bounded; a hung Snakemake gets SIGINT (it cancels its jobs), then SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from .test_cluster import TEST_OVERRIDES, Snakemake, sacct_rows, wait_for_job

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAULT = "SCIQUANT_FAIL_STAGE"
TRAINING = "results/bloodflow/meshgraphnet/seed0/fp32"
CHECKPOINT = f"{TRAINING}/checkpoint.pt"
FP32_RUN = "results/bloodflow/meshgraphnet/seed0/reference/none/fp32"
EVALUATE_LOG = "logs/bloodflow/meshgraphnet/seed0/reference/none/fp32/evaluate.log"
TRAIN_LOG = "logs/bloodflow/meshgraphnet/seed0/train.log"
NODES = {
    "cpu": {"slurm_partition": "cpu"},
    "v100": {"slurm_partition": "gpu", "constraint": "v100", "gpu": 1, "gpu_model": "v100"},
}
CI_RULES = ["synthesize", "prepare", "overview", "train", "evaluate_fp32", "aggregate", "report"]


# ------------------------------------------------------------------------------------ helpers


def write_config(workdir: Path, **train) -> Path:
    """The ci study's residual model, FP32 only, trained on the `v100` node type (and `train`
    overrides)."""
    config = yaml.safe_load((REPO / "workflow" / "config" / "ci.yaml").read_text())
    # The cluster's plumbing is tested on one model's FP32 runs: every extra job is minutes of
    # Slurm polling (test_batches_slurm runs a quantization sweep, batched).
    config["models"] = {"meshgraphnet": config["models"]["meshgraphnet"]}
    config.pop("quantize", None)
    config["models"]["meshgraphnet"]["train"].update(node="v100", **train)
    config["nodes"] = NODES
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(cluster, workdir: Path, *extra: str, name: str, env: dict | None = None) -> Snakemake:
    """snakemake --profile profiles/slurm on the repository's Snakefile, in `workdir`."""
    environment = cluster.env()
    environment.pop(FAULT, None)
    environment["PATH"] = f"{BIN}{os.pathsep}{environment['PATH']}"  # rules call `sciquant`
    environment.update(env or {})
    cmd = [
        str(BIN / "snakemake"),
        "--profile", str(REPO / "profiles" / "slurm"),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        *TEST_OVERRIDES,
        *extra,
    ]  # fmt: skip
    return Snakemake(cmd, workdir, environment, name)


def interrupt(sm: Snakemake) -> None:
    """Stop a still running Snakemake (SIGINT: it scancels its jobs), bounded."""
    if sm.proc.poll() is None:
        sm.proc.send_signal(signal.SIGINT)
        try:
            sm.wait(timeout=30)
        except AssertionError:
            pass


def run_to_end(cluster, workdir: Path, *extra: str, name: str, timeout: float,
               env: dict | None = None) -> tuple[Snakemake, int]:  # fmt: skip
    """start(...) and wait for it, bounded; a hung one is interrupted. (process, exit status)"""
    sm = start(cluster, workdir, *extra, name=name, env=env)
    try:
        return sm, sm.wait(timeout=timeout)
    finally:
        interrupt(sm)


def copy_upstream(source: Path, workdir: Path, *paths: str) -> None:
    """Copy finished outputs (mtimes kept, so Snakemake sees them as up to date)."""
    for path in paths:
        target = workdir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if (source / path).is_dir():
            shutil.copytree(source / path, target)
        else:
            shutil.copy2(source / path, target)


def job_stats(log: str) -> dict[str, int]:
    """Snakemake's own "Job stats" table (the jobs it is about to run) of a run's log."""
    table = log.split("Job stats:", 1)[1].split("total", 1)[0]
    rows = (line.split() for line in table.splitlines()[3:])
    return {row[0]: int(row[1]) for row in rows if len(row) == 2}


def rules_started(log: str) -> list[str]:
    return re.findall(r"^(?:local)?rule (\w+):$", log, flags=re.MULTILINE)


def slurm_jobs(cluster, sm: Snakemake) -> list[dict[str, str]]:
    """sacct records of the run's jobs (job name = run UUID), each with its rule, completed."""
    fields = "JobID,Comment,State,Partition,Account,ReqTRES,Constraints,Timelimit"
    rows = sacct_rows(cluster, "--name", sm.run_uuid(), fields="JobID")
    for row in rows:
        wait_for_job(cluster, row["JobID"], timeout=60)  # the record is complete
    rows = sacct_rows(cluster, "--name", sm.run_uuid(), fields=fields)
    for row in rows:
        row["rule"] = row["Comment"].removeprefix("rule_").split("_wildcards_")[0]
    return sorted(rows, key=lambda row: int(row["JobID"]))


def science(metrics_file: Path) -> dict[str, object]:
    """A metrics.json without provenance, the host and timings, flattened to dotted keys."""
    from sciquant.report.cube import TIME_PATTERN, TIMING_DETAILS

    payload = json.loads(metrics_file.read_text())
    payload.pop("provenance")
    payload.pop("host", None)  # the load average changes from run to run
    payload["metrics"] = {
        k: v
        for k, v in payload["metrics"].items()
        if "time" not in k
        and not TIME_PATTERN.search(k)  # e.g. compute_median_ms
        and k not in TIMING_DETAILS
        and not k.startswith("paired_")
    }
    return _flat(payload)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def assert_same_science(ours: Path, theirs: Path, rel: float = 1e-9) -> None:
    """Two metrics.json agree on coordinates and errors (floats within `rel`)."""
    a, b = science(ours), science(theirs)
    assert a.keys() == b.keys(), (a, b)
    floats = [key for key, value in b.items() if isinstance(value, float)]
    assert {k: a[k] for k in floats} == pytest.approx({k: b[k] for k in floats}, rel=rel)
    assert {k: v for k, v in a.items() if k not in floats} == {
        k: v for k, v in b.items() if k not in floats
    }


# ------------------------------------------------------------------------------------ (a)


@pytest.fixture(scope="module")
def clean_run(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean")
    write_config(workdir)
    sm = start(slurm_cluster, workdir, name="clean")
    rc = sm.wait(timeout=420)
    return workdir, sm, rc


def test_ci_study_end_to_end_on_slurm(slurm_cluster, clean_run, record_property):
    workdir, sm, rc = clean_run
    log = sm.text()
    assert rc == 0, log
    print(f"\nci study end to end on Slurm: {sm.elapsed:.1f} s")
    record_property("ci_study_slurm_wall_s", round(sm.elapsed, 1))
    assert science(workdir / FP32_RUN / "metrics.json")["coordinates.seed"] == 0
    assert (workdir / "results/report/index.html").stat().st_size > 0

    jobs = slurm_jobs(slurm_cluster, sm)
    assert Counter(job["rule"] for job in jobs) == Counter(CI_RULES), jobs
    assert job_stats(log) == dict.fromkeys([*CI_RULES, "all"], 1), log
    assert all(job["State"] == "COMPLETED" and job["Account"] == "default" for job in jobs), jobs
    for job in jobs:
        if job["rule"] == "train":  # nodes.v100 of the config
            assert job["Partition"] == "gpu" and job["Constraints"] == "v100", job
            assert "gres/gpu:v100=1" in job["ReqTRES"] and "mem=4000M" in job["ReqTRES"], job
        else:  # nodes.cpu
            assert job["Partition"] == "cpu" and job["Constraints"] == "", job
            assert "gres/gpu" not in job["ReqTRES"], job


# ------------------------------------------------------------------------------------ (b)–(d)


def fault_scenario(cluster, clean: Path, workdir: Path) -> dict:
    """evaluate fails (injected); the rerun without the variable completes the study."""
    copy_upstream(clean, workdir, "resources", "results/bloodflow/prepared",
                  "results/bloodflow/overview.png")  # fmt: skip
    write_config(workdir)
    failed, failed_rc = run_to_end(cluster, workdir, "--retries", "0", name="fault",
                                   timeout=300, env={FAULT: "evaluate"})  # fmt: skip
    after_failure = {
        "rc": failed_rc,
        "stage_log": (workdir / EVALUATE_LOG).read_text(),  # the rerun overwrites it
        "metrics_written": (workdir / FP32_RUN / "metrics.json").exists(),
        "checkpoint_mtime": (workdir / CHECKPOINT).stat().st_mtime_ns,
    }
    rerun, rerun_rc = run_to_end(cluster, workdir, "--retries", "0", name="rerun", timeout=300)
    return {"workdir": workdir, "failed": failed, "rerun": rerun, "rerun_rc": rerun_rc,
            **after_failure}  # fmt: skip


def kill_scenario(cluster, clean: Path, workdir: Path) -> dict:
    """scancel the train job after its first epoch's resume.pt; rerun the training."""
    copy_upstream(clean, workdir, "resources", "results/bloodflow/prepared")
    write_config(workdir, epochs=6, steps_per_epoch=40)  # an epoch: ~2 s
    killed = start(cluster, workdir, CHECKPOINT, "--retries", "0", name="kill")
    try:
        resume = workdir / TRAINING / "resume.pt"
        deadline = time.monotonic() + 180
        while not resume.exists():
            assert killed.proc.poll() is None, f"ended before a checkpoint:\n{killed.text()}"
            assert time.monotonic() < deadline, f"no {resume} after 180 s:\n{killed.text()}"
            time.sleep(0.2)
        queue = cluster.run("squeue", "-h", "-n", killed.run_uuid(), "-o", "%i %T").stdout
        (jobid, state), *_ = (line.split() for line in queue.splitlines())
        cancelled_at = time.monotonic()
        cluster.run("scancel", jobid)
        killed_rc = killed.wait(timeout=150)
        noticed_after = time.monotonic() - cancelled_at
        after_cancel = {
            "jobid": jobid,
            "state_before": state,
            "rc": killed_rc,
            "noticed_after": noticed_after,
            "final_state": wait_for_job(cluster, jobid, timeout=60),
            "checkpoint_written": (workdir / CHECKPOINT).exists(),
        }
    finally:
        interrupt(killed)
    rerun, rerun_rc = run_to_end(cluster, workdir, CHECKPOINT, "--retries", "0", name="resume",
                                 timeout=300)  # fmt: skip
    return {"workdir": workdir, "killed": killed, "rerun": rerun, "rerun_rc": rerun_rc,
            **after_cancel}  # fmt: skip


RETRY_WRAPPER = """\
#!/bin/sh
# `sciquant`, except that the first `sciquant overview` in this directory fails
if [ "$1" = overview ] && mkdir overview-attempt-1 2>/dev/null; then
    echo "failing attempt 1 on purpose" >&2
    exit 1
fi
exec {sciquant} "$@"
"""


def retry_scenario(cluster, clean: Path, workdir: Path) -> dict:
    """The overview job fails on attempt 1; `--retries 1` resubmits it."""
    copy_upstream(clean, workdir, "resources")
    write_config(workdir)
    wrapper = workdir / "bin" / "sciquant"
    wrapper.parent.mkdir()
    wrapper.write_text(RETRY_WRAPPER.format(sciquant=BIN / "sciquant"))
    wrapper.chmod(0o755)
    path = f"{wrapper.parent}{os.pathsep}{BIN}{os.pathsep}{cluster.env()['PATH']}"
    sm, rc = run_to_end(cluster, workdir, "results/bloodflow/overview.png", "--retries", "1",
                        name="retry", timeout=300, env={"PATH": path})  # fmt: skip
    return {"workdir": workdir, "sm": sm, "rc": rc}


@pytest.fixture(scope="module")
def recovery(slurm_cluster, clean_run, tmp_path_factory):
    """(b), (c), (d) started together on copies of the clean run's upstream outputs."""
    clean, _, rc = clean_run
    if rc != 0:
        pytest.skip("the clean run failed (see test_ci_study_end_to_end_on_slurm)")
    scenarios = {"fault": fault_scenario, "kill": kill_scenario, "retry": retry_scenario}
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {
            name: pool.submit(scenario, slurm_cluster, clean, tmp_path_factory.mktemp(name))
            for name, scenario in scenarios.items()
        }
        yield futures


def test_failed_stage_names_its_log_and_rerun_redoes_only_it(slurm_cluster, clean_run, recovery):
    run = recovery["fault"].result(timeout=900)
    workdir, failed, rerun = run["workdir"], run["failed"], run["rerun"]

    log = failed.text()
    assert run["rc"] != 0, log
    # Snakemake names the stage's log (and shows it: the injected error is in there)
    assert "Error in rule evaluate_fp32" in log and EVALUATE_LOG in log, log
    assert "injected failure of stage 'evaluate'" in log, log
    # the variable reached the job through Slurm (sbatch --export=ALL)
    stage_log = run["stage_log"]
    assert "sciquant evaluate: error: injected failure of stage 'evaluate'" in stage_log
    assert "Traceback" not in stage_log, stage_log
    assert {"train", "evaluate_fp32"} <= set(rules_started(log)), log
    assert "aggregate" not in rules_started(log), log
    assert not run["metrics_written"]

    log = rerun.text()
    assert run["rerun_rc"] == 0, log
    expected = {"evaluate_fp32": 1, "aggregate": 1, "report": 1, "all": 1}
    assert job_stats(log) == expected, log
    assert sorted(rules_started(log)) == sorted(expected), log
    jobs = slurm_jobs(slurm_cluster, rerun)
    assert sorted(job["rule"] for job in jobs) == ["aggregate", "evaluate_fp32", "report"], jobs
    assert (workdir / CHECKPOINT).stat().st_mtime_ns == run["checkpoint_mtime"]

    assert_same_science(
        workdir / FP32_RUN / "metrics.json", clean_run[0] / FP32_RUN / "metrics.json"
    )


def test_cancelled_training_fails_and_rerun_resumes(slurm_cluster, recovery):
    run = recovery["kill"].result(timeout=900)
    workdir, killed, rerun = run["workdir"], run["killed"], run["rerun"]

    log = killed.text()
    assert run["state_before"] == "RUNNING", run
    assert run["rc"] != 0, log
    assert f"SLURM-job '{run['jobid']}' failed" in log and "CANCELLED" in log, log
    assert run["final_state"].startswith("CANCELLED"), run["final_state"]
    print(f"\nSnakemake noticed the cancelled train job after {run['noticed_after']:.1f} s")
    assert not run["checkpoint_written"]

    assert run["rerun_rc"] == 0, rerun.text()
    assert job_stats(rerun.text()) == {"train": 1}, rerun.text()
    train_log = (workdir / TRAIN_LOG).read_text()
    resumed = re.search(r"resuming from (\S+) after epoch (\d+)", train_log)
    assert resumed, train_log
    assert resumed[1].endswith(f"{TRAINING}/resume.pt") and 1 <= int(resumed[2]) < 6, train_log
    epochs = (workdir / TRAINING / "training_log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in epochs] == [1, 2, 3, 4, 5, 6], epochs


def test_retry_asks_for_more_memory_and_time(slurm_cluster, recovery):
    run = recovery["retry"].result(timeout=900)
    sm = run["sm"]
    assert run["rc"] == 0, sm.text()
    assert (run["workdir"] / "results/bloodflow/overview.png").stat().st_size > 0

    first, second = slurm_jobs(slurm_cluster, sm)
    assert first["rule"] == second["rule"] == "overview", (first, second)
    assert first["State"] == "FAILED" and second["State"] == "COMPLETED", (first, second)
    # rules/data.smk: mem_mb = scaled("mem_mb", 2000), runtime = scaled("runtime", 10)
    assert "mem=2000M" in first["ReqTRES"] and first["Timelimit"] == "00:10:00", first
    assert "mem=4000M" in second["ReqTRES"] and second["Timelimit"] == "00:20:00", second
