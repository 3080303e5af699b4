# Plug-in workloads (entry point group sciquant.workloads): the same stages as the built-in
# PyTorch ones, each run by the dataset's workload (`sciquant.workloads.pytorch.TorchWorkload`).
# Prepared data is index.json + the workload's file; evaluation writes metrics.json only.


rule prepare_workload:
    input:
        "resources/{dataset}/raw/manifest.json",
    output:
        index="results/{dataset}/prepared/index.json",
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "benchmarks/{dataset}/prepare.tsv"
    wildcard_constraints:
        dataset=alternatives(plugin_datasets()),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("prepare"),
    params:
        workload=get_dataset_workload,
        settings=get_prepare_params,
    shell:
        "sciquant prepare {params.workload} --raw resources/{wildcards.dataset}/raw"
        " --settings {params.settings:q} --out results/{wildcards.dataset}/prepared > {log} 2>&1"


rule overview_workload:
    input:
        "results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/overview.png",
    log:
        "logs/{dataset}/overview.log",
    wildcard_constraints:
        dataset=alternatives(plugin_datasets()),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("overview"),
    params:
        workload=get_dataset_workload,
    shell:
        "sciquant overview {params.workload} --raw resources/{wildcards.dataset}/raw"
        " --prepared results/{wildcards.dataset}/prepared --out {output} > {log} 2>&1"


rule train_workload:
    input:
        index="results/{dataset}/prepared/index.json",
    output:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        log_csv="results/{dataset}/{model}/seed{seed}/fp32/training_log.csv",
    log:
        "logs/{dataset}/{model}/seed{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/train.tsv"
    wildcard_constraints:
        model=alternatives(plugin_models()),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **resources_of("train"),
    params:
        settings=get_train_params,
        folder=subpath(output.checkpoint, parent=True),
    shell:
        "sciquant train --prepared results/{wildcards.dataset}/prepared"
        " --settings {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " --out {params.folder} > {log} 2>&1"


rule quantize_workload:
    input:
        unpack(get_quantize_inputs),
        index="results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantized.pt",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(plugin_models()),
        method=alternatives(CALIBRATED_METHODS),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **resources_of("quantize"),
    params:
        settings=get_quantize_params,
        folder=subpath(output[0], parent=True),
    shell:
        "sciquant quantize --checkpoint {input.checkpoint}"
        " --prepared results/{wildcards.dataset}/prepared --target {wildcards.target}"
        " --method {wildcards.method} --precision {wildcards.precision}"
        " --settings {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " --out {params.folder} > {log} 2>&1"


rule export_workload:
    input:
        quantized="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantized.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/model.onnx",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/export.log",
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(plugin_models()),
        method=alternatives(CALIBRATED_METHODS),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("export"),
    params:
        workload=get_dataset_workload,
    shell:
        "sciquant export --workload {params.workload} --checkpoint {input.quantized}"
        " --prepared results/{wildcards.dataset}/prepared --out {output} > {log} 2>&1"


rule export_workload_fp32:
    input:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/none/fp32/model.onnx",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/none/fp32/export.log",
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(plugin_models()),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("export"),
    params:
        workload=get_dataset_workload,
    shell:
        "sciquant export --workload {params.workload} --checkpoint {input.checkpoint}"
        " --prepared results/{wildcards.dataset}/prepared --out {output} > {log} 2>&1"


# Every run of a plug-in's model, the FP32 reference included: the run's artifacts
# (`sciquant.study.run_artifacts`) and its plan (`Study.evaluation`), as for the built-in PyTorch
# runs.
rule evaluate_workload:
    input:
        unpack(get_run_artifacts),
        index="results/{dataset}/prepared/index.json",
    output:
        metrics="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/metrics.json",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(plugin_models()),
    conda:
        "../envs/torch.yaml"
    threads: timed_threads
    resources:
        **resources_of("evaluate"),
    params:
        settings=get_evaluate_params,
        coordinates=get_run_coordinates,
        plan=get_evaluation_plan,
        folder=subpath(output.metrics, parent=True),
        threads=config["threads"],
    shell:
        "sciquant evaluate --plan {params.plan:q}"
        " --prepared results/{wildcards.dataset}/prepared"
        " --settings {params.settings:q} --coordinates {params.coordinates:q}"
        " --threads {params.threads} --out {params.folder} > {log} 2>&1"
