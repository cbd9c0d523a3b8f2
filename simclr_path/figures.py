"""Figures for the report: loss curves, t-SNE maps, ROC/PR curves, confusion matrices, heatmaps.

Every figure has a title and axis labels and uses colour-blind-safe colours (Okabe-Ito for
categories, viridis/cividis for continuous values). Each public ``plot_*`` function writes its
figure(s) atomically (PNG, or PDF/SVG by the suffix) and returns the path(s); each is also a
``simclr-path plot-*`` subcommand.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simclr_path.errors import SimclrPathError, check_int, need_file
from simclr_path.outputs import as_paths, atomic_output, check_apart, check_can_write

# Okabe & Ito (2008), "Color Universal Design": distinguishable under common colour-vision
# deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
# slides and source groups: Paul Tol's colour-blind-safe "muted" set, so that a slide never wears
# a class's Okabe-Ito colour from the label map beside it
TOL_MUTED = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99",
             "#999933", "#AA4499"]
DPI = 120


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
               layout: str | None = None, **subplots: Any) -> tuple[Figure, Any]:
    """A figure and its axes (as ``Figure.subplots`` returns them) on an Agg canvas of its own,
    outside pyplot: drawing never switches the caller's backend (``matplotlib.use("Agg")`` at
    import turned a notebook's inline plots off) nor opens a window."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplots)


def plain_text(func: Callable[..., Any]) -> Callable[..., Any]:
    """Draw ``func``'s figure with mathtext off: titles, slide ids and class names are user
    text, and a ``$`` in one was parsed as maths (mangled, or a traceback when unbalanced)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return func(*args, **kwargs)

    return wrapper


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in the middle (``TCGA-A0-A0SB…9BB9-3F9C8C3E6B7E #4``):
    both ends of a slide id tell slides apart."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def rst_text(text: str) -> str:
    """``text`` escaped for reStructuredText (the report's captions): a class name such as
    ``tumour_`` or ``*SCC`` would otherwise be read as a link target or emphasis."""
    import re

    return re.sub(r"([^A-Za-z0-9\s])", r"\\\1", str(text))


def class_colors(classes) -> dict[str, str]:
    """One colour per class name, the same in every figure (t-SNE maps, ROC and PR curves):
    Okabe-Ito in the classes' sorted order, so that it does not depend on the order a figure
    met them in (a config's label order, a sample's first rows)."""
    names = sorted({str(c) for c in classes})
    return dict(zip(names, category_colors(len(names))))


def category_colors(n: int) -> list[str]:
    """``n`` colour-blind-safe category colours (Okabe-Ito, then viridis samples beyond 8)."""
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    return [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["viridis"](np.linspace(0, 1, n))]


def check_figure_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, Any],
                         force: bool) -> None:
    """Before any figure is drawn: none is one of the call's ``inputs`` (:func:`check_apart`;
    a figure may go inside a folder input) and each existing one is replaced only with
    ``force``. ``outputs``: argument name -> path, or None where that figure is not asked for."""
    check_apart(outputs, inputs, figures_only=True)
    for out in outputs.values():
        if out is not None:
            figure_format(out)  # every suffix before any work: a second bad one left the first
    for out in outputs.values():
        if out is not None:
            check_can_write(out, force)


def figure_format(out: str | os.PathLike) -> str:
    """The format a figure path's suffix names (``png`` without one); one clear error for a suffix
    matplotlib cannot write. Commands call it before their work, not only when saving."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(out).suffix.lower().lstrip(".") or "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise SimclrPathError(f"{out}: matplotlib cannot write .{fmt} figures; use one of "
                              + ", ".join(f".{k}" for k in sorted(supported)))
    return fmt


def save_figure(fig: Figure, out: str | os.PathLike, force: bool = True) -> Path:
    """Write ``fig`` atomically in the format its suffix names (``.png``, ``.pdf``, ``.svg``,
    ...; PNG without a suffix)."""
    fmt = figure_format(out)
    with atomic_output(out, force=force) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight")
    return Path(out)


TEXT_COLUMNS = ("slide_id", "patient_id", "label", "pred", "level")


