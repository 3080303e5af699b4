# Evaluation: full autoregressive rollouts of every test simulation; metrics.json per run
# (FP32 reference in eager torch; other runs with their runtime: fake-quant or ONNX Runtime).


rule evaluate_fp32:
    input:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        metrics="results/{dataset}/{model}/seed{seed}/reference/none/fp32/metrics.json",
        pressure=report(
            "results/{dataset}/{model}/seed{seed}/reference/none/fp32/pressure.png",
            caption="../workflow/report/rollout.rst",
            category="Rollouts",
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "seed": "{seed}",
                "field": "pressure",
            },
        ),
        flowrate=report(
            "results/{dataset}/{model}/seed{seed}/reference/none/fp32/flowrate.png",
            caption="../workflow/report/rollout.rst",
            category="Rollouts",
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "seed": "{seed}",
                "field": "flowrate",
            },
        ),
    log:
        "logs/{dataset}/{model}/seed{seed}/reference/none/fp32/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/reference/none/fp32/evaluate.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
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


rule evaluate_run:
    input:
        unpack(get_run_artifacts),
        index="results/{dataset}/prepared/index.json",
    output:
        metrics="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/metrics.json",
        pressure="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/pressure.png",
        flowrate="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/flowrate.png",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
        # FP32 runs have their own rules: no second candidate job per FP32 metrics.json
        method=alternatives(QUANTIZATION_METHODS),
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


# The float runs of a target, from the FP32 weights: one FP32 run per FP32 graph of the swept
# targets that run FP32 natively (the speed-up baseline; openvino-avx2's is openvino-cpu's), and
# FP16 / BF16 where a sweep asks for it (TensorRT, OpenVINO).
use rule evaluate_run as evaluate_target_float with:
    output:
        metrics="results/{dataset}/{model}/seed{seed}/{target}/none/{precision}/metrics.json",
        pressure="results/{dataset}/{model}/seed{seed}/{target}/none/{precision}/pressure.png",
        flowrate="results/{dataset}/{model}/seed{seed}/{target}/none/{precision}/flowrate.png",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/none/{precision}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/none/{precision}/evaluate.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
        target=alternatives(study.float_run_targets()),
        precision="fp32|fp16|bf16",


# Keras classifiers (md datasets): accuracy, F1, confusion matrix and batch-1 latency of every
# run, FP32 reference included, on its runtime (Keras eager / fake-quant, or LiteRT).
rule evaluate_md:
    input:
        unpack(get_keras_artifacts),
        pixelmaps="results/{dataset}/prepared/pixelmaps.npz",
    output:
        metrics="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/metrics.json",
        confusion="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/confusion.png",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/evaluate.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("keras")),
    conda:
        "../envs/tensorflow.yaml"
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
