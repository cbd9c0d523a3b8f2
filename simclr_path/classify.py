"""Linear SCC classifier on patch embeddings, evaluated at patient level (``simclr-path classify``).

The linear probe of SimCLR's evaluation protocol (Chen et al. 2020): a StandardScaler and an
L2-regularised logistic regression with balanced class weights, its ``C`` chosen by inner
patient-grouped cross-validation. The outer evaluation is patient-grouped stratified K-fold over
slides (``StratifiedGroupKFold``), or the samples sheet's ``split`` column; no patient is ever on
both sides of a split, since patches and slides of one patient are correlated and leakage
inflates every score.

Two ways to supply labels:

* a samples sheet (slide label and patient per ``slide_id``): each embedding file is one slide;
* imported patch sets (``import-patches``): the embedding file carries ``/labels`` and
  ``/groups``; each group (patient / source image) is the "slide" unit and the patient.

Outputs (one folder, written atomically): ``metrics.json``, ``predictions_patches.csv``,
``predictions_slides.csv``, ``model.npz`` + ``model.json`` (the final model fitted on all data,
plain arrays, no pickle) and ``predict`` scores new slides with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simclr_path import __version__
from simclr_path.config import CLASSIFY_PROBE_KEYS, ClassifyConfig, section_cfg
from simclr_path.errors import SimclrPathError
from simclr_path.outputs import (
    as_paths,
    atomic_dir,
    atomic_output,
    check_apart,
    check_can_write,
    check_distinct,
)
from simclr_path.samples import case_clash
from simclr_path.store import BAD_FEATURES, EmbeddingStore, unusable_rows

# what this command writes into its results folder: --force replaces only a folder holding one
RESULT_FILES = ("metrics.json", "predictions_patches.csv", "predictions_slides.csv", "model.npz", "model.json")

MODEL_FORMAT_VERSION = 1  # the one LinearModel.load reads
MODEL_KIND = "standard_scaler+logistic_regression"
SCALAR_KEYS = (
    "auroc",
    "average_precision",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "f1",
)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class PatchTable:
    """All patches of the run: ``X`` (N, D) float32 features, ``y`` (N,) class index, and per patch
    its slide, patient, index in its file and level-0 (x, y); ``slides`` has one row per slide."""

    X: np.ndarray
    y: np.ndarray
    slide: np.ndarray
    patient: np.ndarray
    patch_index: np.ndarray
    coords: np.ndarray
    classes: list[str]
    positive: int | None
    slides: pd.DataFrame  # slide_id, patient_id, label, y, split (optional)
    encoder_sha256: str | None
    layer: str | None
    arch: str | None
    image_size: int | None = None  # input size of the file whose tissue scale all files share
    tta: bool = False  # embedded with rotation/flip test-time augmentation (embed.tta)
    source: np.ndarray | None = None  # (N,) index of each patch's file in the list given
    files: list[str] | None = None  # the files given, as given (``file`` of the patch tables)
    encoder: str | None = None  # encoder path the first file was embedded with (for messages)
    input_mpp: float | None = None  # um of tissue per input pixel (None: not every file knows)
    fine_tuned_from: str | None = None  # the encoder was fine-tuned with labels from this one
    # what a "patient" is in messages: a tile set's source image (labels from the files)
    grouped_by: str = "patient"


def _tta(attrs: dict[str, Any]) -> bool:
    """An embedding file's ``tta`` attribute (``embed.tta``); files from before it have none."""
    return bool(attrs.get("tta", False))


_NEGATIONS = frozenset({"non", "not", "no", "without"})  # "non_SCC" names the other class


