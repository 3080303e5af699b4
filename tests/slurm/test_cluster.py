"""Tests against a real one-node Slurm cluster (fixture ``slurm_cluster``, see conftest.py).

(a) plain sbatch with a constraint and a (fake) GPU gres ends COMPLETED and accounting keeps
    the request; (b) the repository's ``profiles/slurm`` runs a small workflow through the
    official executor plugin, GPU routing included; (c) a job cancelled with ``scancel`` makes
    Snakemake fail (not hang) and a rerun completes it.

Everything is bounded by timeouts; a hung Snakemake is interrupted (SIGINT, so that it cancels
its Slurm jobs) and reported with its log.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}

# Values of profiles/slurm that differ for this tiny cluster / these short jobs are given on
# the command line (command-line options override the profile); the profile is not edited.
TEST_OVERRIDES = [
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--latency-wait",
    "5",
    "--jobs",
    "4",
]


# ------------------------------------------------------------------------------------ helpers


def sacct_rows(cluster, *args: str, fields: str) -> list[dict[str, str]]:
    start = (datetime.now() - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S")
    res = cluster.run(
        "sacct", "-X", "-n", "-P", "--starttime", start, "-o", fields, *args, check=True
    )
    names = fields.split(",")
    return [
        dict(zip(names, line.split("|"), strict=True)) for line in res.stdout.splitlines() if line
    ]


def wait_for_job(cluster, jobid: str, timeout: float = 60) -> str:
    """Poll sacct until the job reaches a terminal state; return that state.

    slurmctld sends job records to slurmdbd asynchronously: right after the end the record can
    lack fields (seen: empty Partition), so wait until the record is complete too.
    """
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        rows = sacct_rows(cluster, "-j", jobid, fields="JobID,State,Partition,End")
        if rows:
            state = rows[0]["State"]
            complete = rows[0]["Partition"] and rows[0]["End"] not in ("", "Unknown")
            if state.split()[0] in TERMINAL and complete:
                return state
        time.sleep(0.5)
    squeue = cluster.run("squeue", "-a", check=False).stdout
    raise AssertionError(
        f"job {jobid} not finished after {timeout} s (last state {state})\n{squeue}\n"
        f"{cluster.logs(('slurmctld', 'slurmd'))}"
    )


class Snakemake:
    """A snakemake process on the cluster, output in a log file, bounded by a timeout."""

    def __init__(self, cmd: list[str], workdir: Path, env: dict, name: str):
        self.log = workdir / f"{name}.snakemake.log"
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.started = time.monotonic()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT lets Snakemake scancel its jobs and release the lock
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._fh.close()
            raise AssertionError(
                f"snakemake did not finish within {timeout} s (hang?); log:\n{self.text()}"
            ) from None
        self._fh.close()
        return rc

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run_uuid(self) -> str:
        m = re.search(r"SLURM run ID: (\S+)", self.text())
        assert m, f"no SLURM run ID in log:\n{self.text()}"
        return m.group(1)


def snakemake(snakemake_cmd, repo_root, cluster, workdir: Path, *extra: str, name="run"):
    cmd = [
        *snakemake_cmd,
        "--profile",
        str(repo_root / "profiles" / "slurm"),
        "--snakefile",
        str(workdir / "Snakefile"),
        "--directory",
        str(workdir),
        *TEST_OVERRIDES,
        *extra,
    ]
    return Snakemake(cmd, workdir, cluster.env(), name)


# ------------------------------------------------------------------------------------ tests


def test_cluster_is_up(slurm_cluster):
    sinfo = slurm_cluster.run("sinfo", "-h", "-o", "%P %t %f %G").stdout
    assert "cpu*" in sinfo and "gpu" in sinfo, sinfo
    assert "v100" in sinfo and "gpu:v100:2" in sinfo, sinfo
    assocs = slurm_cluster.run(
        "sacctmgr", "-n", "-P", "show", "assoc", "format=account,user"
    ).stdout
    assert "default|root" in assocs.split(), assocs


def test_sbatch_constraint_and_gres(slurm_cluster, tmp_path):
    res = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "-A",
        "default",
        "-p",
        "gpu",
        "--constraint=v100",
        "--gres=gpu:v100:1",
        "-t",
        "5",
        "--mem=100",
        "-o",
        str(tmp_path / "job-%j.out"),
        "--wrap",
        "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; echo on $(hostname)",
    )
    jobid = res.stdout.strip().split(";")[0]
    assert jobid.isdigit(), res.stdout

    assert wait_for_job(slurm_cluster, jobid, timeout=60) == "COMPLETED"

    (row,) = sacct_rows(
        slurm_cluster, "-j", jobid, fields="JobID,State,Partition,Account,ReqTRES,AllocTRES"
    )
    assert row["Partition"] == "gpu" and row["Account"] == "default", row
    assert "gres/gpu:v100=1" in row["ReqTRES"], row
    assert "gres/gpu=1" in row["AllocTRES"], row

    job = slurm_cluster.run("scontrol", "show", "job", jobid).stdout
    assert "Features=v100" in job, job
    assert "gpu:v100:1" in job, job  # TresPerNode=gres:gpu:v100:1
    assert "Requeue=0" in job, job  # cluster default JobRequeue=0 (cf. the profile test)

    out = (tmp_path / f"job-{jobid}.out").read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in out, out  # one of the two fake GPUs was bound


SNAKEFILE_GPU = """\
rule all:
    input: "result.txt"

