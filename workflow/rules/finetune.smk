# Fine-tuning (config `finetune_eval`): every run's encoder fine-tuned end to end with a linear
# head at each label fraction, on classify's patient-grouped folds, and compared with the probe.


rule finetune:
    input:
        stores=expand("results/patches/{id}.h5", id=CLASSIFY_IDS),
        encoder=pretrained("encoder.pt"),
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
        # finetune.workers: a resource, so that changing it reruns nothing (common.smk, SPEED_KEYS)
        speed=speed_options("finetune"),
    params:
        samples=samples_arg(),
        out=subpath(output.metrics, parent=True),
    # --resume: a job killed by a time limit keeps the folds it finished (only for the same
    # inputs and config; finetune.py, _FoldCache)
    shell:
        logged(
            "simclr-path with-gpus {resources.gpu} -- simclr-path finetune {input.stores} --encoder {input.encoder} {params.samples} "
            "--label-fraction {wildcards.fraction} --out {params.out} --config {input.config} "
            "{resources.speed} --force --resume "
        )


# The linear probe's side at each label fraction below 1 (at 1.0 it is rule classify): the same
# patients per fold as rule finetune at that fraction (one draw, classify.seed). A folder of its
# own: classify replaces results/classify/{run}/ as a whole, which would delete nested results.
rule classify_fraction:
    input:
        embeddings=classify_embeddings,
        samples=samples_input(),
        config=run_stage_config("classify"),
    output:
        metrics="results/classify_fraction/{run}/labels_{fraction}/metrics.json",
        patches="results/classify_fraction/{run}/labels_{fraction}/predictions_patches.csv",
        slides="results/classify_fraction/{run}/labels_{fraction}/predictions_slides.csv",
        model="results/classify_fraction/{run}/labels_{fraction}/model.npz",
        model_info="results/classify_fraction/{run}/labels_{fraction}/model.json",
    log:
        "results/logs/classify_fraction/{run}/labels_{fraction}.log",
    benchmark:
        "results/benchmarks/classify_fraction/{run}/labels_{fraction}.tsv"
    wildcard_constraints:
        fraction=one_of(PROBE_FRACTIONS),
    conda:
        "../../envs/simclr-path.yaml"
    threads: 1
    resources:
        mem_mb=probe_mem_mb,
    params:
        samples=samples_arg(),
        out=subpath(output.metrics, parent=True),
    shell:
        logged(
            "simclr-path classify --embeddings {input.embeddings} {params.samples} "
            "--label-fraction {wildcards.fraction} --out {params.out} "
            "--config {input.config} --force "
        )


rule compare_finetune:
    input:
        # linear probe then fine-tuning, each at every fraction (the order of params.rows)
        metrics=lambda w: [probe_metrics(w.run, f) for f in FRACTIONS]
        + expand(
            "results/finetune/{run}/labels_{fraction}/metrics.json",
            run=FINETUNE_OF[w.run],
            fraction=FRACTIONS,
        ),
        pretrain=pretrained("summary.json"),
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
        rows=[
            {"method": m, "label_fraction": float(f)}
            for m in ("linear probe", "fine-tuned")
            for f in FRACTIONS
        ],
        what="label_fraction",
        title=lambda w: f"Fine-tuning vs linear probe by label fraction, run {w.run}",
        evaluation=EVALUATION,
        # the run whose fine-tuning this one shares (itself where it has its own), for the caption
        finetuned=lambda w: FINETUNE_OF[w.run],
    script:
        "../scripts/compare_runs.py"
