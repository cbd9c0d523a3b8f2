# Patch embeddings: one file per run and store.


rule embed:
    input:
        store="results/patches/{store}.h5",
        encoder=pretrained("encoder.pt"),
        config=run_stage_config("embed"),
    output:
        "results/embeddings/{run}/{store}.h5",
    log:
        "results/logs/embed/{run}/{store}.log",
    benchmark:
        "results/benchmarks/embed/{run}/{store}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
        # embed.workers, batch_size and cpu_chunk: a resource, so that changing them reruns
        # nothing (common.smk, SPEED_KEYS; eval-mode features do not depend on the batch)
        speed=speed_options("embed"),
    shell:
        logged(
            "simclr-path with-gpus {resources.gpu} -- simclr-path embed {input.store} --encoder {input.encoder} --out {output} "
            "--config {input.config} {resources.speed} --force "
        )


# Layer-wise linear evaluation (config `layer_eval`): the same stores embedded from other layers.
rule embed_layer:
    input:
        store="results/patches/{store}.h5",
        encoder=pretrained("encoder.pt"),
        # read for layer 'head' (the projection head's output)
        head=pretrained("head.pt"),
        config=run_stage_config("embed_layer"),
    output:
        "results/embeddings/{run}/layers/{layer}/{store}.h5",
    log:
        "results/logs/embed_layer/{run}/{layer}/{store}.log",
    benchmark:
        "results/benchmarks/embed_layer/{run}/{layer}/{store}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
        # embed.workers, batch_size and cpu_chunk: a resource, so that changing them reruns
        # nothing (common.smk, SPEED_KEYS; eval-mode features do not depend on the batch)
        speed=speed_options("embed"),
    shell:
        logged(
            "simclr-path with-gpus {resources.gpu} -- simclr-path embed {input.store} --encoder {input.encoder} --out {output} "
            "--layer {wildcards.layer} --config {input.config} {resources.speed} "
            "--force "
        )
