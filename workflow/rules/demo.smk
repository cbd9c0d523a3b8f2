# Synthetic demo slides: every samples-sheet row whose path lies under demo.dir is generated.


rule demo_slide:
    output:
        f"{DEMO_DIR}/{{demo_slide}}.tiff",
    log:
        "results/logs/demo_slide/{demo_slide}.log",
    benchmark:
        "results/benchmarks/demo_slide/{demo_slide}.tsv"
    conda:
        "../../envs/simclr-path.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        p=demo_params,
        width=DEMO["width"],
        height=DEMO["height"],
        mpp=DEMO["mpp"],
    shell:
        "simclr-path demo-slide --out {output:q} --kind {params.p[kind]} --seed {params.p[seed]} "
        "--width {params.width} --height {params.height} --mpp {params.mpp} {params.p[extra]} "
        "--force > {log} 2>&1"
