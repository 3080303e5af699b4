# Batched runs (config `batch`): when the study is too large for one job per stage and run, each
# batch of runs of one training and node type is one job (`sciquant run-batch`), with every run's
# metrics.json as its outputs. One rule per batch of a dataset and model, its jobs one per seed
# (`{seed}`); none while the size is 1.


def batch_threads(timed):
    """Cores a batch job holds: like a timed evaluation, all local cores if it times a run."""

    def threads(wildcards):
        if timed and workflow.local_exec:
            try:
                return max(config["threads"], workflow.cores)
            except WorkflowError:  # no --cores given (a dry run)
                return config["threads"]
        return config["threads"]

    return threads


def batch_resources(node, runs):
    """A batch job's resources: an evaluation's on its node type (`resources_of`), and as
    minutes `minutes_per_run` per run (its node's `runtime` if larger), growing with the
    attempt."""
    per_run = BATCH_SETTINGS["minutes_per_run"]

    def runtime(wildcards, attempt):
        base = max(config["nodes"].get(node, {}).get("runtime", 0), per_run * runs)
        return math.ceil(base * attempt)

    return {**resources_of("evaluate", node=node), "runtime": runtime}


# A batch job reads the study config from the environment (`STUDY_CONFIG_ENV`), set here as the
# workflow is read (also by the Snakemake every cluster job starts), not from a param: a param
# holding the config would rerun every batch on any change to it. Its `commands` param is what
# its runs run instead, so that a batch reruns exactly when a command of one of its runs changes.
os.environ[BATCH_STUDY_CONFIG_ENV] = settings_json(config)
BATCH_ENVS = {"torch": "../envs/torch.yaml", "keras": "../envs/tensorflow.yaml"}


def batch_runs(batch):
    """The run folders of a batch's job (its seed is the job's wildcard)."""
    pattern = " ".join(run.folder for run in batch.runs(BATCH_SEED))

    def runs(wildcards):
        return pattern.replace(BATCH_SEED, wildcards.seed)

    return runs


for _batch, (_inputs, _outputs) in batch_files(study, BATCHES).items():
    _timed = any(is_timed(study, run) for run in _batch.runs(min(config["seeds"])))

    rule:
        name:
            _batch.rule
        input:
            _inputs,
        output:
            _outputs,
            manifest=_batch.manifest(BATCH_SEED),
        log:
            _batch.log(BATCH_SEED),
        wildcard_constraints:
            seed=r"\d+",
        conda:
            BATCH_ENVS[study.framework(_batch.model)]
        threads: batch_threads(_timed)
        resources:
            **batch_resources(_batch.node, len(_batch.combos)),
        params:
            commands=batch_commands_digest(study, _batch),
            runs=batch_runs(_batch),
        shell:
            "sciquant run-batch --runs {params.runs} --manifest {output.manifest} > {log} 2>&1"
