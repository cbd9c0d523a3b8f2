"""Snakemake script: compare runs on the same classifier metrics (table + figure).

Writes ``runs.tsv`` (one row per run), ``runs.html`` (the same, for the report) and ``runs.png``
(slide- and patch-level AUROC and slide balanced accuracy per run, with the bootstrap 95% CI of
the slide AUROC as error bars). The same for one run's layers (rule compare_layers), and for one
run's linear probe and fine-tuning at each label fraction (rule compare_finetune: one row per
method and fraction; the figure plots AUROC against the label fraction, one line per method).
"""

import json
import math
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# Okabe-Ito (colour-blind safe)
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00"]


def _num(v):
    return float("nan") if v is None else float(v)


def read_json(path, optional: bool = False) -> dict:
    """A metrics.json or summary.json; {} for an ``optional`` one (a pretraining summary) that
    is not there."""
    if optional and not (path and Path(path).exists()):
        return {}
    return json.loads(Path(path).read_text())


def summarise(runs, metrics, pretrains, overrides) -> pd.DataFrame:
    """One row per run from its parsed metrics.json and pretraining summary.json."""
    rows = []
    for run, m, p in zip(runs, metrics, pretrains):
        s, pt = m.get("slide", {}), m.get("patch", {})
        ci = s.get("auroc_ci95") or [None, None]
        info = overrides.get(run, {})
        task, cfg = m.get("task", {}), m.get("config", {})
        rows.append(
            {
                "run": run,
                "overrides": info.get("overrides", ""),
                "description": info.get("description", ""),
                # the run whose encoder it used: runs with equal pretraining settings share one
                "pretraining": info.get("pretraining", run),
                # how each row was evaluated: a run may override classify (folds, seed, split)
                "evaluation": task.get("evaluation", ""),
                # what a "slide" and a "patient" are: a tile set's source images are both
                "labels_from": task.get("labels_from", ""),
                # what the AUROC scores: P(one class) against the rest, or macro one-vs-rest
                "score": task.get("score", ""),
                # classify's metrics.json keeps its config flat, finetune's by section
                "folds_seed": cfg.get("seed", (cfg.get("classify") or {}).get("seed")),
                # the patients its slide metrics were scored on: a split's test side only
                "n_patients": task.get("n_evaluated_patients", task.get("n_patients")),
                # chance balanced accuracy is 1 / classes
                "n_classes": len(task.get("classes") or []) or None,
                "slide_auroc": _num(s.get("auroc")),
                "slide_auroc_ci_low": _num(ci[0]),
                "slide_auroc_ci_high": _num(ci[1]),
                "slide_average_precision": _num(s.get("average_precision")),
                "slide_balanced_accuracy": _num(s.get("balanced_accuracy")),
                "slide_sensitivity": _num(s.get("sensitivity")),
                "slide_specificity": _num(s.get("specificity")),
                "patch_auroc": _num(pt.get("auroc")),
                "patch_balanced_accuracy": _num(pt.get("balanced_accuracy")),
                "pretrain_steps": p.get("steps"),
                "pretrain_final_loss": _num(p.get("final_loss")),
                "pretrain_wall_s": _num(p.get("wall_time_s", p.get("wall_s"))),
            }
        )
    return pd.DataFrame(rows)


XLABEL = "run (named pretraining configuration)"


