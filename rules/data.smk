# Raw data (embedded simulator or download) → prepared graph samples, and an overview figure.


rule synthesize:
    output:
        "resources/{dataset}/raw/manifest.json",
    log:
        "logs/{dataset}/synthesize.log",
    benchmark:
        "benchmarks/{dataset}/synthesize.tsv"
    wildcard_constraints:
        dataset=alternatives(dataset_names("embedded")),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("synthesize"),
    params:
        workload=lambda wildcards: study.workload(wildcards.dataset),
        settings=get_simulation_params,
    shell:
        "sciquant synthesize {params.workload} --settings {params.settings:q}"
        " --out resources/{wildcards.dataset}/raw > {log} 2>&1"


rule fetch:
    output:
        "resources/{dataset}/raw/manifest.json",
    log:
        "logs/{dataset}/fetch.log",
    wildcard_constraints:
        dataset=alternatives(dataset_names("files")),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("fetch"),
    params:
        files=get_fetch_files,
        limits=get_fetch_limits,
    shell:
        "sciquant fetch --files {params.files:q} --limits {params.limits:q}"
        " --out resources/{wildcards.dataset}/raw > {log} 2>&1"


rule prepare:
    input:
        "resources/{dataset}/raw/manifest.json",
    output:
        index="results/{dataset}/prepared/index.json",
        graphs=directory("results/{dataset}/prepared/graphs"),
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "benchmarks/{dataset}/prepare.tsv"
    wildcard_constraints:
        dataset=alternatives(datasets_of("bloodflow")),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("prepare"),
    params:
        settings=get_prepare_params,
    shell:
        "sciquant prepare bloodflow --raw resources/{wildcards.dataset}/raw"
        " --settings {params.settings:q} --out results/{wildcards.dataset}/prepared > {log} 2>&1"


rule overview:
    input:
        "resources/{dataset}/raw/manifest.json",
    output:
        "results/{dataset}/overview.png",
    log:
        "logs/{dataset}/overview.log",
    wildcard_constraints:
        dataset=alternatives(datasets_of("bloodflow")),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("overview"),
    shell:
        "sciquant overview bloodflow --raw resources/{wildcards.dataset}/raw"
        " --out {output} > {log} 2>&1"


# md workload: trajectories → ICNNMD pixel maps (time-block splits), and an overview figure.
rule prepare_md:
    input:
        "resources/{dataset}/raw/manifest.json",
    output:
        index="results/{dataset}/prepared/index.json",
        pixelmaps="results/{dataset}/prepared/pixelmaps.npz",
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "benchmarks/{dataset}/prepare.tsv"
    wildcard_constraints:
        dataset=alternatives(datasets_of("md")),
    conda:
        "../envs/tensorflow.yaml"
    resources:
        **resources_of("prepare"),
    params:
        settings=get_prepare_params,
    shell:
        "sciquant prepare md --raw resources/{wildcards.dataset}/raw"
        " --settings {params.settings:q} --out results/{wildcards.dataset}/prepared > {log} 2>&1"


rule overview_md:
    input:
        "results/{dataset}/prepared/pixelmaps.npz",
    output:
        "results/{dataset}/overview.png",
    log:
        "logs/{dataset}/overview.log",
    wildcard_constraints:
        dataset=alternatives(datasets_of("md")),
    conda:
        "../envs/tensorflow.yaml"
    resources:
        **resources_of("overview"),
    shell:
        "sciquant overview md --raw resources/{wildcards.dataset}/raw"
        " --prepared results/{wildcards.dataset}/prepared --out {output} > {log} 2>&1"
