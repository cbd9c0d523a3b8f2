"""workflow/scripts: the run comparison (compare_runs.py) and the metrics table (metrics_table.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflow" / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cr():
    return _script("compare_runs")


def _metrics(auroc, ci=None, evaluation="grouped_5fold", seed=0, n_patients=20,
             labels_from="samples sheet"):
    return {"slide": {"auroc": auroc, "balanced_accuracy": 0.8, "auroc_ci95": ci},
            "patch": {"auroc": auroc - 0.05, "balanced_accuracy": 0.7},
            "task": {"evaluation": evaluation, "n_patients": n_patients,
                     "labels_from": labels_from},
            "config": {"seed": seed}}


def test_the_runs_table_names_the_pretraining_each_run_used(cr):
    df = cr.summarise(["a", "b", "c"], [_metrics(0.9)] * 3, [{}] * 3,
                      {"b": {"pretraining": "a"}, "c": {"pretraining": "c"}})
    assert list(df["pretraining"]) == ["a", "a", "c"]  # a run without the entry: its own


def test_each_run_keeps_its_own_ci_bar_and_the_legend_clears_the_run_names(cr, tmp_path,
                                                                          monkeypatch):
    runs = [f"long_run_name_{i}" for i in range(6)]
    metrics = [_metrics(0.9, [0.85, 0.95]), _metrics(0.8, None), _metrics(0.7, [0.72, 0.9]),
               _metrics(0.9, [0.8, 0.97]), _metrics(0.85, [0.8, 0.9]), _metrics(0.6, [0.5, 0.7])]
    df = cr.summarise(runs, metrics, [{}] * 6, {})
    err = cr.ci_errors(df["slide_auroc"].to_numpy(float), df)
    # a run without a CI has no bar; the others keep theirs; an estimate outside its
    # percentile interval (0.7 below 0.72) gives a bar of 0 on that side, not a crash
    np.testing.assert_allclose(err[:, 0], [0.05, 0.05])
    np.testing.assert_allclose(err[:, 1], [0.0, 0.0])
    np.testing.assert_allclose(err[:, 2], [0.0, 0.2], atol=1e-12)
    figs = []
    from simclr_path import figures

    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: figs.append(fig))
    cr.plot(df, str(tmp_path / "runs.png"))
    fig = figs[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(r)
    for label in ax.get_xticklabels():  # the legend sits below the rotated names, not on them
        assert not legend.overlaps(label.get_window_extent(r)), label.get_text()
    assert ax.get_ylabel() == "metric (patient-grouped 5-fold cross-validation)"
    # error bars (and their caps) at the five runs with a CI, none at the run without one:
    # zero-length caps read as a CI of width 0
    from matplotlib.container import ErrorbarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    xs = sorted(np.asarray(bars.lines[2][0].get_segments())[:, 0, 0].round(3))
    slide_bar_x = sorted(p.get_x() + p.get_width() / 2 for p in ax.containers[0].patches)
    assert len(xs) == 5 and np.round(slide_bar_x[1], 3) not in xs



def test_values_clear_the_error_bars_and_chance_is_named_per_metric(cr, tmp_path, monkeypatch):
    """A slide AUROC's value sat on its error bar's cap; the one 'chance' line at 0.5 was read
    against balanced accuracy too, whose chance with 3 classes is 1/3."""
    from simclr_path import figures

    three = [_metrics(0.9, [0.8, 0.97]), _metrics(0.7, None)]
    for m in three:
        m["task"]["classes"] = ["SCC", "adeno", "normal"]
    df = cr.summarise(["a", "b"], three, [{}, {}], {})
    assert df["n_classes"].tolist() == [3, 3]
    figs = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: figs.append(fig))
    cr.plot(df, str(tmp_path / "runs.png"))
    ax = figs[0].axes[0]
    values = {(round(t.xy[0], 3), t.get_text()): t.xy[1] for t in ax.texts if hasattr(t, "xy")}
    slide_x = sorted(p.get_x() + p.get_width() / 2 for p in ax.containers[0].patches)
    assert values[(round(slide_x[0], 3), "0.90")] == pytest.approx(0.97)  # above the cap
    assert values[(round(slide_x[1], 3), "0.70")] == pytest.approx(0.7)  # no CI: on the bar
    notes = [t.get_text() for t in ax.texts if not hasattr(t, "xy")]
    assert "chance\n(AUROC)" in notes and "chance\n(balanced\naccuracy, 1/3)" in notes
    assert any(np.allclose(ln.get_ydata(), 1 / 3) for ln in ax.get_lines())
    for m in three:  # two classes: 0.5 is balanced accuracy's chance too
        m["task"]["classes"] = ["SCC", "normal"]
    cr.plot(cr.summarise(["a", "b"], three, [{}, {}], {}), str(tmp_path / "runs2.png"))
    notes = [t.get_text() for t in figs[-1].axes[0].texts if not hasattr(t, "xy")]
    assert "chance\n(AUROC,\nbalanced\naccuracy)" in notes

def test_rows_on_other_folds_are_not_called_the_same_folds(cr):
    same = cr.summarise(["a", "b"], [_metrics(0.9), _metrics(0.8)], [{}, {}], {})
    assert cr.same_folds(same)
    # a fine-tuning metrics.json keeps the fold seed under config.classify: the same folds
    tuned = _metrics(0.8)
    tuned["config"] = {"classify": {"seed": 0}, "finetune": {"seed": 0}}
    df = cr.summarise(["probe", "tuned"], [_metrics(0.9), tuned], [{}, {}], {})
    assert df["folds_seed"].tolist() == [0, 0] and cr.same_folds(df)
    # a row that does not say its seed is not "the same" as one that does
    unknown = _metrics(0.8)
    unknown["config"] = {}
    assert not cr.same_folds(cr.summarise(["a", "b"], [_metrics(0.9), unknown], [{}, {}], {}))
    for other in (_metrics(0.8, seed=1), _metrics(0.8, evaluation="split"),
                  _metrics(0.8, n_patients=12)):
        df = cr.summarise(["a", "b"], [_metrics(0.9), other], [{}, {}], {})
        assert not cr.same_folds(df)
    split = cr.summarise(["a"], [_metrics(0.9, evaluation="split")], [{}], {})
    # a split is scored on its test patients: their count is the figure's n (review)
    tested = _metrics(0.9, evaluation="split")
    tested["task"]["n_evaluated_patients"] = 2
    assert cr.n_note(cr.summarise(["a"], [tested], [{}], {})) == "n = 2 patients"
    assert cr.evaluation_words(split) == "held-out test split of the samples sheet"
    assert cr.folds_word(split) == "same test split"  # (a split has no folds)
    assert cr.folds_word(cr.summarise(["a"], [_metrics(0.9)], [{}], {})) == "same folds"
    mixed = cr.summarise(["a", "b"], [_metrics(0.9), _metrics(0.9, evaluation="split")],
                         [{}, {}], {})
    assert "see the table" in cr.evaluation_words(mixed)


def test_runs_scored_differently_say_so(cr, tmp_path, monkeypatch):
    """A macro run's AUROC stood beside another run's SCC-vs-rest AUROC under one title."""
    macro, scc = _metrics(0.875), _metrics(1.0)
    macro["task"]["score"], scc["task"]["score"] = "macro one-vs-rest", "P(SCC)"
    figs = []
    from simclr_path import figures

    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: figs.append(fig))
    df = cr.summarise(["m", "t"], [macro, scc], [{}, {}], {})
    assert df["score"].tolist() == ["macro one-vs-rest", "P(SCC)"]
    cr.plot(df, str(tmp_path / "runs.png"))
    assert "AUROCs of different scores" in figs[0].axes[0].get_title()
    cr.plot(cr.summarise(["t"], [scc], [{}], {}), str(tmp_path / "one.png"))
    assert "different scores" not in figs[1].axes[0].get_title()


def test_a_tile_set_comparison_speaks_of_source_images_not_slides(cr, tmp_path, monkeypatch):
    """Runs on an imported tile set were labelled 'patient-grouped' with 'slide AUROC' bars."""
    tiles = [_metrics(0.9, labels_from="patch stores"), _metrics(0.8, labels_from="patch stores")]
    df = cr.summarise(["a", "b"], tiles, [{}, {}], {})
    assert cr.evaluation_words(df) == "5-fold cross-validation grouped by source image"
    figs = []
    from simclr_path import figures

    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: figs.append(fig))
    cr.plot(df, str(tmp_path / "runs.png"))
    labels = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert labels == ["group AUROC", "patch AUROC", "group balanced accuracy"], labels
    assert "grouped by source image" in figs[0].axes[0].get_ylabel()
    slides = cr.summarise(["a"], [_metrics(0.9)], [{}], {})
    assert cr.units(slides) == ("slide", "patient")
    both = cr.summarise(["a", "b"], [_metrics(0.9), tiles[0]], [{}, {}], {})
    assert "see the table" in cr.evaluation_words(both)
    # the label-fraction figure: its x axis counts source images, its first panel is per group
    fr = cr.summarise(["p1", "p2"], tiles, [{}, {}], {}).assign(
        method="linear probe", label_fraction=[1.0, 0.1])
    figs.clear()
    cr.plot_fractions(fr, str(tmp_path / "fr.png"), "t")
    assert figs[0].axes[0].get_title() == "group AUROC (n = 20 source images)"
    assert "labelled training source images per fold" in figs[0].axes[0].get_xlabel()


def test_the_label_fraction_figure_counts_the_labelled_patients(cr, tmp_path, monkeypatch):
    """With few patients "at least one per class" made 50% and 100% one labelled set: the flat
    line read as "half the labels cost nothing"; a missing CI went unexplained."""
    rows = [_metrics(0.9, None, n_patients=4), _metrics(0.9, None, n_patients=4)]
    fr = cr.summarise(["a", "b"], rows, [{}, {}], {}).assign(
        method="linear probe", label_fraction=[1.0, 0.5], labelled_patients_per_fold=[2.0, 2.0])
    figs = []
    from simclr_path import figures

    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: figs.append(fig))
    cr.plot_fractions(fr, str(tmp_path / "fr.png"), "t")
    fig = figs[0]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["50%\n2", "100%\n2"], ticks
    assert fig.axes[0].get_title() == "slide AUROC (n = 4 patients)"
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "fractions with the same number of labelled patients trained on the same ones" in notes
    assert "without error bar: too few patients for its CI" in notes
    fr = fr.assign(labelled_patients_per_fold=[4.0, 2.0], slide_auroc_ci_low=[0.8, 0.8],
                   slide_auroc_ci_high=[0.95, 0.95])
    figs.clear()
    cr.plot_fractions(fr, str(tmp_path / "fr2.png"), "t")
    assert [t.get_text() for t in figs[0].texts] == ["t"]  # the title; nothing to note


def test_the_fold_mean_says_how_many_folds_it_covers(tmp_path):
    mt = _script("metrics_table")
    m = {"slide": {"auroc": 0.75}, "patch": {"auroc": 0.8},
         "fold_summary": {"slide": {"auroc": {"mean": 0.75, "sd": None, "n_folds": 1}},
                          "patch": {"auroc": {"mean": 0.8, "sd": 0.1, "n_folds": 4}}},
         "task": {"n_folds": 4}}
    row = mt.table(m).set_index("metric").loc["AUROC"]
    assert row["slide fold mean ± sd"] == "0.750 ± n/a (1 of 4 folds)"
    assert row["patch fold mean ± sd"] == "0.800 ± 0.100"
    import json

    (tmp_path / "m.json").write_text(json.dumps(m))
    mt.main(str(tmp_path / "m.json"), str(tmp_path / "t.html"), "baseline")
    assert "(1 of 4 folds)" in (tmp_path / "t.html").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary name


def test_the_metrics_table_shows_class_names_as_text_not_markup(tmp_path):
    """A tile dataset's class folder name reached the report's HTML as a live tag."""
    import json

    mt = _script("metrics_table")
    m = {"slide": {"auroc": 0.75}, "patch": {"auroc": 0.8},
         "task": {"n_folds": 2, "evaluation": "grouped_2fold",
                  "score": "P(SCC<img src=x onerror=alert(1)>)"}}
    (tmp_path / "m.json").write_text(json.dumps(m))
    mt.main(str(tmp_path / "m.json"), str(tmp_path / "t.html"), "base&line")
    text = (tmp_path / "t.html").read_text()
    assert "<img" not in text and "P(SCC&lt;img src=x onerror=alert(1)&gt;)" in text
    assert "run base&amp;line" in text
    assert "patient-grouped 2-fold cross-validation;" in text  # in words, not grouped_2fold


def test_the_metrics_table_says_what_was_evaluated(tmp_path):
    """A split was described as "1 folds" with fold means equal to the pooled values, and a
    tile set's source images as slides and patients; the three-class metrics were left out."""
    import json

    mt = _script("metrics_table")
    split = {"slide": {"auroc": 0.75, "n": 4}, "patch": {"auroc": 0.8, "n": 400},
             "fold_summary": {"slide": {"auroc": {"mean": 0.75, "sd": None, "n_folds": 1}}},
             "task": {"n_folds": 1, "evaluation": "split", "n_slides": 8, "n_patients": 8,
                      "n_patches": 800, "labels_from": "samples sheet"}}
    (tmp_path / "s.json").write_text(json.dumps(split))
    mt.main(str(tmp_path / "s.json"), str(tmp_path / "s.html"), "r")
    text = (tmp_path / "s.html").read_text()
    assert ("held-out test split of the samples sheet; 8 slides, 8 patients, 800 patches "
            "(4 slides in its test split)") in text and "folds" not in text
    assert "fold mean" not in " ".join(mt.table(split).columns)
    tiles = {"slide": {"auroc": 0.9, "auroc_macro": 0.95, "auroc_topk": 0.91,
                       "auroc_ci95": [0.8, 0.97]}, "patch": {"auroc": 0.85},
             "task": {"n_folds": 5, "evaluation": "grouped_5fold", "n_slides": 75,
                      "n_patients": 75, "n_patches": 1452, "labels_from": "embedding files"}}
    (tmp_path / "t.json").write_text(json.dumps(tiles))
    mt.main(str(tmp_path / "t.json"), str(tmp_path / "t.html"), "r")
    text = (tmp_path / "t.html").read_text()
    assert "5-fold cross-validation grouped by source image; 75 source images (groups)" in text
    df = mt.table(tiles).set_index("metric")
    assert df.loc["AUROC (macro one-vs-rest)", "group (pooled)"] == "0.950"
    assert "F1 (macro)" not in df.index  # not in this metrics.json
    # the rows speak of source images too (review): no "slide" or "patient" in a tile set's table
    assert df.loc["group AUROC 95% CI (source image bootstrap)", "group (pooled)"] == "0.800-0.970"
    assert df.loc["AUROC (top-k group score)", "group (pooled)"] == "0.910"
    assert not any("slide" in str(v) or "patient" in str(v)
                   for v in [*df.index, *df.columns, *df.to_numpy().ravel()])
