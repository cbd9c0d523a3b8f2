"""``simclr-path schema``: the JSON schema of the workflow config, generated from the dataclasses.

The Snakemake workflow validates ``config/config.yaml`` against
``workflow/schemas/config.schema.yaml`` and fills missing values from the schema's defaults. That
file is *generated* by this command from :mod:`simclr_path.config` (types from the annotations,
defaults from the field defaults, descriptions from the fields' trailing comments), so the workflow
and the package can never disagree about a default; ``tests/test_schema.py`` checks the committed
file equals what this command writes.

Regenerate after changing a dataclass::

    simclr-path schema --out workflow/schemas/config.schema.yaml --force
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import io
import json
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from simclr_path import config as C

HELP = "Print (or write) the JSON schema of the workflow config, generated from the config dataclasses."

# Workflow-level keys (not stage parameters): name -> JSON schema. These belong to the Snakemake
# workflow only (which files to process, which runs to train); stage parameters live in the
# dataclasses of simclr_path.config.
WORKFLOW_PROPERTIES: dict[str, dict[str, Any]] = {
    "samples": {
        "type": ["string", "null"],
        "default": None,
        "description": "samples sheet (TSV: slide_id, path, label, patient_id[, mpp, split]); "
        "null when only patch datasets are used",
    },
    "patch_datasets": {
        "type": "object",
        "default": {},
        "description": "imported patch sets: name -> {dir, groups, patch_size, bit_depth}; each becomes "
        "results/patches/{name}.h5 through 'simclr-path import-patches'",
        "additionalProperties": {
            "type": "object",
            "required": ["dir"],
            "additionalProperties": False,
            "properties": {
                "dir": {"type": "string", "description": "folder with one subfolder per class"},
                "groups": {
                    "type": ["string", "null"],
                    "default": None,
                    "description": "CSV of tile path -> group (patient); null = one group per tile",
                },
                "patch_size": {
                    "type": ["integer", "null"],
                    "default": None,
                    "description": "resize tiles to this side; null = tile.patch_size",
                },
                "bit_depth": {
                    "type": ["integer", "null"],
                    "default": None,
                    "minimum": min(C.BIT_DEPTHS),
                    "maximum": max(C.BIT_DEPTHS),
                    "description": "sample depth of 16-bit tiles (e.g. 12); null = the smallest "
                    f"of {'/'.join(map(str, C.BIT_DEPTHS))} bits that holds the dataset's largest "
                    "sample",
                },
            },
        },
    },
    "preset": {
        "type": "string",
        "default": "default",
        "enum": sorted(C.PRESETS),
        "description": "named preset applied before the sections below (simclr_path.config.PRESETS)",
    },
    "runs": {
        "type": "object",
        "default": {"baseline": {}},
        "minProperties": 1,
        "description": "named pretraining configurations: run name -> overrides of the sections "
        "(augment, model, train, embed, classify, finetune) and optionally 'preset'; each run is pretrained, "
        "embedded, classified and plotted, and compared in results/summary/runs.tsv",
        "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*$"},
        "additionalProperties": {"$ref": "#/$defs/run"},
    },
    "demo": {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "description": "synthetic slides: samples whose path is under 'dir' are generated with "
        "'simclr-path demo-slide' (kind from the label, seed from the slide id)",
        "properties": {
            "dir": {"type": "string", "default": "resources/demo"},
            "width": {"type": "integer", "minimum": 256, "default": 2048},
            "height": {"type": "integer", "minimum": 256, "default": 2048},
            "mpp": {"type": "number", "exclusiveMinimum": 0, "default": 0.5},
            "seed": {"type": "integer", "default": 0, "description": "offset added to every demo slide's seed (each slide's own comes from its slide_id)"},
            "artefacts": {
                "type": "object",
                "default": {},
                "description": "slide_id -> comma-separated artefacts (pen, glass, fold)",
                "additionalProperties": {"type": "string"},
            },
        },
    },
    "figures": {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "properties": {
            "heatmaps": {
                "type": "boolean",
                "default": True,
                "description": ("draw a heatmap of the positive class's probability per slide (held-out "
                                "slides only; none for runs with classify.positive_label null)"),
            },
            "thumbnails": {
                "type": "boolean",
                "default": True,
                "description": "draw the t-SNE map with patch thumbnails",
            },
            "preview_pairs": {
                "type": "integer",
                "minimum": 1,
                "default": C.PREVIEW_PAIRS,
                "description": "augmented view pairs in the preview figure",
            },
        },
    },
    "layer_eval": {
        "type": "array",
        "items": {"type": "string", "pattern": "^(pooled|head|stage[0-9]+)$"},
        "default": [],
        "description": "layer-wise linear evaluation: backbone layers (pooled, stageN, head) "
        "embedded and classified with the same probe and folds for every run, compared in "
        "results/summary/{run}/layers.{tsv,png,html}; empty = off",
    },
    "finetune_eval": {
        "type": "array",
        "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "default": [],
        "description": "fine-tuning: label fractions (e.g. [1.0, 0.1, 0.01]) at which every run's "
        "encoder is fine-tuned end to end ('simclr-path finetune', section finetune) and "
        "compared with the linear probe in results/summary/{run}/finetune.{tsv,png,html}; "
        "empty = off",
    },
    "pretrain_launcher": {
        "type": "string",
        "default": "",
        "description": "command prefix for pretraining, e.g. 'torchrun --standalone "
        "--nproc_per_node=4' for multi-GPU DDP in one job; empty = plain 'simclr-path pretrain'",
    },
    "pretrain_gpus": {
        "type": "integer",
        "minimum": 0,
        "default": 1,
        "description": "GPU slots a pretrain job requests (resources: gpu); set it to the torchrun "
        "--nproc_per_node of pretrain_launcher; embed jobs request 1",
    },
    "report": {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "properties": {
            "auto": {
                "type": "boolean",
                "default": True,
                "description": "after a successful run, write the HTML report (onsuccess)",
            },
            "path": {
                "type": "string",
                "default": "report.html",
                # Snakemake writes .html or .zip only; checked at the DAG build, not after a run
                "pattern": "\\.(html|zip)$",
                "description": "report file (.html, or .zip for a report with many figures)",
            },
        },
    },
}


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each ``name: type = default  # comment`` line of a dataclass."""
    out: dict[str, str] = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # pragma: no cover - frozen or interactive code
        return out
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.line
            m = re.match(r"\s+([A-Za-z_]\w*)\s*:", line)
            if m and line.strip().startswith(m.group(1)):
                out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _type_schema(tp: Any) -> dict[str, Any]:
    """JSON schema of a dataclass field annotation (int, float, bool, str, list[X], X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_schema(a) for a in typing.get_args(tp)]
        kinds: list[str] = []
        extra: dict[str, Any] = {}
        for p in parts:
            t = p["type"]
            kinds.extend(t if isinstance(t, list) else [t])
            extra.update({k: v for k, v in p.items() if k != "type"})
        return {"type": kinds, **extra}
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _type_schema(item)}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(f"schema: no JSON type for annotation {tp!r}; extend _type_schema")


def section_schema(cls: type, with_defaults: bool = True) -> dict[str, Any]:
    """Schema of one stage dataclass: every field typed, described and (optionally) defaulted."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    props: dict[str, Any] = {}
    defaults = dataclasses.asdict(cls())
    for f in dataclasses.fields(cls):
        s = _type_schema(hints[f.name])
        if f.name in comments:
            s["description"] = comments[f.name]
        if with_defaults:
            s["default"] = defaults[f.name]
        props[f.name] = s
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        out["description"] = doc[0]
    return out


