"""Inductive check of ``bench_quality.py``: pretrain once per outer fold, on its training images only.

``bench_quality.py`` pretrains once on every tile, the test folds' included (transductive, as the
quality issue specifies; labels are never seen). A user's new slides are not in their encoder's
pretraining set. This script measures the difference on one grouped split of a finished
``bench_quality.py --work WORK`` folder: for each outer fold it writes a patch store of the
training folds' tiles alone, pretrains on it with the run's own configuration
(``WORK/simclr-run/config.yaml``, the views it trained) for as many steps as the run made in its
budget (so a busy machine changes the wall time, not the result; ``--budget-s`` trains to a time
budget instead), embeds every tile with that encoder at the feature set's size
and layer, fits the project's linear probe (``classify.fit_probe``: the same inner grouped C
search and seed as ``classify``) on the training folds and scores the test fold. The pooled
out-of-fold scores are printed beside the transductive probe's on the same split (read from
``WORK/probe/<set>/split<seed>/predictions_patches.csv``) and the random-init baseline's. Before
any training it refits the transductive features fold by fold and checks that the stored
predictions come back, so both sides use one procedure on one split.

Each fold's warm-up lasts the run's number of steps (warm-up is set in epochs, and a fold's
epoch is shorter). Costs one pretraining run per outer fold (5 x about 600 s with the
``cpu-fast`` preset here). Finished folds (``WORK/inductive/split<seed>/fold<f>/``: the run,
what it was trained for in ``request.json``, one embedding file per feature set) are reused,
so an interrupted check goes on where it stopped; ``--fresh`` redoes them.

    python benchmarks/probe_inductive.py WORK [--set simclr-168] [--split 0] [--budget-s 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # the benchmark's positive class and summaries
import probe_knn as pk  # the linear probe's outer folds and out-of-fold predictions, and scores


def write_subset(store: Path, rows: np.ndarray, out: Path) -> Path:
    """A patch store ``out`` of ``store``'s patches ``rows`` (sorted indices), labels, groups and
    names kept (pretraining reads none of them), attributes copied."""
    from simclr_path.store import PatchStore, PatchStoreWriter

    with PatchStore(store) as s, PatchStoreWriter(out, s.patch_size, attrs=s.attrs,
                                                   label_names=s.label_names, force=True) as w:
        names = s.names
        for lo in range(0, len(rows), 256):
            r = rows[lo:lo + 256]
            w.append(s[r], s.coords[r], labels=np.asarray(s.labels)[r],
                     groups=[s.groups[i] for i in r],
                     names=None if names is None else [names[i] for i in r])
    return out


def refit(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: np.ndarray,
          classes: list[str], cfg, features_of=None) -> np.ndarray:
    """Out-of-fold class probabilities (N, K) of the linear probe fitted per outer fold.

    ``x`` (N, D) features; ``features_of(f)`` gives fold ``f``'s own (N, D) features instead
    (the inductive encoders: one per fold)."""
    from simclr_path.classify import fit_probe

    proba = np.full((len(y), len(classes)), np.nan)
    for f in np.unique(folds):
        xf = x if features_of is None else features_of(int(f))
        te, tr = folds == f, folds != f
        pipe, _, _ = fit_probe(xf[tr], y[tr], groups[tr], classes, cfg)
        proba[te] = pipe.predict_proba(xf[te])
    return proba


def run(args: argparse.Namespace) -> dict[str, Any]:
    from simclr_path.config import load_config
    from simclr_path.data import BatchPlan
    from simclr_path.embed import embed_store
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import EmbeddingStore
    from simclr_path.train import pretrain

    work = args.work
    cfg_path = work / "simclr-run" / "config.yaml"
    if not cfg_path.is_file():
        raise SimclrPathError(f"{cfg_path}: not found; give a bench_quality.py --work folder "
                              "whose pretraining finished")
    if args.budget_s is not None and args.budget_s <= 0:
        raise SimclrPathError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.set is None:  # the run's one SimCLR feature set (bench_quality --embed-size default)
        sets = sorted(p.name for p in (work / "probe").glob("simclr-*") if p.is_dir())
        if len(sets) != 1:
            raise SimclrPathError(f"{work / 'probe'}: {len(sets)} SimCLR feature sets "
                                  f"({', '.join(sets) or 'none'}); choose one with --set")
        args.set = sets[0]
    emb, classes, pos, splits = pk.read_splits(work, args.set)
    chosen = [s for s in splits if s[0] == args.split]
    if not chosen:
        raise SimclrPathError(f"{work / 'probe' / args.set}: no split{args.split}; splits there: "
                              f"{', '.join(str(s[0]) for s in splits)}")
    _, folds, trans_proba = chosen[0]
    y, groups = np.asarray(emb.labels), np.asarray(emb.groups, dtype=object)
    store = Path(emb.attrs["source_store"])
    if not store.is_file():
        raise SimclrPathError(f"{emb.path}: its patch store {store} is gone; rerun "
                              f"bench_quality.py --work {work}")
    cfg = load_config(cfg_path)
    probe_cfg = dataclasses.replace(cfg.classify, seed=args.split)
    # one procedure on both sides: the transductive probe, refitted here, must give its CSV back
    again = refit(emb.features, y, groups, folds, classes, probe_cfg)
    if not np.allclose(again, trans_proba, atol=1e-6):
        raise SimclrPathError(f"{work / 'probe' / args.set}/split{args.split}: refitting the "
                              "probe does not reproduce its predictions (another classify "
                              "config or code version?); rerun bench_quality.py --run")
    # the run's config.yaml holds the views it trained (a fitted fallback's too): keep them, so
    # that only the pretraining set differs; and its step count, unless a budget is asked for
    run_summary = json.loads((work / "simclr-run" / "summary.json").read_text())
    run_steps = int(run_summary["steps"])
    # warm-up is set in epochs, and a fold's epoch is shorter (fewer tiles): keep its steps
    run_warm = round(cfg.train.warmup_epochs * int(run_summary["steps_per_epoch"]))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, budget_min_steps=None, time_budget_s=args.budget_s,
        max_steps=run_steps if args.budget_s is None else None))
    request = {"steps": None if args.budget_s is not None else run_steps,
               "budget_s": args.budget_s, "warmup_steps": run_warm}
    ecfg = dataclasses.replace(cfg.embed, image_size=int(emb.attrs["image_size"]),
                               layer=str(emb.attrs.get("layer") or cfg.embed.layer))
    base = work / "inductive" / f"split{args.split}"
    feats: dict[int, np.ndarray] = {}
    per_fold = []
    for f in (int(v) for v in np.unique(folds)):
        d = base / f"fold{f}"
        train_rows = np.flatnonzero(folds != f)
        spe = BatchPlan([len(train_rows)], cfg.train.batch_size, cfg.train.seed,
                        cfg.train.max_patches_per_slide).batches_per_epoch
        fcfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, warmup_epochs=run_warm / spe))
        asked = d / "request.json"  # what the fold's encoder was trained for
        trained = (d / "run" / "summary.json").is_file() and asked.is_file() and \
            json.loads(asked.read_text()) == request
        if args.fresh or not trained:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            sub = write_subset(store, train_rows, d / "train.h5")
            t0 = time.perf_counter()
            pretrain([sub], d / "run", fcfg, force=True, progress=not args.no_progress)
            sub.unlink()  # a copy of the tiles: 80 % of the store's size
            asked.write_text(json.dumps(request))
            print(f"fold {f}: pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
        emb_path = d / f"{args.set}.h5"  # one per feature set (embedding size and layer)
        if not emb_path.is_file() or not trained or args.fresh:
            embed_store(d / "run" / "encoder.pt", store, emb_path, ecfg, force=True,
                        progress=not args.no_progress)
        summary = json.loads((d / "run" / "summary.json").read_text())
        if args.budget_s is None and summary.get("steps") != run_steps:
            raise SimclrPathError(f"{d / 'run'}: trained {summary.get('steps')} steps, not the "
                                  f"run's {run_steps} (made with --budget-s?); pass --fresh")
        e = EmbeddingStore(emb_path)
        if not np.array_equal(e.labels, y) or len(e) != len(y) or \
                e.attrs.get("image_size") != ecfg.image_size or e.attrs.get("layer") != ecfg.layer:
            raise SimclrPathError(f"{e.path}: not an embedding of {store}'s patches at "
                                  f"{ecfg.image_size} px, layer {ecfg.layer}; pass --fresh")
        feats[f] = e.features
        per_fold.append({"fold": f, "n_train_tiles": int((folds != f).sum()),
                         "n_train_groups": len(set(groups[folds != f])),
                         "steps": summary.get("steps"), "warmup_steps": run_warm,
                         "wall_time_s": summary.get("wall_time_s")})
    ind_proba = refit(None, y, groups, folds, classes, probe_cfg, features_of=feats.__getitem__)
    rows = {"transductive": pk._scores(y, trans_proba, pos, groups),
            "inductive": pk._scores(y, ind_proba, pos, groups)}
    rand = work / "probe" / args.set.replace("simclr", "random-init", 1)
    if rand.is_dir() and rand.name != args.set:
        _, _, _, rsplits = pk.read_splits(work, rand.name)
        rows["random-init"] = pk._scores(y, next(p for s, _, p in rsplits if s == args.split),
                                         pos, groups)
    for r in rows.values():
        r["missed_groups"] = sorted(g for g, v in r.pop("group_accuracy").items() if v < 0.5)
    return {"work": str(work), "set": args.set, "split": args.split,
            "budget_s": cfg.train.time_budget_s, "run_steps": run_steps, "folds": per_fold,
            "rows": rows}


def print_result(res: dict[str, Any]) -> None:
    how = (f"the run's {res['run_steps']} steps" if res["budget_s"] is None else
           f"a {res['budget_s']:g} s budget")
    print(f"\n{res['set']}, split {res['split']} (fold seed), pretraining per fold: {how}")
    for f in res["folds"]:
        print(f"  fold {f['fold']}: pretrained on {f['n_train_tiles']} tiles of "
              f"{f['n_train_groups']} source images, {f['steps']} steps")
    print(f"{'pretraining':14s} {'SCC AUROC':>9s} {'bal. acc':>8s}  source images missed")
    for name, r in res["rows"].items():
        print(f"{name:14s} {r['auroc_scc']:9.4f} {r['balanced_accuracy']:8.4f}  "
              f"{len(r['missed_groups'])}: {', '.join(r['missed_groups'])}")
    t, i = res["rows"]["transductive"], res["rows"]["inductive"]
    print(f"inductive - transductive: AUROC {i['auroc_scc'] - t['auroc_scc']:+.4f}, "
          f"bal. acc {i['balanced_accuracy'] - t['balanced_accuracy']:+.4f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a finished bench_quality.py --work folder")
    ap.add_argument("--set", default=None,
                    help="the SimCLR feature set (embedding stem) to compare [the run's one]")
    ap.add_argument("--split", type=int, default=0, help="the grouped split (fold seed) [0]")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="pretrain each fold to this time budget [as many steps as the run]")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--fresh", action="store_true", help="redo folds finished before")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    res = run(args)
    print_result(res)
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    bq.cli(main)