def _words(name: str) -> list[str]:
    """A class name's words, lower case: ``lung_scc`` and ``LungSCC`` -> ``["lung", "scc"]``."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", str(name))]


def find_positive(classes: Sequence[str], positive_label: str) -> int | None:
    """Index of the positive (SCC) class: exact case-insensitive name, else the one name holding
    the label as whole words (``lung_scc`` or ``LungSCC`` for ``SCC``) and no negation
    (``non_SCC`` is the other class); None when no class or more than one matches."""
    low = [str(c).lower() for c in classes]
    key = positive_label.lower()
    if key in low:
        return low.index(key)
    want = _words(positive_label)
    if not want:
        return None

    def holds(name: str) -> bool:
        words = _words(name)
        if _NEGATIONS.intersection(words):
            return False
        return any(words[i : i + len(want)] == want for i in range(len(words) - len(want) + 1))

    hits = [i for i, c in enumerate(classes) if holds(c)]
    return hits[0] if len(hits) == 1 else None


def positive_index(classes: Sequence[str], positive_label: str | None,
                   source: str = "the data") -> int | None:
    """:func:`find_positive`, or a one-line error where the configured label names no class.

    None only for ``positive_label`` null with more than two classes (macro one-vs-rest
    scores): a mistyped label must not switch the headline AUROC to another quantity.
    """
    names = ", ".join(map(str, classes))
    if positive_label is None:
        if len(classes) > 2:
            return None
        raise SimclrPathError(
            f"classify.positive_label is null, but {source} has two classes ({names}); set it "
            "to the positive (tumour) one")
    positive = find_positive(classes, positive_label)
    if positive is None:
        macro = (", or to null for macro one-vs-rest scores over all classes"
                 if len(classes) > 2 else "")
        raise SimclrPathError(
            f"classify.positive_label {positive_label!r} is not one of the classes of {source} "
            f"({names}); set it to the one that is the positive (tumour) class{macro}")
    return positive


def _check_finite(s: EmbeddingStore) -> None:
    """Refuse NaN, infinite or implausibly large features: sklearn would stop with a traceback
    (or, near float32's limit, print pages of overflow warnings), and an argmax over a NaN row
    names the first class (``embed`` never writes them; a damaged or foreign file)."""
    bad = unusable_rows(s.features)
    if bad.any():
        raise SimclrPathError(
            f"{s.path}: {int(bad.sum())} patch row(s) hold {BAD_FEATURES} (first: row "
            f"{int(np.flatnonzero(bad)[0])}); embed the slide again (simclr-path embed ... --force)"
        )


def _check_repeats(s: Any) -> None:
    """Refuse a slide's file whose patches repeat coordinates: ``tile`` writes each position
    once, so repeats are a damaged or concatenated file, and they would count twice in training,
    in the patch metrics and in the top-k slide score. Imported tiles (no slide coordinates)
    are not compared."""
    coords = np.asarray(getattr(s, "coords", np.empty((0, 2))))
    if (s.attrs.get("store_kind") == "patches" or getattr(s, "labels", None) is not None
            or coords.ndim != 2 or len(coords) < 2 or (coords < 0).any()):
        return
    _, first, counts = np.unique(coords, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        x, y = coords[first[counts > 1][0]]
        raise SimclrPathError(
            f"{s.path}: {int((counts - 1).sum())} patch row(s) repeat the coordinates of another "
            f"(first: x={int(x)}, y={int(y)}); tile and embed write each patch of a slide "
            "once, so this file is damaged or joined from two: make it again (simclr-path tile "
            "or embed ... --force)"
        )


def _load_files(
    paths: Sequence[str | os.PathLike], opener: Callable[[Any], Any], what: str
) -> tuple[list[EmbeddingStore], int]:
    """Open every file and refuse a set that does not share one feature space; returns the
    stores and the index of the reference file (:func:`_check_tissue_scale`)."""
    if not paths:
        raise SimclrPathError(f"no {what}s given; pass one or more (e.g. --embeddings EMB.h5)")
    stores = [opener(p) for p in paths]
    check_distinct([s.path for s in stores], what)  # imported patch sets have no slide id check
    dims = {s.features.shape[1] if s.features.ndim == 2 else -1 for s in stores}
    if len(dims) > 1:
        by_dim = {}
        for s in stores:
            by_dim.setdefault(s.features.shape[1], s.path)
        raise SimclrPathError(
            f"embedding files have different feature sizes {sorted(by_dim)} (e.g. "
            f"{', '.join(str(p) for p in by_dim.values())}); embed every slide with the same "
            "encoder and layer"
        )

    for s in stores:
        _check_finite(s)
        _check_repeats(s)

    def attr(s: EmbeddingStore, key: str) -> Any:
        return _tta(s.attrs) if key == "tta" else s.attrs.get(key)

    for key in ("encoder_sha256", "layer", "tta"):
        vals = [attr(s, key) for s in stores]
        if len(set(vals)) > 1:
            # name a file off the most common value (the first file may be the odd one)
            common = max(set(vals), key=lambda v: (vals.count(v), -vals.index(v)))
            odd = next(s for s, v in zip(stores, vals) if v != common)
            ref = next(s for s, v in zip(stores, vals) if v == common)
            raise SimclrPathError(
                f"{odd.path}: {key} {attr(odd, key)!r} differs from {vals.count(common)} of "
                f"{len(stores)} files ({common!r}, e.g. {ref.path}); embed every slide with the "
                "same encoder, layer and --tta setting"
            )
    ref = _check_tissue_scale(stores)
    seen: dict[str, Path] = {}
    ungrouped: dict[str, Path] = {}
    for s in stores:  # imported patch sets are split by their groups, not their slide id
        if s.attrs.get("store_kind") != "patches" and s.labels is None:
            _note_slide(seen, s, what)
        elif _ungrouped(s):
            # its tiles are named SET:i (patch_set_units): two sets of one name (the import's
            # file stem, tiles.h5 in two folders) would merge tile i of each into one "slide"
            if s.slide_id in ungrouped:
                raise SimclrPathError(
                    f"{s.path}: tile set {s.slide_id!r} was already given in "
                    f"{ungrouped[s.slide_id]}; without groups their tiles are named "
                    f"'{s.slide_id}:0', '{s.slide_id}:1' ... alike and would be merged; pass each "
                    "set once, or import one under another --out name (or with --groups)")
            ungrouped[s.slide_id] = s.path
    return stores, ref


def _ungrouped(s: Any) -> bool:
    """Whether an imported tile set has no groups (each tile is then its own unit)."""
    return s.groups is None or all(g == "" for g in s.groups)


def patch_set_units(s: Any) -> np.ndarray:
    """The "slide" of each patch of an imported patch set: its group (source image or patient),
    or the patch itself where the set has no groups (``SLIDE_ID:i``)."""
    if _ungrouped(s):
        return np.array([f"{s.slide_id}:{i}" for i in range(len(s))], dtype=object)
    return np.asarray(s.groups, dtype=object)


def _warn_shared_groups(sets: Sequence[tuple[Path, Sequence[str] | None]]) -> None:
    """Warn where tile sets (path, groups) share a group name: their tiles are then one source
    image, which is right for one image split over two folders, but the same set imported twice
    would count its tiles twice (where a slide given twice is refused)."""
    owner: dict[str, Path] = {}
    for path, groups in sets:
        for g in dict.fromkeys(groups if groups is not None else ()):
            first = owner.setdefault(g, path) if g != "" else path  # "": no groups, one per tile
            if first != path:
                warnings.warn(
                    f"{path} and {first} share group {g!r} (and maybe others): their tiles "
                    "count as one source image; if these are the same tiles imported twice, "
                    "pass each set once", stacklevel=3)
                return


def _note_slide(seen: dict[str, Path], s: Any, what: str) -> None:
    """Record ``s``'s slide in ``seen``, refusing one given before: a slide given twice would be
    counted (``classify``) or scored (``predict``) twice."""
    if s.slide_id in seen:
        raise SimclrPathError(
            f"{s.path}: slide {s.slide_id!r} was already given in {seen[s.slide_id]}; "
            f"pass each slide's {what} once"
        )
    seen[s.slide_id] = s.path


def _same_scale(size: float, exact: float, ref_size: float) -> bool:
    """Whether an embedding input of ``size`` px shows a reference's tissue scale, ``exact`` px
    being the size that shows it exactly and ``ref_size`` the reference's own size. embed rounds
    its sizes to a multiple of 8 (``embed.fixres_size``), so each side may be up to 4 px off: 4
    px here, plus the reference's 4 px scaled to this size, plus half a pixel of float noise.
    ``classify`` (between its files) and ``predict`` (against the classifier) both use this."""
    return abs(size - exact) <= 4.0 + 4.0 * exact / ref_size + 0.5


def _fitting_size(attrs: dict[str, Any], scale: float) -> float:
    """Input size at which an embedding file's patches show ``scale`` um of tissue per pixel."""
    return float(attrs["patch_size"]) * float(attrs["mpp"]) / float(scale)


def _rescale_fix(attrs: dict[str, Any], scale: float) -> str:
    """How to embed a file's patches at ``scale`` um of tissue per input pixel: the input size
    that shows it, or, where that is more than the stored pixels (embed would upsample blurred
    patches), tiling at that mpp or finer."""
    exact = _fitting_size(attrs, scale)
    size = int(attrs["patch_size"])
    if exact > size + 4:  # (embed's rounding to 8 px)
        return (f"its {size} px patches at {float(attrs['mpp']):g} um/px have fewer pixels than "
                f"that scale needs ({round(exact)} px): tile the slide at --mpp {scale:.3g} or "
                "finer, then embed it without --image-size")
    return (f"embed it with --image-size {max(8, round(exact))}, the size that shows its {size} "
            f"px patches at {scale:.3g} um per pixel")


def _check_tissue_scale(stores: Sequence[Any]) -> int:
    """Refuse files embedded at different tissue scales; returns the reference file's index.

    What must agree is the micrometres of tissue per input pixel (:func:`input_mpp`), not the
    pixel size: embed scales its input size with the patches' field of view (another patch size
    or mpp gives another ``image_size`` at one scale). The reference is the file most others
    agree with (the first of a tie). Where any file lacks the scale (no mpp recorded: imported
    tiles, older files) only equal ``image_size`` can be required.
    """
    scales = [input_mpp(s.attrs) for s in stores]
    sizes = [s.attrs.get("image_size") for s in stores]
    if any(v is None for v in scales):
        odd = next((s for s in stores if s.attrs.get("image_size") != sizes[0]), None)
        if odd is not None:
            raise SimclrPathError(
                f"{odd.path}: image_size {odd.attrs.get('image_size')!r} differs from "
                f"{stores[0].path} ({sizes[0]!r}) and not every file records its tissue scale "
                "(patch_size, mpp) to show they agree; embed every slide with the same image size"
            )
        return 0
    m = np.asarray(scales, dtype=float)
    n = np.asarray(sizes, dtype=float)
    best: tuple[int, int, np.ndarray] | None = None
    for i in sorted(np.unique(np.round(m, 9), return_index=True)[1]):
        ok = _same_scale(n, n * m / m[i], n[i])
        if best is None or ok.sum() > best[0]:
            best = (int(ok.sum()), int(i), ok)
    assert best is not None
    agree, i, ok = best
    if ok.all():
        return i
    odd = [stores[j] for j in np.flatnonzero(~ok)]
    ref, o = stores[i], odd[0]
    others = f" and {agree - 1} other file(s)" if agree > 1 else ""
    more = (f"; {len(odd) - 1} more file(s) differ too ({', '.join(str(s.path) for s in odd[1:4])}"
            f"{', ...' if len(odd) > 4 else ''})" if len(odd) > 1 else "")
    raise SimclrPathError(
        f"{o.path}: embedded at {o.attrs['image_size']} px, {input_mpp(o.attrs):.3g} um of "
        f"tissue per input pixel, but {ref.path}{others} at {m[i]:.3g} um per pixel "
        f"({ref.attrs['image_size']} px); one classifier needs one tissue scale: "
        f"{_rescale_fix(o.attrs, m[i])}{more}"
    )


def load_table(
    embedding_paths: Sequence[str | os.PathLike],
    samples: str | os.PathLike | pd.DataFrame | None,
    cfg: ClassifyConfig,
    opener: Callable[[Any], Any] = EmbeddingStore,
    what: str = "embedding file",
) -> PatchTable:
    """Read embedding files and attach labels and patients (from the sheet or from the files).

    ``opener`` maps a path to a reader with ``features`` (N, D), ``coords``, ``labels``,
    ``groups``, ``label_names``, ``attrs``, ``slide_id`` and ``path`` (an
    :class:`~simclr_path.store.EmbeddingStore` by default; ``finetune`` passes patch stores with
    zero-width features, named ``what`` in messages). ``source`` of the result maps each patch
    to the index of its file.
    """
    from simclr_path.samples import read_samples, validate_samples

    stores, ref = _load_files(embedding_paths, opener, what)
    parts: dict[str, list] = {
        k: [] for k in ("X", "y", "slide", "patient", "idx", "coords", "src")
    }
    dim = stores[0].features.shape[1]
    if samples is not None:
        if isinstance(samples, pd.DataFrame):
            sheet = validate_samples(samples, labels=cfg.labels, check_files=False)
            where = "samples table"
        else:
            sheet = read_samples(samples, labels=cfg.labels, check_files=False)
            where = str(samples)
        present = set(sheet["label"])
        classes = [c for c in cfg.labels if c in present]
        by_id = sheet.set_index("slide_id")
        rows = []
        given = {s.slide_id for s in stores}  # an empty file was given: not "no file"
        for i_file, s in enumerate(stores):
            sid = s.slide_id
            if sid not in by_id.index:
                raise SimclrPathError(
                    f"{s.path}: {what} is for slide {sid!r}, which is not in the samples "
                    f"sheet {where}; add a row for it or leave the file out"
                )
            if sid in {r["slide_id"] for r in rows}:
                raise SimclrPathError(
                    f"{s.path}: slide {sid!r} is given twice; pass each {what} once"
                )
            r = by_id.loc[sid]
            n = len(s)
            if n == 0:
                warnings.warn(
                    f"{s.path}: slide {sid!r} has no patches; it is left out", stacklevel=2
                )
                continue
            yi = classes.index(r["label"])
            rows.append(
                {
                    "slide_id": sid,
                    "patient_id": r["patient_id"],
                    "label": r["label"],
                    "y": yi,
                    **({"split": r["split"]} if "split" in sheet.columns else {}),
                }
            )
            parts["X"].append(s.features)
            parts["y"].append(np.full(n, yi))
            parts["slide"].append(np.full(n, sid, dtype=object))
            parts["patient"].append(np.full(n, r["patient_id"], dtype=object))
            parts["idx"].append(np.arange(n))
            parts["coords"].append(s.coords)
            parts["src"].append(np.full(n, i_file))
        unused = sorted(set(sheet["slide_id"]) - given)
        if unused:
            warnings.warn(
                f"{len(unused)} slide(s) of the samples sheet have no {what} and are left out "
                f"(first: {unused[0]})",
                stacklevel=2,
            )
        slides = pd.DataFrame(rows)
        given_labels = set(slides["label"]) if rows else set()
        lacking = [c for c in classes if c not in given_labels]
        if rows and lacking:  # else make_folds would ask for "more patients" of that class
            ids = sheet.loc[sheet["label"] == lacking[0], "slide_id"]
            empty = sorted(set(ids) & given)  # given, but without patches
            if empty:
                raise SimclrPathError(
                    f"{where}: every {what} given of class {lacking[0]!r} has no patches (e.g. "
                    f"{empty[0]!r}); tile those slides again (a lower --min-tissue?) or add "
                    "slides of that class with tissue"
                )
            raise SimclrPathError(
                f"{where}: lists slides of class {lacking[0]!r} (e.g. {ids.iloc[0]!r}) but none "
                f"of the {what}s given is one of them; pass their {what}s too"
            )
        source = f"the samples sheet {where}"
    else:
        classes = []
        source = f"the {what}s"
        _warn_shared_groups([(s.path, s.groups) for s in stores])
        for s in stores:
            if s.labels is None or not s.label_names:
                raise SimclrPathError(
                    f"{s.path}: {what} has no patch labels; pass --samples SHEET "
                    "with the slide labels and patients"
                )
            classes += [c for c in s.label_names if c not in classes]
            clash = case_clash(classes)
            if clash:
                raise SimclrPathError(
                    f"{s.path}: class {clash[1]!r} differs from class {clash[0]!r} of "
                    f"{', '.join(str(o.path) for o in stores if o.label_names and clash[0] in o.label_names)} "
                    "only in case; they would be two classes (one 'the rest' of the other): "
                    "import the tiles with one spelling")
        for i_file, s in enumerate(stores):
            n = len(s)
            if n == 0:
                continue
            lab = np.asarray(s.labels, dtype=np.int64)
            if lab.min() < 0 or lab.max() >= len(s.label_names):
                raise SimclrPathError(
                    f"{s.path}: labels outside label_names; re-import the patches"
                )
            remap = np.array([classes.index(c) for c in s.label_names])
            if _ungrouped(s):
                warnings.warn(
                    f"{s.path}: patches have no groups; every patch is its own group, so "
                    "near-duplicate "
                    "patches may land on both sides of a split (import with --groups)",
                    stacklevel=2,
                )
            groups = patch_set_units(s)
            parts["X"].append(s.features)
            parts["y"].append(remap[lab])
            parts["slide"].append(groups)
            parts["patient"].append(groups)
            parts["idx"].append(np.arange(n))
            parts["coords"].append(s.coords)
            parts["src"].append(np.full(n, i_file))
        if not parts["X"]:
            raise SimclrPathError(f"every {what} is empty; nothing to classify")
        y_all = np.concatenate(parts["y"])
        g_all = np.concatenate(parts["slide"])
        df = pd.DataFrame({"slide_id": g_all, "y": y_all})
        # a group's label is its most common patch label (groups are single-class in practice)
        slide_y = df.groupby("slide_id", sort=False)["y"].agg(
            lambda v: int(np.bincount(v).argmax())
        )
        mixed = df.groupby("slide_id", sort=False)["y"].nunique()
        if (mixed > 1).any():
            warnings.warn(
                f"{int((mixed > 1).sum())} group(s) hold patches of several classes (e.g. "
                f"{mixed[mixed > 1].index[0]!r}); each counts as its majority class in folds, "
                "slide-level metrics and label fractions; give each source image or patient its "
                "own group per class if that is not meant",
                stacklevel=2,
            )
            # a class can lose every group to that rule (ties go to the first class): the
            # grouped folds' "only N patients" would then be wrong advice
            holding = df.groupby("y")["slide_id"].nunique()
            for i, c in enumerate(classes):
                n_major = int((slide_y == i).sum())
                if n_major < 2 <= int(holding.get(i, 0)):
                    raise SimclrPathError(
                        f"class {c!r}: {int(holding[i])} groups hold its patches, but it is the "
                        f"majority class of only {n_major} (a group of several classes counts as "
                        "its most common one, a tie as the first), and grouped folds need 2; "
                        "give each source image or patient its own group per class")
        slides = pd.DataFrame(
            {
                "slide_id": slide_y.index,
                "patient_id": slide_y.index,
                "label": [classes[i] for i in slide_y.values],
                "y": slide_y.values,
            }
        )
    if slides.empty:
        raise SimclrPathError(f"every {what} is empty; nothing to classify")
    if len(classes) < 2:
        raise SimclrPathError(
            f"only one class ({', '.join(map(repr, classes))}) in {source}; a classifier "
            "needs patches of two or more classes"
        )
    positive = positive_index(classes, cfg.positive_label, source)
    first = stores[0].attrs
    scale = stores[ref].attrs  # the tissue scale every file shares (_check_tissue_scale)
    y = np.concatenate(parts["y"]).astype(np.int64)
    return PatchTable(
        X=np.concatenate(parts["X"]).astype(np.float32, copy=False).reshape(len(y), dim),
        y=y,
        slide=np.concatenate(parts["slide"]),
        patient=np.concatenate(parts["patient"]),
        patch_index=np.concatenate(parts["idx"]),
        coords=np.concatenate(parts["coords"]).reshape(-1, 2),
        classes=list(classes),
        positive=positive,
        slides=slides.reset_index(drop=True),
        encoder_sha256=first.get("encoder_sha256"),
        layer=first.get("layer"),
        arch=first.get("arch"),
        image_size=scale.get("image_size"),
        tta=_tta(first),
        source=np.concatenate(parts["src"]).astype(np.int64),
        files=[str(s.path) for s in stores],
        encoder=first.get("encoder"),
        input_mpp=input_mpp(scale),
        fine_tuned_from=first.get("fine_tuned_from"),
        grouped_by="patient" if samples is not None else "source image",
    )


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def patients_per_class(slides: pd.DataFrame, classes: Sequence[str]) -> dict[str, int]:
    """Number of distinct patients with at least one slide of each class."""
    return {c: int(slides.loc[slides["label"] == c, "patient_id"].nunique()) for c in classes}


def split_leak(slides: pd.DataFrame) -> str | None:
    """A patient with slides on both sides of a samples sheet's ``split``, in words, or None."""
    test = (slides["split"] == "test").to_numpy()
    both = set(slides.loc[test, "patient_id"]) & set(slides.loc[~test, "patient_id"])
    if both:
        return (f"samples sheet split: patient {min(both)!r} has slides in both train and "
                "test; put all slides of a patient on one side")
    return None


def split_problem(slides: pd.DataFrame, classes: Sequence[str]) -> str | None:
    """Why a samples sheet's ``split`` column (``train`` / ``test`` per slide; ``slides`` has
    ``patient_id``, ``label``, ``split``) cannot evaluate ``classes``, or None (classify: the
    slides with patches; the workflow: the whole sheet, before any is tiled)."""
    leak = split_leak(slides)
    if leak:
        return leak
    test = (slides["split"] == "test").to_numpy()
    if not test.any():  # (the sheet's own check refuses a split without test slides)
        return ("samples sheet split: none of the slides with patches is a test slide; pass the "
                "stores of the 'test' slides too (slides without patches are left out)")
    missing = [c for c in classes if c not in set(slides.loc[~test, "label"])]
    if missing:
        return (f"samples sheet split: no training slide of class {missing[0]!r}; move some of "
                "its patients to train")
    return None


FOLD_DRAWS = 20  # stratified draws (seeds seed, seed+1 ...) before random patient partitions


def make_folds(
    slides: pd.DataFrame, classes: Sequence[str], cfg: ClassifyConfig
) -> tuple[np.ndarray, str]:
    """Assign every slide to an outer test fold (``fold`` array aligned with ``slides``).

    Patient-grouped stratified K-fold with ``min(cfg.folds, patients in the smallest class)``
    folds, or the ``split`` column (fold 0 = the test slides, -1 = train only). Every fold's
    training side must hold every class: the stratified draw of ``cfg.seed`` is kept when it
    does (nearly always), else the next of ``FOLD_DRAWS`` seeds, else the first balanced random
    partition of the patients that does; with none, the reason is raised.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    # a patient on both sides of a split first: the thing to fix, even where it is also its
    # class's only patient (then too few patients, then the split's other problems)
    leak = split_leak(slides) if "split" in slides.columns else None
    if leak:
        raise SimclrPathError(leak)
    counts = patients_per_class(slides, classes)
    scarce = {c: n for c, n in counts.items() if n < 2}
    if scarce:
        c, n = next(iter(scarce.items()))
        raise SimclrPathError(
            f"class {c!r} has slides from only {n} patient(s); patient-grouped evaluation needs "
            "at least 2 patients per class (one to train on, one to test on), because a "
            "patient is never on both sides of a split; add slides from more patients"
        )
    if "split" in slides.columns:
        problem = split_problem(slides, classes)
        if problem:
            raise SimclrPathError(problem)
        test = (slides["split"] == "test").to_numpy()
        absent = [c for c in classes if c not in set(slides.loc[test, "label"])]
        if absent:  # the run is still of use (patch scores, heatmaps); its headline is not
            warnings.warn(f"samples sheet split: no test slide of class {absent[0]!r}, so the "
                          "test set's AUROC and balanced accuracy are undefined (null in "
                          "metrics.json); put slides of every class on the test side",
                          stacklevel=2)
        if cfg.folds != ClassifyConfig().folds:  # set on purpose, and silently not used
            warnings.warn(f"classify.folds {cfg.folds} is not used: the samples sheet's split "
                          "column chooses the test slides (one model, trained on the 'train' "
                          "slides)", stacklevel=2)
        return np.where(test, 0, -1), "split"
    k = min(cfg.folds, min(counts.values()))
    if k < cfg.folds:
        warnings.warn(
            f"using {k} outer folds instead of {cfg.folds}: the smallest class has {k} patients",
            stacklevel=2,
        )
    first = None
    for draw in range(FOLD_DRAWS):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed + draw)
        fold = np.full(len(slides), -1)
        for i, (_, te) in enumerate(
            splitter.split(np.zeros(len(slides)), slides["y"], groups=slides["patient_id"])
        ):
            fold[te] = i
        if _lacking_class(slides, classes, fold) is None:
            return fold, f"grouped_{k}fold"
        first = fold if first is None else first
    # patients with slides of several labels can defeat the stratified splitter's greedy
    # placement in every draw ({P1: SCC + normal} | {P2: SCC, P3: normal} is a valid split it
    # never finds): balanced random partitions of the patients, the first valid one
    rng = np.random.default_rng(cfg.seed)
    patients = np.unique(slides["patient_id"].to_numpy())
    for _ in range(FOLD_DRAWS * 50):
        of_patient = dict(zip(rng.permutation(patients), np.arange(len(patients)) % k))
        fold = slides["patient_id"].map(of_patient).to_numpy()
        if _lacking_class(slides, classes, fold) is None:
            return fold, f"grouped_{k}fold"
    raise _no_training_class_error(slides, _lacking_class(slides, classes, first))


def _lacking_class(slides: pd.DataFrame, classes: Sequence[str],
                   fold: np.ndarray) -> tuple[int, str] | None:
    """The first (test fold, class) whose training side has no slide of that class, or None."""
    labels = slides["label"].to_numpy()
    for f in sorted(set(fold.tolist())):
        present = set(labels[fold != f])
        missing = [c for c in classes if c not in present]
        if missing:
            return f, missing[0]
    return None


def _no_training_class_error(slides: pd.DataFrame, lacking: tuple[int, str]) -> SimclrPathError:
    """Why no split was found: test fold ``f`` of ``lacking`` leaves no training slide of class
    ``c``. A patient with slides of several labels (tumour and normal slides of one patient)
    counts for each class but goes to one fold with all its slides, so a class with few patients
    can end up on one side only."""
    f, c = lacking
    pats = sorted(set(slides.loc[slides["label"] == c, "patient_id"]))
    labels = slides.groupby("patient_id")["label"].nunique()
    mixed = [p for p in pats if labels[p] > 1]
    why = (f", and patient(s) {', '.join(map(repr, mixed[:3]))} also have slides of another "
           "label: a patient counts for every label of its slides but keeps all of them in "
           f"one fold, so the few {c!r} patients can all land on the test side"
           if mixed else "")
    return SimclrPathError(
        f"patient-grouped folds leave test fold {f} without a training slide of class {c!r}: "
        f"its slides come from only {len(pats)} patient(s) ({', '.join(map(repr, pats[:5]))})"
        f"{why}; add patients with {c!r} slides, or give the samples sheet a split column "
        "that puts such patients on the train side"
    )


FINAL_FOLD = -1  # ``fold`` of :func:`label_subset` for the final model fitted on all patients


def pick_patients(
    slides: pd.DataFrame, classes: Sequence[str], fraction: float, rng: np.random.Generator,
    leave: int = 0,
) -> set[str]:
    """Patients keeping ``max(1, floor(fraction * n_c + 0.5))`` of each class's ``n_c`` patients (at
    most ``n_c - leave``), drawn in one random order of all patients (so a patient with slides of
    two classes counts for both)."""
    order = rng.permutation(np.array(sorted(set(slides["patient_id"])), dtype=object))
    rank = {p: i for i, p in enumerate(order)}
    chosen: set[str] = set()
    for c in classes:
        pats = sorted(set(slides.loc[slides["label"] == c, "patient_id"]), key=rank.__getitem__)
        # halves round up (Python's round() goes to even: half of 5 patients kept 2, of 7 kept 4),
        # in exact decimals: in floats 0.29 x 50 is 14.4999..., which kept 14, not 15
        exact = Fraction(repr(float(fraction))) * len(pats)
        want = min(max(1, math.floor(exact + Fraction(1, 2))), len(pats) - leave)
        have = sum(p in chosen for p in pats)
        for p in pats:
            if have >= want:
                break
            if p not in chosen:
                chosen.add(p)
                have += 1
    return chosen


def label_subset(
    slides: pd.DataFrame, classes: Sequence[str], fraction: float, seed: int,
    fold: int = FINAL_FOLD,
) -> set[str]:
    """The labelled training patients kept at ``fraction`` (``classify.label_fraction``,
    ``finetune.label_fraction``): per class ``max(1, floor(fraction * n_c + 0.5))`` of its ``n_c``
    patients in ``slides`` (all patients at 1.0).

    ``slides`` are the training slides of outer fold ``fold`` (:data:`FINAL_FOLD` for the final
    model on all slides). ``classify`` and ``finetune`` both call this with ``classify.seed``, so
    at one fraction and fold the linear probe and fine-tuning are given the same patients.
    """
    if fraction >= 1.0:
        return set(slides["patient_id"])
    return pick_patients(slides, classes, fraction, np.random.default_rng([seed, 1, fold + 1]))


def label_info(
    slides: pd.DataFrame, classes: Sequence[str], kept: set[str], fraction: float
) -> dict[str, Any]:
    """A fold's labelled patients for ``metrics.json``: their number, per class, and (below a
    fraction of 1) their ids, so that two methods' label budgets can be checked to match."""
    sl = slides[slides["patient_id"].isin(kept)]
    info: dict[str, Any] = {
        "n_labelled_patients": len(kept),
        "labelled_patients_per_class": {
            c: int(sl.loc[sl["label"] == c, "patient_id"].nunique()) for c in classes
        },
    }
    if fraction < 1.0:
        info["labelled_patients"] = sorted(kept)
    return info


