# Logistic-regression SCC classifier with patient-grouped evaluation, one per run.


rule samples_sheet:
    output:
        SHEET_COPY,
    log:
        "results/logs/config/samples.log",
    localrule: True
    params:
        # a digest of the copied columns: Snakemake reruns the rule (and what reads the copy)
        # when they change, not when another column or a comment does
        digest=hashlib.sha256(SHEET_TEXT.encode()).hexdigest(),
    run:
        Path(output[0]).write_text(SHEET_TEXT)


rule classify:
    input:
        embeddings=classify_embeddings,
        samples=samples_input(),
        config=run_stage_config("classify"),
    output:
        metrics="results/classify/{run}/metrics.json",
        patches="results/classify/{run}/predictions_patches.csv",
        slides="results/classify/{run}/predictions_slides.csv",
        model="results/classify/{run}/model.npz",
        model_info="results/classify/{run}/model.json",
    log:
        "results/logs/classify/{run}.log",
    benchmark:
        "results/benchmarks/classify/{run}.tsv"
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
            "--out {params.out} --config {input.config} --force "
        )


# Layer-wise linear evaluation (config layer_eval). Not under results/classify/{run}/: classify
# replaces that folder as a whole (atomically), which would delete nested results.
rule classify_layer:
    input:
        embeddings=lambda w: expand(
            "results/embeddings/{run}/layers/{layer}/{id}.h5",
            run=LAYER_EMBED_OF[w.run],
            layer=w.layer,
            id=CLASSIFY_IDS,
        ),
        samples=samples_input(),
        config=run_stage_config("classify"),
    output:
        metrics="results/classify_layer/{run}/{layer}/metrics.json",
        patches="results/classify_layer/{run}/{layer}/predictions_patches.csv",
        slides="results/classify_layer/{run}/{layer}/predictions_slides.csv",
    log:
        "results/logs/classify_layer/{run}/{layer}.log",
    benchmark:
        "results/benchmarks/classify_layer/{run}/{layer}.tsv"
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
            "--out {params.out} --config {input.config} --force "
        )
