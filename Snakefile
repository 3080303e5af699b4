# sciquant: a quantization study of scientific ML surrogates, from raw data to one result cube.
# Run the default study with `snakemake --cores 2`, or on Slurm with `--profile profiles/slurm`.
from snakemake.utils import min_version

min_version("9.0")


# The default study, unless --configfile names another: a study is one file, never a merge of two.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/workflow/config/default.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/workload.smk"
include: "rules/batch.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
