# simclr-path: slides -> patch stores -> SimCLR encoder -> embeddings -> SCC classifier -> report.
#
#   snakemake --cores 2                         # the demo (config/config.yaml), then report.html
#   snakemake --cores 8 --configfile my.yaml    # your slides (see README "Workflow")
#
# Rules live in workflow/rules/*.smk; every rule calls one `simclr-path` subcommand.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
        REPORT_CONFIG if config["report"]["auto"] else [],
