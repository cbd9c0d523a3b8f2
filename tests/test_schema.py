"""The workflow config schema is generated from the config dataclasses and never drifts."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from conftest import ROOT

from simclr_path import config as C
from simclr_path.cli import main
from simclr_path.cli.schema import config_schema, schema_text, section_schema

SCHEMA_FILE = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _fill_defaults(instance: dict, schema: dict) -> dict:
    """Validate like snakemake.utils.validate (defaults filled into ``instance``)."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, inst, sch):
        for prop, sub in properties.items():
            if "default" in sub and isinstance(inst, dict):
                inst.setdefault(prop, json.loads(json.dumps(sub["default"])))
        yield from validate_properties(validator, properties, inst, sch)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    cls(schema).validate(instance)
    return instance


def test_committed_schema_is_generated():
    """Regenerate with: simclr-path schema --out workflow/schemas/config.schema.yaml --force"""
    assert SCHEMA_FILE.read_text() == schema_text("yaml")


def test_schema_defaults_equal_dataclass_defaults():
    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    defaults = C.defaults_dict()
    for section, values in defaults.items():
        props = schema["$defs"][section]["properties"]
        assert set(props) == set(values), section
        for key, value in values.items():
            assert props[key]["default"] == value, f"{section}.{key}"


def test_empty_config_gets_every_default():
    schema = config_schema()
    cfg = _fill_defaults({}, schema)
    for section, values in C.defaults_dict().items():
        assert cfg[section] == values
    assert cfg["runs"] == {"baseline": {}}


def test_run_overrides_carry_no_defaults():
    """Filling defaults into runs would silently reset top-level sections."""
    schema = config_schema()
    cfg = _fill_defaults(
        {"train": {"lr": 0.5}, "runs": {"a": {"model": {"head_layers": 0}}}}, schema
    )
    assert cfg["runs"]["a"] == {"model": {"head_layers": 0}}
    assert cfg["train"]["lr"] == 0.5


def test_descriptions_come_from_field_comments():
    s = section_schema(C.TileConfig)
    assert "microns per pixel" in s["properties"]["mpp"]["description"]
    assert s["properties"]["stride"]["type"] == ["integer", "null"]
    assert s["additionalProperties"] is False


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"tile": {"mpp": "fine"}}, "tile.mpp"),
        ({"tile": {"nope": 1}}, "tile"),
        ({"runs": {"a": {"tile": {"mpp": 1.0}}}}, "runs.a"),
        ({"runs": {"bad/name": {}}}, "runs"),
        ({"preset": "fastest"}, "preset"),
        ({"augment": {"crop_scale": ["a", 1]}}, "augment.crop_scale"),
    ],
)
def test_bad_values_are_rejected(bad, where):
    validator = jsonschema.Draft202012Validator(config_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(bad))
    assert err is not None
    assert ".".join(str(p) for p in err.absolute_path).startswith(where)


@pytest.mark.parametrize(
    "name", ["config.yaml", "ablation.yaml", "slides.example.yaml", "patches.example.yaml"]
)
def test_shipped_configs_validate(name):
    path = ROOT / "config" / name
    data = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(config_schema()).validate(data)
    runs = data.get("runs") or {}
    for run, over in runs.items():  # every run resolves through the package's own checks
        over = dict(over or {})
        preset = over.pop("preset", data.get("preset", "default"))
        over.pop("description", None)
        top = {s: data.get(s) or {} for s in C.defaults_dict()}
        C.build_config(preset, C.merge_overrides(C.merge_overrides({}, top, "t"), over, run))


def test_cli_prints_and_writes(tmp_path, capsys):
    assert main(["schema"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["title"] == "simclr-path workflow config"
    out = tmp_path / "s.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == config_schema()
    capsys.readouterr()
    assert main(["schema", "--out", str(out)]) != 0  # exists, no --force
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema" in err[0]
    assert main(["schema", "--out", str(out), "--force"]) == 0
