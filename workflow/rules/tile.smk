# Slides -> HDF5 patch stores + QC pictures; imported patch sets -> patch stores.
# Each job's warning lines (a slide without tissue, copied tiles ...) are shown on the console
# too once it succeeds: in its log alone nobody sees them while the run goes on.


rule tile_config:
    output:
        "results/config/tile.yaml",
    log:
        "results/logs/config/tile.log",
    localrule: True
    params:
        values=stage_values(None, "tile"),
    run:
        Path(output[0]).write_text(yaml.safe_dump(params.values, sort_keys=False))


rule tile:
    input:
        slide=lambda w: sample(w.slide)["path"],
        config="results/config/tile.yaml",
    output:
        store="results/patches/{slide}.h5",
        qc=report(
            "results/qc/{slide}.png",
            caption=report_caption("qc"),
            category="1. Tiling",
            subcategory="QC pictures",
            labels={"slide": "{slide}", "figure": "tissue QC"},
        ),
    log:
        "results/logs/tile/{slide}.log",
    benchmark:
        "results/benchmarks/tile/{slide}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: TILE_CFG.tile.workers
    resources:
        mem_mb=4000,
        # tile.tiff_direct: a resource, so that changing it reruns nothing (common.smk, SPEED_KEYS)
        speed=speed_options("tile"),
    params:
        mpp=slide_mpp_arg,
    shell:
        logged(
            "simclr-path tile {input.slide:q} --out {output.store} --slide-id={wildcards.slide} "
            "--qc {output.qc} --config {input.config} --workers {threads} {resources.speed} {params.mpp} "
            "--force "
        )


rule import_patches:
    input:
        # ancient: a folder's time says nothing of its tiles (params.files does, by content)
        dir=lambda w: ancient(PATCH_SETS[w.dataset]["dir"]),
        groups=lambda w: PATCH_SETS[w.dataset]["groups"] or [],
    output:
        "results/patches/{dataset}.h5",
    log:
        "results/logs/import_patches/{dataset}.log",
    benchmark:
        "results/benchmarks/import_patches/{dataset}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        args=import_args,
        # the folder's files, so that a tile added, removed or replaced reruns the import (the
        # folder's own time changes only for entries directly in it); by content, so that a
        # copied or unpacked folder (new times) does not; cached by file times in .snakemake/
        files=lambda w: folder_digest(
            PATCH_SETS[w.dataset]["dir"],
            cache=f".snakemake/simclr-path/tile-digests/{w.dataset}.json",
        ),
    shell:
        logged(
            "simclr-path import-patches {input.dir:q} --out {output} {params.args} --force "
        )