def plot(df: pd.DataFrame, out: str, title: str = "", xlabel: str = XLABEL) -> None:
    unit, grouped_by = units(df)
    bars = [
        ("slide_auroc", f"{unit} AUROC"),
        ("patch_auroc", "patch AUROC"),
        ("slide_balanced_accuracy", f"{unit} balanced accuracy"),
    ]
    from simclr_path.figures import save_figure

    x = np.arange(len(df))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(df) + 2.5), 4.6), dpi=120,
                           layout="constrained")
    for j, (col, name) in enumerate(bars):
        vals = df[col].to_numpy(dtype=float)
        xs = x + (j - (len(bars) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(vals), width, label=name, color=COLOURS[j])
        top = np.nan_to_num(vals)
        if col == "slide_auroc":
            # bars only where a CI exists: a zero-length bar's caps read as a CI of width 0
            has = has_ci(df)
            if has.any():
                ax.errorbar(xs[has], vals[has], yerr=ci_errors(vals, df)[:, has], fmt="none",
                            ecolor="black", capsize=3, lw=1)
                # the value above the error bar's cap, which it covered
                top = np.where(has, np.fmax(top, df["slide_auroc_ci_high"].to_numpy(float)), top)
        # the value on each bar; a metric a run lacks says so instead of a bar of height 0
        for xi, ti, v in zip(xs, top, vals):
            ax.annotate("n/a" if not np.isfinite(v) else f"{v:.2f}", (xi, ti),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(
        x, df["run"], rotation=30 if len(df) > 4 else 0, ha="right" if len(df) > 4 else "center"
    )
    ax.set_ylim(0, 1.12)  # room for the value labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"metric ({evaluation_words(df)})")
    scores = set(df["score"].astype(str)) if "score" in df else set()
    ax.set_title((title or "Runs compared on the same linear-probe metrics")
                 + ("\nAUROCs of different scores (one class against the rest, or macro): see "
                    "the table's score column" if len(scores) > 1 else ""))
    ax.axhline(0.5, color="#999999", lw=0.8, ls="--")
    k = set(df["n_classes"].dropna().astype(int)) if "n_classes" in df else set()
    both = k == {2}  # two classes: balanced accuracy's chance is 0.5 too
    ax.text(1.01, 0.5, "chance\n(AUROC,\nbalanced\naccuracy)" if both else "chance\n(AUROC)",
            fontsize=7, color="#666666", ha="left", va="center",
            transform=ax.get_yaxis_transform())
    if len(k) == 1 and next(iter(k)) > 2:  # balanced accuracy's chance is 1 / classes
        level = 1 / next(iter(k))
        ax.axhline(level, color="#999999", lw=0.8, ls=":")
        ax.text(1.01, level, f"chance\n(balanced\naccuracy, 1/{next(iter(k))})", fontsize=7,
                color="#666666", ha="left", va="center", transform=ax.get_yaxis_transform())
    notes = [n_note(df)] if n_note(df) else []
    if df["slide_auroc_ci_low"].isna().any():  # the caption promises CIs: say where there are none
        notes.append(f"a {unit} AUROC without error bar: too few {grouped_by}s for its CI")
    if notes:
        ax.set_xlabel(f"{xlabel}\n({'; '.join(notes)})")
    # below the axes and their (maybe rotated) run names: constrained layout makes room
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    save_figure(fig, out)


def n_note(df: pd.DataFrame) -> str:
    """'n = 8 patients' when every row was evaluated on that many (slide AUROCs of a handful of
    patients move in large steps); '' when the rows differ or do not say."""
    n = set(df["n_patients"].dropna()) if "n_patients" in df else set()
    return f"n = {int(n.pop())} {units(df)[1]}s" if len(n) == 1 else ""


def has_ci(df: pd.DataFrame) -> np.ndarray:
    """Rows whose slide AUROC has a bootstrap CI (bool, n)."""
    return (np.isfinite(df["slide_auroc_ci_low"].to_numpy(dtype=float))
            & np.isfinite(df["slide_auroc_ci_high"].to_numpy(dtype=float)))


def ci_errors(vals: np.ndarray, df: pd.DataFrame) -> np.ndarray:
    """(2, n) error bar lengths of the slide AUROC CI per row: 0 where a row has no CI (the
    others keep theirs) or where a percentile interval does not hold its point estimate."""
    err = np.vstack([vals - df["slide_auroc_ci_low"].to_numpy(dtype=float),
                     df["slide_auroc_ci_high"].to_numpy(dtype=float) - vals])
    return np.clip(np.where(np.isfinite(err), err, 0.0), 0.0, None)


def _unit_words(df: pd.DataFrame) -> list[tuple[str, str]]:
    """Each row's (unit, grouped_by): ("slide", "patient"), or ("group", "source image") for a
    tile set (simclr_path.figures.unit_words)."""
    from simclr_path.figures import unit_words

    return [unit_words({"labels_from": v}) for v in df.get("labels_from", [""] * len(df))]


def units(df: pd.DataFrame) -> tuple[str, str]:
    """The rows' shared (unit, grouped_by), for the figure's labels; both kinds: "slide/group"."""
    kinds = set(_unit_words(df))
    return kinds.pop() if len(kinds) == 1 else ("slide/group", "patient/source image")


def evaluation_words(df: pd.DataFrame) -> str:
    """How the rows were evaluated, for an axis label, in the words of the figures' titles
    (simclr_path.figures.evaluation_words); rows evaluated differently point to the table."""
    from simclr_path.figures import evaluation_words as words

    said = {words(str(e) or None, g)
            for e, (_, g) in zip(df.get("evaluation", [""] * len(df)), _unit_words(df))}
    return said.pop() if len(said) == 1 else "evaluated differently: see the table"


def folds_word(df: pd.DataFrame) -> str:
    """What the rows share when :func:`same_folds`: a split's test slides have no folds."""
    split = "evaluation" in df and (df["evaluation"].astype(str) == "split").all()
    return "same test split" if split else "same folds"


def same_folds(df: pd.DataFrame) -> bool:
    """Whether every row was evaluated on the same folds (evaluation, fold seed, patients)."""
    cols = [c for c in ("evaluation", "folds_seed", "n_patients") if c in df]
    # a value a row lacks is not "the same" (nunique skips NaN, so it passed for anything)
    return all(df[c].map(lambda v: "missing" if pd.isna(v) else str(v)).nunique() <= 1
               for c in cols)


def write_text(path, text: str) -> None:
    from simclr_path.outputs import atomic_output

    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)


def percent(f: float) -> str:
    """0.01 -> '1%', 0.005 -> '0.5%', 1.0 -> '100%'."""
    return f"{100 * f:g}%"


def plot_fractions(df: pd.DataFrame, out: str, title: str) -> None:
    """Slide and patch AUROC (two panels) against the label fraction, one line per method; the
    slide panel's error bars are the patient-bootstrap 95% CI."""
    from simclr_path.figures import OKABE_ITO, save_figure

    unit, grouped_by = units(df)
    fracs = sorted(df["label_fraction"].unique())
    log_x = len(fracs) > 1 and fracs[-1] / fracs[0] > 5
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.6), sharey=True)
    methods = list(dict.fromkeys(df["method"]))
    # labelled patients per fold at each fraction: the same for every method (by design)
    labelled = {f: float(df.loc[df["label_fraction"] == f, "labelled_patients_per_fold"].max())
                if "labelled_patients_per_fold" in df else float("nan") for f in fracs}
    for ax, level in zip(axes, ("slide", "patch")):
        for j, method in enumerate(methods):
            d = df[df["method"] == method].sort_values("label_fraction")
            # a small sideways offset per method, so that error bars at one fraction stay apart
            off = (j - (len(methods) - 1) / 2) * 0.03
            x = d["label_fraction"].to_numpy(dtype=float)
            x = x * 10**off if log_x else x + off * max(fracs[-1] - fracs[0], 0.5)
            y = d[f"{level}_auroc"].to_numpy(dtype=float)
            ax.plot(x, y, color=OKABE_ITO[j], marker="os^D"[j % 4], label=method)
            has = has_ci(d) if level == "slide" else np.zeros(len(d), bool)
            if has.any():  # only where there is a CI: caps of zero length read as one
                ax.errorbar(x[has], y[has], yerr=ci_errors(y, d)[:, has], fmt="none",
                            ecolor=OKABE_ITO[j], capsize=3)
        if log_x:
            ax.set_xscale("log")
        # the share asked for and the labelled patients it gave (at least one per class)
        ax.set_xticks(fracs, [f"{percent(f)}\n{labelled[f]:g}" if np.isfinite(labelled[f])
                              else percent(f) for f in fracs])
        ax.minorticks_off()
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="#999999", lw=0.8, ls="--")
        ax.text(1.01, 0.5, "chance", fontsize=7, color="#666666", ha="left", va="center",
                transform=ax.get_yaxis_transform())
        ax.set_xlabel(f"labelled training {grouped_by}s per fold\n(share of each class, and "
                      "their number)")
        ax.set_title(f"{unit if level == 'slide' else level} AUROC"
                     + (f" ({n_note(df)})" if level == "slide" and n_note(df) else ""))
    notes = []
    counts = [labelled[f] for f in fracs if np.isfinite(labelled[f])]
    if len(set(counts)) < len(counts):  # "at least one per class" made two fractions one set
        notes.append(f"fractions with the same number of labelled {grouped_by}s trained on the "
                     "same ones")
    if df["slide_auroc_ci_low"].isna().any():
        notes.append(f"a {unit} AUROC without error bar: too few {grouped_by}s for its CI")
    if notes:
        fig.text(0.5, 0.005, "; ".join(notes), ha="center", va="bottom", fontsize=8,
                 color="#444444")
    axes[0].set_ylabel(f"AUROC ({evaluation_words(df)})")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the notes below
    save_figure(fig, out)