def _check_disjoint(train_patients: np.ndarray, test_patients: np.ndarray) -> None:
    both = set(train_patients) & set(test_patients)
    if both:  # a bug, never a user error
        raise AssertionError(f"patient(s) {sorted(both)[:3]} on both sides of a split")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
_SCALER_CLASS: list[type] = []


def _scaler_class() -> type:
    """sklearn's StandardScaler whose ``fit`` reads the rows in slices (``partial_fit``): its
    one-pass fit makes a float64 copy of float32 features, 2x the training rows on top of them
    (3e5 patches x 512: +1.1 GB, measured); per slice the copy is a slice's (67 MB). Same mean
    and scale (float64 accumulators either way), the same plain arrays when saved. Made on
    first use (sklearn is imported late) and found by pickle as
    ``simclr_path.classify.ChunkedStandardScaler`` (module ``__getattr__``)."""
    if _SCALER_CLASS:
        return _SCALER_CLASS[0]
    import scipy.sparse
    from sklearn.preprocessing import StandardScaler

    class ChunkedStandardScaler(StandardScaler):
        rows = 16384

        def fit(self, X, y=None, sample_weight=None):
            if (sample_weight is not None or scipy.sparse.issparse(X) or not hasattr(X, "shape")
                    or X.shape[0] <= self.rows):
                return super().fit(X, y, sample_weight)
            self._reset()
            for lo in range(0, X.shape[0], self.rows):
                self.partial_fit(X[lo:lo + self.rows])
            return self

    ChunkedStandardScaler.__module__ = __name__
    ChunkedStandardScaler.__qualname__ = "ChunkedStandardScaler"
    _SCALER_CLASS.append(ChunkedStandardScaler)
    return ChunkedStandardScaler


