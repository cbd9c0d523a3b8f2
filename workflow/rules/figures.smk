# Figures of one run: t-SNE maps, ROC/PR curves, confusion matrix, heatmaps, metrics table.

FIG = "results/figures/{run}"


rule plot_tsne:
    input:
        embeddings=classify_embeddings,
        stores=expand("results/patches/{id}.h5", id=CLASSIFY_IDS),
        samples=samples_input(),
        config=run_stage_config("tsne"),
    output:
        label=report(
            f"{FIG}/tsne_label.png",
            caption=report_caption("tsne"),
            category="3. Embeddings",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "t-SNE by label"},
        ),
        slide=report(
            f"{FIG}/tsne_slide.png",
            caption=report_caption("tsne"),
            category="3. Embeddings",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "t-SNE by slide"},
        ),
        thumbnails=(
            report(
                f"{FIG}/tsne_thumbnails.png",
                caption=report_caption("tsne_thumbnails"),
                category="3. Embeddings",
                subcategory="{run}",
                labels={"run": "{run}", "figure": "t-SNE with patches"},
            )
            if config["figures"]["thumbnails"]
            else []
        ),
    log:
        "results/logs/plot_tsne/{run}.log",
    benchmark:
        "results/benchmarks/plot_tsne/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        samples=samples_arg(),
        thumbnails=lambda w, input, output: (
            f"--stores {' '.join(input.stores)} --out-thumbnails {output.thumbnails}"
            if config["figures"]["thumbnails"]
            else ""
        ),
    shell:
        logged(
            "simclr-path plot-tsne --embeddings {input.embeddings} {params.samples} "
            "--out-label {output.label} --out-slide {output.slide} {params.thumbnails} "
            "--config {input.config} --run-name {wildcards.run} --force "
        )


rule plot_curves:
    input:
        "results/classify/{run}/metrics.json",
        "results/classify/{run}/predictions_patches.csv",
        "results/classify/{run}/predictions_slides.csv",
    output:
        roc=report(
            f"{FIG}/roc.png",
            caption=report_caption("curves"),
            category="4. Classifier",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "ROC curves"},
        ),
        pr=report(
            f"{FIG}/pr.png",
            caption=report_caption("curves"),
            category="4. Classifier",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "precision-recall curves"},
        ),
    log:
        "results/logs/plot_curves/{run}.log",
    benchmark:
        "results/benchmarks/plot_curves/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        evaluation=EVALUATION,
        positive=positive_class,
        classify=subpath(input[0], parent=True),
    shell:
        logged(
            "simclr-path plot-curves --classify {params.classify} --out-roc {output.roc} "
            "--out-pr {output.pr} --run-name {wildcards.run} --force "
        )


rule plot_confusion:
    input:
        "results/classify/{run}/metrics.json",
    output:
        report(
            f"{FIG}/confusion.png",
            caption=report_caption("confusion"),
            category="4. Classifier",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "confusion matrices"},
        ),
    log:
        "results/logs/plot_confusion/{run}.log",
    benchmark:
        "results/benchmarks/plot_confusion/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        evaluation=EVALUATION,
        positive=positive_class,
        classify=subpath(input[0], parent=True),
    shell:
        logged(
            "simclr-path plot-confusion --classify {params.classify} --out {output} "
            "--run-name {wildcards.run} --force "
        )


rule plot_heatmap:
    input:
        predictions="results/classify/{run}/predictions_patches.csv",
        metrics="results/classify/{run}/metrics.json",
        store="results/patches/{slide}.h5",
    output:
        report(
            f"{FIG}/heatmaps/{{slide}}.png",
            caption=report_caption("heatmap"),
            category="5. Heatmaps",
            subcategory="{run}",
            labels={"run": "{run}", "slide": "{slide}"},
        ),
    log:
        "results/logs/plot_heatmap/{run}/{slide}.log",
    benchmark:
        "results/benchmarks/plot_heatmap/{run}/{slide}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        evaluation=EVALUATION,
        positive=positive_class,
        classify=subpath(input.metrics, parent=True),
    shell:
        logged(
            "simclr-path plot-heatmap --classify {params.classify} --store {input.store} "
            "--slide-id={wildcards.slide} --out {output} --run-name {wildcards.run} --force "
        )


rule metrics_table:
    input:
        "results/classify/{run}/metrics.json",
    output:
        report(
            f"{FIG}/metrics.html",
            caption=report_caption("metrics"),
            category="4. Classifier",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "metrics table"},
        ),
    log:
        "results/logs/metrics_table/{run}.log",
    benchmark:
        "results/benchmarks/metrics_table/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        evaluation=EVALUATION,
        positive=positive_class,
    script:
        "../scripts/metrics_table.py"