def _fold_mean(folds, key) -> float:
    n = [f[key] for f in folds if key in f]
    return float(np.mean(n)) if n else float("nan")


def summarise_fractions(rows, metrics_files, pretrain_file) -> pd.DataFrame:
    """One row per (method, label fraction), with the mean labelled patients per fold and, of
    those, the ones trained on (fine-tuning holds some out to pick its epoch). The fraction is
    the one each metrics.json records (``task.label_fraction``), not the one asked for: a
    probe run at another fraction must not pass for the one in its row."""
    names = [f"{r['method']}, {percent(r['label_fraction'])} labels" for r in rows]
    metrics = [read_json(mf) for mf in metrics_files]
    df = summarise(names, metrics, [read_json(pretrain_file, optional=True)] * len(names), {})
    df = df.drop(columns=["run", "overrides", "description"])
    labelled, trained, fractions = [], [], []
    for r, m in zip(rows, metrics):
        folds = m.get("folds", [])
        labelled.append(_fold_mean(folds, "n_labelled_patients"))
        trained.append(_fold_mean(folds, "n_train_patients"))
        fractions.append(float(m.get("task", {}).get("label_fraction", r["label_fraction"])))
    df.insert(0, "trained_patients_per_fold", trained)
    df.insert(0, "labelled_patients_per_fold", labelled)
    df.insert(0, "label_fraction", fractions)
    df.insert(0, "method", [r["method"] for r in rows])
    return df