def config_schema() -> dict[str, Any]:
    """The whole workflow config schema (a JSON-compatible dict)."""
    sections = [f.name for f in dataclasses.fields(C.PipelineConfig)]
    props: dict[str, Any] = {}
    for name, value in WORKFLOW_PROPERTIES.items():
        if name == "runs":
            continue
        props[name] = copy.deepcopy(value)
    section_classes = {name: C._section_cls(name) for name in sections}
    for name, cls in section_classes.items():
        props[name] = {"$ref": f"#/$defs/{name}", "default": {}}
    props["runs"] = copy.deepcopy(WORKFLOW_PROPERTIES["runs"])
    defs: dict[str, Any] = {name: section_schema(cls) for name, cls in section_classes.items()}
    # Run overrides carry no defaults: filling them would silently reset the top-level sections.
    run_props: dict[str, Any] = {
        "preset": {"type": "string", "enum": sorted(C.PRESETS)},
        "description": {"type": "string", "description": "free text shown in the run summary"},
    }
    for name, cls in section_classes.items():
        if name == "tile":
            continue  # tiling is shared by every run (one patch store per slide)
        run_props[name] = section_schema(cls, with_defaults=False)
    defs["run"] = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": run_props,
        "description": "overrides of one run; 'tile' is shared by all runs and cannot be "
        "overridden here",
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "simclr-path workflow config",
        "description": "GENERATED by 'simclr-path schema' from simclr_path/config.py; do not edit "
        "by hand (tests/test_schema.py checks it).",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "$defs": defs,
    }


def schema_text(fmt: str = "yaml") -> str:
    """The schema serialised as YAML (the committed file) or JSON."""
    schema = config_schema()
    if fmt == "json":
        return json.dumps(schema, indent=2) + "\n"
    import yaml

    header = (
        "# GENERATED by `simclr-path schema --out workflow/schemas/config.schema.yaml --force`\n"
        "# from simclr_path/config.py. Do not edit by hand.\n"
    )
    return header + yaml.safe_dump(schema, sort_keys=False, default_flow_style=False, width=100)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    p.add_argument(
        "--format",
        choices=("yaml", "json"),
        default=None,
        help="output format [default: from --out's suffix, else yaml]",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    fmt = args.format
    if fmt is None:
        fmt = "json" if args.out is not None and args.out.suffix == ".json" else "yaml"
    text = schema_text(fmt)
    if args.out is None:
        print(text, end="")
        return 0
    from simclr_path.outputs import atomic_output

    with atomic_output(args.out, args.force) as tmp:
        Path(tmp).write_text(text)
    print(args.out)
    return 0
