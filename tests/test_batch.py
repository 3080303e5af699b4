"""Batched runs (config `batch`, `sciquant run-batch`): job counts, identical metrics, recovery.

(a) The batch size picks itself from `batch.max_jobs`: Snakemake's job table of a generated study
    has exactly the jobs `sciquant.batch.job_count` predicts, at most the cap, and only batch jobs
    for the runs; a cap no batching can meet fails the dry run naming the key. Timed runs get
    batches of their own: run locally, only those hold both cores.
(b) The ci study batched (3 runs a job) writes the same metrics as its per-run jobs.
(c) A batch whose run fails keeps its finished runs; the rerun links them back and computes only
    the failed one.
(d) A killed batch leaves no run with a metrics.json that is not finished; its rerun links the
    finished ones back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from sciquant import batch
from sciquant.study import Study, load_config

from .slurm.test_workflow_slurm import science
from .test_workflow import BIN, CI_CONFIG, ENV, dry_run_jobs, reordered, snakemake

FAULT = "SCIQUANT_FAIL_STAGE"
RESIDUAL = "results/bloodflow/meshgraphnet/seed0"
#: The upstream outputs a batched run starts from (copied with their mtimes).
UPSTREAM = (
    "resources",
    "results/bloodflow/prepared",
    "results/bloodflow/overview.png",
    "results/bloodflow/meshgraphnet/seed0/fp32",
    "results/bloodflow/meshgraphnet_reference/seed0/fp32",
)


def write_study(folder: Path, **changes) -> Path:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def copy_upstream(source: Path, workdir: Path) -> None:
    for path in UPSTREAM:
        if (source / path).is_dir():
            shutil.copytree(source / path, workdir / path)
        else:
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / path, workdir / path)


def run_folders(workdir: Path) -> list[str]:
    return sorted(
        str(path.parent.relative_to(workdir))
        for path in (workdir / "results").glob("*/*/seed*/*/*/*/metrics.json")
    )


# ------------------------------------------------------------------------------------ (a)


def big_study(folder: Path, max_jobs: int) -> Path:
    """Two seeds of the ci study's models under a sweep of 36 runs per training, capped."""
    return write_study(
        folder,
        seeds=[0, 1],
        quantize={
            "sweeps": [
                {
                    "targets": ["reference"],
                    "methods": ["ptq-minmax", "ptq-mse", "ptq-percentile"],
                    "precisions": ["w8a8", "w6a8", "w4a8", "w8a6", "w4a4"],
                },
                {"targets": ["openvino-cpu"], "methods": ["ptq-minmax"], "precisions": ["w8a8"]},
                {"targets": ["openvino-cpu"], "methods": ["none"], "precisions": ["bf16"]},
            ]
        },
        batch={"max_jobs": max_jobs},
    )


def test_batch_size_keeps_the_job_table_under_the_cap(tmp_path: Path) -> None:
    path = big_study(tmp_path, max_jobs=40)
    study = Study(load_config(path))
    runs = len(study.runs())
    assert runs == 2 * 2 * (1 + 15 + 3)  # seeds × models × (reference, sweep, openvino)
    per_run = batch.fixed_jobs(study) + batch.per_run_jobs(study)
    assert per_run > 40  # one job per stage and run would not fit
    size = batch.batch_size(study)
    # the smallest size that fits: one less does not
    assert batch.job_count(study) <= 40
    smaller = load_config(path, overrides={"batch": {"size": size - 1}})
    assert batch.job_count(Study(smaller)) > 40

    dry = snakemake("-n", "--quiet", "rules", "--configfile", str(path),
                    "--directory", str(tmp_path))  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    table = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, flags=re.MULTILINE))
    assert int(table.pop("total")) == batch.job_count(study)
    per_run_rules = {"quantize", "export_onnx", "quantize_dynamic", "export_fp32_onnx",
                     "evaluate_fp32", "evaluate_run", "evaluate_target_float"}  # fmt: skip
    assert not per_run_rules & set(table), table
    batches = {rule: int(n) for rule, n in table.items() if rule.startswith("batch_")}
    assert sum(batches.values()) == 2 * len(batch.plan(study))  # one job per seed
    assert all(n == 2 for n in batches.values())

    # Without a cap problem the runs keep their per-run jobs.
    small = Study(load_config(big_study(tmp_path, max_jobs=1000)))
    assert batch.batch_size(small) == 1 and batch.plan(small) == []


def test_cap_no_batching_meets_fails_the_dry_run_naming_the_key(tmp_path: Path) -> None:
    path = big_study(tmp_path, max_jobs=10)
    dry = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    assert dry.returncode != 0
    message = dry.stdout + dry.stderr
    assert "config key batch.max_jobs" in message and "raise batch.max_jobs" in message, message
    assert "Traceback" not in message


