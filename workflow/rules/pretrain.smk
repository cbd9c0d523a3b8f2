# SimCLR pretraining, one job per named run (config `runs:`), plus the augmentation preview.


rule run_config:
    output:
        "results/config/{run}/{stage}.yaml",
    log:
        "results/logs/config/{run}/{stage}.log",
    wildcard_constraints:
        stage=one_of(STAGE_KEYS),
    localrule: True
    params:
        values=lambda w: stage_values(w.run, w.stage),
    run:
        Path(output[0]).write_text(yaml.safe_dump(params.values, sort_keys=False))


rule pretrain:
    input:
        stores=expand("results/patches/{store}.h5", store=STORES),
        config=run_stage_config("pretrain"),
        weights=model_weights,
    output:
        encoder="results/pretrain/{run}/encoder.pt",
        encoder_info="results/pretrain/{run}/encoder.json",
        head="results/pretrain/{run}/head.pt",
        metrics="results/pretrain/{run}/metrics.csv",
        summary="results/pretrain/{run}/summary.json",
        config="results/pretrain/{run}/config.yaml",
    log:
        "results/logs/pretrain/{run}.log",
    benchmark:
        "results/benchmarks/pretrain/{run}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 8
    resources:
        mem_mb=16000,
        gpu=config["pretrain_gpus"],
        # train.workers and checkpoint_every: a resource, so that changing them reruns nothing
        # (common.smk, SPEED_KEYS)
        speed=speed_options("train"),
    params:
        command=pretrain_command(),
        out=subpath(output.encoder, parent=True),
    shell:
        logged(
            "simclr-path with-gpus {resources.gpu} -- {params.command} pretrain {input.stores} --out {params.out} --config {input.config} "
            "{resources.speed} --resume-interrupted --force "
        )


rule preview:
    input:
        stores=expand("results/patches/{store}.h5", store=STORES),
        config=preview_config,
    output:
        report(
            "results/figures/{run}/augmentations.png",
            caption=report_caption("augmentations"),
            category="2. Pretraining",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "augmented views"},
        ),
    log:
        "results/logs/preview/{run}.log",
    benchmark:
        "results/benchmarks/preview/{run}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        pairs=config["figures"]["preview_pairs"],
    shell:
        logged(
            "simclr-path preview {input.stores} --out {output} --config {input.config} "
            "--pairs {params.pairs} --run-name {wildcards.run} --force "
        )


rule plot_loss:
    input:
        pretrained("metrics.csv"),
    output:
        report(
            "results/figures/{run}/loss.png",
            caption=report_caption("loss"),
            category="2. Pretraining",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "loss curve"},
        ),
    log:
        "results/logs/plot_loss/{run}.log",
    benchmark:
        "results/benchmarks/plot_loss/{run}.tsv"
    conda:
        "../../envs/plot.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        owner=lambda w: PRETRAIN_OF[w.run],
        # a run sharing another's pretraining draws that run's curve, and says so
        name=lambda w: (
            w.run
            if PRETRAIN_OF[w.run] == w.run
            else f"{w.run} (pretraining of {PRETRAIN_OF[w.run]})"
        ),
    shell:
        logged(
            "simclr-path plot-loss {input} --out {output} --run-name {params.name:q} --force"
        )
