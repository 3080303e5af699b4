# Quantization: one job per run of the sweep (PTQ calibration or QAT fine-tuning), then the ONNX
# QDQ export for runs whose target runs them natively on ONNX Runtime; dynamic quantization
# (ptq-dynamic) writes its ONNX model directly from the FP32 checkpoint.


rule sensitivity:
    input:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        recommendation="results/{dataset}/{model}/seed{seed}/sensitivity/recommendation.json",
        table=report(
            "results/{dataset}/{model}/seed{seed}/sensitivity/sensitivity.csv",
            caption="../workflow/report/sensitivity.rst",
            category="Sensitivity",
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "seed": "{seed}",
                "file": "table",
            },
        ),
        figure=report(
            "results/{dataset}/{model}/seed{seed}/sensitivity/sensitivity.png",
            caption="../workflow/report/sensitivity.rst",
            category="Sensitivity",
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "seed": "{seed}",
                "file": "figure",
            },
        ),
    log:
        "logs/{dataset}/{model}/seed{seed}/sensitivity.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/sensitivity.tsv"
    wildcard_constraints:
        model=alternatives(models_of("torch")),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **resources_of("sensitivity"),
    params:
        settings=get_quantize_section,
        folder=subpath(output.recommendation, parent=True),
    shell:
        "sciquant sensitivity --checkpoint {input.checkpoint}"
        " --prepared results/{wildcards.dataset}/prepared --settings {params.settings:q}"
        " --threads {threads} --out {params.folder} > {log} 2>&1"


rule quantize:
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
        model=alternatives(models_of("torch")),
        method=alternatives(CALIBRATED_METHODS),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **resources_of("quantize"),
    params:
        settings=get_quantize_params,
        recommendation=get_recommendation_argument,
        folder=subpath(output[0], parent=True),
    shell:
        "sciquant quantize --checkpoint {input.checkpoint}"
        " --prepared results/{wildcards.dataset}/prepared --target {wildcards.target}"
        " --method {wildcards.method} --precision {wildcards.precision}"
        " --settings {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " {params.recommendation} --out {params.folder} > {log} 2>&1"


rule export_onnx:
    input:
        quantized="results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantized.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/model.onnx",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/export.log",
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
        method=alternatives(CALIBRATED_METHODS),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("export"),
    shell:
        "sciquant export --checkpoint {input.quantized}"
        " --prepared results/{wildcards.dataset}/prepared --out {output} > {log} 2>&1"


# Dynamic quantization (ptq-dynamic, ONNX Runtime): no calibration; the FP32 model's ONNX export,
# its Linear weights quantized to int8, activations quantized per batch at run time.
rule quantize_dynamic:
    input:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
        index="results/{dataset}/prepared/index.json",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/model.onnx",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
        method=alternatives(tuple(DYNAMIC_METHODS)),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **resources_of("quantize"),
    params:
        folder=subpath(output[0], parent=True),
    shell:
        "sciquant quantize --checkpoint {input.checkpoint}"
        " --prepared results/{wildcards.dataset}/prepared --target {wildcards.target}"
        " --method {wildcards.method} --precision {wildcards.precision}"
        " --threads {threads} --out {params.folder} > {log} 2>&1"


rule export_fp32_onnx:
    input:
        checkpoint="results/{dataset}/{model}/seed{seed}/fp32/checkpoint.pt",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/none/fp32/model.onnx",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/none/fp32/export.log",
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("torch")),
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("export"),
    shell:
        "sciquant export --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


# Keras models: PTQ / QAT / conversion per run (every run but the FP32 reference). The artifact
# (model.keras for fake-quant simulation, model.tflite for LiteRT) is named in quantization.json.
rule quantize_keras:
    input:
        model="results/{dataset}/{model}/seed{seed}/fp32/model.keras",
        pixelmaps="results/{dataset}/prepared/pixelmaps.npz",
    output:
        "results/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantization.json",
    log:
        "logs/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.log",
    benchmark:
        "benchmarks/{dataset}/{model}/seed{seed}/{target}/{method}/{precision}/quantize.tsv"
    wildcard_constraints:
        seed=RUN_SEED,
        model=alternatives(models_of("keras")),
    conda:
        "../envs/tensorflow.yaml"
    threads: config["threads"]
    resources:
        **resources_of("quantize"),
    params:
        settings=get_quantize_params,
        folder=subpath(output[0], parent=True),
    shell:
        "sciquant quantize --checkpoint {input.model}"
        " --prepared results/{wildcards.dataset}/prepared --target {wildcards.target}"
        " --method {wildcards.method} --precision {wildcards.precision}"
        " --settings {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " --out {params.folder} > {log} 2>&1"
