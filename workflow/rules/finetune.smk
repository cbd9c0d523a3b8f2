# Fine-tuning (config `finetune_eval`): every run's encoder fine-tuned end to end with a linear
# head at each label fraction, on classify's patient-grouped folds, and compared with the probe.


rule finetune:
    input:
        stores=expand("results/patches/{id}.h5", id=CLASSIFY_IDS),
        encoder="results/pretrain/{run}/encoder.pt",
        samples=samples_input(),
        config=run_stage_config("finetune"),
    output:
        metrics="results/finetune/{run}/labels_{fraction}/metrics.json",
        patches="results/finetune/{run}/labels_{fraction}/predictions_patches.csv",
        slides="results/finetune/{run}/labels_{fraction}/predictions_slides.csv",
        history="results/finetune/{run}/labels_{fraction}/history.csv",
    log:
        "results/logs/finetune/{run}/labels_{fraction}.log",
    benchmark:
        "results/benchmarks/finetune/{run}/labels_{fraction}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
    params:
        samples=samples_arg(),
        out=subpath(output.metrics, parent=True),
    shell:
        "simclr-path finetune {input.stores} --encoder {input.encoder} {params.samples} "
        "--label-fraction {wildcards.fraction} --out {params.out} --config {input.config} "
        "--force > {log} 2>&1"


rule compare_finetune:
    input:
        metrics=lambda w: [f"results/classify/{w.run}/metrics.json"]
        + expand(
            "results/finetune/{run}/labels_{fraction}/metrics.json",
            run=w.run,
            fraction=FRACTIONS,
        ),
        pretrain="results/pretrain/{run}/summary.json",
    output:
        tsv="results/summary/{run}/finetune.tsv",
        png=report(
            "results/summary/{run}/finetune.png",
            caption=report_caption("compare_finetune"),
            category="0. Summary",
            subcategory="fine-tuning of {run}",
            labels={"run": "{run}", "figure": "fine-tuning vs linear probe"},
        ),
        html=report(
            "results/summary/{run}/finetune.html",
            caption=report_caption("compare_finetune"),
            category="0. Summary",
            subcategory="fine-tuning of {run}",
            labels={"run": "{run}", "figure": "fine-tuning table"},
        ),
    log:
        "results/logs/compare_finetune/{run}.log",
    benchmark:
        "results/benchmarks/compare_finetune/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        runs=["linear probe"] + [f"fine-tuned {float(f):.0%} labels" for f in FRACTIONS],
        overrides=dict(
            [("linear probe", {"overrides": "frozen encoder, all labels"})]
            + [
                (
                    f"fine-tuned {float(f):.0%} labels",
                    {"overrides": f"finetune.label_fraction={f}"},
                )
                for f in FRACTIONS
            ]
        ),
        what="method",
        title=lambda w: f"Fine-tuning vs linear probe, run {w.run}",
        xlabel="method (same patient-grouped folds)",
    script:
        "../scripts/compare_runs.py"
