"""The Snakemake workflow: DAG, lint, format, bad input, and a tiny end-to-end run with report.

Every test runs ``snakemake`` in a subprocess inside a temporary copy of the workflow (Snakefile,
workflow/, config/, envs/), so nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import LC25000, ROOT, needs

COPY = ("Snakefile", "workflow", "config", "envs", "profiles")


def workdir(tmp_path: Path, config: dict | None = None, samples: str | None = None) -> Path:
    """A copy of the workflow in ``tmp_path/wf`` with an optional test config and samples sheet."""
    wf = tmp_path / "wf"
    wf.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, wf / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, wf / name)
    if samples is not None:
        (wf / "config" / "samples.test.tsv").write_text(samples)
    if config is not None:
        (wf / "config" / "test.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf


def smk(wf: Path, *args: str, timeout: int = 120,
        python_warnings: str = "ignore") -> subprocess.CompletedProcess:
    """Snakemake in ``wf``; Python warnings off (Snakemake's own) unless ``python_warnings``."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    if (wf / "config" / "test.yaml").is_file():
        cmd += ["--configfile", "config/test.yaml"]
    env = {**os.environ, "PYTHONWARNINGS": python_warnings}
    return subprocess.run(
        cmd, cwd=wf, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run -> {rule: count}."""
    counts = {}
    block = out.split("Job stats:", 1)[-1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def touch_h5(path: Path) -> None:
    """Change an HDF5 file (a new attribute) as a rerun of its producer would."""
    import h5py

    with h5py.File(path, "a") as f:
        f.attrs["touched"] = time.time()


def tsv(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["slide_id\tpath\tlabel\tpatient_id"] + ["\t".join(r) for r in rows]
    return "\n".join(lines) + "\n"


def demo_rows(n: int) -> list[tuple[str, str, str, str]]:
    return [
        (f"S{i}", f"resources/demo/S{i}.tiff", "SCC" if i % 2 else "normal", f"P{i}")
        for i in range(1, n + 1)
    ]


# A tiny but complete configuration: 4 small synthetic slides, 32 px patches, a few steps.
TINY = {
    "samples": "config/samples.test.tsv",
    "demo": {"width": 1024, "height": 1024, "mpp": 0.5, "artefacts": {}},
    "preset": "cpu-fast",
    "tile": {"mpp": 1.0, "patch_size": 32, "workers": 1},
    "augment": {"image_size": 32},
    "model": {"arch": "resnet18", "head_hidden_dim": 64, "head_out_dim": 32},
    "train": {
        "max_steps": 4,
        "batch_size": 16,
        "workers": 0,
        "checkpoint_every": 4,
        "log_every": 1,
    },
    "embed": {"batch_size": 64, "workers": 0},
    "classify": {"folds": 2, "inner_folds": 2, "bootstrap": 20, "tsne_max_points": 100},
    "figures": {"preview_pairs": 2},
    "runs": {"baseline": {}},
    "report": {"auto": True, "path": "report.html"},
}


def test_dry_run_full_dag(tmp_path):
    wf = workdir(tmp_path)
    done = smk(wf, "-n", "--cores", "2")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    n = len(
        [
            r
            for r in (ROOT / "config/samples.demo.tsv").read_text().splitlines()
            if r and not r.startswith(("#", "slide_id"))
        ]
    )
    assert counts["demo_slide"] == n and counts["tile"] == n and counts["embed"] == n
    assert counts["pretrain"] == 1 and counts["classify"] == 1 and counts["compare_runs"] == 1
    assert counts["plot_heatmap"] == n
    for rule in (
        "preview",
        "plot_loss",
        "plot_tsne",
        "plot_curves",
        "plot_confusion",
        "metrics_table",
        "all",
    ):
        assert counts[rule] == 1, rule


def test_demo_slides_follow_their_label_and_id_not_the_positive_label_or_row(tmp_path):
    """positive_label normal drew the SCC slides as normal tissue (and reran every slide); a
    row added above others changed their seeds."""

    def commands(done):
        return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
            r"demo-slide --out resources/demo/(\w+)\.tiff --kind (\w+) --seed (\d+)",
            done.stdout)}

    wf = workdir(tmp_path)
    base = commands(smk(wf, "-n", "-p", "--cores", "2"))
    sheet = (ROOT / "config/samples.demo.tsv").read_text().splitlines()
    labels = {r.split("\t")[0]: r.split("\t")[2] for r in sheet
              if r and not r.startswith(("#", "slide_id"))}
    assert base and {s: k for s, (k, _) in base.items()} == {
        s: "scc" if lab == "SCC" else "normal" for s, lab in labels.items()}
    other = commands(smk(wf, "-n", "-p", "--cores", "2", "--config",
                         "classify={positive_label: normal}"))
    assert other == base
    head = next(i for i, r in enumerate(sheet) if r.startswith("slide_id"))
    sheet.insert(head + 1, "D00\tresources/demo/D00.tiff\tnormal\tP00")
    (wf / "config" / "samples.demo.tsv").write_text("\n".join(sheet) + "\n")
    added = commands(smk(wf, "-n", "-p", "--cores", "2"))
    assert {s: v for s, v in added.items() if s != "D00"} == base


def test_lint_and_format(tmp_path):
    wf = workdir(tmp_path)
    done = smk(wf, "--lint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lints for" not in done.stdout + done.stderr
    snakefmt = shutil.which("snakefmt")
    if snakefmt is None:
        pytest.skip("snakefmt not installed (test extra)")
    fmt = subprocess.run(
        [snakefmt, "--check", "Snakefile", "workflow"],
        cwd=wf,
        capture_output=True,
        text=True,
        check=False,
    )
    assert fmt.returncode == 0, fmt.stderr


def test_the_default_profile_is_found_and_shows_a_failed_jobs_log(tmp_path):
    """Snakemake looks for profiles/default beside the Snakefile (the top level here), not in
    workflow/profiles/: the link makes the documented default profile real."""
    assert (ROOT / "profiles").resolve() == (ROOT / "workflow" / "profiles").resolve()
    wf = workdir(tmp_path, {**TINY, "report": {"auto": False}}, tsv(demo_rows(2)))
    (wf / "config" / "samples.test.tsv").write_text(
        tsv(demo_rows(2)).replace("resources/demo/S1.tiff", "broken.tiff"))
    (wf / "broken.tiff").write_bytes(b"II*\x00 not a slide")
    done = smk(wf, "--cores", "1", "results/patches/S1.h5")
    assert "Using workflow specific profile profiles/default" in done.stderr + done.stdout
    assert done.returncode != 0
    # show-failed-logs: the tile job's one-line error reaches the terminal, not only its log file
    assert "simclr-path tile: error: " in done.stderr + done.stdout, done.stderr[-3000:]


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if "simclr-path workflow: error:" in ln]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "sheet, expected",
    [
        (tsv(demo_rows(2) + [("S1", "resources/demo/S9.tiff", "SCC", "P9")]), "'S1' appears more"),
        (
            tsv([("S1", "resources/demo/S1.tiff", "tumour", "P1")] + demo_rows(3)[1:]),
            "label 'tumour'",
        ),
        (
            tsv([("S1", "/no/such/slide.svs", "SCC", "P1")] + demo_rows(3)[1:]),
            "row 1 (slide_id 'S1'): slide file not found",
        ),
        (
            tsv([("../x", "resources/demo/x.tiff", "SCC", "P1")] + demo_rows(3)[1:]),
            "not a safe file name",
        ),
        ("slide_id\tpath\tlabel\nS1\ta\tSCC\n", "missing column(s) patient_id"),
    ],
    ids=["duplicate", "label", "missing-file", "unsafe-id", "missing-column"],
)
def test_broken_samples_sheet_stops_dag_build(tmp_path, sheet, expected):
    wf = workdir(tmp_path, {"samples": "config/samples.test.tsv"}, sheet)
    line = _one_error_line(smk(wf, "-n", "--cores", "1"))
    assert expected in line and "samples.test.tsv" in line


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"tile": {"mpp": "fine"}}, "config: tile.mpp must be a number, got 'fine'"),
        ({"runs": {"a": {"train": {"lr": "x"}}}}, "config runs.a: train.lr must be a number"),
        ({"tile": {"mpp": -1.0}}, "tile.mpp must be a finite number of microns per pixel > 0"),
        ({"train": {"optimiser": "adamw"}}, "config: train: Additional properties"),
        ({"runs": {"a": {"model": {"head_layers": 5}}}}, "config runs.a: model.head_layers"),
        ({"runs": {"a": {"tile": {"mpp": 2.0}}}}, "config: runs.a: Additional properties"),
        ({"train": {"lr": -1}}, "config: train.lr must be a finite number > 0, got -1"),
        ({"runs": {"a": {"train": {"momentum": 1.5}}}}, "config runs.a: train.momentum"),
        # was found only after the whole run, and moved an existing keep.tsv aside
        ({"report": {"path": "keep.tsv"}}, "report.path: 'keep.tsv' does not match"),
        # found by pretraining only, after every slide was tiled
        ({"runs": {"a": {"augment": {"image_size": 512}}}},
         ("config (run a): augment.image_size 512 is larger than the 64 px patches of "
         "tile.patch_size")),
        ({"model": {"arch": "resnet1888"}}, "unknown timm model 'resnet1888'; did you mean"),
    ],
    ids=["type", "run-type", "range", "unknown-key", "run-range", "run-tile", "lr", "momentum",
         "report-path", "view-size", "arch"],
)
def test_bad_config_value_stops_dag_build(tmp_path, config, expected):
    wf = workdir(tmp_path, config)
    assert expected in _one_error_line(smk(wf, "-n", "--cores", "1"))


def test_nested_config_values_on_the_command_line(tmp_path):
    # --config parses nested values as text: {'auto': False} arrives as {'auto': 'False'}
    wf = workdir(tmp_path, TINY, tsv(demo_rows(4)))
    done = smk(wf, "-n", "-p", "--cores", "1", "--config", "report={'auto':False}",
               "figures={'heatmaps':False,'preview_pairs':3}", "demo={'width':1536}",
               "train={'amp':False,'lr':1e-3}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plot_heatmap" not in job_counts(done.stdout + done.stderr)
    assert "--width 1536" in done.stdout
    bad = smk(wf, "-n", "--cores", "1", "--config", "figures={'preview_pairs':2.5}")
    assert "figures.preview_pairs: '2.5' is not of type 'integer'" in _one_error_line(bad)
    bad = smk(wf, "-n", "--cores", "1", "--config", "report={'auto':no}")  # only true/false
    assert "report.auto: 'no' is not of type 'boolean'" in _one_error_line(bad)


def test_the_preview_of_a_budgeted_run_draws_the_views_it_trained(tmp_path):
    """A time budget with budget_min_steps can swap the views for cheaper ones (cpu-fast): the
    preview drew the configured views, which were never trained."""
    wf = workdir(tmp_path, TINY, tsv(demo_rows(4)))
    plain = smk(wf, "-n", "-p", "--cores", "1")
    assert "--config results/config/baseline/preview.yaml" in plain.stdout, plain.stderr[-2000:]
    done = smk(wf, "-n", "-p", "--cores", "1", "--config",
               "train={'time_budget_s':60,'budget_min_steps':10}")
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if "simclr-path preview" in x)
    assert "--config results/pretrain/baseline/config.yaml" in line


def test_a_positive_label_missing_from_the_sheet_stops_dag_build(tmp_path):
    rows = [(f"S{i}", f"resources/demo/S{i}.tiff", ["tumour", "normal"][i % 2], f"P{i}")
            for i in range(4)]
    cfg = dict(TINY, classify={**TINY["classify"], "labels": ["tumour", "normal"]})
    line = _one_error_line(smk(workdir(tmp_path / "a", cfg, tsv(rows)), "-n", "--cores", "1"))
    assert "config: classify.positive_label 'SCC' is not one of the classes of " in line
    assert "(tumour, normal); set it to the one that is the positive (tumour) class" in line
    assert "null" not in line  # two classes need a positive one
    good = dict(cfg, classify={**cfg["classify"], "positive_label": "tumour"})
    done = smk(workdir(tmp_path / "b", good, tsv(rows)), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    typo = dict(good, runs={"a": {}, "b": {"classify": {"positive_label": "tumor"}}})
    line = _one_error_line(smk(workdir(tmp_path / "c", typo, tsv(rows)), "-n", "--cores", "1"))
    assert "config runs.b: classify.positive_label 'tumor'" in line
    # a run's own labels that leave out a class of the sheet: classify refused its rows only
    # after pretraining
    narrow = dict(good, runs={"a": {}, "b": {"classify": {"labels": ["tumour", "other"]}}})
    line = _one_error_line(smk(workdir(tmp_path / "n", narrow, tsv(rows)), "-n", "--cores", "1"))
    assert ("config runs.b: classify.labels ['tumour', 'other'] leaves out label(s) 'normal' "
            "of ") in line, line
    # three classes: a typo no longer turns the headline AUROC into the macro one in silence;
    # null asks for the macro scores
    rows3 = [(f"S{i}", f"resources/demo/S{i}.tiff", ["tumour", "normal", "inflamed"][i % 3],
              f"P{i}") for i in range(6)]
    three = dict(TINY, classify={**TINY["classify"], "labels": ["tumour", "normal", "inflamed"],
                                 "positive_label": "tumor"})
    line = _one_error_line(smk(workdir(tmp_path / "d", three, tsv(rows3)), "-n", "--cores", "1"))
    assert "'tumor' is not one of the classes" in line and "or to null for macro" in line
    macro = dict(three, classify={**three["classify"], "positive_label": None},
                 runs={"m": {}, "t": {"classify": {"positive_label": "tumour"}}})
    done = smk(workdir(tmp_path / "e", macro, tsv(rows3)), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    # a heatmap draws the positive class's probability: a macro run has none and plot-heatmap
    # failed on it after pretraining; it is left out, with one warning
    assert job_counts(done.stdout + done.stderr)["plot_heatmap"] == 6, done.stdout[-2000:]
    assert done.stderr.count("run(s) m score all classes one-vs-rest") == 1, done.stderr[-2000:]
    # on the command line an empty label is the null (the text "null" could be a class)
    done = smk(workdir(tmp_path / "e2", three, tsv(rows3)), "-n", "--cores", "1",
               "--config", "classify={positive_label: ''}")
    assert done.returncode == 0, done.stderr[-2000:]
    line = _one_error_line(smk(workdir(tmp_path / "f", dict(good, classify={
        **good["classify"], "positive_label": None}), tsv(rows)), "-n", "--cores", "1"))
    assert "classify.positive_label is null, but" in line and "two classes" in line


def test_demo_artefacts_and_null_runs_on_the_command_line(tmp_path):
    """An unknown demo artefact failed only in the demo-slide job, after Snakemake had deleted
    the slide; `runs={baseline: null}` was refused as "'null' is not of type 'object', 'null'"
    (review)."""
    wf = workdir(tmp_path, TINY, tsv(demo_rows(4)))
    line = _one_error_line(smk(wf, "-n", "--cores", "1", "--config", "demo={artefacts: {S1: ink}}"))
    assert ("config: demo.artefacts.S1: unknown artefact(s) ink; choose from pen, glass, fold"
            in line), line
    done = smk(wf, "-n", "--cores", "1", "--config", "demo={artefacts: {S1: 'pen,fold'}}",
               "runs={baseline: null}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--artefacts pen,fold" in smk(wf, "-n", "-p", "--cores", "1", "--config",
                                         "demo={artefacts: {S1: 'pen,fold'}}").stdout


def test_model_weights_are_checked_at_the_start_and_are_an_input_of_pretraining(tmp_path):
    """A missing file failed only after every slide was tiled; new weights at the same path
    did not rerun pretraining."""
    cfg = dict(TINY, runs={"a": {}, "b": {"model": {"weights": "w/enc.pt"}}})
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    line = _one_error_line(smk(wf, "-n", "--cores", "1"))
    assert line.startswith("simclr-path workflow: error: config runs.b: model.weights: file not "
                           "found: w/enc.pt;"), line
    (wf / "w").mkdir()
    (wf / "w" / "enc.pt").write_bytes(b"weights")
    done = smk(wf, "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = (done.stdout + done.stderr).split("rule pretrain:")[1:]
    assert len(jobs) == 2 and sum("w/enc.pt" in j.split("output:")[0] for j in jobs) == 1, jobs


def test_a_layer_the_model_lacks_stops_dag_build(tmp_path):
    """embed_layer would say so only after pretraining."""
    cfg = dict(TINY, layer_eval=["stage2", "stage7"])
    line = _one_error_line(smk(workdir(tmp_path, cfg, tsv(demo_rows(4))), "-n", "--cores", "1"))
    assert "config layer_eval (run baseline, model.arch resnet18): layer 'stage7': the model " \
        "has feature stages 0-4" in line
    typo = dict(TINY, layer_eval=["stage2"], model={**TINY["model"], "arch": "resnet1800"})
    line = _one_error_line(smk(workdir(tmp_path / "b", typo, tsv(demo_rows(4))), "-n", "--cores", "1"))
    assert "model.arch resnet1800" in line and "unknown timm model 'resnet1800'" in line
    ok = dict(TINY, layer_eval=["stage4", "pooled", "head"])
    done = smk(workdir(tmp_path / "c", ok, tsv(demo_rows(4))), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_probe_label_fraction_beside_finetune_eval_stops_dag_build(tmp_path):
    """The comparison's full-label probe is rule classify: at a fraction of its own it would be
    tabled as 100 %."""
    cfg = dict(TINY, finetune_eval=[1.0, 0.5],
               classify={**TINY["classify"], "label_fraction": 0.5})
    line = _one_error_line(smk(workdir(tmp_path, cfg, tsv(demo_rows(4))), "-n", "--cores", "1"))
    assert "config: classify.label_fraction 0.5 with finetune_eval" in line
    ok = dict(TINY, classify={**TINY["classify"], "label_fraction": 0.5})  # alone: a design
    done = smk(workdir(tmp_path / "b", ok, tsv(demo_rows(4))), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_class_of_one_patient_is_warned_about_at_the_start(tmp_path):
    """The shipped slide example has one patient per class: classify refuses it, but only
    after pretraining, so the DAG build says so first (tiling a pilot sheet still runs)."""
    rows = demo_rows(4)
    rows[2] = ("S3", "resources/demo/S3.tiff", "SCC", "P1")  # the SCC slides: one patient
    done = smk(workdir(tmp_path, TINY, tsv(rows)), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("simclr-path workflow: warning:")]
    assert len(lines) == 1 and "config/samples.test.tsv: class 'SCC' has slides from only 1 " \
        "patient(s); classify will stop after pretraining" in lines[0], done.stderr[-2000:]
    fine = smk(workdir(tmp_path / "b", TINY, tsv(demo_rows(4))), "-n", "--cores", "1")
    assert fine.returncode == 0 and "simclr-path workflow: warning:" not in fine.stderr



def test_a_report_too_large_for_one_html_file_is_warned_about(tmp_path):
    """500 slides embed about 1 GB of QC pictures and heatmaps in report.html, which browsers
    cannot open: the DAG build says so and names report.zip; a .zip report says nothing."""
    wf = workdir(tmp_path, TINY, tsv(demo_rows(110)))  # 110 QC pictures + 110 heatmaps
    done = smk(wf, "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("simclr-path workflow: warning:")]
    assert any("report.path report.html: the report embeds 22" in x and "report.zip" in x
               for x in lines), lines
    zipped = smk(workdir(tmp_path / "z", {**TINY, "report": {"auto": True, "path": "report.zip"}},
                         tsv(demo_rows(110))), "-n", "--cores", "1")
    assert zipped.returncode == 0 and "the report embeds" not in zipped.stderr

def test_a_sheet_warning_is_printed_once_per_run(tmp_path):
    """Snakemake spawns a process per `run:` job that parses the workflow again: each one
    printed the sheet's warnings once more (7-9 copies in a real run)."""
    rows = demo_rows(4)
    rows[2] = ("S3", "resources/demo/S3.tiff", "SCC", "P1")  # a warning at the DAG build
    wf = workdir(tmp_path, TINY, tsv(rows))
    done = smk(wf, "--cores", "1", "results/config/tile.yaml", "results/config/baseline/embed.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (wf / "results/config/tile.yaml").is_file()
    lines = [x for x in done.stderr.splitlines() if x.startswith("simclr-path workflow: warning:")]
    assert len(lines) == 1 and "class 'SCC' has slides from only 1 patient(s)" in lines[0], lines


def test_a_samples_sheet_warning_is_one_line_at_the_dag_build(tmp_path):
    """An unused column was warned about in Python's file:line form, with a source line."""
    sheet = tsv(demo_rows(4)).splitlines()
    sheet = [sheet[0] + "\tnotes"] + [r + "\tsee report" for r in sheet[1:]]
    done = smk(workdir(tmp_path, TINY, "\n".join(sheet) + "\n"), "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if "notes" in x]
    assert len(lines) == 1 and lines[0].startswith(
        "simclr-path workflow: warning: config/samples.test.tsv: column(s) 'notes' are not used")
    assert "UserWarning" not in done.stderr


def test_each_stage_yaml_holds_only_the_keys_it_reads(tmp_path):
    """A t-SNE key reruns the t-SNE figure only; a probe key reruns classification, not
    fine-tuning."""
    cfg = dict(TINY, finetune_eval=[1.0])
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    stages = ("classify", "tsne", "finetune")
    targets = [f"results/config/baseline/{s}.yaml" for s in stages]

    def write(classify):
        (wf / "config" / "test.yaml").write_text(
            yaml.safe_dump(dict(cfg, classify={**TINY["classify"], **classify})))
        done = smk(wf, "--cores", "1", *targets)
        assert done.returncode == 0, done.stderr[-2000:]
        return {s: (wf / t).read_text() for s, t in zip(stages, targets)}

    first = write({})
    assert yaml.safe_load(first["tsne"]) == {
        "classify": {"tsne_max_points": 100, "tsne_perplexity": 30.0, "seed": 0}}
    assert "tsne" not in first["classify"] and "tsne" not in first["finetune"]
    assert "c_grid" not in first["finetune"] and "c_grid" in first["classify"]
    tsne = write({"tsne_max_points": 50, "tsne_perplexity": 5.0})
    assert tsne["classify"] == first["classify"] and tsne["finetune"] == first["finetune"]
    assert "tsne_max_points: 50" in tsne["tsne"]
    probe = write({"tsne_max_points": 50, "tsne_perplexity": 5.0, "c_grid": [0.1],
                   "inner_folds": 4, "max_iter": 500})
    assert probe["finetune"] == first["finetune"] and probe["classify"] != first["classify"]
    # and Snakemake sees nothing to redo in the unchanged ones
    dry = smk(wf, "-n", "--cores", "1", *targets)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # the augmentation preview reads the augment section alone: a training key redraws nothing
    done = smk(wf, "--cores", "1", "results/config/baseline/preview.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    preview = yaml.safe_load((wf / "results/config/baseline/preview.yaml").read_text())
    assert list(preview) == ["augment"] and preview["augment"]["image_size"] > 0


def test_demo_config_removes_the_pen_ink_it_draws():
    # the QC caption asks the user to check that pen marks are left out
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    if any("pen" in a.split(",") for a in cfg["demo"]["artefacts"].values()):
        assert cfg["tile"]["remove_pen"] is True


def test_exponent_numbers_in_config_yaml_are_numbers(tmp_path):
    # Snakemake's YAML loader (YAML 1.1) reads `1e-4` as a string; the schema wants a number
    wf = workdir(tmp_path)
    (wf / "config" / "test.yaml").write_text(
        "train:\n  lr: 1e-4\nruns:\n  baseline: {}\n  small-c:\n    classify:\n"
        "      c_grid: [1e-5, 1e-4, 1e-3]\nfinetune_eval: [1e-1]\n"
    )
    done = smk(wf, "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    counts = job_counts(done.stdout + done.stderr)
    assert "pretrain" in counts and "finetune" in counts


def test_ablation_config_dry_runs_into_the_grid(tmp_path):
    wf = workdir(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--cores",
            "2",
            "--configfile",
            "config/ablation.yaml",
        ],
        cwd=wf,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    runs = yaml.safe_load((ROOT / "config/ablation.yaml").read_text())["runs"]
    assert counts["pretrain"] == len(runs) >= 8
    assert counts["classify"] == len(runs) and counts["compare_runs"] == 1
    assert counts["tile"] == counts["demo_slide"]  # tiling is shared by every run
    assert counts["embed"] == len(runs) * counts["tile"]


def test_tiny_ablation_jobs(tmp_path):
    cfg = dict(
        TINY, runs={"a": {}, "b": {"model": {"head_layers": 0}}, "c": {"augment": {"stain_p": 0.0}}}
    )
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    done = smk(wf, "-n", "--cores", "2")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts["pretrain"] == 3 and counts["embed"] == 12 and counts["tile"] == 4
    # pretrain, preview, embed, classify and tsne stage files per run
    assert counts["plot_heatmap"] == 12 and counts["run_config"] == 3 * 5
    # each run's resolved config is written where the CLI reads it
    assert "results/config/b/pretrain.yaml" in done.stdout + done.stderr


def test_runs_with_equal_settings_share_pretraining_and_embeddings(tmp_path):
    """A classifier ablation pretrained and embedded every run again, the same encoder each
    time (hours per run on a cohort): runs share what they would compute alike."""
    cfg = dict(TINY, finetune_eval=[1.0], runs={
        "a": {},
        "b": {"classify": {"c_grid": [0.1, 1.0]}},  # a's encoder and embeddings
        "c": {"embed": {"tta": True}},  # a's encoder, its own embeddings
        "d": {"train": {"seed": 7}},  # its own pretraining
        "e": {"train": {"workers": 1}, "classify": {"folds": 3}},  # a speed key: a's
    })
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    done = smk(wf, "-n", "-p", "--cores", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    counts = job_counts(out + done.stderr)
    assert counts["pretrain"] == 2 and counts["embed"] == 3 * 4 and counts["classify"] == 5
    assert {m for m in re.findall(r"--out results/pretrain/(\w+)", out)} == {"a", "d"}
    assert set(re.findall(r"--out results/embeddings/(\w+)/", out)) == {"a", "c", "d"}
    for run, src in (("b", "a"), ("e", "a"), ("c", "c"), ("d", "d")):
        line = next(x for x in out.splitlines() if f"--out results/classify/{run} " in x)
        assert f"results/embeddings/{src}/S1.h5" in line, line
    assert "--run-name 'b (pretraining of a)'" in out and "--run-name 'e (pretraining of a)'" in out
    assert counts["plot_loss"] == 5 and counts["preview"] == 5
    # said once: repeats of one setting would collapse into one pretraining in silence
    said = [x for x in (out + done.stderr).splitlines() if "use run a's pretraining" in x]
    assert len(said) == 1 and "run(s) b, c, e use run a's pretraining" in said[0], said
    # fine-tuning reads the classifier's folds (e has its own), not embed.tta (c shares a's)
    assert set(re.findall(r"--out results/finetune/(\w+)/", out)) == {"a", "d", "e"}
    assert counts["compare_finetune"] == 5

    # a run added above one whose results exist does not take them over (which reran all that
    # read them, and pretrained again under the new name) (review)
    (wf / "results/pretrain/d").mkdir(parents=True)
    (wf / "results/pretrain/d/summary.json").write_text("{}")
    cfg["runs"] = {"new": {"train": {"seed": 7}}, **cfg["runs"]}
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = smk(wf, "-n", "-p", "--cores", "2").stdout
    assert set(re.findall(r"--out results/pretrain/(\w+)", out)) == {"a", "d"}, out[-3000:]
    assert "--run-name 'new (pretraining of d)'" in out


def test_layer_eval_jobs(tmp_path):
    """Layer-wise linear evaluation: every layer embedded, classified and compared per run."""
    cfg = dict(TINY, layer_eval=["stage2", "stage3", "head"], runs={"a": {}, "b": {"train": {"seed": 1}}})
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    done = smk(wf, "-n", "--cores", "2")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts["embed_layer"] == 2 * 3 * 4 and counts["classify_layer"] == 2 * 3
    assert counts["compare_layers"] == 2 and counts["embed"] == 2 * 4
    bad = workdir(tmp_path / "bad", dict(cfg, layer_eval=["block9"]), tsv(demo_rows(4)))
    assert "layer_eval.0" in _one_error_line(smk(bad, "-n", "--cores", "1"))
    # the layer jobs give --layer: their config file leaves embed.layer out, so that changing
    # the run's own layer reruns its main embedding alone
    printed = smk(wf, "-n", "-p", "--cores", "2").stdout
    lines = [x for x in printed.splitlines() if "simclr-path embed " in x and "--layer" in x]
    assert len(lines) == 2 * 3 * 4
    assert all("--config results/config/a/embed_layer.yaml " in x
               or "--config results/config/b/embed_layer.yaml " in x for x in lines), lines[0]
    targets = [f"results/config/a/{s}.yaml" for s in ("embed", "embed_layer")]
    done = smk(wf, "--cores", "1", *targets)
    assert done.returncode == 0, done.stderr[-2000:]
    layer_yaml = (wf / targets[1]).read_text()
    assert "layer" not in yaml.safe_load(layer_yaml)["embed"]
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump(
        dict(cfg, embed={**TINY["embed"], "layer": "stage3"}), sort_keys=False))
    dry = smk(wf, "-n", "--cores", "1", *targets)
    assert job_counts(dry.stdout + dry.stderr) == {"run_config": 1, "total": 1}, dry.stdout
    assert "results/config/a/embed.yaml" in dry.stdout


def test_finetune_eval_jobs(tmp_path):
    """Fine-tuning: every run at every label fraction, one comparison per run; off by default."""
    cfg = dict(TINY, finetune_eval=[1.0, 0.1, 0.01], runs={"a": {}, "b": {"train": {"seed": 1}}})
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    done = smk(wf, "-n", "-p", "--cores", "2")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts["finetune"] == 2 * 3 and counts["compare_finetune"] == 2
    assert counts["classify"] == 2 and counts["run_config"] == 2 * 6  # + finetune.yaml per run
    # the linear probe at each fraction below 1 (at 1.0 it is the run's classify job)
    assert counts["classify_fraction"] == 2 * 2
    out = done.stdout + done.stderr
    for frac in ("1.0", "0.1", "0.01"):
        assert f"results/finetune/b/labels_{frac}/metrics.json" in out
    for frac in ("0.1", "0.01"):
        assert f"results/classify_fraction/b/labels_{frac}/metrics.json" in out
    assert "classify_fraction/b/labels_1.0" not in out
    assert "--label-fraction 0.01" in out
    off = smk(workdir(tmp_path / "off", TINY, tsv(demo_rows(4))), "-n", "--cores", "2")
    assert "finetune" not in job_counts(off.stdout + off.stderr)
    bad = workdir(tmp_path / "bad", dict(cfg, finetune_eval=[0.0]), tsv(demo_rows(4)))
    assert "finetune_eval.0" in _one_error_line(smk(bad, "-n", "--cores", "1"))


def test_an_edit_to_sheet_columns_the_stages_do_not_read_reruns_nothing(tmp_path):
    """classify, fine-tuning and the t-SNE figure read a copy of the sheet's slide_id, path,
    label, patient_id (and split) columns: a comment or a column of notes edited in the sheet
    leaves the copy, and so them, alone; a label edited reruns them, with
    `--rerun-triggers mtime` too (the copy's rule reruns through its params alone)."""
    cfg = dict(TINY, finetune_eval=[1.0])
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    printed = smk(wf, "-n", "-p", "--cores", "2").stdout
    for command in ("classify", "finetune", "plot-tsne"):
        lines = [x for x in printed.splitlines() if f"simclr-path {command} " in x]
        assert lines and all("--samples results/config/samples.tsv " in x for x in lines), command
    _placeholder_outputs(wf)  # as if the pipeline had run
    copy = wf / "results/config/samples.tsv"
    smk(wf, "-n", "--cores", "1")  # the parse writes the copy over its placeholder
    first = copy.read_text()
    assert first.splitlines()[0].split("\t") == ["slide_id", "path", "label", "patient_id"]
    assert len(first.splitlines()) == 5
    # the workflow's files (a fresh clone's scripts are new) and demo slides, then what is made
    # from them: up to date, and older than the sheet edits below
    _set_mtimes(wf, -7200)
    _set_mtimes(wf / "results", -3600)
    dry = smk(wf, "-n", "--cores", "1")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
    sheet = wf / "config" / "samples.test.tsv"
    lines = sheet.read_text().splitlines()
    sheet.write_text("# rescanned slides\n" + "\n".join(
        [lines[0] + "\tnotes"] + [x + "\tseen" for x in lines[1:]]) + "\n")
    dry = smk(wf, "-n", "--cores", "1")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
    assert copy.read_text() == first
    sheet.write_text(sheet.read_text().replace("\tnormal\tP2", "\tSCC\tP2"))
    dry = smk(wf, "-n", "--cores", "1", "--rerun-triggers", "mtime")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts.get("classify") == 1 and counts.get("finetune") == 1, counts
    assert counts.get("plot_tsne") == 1 and "pretrain" not in counts, counts
    assert "S2\tresources/demo/S2.tiff\tSCC\tP2" in copy.read_text()
    # a dry run beside a running workflow (which holds the folder's lock) changed the labels
    # that workflow's later jobs read (review): the copy stays, with a warning
    locks = wf / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.input.lock").write_text("")
    before = copy.read_text()
    sheet.write_text(sheet.read_text().replace("\tSCC\tP2", "\tnormal\tP2"))
    dry = smk(wf, "-n", "--cores", "1")
    assert copy.read_text() == before and dry.returncode == 0
    warned = [x for x in dry.stderr.splitlines() if "the copy is left as it is" in x]
    assert len(warned) == 1 and warned[0].startswith(
        "simclr-path workflow: warning: config/samples.test.tsv differs from "
        "results/config/samples.tsv, which the running workflow reads, so the copy is left as it "
        "is (another snakemake holds this folder's lock)") and "--unlock" in warned[0], warned
    (locks / "0.input.lock").unlink()
    smk(wf, "-n", "--cores", "1")
    assert "S2\tresources/demo/S2.tiff\tnormal\tP2" in copy.read_text()


def test_a_finetune_label_fraction_the_workflow_does_not_use_is_warned_about(tmp_path):
    cfg = dict(TINY, finetune_eval=[1.0, 0.5], finetune={"label_fraction": 0.1},
               runs={"a": {}, "b": {"finetune": {"label_fraction": 0.2}}})
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    done = smk(wf, "-n", "--cores", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [x for x in done.stderr.splitlines() if "finetune.label_fraction" in x]
    listed = smk(wf, "-n", "--cores", "1", "--config", "finetune_eval=[1.0, 0.1]")
    assert "config: finetune.label_fraction 0.1 is not used by the workflow, which fine-tunes " \
           "at the fractions listed in finetune_eval (now 1.0, 0.1); it is listed there: " \
           "remove the key" in listed.stderr, listed.stderr[-2000:]
    assert warned == [
        ("simclr-path workflow: warning: config: finetune.label_fraction 0.1 is not used by the "
        "workflow, which fine-tunes at the fractions listed in finetune_eval (now 1.0, 0.5); "
        "list it there"),
        ("simclr-path workflow: warning: config runs.b: finetune.label_fraction 0.2 is not used "
        "by the workflow, which fine-tunes at the fractions listed in finetune_eval (now 1.0, "
        "0.5); list it there")]
    # nor does it reach the fine-tuning config file, whose change would rerun the jobs
    done = smk(wf, "--cores", "1", "results/config/a/finetune.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "label_fraction" not in (wf / "results/config/a/finetune.yaml").read_text()


@needs(LC25000)
def test_a_samples_sheet_split_draws_heatmaps_of_the_test_slides_only(tmp_path):
    # training slides have no held-out predictions to draw
    rows = ["\t".join(r) + ("\ttest" if int(r[0][1:]) > 2 else "\ttrain") for r in demo_rows(4)]
    sheet = "slide_id\tpath\tlabel\tpatient_id\tsplit\n" + "\n".join(rows) + "\n"
    wf = workdir(tmp_path, TINY, sheet)
    done = smk(wf, "-n", "-p", "--cores", "2")
    assert done.returncode == 0, done.stderr
    assert job_counts(done.stdout + done.stderr)["plot_heatmap"] == 2
    assert "heatmaps/S3.png" in done.stdout and "heatmaps/S1.png" not in done.stdout


def test_a_split_that_cannot_evaluate_is_warned_about_at_the_start(tmp_path):
    """A patient on both sides, or a class without training slides, stopped classify only after
    pretraining; a test side of one class gave AUROC n/a without a word."""

    def sheet(splits, patients=None):
        rows = [(*r[:3], (patients or {}).get(r[0], r[3]), sp)
                for r, sp in zip(demo_rows(4), splits)]
        return ("slide_id\tpath\tlabel\tpatient_id\tsplit\n"
                + "\n".join(map("\t".join, rows)) + "\n")

    cases = [
        (sheet(["train", "train", "test", "test"], {"S3": "P1"}),
         "patient 'P1' has slides in both train and test"),
        (sheet(["test", "train", "test", "test"]), "no training slide of class 'SCC'"),
        (sheet(["train", "train", "test", "train"]), "the test slides of the split are all of one"),
    ]
    for i, (text, expected) in enumerate(cases):
        done = smk(workdir(tmp_path / str(i), TINY, text), "-n", "--cores", "1")
        assert done.returncode == 0, done.stderr[-2000:]  # tiling by target stays possible
        assert done.stderr.count(expected) == 1, (expected, done.stderr[-2000:])
    good = smk(workdir(tmp_path / "ok", TINY, sheet(["train", "train", "test", "test"])), "-n",
               "--cores", "1")
    assert "split" not in good.stderr, good.stderr[-2000:]


def test_the_sheets_mpp_column_reaches_the_slides_tile_command(tmp_path):
    """The one place a slide's own scale is set in the workflow: a value lost on the way
    tiles the slide at its metadata's mpp without a word."""
    rows = [(*r, mpp) for r, mpp in zip(demo_rows(4), ("0.25", "", "0.5", ""))]
    sheet = "slide_id\tpath\tlabel\tpatient_id\tmpp\n" + "\n".join(map("\t".join, rows)) + "\n"
    done = smk(workdir(tmp_path, TINY, sheet), "-n", "-p", "--cores", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    tile = {line.split("resources/demo/")[1].split(".tiff")[0]: line
            for line in done.stdout.splitlines() if "simclr-path tile " in line}
    assert sorted(tile) == ["S1", "S2", "S3", "S4"]
    assert "--slide-mpp 0.25" in tile["S1"] and "--slide-mpp 0.5" in tile["S3"]
    assert "--slide-mpp" not in tile["S2"] and "--slide-mpp" not in tile["S4"]


def test_patch_dataset_config_dry_runs(tmp_path):
    wf = workdir(tmp_path)
    cfg = yaml.safe_load((ROOT / "config/patches.example.yaml").read_text())
    cfg["patch_datasets"]["lc25000"]["dir"] = str(LC25000)
    cfg["patch_datasets"]["lc25000"]["groups"] = str(LC25000 / "groups.csv")
    cfg["patch_datasets"]["lc25000"]["bit_depth"] = 12
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump(cfg))
    done = smk(wf, "-n", "-p", "--cores", "2")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout + done.stderr)
    assert counts["import_patches"] == 1 and counts["embed"] == 1
    assert "--patch-size 224 --groups" in done.stdout and "--bit-depth 12" in done.stdout
    assert "tile" not in counts and "plot_heatmap" not in counts
    assert "classify.labels" not in done.stderr
    # a subset of the classes listed to leave one out: it cannot, and the build says so once
    cfg["classify"]["labels"] = ["lung_scc", "lung_n"]
    cfg["runs"] = {"a": {}, "b": {}}
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump(cfg))
    done = smk(wf, "-n", "--cores", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: classify.labels ['lung_scc', 'lung_n'] is read from a "
                             "samples sheet only") == 1, done.stderr[-2000:]


def test_a_missing_groups_csv_stops_dag_build(tmp_path):
    cfg = dict(PATCHES_ONLY, patch_datasets={"tiles": {"dir": "tiles", "groups": "no/g.csv"}})
    wf = workdir(tmp_path, cfg)
    (wf / "tiles" / "SCC").mkdir(parents=True)
    (wf / "tiles" / "normal").mkdir()
    line = _one_error_line(smk(wf, "-n", "--cores", "1", "--replace-workflow-config"))
    assert "config: patch_datasets.tiles.groups: file not found: no/g.csv" in line


def test_a_tile_set_that_cannot_be_classified_is_warned_about_at_the_start(tmp_path):
    """One class folder, or a class of one source image, stopped classify only after
    pretraining; a sheet got the warning, a tile set did not."""
    import cv2

    def tiles(wf, classes):
        for cls in classes:
            (wf / "tiles" / cls).mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(wf / "tiles" / cls / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))

    wf = workdir(tmp_path / "one", PATCHES_ONLY)
    tiles(wf, ["SCC"])
    done = smk(wf, "-n", "--cores", "1", "--replace-workflow-config")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("the tiles hold one class (SCC); classify needs two") == 1
    cfg = dict(PATCHES_ONLY, patch_datasets={"tiles": {"dir": "tiles", "groups": "g.csv"}})
    wf = workdir(tmp_path / "group", cfg)
    tiles(wf, ["SCC", "normal"])
    (wf / "g.csv").write_text("path,group\n" + "".join(
        f"{c}/{i}.png,{c if c == 'SCC' else f'n{i}'}\n" for c in ("SCC", "normal")
        for i in range(3)))
    done = smk(wf, "-n", "--cores", "1", "--replace-workflow-config")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("class 'SCC' has tiles of only 1 source image (group)") == 1
    assert "'normal'" not in done.stderr
    # a tile the groups CSV lacks: the import would fail after the build, so the build does
    (wf / "g.csv").write_text("path,group\nSCC/0.png,a\n")
    line = _one_error_line(smk(wf, "-n", "--cores", "1", "--replace-workflow-config"))
    assert line.startswith("simclr-path workflow: error: config: patch_datasets.tiles: ")
    assert "no group for 5 tile(s)" in line


def _require_commands(*names: str) -> None:
    from simclr_path.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [n for n in names if n not in sub.choices]
    if missing:
        pytest.skip(f"simclr-path subcommands not built yet: {missing}")


PIPELINE_COMMANDS = (
    "demo-slide",
    "tile",
    "preview",
    "pretrain",
    "embed",
    "classify",
    "plot-tsne",
    "plot-curves",
    "plot-confusion",
    "plot-heatmap",
    "plot-loss",
)


# Fine-tuning in the tiny run: one epoch on at most 32 patches per slide and fold, no final model.
TINY_FINETUNE = {
    "finetune_eval": [1.0, 0.5],
    "finetune": {
        "epochs": 1,
        "batch_size": 16,
        "max_patches_per_slide": 32,
        "final_model": False,
        "device": "cpu",
        "amp": False,
    },
}


@pytest.mark.slow
def test_tiny_end_to_end_with_report(tmp_path):
    """4 tiny synthetic slides, a few steps of a small model: every artefact and the report,
    fine-tuning at two label fractions and its comparison with the linear probe included."""
    _require_commands(*PIPELINE_COMMANDS, "finetune")
    wf = workdir(tmp_path, {**TINY, **TINY_FINETUNE}, tsv(demo_rows(4)))
    t0 = time.perf_counter()
    # one thread per fine-tuning job: two OpenMP threads spin-wait on a busy 2-core machine
    done = smk(wf, "--cores", "2", "--set-threads", "finetune=1", timeout=600,
               python_warnings="default")
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-5000:]
    print(f"tiny end-to-end run: {elapsed:.1f} s")
    # every stage's warnings reach the console, not only its log (tile's and import's did)
    warned = {line for log in (wf / "results/logs").rglob("*.log")
              for line in log.read_text(errors="replace").splitlines() if ": warning: " in line}
    assert any(" classify: warning:" in w for w in warned), warned
    assert all(w in done.stderr for w in warned), warned - set(done.stderr.splitlines())
    bench = wf / "results/benchmarks"
    extra = [*bench.glob("finetune/*/*.tsv"), *bench.glob("classify_fraction/*/*.tsv"),
             *bench.glob("compare_finetune/*.tsv")]
    print("fine-tuning jobs (s):", {str(b.relative_to(bench)): float(
        b.read_text().splitlines()[1].split("\t")[0]) for b in extra})
    for path in [f"results/qc/S{i}.png" for i in range(1, 5)] + [
        "results/pretrain/baseline/encoder.pt",
        "results/classify/baseline/metrics.json",
        "results/classify/baseline/predictions_slides.csv",
        "results/figures/baseline/loss.png",
        "results/figures/baseline/augmentations.png",
        "results/figures/baseline/tsne_label.png",
        "results/figures/baseline/tsne_slide.png",
        "results/figures/baseline/tsne_thumbnails.png",
        "results/figures/baseline/roc.png",
        "results/figures/baseline/pr.png",
        "results/figures/baseline/confusion.png",
        "results/figures/baseline/metrics.html",
        "results/figures/baseline/heatmaps/S1.png",
        "results/summary/runs.tsv",
        "results/summary/runs.png",
        "results/summary/runs.html",
    ]:
        assert (wf / path).is_file() and (wf / path).stat().st_size > 0, path
    for frac in ("1.0", "0.5"):
        for name in ("metrics.json", "predictions_slides.csv", "history.csv"):
            assert (wf / f"results/finetune/baseline/labels_{frac}/{name}").is_file(), (frac, name)
    assert (wf / "results/classify_fraction/baseline/labels_0.5/metrics.json").is_file()
    assert not (wf / "results/classify_fraction/baseline/labels_1.0").exists()  # classify's own
    ft = pd.read_csv(wf / "results/summary/baseline/finetune.tsv", sep="\t")
    assert list(ft["method"]) == ["linear probe"] * 2 + ["fine-tuned"] * 2
    assert list(ft["label_fraction"]) == [1.0, 0.5, 1.0, 0.5]
    assert ft[["slide_auroc", "patch_auroc"]].notna().all().all()
    assert ft["slide_auroc"].between(0, 1).all() and ft["patch_auroc"].between(0, 1).all()
    # at each fraction the probe and fine-tuning had the same labelled patients per fold
    for frac in (1.0, 0.5):
        at = ft[ft["label_fraction"] == frac]
        assert at["labelled_patients_per_fold"].nunique() == 1
    # fine-tuning may hold validation patients out of the labelled ones: the table counts the
    # patients each method trained on, from its metrics.json
    probe, tuned = ft[ft["method"] == "linear probe"], ft[ft["method"] == "fine-tuned"]
    assert (probe["trained_patients_per_fold"] == probe["labelled_patients_per_fold"]).all()
    for frac, got in zip(tuned["label_fraction"], tuned["trained_patients_per_fold"]):
        folds = json.loads((wf / f"results/finetune/baseline/labels_{frac}/metrics.json")
                           .read_text())["folds"]
        assert got == np.mean([f["n_train_patients"] for f in folds])
        assert all(f["n_train_patients"] + f.get("n_val_patients", 0) == f["n_labelled_patients"]
                   for f in folds)
    for path in ("finetune.png", "finetune.html"):
        assert (wf / "results/summary/baseline" / path).stat().st_size > 0
    runs = (wf / "results/summary/runs.tsv").read_text().splitlines()
    assert runs[0].startswith("run\t") and runs[1].startswith("baseline\t")
    report = wf / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000, done.stderr[-3000:]
    text = report.read_text(errors="replace")
    assert "whole-slide images are tiled" in text and "folders of labelled tiles" not in text
    # the captions get the run's positive class from the rule's params (a function of the run)
    assert "the mean P(SCC) of its patches" in text and "Held-out classifier score P(SCC)" in text
    for artefact in ("finetune.png", "finetune.html", "fine-tuning vs linear probe"):
        assert artefact in text, artefact  # the comparison is in the report
    for log in ("tile/S1.log", "pretrain/baseline.log", "classify/baseline.log",
                "finetune/baseline/labels_0.5.log", "classify_fraction/baseline/labels_0.5.log"):
        assert (wf / "results/logs" / log).is_file()
    for log in ("metrics_table/baseline.log", "compare_runs.log"):  # script rules log too
        assert "wrote results/" in (wf / "results/logs" / log).read_text(), log

    # nothing left to do
    again = smk(wf, "-n", "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # a training key reruns pretraining and what follows, not the augmentation preview
    longer = smk(wf, "-n", "--cores", "2", "--config",
                 f"train={{'max_steps': {TINY['train']['max_steps'] + 1}}}")
    counts = job_counts(longer.stdout + longer.stderr)
    assert counts.get("pretrain") == 1 and "preview" not in counts, counts

    # worker counts change how fast stages run, not what they write: no rerun, and the new
    # counts reach the command lines
    # (config.SPEED_KEYS: worker counts, batch and chunk sizes, the TIFF decoder, checkpoints)
    faster = {**TINY, **TINY_FINETUNE,
              "tile": {**TINY["tile"], "workers": 2, "tiff_direct": False},
              "train": {**TINY["train"], "workers": 1},
              "embed": {**TINY["embed"], "workers": 1, "batch_size": 8, "cpu_chunk": 4},
              "finetune": {**TINY_FINETUNE["finetune"], "workers": 1},
              # in a run's overrides too (the runs table and the report's config leave it out)
              "runs": {"baseline": {"train": {"checkpoint_every": 2}}}}
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump(faster, sort_keys=False))
    dry = smk(wf, "-n", "--cores", "2")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    forced = smk(wf, "-n", "-p", "--cores", "2", "--forcerun", "tile", "pretrain", "embed",
                 "finetune")
    new_options = {"tile": ("--workers 2 ", "--no-tiff-direct "),
                   "pretrain": ("--workers 1 ", "--checkpoint-every 2 "),
                   "embed": ("--workers 1 ", "--batch-size 8 ", "--cpu-chunk 4 "),
                   "finetune": ("--workers 1 ",)}
    for command, options in new_options.items():  # each one's command line has the new values
        lines = [x for x in forced.stdout.splitlines() if f"simclr-path {command} " in x
                 or f"-m simclr_path {command} " in x]
        assert lines and all(o in x for x in lines for o in options), (command, lines[:1])
    (wf / "config" / "test.yaml").write_text(yaml.safe_dump({**TINY, **TINY_FINETUNE},
                                                            sort_keys=False))

    # changing one embedding file reruns classification and figures only (Snakemake 9 compares
    # checksums of small inputs, so a plain `touch` of an unchanged file reruns nothing)
    time.sleep(1.1)
    touch_h5(wf / "results/embeddings/baseline/S1.h5")
    dry = smk(wf, "-n", "--cores", "2")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts.get("classify") == 1 and counts.get("plot_tsne") == 1
    assert counts.get("classify_fraction") == 1 and counts.get("compare_finetune") == 1
    assert "pretrain" not in counts and "embed" not in counts and "tile" not in counts
    assert "finetune" not in counts  # it reads the patch stores, not the embeddings

    # touching one patch store reruns what depends on it: its embedding (through pretraining, which
    # reads every store) and downstream; never another slide's tiling or demo slide
    touch_h5(wf / "results/patches/S2.h5")
    dry = smk(wf, "-n", "--cores", "2")
    counts = job_counts(dry.stdout + dry.stderr)
    assert "tile" not in counts and "demo_slide" not in counts and "tile_config" not in counts
    assert counts["pretrain"] == 1 and counts["embed"] == 4 and counts["finetune"] == 2


@pytest.mark.slow
def test_failed_slide_fails_its_own_job(tmp_path):
    """A corrupt slide fails its own tile job with its own log; --keep-going tiles the others."""
    _require_commands("demo-slide", "tile")
    rows = demo_rows(2) + [("BAD", "slides/bad.tiff", "SCC", "P9")]
    wf = workdir(tmp_path, TINY, tsv(rows))
    (wf / "slides").mkdir()
    (wf / "slides/bad.tiff").write_bytes(b"II*\x00 this is not a slide")
    targets = [f"results/patches/{s}.h5" for s in ("S1", "S2", "BAD")]
    done = smk(wf, "--cores", "2", "--keep-going", *targets, timeout=300)
    assert done.returncode != 0
    assert (wf / "results/patches/S1.h5").is_file() and (wf / "results/patches/S2.h5").is_file()
    assert not (wf / "results/patches/BAD.h5").exists()
    log = (wf / "results/logs/tile/BAD.log").read_text()
    assert "error" in log.lower() and "Traceback" not in log


def test_slide_path_with_spaces_and_an_id_starting_with_a_dash(tmp_path):
    """Shell commands quote user paths. An id starting with '-' is refused at the DAG build:
    '-C1' is a formula (minus cell C1) when the predictions CSV is opened in a spreadsheet."""
    _require_commands("demo-slide", "tile")
    dash = smk(workdir(tmp_path / "dash", TINY, tsv([("-C1", "a.tiff", "SCC", "P1"),
                                                     ("C2", "b.tiff", "normal", "P2")])),
               "-n", "--cores", "1")
    assert dash.returncode != 0 and "slide_id '-C1' is not a safe file name" in dash.stderr \
        and "no leading dot or '-'" in dash.stderr, dash.stderr[-2000:]
    rows = [("C1", "my slides/Case 1.tiff", "SCC", "P1"), ("C2", "my slides/Case 2.tiff", "normal", "P2")]
    wf = workdir(tmp_path, TINY, tsv(rows))
    (wf / "my slides").mkdir()
    for name in ("Case 1", "Case 2"):
        made = subprocess.run(
            [sys.executable, "-m", "simclr_path", "demo-slide", "--out", f"my slides/{name}.tiff",
             "--width", "512", "--height", "512", "--mpp", "0.5"],
            cwd=wf, capture_output=True, text=True, check=False,
        )
        assert made.returncode == 0, made.stderr
    done = smk(wf, "--cores", "2", "results/patches/C1.h5", timeout=300)
    assert done.returncode == 0, (wf / "results/logs/tile/C1.log").read_text()[-2000:]
    from simclr_path.store import PatchStore

    assert PatchStore(wf / "results/patches/C1.h5").slide_id == "C1"


def test_every_gpu_rule_runs_its_command_on_gpus_of_its_own():
    """The `gpu` resource only counts jobs: each GPU job claims its GPUs (simclr-path with-gpus),
    or jobs run side by side would all use GPU 0."""
    n = 0
    for smk_file in (ROOT / "workflow/rules").glob("*.smk"):
        for block in re.split(r"^(?=rule \w+:)", smk_file.read_text(), flags=re.MULTILINE):
            if re.match(r"rule (\w+):", block) and re.search(r"^\s+gpu=", block, flags=re.MULTILINE):
                shell = block.split("shell:", 1)[1]
                assert shell.split('"')[1].startswith("simclr-path with-gpus {resources.gpu} -- "), block[:40]
                n += 1
    assert n >= 4


def test_slurm_profile_sends_every_gpu_rule_to_a_gpu_partition():
    """The SLURM plugin turns a rule's `gpu` resource into --gpus and refuses --gres/--gpus in
    slurm_extra, so GPU rules need a GPU partition and no slurm_extra GPU request."""
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    gpu_rules = set()
    for smk_file in (ROOT / "workflow/rules").glob("*.smk"):
        for block in re.split(r"^(?=rule \w+:)", smk_file.read_text(), flags=re.MULTILINE):
            m = re.match(r"rule (\w+):", block)
            if m and re.search(r"^\s+gpu=", block, flags=re.MULTILINE):
                gpu_rules.add(m.group(1))
    assert {"pretrain", "embed", "embed_layer", "finetune"} <= gpu_rules
    for rule in gpu_rules:
        res = profile["set-resources"].get(rule, {})
        assert res.get("slurm_partition") == "<gpu-partition>", rule
        assert "gres" not in str(res.get("slurm_extra", "")), rule


def _set_mtimes(folder: Path, offset_s: float) -> None:
    """Every file under ``folder`` modified ``offset_s`` seconds from now."""
    t = time.time() + offset_s
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (t, t))


def _placeholder_outputs(wf: Path, *args: str) -> None:
    """Every output of the DAG as a small placeholder (valid PNGs), as if the pipeline had run."""
    from PIL import Image

    done = smk(wf, "-D", "--cores", "1", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines()[1:]:
        path = wf / line.split("\t")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            Image.new("RGB", (8, 8), "white").save(path)
        else:
            path.write_text("{}\n" if path.suffix == ".json" else "placeholder\n")


# A patch-dataset config without `samples:`: under --replace-workflow-config the demo's
# samples sheet of config/config.yaml must not come back (in the report's child run too).
PATCHES_ONLY = {
    "patch_datasets": {"tiles": {"dir": "tiles"}},
    "classify": {"folds": 2, "inner_folds": 2, "bootstrap": 0},
    "figures": {"heatmaps": False, "thumbnails": False},
    "runs": {"baseline": {}},
    "report": {"auto": True, "path": "report.html"},
}


def test_the_automatic_report_sees_the_same_config_and_fails_visibly(tmp_path, monkeypatch):
    wf = workdir(tmp_path, PATCHES_ONLY)
    for cls in ("SCC", "normal"):
        (wf / "tiles" / cls).mkdir(parents=True)
        (wf / "tiles" / cls / "a.png").write_bytes(b"")
    replace = "--replace-workflow-config"
    _placeholder_outputs(wf, replace)
    _set_mtimes(wf / "results", +3600)  # newer than what the next run rebuilds: up to date
    target = wf / "results/config/baseline/classify.yaml"
    target.unlink()  # one cheap job to run, so that onsuccess writes the report
    done = smk(wf, "--cores", "1", replace, "results/config/baseline/classify.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Report written to report.html" in done.stderr, done.stderr[-3000:]
    assert (wf / "report.html").stat().st_size > 10_000
    # its overview describes imported tiles, not slides
    text = (wf / "report.html").read_text(errors="replace")
    assert "folders of labelled tiles" in text and "whole-slide images are tiled" not in text
    # into a folder that does not exist yet (it failed after the whole run)
    target.unlink()
    done = smk(wf, "--cores", "1", replace, "results/config/baseline/classify.yaml",
               "--config", "report={'path': 'out/r.html'}")
    assert done.returncode == 0 and "Report written to out/r.html" in done.stderr, done.stderr[-3000:]
    assert (wf / "out" / "r.html").stat().st_size > 10_000
    # a config edit that reruns no result (a new report.path) still writes a report: Snakemake
    # calls no onsuccess handler when nothing is left to do, so rule report_config reruns
    (wf / "results/config/report.yaml").unlink()  # a placeholder, without Snakemake's record
    done = smk(wf, "--cores", "1", replace)
    assert done.returncode == 0 and "Report written to report.html" in done.stderr, done.stderr[-3000:]
    again = smk(wf, "--cores", "1", replace)
    assert "Nothing to be done" in again.stderr and "Report written" not in again.stderr
    done = smk(wf, "--cores", "1", replace, "--config", "report={'path': 'elsewhere.html'}")
    assert done.returncode == 0 and "Report written to elsewhere.html" in done.stderr, \
        done.stderr[-3000:]
    assert yaml.safe_load((wf / "results/config/report.yaml").read_text())["report"]["path"] \
        == "elsewhere.html"
    done = smk(wf, "--cores", "1", replace)  # and back
    assert done.returncode == 0 and "Report written to report.html" in done.stderr, done.stderr[-3000:]

    # a single target whose rebuild leaves the outputs after it out of date: no report (it would
    # mix old and new results), and the older one moved aside (it shows what this run changed)
    before = (wf / "report.html").read_bytes()
    _set_mtimes(wf / "results", -3600)
    target.unlink()
    done = smk(wf, "--cores", "1", replace, "results/config/baseline/classify.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Report not written: some final outputs are not up to date" in done.stderr
    assert "the older report was moved to report.stale.html (`snakemake --report report.html` " \
        "writes one" in done.stderr  # a run with nothing to do would not bring it back
    assert "Report written" not in done.stderr and not (wf / "report.html").exists()
    assert (wf / "report.stale.html").read_bytes() == before
    (wf / "report.stale.html").rename(wf / "report.html")

    # a report that cannot be written: one line, a non-zero exit, and the older report moved
    # aside so that it cannot pass for this run's
    target.unlink()
    bad = wf / "results/figures/baseline/roc.png"
    bad.unlink()
    bad.mkdir()  # exists, up to date, but cannot be read into the report
    _set_mtimes(wf / "results", +3600)
    os.utime(bad, (time.time() + 3600,) * 2)
    done = smk(wf, "--cores", "1", replace, "results/config/baseline/classify.yaml")
    line = _one_error_line(done)
    assert "report not written" in line and "report.stale.html" in line
    assert not (wf / "report.html").exists() and (wf / "report.stale.html").is_file()

    # a failed job: the jobs that finished may have changed results, so the older report goes
    # aside too (it stayed, showing the results before them)
    (wf / "report.stale.html").rename(wf / "report.html")
    bad.rmdir()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "simclr-path").write_text("#!/bin/sh\nexit 3\n")
    (fake / "simclr-path").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    done = smk(wf, "--cores", "1", replace, "results/figures/baseline/roc.png")
    assert done.returncode != 0
    assert "Report not written: the run failed; the older report was moved to " \
           "report.stale.html" in done.stderr, done.stderr[-3000:]
    assert not (wf / "report.html").exists() and (wf / "report.stale.html").is_file()


def test_a_tile_added_inside_a_class_folder_reruns_the_import(tmp_path):
    """The dataset folder's own time changes only for entries directly in it: a tile added to a
    class folder must still rerun the import and what follows. The import's warnings show on
    the console."""
    import cv2

    cfg = dict(PATCHES_ONLY, report={"auto": False, "path": "report.html"})
    wf = workdir(tmp_path, cfg)
    rng = np.random.default_rng(0)
    for cls in ("SCC", "normal"):
        for i in range(3):
            (wf / "tiles" / cls).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(wf / "tiles" / cls / f"{i}.png"),
                        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    shutil.copy(wf / "tiles" / "SCC" / "0.png", wf / "tiles" / "normal" / "copy.png")
    target = "results/patches/tiles.h5"
    done = smk(wf, "--cores", "1", "--replace-workflow-config", target, python_warnings="default")
    assert done.returncode == 0, done.stderr[-3000:]
    # the import's warning reaches the console, not only its log
    assert "simclr-path import-patches: warning:" in done.stderr
    assert "pixel-identical to a tile of another class" in done.stderr
    again = smk(wf, "-n", "--cores", "1", "--replace-workflow-config", target)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the same tiles with new times (a copied or unpacked folder): nothing to redo (review)
    for p in [wf / "tiles", *(wf / "tiles").rglob("*")]:  # the folders too
        os.utime(p, ns=(p.stat().st_mtime_ns + 10**10,) * 2)
    again = smk(wf, "-n", "--cores", "1", "--replace-workflow-config", target)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    cv2.imwrite(str(wf / "tiles" / "SCC" / "3.png"), np.zeros((32, 32, 3), np.uint8))
    dry = smk(wf, "-n", "--cores", "1", "--replace-workflow-config", target)
    assert job_counts(dry.stdout + dry.stderr).get("import_patches") == 1, dry.stdout[-2000:]


def test_demo_slide_paths_and_artefacts_are_quoted_for_the_shell(tmp_path):
    """A demo folder with a space split the command's --out in two (and a ';' would have run;
    an artefact that is none stops the DAG build since)."""
    rows = [(f"S{i}", f"resources/my demo/S{i}.tiff", "SCC" if i % 2 else "normal", f"P{i}")
            for i in range(1, 5)]
    cfg = dict(TINY, demo={**TINY["demo"], "dir": "resources/my demo",
                           "artefacts": {"S1": "pen, fold"}})
    wf = workdir(tmp_path, cfg, tsv(rows))
    done = smk(wf, "-n", "-p", "--cores", "1", "resources/my demo/S1.tiff")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out 'resources/my demo/S1.tiff'" in done.stdout
    assert "--artefacts 'pen, fold'" in done.stdout
    line = _one_error_line(smk(wf, "-n", "--cores", "1", "--config",
                               "demo={artefacts: {S1: 'pen;echo hacked'}}"))
    assert "unknown artefact(s) pen;echo hacked" in line, line


def _caption(name: str, evaluation: str, slides: bool, positive: str = "SCC",
             run: str = "baseline", slide: str = "S1", tiles: str = "lc",
             extra: dict | None = None, owner: str | None = None) -> str:
    """A report caption as Snakemake renders it (Jinja, then reStructuredText to HTML)."""
    import html as html_module
    import types

    import jinja2
    from docutils.core import publish_parts

    config = {"samples": "config/samples.tsv" if slides else None,
              "patch_datasets": None if slides else {tiles: {}}, "runs": {run: {}},
              "figures": {"heatmaps": True}, **(extra or {})}
    sm = types.SimpleNamespace(config=config, params=types.SimpleNamespace(
        evaluation=evaluation, positive=positive, runs=["stage3", "pooled"],
        owner=owner or run, finetuned=owner or run),  # the run whose results it shares
        wildcards=types.SimpleNamespace(run=run, slide=slide))
    # Snakemake's own options: trim_blocks drops the newline after a line-ending block tag
    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        (ROOT / "workflow" / "report" / f"{name}.rst").read_text()).render(snakemake=sm)
    html = publish_parts(text, writer_name="html",
                         settings_overrides={"report_level": 2, "halt_level": 2})["body"]
    return html_module.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)))


# as Snakemake's report calls it (docutils >= 0.22 announces a rename of writer_name)
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_the_report_captions_say_how_the_classifier_was_evaluated():
    """With a samples-sheet split they described K-fold folds (fold means, each fold's own C),
    and for a tile set slides and patients."""
    split = {n: _caption(n, "split", True) for n in ("metrics", "heatmap", "confusion", "curves",
                                                     "compare_layers", "compare_finetune")}
    assert "held-out test slides of the samples sheet's split" in split["metrics"]
    assert all("fold" not in t for t in split.values()), split
    assert "the test slides of the samples sheet's split" in split["curves"]
    folds = {n: _caption(n, "folds", True) for n in ("metrics", "heatmap", "confusion", "curves")}
    assert "fold mean" in folds["metrics"] and "each fold chooses" in folds["heatmap"]
    assert "grouped by patient" in folds["curves"] and "grouped by patient" in folds["confusion"]
    tiles = {n: _caption(n, "folds", False) for n in ("metrics", "confusion", "curves")}
    assert all("slide" not in t and "source image" in t for t in tiles.values()), tiles
    plain = _caption("workflow", "folds", True)
    assert "Category 0 compares the runs on the same classifier metrics." in plain
    assert "layers" in _caption("workflow", "folds", True, extra={"layer_eval": ["stage3"]})
    both = _caption("workflow", "folds", True, extra={"layer_eval": ["stage3"],
                                                     "finetune_eval": [1.0]})
    assert ("metrics, each run's layers (config layer_eval) and fine-tuning against the linear "
            "probe at each label fraction (config finetune_eval).") in both, both
    intro = _caption("workflow", "folds", False)
    assert "category 1" not in intro and "held-out source images" in intro
    assert "Category 5" not in intro and "Category 5 holds" in _caption("workflow", "folds", True)
    # Snakemake renders with trim_blocks: a line ending in a block tag ran into the next line
    assert "(patients resampled)" in folds["metrics"] and "few test slides per fold" in folds[
        "metrics"]
    compared = {n: _caption(n, "folds", False) for n in ("compare_runs", "compare_finetune",
                                                         "compare_layers")}
    assert all("patient" not in t and "slide" not in t for t in compared.values()), compared
    assert "source image" in compared["compare_layers"]
    assert "patient" in _caption("compare_finetune", "folds", True)
    # the layers evaluated, not "stages and the projection head" whatever layer_eval listed
    assert "embeddings from the layers stage3, pooled (config layer_eval" in compared[
        "compare_layers"]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_captions_of_a_run_that_shares_name_the_run_whose_results_they_show():
    """A shared loss curve was captioned as the run's own pretraining, and the fine-tuning
    caption sent readers to a results/finetune/{run} folder that is never made (review)."""
    own = _caption("loss", "folds", True, run="a")
    assert "per optimiser step of pretraining run a. The loss" in own and "shares" not in own
    shared = _caption("loss", "folds", True, run="b", owner="a")
    assert "pretraining run a, which run b shares (their pretraining settings are equal)" in shared
    ft = _caption("compare_finetune", "folds", True, run="b", owner="a")
    assert "results/finetune/a/labels_*/history.csv (run a's fine-tuning, which this run " \
        "shares" in ft
    assert "results/finetune/b/labels_*/history.csv." in _caption("compare_finetune", "folds",
                                                                  True, run="b")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_names_ending_in_an_underscore_are_text_in_the_captions():
    """A run, slide or tile set named base_, S1_ or a__ is allowed, and reStructuredText read
    it as a link (31 error boxes in a report); halt_level 2 makes any such message an error."""
    for path in sorted((ROOT / "workflow" / "report").glob("*.rst")):
        for slides in (True, False):
            text = _caption(path.stem, "folds", slides, run="a__", slide="S1_", tiles="set_")
            names = "wildcards" in path.read_text() or path.stem == "workflow"
            assert not names or "a__" in text or "S1_" in text, (path.name, text)
    assert "runs: a__." in _caption("workflow", "folds", True, run="a__")
    assert "tile folders: set_;" in _caption("workflow", "folds", False, tiles="set_")
    assert "results/classify/a__/metrics.json" in _caption("metrics", "folds", True, run="a__")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_the_report_captions_name_the_runs_positive_class():
    """They said P(SCC) whatever classify.positive_label named, and for macro runs too."""
    names = ("metrics", "heatmap", "confusion", "curves")
    tumour = {n: _caption(n, "folds", True, positive="lung_scc") for n in names}
    assert all("SCC" not in t for t in tumour.values()), tumour
    assert "P(lung_scc) >= 0.5" in tumour["metrics"] and "P(lung_scc) >= 0.5" in tumour["confusion"]
    assert "the mean P(lung_scc) of its patches" in tumour["curves"]
    assert "Held-out classifier score P(lung_scc)" in tumour["heatmap"]
    assert "comes from a slide labelled lung_scc)" in tumour["heatmap"]  # not "a SCC slide"
    macro = {n: _caption(n, "folds", True, positive="") for n in ("metrics", "confusion", "curves")}
    assert all("P(" not in t and "SCC" not in t for t in macro.values()), macro
    assert "one curve per class against the rest" in macro["curves"]
    # a class name is text, not reStructuredText markup (tumour_ was read as a link target,
    # and halt_level 2 makes any such message an error here)
    from simclr_path.figures import rst_text

    for name in ("tumour_", "*SCC", "`x", "a|b", "[1]", "back\\slash"):
        text = _caption("metrics", "folds", True, positive=rst_text(name))
        assert f"P({name}) >= 0.5" in text, (name, text)


def test_a_run_name_with_a_final_newline_stops_the_dag_build(tmp_path):
    """The schema's pattern is searched with Python's re, whose $ matches before a final
    newline: 'base\\n' passed, and split the shell commands its name reached (security review)."""
    done = smk(workdir(tmp_path, {**TINY, "runs": {"base\n": {}}}, tsv(demo_rows(4))), "-n",
               "--cores", "1")
    assert done.returncode != 0
    assert "run name 'base\\n' is not letters, digits" in done.stderr, done.stderr[-2000:]


def test_run_names_differing_only_in_case_stop_the_dag_build(tmp_path):
    """Base and base planned two runs that share every results folder on a case-insensitive
    disk (macOS, Windows): one overwrote the other in silence (review)."""
    done = smk(workdir(tmp_path, {**TINY, "runs": {"Base": {}, "base": {}}}, tsv(demo_rows(4))),
               "-n", "--cores", "1")
    assert done.returncode != 0
    assert "run names 'Base' and 'base' differ only in case" in done.stderr, done.stderr[-2000:]


def test_a_key_given_twice_in_a_configfile_stops_the_dag_build(tmp_path):
    """Snakemake keeps the later of two equal keys in silence: a second tile: section, or a run
    named twice under runs:, was dropped whole (review)."""
    wf = workdir(tmp_path, TINY, tsv(demo_rows(4)))
    cfg = wf / "config" / "test.yaml"
    assert smk(wf, "-n", "--cores", "1").returncode == 0
    cfg.write_text(cfg.read_text() + "runs:\n  base: {}\n  base: {train: {max_steps: 3}}\n")
    done = smk(wf, "-n", "--cores", "1")
    assert done.returncode != 0
    line = _one_error_line(done)
    assert "test.yaml: line" in line and "key 'runs' is given twice (first on line" in line, line


def test_pretrain_gpus_above_the_runs_gpu_resource_stops_the_dag_build(tmp_path, monkeypatch):
    """Snakemake gave pretraining the profile's gpu=1 whatever pretrain_gpus asked: torchrun's
    four processes then failed after tiling, told to lower --nproc_per_node (review)."""
    cfg = dict(TINY, pretrain_gpus=4,
               pretrain_launcher="torchrun --standalone --nproc_per_node=4")
    wf = workdir(tmp_path, cfg, tsv(demo_rows(4)))
    line = _one_error_line(smk(wf, "-n", "--cores", "1"))
    assert "config: pretrain_gpus is 4, but this run has gpu=1" in line and "set gpu=4" in line
    done = smk(wf, "-n", "-p", "--cores", "1", "--resources", "gpu=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "simclr-path with-gpus 4 -- torchrun" in done.stdout
    # gpu=0, a machine without GPUs: every job runs on CPU, as before the check
    assert smk(wf, "-n", "--cores", "1", "--resources", "gpu=0").returncode == 0
    # the report's own snakemake (and a cluster job) is not given the run's --resources: a run
    # with --resources gpu=4 failed its report on the profile's gpu=1 (review)
    monkeypatch.setenv("SIMCLR_PATH_REPORT_CHILD", "1")
    assert smk(wf, "-n", "--cores", "1").returncode == 0
