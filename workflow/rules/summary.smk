# Comparison of runs (one table + one figure in the report) and the automatic report.


rule compare_runs:
    input:
        metrics=expand("results/classify/{run}/metrics.json", run=RUNS),
        pretrain=[f"results/pretrain/{PRETRAIN_OF[run]}/summary.json" for run in RUNS],
    output:
        tsv="results/summary/runs.tsv",
        png=report(
            "results/summary/runs.png",
            caption=report_caption("compare_runs"),
            category="0. Summary",
            subcategory="runs",
            labels={"figure": "runs compared"},
        ),
        html=report(
            "results/summary/runs.html",
            caption=report_caption("compare_runs"),
            category="0. Summary",
            subcategory="runs",
            labels={"figure": "runs table"},
        ),
    log:
        "results/logs/compare_runs.log",
    benchmark:
        "results/benchmarks/compare_runs.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        runs=RUNS,
        overrides=run_overrides(),
    script:
        "../scripts/compare_runs.py"


# The merged config the automatic report is written for. Snakemake calls no onsuccess handler
# when nothing is left to do, so a config edit that reruns no job (a new report.path, a run or a
# figure switch taken away) would leave the report as it was: this job reruns on any config
# edit (its params), and then the handler runs.
rule report_config:
    output:
        REPORT_CONFIG,
    log:
        "results/logs/config/report.log",
    localrule: True
    params:
        digest=hashlib.sha256(report_config_text().encode()).hexdigest(),
    run:
        Path(output[0]).write_text(report_config_text())


# After a successful run, write the HTML report of every tracked artefact (config report.auto).
# It runs `snakemake --report` in a child process with the same merged config; it is skipped
# for dry runs and by `--no-hooks`. If the child fails, the run exits 1 with one line and an
# older report is moved aside (common.smk, write_report).
onsuccess:
    if config["report"]["auto"]:
        write_report(config["report"]["path"])


# A failed run may have rewritten some results (the jobs that finished) but not the report:
# the older report is moved aside so that it cannot pass for them.
onerror:
    if config["report"]["auto"]:
        logger.info(
            f"Report not written: the run failed{set_aside(config['report']['path'])}."
        )


rule compare_layers:
    input:
        metrics=expand(
            "results/classify_layer/{{run}}/{layer}/metrics.json", layer=LAYERS
        ),
        pretrain=pretrained("summary.json"),
    output:
        tsv="results/summary/{run}/layers.tsv",
        png=report(
            "results/summary/{run}/layers.png",
            caption=report_caption("compare_layers"),
            category="0. Summary",
            subcategory="layers of {run}",
            labels={"run": "{run}", "figure": "layers compared"},
        ),
        html=report(
            "results/summary/{run}/layers.html",
            caption=report_caption("compare_layers"),
            category="0. Summary",
            subcategory="layers of {run}",
            labels={"run": "{run}", "figure": "layers table"},
        ),
    log:
        "results/logs/compare_layers/{run}.log",
    benchmark:
        "results/benchmarks/compare_layers/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        runs=LAYERS,
        overrides={layer: {"overrides": f"embed.layer={layer}"} for layer in LAYERS},
        what="layer",
        evaluation=EVALUATION,
    script:
        "../scripts/compare_runs.py"
