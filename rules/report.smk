# Aggregation of every run's metrics.json into the result cube, and the HTML report of it.


rule aggregate:
    input:
        get_aggregate_inputs(),
    output:
        cube="results/summary/metrics.nc",
        table="results/summary/metrics.csv",
    log:
        "logs/summary/aggregate.log",
    benchmark:
        "benchmarks/summary/aggregate.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("aggregate"),
    params:
        study_info=get_study_info(),
        metrics=get_all_metrics(),
    shell:
        "sciquant aggregate --metrics {params.metrics} --out-nc {output.cube}"
        " --out-csv {output.table} --study-info {params.study_info:q} > {log} 2>&1"


rule report:
    input:
        cube="results/summary/metrics.nc",
        figures=get_report_figures(),
        sensitivity=get_sensitivity_tables(),
    output:
        report(
            "results/report/index.html",
            caption="../workflow/report/summary.rst",
            category="Summary",
        ),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        **resources_of("report"),
    params:
        budget=get_report_budget(),
    shell:
        "sciquant report --cube {input.cube} --out {output} --budget {params.budget:q}"
        " --figures {input.figures} --sensitivity {input.sensitivity} > {log} 2>&1"