def __getattr__(name: str) -> Any:
    if name == "ChunkedStandardScaler":
        return _scaler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _chunked_scaler():
    return _scaler_class()()


def fit_probe(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: Sequence[str], cfg: ClassifyConfig
):
    """StandardScaler + LogisticRegression(class_weight="balanced"); C by inner grouped CV.

    Returns the fitted sklearn pipeline, the chosen C, and how it was chosen, for
    ``metrics.json``: ``{"C_chosen_by": "inner_cv" | "the grid's one value" | "fixed: WHY",
    "inner_folds": k (0 without inner CV), "C_grid_end": "below" / "above" when that C is the
    grid's lowest / highest and scored strictly better than its neighbour (the best C may lie
    beyond the grid; a tie, as on separable data, says nothing), else None}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from threadpoolctl import threadpool_limits

    n_classes = len(classes)  # y holds their indices
    present = set(np.unique(y).tolist())
    if len(present) < n_classes:
        lack = [classes[i] for i in range(n_classes) if i not in present]
        raise SimclrPathError(
            f"a training fold has no patches of class {', '.join(map(repr, lack))}; add "
            "patients with slides of that class"
        )
    pipe = make_pipeline(
        _chunked_scaler(), LogisticRegression(class_weight="balanced", max_iter=cfg.max_iter)
    )
    grid = list(cfg.c_grid)
    per_class = min(len(set(groups[y == c])) for c in range(n_classes))
    k = min(cfg.inner_folds, per_class)
    splits = []
    if len(grid) > 1 and k >= 2:
        splits = inner_splits(y, groups, n_classes, k, cfg.seed)
    if len(grid) == 1 or not splits:
        c = grid[0] if len(grid) == 1 else sorted(grid)[len(grid) // 2]
        how = "the grid's one value"
        if len(grid) > 1:
            why = (f"too few patients per class ({per_class})" if k < 2 else
                   "no grouped inner fold holds patches of every class")
            warnings.warn(f"{why} for inner cross-validation; using C={c}", stacklevel=2)
            how = f"fixed: {why} for inner cross-validation (the grid's middle value)"
        pipe.set_params(logisticregression__C=c)
        with threadpool_limits(1, user_api="blas"):
            return pipe.fit(X, y), float(c), {"C_chosen_by": how, "inner_folds": 0,
                                              "C_grid_end": None}
    search = GridSearchCV(
        pipe,
        {"logisticregression__C": grid},
        cv=splits,
        scoring="roc_auc" if n_classes == 2 else "roc_auc_ovr",
        error_score=np.nan,
        refit=True,
    )
    # One BLAS thread: lbfgs on (patches x features) problems makes many small matrix products,
    # where BLAS threads spin-wait; measured 8-10x faster on a busy 2-core machine.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.filterwarnings("ignore", message=".*Only one class is present.*")
        warnings.filterwarnings("ignore", message=".*scores are non-finite.*")
        search.fit(X, y, groups=groups)
    best = float(search.best_params_["logisticregression__C"])
    return search.best_estimator_, best, {"C_chosen_by": "inner_cv", "inner_folds": len(splits),
                                          "C_grid_end": _grid_edge(search.cv_results_, best)}


def inner_splits(y: np.ndarray, groups: np.ndarray, n_classes: int, k: int,
                 seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` patient-grouped inner folds (train, test patch indices) whose test sides hold every
    class, so that each scores an AUROC: sklearn's StratifiedGroupKFold, which balances patch
    counts and can put one class's patients (a few large, a few small) in the same fold; where it
    does, patients stratified by their majority class instead (each class has >= ``k`` of them
    in the common case). Folds that still lack a class are left out, as no AUROC exists for them
    (an empty list: none is left)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    def full(te: np.ndarray) -> bool:
        return len(np.unique(y[te])) == n_classes

    splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                  .split(np.zeros(len(y)), y, groups))
    if all(full(te) for _, te in splits):
        return splits
    patients, inv = np.unique(groups, return_inverse=True)
    major = np.array([np.bincount(y[inv == i], minlength=n_classes).argmax()
                      for i in range(len(patients))])
    k = min(k, int(np.bincount(major, minlength=n_classes).min()))
    if k < 2:
        return []
    out = []
    for _, te_p in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            patients, major):
        te = np.isin(inv, te_p)
        if full(np.flatnonzero(te)):
            out.append((np.flatnonzero(~te), np.flatnonzero(te)))
    return out


def _grid_edge(cv_results: dict[str, Any], best: float) -> str | None:
    """"below" / "above" when ``best`` is the lowest / highest C tried and its mean inner score
    beats the next C's; None otherwise."""
    cs = np.asarray(cv_results["param_logisticregression__C"], dtype=float)
    scores = np.asarray(cv_results["mean_test_score"], dtype=float)
    order = np.argsort(cs)
    cs, scores = cs[order], scores[order]
    for i, j, side in ((0, 1, "below"), (-1, -2, "above")):
        if best == cs[i] and scores[i] > scores[j]:  # False for a tie or NaN
            return side
    return None


