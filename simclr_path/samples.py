"""The samples sheet: which slides exist, their label, their patient, and where the file is.

Format: a tab-separated file with a header row::

    slide_id    path                      label    patient_id    mpp     split
    S01         slides/S01.svs            SCC      P01           0.25    train
    S02         slides/S02.svs            normal   P01                   train
    S03         /data/wsi/S03.ndpi        SCC      P02                   test

Required columns: ``slide_id``, ``path``, ``label``, ``patient_id``. Optional: ``mpp`` (level-0
microns per pixel, for slides whose files lack it; empty = read from the file) and ``split``
(``train`` or ``test`` on every row; when given, the classifier uses it instead of grouped K-fold).
Other columns are kept with a warning, except near-misses of ``split`` or ``mpp`` (``spilt``,
``Split``, ``MPP``: other case, a letter wrong, missing, extra or swapped; ``pmp``), which stop:
ignoring them would change the evaluation or the tissue scale without a word.
Lines starting with ``#`` are comments.

Relative paths are resolved against the current directory first (what Snakemake users expect:
the workflow runs from the project root), then against ``base_dir`` (default: the sheet's folder).
The returned ``path`` column holds the path that exists (unchanged when found relative to the
current directory).
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from simclr_path.config import magnification_hint
from simclr_path.errors import SimclrPathError, need_file
from simclr_path.outputs import first_repeat

REQUIRED_COLUMNS = ("slide_id", "path", "label", "patient_id")
OPTIONAL_COLUMNS = ("mpp", "split")
SPLITS = ("train", "test")
# What a misspelled optional column would change without a word, were it ignored like any
# other extra column: a near-miss of one the sheet lacks is an error, other columns a warning.
MISSPELT_COLUMN = {
    "split": "an ignored split column means K-fold evaluation, which trains on the slides meant "
             "for testing",
    "mpp": "an ignored mpp column means tiling at the mpp in the slide files' metadata",
}
# A slide id becomes a file name (results/patches/{slide}.h5): no separators, no leading dot,
# and no leading '-' (an option to a command; a formula to a spreadsheet).
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Text that starts so is a formula to Excel or LibreOffice when a CSV the project writes (its
# predictions, the run tables) is opened there: refused where ids, patients, classes and groups
# come in, so that every CSV cell written from them is plain text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def case_clash(names: Sequence[str]) -> tuple[str, str] | None:
    """Two names that differ only in case ('scc' and 'SCC'), or None: two classes so named
    would each count as 'the rest' of the other; two run or file names, one folder on macOS and
    Windows."""
    import unicodedata

    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(unicodedata.normalize("NFC", name).casefold(), name)
        if other != name:
            return other, name
    return None


def formula_problem(value: str, what: str) -> str | None:
    """Why ``value`` (named ``what``) may not be used as text of the CSVs the project writes, or
    None: a leading ``= + - @`` (or tab, carriage return) makes a spreadsheet cell a formula;
    a number (``-1``, ``+1``: a common binary label) or a lone sign is read as what it is."""
    v = str(value)
    if not v.startswith(FORMULA_START):
        return None
    if v[0] in "+-":
        try:
            if v in ("+", "-") or math.isfinite(float(v)):
                return None
        except ValueError:
            pass
    return (f"{what} {v!r} starts with {v[0]!r}, which makes it a formula when the CSVs "
            "written from it are opened in a spreadsheet; rename it")


def is_safe_id(value: str) -> bool:
    """True when ``value`` is a safe file name everywhere (no ``/``, no ``..``, no dot file)."""
    return bool(_SAFE_ID.fullmatch(value)) and ".." not in value


def read_samples(
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    base_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Read and validate a samples sheet; any problem raises one :class:`SimclrPathError` line.

    Args:
        path: the TSV file.
        labels: the allowed label values (e.g. ``config.classify.labels``); None allows any.
        check_files: require every slide file to exist.
        base_dir: second place to resolve relative slide paths (default: the sheet's folder).

    Returns:
        One row per slide with columns ``slide_id, path, label, patient_id`` (strings), plus
        ``mpp`` (float, NaN when empty) and ``split`` (string) when the sheet has them.
    """
    p = Path(path)
    if p.is_dir():
        raise SimclrPathError(f"{p}: is a folder; give the samples sheet (a TSV file)")
    need_file(p, "samples sheet")
    try:
        # only whole lines starting with '#' are comments: pandas' comment= would also cut a
        # field such as patient "case#1" at its '#'
        lines = _trim_extra_fields(p, p.read_text(encoding="utf-8").splitlines(keepends=True))
        text = "".join(line for line in lines if not line.lstrip().startswith("#"))
        # index_col=False: rows with more fields than the header (a spreadsheet's trailing
        # tab) took their first field as the index and shifted every column left
        df = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False,
                         index_col=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SimclrPathError(
            f"{p}: not a readable tab-separated samples sheet ({str(exc).splitlines()[0]})"
        ) from None
    except pd.errors.EmptyDataError:
        raise SimclrPathError(
            f"{p}: samples sheet is empty; expected a header row with columns "
            f"{', '.join(REQUIRED_COLUMNS)}"
        ) from None
    return validate_samples(
        df,
        labels=labels,
        check_files=check_files,
        base_dir=base_dir if base_dir is not None else p.parent,
        where=str(p),
    )


