"""Snakemake script: one run's classifier metrics.json -> an HTML table for the report."""

import json
import math
from pathlib import Path

import pandas as pd

METRICS = [
    ("auroc", "AUROC"),
    ("auroc_topk", "AUROC (top-k slide score)"),
    ("average_precision", "average precision"),
    ("balanced_accuracy", "balanced accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("f1", "F1"),
    ("accuracy", "accuracy"),
    # more than two classes: every class against the rest, averaged
    ("auroc_macro", "AUROC (macro one-vs-rest)"),
    ("average_precision_macro", "average precision (macro)"),
    ("f1_macro", "F1 (macro)"),
    ("n", "n"),
]


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(metrics: dict) -> pd.DataFrame:
    from simclr_path.figures import unit_words

    # what a "slide" and a "patient" are: a tile set's source images are both
    unit, grouped_by = unit_words(metrics.get("task", {}))
    rows = []
    summary = metrics.get("fold_summary", {})
    n_folds = metrics.get("task", {}).get("n_folds")
    for key, name in METRICS:
        if all(key not in metrics.get(level, {}) for level in ("slide", "patch")):
            continue  # (the macro metrics exist with more than two classes only)
        row = {"metric": name.replace("slide", unit)}
        for level in ("slide", "patch"):
            value = metrics.get(level, {}).get(key)
            row[f"{level} (pooled)"] = fmt(value)
            fs = summary.get(level, {}).get(key)
            # one fold (a samples-sheet split): its mean is the pooled value, with no sd
            if isinstance(fs, dict) and "mean" in fs and (n_folds or 0) > 1:
                # folds where the metric is undefined (one class held out) are left out of it
                k = fs.get("n_folds")
                of = f" ({k} of {n_folds} folds)" if k is not None and n_folds and k < n_folds else ""
                row[f"{level} fold mean ± sd"] = f"{fmt(fs['mean'])} ± {fmt(fs.get('sd'))}{of}"
        rows.append(row)
    ci = metrics.get("slide", {}).get("auroc_ci95")
    if ci:
        rows.append(
            {
                "metric": f"{unit} AUROC 95% CI ({grouped_by} bootstrap)",
                "slide (pooled)": f"{fmt(ci[0])}-{fmt(ci[1])}",
            }
        )
    elif metrics.get("slide", {}).get("auroc_ci95_note"):  # why there is none (few patients)
        rows.append(
            {
                "metric": f"{unit} AUROC 95% CI ({grouped_by} bootstrap)",
                "slide (pooled)": metrics["slide"]["auroc_ci95_note"],
            }
        )
    df = pd.DataFrame(rows).fillna("")
    return df.rename(columns=lambda c: c.replace("slide", unit, 1)) if unit != "slide" else df


def main(metrics_path: str, out: str, run: str) -> None:
    metrics = json.loads(Path(metrics_path).read_text())
    task = metrics.get("task", {})
    df = table(metrics)
    from html import escape

    from simclr_path.figures import evaluation_words, unit_words

    unit, grouped_by = unit_words(task)
    if unit == "group":  # an imported tile set: each source image is a slide and a patient
        counted = f"{task.get('n_slides', '?')} source images (groups)"
    else:
        counted = f"{task.get('n_slides', '?')} slides, {task.get('n_patients', '?')} patients"
    split = task.get("evaluation") == "split"
    n_test = task.get("n_evaluated_slides", metrics.get("slide", {}).get("n", "?"))
    tested = (f" ({n_test} slides in its test split)" if split
              else f", {task.get('n_folds', '?')} folds")
    # class names reach 'score' from a tile dataset's folder names: text, never markup
    head = escape(
        f"{evaluation_words(task.get('evaluation'), grouped_by)}; {counted}, "
        f"{task.get('n_patches', '?')} patches{tested}; score {task.get('score', '')}"
    )
    head = f"<h3>Classifier metrics: run {escape(str(run))}</h3><p>{head}</p>"
    from simclr_path.outputs import atomic_output

    with atomic_output(out, force=True) as tmp:
        tmp.write_text(f"<html><body>{head}{df.to_html(index=False, border=0)}</body></html>\n")


if __name__ == "__main__" and "snakemake" in globals():
    sm = globals()["snakemake"]
    from simclr_path.outputs import logged_to

    with logged_to(sm.log[0]):
        main(sm.input[0], sm.output[0], sm.wildcards.run)
        print(f"wrote {', '.join(map(str, sm.output))}")