def warn_grid_edge(grid: Sequence[float], edges: Sequence[str | None]) -> None:
    """Warn when, in at least half of the fits, inner cross-validation preferred an end of
    ``classify.c_grid`` to its neighbour (``edges`` from :func:`fit_probe`)."""
    if len(set(grid)) < 3:  # with two values every choice is an end: the user's own pair
        return
    for side, end in (("below", min(grid)), ("above", max(grid))):
        n = sum(e == side for e in edges)
        if edges and 2 * n >= len(edges):
            warnings.warn(f"classify.c_grid: C={end:g}, the grid's end, scored best in {n} of "
                          f"{len(edges)} fits; the best C may lie {side} it: extend "
                          "classify.c_grid", stacklevel=2)


@dataclass
class LinearModel:
    """The saved classifier as plain arrays: ``predict_proba(X)`` maps (N, D) -> (N, K).

    ``coef`` is (1, D) for two classes (sklearn's binary layout: the logit of ``classes[1]``) and
    (K, D) otherwise.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: list[str]
    positive: int | None
    meta: dict[str, Any]

    @property
    def feature_dim(self) -> int:
        return int(self.coef.shape[1])

    @classmethod
    def from_pipeline(
        cls, pipe, classes: Sequence[str], positive: int | None, meta: dict[str, Any]
    ) -> LinearModel:
        scaler, lr = pipe[0], pipe[-1]
        return cls(
            mean=scaler.mean_.astype(np.float64),
            scale=scaler.scale_.astype(np.float64),
            coef=lr.coef_.astype(np.float64),
            intercept=lr.intercept_.astype(np.float64),
            classes=list(classes),
            positive=positive,
            meta=meta,
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.feature_dim:
            raise SimclrPathError(
                f"features have {X.shape[-1] if X.ndim else 0} dimensions but the classifier "
                f"expects {self.feature_dim}"
            )
        z = ((X - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:
            from scipy.special import expit  # exp(-z) overflows (a warning) for z << 0

            p1 = expit(z[:, 0])
            return np.stack([1.0 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        np.savez(
            folder / "model.npz",
            mean=self.mean,
            scale=self.scale,
            coef=self.coef,
            intercept=self.intercept,
        )
        info = {
            "format_version": MODEL_FORMAT_VERSION,
            "kind": MODEL_KIND,
            "classes": self.classes,
            "positive": None if self.positive is None else self.classes[self.positive],
            "feature_dim": self.feature_dim,
            "simclr_path_version": __version__,
            **self.meta,
        }
        (folder / "model.json").write_text(json.dumps(_jsonable(info), indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LinearModel:
        folder = Path(folder)
        npz, js = folder / "model.npz", folder / "model.json"
        if not npz.is_file() or not js.is_file():
            raise SimclrPathError(
                f"{folder}: no classifier here (model.npz and model.json); "
                "train one with 'simclr-path classify'"
            )

        def damaged(what: str, path: Path = js) -> SimclrPathError:
            return SimclrPathError(
                f"{path}: classifier files are damaged ({what}); rerun 'simclr-path classify'"
            )

        try:
            info = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise damaged(str(exc).splitlines()[0][:160]) from None
        if not isinstance(info, dict):
            raise damaged(f"a JSON {type(info).__name__}, not an object")
        version, kind = info.get("format_version"), info.get("kind")
        if type(version) is not int or version != MODEL_FORMAT_VERSION:
            newer = type(version) is int and version > MODEL_FORMAT_VERSION
            if newer:
                raise SimclrPathError(
                    f"{js}: classifier format_version {version} is newer than this simclr-path "
                    f"reads ({MODEL_FORMAT_VERSION}); upgrade simclr-path"
                )
            raise damaged(f"format_version {version!r}, expected {MODEL_FORMAT_VERSION}")
        if kind != MODEL_KIND:
            raise damaged(f"kind {kind!r}, expected {MODEL_KIND!r}")
        classes = info.get("classes")
        if (not isinstance(classes, list) or len(classes) < 2
                or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise damaged(f"'classes' must list 2 or more distinct class names, got {classes!r}")
        pos = info.get("positive")
        if pos is not None and pos not in classes:
            raise damaged(f"positive class {pos!r} is not one of the classes {classes}")
        try:
            with np.load(npz, allow_pickle=False) as a:  # plain arrays only: no code can be loaded
                arrays = {k: np.asarray(a[k], dtype=np.float64)
                          for k in ("mean", "scale", "coef", "intercept")}
        except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            # (a truncated .npz is a zip without its directory). numpy's advice to load a
            # pickle "unsafely" is left out: the file is damaged or not ours, never to be trusted
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "pickle" in why or "Object arrays" in why:
                why = "it holds pickled (object) data, which is never loaded"
            raise damaged(why[:160], npz) from None
        mean, scale, coef, intercept = (arrays[k] for k in ("mean", "scale", "coef", "intercept"))
        # sklearn's layout: one row of coefficients for two classes, one per class otherwise
        rows = 1 if len(classes) == 2 else len(classes)
        if coef.ndim != 2 or coef.shape[0] != rows or coef.shape[1] < 1:
            raise damaged(f"coef has shape {coef.shape}, expected ({rows}, D) for "
                          f"{len(classes)} classes", npz)
        dim = coef.shape[1]
        for name, arr, shape in (("intercept", intercept, (rows,)), ("mean", mean, (dim,)),
                                 ("scale", scale, (dim,))):
            if arr.shape != shape:
                raise damaged(f"{name} has shape {arr.shape}, expected {shape}", npz)
        for name, arr in arrays.items():
            if not np.isfinite(arr).all():
                raise damaged(f"{name} holds NaN or infinite values", npz)
        if not (scale > 0).all():
            raise damaged("scale holds values <= 0", npz)
        top_k = info.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise damaged(f"top_k {top_k!r} is not a positive integer")
        # the scale predict checks new embeddings against (a text one was a traceback there)
        size, mpp = info.get("image_size"), info.get("input_mpp")
        if size is not None and (type(size) is not int or not 8 <= size <= 4096):
            raise damaged(f"image_size {size!r} is not a whole number between 8 and 4096")
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float))
                                or not math.isfinite(mpp) or mpp <= 0):
            raise damaged(f"input_mpp {mpp!r} is not a positive number")
        meta = {k: v for k, v in info.items() if k not in ("classes", "positive")}
        return cls(
            **arrays,
            classes=classes,
            positive=None if pos is None else classes.index(pos),
            meta=meta,
        )


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return _nan_to_none(obj)


def classification_metrics(
    y: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    positive: int | None,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of predictions ``proba`` (N, K) for true class indices ``y`` (N,).

    ``auroc``, ``average_precision``, ``sensitivity``, ``specificity`` and ``f1`` are positive
    (SCC) vs rest when a positive class exists (the score is P(positive)); otherwise ``auroc`` and
    ``average_precision`` are macro one-vs-rest and ``f1`` is macro. ``balanced_accuracy`` and
    ``confusion_matrix`` (rows true, columns predicted, in ``classes`` order) use all classes.
    """
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        roc_auc_score,
    )

    k = len(classes)
    pred = proba.argmax(axis=1) if pred is None else pred
    out: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class folds: the metric is undefined (NaN)
        # the mean recall of every class: with one absent (a fold of one class's slides) it
        # is another quantity, the present classes' recall, so NaN and fold means skip it
        out["balanced_accuracy"] = (float(balanced_accuracy_score(y, pred))
                                    if len(np.unique(y)) == k else float("nan"))
        out["accuracy"] = float(np.mean(y == pred))
        if positive is not None:
            yb, pb, s = y == positive, pred == positive, proba[:, positive]
            both = 0 < yb.sum() < len(yb)
            out["auroc"] = float(roc_auc_score(yb, s)) if both else float("nan")
            out["average_precision"] = (
                float(average_precision_score(yb, s)) if both else float("nan")
            )
            out["sensitivity"] = float(pb[yb].mean()) if yb.any() else float("nan")
            out["specificity"] = float((~pb[~yb]).mean()) if (~yb).any() else float("nan")
            # undefined without a positive (as sensitivity): NaN, so fold means skip the fold
            out["f1"] = float(f1_score(yb, pb, zero_division=0.0)) if yb.any() else float("nan")
        if k > 2:
            present = np.unique(y)
            # a class absent from y has no F1 (it would count as 0): NaN, as auroc_macro
            out["f1_macro"] = (
                float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0.0))
                if len(present) == k
                else float("nan")
            )
            if len(present) == k:
                out["auroc_macro"] = float(
                    roc_auc_score(
                        y, proba, multi_class="ovr", average="macro", labels=list(range(k))
                    )
                )
                out["average_precision_macro"] = float(
                    np.mean([average_precision_score(y == c, proba[:, c]) for c in range(k)])
                )
            else:
                out["auroc_macro"] = out["average_precision_macro"] = float("nan")
            if positive is None:
                out["auroc"] = out["auroc_macro"]
                out["average_precision"] = out["average_precision_macro"]
                out["f1"] = out["f1_macro"]
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(k))).tolist()
    return out