rule prep:
    output: "prep.txt"
    shell: "echo prep $SLURM_JOB_ID $SLURM_JOB_PARTITION > {output}"

rule gpu:
    input: "prep.txt"
    output: "result.txt"
    resources:
        slurm_partition="gpu",
        constraint="v100",
        gpu=1,
        gpu_model="v100",
        mem_mb=500,
        runtime=5,
    shell:
        "cat {input} > {output}; "
        "echo gpu $SLURM_JOB_ID $SLURM_JOB_PARTITION CUDA=$CUDA_VISIBLE_DEVICES >> {output}"
"""


def test_snakemake_profile_runs_workflow(slurm_cluster, snakemake_cmd, repo_root, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE_GPU)
    sm = snakemake(snakemake_cmd, repo_root, slurm_cluster, tmp_path, name="gpu")
    rc = sm.wait(timeout=120)
    log = sm.text()
    assert rc == 0, log
    print(f"workflow with 2 Slurm jobs finished in {sm.elapsed:.1f} s")

    lines = (tmp_path / "result.txt").read_text().splitlines()
    prep, gpu = (line.split() for line in lines)
    assert prep[0] == "prep" and prep[2] == "cpu", lines  # profile default partition
    assert gpu[0] == "gpu" and gpu[2] == "gpu", lines  # the rule's own partition
    assert gpu[3] == "CUDA=0", lines

    rows = sacct_rows(
        slurm_cluster,
        "--name",
        sm.run_uuid(),
        fields="JobID,JobName,Comment,State,Partition,Account,ReqTRES",
    )
    by_rule = {r["Comment"]: r for r in rows}
    assert set(by_rule) == {"rule_prep", "rule_gpu"}, rows
    assert all(r["State"] == "COMPLETED" and r["Account"] == "default" for r in rows), rows
    assert by_rule["rule_gpu"]["JobID"] == gpu[1], (rows, lines)
    assert "gres/gpu:v100=1" in by_rule["rule_gpu"]["ReqTRES"], rows
    assert "gres/gpu" not in by_rule["rule_prep"]["ReqTRES"], rows
    # default-resources of the profile: mem_mb = 2000 * attempt
    assert "mem=2000M" in by_rule["rule_prep"]["ReqTRES"], rows

    job = slurm_cluster.run("scontrol", "show", "job", gpu[1]).stdout
    assert "Features=v100" in job and "gpu:v100:1" in job, job
    # slurm-requeue: true in the profile -> sbatch --requeue (the test cluster has JobRequeue=0)
    assert "Requeue=1" in job, job


SNAKEFILE_SLOW = """\
rule slow:
    output: "slow.txt"
    params:
        sleep=config.get("sleep", 600),
    shell:
        "echo $SLURM_JOB_ID >> jobids.txt; sleep {params.sleep}; echo done > {output}"
"""


def test_cancelled_job_fails_and_rerun_completes(slurm_cluster, snakemake_cmd, repo_root, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE_SLOW)
    jobids = tmp_path / "jobids.txt"
    # --retries 0: the profile's retries would resubmit the cancelled job
    sm = snakemake(
        snakemake_cmd, repo_root, slurm_cluster, tmp_path, "--retries", "0", name="cancel"
    )
    deadline = time.monotonic() + 60
    while not jobids.exists() or not jobids.read_text().strip():
        if sm.proc.poll() is not None or time.monotonic() > deadline:
            if sm.proc.poll() is None:
                sm.proc.send_signal(signal.SIGINT)
            sm.wait(timeout=30)
            pytest.fail(f"the slow job never started:\n{sm.text()}")
        time.sleep(0.5)
    jobid = jobids.read_text().split()[0]
    state = slurm_cluster.run("squeue", "-h", "-j", jobid, "-o", "%T").stdout.strip()
    assert state == "RUNNING", state

    t_cancel = time.monotonic()
    slurm_cluster.run("scancel", jobid)
    rc = sm.wait(timeout=120)
    log = sm.text()
    print(f"snakemake noticed the cancellation after {time.monotonic() - t_cancel:.1f} s")
    assert rc != 0, log
    assert "CANCELLED" in log, log
    assert wait_for_job(slurm_cluster, jobid, timeout=30).startswith("CANCELLED")
    assert not (tmp_path / "slow.txt").exists()

    sm2 = snakemake(
        snakemake_cmd,
        repo_root,
        slurm_cluster,
        tmp_path,
        "--retries",
        "0",
        "--config",
        "sleep=1",
        name="rerun",
    )
    rc = sm2.wait(timeout=120)
    assert rc == 0, sm2.text()
    assert (tmp_path / "slow.txt").read_text().strip() == "done"
    new_jobid = jobids.read_text().split()[-1]
    assert new_jobid != jobid
    assert wait_for_job(slurm_cluster, new_jobid, timeout=30) == "COMPLETED"