def _read_table(path: Path, columns: set[str], numeric: set[str] = frozenset(),
                how: str = "", finite: set[str] = frozenset()) -> pd.DataFrame:
    """A CSV with at least one row and ``columns`` (``numeric`` ones all numbers, ``finite`` ones
    without NaN or infinity), or one clear error naming the file (an empty, truncated, binary or
    foreign file)."""
    try:
        # ids and class names stay text as written: "001" is not 1, a class "NA" is not missing,
        # and classes "0" / "1" still match metrics.json's strings
        head = pd.read_csv(path, nrows=0).columns
        text = [c for c in head if c in TEXT_COLUMNS]
        df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: ["", "nan", "NaN"] for c in head if c not in text})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SimclrPathError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0][:80]})"
                              f"{how}") from None
    missing = sorted(columns - set(df.columns))
    if missing or df.empty:
        raise SimclrPathError(f"{path}: expected columns {', '.join(sorted(columns))} with at least "
                              f"one row{' (missing ' + ', '.join(missing) + ')' if missing else ''}{how}")
    bad = [c for c in sorted(numeric) if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise SimclrPathError(f"{path}: column {bad[0]} is not all numbers{how}")
    _check_finite(df, finite, path, how)
    return df


def _check_finite(df: pd.DataFrame, columns: set[str], path: Path, how: str) -> None:
    """One clear error for an empty or non-finite value in ``columns`` (classify and predict
    write none; a figure would leave such rows out in silence). Rows are the file's lines."""
    for c in sorted(columns):
        gap = df.index[~np.isfinite(df[c].to_numpy(dtype=float))]
        if len(gap):
            raise SimclrPathError(f"{path}: column {c} has {len(gap)} empty or non-finite "
                                  f"value(s) (first on row {gap[0] + 2}){how}")


def with_run(text: str, run_name: str | None) -> str:
    """A figure's title with the run it belongs to named first (``run baseline: ...``), so a
    figure copied out of the report or results/figures/ still says which run drew it."""
    if run_name is None or run_name == "":
        return text
    if not isinstance(run_name, str):
        raise SimclrPathError(f"run_name: expected text, got {type(run_name).__name__}")
    return f"run {run_name}: {text}"


@plain_text
def plot_loss_curve(
    metrics_csv: str | os.PathLike,
    out: str | os.PathLike,
    title: str | None = None,
    force: bool = False,
    run_name: str | None = None,
) -> Path:
    """Training loss (raw and smoothed) and learning rate against optimiser step; ``run_name``
    names the run in the title (:func:`with_run`).

    ``metrics_csv`` is the ``metrics.csv`` of a pretraining run (columns ``step``, ``loss``,
    ``lr``) or the run directory that holds it.
    """
    check_figure_outputs({"out": out}, {"metrics_csv": metrics_csv}, force)
    p = Path(metrics_csv)
    if p.is_dir():
        p = p / "metrics.csv"
    need_file(p, "metrics file", "it is written by 'simclr-path pretrain'")
    df = _read_table(p, {"step", "loss"}, numeric={"step", "loss"},
                     how="; it is written by 'simclr-path pretrain' after its first logged steps")
    fig, ax = new_figure(figsize=(7, 4.6))
    from matplotlib.ticker import MaxNLocator

    window = max(1, len(df) // 20)
    finite = np.isfinite(df["loss"].to_numpy(dtype=float))
    loss = df["loss"].where(finite)
    # a moving mean of one row is the raw curve again: drawn once, as the loss itself; points
    # on a short run (a lone step was an invisible one-point line)
    ax.plot(df["step"], loss, color=OKABE_ITO[5] if window > 1 else OKABE_ITO[0],
            alpha=0.5 if window > 1 else 1.0, lw=1 if window > 1 else 2, label="loss",
            marker="o" if len(df) <= 30 else None, ms=4)
    if window > 1:
        ax.plot(
            df["step"],
            # not carried over steps whose loss was NaN or infinite; centred on each step: a
            # trailing mean lagged above the raw loss all through its fast early descent
            loss.rolling(window, min_periods=1, center=True).mean().where(finite),
            color=OKABE_ITO[0],
            lw=2,
            label=f"loss (centred moving mean of {window} logged steps)",
        )
    if not finite.all():  # a divergence is the thing to see, not a gap in the line
        first = df["step"].to_numpy()[~finite][0]
        ax.axvline(first, color=OKABE_ITO[3], ls=":", lw=1.5,
                   label=f"loss NaN or infinite ({(~finite).sum()} logged steps, from step {first:g})")
    if df["step"].nunique() == 1:  # one step: whole-step ticks around it, not -0.04 ... 0.04
        ax.set_xlim(df["step"].iloc[0] - 1, df["step"].iloc[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole (a 3-step run)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("contrastive loss (train.loss)")
    ax.set_title(with_run(title or "SimCLR pretraining loss", run_name))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in df.columns:
        ax2 = ax.twinx()
        ax2.plot(df["step"], df["lr"], color=OKABE_ITO[1], lw=1.2, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # below the axes: inside, it sat on the learning-rate curve's peak
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3,
              frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, force=force)


# ----------------------------------------------------------------------------------------------
# t-SNE maps
# ----------------------------------------------------------------------------------------------
LEGEND_MAX = 12  # categories named in a legend; more get a note instead


def _legend_or_note(ax: Axes, n_categories: int, what: str, most: int = LEGEND_MAX) -> None:
    if n_categories <= most:
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            markerscale=2,
            fontsize=8,
            title=what,
        )
    else:
        ax.text(
            1.01,
            0.5,
            f"{n_categories} {what}s\n(legend omitted)",
            transform=ax.transAxes,
            va="center",
            fontsize=8,
        )


def sample_embeddings(
    embedding_paths, max_points: int, samples=None, seed: int = 0
) -> pd.DataFrame:
    """Stratified sample (by slide and label) of at most ``max_points`` patches of embedding files.

    Returns one row per sampled patch: ``file`` (index into ``embedding_paths``), ``patch_index``,
    ``slide_id``, ``label``, ``group`` (source group or the slide id) and ``features`` (D,).
    """
    from simclr_path.samples import read_samples, validate_samples
    from simclr_path.store import EmbeddingStore

    if not embedding_paths:
        raise SimclrPathError("no embedding files given; pass --embeddings EMB.h5 [EMB.h5 ...]")
    slide_label: dict[str, str] = {}
    if samples is not None:
        sheet = (
            validate_samples(samples, check_files=False)
            if isinstance(samples, pd.DataFrame)
            else read_samples(samples, check_files=False)
        )
        slide_label = dict(zip(sheet["slide_id"], sheet["label"]))
    rows = []
    dim = None
    for fi, p in enumerate(embedding_paths):
        s = EmbeddingStore(p, features=False)  # only the sampled rows are read, below
        if dim is not None and s.shape[1] != dim:
            raise SimclrPathError(
                f"{p}: feature size {s.shape[1]} differs from the other files ({dim})"
            )
        dim = s.shape[1]
        n = len(s)
        if n == 0:
            continue
        if samples is not None:
            if s.slide_id not in slide_label:
                raise SimclrPathError(
                    f"{p}: slide {s.slide_id!r} is not in the samples "
                    + (f"sheet {samples}" if isinstance(samples, (str, os.PathLike)) else "table")
                )
            labels = [slide_label[s.slide_id]] * n
        elif s.labels is not None and s.label_names:
            labels = [s.label_names[i] for i in s.labels]
        else:
            labels = ["unlabelled"] * n
        groups = s.groups if s.groups is not None and any(s.groups) else [s.slide_id] * n
        rows.append(
            pd.DataFrame(
                {
                    "file": fi,
                    "patch_index": np.arange(n),
                    "slide_id": s.slide_id,
                    "label": labels,
                    "group": groups,
                }
            )
        )
    if not rows:
        raise SimclrPathError("every embedding file is empty; nothing to plot")
    df = pd.concat(rows, ignore_index=True)
    rng = np.random.default_rng(seed)
    strata = df.groupby(["slide_id", "label"], sort=True).indices
    # equal shares per (slide, label), and what small strata leave unused goes to the others
    # (water-filling, smallest first): a big slide is not cut to a share small slides cannot use
    quota, left = {}, int(max_points)
    by_size = sorted(strata, key=lambda k: len(strata[k]))
    for i, key in enumerate(by_size):
        quota[key] = min(len(strata[key]), left // (len(by_size) - i))
        left -= quota[key]
    keep = np.sort(np.concatenate(
        [rng.choice(ix, size=quota[key], replace=False) for key, ix in strata.items()]
    ))
    out = df.iloc[keep].reset_index(drop=True)
    X = np.empty((len(out), dim), dtype=np.float32)
    for fi, pos in out.groupby("file").indices.items():  # positions in ``out``
        X[pos] = EmbeddingStore(embedding_paths[fi], features=False).read_rows(
            out["patch_index"].to_numpy()[pos])
    out["features"] = list(X)
    out.attrs["n_total"] = len(df)  # patches sampled from, for the figures' titles
    # every class, sampled or not: a class the sample missed must not shift the others' colours
    out.attrs["classes"] = sorted({str(c) for c in df["label"].unique()})
    return out


def tsne_2d(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (van der Maaten & Hinton 2008), PCA-initialised: (N, D) features -> (N, 2)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    X = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    n = len(X)
    if n < 5:
        raise SimclrPathError(f"only {n} patches to place; t-SNE needs at least 5")
    if X.shape[1] > 50:  # the usual PCA pre-reduction: faster and less noisy neighbourhoods
        X = PCA(n_components=min(50, n - 1), random_state=seed).fit_transform(X)
    perp = float(min(perplexity, max(2.0, (n - 1) / 3.0)))
    return TSNE(
        n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(X)


def _scatter_by(ax: Axes, xy: np.ndarray, cats: pd.Series, what: str,
                classes: Sequence[str] | None = None) -> None:
    """``classes``: every class of the task, for their colours (:func:`class_colors`)."""
    names = sorted(cats.unique(), key=str)
    palette = OKABE_ITO if what == "label" else TOL_MUTED
    colors = palette[:len(names)]
    if what == "label":  # the colours of the ROC and PR curves (class_colors)
        by_name = class_colors([*names, *(classes or [])])
        colors = [by_name[str(n)] for n in names]
    elif len(names) > len(palette):
        # many slides/groups: golden-ratio steps through viridis, so neighbours in name order
        # (often the same class) get distant colours
        colors = [matplotlib.colormaps["viridis"](x) for x in np.mod(np.arange(len(names)) * 0.6180339887, 1.0)]
    index = {name: i for i, name in enumerate(names)}
    point_colors = matplotlib.colors.to_rgba_array(colors)[[index[c] for c in cats]]  # (N, 4)
    # one scatter in a shuffled order: drawn category by category, the last would cover the rest
    order = np.random.default_rng(0).permutation(len(xy))
    # a thin dark edge: light colours (yellow, sand) stay visible on white
    ax.scatter(xy[order, 0], xy[order, 1], s=10, c=point_colors[order], alpha=0.85,
               linewidths=0.2, edgecolors="0.25")
    # slides beyond the categorical palette get viridis steps, which a legend cannot tell
    # apart (two entries of near-equal purple): no legend then, as for many classes
    most = LEGEND_MAX if what == "label" else len(palette)
    if len(names) <= most:  # legend entries, long slide ids cut in the middle, with counts
        counts = cats.value_counts()
        for name, col in zip(names, colors):
            ax.scatter([], [], s=14, color=col, alpha=0.85, linewidths=0.2, edgecolors="0.25",
                       label=f"{shorten(str(name), 32)} (n={counts[name]})")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    _legend_or_note(ax, len(names), what, most)


@plain_text
def plot_tsne(
    embedding_paths,
    out_label: str | os.PathLike,
    out_slide: str | os.PathLike,
    samples=None,
    max_points: int | None = None,
    perplexity: float | None = None,
    stores=None,
    out_thumbnails: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    out_umap: str | os.PathLike | None = None,
    run_name: str | None = None,
) -> list[Path]:
    """t-SNE of a stratified patch sample, coloured by label (``out_label``) and by slide or source
    group (``out_slide``); with ``stores`` (the patch stores) also a map drawn with the patches
    themselves (``out_thumbnails``); with ``out_umap`` also a UMAP (McInnes et al. 2018) of the
    same sample coloured by label (needs the optional ``umap-learn``). Returns the written paths.
    ``run_name`` names the run in every title (:func:`with_run`).

    ``max_points`` and ``perplexity`` default to ``ClassifyConfig.tsne_max_points`` and
    ``tsne_perplexity``.
    """
    from simclr_path.config import ClassifyConfig, ConfigValueError

    embedding_paths = as_paths(embedding_paths, "embedding_paths")
    stores = None if stores is None else as_paths(stores, "stores")
    check_figure_outputs({"out_label": out_label, "out_slide": out_slide,
                          "out_thumbnails": out_thumbnails, "out_umap": out_umap},
                         {"embedding_paths": embedding_paths, "stores": stores, "samples": samples},
                         force)
    d = ClassifyConfig()
    # the config's own range checks (0 was taken as "the default", -5 failed inside numpy)
    try:
        d = ClassifyConfig(tsne_max_points=d.tsne_max_points if max_points is None else max_points,
                           tsne_perplexity=d.tsne_perplexity if perplexity is None else perplexity)
    except ConfigValueError as exc:
        raise SimclrPathError(f"plot_tsne: {exc.detail} (max_points, perplexity)") from None
    max_points, perplexity = d.tsne_max_points, d.tsne_perplexity
    seed = check_int(seed, "plot_tsne", "seed")
    if (stores is None) != (out_thumbnails is None):
        raise SimclrPathError(
            "the thumbnail map needs both the patch stores (--stores) and --out-thumbnails"
        )
    if out_umap is not None:
        try:
            import umap  # optional: the package's "umap" extra
        except ImportError:
            raise SimclrPathError(
                "--out-umap needs the optional package umap-learn; install it with "
                "pip install umap-learn (or pip install -e '.[umap]' in the simclr-path folder) "
                "or leave --out-umap out"
            ) from None
    df = sample_embeddings(embedding_paths, max_points, samples=samples, seed=seed)
    # every sampled file's store, checked against the file before any figure is written
    opened = None if stores is None else _stores_for(stores, embedding_paths, df["file"])
    from simclr_path.store import BAD_FEATURES, unusable_rows

    feats = np.stack(df["features"].to_list())
    bad = np.flatnonzero(unusable_rows(feats))
    if len(bad):  # sklearn stopped with a traceback (embed never writes them: a foreign file)
        first = df.iloc[bad[0]]
        raise SimclrPathError(
            f"{embedding_paths[int(first['file'])]}: patch row(s) hold {BAD_FEATURES} "
            f"({len(bad)} of the "
            f"{len(df)} sampled, first: row {int(first['patch_index'])}); embed the slide again "
            "(simclr-path embed ... --force)")
    xy = tsne_2d(feats, perplexity, seed)
    # every figure is drawn before any is saved: a damaged store's patch (read for the
    # thumbnail map) must not leave the label and slide maps of a failed run behind
    figures: list[tuple[Figure, str | os.PathLike]] = []
    # what the map is a sample of: "2000 patch embeddings" did not say of how many, or whence
    total = df.attrs.get("n_total", len(df))
    of = f"{len(df)} of {total}" if total > len(df) else f"all {len(df)}"
    sample = f"{of} patch embeddings ({df['slide_id'].nunique()} slides)"
    fig, ax = new_figure(figsize=(7.5, 6))
    _scatter_by(ax, xy, df["label"], "label", df.attrs.get("classes"))
    ax.set_title(with_run(f"t-SNE of {sample}, coloured by label", run_name))
    figures.append((fig, out_label))
    by_group = df["slide_id"].nunique() == 1 and df["group"].nunique() > 1
    fig, ax = new_figure(figsize=(7.5, 6))
    _scatter_by(
        ax, xy, df["group"] if by_group else df["slide_id"], "group" if by_group else "slide"
    )
    ax.set_title(with_run(f"t-SNE of {sample},\ncoloured by "
                          f"{'source group' if by_group else 'slide'}", run_name))
    figures.append((fig, out_slide))
    if opened is not None:
        figures.append((_tsne_thumbnail_figure(df, xy, opened, seed, run_name=run_name),
                        out_thumbnails))
    if out_umap is not None:
        from sklearn.preprocessing import StandardScaler

        X = StandardScaler().fit_transform(np.stack(df["features"].to_list()))
        uv = umap.UMAP(n_neighbors=min(15, len(df) - 1), random_state=seed).fit_transform(X)
        fig, ax = new_figure(figsize=(7.5, 6))
        _scatter_by(ax, uv, df["label"], "label", df.attrs.get("classes"))
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_title(with_run(f"UMAP of {sample}, coloured by label",
                              run_name))
        figures.append((fig, out_umap))
    return [save_figure(fig, out, force=force) for fig, out in figures]


# a slide id is the file name by default, so two tilings of one slide (another --mpp, patch
# size or stride) share it: a store found by slide id must also hold the very patches
OTHER_TILING = ("another tiling of slide {sid!r} (another --mpp, patch size or stride) has the "
                "same slide id")


def _patch_mismatch(store, coords: np.ndarray, index: np.ndarray | None, what: str) -> str | None:
    """Why the patches at level-0 ``coords`` (patch ``index`` of the store each; None: the
    store's positions in any order) are not ``store``'s patches, or None when they are.
    ``what`` names their side in the reason ("the predictions", "the embeddings")."""
    coords = np.asarray(coords, dtype=float).reshape(-1, 2)
    if len(coords) != len(store):
        return f"{len(store)} patches in the store, {len(coords)} in {what}"
    if index is None:
        have = {tuple(c) for c in store.coords.astype(float).tolist()}
        for x, y in coords.tolist():
            if (x, y) not in have:
                return f"no patch of the store at (x, y) = ({x:g}, {y:g}) where {what} have one"
        return None
    index = np.asarray(index, dtype=np.int64)
    past = np.flatnonzero((index < 0) | (index >= len(store)))
    if len(past):
        return f"{what} have patch {index[past[0]]}, the store only {len(store)} patches"
    off = np.flatnonzero((store.coords[index] != coords).any(axis=1))
    if len(off):
        k = off[0]
        (sx, sy), (px, py) = store.coords[index[k]], coords[k]
        return (f"patch {index[k]} is at (x, y) = ({sx:g}, {sy:g}) in the store, "
                f"({px:g}, {py:g}) in {what}")
    return None


def _embedding_mismatch(emb, store) -> str | None:
    """Why ``store`` does not hold the patches the embedding file ``emb`` was made from (patch
    size, mpp, count or coordinates), or None. Files written before embed recorded ``mpp`` /
    ``patch_size`` are checked on count and coordinates only."""
    for key, have in (("patch_size", store.patch_size), ("mpp", store.mpp)):
        want = emb.attrs.get(key)
        if want is not None and have is not None and not np.isclose(float(want), float(have)):
            return f"{key} {have:g} in the store, {want:g} in the embeddings"
    return _patch_mismatch(store, emb.coords, np.arange(len(emb)), "the embeddings")


def _stores_for(stores, embedding_paths, files) -> dict:
    """File index -> the opened patch store its embeddings were made from, for every file in
    ``files`` (indices into ``embedding_paths``), or one clear error. A store is looked up by
    slide id (the one the embedding file names as ``source_store`` first, when several share
    it) and must hold the file's patches; checked before any figure is written."""
    from simclr_path.store import EmbeddingStore, PatchStore

    by_slide: dict[str, list] = {}
    for p in stores:
        st = PatchStore(p)
        by_slide.setdefault(st.slide_id, []).append(st)
    opened = {}
    for fi in sorted(set(files)):
        emb = EmbeddingStore(embedding_paths[fi], features=False)
        candidates = by_slide.get(emb.slide_id)
        if not candidates:
            raise SimclrPathError(
                f"no patch store given for slide {emb.slide_id!r}; pass its store with --stores"
            )
        src = emb.attrs.get("source_store")
        named = src is not None and Path(src).is_file()
        candidates = sorted(candidates,
                            key=lambda st: not (named and os.path.samefile(st.path, src)))
        match = next((st for st in candidates if _embedding_mismatch(emb, st) is None), None)
        if match is None:
            came = f" (it was embedded from {src})" if src else ""
            raise SimclrPathError(
                f"{candidates[0].path}: not the patches {emb.path} was embedded from{came}: "
                f"{_embedding_mismatch(emb, candidates[0])}; "
                f"{OTHER_TILING.format(sid=emb.slide_id)}. Pass the store the embeddings were "
                "made from with --stores"
            )
        opened[fi] = match
    return opened


def _tsne_thumbnail_figure(
    df: pd.DataFrame,
    xy: np.ndarray,
    opened: dict,
    seed: int,
    grid: int = 24,
    cell: int = 64,
    run_name: str | None = None,
) -> Figure:
    """The t-SNE map, each grid cell showing one patch that falls in it (random order);
    ``opened``: embedding file index -> patch store (:func:`_stores_for`). About 50 screen
    pixels a patch (24 x 24 cells over 12 inches): at 32 x 32 over 8 inches, 22 pixels showed
    no nucleus."""
    from PIL import Image

    lo, hi = xy.min(axis=0), xy.max(axis=0)
    u = (xy - lo) / np.maximum(hi - lo, 1e-9)
    cx = np.minimum((u[:, 0] * grid).astype(int), grid - 1)
    cy = np.minimum((u[:, 1] * grid).astype(int), grid - 1)
    canvas = np.full((grid * cell, grid * cell, 3), 255, dtype=np.uint8)
    taken = np.zeros((grid, grid), dtype=bool)
    try:
        for i in np.random.default_rng(seed).permutation(len(df)):
            if taken[cy[i], cx[i]]:
                continue
            taken[cy[i], cx[i]] = True
            st = opened[int(df["file"].iloc[i])]
            patch = Image.fromarray(st[int(df["patch_index"].iloc[i])]).resize(
                (cell, cell), Image.BILINEAR
            )
            r = (grid - 1 - cy[i]) * cell  # image row 0 is the top (largest t-SNE 2)
            c = cx[i] * cell
            canvas[r : r + cell, c : c + cell] = np.asarray(patch)
    finally:
        for st in opened.values():
            st.close()
    fig, ax = new_figure(figsize=(12, 12), layout="constrained")  # the map fills the figure
    ax.imshow(
        canvas, extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto", interpolation="antialiased"
    )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(with_run(
        f"t-SNE map drawn with patches ({int(taken.sum())} of {len(df)} shown, one per cell)",
        run_name))
    return fig


# ----------------------------------------------------------------------------------------------
# Classifier figures (from a 'simclr-path classify' results folder)
# ----------------------------------------------------------------------------------------------
def unit_words(task: dict) -> tuple[str, str]:
    """What a classify run's "slide" and "patient" are: ("slide", "patient"), or for imported
    tile sets (labels from the files) ("group", "source image"): each group is both."""
    if task.get("labels_from") in ("embedding files", "patch stores"):
        return "group", "source image"
    return "slide", "patient"


def evaluation_words(scheme: str | None, grouped_by: str = "patient") -> str:
    """A classify ``task.evaluation`` in words: ``grouped_5fold`` -> "patient-grouped 5-fold
    cross-validation" (``grouped_by``: "source image" for tile sets), ``split`` -> "held-out
    test split of the samples sheet"."""
    import re

    m = re.fullmatch(r"grouped_(\d+)fold", str(scheme or ""))
    if m:
        return (f"patient-grouped {m.group(1)}-fold cross-validation" if grouped_by == "patient"
                else f"{m.group(1)}-fold cross-validation grouped by {grouped_by}")
    if scheme == "split":
        return "held-out test split of the samples sheet"
    return str(scheme or "evaluation not recorded")


def _read_classify_dir(folder: str | os.PathLike, held_out_only: bool = True
                       ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """metrics.json, the patch predictions (only held-out ones, fold >= 0, unless
    ``held_out_only`` is false) and the slide predictions of a classify folder."""
    import json

    d = Path(folder)
    files = [d / "metrics.json", d / "predictions_patches.csv", d / "predictions_slides.csv"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SimclrPathError(
            f"{d}: not a 'simclr-path classify' results folder (missing {', '.join(missing)})"
        )
    how = "; rerun 'simclr-path classify' with --force"
    try:
        metrics = json.loads(files[0].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        metrics = None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("task"), dict):
        raise SimclrPathError(f"{files[0]}: not a classify metrics file{how}")
    task = metrics["task"]
    classes = task.get("classes")
    if not isinstance(classes, list) or not classes:
        raise SimclrPathError(f"{files[0]}: no task.classes{how}")
    for level in ("patch", "slide"):
        if not isinstance(metrics.get(level), dict) or not isinstance(
                metrics[level].get("confusion_matrix"), list):
            raise SimclrPathError(f"{files[0]}: no {level}-level confusion matrix{how}")
    # the score columns the figures read, checked as numbers (a damaged value is one line)
    scores = ["score"] if task.get("positive") is not None else [f"prob_{c}" for c in classes]
    patches = _read_table(files[1], {"slide_id", "label", "fold", *scores},
                          numeric={"fold", *scores}, how=how, finite={"fold"})
    # the training slides of a samples-sheet split have no prediction (fold -1, empty scores)
    _check_finite(patches[patches["fold"] >= 0], set(scores), files[1], how)
    slide_scores = [*scores, "score_topk"] if task.get("positive") is not None else scores
    slides = _read_table(files[2], {"slide_id", "label", *slide_scores},
                         numeric=set(slide_scores), how=how, finite=set(slide_scores))
    return metrics, patches[patches["fold"] >= 0] if held_out_only else patches, slides


def _curve_sets(
    metrics: dict, patches: pd.DataFrame, slides: pd.DataFrame
) -> dict[str, list[tuple]]:
    """Per level, a list of (name, binary truth, score) for the curves."""
    classes = metrics["task"]["classes"]
    pos = metrics["task"].get("positive")
    sets: dict[str, list[tuple]] = {"patch": [], "slide": []}
    if pos is not None:
        sets["patch"].append(
            (f"{pos} vs rest", (patches["label"] == pos).to_numpy(), patches["score"].to_numpy())
        )
        yb = (slides["label"] == pos).to_numpy()
        sets["slide"].append(("mean of patches", yb, slides["score"].to_numpy()))
        sets["slide"].append(
            (f"top-{metrics['task'].get('top_k', '')} mean", yb, slides["score_topk"].to_numpy())
        )
    else:
        for c in classes:
            sets["patch"].append(
                (
                    f"{c} vs rest",
                    (patches["label"] == c).to_numpy(),
                    patches[f"prob_{c}"].to_numpy(),
                )
            )
            sets["slide"].append(
                (f"{c} vs rest", (slides["label"] == c).to_numpy(), slides[f"prob_{c}"].to_numpy())
            )
    return sets


def roc_band(truth: np.ndarray, score: np.ndarray, clusters: np.ndarray, n: int = 1000,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Pointwise 95% band of an ROC curve by resampling ``clusters`` (patients) with
    replacement, as ``classify``'s AUROC CI does: (false positive rates (101,), lower and upper
    true positive rates (101,)), or None when under a tenth of the resamples hold both classes.
    ``truth`` bool (N,), ``score`` (N,), ``clusters`` (N,). Each resample's curve is read at
    fixed false positive rates (vertical averaging: Fawcett, Pattern Recognit. Lett. 2006).

    A resample is a count per row (how often its cluster was drawn): the rows are sorted by
    score once and each curve is a weighted cumulative sum, O(N) with no sort (sklearn's
    roc_curve per resample took 2 minutes for 100,000 ungrouped tiles).
    """
    truth = np.asarray(truth, dtype=bool)
    score = np.asarray(score, dtype=float)
    rng = np.random.default_rng(seed)
    _, cluster = np.unique(clusters, return_inverse=True)
    k = int(cluster.max()) + 1 if len(cluster) else 0
    order = np.argsort(-score, kind="stable")
    cluster, pos = cluster[order], truth[order]
    s = score[order]
    # the last row of each run of equal scores: one threshold per distinct score
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.zeros(0, int)
    grid = np.linspace(0, 1, 101)
    rows = []
    for _ in range(n):
        w = np.bincount(rng.integers(0, k, k), minlength=k)[cluster].astype(float)
        tp = np.cumsum(w * pos)[ends]
        fp = np.cumsum(w * ~pos)[ends]
        if not (tp[-1] > 0 and fp[-1] > 0):
            continue  # one class only in this resample
        fpr = np.r_[0.0, fp / fp[-1]]
        tpr = np.r_[0.0, tp / tp[-1]]
        rows.append(np.interp(grid, fpr, tpr))
    if len(rows) < max(10, n // 10):
        return None
    lo, hi = np.percentile(np.array(rows), [2.5, 97.5], axis=0)
    return grid, lo, hi


def _curve_colors(metrics: dict, curves: list[tuple]) -> list[str]:
    """A curve's colour is its class's (:func:`class_colors`, as on the t-SNE map); the top-k
    slide score, which is no class, is black."""
    task = metrics["task"]
    by_class = class_colors(task["classes"])
    pos = task.get("positive")
    out = []
    for name, *_ in curves:
        if pos is not None:
            out.append(OKABE_ITO[7] if name.startswith("top-") else by_class[str(pos)])
        else:
            out.append(by_class[name.removesuffix(" vs rest")])
    return out


@plain_text
def plot_curves(
    classify_dir: str | os.PathLike,
    out_roc: str | os.PathLike,
    out_pr: str | os.PathLike,
    force: bool = False,
    run_name: str | None = None,
) -> list[Path]:
    """ROC and precision-recall curves (out-of-fold predictions) at patch and slide level,
    AUROC / average precision in the legends; ``run_name`` names the run in the titles."""
    check_figure_outputs({"out_roc": out_roc, "out_pr": out_pr}, {"classify_dir": classify_dir},
                         force)
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    metrics, patches, slides = _read_classify_dir(classify_dir)
    unit, grouped_by = unit_words(metrics["task"])
    # the titles' n= must be the n of metrics.json: rows lost or added since (a damaged or
    # hand-edited CSV) would draw curves of other predictions than the metrics describe
    d = Path(classify_dir)
    for level, table, name in (("patch", patches, "predictions_patches.csv"),
                               ("slide", slides, "predictions_slides.csv")):
        n = metrics[level].get("n")
        if isinstance(n, int) and n != len(table):
            what = "held-out patch" if level == "patch" else "slide"
            raise SimclrPathError(
                f"{d / name}: {len(table)} {what} rows but metrics.json counts {n}; the "
                "results folder is damaged, rerun 'simclr-path classify' with --force")
    sets = _curve_sets(metrics, patches, slides)
    written = []
    for kind, out in (("roc", out_roc), ("pr", out_pr)):
        fig, axes = new_figure(1, 2, figsize=(11, 4.8), layout="constrained")
        for ax, level in zip(axes, ("patch", "slide")):
            drawn = []  # (name, truth, colour) of the curves drawn, for the prevalence lines
            skipped = []  # why curves were left out, for the note in an empty panel
            # a line style per curve too: curves that coincide (mean and top-k scores of a few
            # slides) stay visible, the later one dashed over the earlier one
            styles = ["-", "--", ":", "-."]
            for i, ((name, yb, s), col) in enumerate(zip(sets[level],
                                                          _curve_colors(metrics, sets[level]))):
                ls = styles[i % len(styles)]
                ok = np.isfinite(s)
                yb, s = yb[ok], s[ok]
                if not len(yb):
                    skipped.append("no scores")
                    continue
                if yb.all() or not yb.any():
                    skipped.append("one class")
                    continue
                drawn.append((name, yb, col))
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(yb, s)
                    ax.plot(
                        fpr,
                        tpr,
                        color=col,
                        lw=2,
                        ls=ls,
                        label=f"{name} (AUROC {roc_auc_score(yb, s):.3f})",
                    )
                else:
                    prec, rec, _ = precision_recall_curve(yb, s)
                    ax.plot(
                        rec,
                        prec,
                        color=col,
                        lw=2,
                        ls=ls,
                        drawstyle="steps-post",
                        label=f"{name} (AP {average_precision_score(yb, s):.3f})",
                    )
            ci = metrics[level].get("auroc_ci95") if kind == "roc" else None
            has_ci = isinstance(ci, list) and len(ci) == 2 and all(
                isinstance(v, (int, float)) for v in ci)
            if (has_ci and level == "slide" and metrics["task"].get("positive") is not None
                    and drawn and drawn[0][0] == "mean of patches" and "patient_id" in slides):
                # the CI's own curve (the mean-of-patches score), resampled by patient as the CI
                ok = np.isfinite(slides["score"].to_numpy(dtype=float))
                used = metrics.get("config") or {}  # classify's resamples and seed
                used = used.get("classify", used)  # (fine-tuning keeps them by section)
                band = roc_band(drawn[0][1], slides["score"].to_numpy(dtype=float)[ok],
                                slides["patient_id"].astype(str).to_numpy()[ok],
                                n=int(used.get("bootstrap") or 1000), seed=int(used.get("seed") or 0))
                if band is not None:
                    ax.fill_between(*band, color=drawn[0][2], alpha=0.2, lw=0, step=None,
                                    label=f"mean of patches: 95% band ({grouped_by} bootstrap)")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
                ax.set_xlabel("false positive rate (1 - specificity)")
                ax.set_ylabel("true positive rate (sensitivity)")
            else:
                # a no-skill line per distinct prevalence (one-vs-rest curves of several
                # classes each have their own), in its curve's colour when there are several
                prevs = {}
                for name, yb, col in drawn:
                    prevs.setdefault(round(float(np.mean(yb)), 3), []).append((name, col))
                for prev, named in prevs.items():
                    col = "grey" if len(prevs) == 1 else named[0][1]
                    who = "" if len(prevs) == 1 else f"{', '.join(n for n, _ in named)} "
                    ax.axhline(prev, color=col, ls="--", lw=1,
                               label=f"{who}prevalence ({prev:.2f})")
                ax.set_xlabel("recall (sensitivity)")
                ax.set_ylabel("precision")
            ax.set_xlim(-0.01, 1.01)
            ax.set_ylim(-0.01, 1.01)
            ax.grid(alpha=0.3)
            n = len(patches) if level == "patch" else len(slides)
            # positives and negatives, where the curves share them (one positive class): an
            # AUROC of 1 on 4 + 4 slides is another claim than one on 400 + 400
            counts = {(int(yb.sum()), len(yb) - int(yb.sum())) for _, yb, _ in drawn}
            macro = metrics["task"].get("positive") is None
            # one-vs-rest curves of equal classes share their counts too, but have no positive
            split = ([f"{p} per class" if macro and len(drawn) > 1 else f"{p} positive, {q} negative"
                      for p, q in counts] if len(counts) == 1 else [])
            if has_ci:
                # name the curve it belongs to where a panel has several: the slide CI is the
                # mean-of-patches score's, not the top-k one's; without a positive class, macro
                whose = ("" if len(drawn) < 2 else "macro " if macro else f"{drawn[0][0]} ")
                value = metrics[level].get("auroc")
                # three decimals as the legend's AUROCs ("CI 1.00-1.00" beside 0.996 said
                # nothing); the macro AUROC itself is in no legend, so it is given here
                shown = (f" {value:.3f}" if macro and len(drawn) > 1
                         and isinstance(value, (int, float)) else "")
                split.append(f"{whose}AUROC{shown} 95% CI {ci[0]:.3f}-{ci[1]:.3f}")
            elif kind == "roc" and metrics[level].get("auroc_ci95_note"):
                # why there is none ("CI not shown: 4 patients per class"), its detail left out
                split.append(str(metrics[level]["auroc_ci95_note"]).split(" (")[0])
            # two lines: one would run into the next panel's title
            ax.set_title(f"{level if level == 'patch' else unit} level, n={n}"
                         + ("\n" + "; ".join(split) if split else ""), fontsize=11)
            if not drawn:
                # an empty panel says why, rather than looking like a drawing bug
                things = "patches" if level == "patch" else "slides"
                why = (f"only one class among the held-out {things}" if "one class" in skipped
                       else f"no held-out {things} with scores")
                ax.text(0.5, 0.55, f"{why}:\nno curve", ha="center", va="center",
                        transform=ax.transAxes, fontsize=11, color="0.3",
                        bbox={"facecolor": "white", "edgecolor": "0.8"})
            if ax.get_legend_handles_labels()[0]:  # none: matplotlib would warn on stderr
                # PR curves of several classes, or of a weak classifier, run through any fixed
                # corner: where the curves leave the most room
                ax.legend(loc="lower right" if kind == "roc" else "best", frameon=False,
                          fontsize=8)
        fig.suptitle(with_run(
            ("ROC" if kind == "roc" else "Precision-recall") + " curves, held-out predictions "
            f"({evaluation_words(metrics['task'].get('evaluation'), grouped_by)})", run_name))
        written.append(save_figure(fig, out, force=force))
    return written


@plain_text
def plot_confusion(
    classify_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False,
    run_name: str | None = None,
) -> Path:
    """Confusion matrices (counts and row percentages) at patch and slide level; ``run_name``
    names the run in the title."""
    check_figure_outputs({"out": out}, {"classify_dir": classify_dir}, force)
    metrics, _, _ = _read_classify_dir(classify_dir)
    unit, grouped_by = unit_words(metrics["task"])
    classes = metrics["task"]["classes"]
    fig, axes = new_figure(1, 2, figsize=(12, 5), layout="constrained")
    for ax, level in zip(axes, ("patch", "slide")):
        cm = np.asarray(metrics[level]["confusion_matrix"], dtype=float)  # checked when read
        rows = cm.sum(axis=1, keepdims=True)
        # a true class with nothing held out has no fractions: blank, not the colour of 0 %
        # (which read as every one of them missed)
        frac = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
        im = ax.imshow(frac, cmap="cividis", vmin=0, vmax=1)
        # text dark on light cells by the colour's own luminance: white on cividis's mid grey
        # (40-60 %) was hard to read
        rgb = matplotlib.colormaps["cividis"](np.nan_to_num(frac, nan=1.0))[..., :3]
        luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
        things = "patches" if level == "patch" else f"{unit}s"
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}\n({100 * frac[i, j]:.0f}%)" if rows[i, 0] > 0 else
                    f"0\n(no {things})",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="black" if luma[i, j] > 0.4 else "white",
                )
        # long class names took half a panel: cut in the middle
        names = [shorten(str(c), 22) for c in classes]
        ax.set_xticks(range(len(classes)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        bacc = metrics[level].get("balanced_accuracy")
        ax.set_title(
            f"{level if level == 'patch' else unit} level, n={int(cm.sum())}"
            + (f" (balanced accuracy {bacc:.3f})" if bacc is not None else "")
        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.suptitle(with_run("Confusion matrices, held-out predictions "
                          f"({evaluation_words(metrics['task'].get('evaluation'), grouped_by)})",
                          run_name))
    return save_figure(fig, out, force=force)


# ----------------------------------------------------------------------------------------------
# Slide heatmaps
# ----------------------------------------------------------------------------------------------
def _extent_mm(st, extent) -> tuple[list[float], str]:
    """A level-0-pixel ``extent`` in millimetres on the slide, as the QC picture's axes, where
    the store records the level-0 mpp; else as it is, in level-0 pixels."""
    mpp = st.attrs.get("level0_mpp")
    if mpp is None or not np.isfinite(float(mpp)) or float(mpp) <= 0:
        return list(extent), "level-0 pixels"
    return [float(e) * float(mpp) / 1000.0 for e in extent], "mm"


def _heatmap_unavailable(st, sid: str, reason: str, out: str | os.PathLike, force: bool,
                         max_side: int, run_name: str | None = None) -> Path:
    """The slide's picture titled with why it has no heatmap (closes ``st``)."""
    fig, ax = new_figure(figsize=(6.5, 5.5))
    try:
        thumb, extent = slide_thumbnail(st, max_side=max_side)
    except (ValueError, SimclrPathError):  # no slide file and no patches to draw a mosaic of
        thumb = None
    if thumb is None:
        ax.text(0.5, 0.5, "no picture of the slide", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        extent_shown, unit = _extent_mm(st, extent)
        ax.imshow(thumb, extent=extent_shown)
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
    ax.set_title(with_run(f"{sid}: no heatmap ({reason})", run_name))
    st.close()
    return save_figure(fig, out, force=force)


def slide_thumbnail(
    store, max_side: int = 1024
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A picture of the slide behind a store's patches and its extent in level-0 pixels.

    The thumbnail stored by ``tile`` when there is one (no slide file needed), else from the
    slide file through OpenSlide when ``source_path`` exists and opens, otherwise a mosaic of
    the store's own patches placed at their coordinates (always possible; reads every patch).
    A stored thumbnail less than half ``max_side`` (a single-level slide tiled without ``--qc``
    keeps the coarse tissue-mask picture) gives way to the slide file when that opens.

    Returns:
        image: (h, w, 3) uint8; extent: (x0, x1, y1, y0) level-0 pixels, for ``imshow(extent=...)``.
    """
    from PIL import Image

    coords = store.coords
    fp = patch_footprint(store)
    stored, w, h = store.thumbnail, store.attrs.get("slide_width"), store.attrs.get("slide_height")
    src = store.attrs.get("source_path")
    readable = bool(src) and Path(src).is_file()
    has_stored = stored is not None and bool(w) and bool(h)
    if has_stored:
        from simclr_path.store import shrink

        kept = shrink(stored, max_side), (0.0, float(w), float(h), 0.0)
        # only when the slide file can give a picture at least twice as sharp is it worth reading
        if not (readable and max(stored.shape[:2]) < min(max_side, max(w, h)) / 2):
            return kept
    if readable:
        import openslide

        try:
            with openslide.OpenSlide(src) as sl:
                sw, sh = sl.dimensions
                if has_stored and (sw, sh) != (w, h):  # another slide now has that name
                    return kept
                thumb = np.asarray(sl.get_thumbnail((max_side, max_side)).convert("RGB"))
            return thumb, (0.0, float(sw), float(sh), 0.0)
        except (openslide.OpenSlideError, OSError) as exc:
            if has_stored:  # coarse, but right
                return kept
            warnings.warn(  # fall back to the mosaic, always possible
                f"{src}: cannot read the slide ({exc}); drawing a mosaic of the patches instead",
                stacklevel=2,
            )
    x0, y0 = coords.min(axis=0)
    x1, y1 = coords.max(axis=0) + fp
    scale = max(x1 - x0, y1 - y0) / max_side  # level-0 pixels per mosaic pixel
    scale = max(scale, fp / store.patch_size)  # never upsample patches
    W, H = int(np.ceil((x1 - x0) / scale)), int(np.ceil((y1 - y0) / scale))
    canvas = np.full((H, W, 3), 255, dtype=np.uint8)
    side = max(1, round(fp / scale))
    for lo in range(0, len(store), 256):
        batch = store[lo : lo + 256]
        for k, patch in enumerate(batch):
            x, y = coords[lo + k]
            c, r = int((x - x0) / scale), int((y - y0) / scale)
            small = np.asarray(Image.fromarray(patch).resize((side, side), Image.BILINEAR))
            canvas[r : r + side, c : c + side] = small[
                : max(0, min(side, H - r)), : max(0, min(side, W - c))
            ]
    return canvas, (float(x0), float(x0 + W * scale), float(y0 + H * scale), float(y0))


def patch_footprint(store) -> float:
    """Side of one patch in level-0 pixels (``patch_size * mpp_effective / level0_mpp``; stores
    from before ``mpp_effective``: ``mpp``)."""
    mpp, l0 = store.attrs.get("mpp_effective", store.attrs.get("mpp")), store.attrs.get("level0_mpp")
    if mpp and l0:
        return float(store.patch_size) * float(mpp) / float(l0)
    return float(store.patch_size)


# why a model's predictions cannot be drawn as a heatmap
_NO_POSITIVE = ("predictions of a model without a positive class (classify.positive_label null: "
                "every class scored against the rest), so there is no one probability to draw; "
                "classify again with classify.positive_label set to the tumour class")


def _score_class(preds: pd.DataFrame) -> str | None:
    """The positive class of a ``predict`` CSV: the one whose ``prob_<class>`` column the
    ``score`` column copies (the CSV does not name it otherwise); None when not exactly one."""
    score = pd.to_numeric(preds["score"], errors="coerce").to_numpy(dtype=float)
    match = []
    for col in preds.columns:
        if not col.startswith("prob_") or col == "prob_":
            continue
        prob = pd.to_numeric(preds[col], errors="coerce").to_numpy(dtype=float)
        if np.allclose(prob, score, equal_nan=True):
            match.append(col[len("prob_"):])
    return match[0] if len(match) == 1 else None


def _check_predictions_match(rows: pd.DataFrame, store, table: Path, how: str,
                             sid: str) -> None:
    """Refuse predictions (``rows``: one slide's rows of ``table``) made from other patches than
    ``store``'s: the count, and each patch's coordinates (by its ``patch_index`` where the table
    has one). The tables name the embedding file (``file``), whose ``source_store`` names the
    patch store."""
    index = None
    if "patch_index" in rows.columns:
        index = pd.to_numeric(rows["patch_index"], errors="coerce").to_numpy(dtype=float)
        if not (np.isfinite(index) & (index == np.round(index))).all():
            raise SimclrPathError(f"{table}: column patch_index is not all whole numbers{how}")
    why = _patch_mismatch(store, rows[["x", "y"]].to_numpy(dtype=float), index, "the predictions")
    if why is not None:
        raise SimclrPathError(
            f"{store.path}: not the patches the predictions in {table} were made from: {why}; "
            f"{OTHER_TILING.format(sid=sid)}. Give the store that slide's embedding file was made "
            "from ('simclr-path info EMB.h5' shows it as its source store)"
        )


def _pixels_covered(a: float, size: float, origin: float, step: float,
                    slack: float = 0.0) -> tuple[int, int]:
    """The thumbnail pixels [lo, hi) along one axis that a patch from ``a`` to ``a + size``
    (slide pixels), widened by ``slack`` on each side (narrowed where negative), covers: those whose centres lie in it, so
    that patches side by side share no pixel (a border inside a pixel gave it the mean of two
    patches, a value no patch has); a patch narrower than a pixel gets the one that holds its
    centre."""
    lo = int(np.ceil((a - slack - origin) / step - 0.5))
    hi = int(np.ceil((a + size + slack - origin) / step - 0.5))
    if hi <= lo:
        lo = int(np.floor((a + size / 2 - origin) / step))
        hi = lo + 1
    return lo, hi


@plain_text
def plot_heatmap(
    classify: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    slide_id: str | None = None,
    force: bool = False,
    max_side: int = 1024,
    run_name: str | None = None,
) -> Path:
    """SCC probability of every patch drawn over the slide thumbnail (viridis, with colour bar).

    Args:
        classify: a ``classify`` results folder (out-of-fold patch predictions) or a CSV from
            ``predict``.
        store: the slide's patch store (coordinates, and the thumbnail or mosaic).
        slide_id: which slide (default: the store's slide id).
        max_side: longest side of the drawn thumbnail, in pixels (at least 64).
        run_name: the run named in the title (:func:`with_run`).
    """
    from simclr_path.store import PatchStore

    max_side = check_int(max_side, "plot_heatmap", "max_side", minimum=64)
    check_figure_outputs({"out": out}, {"classify": classify, "store": store}, force)
    src = Path(classify)
    if not src.is_dir():
        need_file(src, "classify results folder or predict CSV")
    train_only: set[str] = set()  # slides a samples-sheet split kept for training
    if src.is_dir():
        table, how = src / "predictions_patches.csv", "; rerun 'simclr-path classify' with --force"
        metrics, preds, _ = _read_classify_dir(src, held_out_only=False)
        bad = [c for c in ("x", "y") if not pd.api.types.is_numeric_dtype(preds.get(c, ""))]
        if bad:
            raise SimclrPathError(f"{table}: no numeric column {bad[0]} (patch coordinates){how}")
        train_only = set(preds.loc[preds["fold"] < 0, "slide_id"].astype(str))
        pos = metrics["task"].get("positive")
    else:
        table, how = src, "; give a CSV written by 'simclr-path predict'"
        try:  # a macro model's predictions: say so, rather than that predict did not write it
            header = set(pd.read_csv(src, nrows=0).columns)
        except (ValueError, OSError, UnicodeDecodeError):
            header = set()  # _read_table says what is wrong with the file
        if "score" not in header and any(str(c).startswith("prob_") for c in header):
            raise SimclrPathError(f"{src}: {_NO_POSITIVE}")
        preds = _read_table(src, {"slide_id", "x", "y", "score"}, numeric={"x", "y", "score"},
                            how=how)
        if "level" in preds.columns:
            preds = preds[preds["level"] == "patch"]
        _check_finite(preds, {"x", "y", "score"}, src, how)  # slide rows have no x, y
        pos = _score_class(preds)
    if "score" not in preds.columns:
        raise SimclrPathError(f"{src}: {_NO_POSITIVE}")
    st = PatchStore(store)
    if len(st) and (np.asarray(st.coords)[:, 0] < 0).all():  # first: no --slide-id can help
        raise SimclrPathError(
            f"{store}: patches have no slide coordinates (imported tiles); heatmaps need a "
            "store made by 'simclr-path tile'"
        )
    if slide_id is not None and st.slide_id and str(slide_id) != str(st.slide_id):
        raise SimclrPathError(f"{store}: holds slide {st.slide_id!r}, not {slide_id!r}; give the "
                              f"patch store of slide {slide_id!r} (or leave out --slide-id)")
    sid = slide_id or st.slide_id
    rows = preds[preds["slide_id"].astype(str) == sid]
    if not rows.empty:  # every row of the slide, a training slide's too: the store must match
        _check_predictions_match(rows, st, table, how, sid)
    if src.is_dir():  # only held-out predictions are drawn
        rows = rows[rows["fold"] >= 0]
    # a slide without held-out predictions gets its picture and the reason, not an error: the
    # workflow draws one heatmap per slide, and a blank slide must not fail the whole run
    reason = ("no tissue patches" if not len(st) else
              "a training slide of the samples-sheet split" if str(sid) in train_only else None)
    if rows.empty and reason:
        return _heatmap_unavailable(st, str(sid), reason, out, force, max_side, run_name)
    if rows.empty:
        raise SimclrPathError(
            f"{src}: no patch predictions for slide {sid!r}; pass --slide-id or the right store"
        )
    thumb, extent = slide_thumbnail(st, max_side=max_side)
    fp = patch_footprint(st)
    x0, x1, y1, y0 = extent
    h, w = thumb.shape[:2]
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    # overlapping patches (stride < patch size) share their pixels: the mean of their scores,
    # not whichever patch came last
    total, count = np.zeros((h, w)), np.zeros((h, w))
    # grid coordinates are whole level-0 pixels and the footprint is not, so neighbours overlap
    # or leave a gap by up to a pixel: the mean is taken over each patch less a pixel at its
    # borders (a rounding overlap is no overlap), and a thumbnail pixel whose centre lies within
    # a pixel of a border takes one neighbour's score (a gap left blank stripes across the map)
    near = np.full((h, w), np.nan)
    for x, y, s in zip(rows["x"].to_numpy(), rows["y"].to_numpy(), rows["score"].to_numpy()):
        if not np.isfinite(s):
            continue
        c0, c1 = _pixels_covered(x, fp, x0, sx, slack=-1.0)
        r0, r1 = _pixels_covered(y, fp, y0, sy, slack=-1.0)
        total[max(r0, 0) : r1, max(c0, 0) : c1] += s
        count[max(r0, 0) : r1, max(c0, 0) : c1] += 1
        c0, c1 = _pixels_covered(x, fp, x0, sx, slack=1.0)
        r0, r1 = _pixels_covered(y, fp, y0, sy, slack=1.0)
        near[max(r0, 0) : r1, max(c0, 0) : c1] = s
    heat = np.divide(total, count, out=near, where=count > 0)
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    # a long class name ran over the colour bar and the other panel's title: cut in the middle
    label = f"P({shorten(str(pos), 30)})" if pos else "P(positive class)"
    short = f"P({shorten(str(pos), 20)})" if pos else label
    # what the slide is and whether it was held out, where a classify folder says so; the
    # scores of a predict file may be the final model's on a slide it was trained on
    known = "\n(scored by 'predict': held out only\nif not among the model's training slides)"
    if src.is_dir() and "label" in rows.columns:
        folds = sorted(set(rows["fold"].astype(int)))
        # counted from 0 as the predictions' fold column is: the range says so
        n_folds = metrics["task"].get("n_folds")
        of = f" of 0-{n_folds - 1}" if isinstance(n_folds, int) and n_folds > 1 else ""
        held = ("a test slide of the samples-sheet split"
                if metrics["task"].get("evaluation") == "split"
                else f"held out in fold {', '.join(map(str, folds))}{of}")
        known = (f"\n({shorten(', '.join(sorted(set(rows['label'].astype(str)))), 30)} slide,"
                 f" {held})")
    extent_shown, unit = _extent_mm(st, extent)
    # the panels' height follows the slide's shape, within limits: a very tall slide is drawn
    # narrower rather than as a poster; a wide one (a needle biopsy, 6:1) has its panels one
    # above the other, where side by side each was an inch high
    if w > 2 * h:
        fig, axes = new_figure(2, 1, figsize=(12, 2 * min(11.0 * h / w, 5.5) + 2.0))
    else:
        fig, axes = new_figure(1, 2, figsize=(12, min(5.5 * h / max(w, 1), 11) + 1.2))
    axes[0].imshow(thumb, extent=extent_shown)
    # the id once, above both panels: a TCGA-style id in each panel's title ran into the other
    title = fig.suptitle(with_run(f"slide {sid}", run_name), fontsize=12)
    axes[0].set_title(f"slide{known}", wrap=True)
    # the probabilities over the slide in grey: over its H&E colours viridis would mix with the
    # stain and read as other values
    axes[1].imshow(thumb.mean(axis=2), extent=extent_shown, cmap="gray", vmin=0, vmax=255)
    im = axes[1].imshow(
        np.ma.masked_invalid(heat),
        extent=extent_shown,
        cmap="viridis",
        vmin=0,
        vmax=1,
        alpha=0.75,
        interpolation="nearest",
    )
    axes[1].set_title(f"{label} per patch\n(slide mean {rows['score'].mean():.2f})")
    for ax in axes:
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
    # the bar gets an axis cut from the image's own (aspect-kept) box: fig.colorbar(ax=...)
    # sized it to the panel's original box, so on a wide slide it stood above the image and
    # over the title. The left panel gets an empty one, so both pictures have the same size
    for ax, bar in zip(axes, (False, True)):
        cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.1)
        if bar:  # opaque: at the map's alpha the bar's colours were paler than the map's
            from matplotlib.cm import ScalarMappable

            fig.colorbar(ScalarMappable(norm=im.norm, cmap=im.cmap), cax=cax, label=short)
        else:
            cax.set_axis_off()
    st.close()
    # the id just above the panels' titles: the square panels leave part of the figure's
    # height empty, and at the figure's top the id stood an inch above them
    fig.draw_without_rendering()  # the aspect-kept panel boxes, without drawing the images
    renderer = fig.canvas.get_renderer()
    top = max(ax.get_tightbbox(renderer).y1 for ax in axes) / fig.bbox.height  # titles too
    title.set_y(min(0.98, top + 0.12 / fig.get_figheight()))
    title.set_verticalalignment("bottom")
    return save_figure(fig, out, force=force)