def fmt(v):
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return "" if v is None else str(v)


def main(sm) -> None:
    """Rows are runs (rule compare_runs), one run's layers (rule compare_layers) or one run's
    linear probe and fine-tuned models (rule compare_finetune)."""
    what = sm.params.get("what", "run")
    if what == "label_fraction":
        title = sm.params.title
        df = summarise_fractions(list(sm.params.rows), list(sm.input.metrics), str(sm.input.pretrain))
        write_text(sm.output.tsv, df.to_csv(sep="\t", index=False))
        plot_fractions(df, sm.output.png, title)
        html = df.map(fmt).to_html(index=False, border=0)
        who = units(df)[1] + "s"
        folds = (f"{folds_word(df)}; at each fraction the same labelled {who}" if same_folds(df)
                 else "the rows were evaluated on different folds: see the evaluation columns")
        write_text(sm.output.html,
                   f"<html><body><h3>{escape(title)} ({folds}; fine-tuning trains on the labelled "
                   f"{who} less its validation {who})</h3>{html}</body></html>\n")
        return
    names = list(sm.params.runs)
    # one run's summary for every row of a layer or fine-tuning comparison: read once
    pretrain = ([read_json(p, optional=True) for p in sm.input.pretrain] if what == "run"
                else [read_json(str(sm.input.pretrain), optional=True)] * len(names))
    df = summarise(names, [read_json(mf) for mf in sm.input.metrics], pretrain,
                   dict(sm.params.overrides))
    df = df.rename(columns={"run": what})
    write_text(sm.output.tsv, df.to_csv(sep="\t", index=False))
    if what == "run":
        title, xlabel = "Runs compared on the same linear-probe metrics", XLABEL
    else:
        run = sm.wildcards.run
        title = f"Layer-wise linear evaluation of run {run}"
        xlabel = f"features from layer (same probe, {folds_word(df)})"
    plot(df.rename(columns={what: "run"}), sm.output.png, title=title, xlabel=xlabel)
    html = df.map(fmt).to_html(index=False, border=0)
    folds = (folds_word(df) if same_folds(df) else
             "the rows were evaluated on different folds: see the evaluation columns")
    write_text(sm.output.html,
               f"<html><body><h3>{escape(title)} ({folds})</h3>{html}</body></html>\n")


if __name__ == "__main__" and "snakemake" in globals():
    sm = globals()["snakemake"]
    from simclr_path.outputs import logged_to

    with logged_to(sm.log[0]):
        main(sm)
        print(f"wrote {', '.join(map(str, sm.output))}")
