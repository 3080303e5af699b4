# FP32 training: one job per dataset × model × seed; resumes from its last checkpoint on rerun.


rule train:
    input:
        index="results/{dataset}/prepared/index.json",
        graphs="results/{dataset}/prepared/graphs",
    output:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        log_csv="results/{dataset}/{model}/seed{seed}/fp32/training_log.csv",
    log:
        "logs/{dataset}/{model}/seed{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/train.tsv"
    wildcard_constraints:
        model=alternatives(models_of("torch")),
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


# Keras models (icnnmd on md datasets): the same contract, a model.keras instead of checkpoint.pt.
rule train_keras:
    input:
        index="results/{dataset}/prepared/index.json",
        pixelmaps="results/{dataset}/prepared/pixelmaps.npz",
    output:
        model="results/{dataset}/{model}/seed{seed}/fp32/model.keras",
        log_csv="results/{dataset}/{model}/seed{seed}/fp32/train_log.csv",
    log:
        "logs/{dataset}/{model}/seed{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/train.tsv"
    wildcard_constraints:
        model=alternatives(models_of("keras")),
    conda:
        "../envs/tensorflow.yaml"
    threads: config["threads"]
    resources:
        **resources_of("train"),
    params:
        settings=get_train_params,
        folder=subpath(output.model, parent=True),
    shell:
        "sciquant train --prepared results/{wildcards.dataset}/prepared"
        " --settings {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " --out {params.folder} > {log} 2>&1"