def _fields(line: str) -> list[str]:
    """One line's tab-separated fields, quotes read as pandas reads them (``"a<TAB>b"`` is one)."""
    return next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])


def _trim_extra_fields(p: Path, lines: list[str]) -> list[str]:
    """``lines`` with empty fields beyond the header's columns (a spreadsheet's trailing tabs)
    removed and lines of only tabs and spaces dropped; one clear error for a row with a value
    there (pandas would read it shifted, or refuse the file with a tokenizer message)."""
    out = [line if line.strip() else "\n" for line in lines]  # tabs alone: a blank line
    rows = [n for n, line in enumerate(out) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        return out
    header = [f.strip() for f in _fields(lines[rows[0]])]
    twice = next((f for i, f in enumerate(header) if f and f in header[:i]), None)
    if twice is not None:  # pandas renames the second 'label.1' and reads the first in silence
        raise SimclrPathError(f"{p}: the header names column {twice!r} twice; keep one (which "
                              "of the two is meant cannot be told)")
    width = len(header)
    for n in rows[1:]:
        fields = _fields(lines[n])
        if len(fields) <= width:
            continue
        extra = [f for f in fields[width:] if f.strip()]
        if extra:
            raise SimclrPathError(
                f"{p}: line {n + 1} has {len(fields)} tab-separated fields but the header has "
                f"{width} (first extra value {extra[0].strip()!r}); add a column name for it "
                "or remove it"
            )
        buf = io.StringIO()
        csv.writer(buf, delimiter="\t", lineterminator="\n").writerow(fields[:width])
        out[n] = buf.getvalue()
    return out


def _near_miss(name: str, candidates: Sequence[str], loose: bool = False) -> str | None:
    """The candidate column ``name`` looks like a misspelling of, if any: the same name in other
    case, or one letter away (a letter wrong, missing or extra, or two neighbours swapped:
    'spilt', 'splits'); for names under 4 letters only a swap ('pmp'), since one letter turns
    'mpp' into words ('map', 'app'). A digit or separator added is another column ('split2',
    'mpp_x', 'cv_split'). ``loose`` adds difflib's matches (ratio 0.75 and up): for a hint in
    an error that happens anyway, never to make one."""
    low = name.lower()
    for c in candidates:
        if low == c or _one_typo(low, c, swap_only=len(c) < 4):
            return c
    if not loose:
        return None
    close = difflib.get_close_matches(low, list(candidates), n=1, cutoff=0.75)
    return close[0] if close else None


def _one_typo(a: str, b: str, swap_only: bool = False) -> bool:
    """Whether ``a`` and ``b`` differ by one edit of letters: a substitution, an insertion or
    deletion, or a swap of two neighbours (only the swap with ``swap_only``)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        swap = (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                and a[diff[1]] == b[diff[0]])
        return swap or (not swap_only and len(diff) == 1 and a[diff[0]].isalpha())
    if swap_only:
        return False
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short and long_[i].isalpha()
               for i in range(len(long_)))


def _warn_copies(df: pd.DataFrame, resolved: list[str], where: str) -> None:
    """Warn about slide files that are byte copies of one another under other patients (the
    same size, then the same first and last MiB): one slide filed twice is the leakage that
    patient-grouped folds exist to stop. Files of unique size cost a stat only."""
    import hashlib

    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(resolved):
        path = Path(p)
        if path.is_file():
            by_size.setdefault(path.stat().st_size, []).append(i)
    for size, rows in by_size.items():
        if len(rows) < 2 or size == 0:
            continue
        seen: dict[bytes, int] = {}
        for i in rows:
            with open(resolved[i], "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                key = hashlib.sha256(head + f.read()).digest()
            j = seen.setdefault(key, i)
            if j != i and df["patient_id"].iloc[i] != df["patient_id"].iloc[j]:
                warnings.warn(
                    f"{where}: rows {j + 1} and {i + 1} (slide ids {df['slide_id'].iloc[j]!r} and "
                    f"{df['slide_id'].iloc[i]!r}, patients {df['patient_id'].iloc[j]!r} and "
                    f"{df['patient_id'].iloc[i]!r}) look like copies of one slide file (same "
                    "size, same first and last MiB); one slide under two patients can land on "
                    "both sides of a split", stacklevel=3)
                return


def _as_text(value: Any) -> str:
    """A sheet cell of a numeric column as the text it was written as: "" for a gap, 1.0 as "1"."""
    if pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def validate_samples(
    df: pd.DataFrame,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    base_dir: str | os.PathLike | None = None,
    where: str = "samples sheet",
) -> pd.DataFrame:
    """Validate a samples table in memory (see :func:`read_samples`); returns a clean copy."""
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    known = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
    # an empty header cell (a trailing tab) over empty fields is no column at all
    df = df[[c for c in df.columns if not (c.startswith("Unnamed: ") and
                                           (df[c].fillna("").astype(str).str.strip() == "").all())]]
    unknown = [c for c in df.columns if c not in known]
    absent = [k for k in known if k not in df.columns]
    meant = {c: _near_miss(c, absent) for c in unknown}
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        loose = {c: _near_miss(c, absent, loose=True) for c in unknown}
        hint = "".join(f" (did you mean {k!r} for column {c!r}?)" for c, k in loose.items()
                       if k in missing)
        raise SimclrPathError(
            f"{where}: missing column(s) {', '.join(missing)}{hint}; the sheet must be "
            f"tab-separated with columns {', '.join(REQUIRED_COLUMNS)} (optional: "
            f"{', '.join(OPTIONAL_COLUMNS)})"
        )
    for c, k in meant.items():
        if k in MISSPELT_COLUMN:
            raise SimclrPathError(
                f"{where}: column {c!r} is not a known column: did you mean {k!r}? Rename it to "
                f"{k!r} (names are case-sensitive), or, if it is another column, to a name not "
                f"close to {k!r}; {MISSPELT_COLUMN[k]}"
            )
    if unknown:
        warnings.warn(
            f"{where}: column(s) {', '.join(map(repr, unknown))} are not used (known columns: "
            f"{', '.join(known)}); rename any that is meant to be one of those",
            stacklevel=2,
        )
    if df.empty:
        raise SimclrPathError(f"{where}: no slides listed; add one row per slide")
    for col in df.columns:
        if col in (*REQUIRED_COLUMNS, "split") and not (
                df[col].dtype == object or pd.api.types.is_string_dtype(df[col])):
            # a DataFrame from pd.read_csv holds labels or ids 1/0 as numbers (1.0 with a
            # gap); read_samples reads them as the text "1", so the API takes them as that
            df[col] = df[col].map(_as_text)
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].fillna("").astype(str).str.strip()

    def line(i: int) -> str:  # header is line 1 (comment lines are not counted)
        return f"{where}: row {i + 1} (slide_id {df['slide_id'].iloc[i]!r})"

    for col in REQUIRED_COLUMNS:
        empty = df.index[df[col] == ""]
        if len(empty):
            i = df.index.get_loc(empty[0])
            raise SimclrPathError(f"{line(i)}: field {col!r} is empty; every slide needs a {col}")
    for i, sid in enumerate(df["slide_id"]):
        if not is_safe_id(sid):
            raise SimclrPathError(
                f"{line(i)}: slide_id {sid!r} is not a safe file name; use only letters, "
                "digits, '.', '_' and '-', no '/', no '..' and no leading dot or '-'"
            )
    for col in ("patient_id", "label"):
        for i, value in enumerate(df[col]):
            problem = formula_problem(value, col)
            if problem:
                raise SimclrPathError(f"{line(i)}: {problem}")
    # ids become file names, and S01.h5 and s01.h5 are one file on macOS and Windows
    folded = df["slide_id"].str.casefold()
    dup = folded[folded.duplicated()]
    if len(dup):
        rows = [i + 1 for i, s in enumerate(folded) if s == dup.iloc[0]]
        ids = sorted({df["slide_id"].iloc[r - 1] for r in rows})
        raise SimclrPathError(
            f"{where}: slide_id {' / '.join(map(repr, ids))} appears more than once (rows "
            f"{rows}); slide ids must be unique, ignoring upper and lower case"
        )
    if labels is not None:
        allowed = [str(x) for x in labels]
        for i, lab in enumerate(df["label"]):
            if lab not in allowed:
                # 'scc' for 'SCC', 'SCC ' with a space: name the label meant
                meant = [a for a in allowed if a.strip().casefold() == lab.strip().casefold()]
                hint = f" (did you mean {meant[0]!r}?)" if meant else ""
                raise SimclrPathError(
                    f"{line(i)}: label {lab!r} is not one of the configured labels {allowed}"
                    f"{hint}; fix the sheet or set classify.labels in the config"
                )
    classes = sorted(df["label"].unique())
    if len(classes) < 2:
        raise SimclrPathError(
            f"{where}: every slide has label {classes[0]!r}; a classifier needs at least "
            "two classes (e.g. SCC and normal)"
        )
    if "mpp" in df.columns:
        values = []
        for i, v in enumerate(df["mpp"]):
            if v == "":
                values.append(float("nan"))
                continue
            try:
                f = float(v)
            except ValueError:
                f = float("nan")
            if not (f > 0 and f < 1000):
                raise SimclrPathError(
                    f"{line(i)}: mpp {v!r} is not a positive number of microns per pixel "
                    "(e.g. 0.25); leave it empty to read it from the slide file"
                )
            hint = magnification_hint(f)
            if hint:
                raise SimclrPathError(f"{line(i)}: mpp {hint}; leave it empty to read it from "
                                      "the slide file")
            values.append(f)
        df["mpp"] = values
    if "split" in df.columns:
        for i, v in enumerate(df["split"]):
            if v not in SPLITS:
                raise SimclrPathError(
                    f"{line(i)}: split {v!r} must be 'train' or 'test' on every row; "
                    "remove the split column to use patient-grouped K-fold evaluation"
                )
        if df["split"].nunique() < 2:
            raise SimclrPathError(
                f"{where}: split column has only {df['split'].iloc[0]!r}; "
                "it needs both train and test slides"
            )
    base = Path(base_dir) if base_dir is not None else None
    resolved = []
    for i, raw in enumerate(df["path"]):
        cand = Path(raw).expanduser()
        found = cand
        if (
            not cand.is_absolute()
            and not cand.exists()
            and base is not None
            and (base / cand).exists()
        ):
            found = base / cand
        if check_files and not found.exists():
            tried = str(cand) if cand.is_absolute() or base is None else f"{cand} and {base / cand}"
            raise SimclrPathError(
                f"{line(i)}: slide file not found (tried {tried}); fix the path "
                "(relative paths are resolved against the current directory, then the "
                "sheet's folder)"
            )
        # never a slide (the tile job would fail, after the others), checked without
        # check_files too (the workflow's and classify's reading)
        if found.is_dir():
            raise SimclrPathError(
                f"{line(i)}: {found} is a folder, not a slide file; give the slide file (for "
                "MIRAX the .mrxs file, not its folder)"
            )
        resolved.append(str(found))
    # one file under two ids can put one slide on both sides of a split (leakage)
    # (files that exist: classify reads a sheet whose slides may be elsewhere by now)
    pair = first_repeat([p if Path(p).is_file() else None for p in resolved])
    if pair is not None:
        j, i = pair
        real = os.path.realpath(resolved[i])
        same = (f"the same slide file {resolved[i]}" if resolved[i] == resolved[j] else
                f"the same slide file: {resolved[j]} and {resolved[i]} both lead to {real}")
        raise SimclrPathError(
            f"{where}: rows {j + 1} and {i + 1} (slide ids {df['slide_id'].iloc[j]!r} and "
            f"{df['slide_id'].iloc[i]!r}) name {same}; one slide under two ids can land on "
            "both sides of a split: give each slide one row"
        )
    _warn_copies(df, resolved, where)
    df["path"] = resolved
    return df.reset_index(drop=True)
