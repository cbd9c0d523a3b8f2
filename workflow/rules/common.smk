# Config validation, the samples sheet, per-run configurations and target lists.
#
# Everything here runs at DAG build. A user error (bad config value, broken samples sheet,
# missing slide) stops the build with ONE line naming the field or row (raised as a
# WorkflowError, so Snakemake prints the message and no Python traceback).
import copy
import hashlib
import os
import re
import shlex
import zlib
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from simclr_path import config as spc
from simclr_path.import_patches import folder_digest
from simclr_path.errors import SimclrPathError
from simclr_path.samples import case_clash, read_samples

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
SECTIONS = [
    f for f in spc.defaults_dict()
]  # tile, augment, model, train, embed, classify


def config_where(run, section, key):
    """Where a run's `section.key` was set, for a message: its runs entry or the top level."""
    over = (config["runs"][run] or {}).get(section) or {}
    return f"config runs.{run}" if key in over else "config"


def keys_but(section, *left_out):
    """The keys of config `section`, less those a stage's command line sets."""
    return tuple(k for k in spc.defaults_dict()[section] if k not in left_out)


# Which config sections (all keys, or only those listed) each CLI stage reads: one YAML per stage
# and run, so that changing a key reruns only the stages that read it (the classifier's folds
# rerun classification, not pretraining; the t-SNE sample size the t-SNE figure alone).
STAGE_KEYS = {
    "pretrain": {"augment": None, "model": None, "train": None},
    # the augmentation preview draws the views alone: a training setting must not redraw it
    # (but a time budget that may fit the views makes it read the run's config: preview_config)
    "preview": {"augment": None},
    "embed": {"embed": None},
    # layer-wise evaluation gives --layer: the run's embed.layer must not rerun those jobs
    "embed_layer": {"embed": keys_but("embed", "layer")},
    "classify": {"classify": spc.CLASSIFY_PROBE_KEYS},
    "tsne": {"classify": spc.CLASSIFY_TSNE_KEYS},
    # fine-tuning also reads classify (labels, folds, top-k) and train (tracking switches)
    "finetune": {
        # label fractions come from finetune_eval (--label-fraction)
        "finetune": keys_but("finetune", "label_fraction"),
        "classify": spc.CLASSIFY_FINETUNE_KEYS,
        "train": None,
        # its default input size is the probe's (finetune.image_size: null)
        "embed": ("image_size",),
    },
}


def warn(message):
    """One warning line on stderr, in the form the CLI's warnings take.

    Once per run: the processes that Snakemake spawns for `run:` jobs (and cluster jobs) parse
    the workflow again.
    """
    import sys

    if not workflow.is_main_process:
        return
    print(f"simclr-path workflow: warning: {message}", file=sys.stderr, flush=True)