def bootstrap_auroc(
    y: np.ndarray, proba: np.ndarray, clusters: np.ndarray, positive: int | None, n: int, seed: int
) -> list[float] | None:
    """Percentile 95% CI of AUROC by resampling ``clusters`` (patients) with replacement."""
    from sklearn.metrics import roc_auc_score

    if n <= 0:
        return None
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(clusters, return_inverse=True)
    # rows of each cluster: one stable sort, not a pass over all rows per cluster (quadratic
    # for tile sets without groups, where every tile is its own cluster)
    order = np.argsort(inv, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])
    k = proba.shape[1]
    vals = []
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        yy = y[idx]
        if positive is not None:
            yb = yy == positive
            if 0 < yb.sum() < len(yb):
                vals.append(roc_auc_score(yb, proba[idx, positive]))
        elif len(np.unique(yy)) == k:
            vals.append(roc_auc_score(yy, proba[idx], multi_class="ovr", labels=list(range(k))))
    if len(vals) < max(10, n // 10):
        return None
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


# Fewest patients of a class for a patient-bootstrap CI: with fewer, most resamples repeat the
# same few patients, and a perfectly separated pair reports the degenerate "1.000-1.000".
MIN_CI_PATIENTS = 5


def auroc_ci(
    sy: np.ndarray,
    sp: np.ndarray,
    slides_pred: pd.DataFrame,
    classes: Sequence[str],
    positive: int | None,
    cfg: ClassifyConfig,
    unit: str = "patient",
) -> tuple[list[float] | None, str | None]:
    """The slide AUROC's patient-bootstrap 95% CI, or None and why it is not given (the
    ``auroc_ci95`` and ``auroc_ci95_note`` of ``metrics.json``); ``unit``: what a patient is
    called (a tile set's "source image")."""
    held = "held-out slides" if unit == "patient" else f"held-out {unit}s"
    if cfg.bootstrap <= 0:
        return None, "CI not shown: the bootstrap is off (classify.bootstrap: 0)"
    per_class = patients_per_class(slides_pred, classes)
    fewest = min(per_class.values())
    if fewest == 0:  # not a matter of too few: there is no AUROC to give an interval for
        return None, (f"CI not shown: the {held} hold no class "
                      f"{min(per_class, key=per_class.get)!r}")
    if fewest < MIN_CI_PATIENTS:
        units = unit if fewest == 1 else f"{unit}s"
        few = (f"{fewest} {units} per class" if len(set(per_class.values())) == 1 else
               f"{fewest} {units} in class {min(per_class, key=per_class.get)!r}")
        return None, (f"CI not shown: {few} (a {unit} bootstrap needs at least "
                      f"{MIN_CI_PATIENTS} per class)")
    ci = bootstrap_auroc(sy, sp, slides_pred["patient_id"].to_numpy(), positive, cfg.bootstrap,
                         cfg.seed)
    if ci is None:
        return None, "CI not shown: too few bootstrap resamples held every class"
    if ci[1] - ci[0] < 1e-6:
        # every resample of perfectly separated slides scores the same: a percentile interval
        # of zero width would claim no uncertainty however few the patients
        return None, (f"CI not shown: every {unit} resample gives AUROC {ci[0]:.3f} (the "
                      f"{held} are perfectly separated), so a percentile bootstrap "
                      "interval has zero width")
    return ci, None


def aggregate_slides(
    slide: np.ndarray, proba: np.ndarray, classes: Sequence[str], positive: int | None, top_k: int
) -> pd.DataFrame:
    """Slide scores from patch probabilities: mean probability per class, and for the positive
    class also the mean of the ``top_k`` highest patch probabilities (``score_topk``)."""
    cols = [f"prob_{c}" for c in classes]
    df = pd.DataFrame(proba, columns=cols)
    df["slide_id"] = slide
    g = df.groupby("slide_id", sort=False)
    out = g[cols].mean()
    out["n_patches"] = g.size()
    if positive is not None:
        pc = cols[positive]
        out["score"] = out[pc]
        out["score_topk"] = g[pc].apply(lambda s: float(np.sort(s.to_numpy())[::-1][:top_k].mean()))
    out["pred"] = [classes[i] for i in out[cols].to_numpy().argmax(axis=1)]
    return out.reset_index()


def _summary(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for key in (*SCALAR_KEYS, "auroc_topk"):
        vals = np.array([f[key] for f in per_fold if f.get(key) is not None], dtype=float)
        vals = vals[np.isfinite(vals)]
        if len(vals):
            out[key] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                "n_folds": len(vals),
            }
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation shared with ``finetune``: out-of-fold probabilities -> metrics and prediction tables
# ----------------------------------------------------------------------------------------------
def evaluate_fold(
    t: PatchTable, te: np.ndarray, proba_te: np.ndarray, cfg: ClassifyConfig
) -> dict[str, Any]:
    """One outer fold's test metrics from its patch probabilities ``proba_te`` (n_test, K).

    Returns ``n_test_slides`` and the patch- and slide-level metrics (without confusion
    matrices; the pooled metrics carry those).
    """
    sl = aggregate_slides(t.slide[te], proba_te, t.classes, t.positive, cfg.top_k)
    sy = sl["slide_id"].map(dict(zip(t.slides["slide_id"], t.slides["y"]))).to_numpy()
    sm = classification_metrics(
        sy, sl[[f"prob_{x}" for x in t.classes]].to_numpy(), t.classes, t.positive
    )
    if t.positive is not None:
        sm["auroc_topk"] = _topk_auroc(sy, sl, t.positive)
    pm = classification_metrics(t.y[te], proba_te, t.classes, t.positive)
    return {
        "n_test_slides": len(sl),
        "patch": {kk: v for kk, v in pm.items() if kk != "confusion_matrix"},
        "slide": {kk: v for kk, v in sm.items() if kk != "confusion_matrix"},
    }


def pooled_results(
    t: PatchTable,
    proba: np.ndarray,
    patch_fold: np.ndarray,
    slide_fold: dict[str, int],
    cfg: ClassifyConfig,
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Pooled out-of-fold results: patch metrics, slide metrics (with the patient-bootstrap AUROC
    CI), the slide predictions table and the patch predictions table (``predictions_*.csv``).

    ``proba`` (N, K) holds each patch's test-fold probabilities (NaN for train-only patches,
    ``patch_fold`` -1).
    """
    ev = patch_fold >= 0
    patch_metrics = classification_metrics(t.y[ev], proba[ev], t.classes, t.positive)
    slides_pred = aggregate_slides(t.slide[ev], proba[ev], t.classes, t.positive, cfg.top_k)
    info = t.slides.set_index("slide_id")
    slides_pred.insert(1, "patient_id", slides_pred["slide_id"].map(info["patient_id"]).to_numpy())
    slides_pred.insert(2, "label", slides_pred["slide_id"].map(info["label"]).to_numpy())
    slides_pred.insert(3, "fold", slides_pred["slide_id"].map(slide_fold).to_numpy())
    sy = np.array([t.classes.index(x) for x in slides_pred["label"]])
    sp = slides_pred[[f"prob_{x}" for x in t.classes]].to_numpy()
    slide_metrics = classification_metrics(sy, sp, t.classes, t.positive)
    if t.positive is not None:
        slide_metrics["auroc_topk"] = _topk_auroc(sy, slides_pred, t.positive)
    slide_metrics["auroc_ci95"], slide_metrics["auroc_ci95_note"] = auroc_ci(
        sy, sp, slides_pred, t.classes, t.positive, cfg, unit=t.grouped_by
    )
    patches = pd.DataFrame(
        {
            "slide_id": t.slide,
            "patient_id": t.patient,
            "patch_index": t.patch_index,
            # patch_index counts within one file; imported patch sets can share group names
            **({"file": np.asarray(t.files, dtype=object)[t.source]}
               if t.files is not None and t.source is not None else {}),
            "x": t.coords[:, 0],
            "y": t.coords[:, 1],
            "label": [t.classes[i] for i in t.y],
            "fold": patch_fold,
        }
    )
    for j, c in enumerate(t.classes):
        patches[f"prob_{c}"] = proba[:, j]
    if t.positive is not None:
        patches["score"] = proba[:, t.positive]
    patches["pred"] = [
        t.classes[i] if ev_i else "" for i, ev_i in zip(np.nan_to_num(proba).argmax(1), ev)
    ]
    return patch_metrics, slide_metrics, slides_pred, patches


def task_summary(
    t: PatchTable,
    labels_from: str,
    scheme: str,
    n_folds: int,
    evaluated: pd.DataFrame,
    cfg: ClassifyConfig,
) -> dict[str, Any]:
    """The ``task`` entry of ``metrics.json``: classes, score, evaluation scheme and counts;
    ``evaluated``: the held-out slides' rows (``slide_id``, ``patient_id``), all of them with
    cross-validation, the test side of a split."""
    return {
        "classes": t.classes,
        "positive": None if t.positive is None else t.classes[t.positive],
        "score": f"P({t.classes[t.positive]})" if t.positive is not None else "macro one-vs-rest",
        "labels_from": labels_from,
        "evaluation": scheme,
        "n_folds": n_folds,
        "n_patches": len(t.y),
        "n_slides": len(t.slides),
        "n_patients": int(t.slides["patient_id"].nunique()),
        "n_evaluated_slides": len(evaluated),
        # a split evaluates its test patients only: the n beside a slide AUROC
        "n_evaluated_patients": int(evaluated["patient_id"].nunique()),
        "patients_per_class": patients_per_class(t.slides, t.classes),
        "encoder_sha256": t.encoder_sha256,
        "encoder_fine_tuned_from": t.fine_tuned_from,
        "layer": t.layer,
        "arch": t.arch,
        "top_k": cfg.top_k,
    }


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def classify(
    embedding_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    samples: str | os.PathLike | pd.DataFrame | None = None,
    cfg: ClassifyConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train and evaluate the linear SCC classifier; write the results folder; return the metrics.

    Args:
        embedding_paths: embedding files (one per slide, or imported patch sets with labels).
        out_dir: results folder (written atomically): ``metrics.json``, ``predictions_patches.csv``,
            ``predictions_slides.csv``, ``model.npz``, ``model.json``.
        samples: samples sheet (path or DataFrame) with slide labels and patients; None when the
            embedding files carry labels and groups.
        cfg: folds, C grid, top-k, bootstrap size, positive label, allowed labels.
        force: replace an existing ``out_dir``.
    """
    cfg = section_cfg(cfg, ClassifyConfig, "classify")
    embedding_paths = as_paths(embedding_paths, "embedding_paths")
    check_apart({"out_dir": out_dir}, {"embedding_paths": embedding_paths, "samples": samples},
                replaces_dir=force)
    check_can_write(out_dir, force, kind="dir", markers=RESULT_FILES)
    t = load_table(embedding_paths, samples, cfg)
    if t.fine_tuned_from:
        # its weights learned from labels: a patient it was fine-tuned on scores as well as
        # memorised (a reviewer's random labels: AUROC 1.0 here, 0.58 in finetune's own folds)
        warnings.warn(f"{t.files[0]}: embedded with an encoder fine-tuned with labels (from "
                      f"{t.fine_tuned_from}); any patient it was fine-tuned on makes this "
                      "evaluation optimistic: evaluate such an encoder on new patients only "
                      "(finetune's own metrics.json is the cross-validated figure)", stacklevel=2)
    k = len(t.classes)
    fold_of_slide, scheme = make_folds(t.slides, t.classes, cfg)
    slide_fold = dict(zip(t.slides["slide_id"], fold_of_slide))
    patch_fold = np.array([slide_fold[s] for s in t.slide])
    proba = np.full((len(t.y), k), np.nan)
    folds_out = []
    edges: list[str | None] = []  # fit_probe's grid-edge flags, for one warning at the end
    from tqdm.auto import tqdm

    fold_ids = sorted(f for f in set(fold_of_slide.tolist()) if f >= 0)

    def labelled(train_slides: pd.DataFrame, train_mask: np.ndarray, fold: int):
        """Training patches of the patients kept at ``cfg.label_fraction``, and their info."""
        kept = label_subset(train_slides, t.classes, cfg.label_fraction, cfg.seed, fold)
        rows = train_mask & np.isin(t.patient, np.array(sorted(kept), dtype=object))
        return rows, label_info(train_slides, t.classes, kept, cfg.label_fraction)

    for f in tqdm(fold_ids, desc="classify folds", disable=None, leave=False):
        te = patch_fold == f
        tr, split = labelled(t.slides[np.asarray(fold_of_slide) != f], ~te, f)
        _check_disjoint(t.patient[tr], t.patient[te])
        pipe, c, how = fit_probe(t.X[tr], t.y[tr], t.patient[tr], t.classes, cfg)
        edges.append(how["C_grid_end"])
        proba[te] = pipe.predict_proba(t.X[te])
        folds_out.append(
            {
                "fold": int(f),
                "C": c,
                **how,
                "n_train_patches": int(tr.sum()),
                "n_test_patches": int(te.sum()),
                "n_train_patients": len(set(t.patient[tr])),
                "n_test_patients": len(set(t.patient[te])),
                **split,
                **evaluate_fold(t, te, proba[te], cfg),
            }
        )

    patch_metrics, slide_metrics, slides_pred, patches = pooled_results(
        t, proba, patch_fold, slide_fold, cfg
    )

    if scheme == "split":
        # its one fold's model is the final one: the evaluated model is the one saved (a refit
        # drew other patients at a label fraction and counted its C twice)
        final, c_final, final_split, final_how = pipe, c, split, how
    else:
        tr, final_split = labelled(t.slides, np.ones(len(t.y), bool), FINAL_FOLD)
        final, c_final, final_how = fit_probe(t.X[tr], t.y[tr], t.patient[tr], t.classes, cfg)
    model = LinearModel.from_pipeline(
        final,
        t.classes,
        t.positive,
        meta={
            "C": c_final,
            "top_k": cfg.top_k,
            "encoder_sha256": t.encoder_sha256,
            "encoder": t.encoder,
            "input_mpp": t.input_mpp,
            "layer": t.layer,
            "arch": t.arch,
            "image_size": t.image_size,
            "tta": t.tta,
            "n_train_patches": int(tr.sum()),
            "n_train_slides": int(t.slides["patient_id"].isin(set(t.patient[tr])).sum()),
            "n_train_patients": len(set(t.patient[tr])),
            "label_fraction": cfg.label_fraction,
        },
    )
    warn_grid_edge(cfg.c_grid,
                   [*edges, *([final_how["C_grid_end"]] if scheme != "split" else [])])
    task = task_summary(
        t,
        "samples sheet" if samples is not None else "embedding files",
        scheme,
        len(fold_ids),
        slides_pred,
        cfg,
    )
    task["label_fraction"] = cfg.label_fraction
    # the keys it read: the workflow's classify YAML leaves the t-SNE figure's own keys out
    used = {k: v for k, v in asdict(cfg).items() if k in CLASSIFY_PROBE_KEYS}
    metrics = metrics_document(task, patch_metrics, slide_metrics, folds_out,
                               {"C": c_final, **final_how, **final_split}, used)
    with atomic_dir(out_dir, force=force, markers=RESULT_FILES) as tmp:
        write_evaluation(tmp, metrics, patches, slides_pred)
        model.save(tmp)
    return metrics


def metrics_document(task: dict[str, Any], patch_metrics: dict[str, Any],
                     slide_metrics: dict[str, Any], folds_out: list[dict[str, Any]],
                     final_model: dict[str, Any] | None, config: dict[str, Any],
                     **extra: Any) -> dict[str, Any]:
    """The JSON-ready ``metrics.json`` of an evaluation (``classify`` and ``finetune`` share it):
    task, pooled patch/slide metrics, per-fold summary, folds, final model, config."""
    return _jsonable({
        "task": task,
        "patch": patch_metrics,
        "slide": slide_metrics,
        "fold_summary": {
            "patch": _summary([f["patch"] for f in folds_out]),
            "slide": _summary([f["slide"] for f in folds_out]),
        },
        "folds": folds_out,
        "final_model": final_model,
        "config": config,
        **extra,
        "simclr_path_version": __version__,
    })


def write_evaluation(folder: Path, metrics: dict[str, Any], patches: pd.DataFrame,
                     slides_pred: pd.DataFrame) -> None:
    """``metrics.json``, ``predictions_patches.csv`` and ``predictions_slides.csv`` in ``folder``
    (a temporary folder that is renamed into place when complete)."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    patches.to_csv(folder / "predictions_patches.csv", index=False)
    slides_pred.to_csv(folder / "predictions_slides.csv", index=False)


def _topk_auroc(y: np.ndarray, sl: pd.DataFrame, positive: int) -> float:
    """Positive-vs-rest AUROC of the slides' top-k score (NaN when a class is missing)."""
    from sklearn.metrics import roc_auc_score

    yb = y == positive
    if yb.all() or not yb.any():
        return float("nan")
    return float(roc_auc_score(yb, sl["score_topk"].to_numpy()))


def input_mpp(attrs: dict[str, Any]) -> float | None:
    """Micrometres of tissue per encoder input pixel of an embedding file (patch side x mpp /
    image_size), or None where the file does not record all three (imported tiles: no mpp)."""
    try:
        v = float(attrs["patch_size"]) * float(attrs["mpp"]) / float(attrs["image_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def check_compatible(model: LinearModel, model_dir: str | os.PathLike, s: EmbeddingStore) -> None:
    """Refuse an embedding file whose features live in another space than the classifier's
    training embeddings: another arch, encoder, layer, input size or TTA setting gives vectors
    of the right length but a different meaning, and scores of them look plausible and are
    nonsense. A key the model does not record (a model from before it was recorded) is not
    compared; a file that lacks the encoder hash or layer the model records is refused (embed
    always records both)."""
    meta, a = model.meta, s.attrs
    enc = meta.get("encoder") or "RUN/encoder.pt"
    fix_enc = f"embed with the encoder the classifier was trained on ({enc})"

    def differs(key: str) -> bool:
        return meta.get(key) is not None and a.get(key) is not None and a[key] != meta[key]

    where = f"the classifier in {model_dir}"
    # embed always records them: a file without what the model records is not embed's output
    # (or is damaged), and its vectors' meaning cannot be checked
    lacking = [k for k in ("encoder_sha256", "layer") if meta.get(k) is not None
               and a.get(k) is None]
    if lacking:
        raise SimclrPathError(
            f"{s.path}: records no {' or '.join(lacking)}, so it cannot be shown to hold "
            f"embeddings of the encoder and layer {where} was trained on; {fix_enc} "
            "('simclr-path embed' records both)")
    if differs("arch"):
        raise SimclrPathError(f"{s.path}: embedded with a {a['arch']} encoder but {where} was "
                              f"trained on {meta['arch']} embeddings; {fix_enc}")
    if differs("encoder_sha256"):
        raise SimclrPathError(
            f"{s.path}: embedded with encoder sha256 {str(a['encoder_sha256'])[:12]}... but "
            f"{where} was trained on embeddings of encoder {str(meta['encoder_sha256'])[:12]}...; "
            f"{fix_enc}")
    if differs("layer"):
        raise SimclrPathError(f"{s.path}: embeddings of layer {a['layer']!r} but {where} was "
                              f"trained on layer {meta['layer']!r}; embed with --layer "
                              f"{meta['layer']}")
    if meta.get("tta") is not None and _tta(a) != bool(meta["tta"]):
        flag = "--tta" if meta["tta"] else "--no-tta"
        raise SimclrPathError(f"{s.path}: tta {_tta(a)} but {where} was trained on tta "
                              f"{bool(meta['tta'])} embeddings; embed with {flag}")
    size = meta.get("image_size")
    if not size or not a.get("image_size"):
        return
    # embed scales its input size with the patches' field of view (embed.side_ratio): what must
    # match is the tissue scale, micrometres per input pixel, where both sides record it
    mine, theirs = input_mpp(a), meta.get("input_mpp")
    if mine is not None and theirs:
        exact = _fitting_size(a, theirs)
        if _same_scale(int(a["image_size"]), exact, int(size)):
            return
        raise SimclrPathError(
            f"{s.path}: embedded at {a['image_size']} px, {mine:.3g} um of tissue per input "
            f"pixel, but {where} was trained on {float(theirs):.3g} um per pixel ({size} px "
            f"embeddings); {_rescale_fix(a, float(theirs))}")
    if int(a["image_size"]) != int(size):
        # one side does not record the tissue scale: the classifier's pixel size fits only a
        # store whose patches hold as much tissue as the training stores' (same size and mpp)
        unknown = "this file does not" if mine is None else f"{where} does not"
        raise SimclrPathError(
            f"{s.path}: embedded at {a['image_size']} px but {where} was trained on {size} px "
            f"embeddings and {unknown} record the tissue scale (um per input pixel) to show they "
            f"agree; embed with --image-size {size} if its patches have the training stores' "
            "patch size and mpp, else leave --image-size out so that embed scales the size for "
            "this store's patches")


def load_model(model_dir: str | os.PathLike) -> LinearModel:
    """Load the classifier saved by :func:`classify` (plain arrays, no pickle)."""
    return LinearModel.load(model_dir)


def predict(
    model_dir: str | os.PathLike,
    embedding_paths: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    force: bool = False,
) -> Path:
    """Score new slides with a saved classifier; one CSV with patch rows and slide rows
    (:func:`predict_table`, written atomically to ``out_csv``). Returns the CSV's path."""
    embedding_paths = as_paths(embedding_paths, "embedding_paths")
    check_apart({"out_csv": out_csv}, {"model_dir": model_dir, "embedding_paths": embedding_paths})
    model = load_model(model_dir)  # a missing or damaged classifier is named before the output
    check_can_write(out_csv, force)
    df = _scores_table(model, model_dir, embedding_paths)
    with atomic_output(out_csv, force=force) as tmp:
        df.to_csv(tmp, index=False)
    return Path(out_csv)


def predict_table(
    model_dir: str | os.PathLike, embedding_paths: Sequence[str | os.PathLike]
) -> pd.DataFrame:
    """Scores of a saved classifier for new slides, in memory: patch rows and slide rows.

    Columns: ``level`` (patch | slide), ``slide_id``, ``patch_index``, ``file`` (the embedding
    file as given), ``x``, ``y``,
    ``n_patches``, ``prob_<class>`` per class, ``score`` (P(positive)) and ``score_topk`` (slide
    rows) when the model has a positive class, ``pred``.
    """
    return _scores_table(load_model(model_dir), model_dir,
                         as_paths(embedding_paths, "embedding_paths"))


def _scores_table(model: LinearModel, model_dir: str | os.PathLike,
                  embedding_paths: list[Path]) -> pd.DataFrame:
    if not embedding_paths:
        raise SimclrPathError("no embedding files given; pass --embeddings EMB.h5 [EMB.h5 ...]")
    top_k = int(model.meta.get("top_k") or ClassifyConfig().top_k)
    frames = []
    seen: dict[str, Path] = {}
    tile_sets = []
    for p in embedding_paths:
        s = EmbeddingStore(p)
        if s.attrs.get("store_kind") == "patches":
            tile_sets.append((s.path, s.groups))
        _note_slide(seen, s, "embedding file")
        d = s.features.shape[1] if s.features.ndim == 2 else 0
        if d != model.feature_dim:
            raise SimclrPathError(
                f"{s.path}: embeddings have {d} dimensions but the classifier in {model_dir} "
                f"expects {model.feature_dim}; embed with the encoder and layer the classifier "
                f"was trained on ({model.meta.get('arch')}, layer {model.meta.get('layer')})"
            )
        check_compatible(model, model_dir, s)
        _check_finite(s)
        _check_repeats(s)
        if len(s) == 0:
            warnings.warn(
                f"{s.path}: slide {s.slide_id!r} has no patches; its slide row has no scores",
                stacklevel=2,
            )
            frames.append(
                pd.DataFrame({"level": ["slide"], "slide_id": [s.slide_id], "file": [str(s.path)],
                              "n_patches": [0]})
            )
            continue
        proba = model.predict_proba(s.features)
        # an imported patch set holds many source images: each group is a slide, as classify
        # scores it (its patches averaged into one row across groups and classes meant nothing)
        sid = (patch_set_units(s) if s.attrs.get("store_kind") == "patches"
               else np.full(len(s), s.slide_id, dtype=object))
        pr = pd.DataFrame(
            {
                "level": "patch",
                "slide_id": sid,
                "patch_index": np.arange(len(s)),
                "file": str(s.path),
                "x": s.coords[:, 0],
                "y": s.coords[:, 1],
            }
        )
        for j, c in enumerate(model.classes):
            pr[f"prob_{c}"] = proba[:, j]
        if model.positive is not None:
            pr["score"] = proba[:, model.positive]
        pr["pred"] = [model.classes[i] for i in proba.argmax(1)]
        sl = aggregate_slides(sid, proba, model.classes, model.positive, top_k)
        sl.insert(0, "level", "slide")
        sl.insert(2, "file", str(s.path))
        frames += [pr, sl]
    _warn_shared_groups(tile_sets)
    df = pd.concat(frames, ignore_index=True)
    cols = [
        "level",
        "slide_id",
        "patch_index",
        "file",
        "x",
        "y",
        "n_patches",
        *[f"prob_{c}" for c in model.classes],
    ]
    # the same columns whatever the slides hold: empty slides alone wrote no score columns,
    # and plot-heatmap then refused the CSV as not one of predict's
    cols += ["score", "score_topk"] if model.positive is not None else []
    df = df.reindex(columns=[*cols, "pred"])
    for c in ("patch_index", "x", "y", "n_patches"):
        df[c] = df[c].astype("Int64")
    return df