def test_timed_runs_are_batched_apart_so_simulated_batches_hold_one_core(tmp_path: Path) -> None:
    """The default study batched: no batch mixes timed and simulated runs, each run is in one
    batch, in study order; locally only the timed batches hold both cores."""
    from sciquant.study import is_timed

    config = yaml.safe_load((CI_CONFIG.parent / "default.yaml").read_text())
    config["batch"] = {"size": 6}
    path = tmp_path / "batched.yaml"
    path.write_text(yaml.safe_dump(config))
    study = Study(load_config(path))
    planned = batch.plan(study)
    kinds = {b.rule: {is_timed(study, run) for run in b.runs(0)} for b in planned}
    assert all(len(kind) == 1 for kind in kinds.values()), kinds
    assert {True} in kinds.values() and {False} in kinds.values()
    order = [run.folder for run in study.runs()]
    batched = [run.folder for b in planned for run in b.runs(0)]
    assert sorted(batched) == sorted(order)  # every run once
    for b in planned:
        folders = [run.folder for run in b.runs(0)]
        assert folders == sorted(folders, key=order.index), b.rule
    dry = snakemake("-n", "--cores", "2", "--configfile", str(path), "--directory", str(tmp_path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    threads = {}  # Snakemake prints a job's threads where it holds more than one
    for block in re.split(r"\n(?=\s*(?:local)?rule )", dry.stdout):
        name = re.match(r"\s*(?:local)?rule (batch_\w+):", block)
        if name:
            held = re.search(r"^\s+threads: (\d+)$", block, flags=re.MULTILINE)
            threads[name.group(1)] = held.group(1) if held else "1"
    assert threads.keys() == kinds.keys(), threads
    for rule, kind in kinds.items():
        assert threads[rule] == ("2" if kind == {True} else "1"), (rule, threads[rule])


def test_a_run_reading_a_run_of_the_other_kind_keeps_its_group_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a simulated run would read a timed run's files (or the reverse), splitting the
    group could make two batches read each other's files: the group stays in study order."""
    path = write_study(tmp_path, batch={"size": 2})
    study = Study(load_config(path))
    split = batch.parts(study)
    key = next(k for k, parts in split.items() if len(parts) == 2)  # simulated | timed
    dataset, model, _ = key
    readers = [batch.Run(dataset, model, 0, *combo) for combo in split[key][1]]
    read = {
        p.rpartition("/")[0]
        for run in readers
        for p in batch.evaluation_inputs(study, run).values()
        if p.rpartition("/")[0] != run.folder
    }
    assert read, "a timed run of the ci study reads its target's FP32 run"
    # the FP32 run they read as if it were simulated: now a timed run reads a simulated one
    real = batch.is_timed
    monkeypatch.setattr(batch, "is_timed", lambda s, run: run.folder not in read and real(s, run))
    combos = batch.groups(study)[key]
    assert batch.parts(study)[key] == [combos]
    assert [
        c for b in batch.plan(study) if (b.dataset, b.model, b.node) == key for c in b.combos
    ] == combos


# ------------------------------------------------------------------------------------ (b)–(d)


@pytest.fixture(scope="module")
def per_run(ci_study) -> Path:
    """The ci study with one job per stage and run (the session's, tests/conftest.py)."""
    workdir, result = ci_study
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def batched_study(workdir: Path, size: int = 3) -> Path:
    return write_study(workdir, batch={"size": size})


def test_batched_runs_write_the_same_metrics_as_per_run_jobs(per_run, tmp_path: Path) -> None:
    copy_upstream(per_run, tmp_path)
    path = batched_study(tmp_path)
    result = snakemake("--cores", "2", "--configfile", str(path), "--directory", str(tmp_path),
                       timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "rule evaluate_run:" not in log and "rule quantize:" not in log
    # 5 runs of the residual model (3 batches: its simulated run, 3 + 1 timed runs), 3 timed of
    # the reference formulation (1)
    assert len(re.findall(r"^(?:local)?rule batch_\w+:$", log, flags=re.MULTILINE)) == 4
    runs = run_folders(tmp_path)
    assert runs == run_folders(per_run) and len(runs) == 8
    for folder in runs:
        ours = science(tmp_path / folder / "metrics.json")
        theirs = science(per_run / folder / "metrics.json")
        assert ours == theirs, folder
    # every stage's own log, as the per-run rules write them
    assert (tmp_path / f"logs/{RESIDUAL[8:]}/openvino-cpu/ptq-minmax/w8a8/export.log").is_file()
    assert not any((tmp_path / batch.FINISHED).iterdir())  # dropped: every batch succeeded
    table = (tmp_path / "results/summary/metrics.csv").read_text().splitlines()
    assert len(table) == 1 + 8
    # each batch's manifest (what the cube's job waits for): its runs, their metrics' SHA-256
    listed: dict[str, str] = {}
    for manifest in sorted((tmp_path / batch.MANIFESTS).rglob("*.json")):
        listed.update(json.loads(manifest.read_text())["runs"])
    assert sorted(listed) == runs
    for folder, digest in listed.items():
        content = (tmp_path / folder / "metrics.json").read_bytes()
        assert digest == hashlib.sha256(content).hexdigest(), folder
    # a run's metrics.json gone: its batch runs again (and the cube), no other
    gone = tmp_path / RESIDUAL / "openvino-cpu/ptq-minmax/w8a8/metrics.json"
    gone.rename(gone.with_suffix(".away"))
    jobs = dry_run_jobs("--configfile", str(path), "--directory", str(tmp_path))
    gone.with_suffix(".away").rename(gone)
    assert sum(job["rule"].startswith("batch_") for job in jobs) == 1
    assert {"aggregate", "report"} <= {job["rule"] for job in jobs}

    # A batch reruns when a command of its runs changes, not when the config does elsewhere:
    # reordered keys rerun nothing, another budget the report, a run added to a sweep its batch.
    config = yaml.safe_load(path.read_text())

    def dry_run(changed: dict) -> set[str]:
        changed_path = tmp_path / "changed.yaml"
        changed_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        jobs = dry_run_jobs("--configfile", str(changed_path), "--directory", str(tmp_path))
        return {job["rule"] for job in jobs}

    assert dry_run(reordered(config)) == set()
    budget = {"budget": {"metric": "pressure_error_pct", "max_value": 50}}
    assert dry_run({**config, "report": budget}) == {"report", "all"}
    extended = json.loads(json.dumps(config))
    extended["quantize"]["sweeps"].append(
        {"models": ["meshgraphnet"], "targets": ["reference"], "methods": ["ptq-mse"],
         "precisions": ["w8a8"]}
    )  # fmt: skip
    # the residual model's simulated runs: its batch 0000, now of two runs
    assert dry_run(extended) == {"batch_bloodflow_meshgraphnet_cpu_0000", "aggregate", "report",
                                 "all"}  # fmt: skip
    # a model added: its training and batches, no batch of the models the study had
    grown = json.loads(json.dumps(config))
    grown["models"]["meshgraphnet_b"] = {**grown["models"]["meshgraphnet"], "hidden": 8}
    grown["quantize"]["sweeps"].append(
        {"models": ["meshgraphnet_b"], "targets": ["reference"], "methods": ["ptq-minmax"],
         "precisions": ["w8a8"]}
    )  # fmt: skip
    rules = dry_run(grown)
    assert {"train", "aggregate", "report", "all"} < rules
    assert all(r.startswith("batch_bloodflow_meshgraphnet_b_") for r in rules if "batch" in r)


def test_failed_batch_keeps_finished_runs_and_rerun_computes_only_the_rest(
    per_run, tmp_path: Path
) -> None:
    copy_upstream(per_run, tmp_path)
    path = batched_study(tmp_path, size=4)
    # the second batch holds the 4 timed runs of the residual model (the first its simulated one)
    failing = f"{RESIDUAL}/openvino-cpu/ptq-minmax/w8a8"  # its last run
    finished = f"{RESIDUAL}/openvino-cpu/none/bf16"  # the run before it
    env = {**ENV, FAULT: "evaluate:openvino-cpu/ptq-minmax"}
    first = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(CI_CONFIG.parents[2] / "Snakefile"), "--cores", "2",
         "--configfile", str(path), "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert first.returncode != 0
    assert not (tmp_path / failing / "metrics.json").exists()
    # Snakemake removed the failed job's outputs; the finished run waits under results/.finished
    assert not (tmp_path / finished / "metrics.json").exists()
    kept = [entry for entry in (tmp_path / batch.FINISHED).iterdir() if entry.is_dir()]
    assert len(kept) == 3 and all((entry / "complete").is_file() for entry in kept)
    log = next((tmp_path / "logs/batches").rglob("seed0/cpu/0001.log")).read_text()
    assert f"{failing}: FAILED in evaluate" in log and "1 of 4 runs failed" in log
    assert f"{finished}: done" in log
    manifest = tmp_path / batch.MANIFESTS / "bloodflow/meshgraphnet/seed0/cpu/0001.json"
    assert not manifest.exists()  # written only once every run of the batch is done

    rerun = snakemake("--cores", "2", "--configfile", str(path), "--directory", str(tmp_path),
                      timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    log = next((tmp_path / "logs/batches").rglob("seed0/cpu/0001.log")).read_text()
    assert f"{finished}: finished before, linked back" in log and log.count("linked back") == 3
    assert f"{failing}: done" in log
    rules = re.findall(
        r"^(?:local)?rule (batch_\w+):$", rerun.stdout + rerun.stderr, flags=re.MULTILINE
    )
    assert rules == ["batch_bloodflow_meshgraphnet_cpu_0001"]
    listed = json.loads(manifest.read_text())["runs"]
    assert len(listed) == 4 and {failing, finished} <= set(listed)
    for folder in (finished, failing):
        assert science(tmp_path / folder / "metrics.json") == science(
            per_run / folder / "metrics.json"
        ), folder
    assert not any((tmp_path / batch.FINISHED).iterdir())


def test_recipe_changes_with_settings_and_inputs(per_run, tmp_path: Path) -> None:
    copy_upstream(per_run, tmp_path)
    config = load_config(batched_study(tmp_path))
    study = Study(config)
    run = next(r for r in study.runs() if r.method == "ptq-minmax" and r.target == "reference")
    os.chdir(tmp_path)
    try:
        first = batch.recipe(study, run, {})
        assert batch.recipe(study, run, {}) == first
        config["quantize"]["calibration_samples"] = 4
        assert batch.recipe(Study(config), run, {}) != first
        config["quantize"]["calibration_samples"] = 8
        assert batch.recipe(Study(config), run, {}) == first
        checkpoint = Path(f"{RESIDUAL}/fp32/checkpoint.pt")
        checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
        assert batch.recipe(study, run, {}) != first
    finally:
        os.chdir(CI_CONFIG.parents[2])
    # batching is not science: another size keeps the config hash every metrics.json records
    resized = json.loads(json.dumps(config))
    resized["batch"]["size"] = 7
    assert Study(resized).config_hash() == study.config_hash()


def test_killed_batch_leaves_no_run_that_looks_finished(per_run, tmp_path: Path) -> None:
    copy_upstream(per_run, tmp_path)
    config = load_config(batched_study(tmp_path, size=8))
    study = Study(config)
    runs = [r.folder for r in study.runs() if r.model == "meshgraphnet"]
    command = [str(BIN / "sciquant"), "run-batch", "--config", json.dumps(config), "--runs", *runs]
    log = tmp_path / "batch.log"
    with open(log, "w") as stream:
        proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=stream, stderr=stream)
    finished = tmp_path / batch.FINISHED
    deadline = time.monotonic() + 300
    while not (finished.is_dir() and len(list(finished.glob("*/complete"))) >= 2):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = {
        json.loads((entry / "complete").read_text())[-1]: entry
        for entry in finished.glob("*")
        if (entry / "complete").is_file()
    }
    done = [folder for folder in runs if (tmp_path / folder / "metrics.json").exists()]
    assert 2 <= len(kept) <= len(done) < len(runs), log.read_text()
    for folder in done:  # a run with its metrics.json has every file it writes
        run = next(r for r in study.runs() if r.folder == folder)
        for path in batch.run_outputs(study, run):
            assert (tmp_path / path).is_file(), path
    for entry in kept.values():  # a kept run: links to those very files
        for i, path in enumerate(json.loads((entry / "complete").read_text())):
            assert (entry / str(i)).samefile(tmp_path / path), path

    rerun = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("linked back") == len(kept), rerun.stdout
    assert rerun.stdout.count(": done in") == len(runs) - len(kept), rerun.stdout
    for folder in runs:
        assert science(tmp_path / folder / "metrics.json") == science(
            per_run / folder / "metrics.json"
        ), folder


def test_check_config_prints_the_job_layout_and_refuses_an_impossible_cap(tmp_path: Path) -> None:
    sciquant = str(BIN / "sciquant")
    path = big_study(tmp_path, max_jobs=40)
    study = Study(load_config(path))
    checked = subprocess.run([sciquant, "check-config", str(path)], capture_output=True, text=True,
                             env=ENV, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    size, jobs = batch.batch_size(study), batch.job_count(study)
    assert f"76 runs, {jobs} jobs (batches of {size} runs)" in checked.stdout, checked.stdout
    refused = subprocess.run([sciquant, "check-config", str(big_study(tmp_path, max_jobs=10))],
                             capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    # 10 jobs for data, trainings and report, and per seed (2) and model (2) a batch of its
    # simulated runs and one of its timed runs
    assert "config key batch.max_jobs: the study needs at least 18 jobs" in refused.stderr