def fail(message):
    """Stop the DAG build with one clear line on stderr and exit status 1 (no traceback)."""
    import sys

    print(f"simclr-path workflow: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


SCHEMA_DICT = yaml.safe_load(SCHEMA.read_text())

# Snakemake reads config files keeping the last of two equal keys in silence (a second tile:
# section, a run named twice): read again, refusing that, as simclr-path's --config is read
for _configfile in workflow.configfiles:
    try:
        yaml.load(
            Path(_configfile).read_text(encoding="utf-8"), Loader=spc.UniqueKeyLoader
        )
    except spc.DuplicateKeyError as exc:
        fail(f"{_configfile}: {exc}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass  # Snakemake has read it: its own reading stands

if not Path("config/config.yaml").is_file():
    # the Snakefile's `configfile:` is read from the working directory: from elsewhere only the
    # --configfile given and the schema's defaults apply, without a word from Snakemake
    warn(
        f"no config/config.yaml in {Path.cwd()}; only --configfile/--config and the defaults "
        "apply, not the demo's base config (run from the repository root or pass --directory "
        f"{workflow.basedir} to use it)"
    )


def check_schema(cfg):
    """One-line schema error (field path + problem) before Snakemake's verbose validation."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA_DICT)
    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        fail(
            f"config: {where}: {error.message} (see workflow/schemas/config.schema.yaml "
            "or `simclr-path schema`)"
        )


def from_text(value, schema):
    """``value`` with text that reads as the schema's number or boolean converted to it.

    ``--config`` parses nested values with YAML's BaseLoader, so ``report={'auto': False}``
    arrives as ``{'auto': 'False'}``, and YAML 1.1 reads ``lr: 1e-4`` as a string. Only the
    words true/false become booleans (not yes/no); anything else is left for the schema to name.
    """
    while "$ref" in schema:  # "#/$defs/NAME"
        schema = SCHEMA_DICT["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {k: from_text(v, props.get(k, extra)) for k, v in value.items()}
    if isinstance(value, list):
        return [from_text(v, schema.get("items") or {}) for v in value]
    if not isinstance(value, str):
        return value
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    text = value.strip()
    # null (`runs={baseline: null}`), where no text is allowed that could mean the word itself
    if "null" in kinds and "string" not in kinds and text in spc.NULL_TEXT:
        return None
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if ("integer" in kinds or "number" in kinds) and spc.NUMBER.fullmatch(text):
        number = float(text)
        if "integer" in kinds and number.is_integer():
            return int(number)
        if "number" in kinds:
            return number
    return value


def coerce_sections(cfg):
    """In place, in the sections and in every run, before the schema sees them: numbers and
    booleans written as text (``--config`` values, YAML 1.1's ``lr: 1e-4``) become numbers and
    booleans in every key the schema types (from_text), and a stage value of the wrong type
    fails with one line (simclr_path.config.coerce_section).
    """
    cfg.update(from_text(dict(cfg), SCHEMA_DICT))
    runs = cfg.get("runs")
    runs = runs if isinstance(runs, dict) else {}  # anything else: the schema names it
    try:
        for where, sections in [
            ("config", cfg),
            *((f"config runs.{run}", over) for run, over in runs.items()),
        ]:
            if not isinstance(sections, dict):
                continue  # the schema names it
            for s in SECTIONS:
                if isinstance(sections.get(s), dict):
                    sections[s] = spc.coerce_section(s, sections[s], where)
    except SimclrPathError as exc:
        fail(str(exc))


coerce_sections(config)
# The user's values before defaults are filled: a preset must not be masked by schema defaults.
USER_CONFIG = copy.deepcopy(config)
check_schema(USER_CONFIG)
validate(
    config, str(SCHEMA)
)  # fills every default (one source of truth: simclr_path.config)


def resolved_config(run=None):
    """The resolved PipelineConfig: defaults < preset < config sections < runs[run] overrides."""
    top = {s: USER_CONFIG.get(s) or {} for s in SECTIONS}
    preset = USER_CONFIG.get("preset", "default")
    where = "config"
    over = {}
    if run is not None:
        over = dict(config["runs"][run] or {})
        preset = over.pop("preset", preset)
        over.pop("description", None)
        where = f"config runs.{run}"
    try:
        merged = spc.merge_overrides(
            spc.merge_overrides({}, top, "config"), over, where
        )
        return spc.build_config(preset, merged, where)
    except SimclrPathError as exc:
        msg = str(exc)
        if run is not None and msg.startswith("config: "):  # name the run that is wrong
            msg = f"{where}: {msg[len('config: '):]}"
        fail(msg)


TILE_CFG = resolved_config()
# the schema's patterns are searched with Python's re, whose $ also matches before a final
# newline: "base\n" passed, and split the shell commands its name reaches
for _run in config["runs"]:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(_run)):
        fail(
            f"runs: run name {str(_run)!r} is not letters, digits, '_' and '-' (starting with "
            "a letter or digit); rename it"
        )
# on a case-insensitive disk (macOS, Windows) Base and base share every results folder
_clash = case_clash([str(r) for r in config["runs"]])
if _clash:
    fail(
        f"runs: run names {_clash[0]!r} and {_clash[1]!r} differ only in case, and on macOS "
        "or Windows would write the same results folders; rename one"
    )
if not re.fullmatch(
    r".+\.(html|zip)", str(config["report"]["path"])
):  # "." is no newline
    fail(
        f"report.path {str(config['report']['path'])!r}: give a file name ending in .html or "
        ".zip, on one line"
    )
RUNS = list(config["runs"])
LAYERS = list(dict.fromkeys(config["layer_eval"]))
# Fine-tuning label fractions as written in results paths (1.0 -> "1.0", 0.01 -> "0.01").
FRACTIONS = list(dict.fromkeys(str(float(f)) for f in config["finetune_eval"]))
# The linear probe at those fractions below 1 (rule classify_fraction; 1.0 is rule classify).
PROBE_FRACTIONS = [f for f in FRACTIONS if float(f) < 1.0]
RUN_CFG = {run: resolved_config(run) for run in RUNS}


# Settings of how fast a stage runs, not of what it writes. They stay out of the stage YAMLs,
# whose changes rerun the stage, and reach the command line through `threads` or `resources`,
# which never trigger a rerun: a new worker count must not retrain an encoder.
SPEED_KEYS = spc.SPEED_KEYS


def speed_options(section):
    """A `resources` function: the SPEED_KEYS of config `section` as its stage's command-line
    options (--KEY, with dashes; a switch as --KEY or --no-KEY). tile.workers is the tile job's
    `threads` instead, which Snakemake scales down to --cores."""

    def options(wildcards):
        cfg = getattr(
            TILE_CFG if section == "tile" else RUN_CFG[wildcards.run], section
        )
        out = []
        for key in SPEED_KEYS[section]:
            if (section, key) == ("tile", "workers"):
                continue
            value, flag = getattr(cfg, key), key.replace("_", "-")
            if isinstance(value, bool):
                out.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                out.append(f"--{flag} {value}")
        return " ".join(out)

    return options


def without_speed_keys(sections):
    """A copy of config `sections` (the top level, or one run's overrides) without the
    SPEED_KEYS, and without the sections that leaves empty."""
    out = copy.deepcopy(sections or {})
    for section, keys in SPEED_KEYS.items():
        values = out.get(section)
        if isinstance(values, dict):
            for key in keys:
                values.pop(key, None)
            if not values:
                del out[section]
    return out


def stage_values(run, stage):
    """Resolved sections one CLI stage reads, as a plain dict (written to its --config YAML),
    less the SPEED_KEYS."""
    if stage == "tile":
        out = {"tile": spc.to_dict(TILE_CFG)["tile"]}
    else:
        full = spc.to_dict(RUN_CFG[run])
        out = {
            s: full[s] if keys is None else {k: full[s][k] for k in keys}
            for s, keys in STAGE_KEYS[stage].items()
        }
    return without_speed_keys(out)


def sharing(stages, made):
    """Run -> the run whose outputs of ``stages`` it uses, among the runs with the same
    settings for all of them (less the SPEED_KEYS): the first (in config order) whose outputs
    exist (``made(run)``), else the first. Runs that differ only in what comes later (a
    classifier ablation) share one pretraining and one set of embeddings instead of computing
    the same ones again; a run added above one that has its results does not take them over
    (which would rerun all that reads them). To repeat a pretraining, give each run its own
    train.seed."""

    keys = {
        run: yaml.safe_dump([stage_values(run, s) for s in stages], sort_keys=True)
        for run in RUNS
    }
    owner = {}
    # the made runs first (in config order), then the rest: the first of each key owns it
    done = [r for r in RUNS if made(r)]
    for run in done + [r for r in RUNS if r not in done]:
        owner.setdefault(keys[run], run)
    return {run: owner[keys[run]] for run in RUNS}


PRETRAIN_OF = sharing(
    ["pretrain"], lambda run: Path(f"results/pretrain/{run}/summary.json").is_file()
)
EMBED_OF = sharing(
    ["pretrain", "embed"],
    lambda run: any(Path(f"results/embeddings/{run}").glob("*.h5")),
)
LAYER_EMBED_OF = sharing(
    ["pretrain", "embed_layer"],
    lambda run: any(Path(f"results/embeddings/{run}/layers").glob("*/*.h5")),
)
FINETUNE_OF = sharing(
    ["pretrain", "finetune"],
    lambda run: any(Path(f"results/finetune/{run}").glob("labels_*/metrics.json")),
)


def say_sharing():
    """One line per shared pretraining: repeats of one setting (to see the spread of runs)
    would otherwise collapse into one in silence."""
    if not workflow.is_main_process:
        return
    for owner in dict.fromkeys(PRETRAIN_OF.values()):
        others = [r for r in RUNS if PRETRAIN_OF[r] == owner and r != owner]
        if others:
            logger.info(
                f"simclr-path workflow: run(s) {', '.join(others)} use run {owner}'s "
                "pretraining (equal pretraining settings); to repeat a pretraining, give "
                "each run its own train.seed"
            )


say_sharing()


def pretrained(name):
    """Input function: the file ``name`` of the pretraining the job's run uses."""
    return lambda wildcards: f"results/pretrain/{PRETRAIN_OF[wildcards.run]}/{name}"


# ---------------------------------------------------------------------------- samples sheet
DEMO = config["demo"]
DEMO_DIR = Path(DEMO["dir"])


def _is_demo_path(p):
    return Path(p).parent == DEMO_DIR


def load_samples(path):
    """Validated samples sheet; demo slides (under demo.dir) need not exist yet."""
    import warnings

    try:
        # the sheet's warnings (unused columns) as lines, not Python's file:line form
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = read_samples(
                path, labels=TILE_CFG.classify.labels, check_files=False, base_dir="."
            )
    except SimclrPathError as exc:
        fail(str(exc))
    for w in caught:
        warn(str(w.message))
    validate(df, "../schemas/samples.schema.yaml")
    for i, row in df.iterrows():
        where = f"{path}: row {i + 1} (slide_id {row.slide_id!r})"
        if _is_demo_path(row.path):
            if Path(row.path).name != f"{row.slide_id}.tiff":
                fail(
                    f"{where}: demo slides under {DEMO_DIR}/ must be named "
                    f"{{slide_id}}.tiff, got {row.path!r}"
                )
        elif not Path(row.path).exists():
            fail(
                f"{where}: slide file not found: {row.path}; fix the path (relative paths are "
                "resolved against the directory you run snakemake from)"
            )
    return df


SAMPLES = load_samples(config["samples"]) if config["samples"] else None
# indexed once: per lookup it cost 3 s at 5000 slides
SAMPLES_BY_ID = None if SAMPLES is None else SAMPLES.set_index("slide_id")
# how classify evaluates, for the report's captions (params: they see no samples sheet)
EVALUATION = "split" if SAMPLES is not None and "split" in SAMPLES.columns else "folds"
SLIDES = [] if SAMPLES is None else list(SAMPLES["slide_id"])
# heatmaps show held-out predictions: with a samples-sheet split only the test slides have them
HEATMAP_SLIDES = (
    SLIDES
    if SAMPLES is None or "split" not in SAMPLES.columns
    else list(SAMPLES.loc[SAMPLES["split"] == "test", "slide_id"])
)
PATCH_SETS = dict(config["patch_datasets"])
_clash = case_clash(list(PATCH_SETS))
if _clash:
    fail(
        f"config: patch_datasets {_clash[0]!r} and {_clash[1]!r} differ only in case, and on "
        "macOS or Windows would write the same files; rename one"
    )
for _name in PATCH_SETS:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", _name) or ".." in _name:
        fail(
            f"config: patch_datasets.{_name}: not a safe file name (letters, digits, . _ -)"
        )
    if _name.casefold() in {s.casefold() for s in SLIDES}:
        fail(
            f"config: patch_datasets.{_name}: the name is also a slide_id in {config['samples']}"
        )
    if not Path(PATCH_SETS[_name]["dir"]).is_dir():
        fail(
            f"config: patch_datasets.{_name}.dir: folder not found: {PATCH_SETS[_name]['dir']}"
        )
    _groups = PATCH_SETS[_name].get("groups")
    if _groups and not Path(_groups).is_file():
        fail(
            f"config: patch_datasets.{_name}.groups: file not found: {_groups}; give the CSV "
            "of tile path -> group (relative to where you run snakemake), or null for one "
            "group per tile"
        )
if not SLIDES and not PATCH_SETS:
    fail("config: no data; set 'samples' (a samples sheet) and/or 'patch_datasets'")

# Every store is pretrained on; classification uses the slides (labels from the samples sheet)
# when there are any, else the imported patch sets (labels and groups from the stores).
STORES = SLIDES + list(PATCH_SETS)
CLASSIFY_IDS = SLIDES if SLIDES else list(PATCH_SETS)
DEMO_SLIDES = (
    []
    if SAMPLES is None
    else [r.slide_id for r in SAMPLES.itertuples() if _is_demo_path(r.path)]
)


def check_demo_artefacts():
    """An unknown artefact failed only in the demo-slide job, after Snakemake had deleted the
    slide it was to rewrite. (Ids that no demo slide has are not an error: the keys of
    config/config.yaml stay in every config merged over it.)"""
    from simclr_path.demo import parse_artefacts

    if not DEMO_SLIDES:  # a project's own slides: the demo settings play no part
        return
    for sid, value in DEMO["artefacts"].items():
        try:
            parse_artefacts(str(value))
        except SimclrPathError as exc:
            fail(f"config: demo.artefacts.{sid}: {exc} (comma-separated)")


check_demo_artefacts()


def check_positive_label():
    """Stop the build when classify cannot find the positive class: it would fail only at
    classification, after hours of pretraining (simclr_path.classify.positive_index).

    Returns each run's positive class as classify will find it ("" for macro one-vs-rest).
    """
    from simclr_path.classify import positive_index

    if SLIDES:
        source = config["samples"]
        present = set(SAMPLES["label"])
    else:  # import-patches labels the tiles by their class subfolders
        source = "the class subfolders of patch_datasets"
        present = {
            d.name
            for ds in PATCH_SETS.values()
            for d in Path(ds["dir"]).iterdir()
            if d.is_dir() and not d.name.startswith(".")
        }
    warned = set()  # label lists warned about (one line each, not one per run)
    positive = {}
    for run, cfg in RUN_CFG.items():
        ccfg = cfg.classify
        classes = (
            [c for c in ccfg.labels if c in present] if SLIDES else sorted(present)
        )
        if (
            not SLIDES
            and ccfg.labels != spc.ClassifyConfig().labels
            and set(ccfg.labels) != present
            and tuple(ccfg.labels) not in warned
        ):
            warned.add(tuple(ccfg.labels))
            # a subset listed to leave a class out would do nothing, without a word
            warn(
                f"classify.labels {ccfg.labels} is read from a samples sheet only; imported "
                f"tiles take their classes from the class subfolders ({', '.join(sorted(present))}), "
                "so all of them are classified: to leave a class out, leave its folder out"
            )
        over = (config["runs"][run] or {}).get("classify") or {}
        left_out = sorted(present - set(ccfg.labels)) if SLIDES else []
        if left_out and "labels" in over:
            # the sheet is checked against the top-level labels only; classify would refuse
            # these rows after pretraining
            fail(
                f"config runs.{run}: classify.labels {list(ccfg.labels)} leaves out label(s) "
                f"{', '.join(map(repr, left_out))} of {source}; list every label of the sheet "
                "(classify would refuse those rows after pretraining)"
            )
        if len(classes) < 2:
            positive[run] = ""
            continue  # the sheet checks say what is missing
        where = f"config runs.{run}: " if "positive_label" in over else "config: "
        try:
            index = positive_index(classes, ccfg.positive_label, source)
        except SimclrPathError as exc:
            fail(f"{where}{exc}")
        positive[run] = "" if index is None else str(classes[index])
    return positive


# each run's positive class as classify will find it ("" for macro one-vs-rest scores), for
# the report's captions
POSITIVE = check_positive_label()


def check_patients_per_class():
    """Warn at the start when a class has slides of fewer than 2 patients (patient-grouped
    evaluation cannot test it) or the sheet's split cannot evaluate the classes: classify
    would say so only after pretraining. A warning, not a stop: tiling or pretraining a pilot
    sheet by target is legitimate."""
    from simclr_path.classify import patients_per_class, split_problem

    if not SLIDES:
        return
    for run, cfg in RUN_CFG.items():
        labels = [c for c in cfg.classify.labels if c in set(SAMPLES["label"])]
        problem = split_problem(SAMPLES, labels) if "split" in SAMPLES.columns else None
        if problem:
            warn(
                f"{config['samples']}: {problem} (classify would stop after pretraining)"
            )
            return
        if (
            "split" in SAMPLES.columns
            and SAMPLES.loc[SAMPLES["split"] == "test", "label"].nunique() < 2
            and len(labels) > 1
        ):
            warn(
                f"{config['samples']}: the test slides of the split are all of one class, so "
                "AUROC and balanced accuracy cannot be computed; put slides of every class "
                "on the test side"
            )
            return
        scarce = {c: n for c, n in patients_per_class(SAMPLES, labels).items() if n < 2}
        if scarce:
            c, n = next(iter(scarce.items()))
            warn(
                f"{config['samples']}: class {c!r} has slides from only {n} patient(s); "
                "classify will stop after pretraining: patient-grouped evaluation needs at "
                "least 2 patients per class (a patient is never on both sides of a split; 5 or "
                "more for a confidence interval); add slides from more patients"
            )
            return


check_patients_per_class()


def check_tile_sets():
    """The tile sets' check_patients_per_class: fewer than 2 classes, or a class whose tiles
    come from one source image (group), stop classify only after pretraining. Warnings, as
    for a sheet; a tile that the groups CSV lacks stops the build (the import would fail).
    """
    from simclr_path.import_patches import list_tiles, read_groups

    # once per run: it walks every tile (the processes Snakemake spawns parse the workflow too)
    if SLIDES or not PATCH_SETS or not workflow.is_main_process:
        return
    # class -> its groups over every set (the sets are classified together)
    groups_of = {}
    import warnings

    for name, ds in PATCH_SETS.items():
        try:
            # their warnings (skipped files) as lines, not Python's file:line form
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                classes, tiles = list_tiles(Path(ds["dir"]))
            names = [t for t, _ in tiles]
            groups = read_groups(ds["groups"], names) if ds.get("groups") else None
        except SimclrPathError as exc:
            fail(f"config: patch_datasets.{name}: {exc}")
        for w in caught:
            warn(str(w.message))
        for i, (tile, label) in enumerate(tiles):
            # no groups CSV: every tile is its own group
            group = groups[i] if groups and groups[i] else f"{name}:{tile}"
            groups_of.setdefault(classes[label], set()).add(group)
    if len(groups_of) < 2:
        warn(
            f"patch_datasets: the tiles hold one class ({', '.join(groups_of)}); classify needs "
            "two or more class folders and would stop after pretraining"
        )
        return
    scarce = {c: len(g) for c, g in groups_of.items() if len(g) < 2}
    if scarce:
        c, n = next(iter(scarce.items()))
        warn(
            f"patch_datasets: class {c!r} has tiles of only {n} source image (group); "
            "grouped evaluation needs 2 or more per class and classify would stop after "
            "pretraining; add tiles of more source images"
        )


check_tile_sets()


def check_fraction_design():
    """finetune_eval compares the probe and fine-tuning at the fractions it lists; the main
    probe (its 1.0 row, the runs table) at a classify.label_fraction of its own would pass for
    the full-label probe. finetune.label_fraction is the CLI's: the workflow fine-tunes at the
    finetune_eval fractions alone."""
    default = spc.FinetuneConfig().label_fraction
    unused = {}  # one line for a top-level value that every run inherits
    for run, cfg in RUN_CFG.items():
        if cfg.finetune.label_fraction != default:
            where = config_where(run, "finetune", "label_fraction")
            unused[where] = cfg.finetune.label_fraction
    for where, fraction in unused.items():
        listed = any(float(f) == fraction for f in FRACTIONS)
        warn(
            f"{where}: finetune.label_fraction {fraction:g} is not used by the workflow, which "
            "fine-tunes at the fractions listed in finetune_eval (now "
            f"{', '.join(FRACTIONS) or 'none'}); "
            + ("it is listed there: remove the key" if listed else "list it there")
        )
    if not FRACTIONS:
        return
    for run, cfg in RUN_CFG.items():
        if cfg.classify.label_fraction < 1.0:
            where = config_where(run, "classify", "label_fraction")
            fail(
                f"{where}: classify.label_fraction {cfg.classify.label_fraction:g} with "
                "finetune_eval: the comparison sets the fractions itself (the probe's 1.0 row is "
                "rule classify); leave classify.label_fraction at 1 and list the fractions in "
                "finetune_eval"
            )


check_fraction_design()


def check_layers():
    """A layer_eval entry a run's model lacks (stage7 of a 5-stage ResNet, head without a
    projection head) fails embed_layer only after pretraining: build each arch's backbone on
    PyTorch's meta device (no memory, no weights) and ask. Only with stage or head layers:
    importing torch costs every DAG build 2-3 s."""
    if not any(layer != "pooled" for layer in LAYERS):
        return
    import torch

    from simclr_path.embed import FeatureExtractor
    from simclr_path.model import create_backbone

    backbones = {}
    for run, cfg in RUN_CFG.items():
        arch = cfg.model.arch
        try:
            if arch not in backbones:
                with torch.device("meta"):
                    backbones[arch] = create_backbone(arch)
            for layer in LAYERS:  # every run saves a head (the identity at depth 0)
                FeatureExtractor(backbones[arch], layer, torch.nn.Identity())
        except SimclrPathError as exc:
            fail(f"config layer_eval (run {run}, model.arch {arch}): {exc}")


def check_views_and_models():
    """What pretraining would refuse only after every slide is tiled (hours for a cohort):
    views larger than the stores' patches, and a model.arch timm does not know (checked on
    PyTorch's meta device, and only for names outside the presets: importing torch costs the
    DAG build 2-3 s)."""
    sizes = {}
    for name, ds in PATCH_SETS.items():
        if ds.get("patch_size"):
            sizes[f"patch_datasets.{name}.patch_size"] = int(ds["patch_size"])
    # slides, and patch sets without a patch_size of their own, are at tile.patch_size
    if SLIDES or any(not ds.get("patch_size") for ds in PATCH_SETS.values()):
        sizes["tile.patch_size"] = TILE_CFG.tile.patch_size
    known = {spc.ModelConfig().arch} | {
        p.get("model", {}).get("arch") for p in spc.PRESETS.values()
    }
    for run, cfg in RUN_CFG.items():
        a = cfg.augment
        views = [("augment.image_size", a.image_size)]
        if a.local_crops:
            views.append(("augment.local_size", a.local_view_size))
        for key, size in sizes.items():
            for view, px in views:
                if px > size:
                    fail(
                        f"config (run {run}): {view} {px} is larger than the {size} px patches "
                        f"of {key}; lower {view} or raise {key}"
                    )
    for run, cfg in RUN_CFG.items():
        weights = cfg.model.weights
        if weights and not Path(weights).is_file():
            where = config_where(run, "model", "weights")
            fail(
                f"{where}: model.weights: file not found: {weights}; give a local timm state "
                "dict (relative paths are resolved against the directory you run snakemake "
                "from), or null"
            )
    unknown = {
        cfg.model.arch: run
        for run, cfg in RUN_CFG.items()
        if cfg.model.arch not in known
    }
    if not unknown:
        return
    import torch

    from simclr_path.model import create_backbone

    for arch, run in unknown.items():
        try:
            with torch.device("meta"):
                create_backbone(arch)
        except SimclrPathError as exc:
            fail(f"config (run {run}, model.arch {arch}): {exc}")


check_views_and_models()
check_layers()  # after: an unknown arch is a model error, not a layer one


def one_of(names):
    """Wildcard regex matching exactly these names (never matches when the list is empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


wildcard_constraints:
    run=one_of(RUNS),
    layer=one_of(LAYERS),
    fraction=one_of(FRACTIONS),
    slide=one_of(SLIDES),
    dataset=one_of(list(PATCH_SETS)),
    store=one_of(STORES),
    demo_slide=one_of(DEMO_SLIDES),


def sample(slide):
    return SAMPLES_BY_ID.loc[slide]


def slide_mpp_arg(wildcards):
    """``--slide-mpp X`` when the samples sheet gives the slide's mpp, else nothing."""
    if "mpp" not in SAMPLES.columns:
        return ""
    value = sample(wildcards.slide)["mpp"]
    return "" if value != value else f"--slide-mpp {value}"  # NaN check


def store_path(name):
    return f"results/patches/{name}.h5"


def run_stage_config(stage):
    return f"results/config/{{run}}/{stage}.yaml"


def preview_config(wildcards):
    """The augmentation preview's config: the run's augment section, or where a time budget
    may fit the views to it (train.time_budget_s with budget_min_steps) the trained run's
    config.yaml, which holds the views it trained (the figure showed views never trained).
    """
    t = RUN_CFG[wildcards.run].train
    if t.time_budget_s is not None and t.budget_min_steps is not None:
        return f"results/pretrain/{PRETRAIN_OF[wildcards.run]}/config.yaml"
    return f"results/config/{wildcards.run}/preview.yaml"


def classify_embeddings(wildcards):
    """The embeddings the run's classifier reads: its own, or those of the first run with the
    same pretraining and embed settings (sharing)."""
    return expand(
        "results/embeddings/{run}/{id}.h5", run=EMBED_OF[wildcards.run], id=CLASSIFY_IDS
    )


def probe_metrics(run, fraction):
    """metrics.json of the linear probe of ``run`` at a label fraction (as written in paths)."""
    if float(fraction) >= 1.0:
        return f"results/classify/{run}/metrics.json"
    return f"results/classify_fraction/{run}/labels_{fraction}/metrics.json"


# The samples sheet's columns that classify, fine-tuning and the t-SNE figure read, copied by
# the samples_sheet rule; an edit elsewhere in the sheet (a comment, an mpp, a column of notes)
# must not rerun them.
SHEET_COPY = "results/config/samples.tsv"


def sheet_copy_text():
    """The copy's text: the sheet as validated, without mpp or extra columns."""
    if SAMPLES is None:
        return ""
    keep = [
        c for c in ("slide_id", "path", "label", "patient_id", "split") if c in SAMPLES
    ]
    return SAMPLES[keep].to_csv(sep="\t", index=False)


SHEET_TEXT = sheet_copy_text()


def refresh_sheet_copy():
    """Rewrite an outdated copy now: its rule reruns through the params trigger alone, so with
    `--rerun-triggers mtime` a label edited in the sheet would otherwise never reach the stages
    that read the copy. A copy rewritten with new content is a changed input to them under any
    trigger. In dry runs too (Snakemake tells them apart only after the parse): the copy is
    what the next run writes anyway. Not while another snakemake holds this folder's lock (a
    dry run beside a running workflow changed the labels its later jobs read)."""
    copy_path = Path(SHEET_COPY)
    if SAMPLES is None or not workflow.is_main_process:
        return
    if copy_path.is_file() and copy_path.read_text() != SHEET_TEXT:
        locks = Path(".snakemake/locks")
        if locks.is_dir() and any(locks.iterdir()):
            warn(
                f"{config['samples']} differs from {SHEET_COPY}, which the running workflow "
                "reads, so the copy is left as it is (another snakemake holds this folder's "
                "lock); the next run after it brings the changes in (if none is running, the "
                "lock is left from a killed one: run 'snakemake --unlock', then again)"
            )
            return
        part = copy_path.with_name(f".{copy_path.name}.part")
        part.write_text(SHEET_TEXT)
        part.replace(copy_path)


refresh_sheet_copy()


def samples_arg():
    return f"--samples {SHEET_COPY}" if SLIDES else ""


def samples_input():
    return [SHEET_COPY] if SLIDES else []


def probe_mem_mb(wildcards, input):
    """classify's memory: about 4x its embedding files (the feature table while it is read,
    then per fold the training rows and their scaled copy) and 1 GB for Python and sklearn;
    4000 MB at least. A fixed 4000 MB was exceeded at about 4e5 patches of 512 features.
    """
    return max(4000, 1000 + 4 * int(input.size_mb))


def logged(command):
    """A simclr-path job's shell command with all its output sent to the job's log, and its
    warnings (one line each) echoed on the console too, where they would otherwise go unseen.
    """
    return f"{command}> {{log}} 2>&1 && (grep -h ': warning: ' {{log}} >&2 || true)"


def model_weights(wildcards):
    """The run's model.weights file, an input of pretraining: new weights at the same path
    must retrain (the path alone is in the stage's config)."""
    weights = RUN_CFG[wildcards.run].model.weights
    return [weights] if weights else []


def positive_class(wildcards):
    """The run's positive class for its figure captions, escaped for reStructuredText ("" for
    macro one-vs-rest)."""
    from simclr_path.figures import rst_text

    return rst_text(POSITIVE.get(wildcards.run, ""))


def report_caption(name):
    return f"../report/{name}.rst"


def run_figures(run):
    """Every figure of one run (the report's per-run section)."""
    fig = f"results/figures/{run}"
    out = [
        f"{fig}/loss.png",
        f"{fig}/augmentations.png",
        f"{fig}/tsne_label.png",
        f"{fig}/tsne_slide.png",
        f"{fig}/roc.png",
        f"{fig}/pr.png",
        f"{fig}/confusion.png",
        f"{fig}/metrics.html",
    ]
    if config["figures"]["thumbnails"]:
        out.append(f"{fig}/tsne_thumbnails.png")
    if config["figures"]["heatmaps"] and POSITIVE.get(run):
        out += [f"{fig}/heatmaps/{s}.png" for s in HEATMAP_SLIDES]
    return out


# a heatmap draws one class's probability: macro one-vs-rest runs have none to draw
_NO_HEATMAP = (
    [r for r, c in RUN_CFG.items() if c.classify.positive_label is None]
    if SLIDES
    else []
)
if config["figures"]["heatmaps"] and _NO_HEATMAP:
    warn(
        f"figures.heatmaps: run(s) {', '.join(_NO_HEATMAP)} score all classes one-vs-rest "
        "(classify.positive_label null), so they get no heatmaps; set positive_label to the "
        "tumour class to draw its probability"
    )


# the report_config rule's output, a target of rule all with report.auto
REPORT_CONFIG = "results/config/report.yaml"


def report_config_text():
    """The merged config as YAML, less the SPEED_KEYS (a new worker count reruns nothing, the
    report included)."""
    cfg = without_speed_keys(USER_CONFIG)
    if isinstance(cfg.get("runs"), dict):
        cfg["runs"] = {
            run: without_speed_keys(over) for run, over in cfg["runs"].items()
        }
    return yaml.safe_dump(cfg, sort_keys=True)


# pictures a report.html may embed before it grows too large for a browser: the QC picture of
# a slide is about 1.1 MB and a heatmap 0.5 MB, so 500 slides make a report of 1 GB
REPORT_HTML_MAX_PICTURES = 200


def check_report_size():
    path = str(config["report"]["path"])
    if not config["report"]["auto"] or not path.endswith(".html"):
        return
    n = sum(f.endswith(".png") for f in final_outputs())
    if n > REPORT_HTML_MAX_PICTURES:
        warn(
            f"report.path {path}: the report embeds {n} pictures (QC pictures and heatmaps of "
            "every slide) in one HTML file, too large for a browser to open well; set "
            "report.path to report.zip (a folder of files; open its report.html)"
        )


def final_outputs():
    out = [f"results/qc/{s}.png" for s in SLIDES]
    for run in RUNS:
        out += run_figures(run)
        out.append(f"results/classify/{run}/metrics.json")
        if LAYERS:  # layer-wise linear evaluation
            out += [
                f"results/summary/{run}/layers.{ext}" for ext in ("tsv", "png", "html")
            ]
        if FRACTIONS:  # fine-tuning vs the linear probe
            out += [
                f"results/summary/{run}/finetune.{ext}"
                for ext in ("tsv", "png", "html")
            ]
    out += [
        "results/summary/runs.tsv",
        "results/summary/runs.png",
        "results/summary/runs.html",
    ]
    return out


check_report_size()


def demo_params(wildcards):
    """Kind from the label (SCC, as the demo sheet names it -> scc tissue; not from
    classify.positive_label, which a user may point at another class), seed from the slide id
    (a row added above it changes no other slide)."""
    sid = wildcards.demo_slide
    label = SAMPLES.loc[SAMPLES["slide_id"] == sid, "label"].iloc[0]
    kind = "scc" if str(label).casefold() == "scc" else "normal"
    artefacts = DEMO["artefacts"].get(sid, "")
    extra = f"--artefacts {shlex.quote(str(artefacts))}" if artefacts else ""
    return {
        "kind": kind,
        "seed": int(DEMO["seed"]) + zlib.crc32(sid.encode()) % 10**6,
        "extra": extra,
    }


def import_args(wildcards):
    ds = PATCH_SETS[wildcards.dataset]
    size = ds.get("patch_size") or TILE_CFG.tile.patch_size
    groups = f"--groups {shlex.quote(ds['groups'])}" if ds.get("groups") else ""
    depth = (
        f"--bit-depth {int(ds['bit_depth'])}" if ds.get("bit_depth") is not None else ""
    )
    return f"--patch-size {size} {groups} {depth}"


# set in the environment of the snakemake processes write_report starts
REPORT_CHILD = "SIMCLR_PATH_REPORT_CHILD"


def check_pretrain_gpus():
    """Snakemake gives a job no more of a resource than the run has: pretrain_gpus above the
    run's `gpu` resource (the profile's 1) ran torchrun's processes on fewer GPUs than asked,
    and failed only after tiling, with advice to lower --nproc_per_node."""
    if not workflow.is_main_process or os.environ.get(REPORT_CHILD):
        return  # a cluster job or the report's own snakemake: not given the run's --resources
    have = workflow.global_resources.get("gpu")
    have = getattr(have, "value", have)  # Snakemake 9 wraps it in a Resource
    want = config["pretrain_gpus"]
    # gpu=0: a machine without GPUs, where every job runs on CPU whatever it requests
    if isinstance(have, int) and 0 < have < want:
        fail(
            f"config: pretrain_gpus is {want}, but this run has gpu={have} (resources: in "
            "workflow/profiles/default/config.yaml, or --resources), and Snakemake would give "
            f"pretraining {have}; set gpu={want} there (the number of GPUs of this machine)"
        )


check_pretrain_gpus()


def pretrain_command():
    """Plain CLI, or the package module under a launcher such as torchrun (multi-GPU DDP)."""
    launcher = config["pretrain_launcher"].strip()
    return f"{launcher} -m simclr_path" if launcher else "simclr-path"


def run_overrides():
    """Run name -> its overrides as 'section.key=value; ...' (what distinguishes the runs)."""
    return {
        run: {
            # how fast a run went is not what distinguishes its results
            "overrides": spc.describe_overrides(
                without_speed_keys(config["runs"][run])
            ),
            "description": (config["runs"][run] or {}).get("description", ""),
            "pretraining": PRETRAIN_OF[run],
        }
        for run in RUNS
    }


def set_aside(path):
    """Move an older report at ``path`` to NAME.stale.EXT, so that it cannot pass for the
    results this run changed; the words to add to the message ('' when there was none).
    """
    old = Path(path)
    if not old.is_file():
        return ""
    stale = old.with_name(f"{old.stem}.stale{old.suffix}")
    old.replace(stale)
    # a run with nothing left to do calls no handler, so the way back is worth saying
    return (
        f"; the older report was moved to {stale} (`snakemake --report {old}` writes one "
        "from the results as they are, once they are complete)"
    )


def write_report(path):
    """Run ``snakemake --report PATH`` in a child process with this run's exact config.

    A failure stops with one line and exit status 1, and moves an older report at PATH aside,
    so that it cannot pass for this run's.
    """
    import subprocess
    import sys

    missing = [f for f in final_outputs() if not Path(f).exists()]
    if missing:  # a run of single targets: the report needs every tracked artefact
        logger.info(
            f"Report not written: {len(missing)} final outputs missing (e.g. {missing[0]}); "
            f"run `snakemake` without targets, or `snakemake --report {path}` when complete"
            f"{set_aside(path)}."
        )
        return
    cfg_file = Path(".snakemake") / "simclr_path_report_config.yaml"
    log = Path(".snakemake") / "simclr_path_report.log"
    cfg_file.parent.mkdir(exist_ok=True)
    # USER_CONFIG is the whole merged config (config/config.yaml unless the user replaced it,
    # config files, --config values), so the child replaces its workflow config with it: merged
    # over config/config.yaml again, the demo's keys (its samples) would come back underneath.
    cfg_file.write_text(yaml.safe_dump(USER_CONFIG, sort_keys=False))
    same = ["--snakefile", workflow.main_snakefile, "--configfile", str(cfg_file)]
    same += ["--replace-workflow-config"]
    # present is not enough: after a run of single targets or --until, outputs that this run did
    # not rebuild are older than their inputs, and a report would mix two states of the results
    # with this run's rerun triggers (--rerun-triggers mtime must not see code edits as pending)
    triggers = sorted(t.item_to_choice() for t in workflow.dag_settings.rerun_triggers)
    check = [sys.executable, "-m", "snakemake", "--dry-run", "--nolock", *same]
    check += ["--rerun-triggers", *triggers]
    env = {**os.environ, REPORT_CHILD: "1"}
    pending = subprocess.run(check, capture_output=True, text=True, env=env)
    if pending.returncode != 0:
        log.write_text(pending.stdout + pending.stderr)
        fail(
            f"report not written: the dry run that checks the outputs are up to date failed "
            f"(exit {pending.returncode}); its output is in {log}; fix it and run "
            f"`snakemake --report {path}`"
        )
    if "Nothing to be done" not in pending.stdout + pending.stderr:
        logger.info(
            "Report not written: some final outputs are not up to date with this config (a "
            "run of single targets or --until); run `snakemake` without targets to bring them "
            f"up to date and write {path}{set_aside(path)}."
        )
        return
    cmd = [sys.executable, "-m", "snakemake", "--report", path, *same]
    logger.info(f"Writing the report: {shlex.join(cmd)}")
    # Snakemake makes no folder for it
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode == 0:
        logger.info(f"Report written to {path}")
        return
    # the child's own error: the line after "SomeError:" (Snakemake prints the message there)
    lines = [x.strip() for x in done.stderr.splitlines() if x.strip()]
    heads = [
        i for i, x in enumerate(lines[:-1]) if re.fullmatch(r"\w*(Error|Exception):", x)
    ]
    why = (
        lines[heads[-1] + 1]
        if heads
        else (lines[-1] if lines else f"exit {done.returncode}")
    )
    fail(
        f"report not written: {why}{set_aside(path)}; full output in {log}; "
        f"fix it and run `snakemake --report {path}`"
    )
