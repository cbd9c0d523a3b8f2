"""``simclr-path info``: a readable summary of a patch store (or an embedding file)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Summarise a patch store or embedding file: kind, slide, patches, resolution, labels."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="patch store or embedding file (.h5)")
    p.add_argument("--check", action="store_true",
                   help="also read every patch or feature, to find damage (a disk or copy error) "
                        "that only a read shows; exits non-zero when some cannot be read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --check")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def summary(path: Path, check: bool = False, progress: bool = True) -> list[str]:
    """Lines describing the store at ``path`` (raises SimclrPathError for a bad file); with
    ``check``, after every chunk of its data has been read (:func:`check_data`)."""

    from simclr_path.errors import SimclrPathError, need_file
    from simclr_path.store import (
        EmbeddingStore,
        PatchStore,
        _read_groups,
        layout_problem,
        open_h5,
        read_attrs,
    )

    if path.is_dir():
        raise SimclrPathError(f"{path}: is a folder; give a patch store or embedding file (.h5)")
    need_file(path, "patch store or embedding file")
    try:
        f = open_h5(path)
    except OSError:
        with open(path, "rb") as fh:  # HDF5's signature: a damaged .h5, or another kind of file
            is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
        hint = ("truncated or corrupt; recreate it with --force" if is_hdf5 or path.suffix == ".h5"
                else "give a patch store or embedding file written by simclr-path")
        raise SimclrPathError(f"{path}: not a readable HDF5 file ({hint})") from None
    try:
        with f:
            attrs = read_attrs(f.attrs)
            if "patches" in f:
                what, data = "patch store", f["patches"]
            elif "features" in f:
                what, data = "embedding file", f["features"]
            else:
                raise SimclrPathError(f"{path}: not a simclr-path patch store or embedding file "
                                      f"(objects: {', '.join(f.keys()) or 'none'})")
            if "format_version" not in attrs:
                raise SimclrPathError(f"{path}: {what} has no format_version attribute; it was "
                                      "not completed by simclr-path: recreate it with --force")
            shape = data.shape
            labels = f["labels"][:] if "labels" in f else None
            groups = _read_groups(f) if "groups" in f else None
            thumb = f["thumbnail"].shape if "thumbnail" in f else None
    except (OSError, TypeError, ValueError, AttributeError) as exc:
        raise SimclrPathError(f"{path}: damaged HDF5 file ({exc}); recreate it with "
                              "--force") from None
    # the readers' own checks (a newer format, /coords of another length, ...): info must not
    # describe as valid a file that every other command refuses
    if what == "embedding file":
        EmbeddingStore(path, features=False)
    else:
        PatchStore(path).close()
    problem = layout_problem(shape[0] if len(shape) else 0, labels, groups, attrs)
    if problem is None and labels is not None and len(labels) and not attrs.get("label_names") \
            and labels.max() > 100_000:  # no names to count against: a count this long is not ours
        problem = f"/labels holds class index {int(labels.max())} and no label_names"
    if problem:
        raise SimclrPathError(f"{path}: not a valid {what}: {problem}; recreate it with "
                              "simclr-path (--force)")
    checked = check_data(path, progress) if check else None
    try:
        return _describe(path, what, attrs, shape, labels, groups, thumb, checked)
    except (TypeError, ValueError, IndexError) as exc:  # an attribute of a type no writer gives
        raise SimclrPathError(f"{path}: {what} has an attribute of an unexpected type ({exc}); "
                              "recreate it with simclr-path (--force)") from None


def _describe(path: Path, what: str, attrs: dict, shape: tuple, labels, groups,
              thumb, checked: str | None = None) -> list[str]:
    """The summary lines of :func:`summary` from what it read."""
    import numpy as np

    from simclr_path.errors import SimclrPathError

    def a(key, fmt="{}"):
        v = attrs.get(key)
        return "-" if v is None else fmt.format(v)

    lines = [_printable(f"{path}: {what} (format {attrs['format_version']}, simclr-path "
                        f"{a('simclr_path_version')})")]
    rows: list[tuple[str, str]] = []
    if what == "patch store":
        rows += [("kind", a("kind")), ("slide id", a("slide_id")), ("source", a("source_path")),
                 ("patches", f"{shape[0]} x {shape[1]}x{shape[2]} px")]
        if attrs.get("kind") == "slide":
            eff = attrs.get("mpp_effective")
            exact = ("" if eff is None or eff == attrs.get("mpp")
                     else f" (exactly {eff:.4g}: a level that close is read without resampling)")
            bounds = [] if attrs.get("bounds_x") is None else [(
                "bounds", f"scanned region from ({attrs['bounds_x']}, {attrs['bounds_y']}) px")]
            rows += [("mpp", a("mpp", "{:g} um/px") + exact),
                     ("level-0 mpp", (f"{a('level0_mpp', '{:.4g} um/px')} (from "
                                     f"{a('mpp_source')})")),
                     ("stride", a("stride", "{} px")),
                     *bounds,
                     ("read level", f"{a('level')} ({a('level_mpp', '{:.4g} um/px')})")]
            tissue = {k.split(".", 1)[1]: v for k, v in attrs.items() if k.startswith("tissue.")}
            if tissue:
                rows.append(("tissue", " ".join(f"{k}={v}" for k, v in sorted(tissue.items()))))
            rows.append(("thumbnail", f"{thumb[1]}x{thumb[0]} px" if thumb else "none"))
        elif attrs.get("bit_depth"):
            rows.append(("bit depth", f"16-bit samples scaled from {attrs['bit_depth']} bits"))
    else:
        rows += [("slide id", a("slide_id")), ("source store", a("source_store")),
                 ("features", f"{shape[0]} x {shape[1] if len(shape) > 1 else 0}"),
                 ("encoder", f"{a('arch')} layer {a('layer')} image size {a('image_size')}"
                             + (" tta" if attrs.get("tta") else ""))]
    if labels is not None:
        names = attrs.get("label_names") or []
        if len(labels) and labels.min() < 0:  # a foreign or hand-made store: no count to show
            raise SimclrPathError(f"{path}: labels hold a negative class index ({labels.min()}); "
                                  "not labels simclr-path wrote: import the tiles again")
        counts = np.bincount(labels, minlength=len(names)) if len(labels) else []
        rows.append(("labels", ", ".join(
            f"{names[i] if i < len(names) else i}: {int(c)}" for i, c in enumerate(counts))
            or "none"))
    if groups is not None:
        uniq = {g for g in groups if g not in (b"", "")}
        rows.append(("groups", str(len(uniq)) if uniq else "none"))
    rows.append(("file size", _size(path.stat().st_size)))
    if checked:
        rows.append(("check", checked))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {_printable(v)}" for k, v in rows]
    return lines


def _printable(text: str) -> str:
    """``text`` as it is, or its repr where it holds control or format characters: a store
    from elsewhere could clear the terminal or print a line of its own (a slide id of
    "S1\x1b[2J" or "x\r\nverdict  all good")."""
    import unicodedata

    if any(unicodedata.category(c) in ("Cc", "Cf") for c in text):
        return repr(text)
    return text


def check_data(path: Path, progress: bool = True) -> str:
    """What a read of all of ``path``'s data found (raises SimclrPathError, naming the damaged
    rows, when some cannot be read)."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import damaged_rows

    bad = damaged_rows(path, progress=progress)
    if bad:
        where = "; ".join(
            f"{name} rows " + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:5])
            + (f" and {len(ranges) - 5} more ranges" if len(ranges) > 5 else "")
            for name, ranges in bad.items())
        raise SimclrPathError(
            f"{path}: damaged: {where} cannot be read or hold values no writer gives (a disk or "
            "copy error); make the file again ('simclr-path tile', 'import-patches' or 'embed' "
            "with --force) or copy it again from its source")
    return "every patch and feature read: no damage found"


def run(args: argparse.Namespace) -> int:
    print("\n".join(summary(args.store, check=args.check, progress=not args.no_progress)))
    return 0
