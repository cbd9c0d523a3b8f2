from __future__ import annotations

import pytest
import yaml

from simclr_path.config import PRESETS, ClassifyConfig, build_config, defaults_dict, load_config
from simclr_path.errors import SimclrPathError


def test_presets_build_and_override(tmp_path):
    for name in PRESETS:
        build_config(name)
    cfg = load_config(preset="cpu-fast", overrides={"train": {"batch_size": 8}})
    assert cfg.train.batch_size == 8 and cfg.train.optimizer == "adamw"
    y = tmp_path / "c.yaml"
    y.write_text("preset: gpu\ntrain:\n  epochs: 3\n")
    cfg = load_config(y)
    assert cfg.model.arch == "resnet50" and cfg.train.epochs == 3


@pytest.mark.parametrize("overrides,match", [
    ({"train": {"optimizer": "adam"}}, "train.optimizer"),
    ({"train": {"bogus": 1}}, "unknown key train.bogus"),
    ({"nope": {}}, "unknown section"),
    ({"samples": "s.tsv", "runs": {}}, "'samples' belongs to the workflow's config"),
    ({"tile": {"min_tissue": 2}}, "tile.min_tissue"),
    ({"augment": {"hflip": 2}}, "augment.hflip"),
    ({"augment": {"stain_p": -0.1}}, "augment.stain_p"),
    ({"augment": {"local_crops": -1}}, "augment.local_crops"),
    # values that crashed deep inside (an allocation, torch's seed, the budget's arithmetic)
    # or let everything through in silence (inf)
    ({"augment": {"local_crops": 1_000_000}}, "augment.local_crops must be between 0 and 64"),
    ({"augment": {"image_size": 10**20}}, "augment.image_size must be between 8 and 4096"),
    ({"train": {"seed": 10**20}}, "train.seed must be between 0 and"),
    ({"classify": {"seed": 2**64}}, "classify.seed must be between 0 and"),
    ({"train": {"time_budget_s": float("inf")}}, "train.time_budget_s must be a finite number"),
    ({"tile": {"drop_blur": float("inf")}}, "tile.drop_blur"),
    ({"augment": {"local_crops": 2, "image_size": 48, "local_size": 64}}, "augment.local_size"),
    ({"augment": {"local_crop_scale": [0.3, 0.1]}}, "augment.local_crop_scale"),
    ({"augment": {"stain_scale": 1.0}}, "augment.stain_scale"),
    ({"augment": {"stain_shift": -0.1}}, "augment.stain_shift"),
    ({"augment": {"brightness": -0.2}}, "augment.brightness"),
    ({"augment": {"hue": 0.6}}, "augment.hue"),
    ({"augment": {"blur_sigma": [0.0, 1.0]}}, "augment.blur_sigma"),
    ({"augment": {"blur_sigma": [0.5, 1.0, 2.0]}}, "augment.blur_sigma"),
    ({"augment": {"crop_scale": 0.5}}, "augment.crop_scale"),
    ({"augment": {"crop_ratio": [1.3, 0.75]}}, "augment.crop_ratio"),
])
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(SimclrPathError, match=match):
        load_config(overrides=overrides)


def test_bad_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: [1, 2\n")
    with pytest.raises(SimclrPathError, match="not valid YAML"):
        load_config(y)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the later of two equal keys in silence: a second tile: section dropped the
    whole first one (review). A merge key's values may still be overridden."""
    y = tmp_path / "c.yaml"
    y.write_text("tile:\n  mpp: 1\n  patch_size: 64\ntile:\n  mpp: 2\n")
    with pytest.raises(SimclrPathError, match=r"c.yaml: line 4: key 'tile' is given twice \(first "
                                              r"on line 1\)"):
        load_config(y)
    y.write_text("train: {lr: 0.1, lr: 0.2}\n")
    with pytest.raises(SimclrPathError, match="key 'lr' is given twice"):
        load_config(y)
    y.write_text("base: &b {lr: 0.1, weight_decay: 0.01}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    from simclr_path.config import load_yaml

    assert load_yaml(y)["train"] == {"lr": 0.2, "weight_decay": 0.01}


def test_defaults_dict_has_every_section():
    assert set(defaults_dict()) == {
        "tile", "augment", "model", "train", "embed", "classify", "finetune"
    }


def test_finetune_section_validates():
    from simclr_path.config import build_config

    cfg = build_config("default", {"finetune": {"label_fraction": 0.1, "epochs": 2}})
    assert cfg.finetune.label_fraction == 0.1 and cfg.finetune.epochs == 2
    for bad, field in (({"label_fraction": 0.0}, "label_fraction"),
                       ({"val_fraction": 1.0}, "val_fraction"),
                       ({"batch_size": 1}, "batch_size"), ({"device": "tpu"}, "device")):
        with pytest.raises(SimclrPathError, match=f"finetune.{field}"):
            build_config("default", {"finetune": bad})


def test_classify_label_fraction_validates():
    assert build_config("default", {"classify": {"label_fraction": 0.1}}).classify.label_fraction == 0.1
    assert ClassifyConfig().label_fraction == 1.0
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(SimclrPathError, match=r"classify.label_fraction must be in \(0, 1\]"):
            build_config("default", {"classify": {"label_fraction": bad}})


@pytest.mark.parametrize("image_size, local", [(128, 64), (64, 32), (48, 32), (32, 32), (10, 10)])
def test_local_view_size_defaults_to_half_the_view_size_but_not_below_32(image_size, local):
    assert load_config(overrides={"augment": {"image_size": image_size}}).augment.local_view_size == local


def test_local_view_size_can_be_set():
    cfg = load_config(overrides={"augment": {"image_size": 128, "local_size": 96}})
    assert cfg.augment.local_view_size == 96


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) loads `1e-4`, which has no dot, as the string "1e-4"
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-4\n  max_steps: 1e3\nclassify:\n  c_grid: [1e-5, 1e-4, 0.01]\n"
                 "tile:\n  drop_white: 5e-1\n")
    assert yaml.safe_load(y.read_text())["train"]["lr"] == "1e-4"
    cfg = load_config(y)
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.classify.c_grid == pytest.approx([1e-5, 1e-4, 0.01])
    assert cfg.tile.drop_white == 0.5
    # string fields are left alone, whatever they look like
    assert load_config(overrides={"model": {"arch": "1e3"}}).model.arch == "1e3"


def test_null_as_text_is_null_where_a_number_may_be_null():
    # `snakemake --config train={max_steps: null}` hands the workflow the text "null"
    cfg = load_config(overrides={"train": {"max_steps": "null", "budget_min_steps": "~"}})
    assert cfg.train.max_steps is None and cfg.train.budget_min_steps is None
    with pytest.raises(SimclrPathError, match=r"train.batch_size must be an integer, got 'null'"):
        load_config(overrides={"train": {"batch_size": "null"}})  # a value is required there
    # a string field keeps the text: it could be a class name
    assert load_config(overrides={"classify": {"positive_label": "null"}}).classify.positive_label == "null"
    # ... so an empty one is the null a text key takes from the command line
    cfg = load_config(overrides={"classify": {"positive_label": ""}, "model": {"weights": ""},
                                 "train": {"mlflow_uri": ""}})
    assert (cfg.classify.positive_label, cfg.model.weights, cfg.train.mlflow_uri) == (None,) * 3


@pytest.mark.parametrize("overrides, match", [
    ({"train": {"lr": "fast"}}, r"train.lr must be a number, got 'fast'"),
    ({"train": {"batch_size": "2.5"}}, r"train.batch_size must be an integer, got 2.5"),
    ({"tile": {"patch_size": 22.5}}, r"tile.patch_size must be an integer, got 22.5"),
    ({"tile": {"workers": True}}, r"tile.workers must be an integer, got True"),
    ({"classify": {"c_grid": [0.1, "x"]}}, r"classify.c_grid must be a number, got 'x'"),
    ({"classify": {"labels": "SCC"}}, r"classify.labels must be a list, got 'SCC'"),
    ({"tile": {"mpp": [1]}}, r"tile.mpp must be a number, got \[1\]"),
    ({"tile": {"remove_pen": "no"}}, r"tile.remove_pen must be true or false, got 'no'"),
    ({"embed": {"layer": 5}}, r"embed.layer must be a string, got 5"),
])
def test_values_of_the_wrong_type_name_the_field(overrides, match):
    with pytest.raises(SimclrPathError, match=match):
        load_config(overrides=overrides)


def test_whole_floats_in_integer_fields_and_none_in_optional_ones_pass():
    cfg = load_config(overrides={"tile": {"patch_size": 224.0, "stride": None},
                                 "embed": {"tta": False}})
    assert cfg.tile.patch_size == 224 and isinstance(cfg.tile.patch_size, int)
    assert cfg.tile.stride is None and cfg.embed.tta is False


@pytest.mark.parametrize("overrides, match", [
    ({"tile": {"mpp": float("inf")}}, "tile.mpp must be a finite number, got inf"),
    ({"tile": {"mpp": float("nan")}}, "tile.mpp must be a finite number"),
    ({"tile": {"mpp": 0}}, "tile.mpp must be a finite number"),
    # an objective power typed as the target: patches of millimetres, in silence
    ({"tile": {"mpp": 20}}, r"tile.mpp 20 looks like an objective power \(20x\), not microns "),
    ({"tile": {"mpp": 40.0}}, "tile.mpp 40 looks like an objective power"),
    # a label twice failed in classify as "a training fold has no patches of class 'SCC'"
    ({"classify": {"labels": ["SCC", "normal", "SCC"]}},
     "classify.labels lists 'SCC' twice; list each class once"),
    ({"tile": {"tissue_mpp": float("inf")}}, "tile.tissue_mpp must be a finite number"),
    ({"tile": {"tissue_mpp": float("nan")}}, "tile.tissue_mpp must be a finite number"),
    ({"tile": {"tissue_mpp": -8}}, "tile.tissue_mpp must be a finite number"),
    ({"tile": {"drop_white": -1.0}}, "tile.drop_white"),
    ({"tile": {"drop_black": float("nan")}}, "tile.drop_black"),
    ({"tile": {"drop_white": 5.0}}, "tile.drop_white"),
    ({"tile": {"max_pen": 1.5}}, "tile.max_pen"),
    ({"tile": {"median_blur": -3}}, "tile.median_blur must be an odd size >= 1"),
    ({"tile": {"saturation_floor": 300}}, "tile.saturation_floor"),
    ({"tile": {"closing_um": -1.0}}, "tile.closing_um must be >= 0"),
    ({"tile": {"min_object_um2": float("nan")}}, "tile.min_object_um2"),
    ({"tile": {"min_hole_um2": -5.0}}, "tile.min_hole_um2"),
    ({"model": {"head_hidden_dim": -3}}, "model.head_hidden_dim must be between 1 and 65536, or null"),
    ({"model": {"head_hidden_dim": 10**12}}, "model.head_hidden_dim must be between 1 and 65536"),
    ({"model": {"head_out_dim": 10**12}}, "model.head_out_dim must be between 1 and 65536"),
    # every number of every section is finite: these passed and failed mid-run (review)
    ({"train": {"warmup_epochs": float("inf")}}, "train.warmup_epochs must be a finite number"),
    ({"augment": {"brightness": float("inf")}}, "augment.brightness must be a finite number"),
    ({"train": {"temperature": float("inf")}}, "train.temperature must be a finite number"),
    ({"finetune": {"lr": float("inf")}}, "finetune.lr must be a finite number"),
    ({"classify": {"tsne_perplexity": float("nan")}}, "classify.tsne_perplexity must be a finite"),
    ({"augment": {"crop_scale": [0.2, float("inf")]}}, "augment.crop_scale must be a finite"),
    ({"train": {"temperature": 10**400}}, "train.temperature must be a finite number"),  # no float
    ({"classify": {"seed": -1}}, "classify.seed"),
    ({"classify": {"max_iter": 0}}, "classify.max_iter"),
    # fewer than 10 resamples never gave a CI, with a note blaming the resamples' classes
    ({"classify": {"bootstrap": 5}}, r"classify.bootstrap must be 0 \(no CI\) or >= 10"),
    ({"finetune": {"seed": -2}}, "finetune.seed"),
    ({"tile": {"max_pen": float("nan")}}, "tile.max_pen"),
    ({"tile": {"drop_blur": -1.0}}, "tile.drop_blur"),
    ({"train": {"seed": -1}}, "train.seed"),  # numpy's seeds are >= 0: a traceback mid-run
    ({"train": {"hard_beta": -0.5}}, "train.hard_beta"),
    ({"train": {"hard_beta": float("inf")}}, "train.hard_beta"),
    ({"train": {"drop_nearest": -1}}, "train.drop_nearest"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
    ({"train": {"ema_decay": 0}}, "train.ema_decay"),
    ({"train": {"lr": -1}}, r"train.lr must be a finite number > 0, got -1"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"train": {"weight_decay": -1e-4}}, "train.weight_decay must be a finite number >= 0"),
    ({"train": {"weight_decay": float("nan")}}, "train.weight_decay"),
    ({"train": {"momentum": 1.0}}, r"train.momentum must be in \[0, 1\)"),
    ({"train": {"momentum": -0.1}}, "train.momentum"),
])
def test_ranges_are_checked(overrides, match):
    with pytest.raises(SimclrPathError, match=match):
        load_config(overrides=overrides)


def test_optimiser_values_at_their_limits_pass():
    cfg = load_config(overrides={"train": {"lr": 1e-8, "weight_decay": 0.0, "momentum": 0.0}})
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum) == (1e-8, 0.0, 0.0)


def test_a_negative_learning_rate_is_one_line_on_the_command_line(tmp_path, capsys):
    from simclr_path.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    store = tmp_path / "s.h5"
    store.write_bytes(b"not read: the config fails first")
    rc = main(["pretrain", str(store), "--out", str(tmp_path / "run"), "--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    # the bad value's source is named: the file, or the option that overrode it
    assert f"{bad}: train.lr must be a finite number > 0, got -1" in err
    rc = main(["pretrain", str(store), "--out", str(tmp_path / "run"), "--config", str(bad),
               "--lr", "-2"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "error: command line: train.lr must be a finite number > 0, got -2" in err


def test_config_file_that_is_binary_a_folder_or_names_a_bad_preset(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00tile")
    with pytest.raises(SimclrPathError, match="bin.yaml: not a text file"):
        load_config(binary)
    with pytest.raises(SimclrPathError, match="is a folder; give a YAML config file"):
        load_config(tmp_path)
    bad = tmp_path / "p.yaml"
    bad.write_text("preset: [a]\n")
    with pytest.raises(SimclrPathError, match=r"p.yaml: preset must be a name"):
        load_config(bad)
    # overrides given where the preset goes (the second argument) were a TypeError
    with pytest.raises(SimclrPathError, match=r"unknown preset .*overrides go by keyword"):
        load_config(None, {"train": {"lr": 1e-3}})


def test_stage_modules_are_attributes_of_the_package():
    """``import simclr_path`` then ``simclr_path.config.load_config(...)``, as the README writes
    it, without importing each module first; unknown names stay AttributeErrors."""
    import subprocess
    import sys

    code = ("import simclr_path; print(simclr_path.config.load_config().train.batch_size, "
            "simclr_path.tiling.tile_slide.__name__); simclr_path.no_such_module")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.stdout.split() == [str(load_config().train.batch_size), "tile_slide"]
    assert "module 'simclr_path' has no attribute 'no_such_module'" in r.stderr
    import simclr_path

    assert getattr(simclr_path, "no.such", None) is None and not hasattr(simclr_path, "_x")


def test_api_functions_take_their_section_or_the_whole_config_and_name_a_wrong_one(tmp_path):
    """tile_slide(..., load_config()) failed deep inside with an AttributeError ('stride')."""
    from simclr_path.classify import classify
    from simclr_path.config import PipelineConfig, TileConfig, section_cfg
    from simclr_path.tiling import tile_slide
    from simclr_path.train import pretrain

    whole = load_config(overrides={"tile": {"mpp": 2.0}})
    assert section_cfg(whole, TileConfig, "tile_slide") is whole.tile
    assert section_cfg(None, TileConfig, "tile_slide") == TileConfig()
    with pytest.raises(SimclrPathError, match=r"tile_slide: cfg must be a TileConfig "
                                              r"\(load_config\(...\).tile\) or the whole config, "
                                              r"got ClassifyConfig"):
        tile_slide(tmp_path / "x.svs", tmp_path / "x.h5", whole.classify)
    with pytest.raises(SimclrPathError, match=r"classify: cfg must be a ClassifyConfig"):
        classify([tmp_path / "x.h5"], tmp_path / "out", cfg=whole.train)
    with pytest.raises(SimclrPathError, match=r"pretrain: cfg must be the whole config "
                                              r"\(load_config\(...\)\), got TrainConfig"):
        pretrain([tmp_path / "x.h5"], tmp_path / "run", whole.train)
    assert isinstance(whole, PipelineConfig)
    # an mpp given where the slide id goes (README's order) was stored as the id '0.5'
    with pytest.raises(TypeError):
        tile_slide(tmp_path / "x.svs", tmp_path / "x.h5", whole, 0.5)
    from simclr_path.slide import validate_slide_id

    with pytest.raises(SimclrPathError, match=r"slide id 0.5 is a float, not text"):
        validate_slide_id(0.5)


def test_load_config_names_overrides_given_in_python_as_such():
    with pytest.raises(SimclrPathError, match=r"^overrides: tile.mpp must be"):
        load_config(overrides={"tile": {"mpp": -1}})
    with pytest.raises(SimclrPathError, match=r"^command line: tile.mpp must be"):
        load_config(overrides={"tile": {"mpp": -1}}, overrides_from="command line")
    with pytest.raises(SimclrPathError, match=r"overrides: expected a mapping of sections"):
        load_config(overrides=[1])


@pytest.mark.parametrize("section, kw, message", [
    ("TileConfig", {"mpp": "0.5"}, "tile.mpp must be a number, got '0.5'"),
    ("TileConfig", {"patch_size": 64.5}, "tile.patch_size must be an integer, got 64.5"),
    ("TileConfig", {"remove_pen": 1}, "tile.remove_pen must be true or false, got 1"),
    ("ClassifyConfig", {"c_grid": 1.0}, "classify.c_grid must be a list of numbers, got 1.0"),
    ("ClassifyConfig", {"labels": "SCC"}, "classify.labels must be a list of strings"),
    ("ClassifyConfig", {"c_grid": [1, "a"]}, "classify.c_grid must be a number, got 'a'"),
])
def test_a_section_built_in_python_checks_its_types(section, kw, message):
    """The README builds sections directly (cfg=TileConfig(...)): a wrong type was a TypeError
    without the field's name, or passed and failed deep in a stage (patch_size 64.5 in OpenCV,
    labels "SCC" as the classes S, C, C)."""
    import simclr_path.config as C

    with pytest.raises(C.ConfigValueError, match=message) as exc:
        getattr(C, section)(**kw)
    assert exc.value.key == message.split(" ")[0]


def test_numpy_scalars_are_numbers():
    import numpy as np

    from simclr_path.config import TileConfig

    cfg = TileConfig(mpp=np.float32(0.25), patch_size=np.int64(64), remove_pen=np.bool_(True))
    assert cfg.patch_size == 64 and cfg.remove_pen


def test_a_field_changed_after_construction_is_checked_when_a_stage_starts(tmp_path):
    """cfg.train.batch_size = 0 reached the training loop as a ZeroDivisionError."""
    from simclr_path.config import ConfigValueError
    from simclr_path.train import pretrain

    cfg = load_config()
    cfg.train.batch_size = 0
    with pytest.raises(ConfigValueError, match="train.batch_size must be >= 2"):
        pretrain([tmp_path / "none.h5"], tmp_path / "run", cfg)
    assert not (tmp_path / "run").exists()
    cfg = load_config()
    cfg.embed = cfg.tile  # a section of another kind
    with pytest.raises(SimclrPathError, match="cfg.embed must be a EmbedConfig, got TileConfig"):
        pretrain([tmp_path / "none.h5"], tmp_path / "run", cfg)


def test_load_config_keeps_the_key_of_a_bad_value(tmp_path):
    from simclr_path.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"^overrides: train.lr must be") as exc:
        load_config(overrides={"train": {"lr": -1}})
    assert exc.value.key == "train.lr"


def test_numpy_values_become_python_values_a_run_directory_can_save():
    """Accepted as numbers, they reached pretrain's config.json/config.yaml as numpy objects:
    a TypeError after the stores were opened and the model built."""
    import dataclasses
    import json

    import numpy as np

    from simclr_path.config import AugmentConfig, to_dict

    cfg = load_config(overrides={"train": {"seed": np.int64(1), "lr": np.float32(0.5),
                                           "amp": np.bool_(False)}})
    cfg.augment = AugmentConfig(crop_scale=[np.float32(0.25), 1.0])  # a [min, max] pair too
    cfg.train = dataclasses.replace(cfg.train, max_steps=np.int64(3))
    d = to_dict(cfg)
    assert json.loads(json.dumps(d))["train"]["seed"] == 1 and yaml.safe_dump(d)
    assert type(cfg.train.max_steps) is int and type(cfg.train.amp) is bool
    assert cfg.augment.crop_scale == [0.25, 1.0] and type(cfg.augment.crop_scale[0]) is float


def test_a_subclass_of_a_section_is_that_section():
    import dataclasses

    from simclr_path.config import TileConfig

    @dataclasses.dataclass
    class Mine(TileConfig):
        note: str = "x"

    assert Mine(patch_size=64).patch_size == 64


def test_a_runs_overrides_read_as_the_config_writes_them():
    """The runs table showed classify.positive_label=None and labels=['a', 'b']."""
    from simclr_path.config import describe_overrides

    assert describe_overrides(None) == describe_overrides({"description": "x"}) == "(defaults)"
    text = describe_overrides({"preset": "cpu-fast", "description": "macro probe",
                               "classify": {"positive_label": None, "labels": ["a", "b"]},
                               "train": {"lr": 0.001, "mlflow": True}})
    assert text == ("preset=cpu-fast; classify.positive_label=null; classify.labels=[a, b]; "
                    "train.lr=0.001; train.mlflow=true")
    # one line, however long (YAML wraps at 80 characters; a newline broke the runs table)
    grid = describe_overrides({"classify": {"c_grid": [0.001 * 2**i for i in range(13)]}})
    assert "\n" not in grid and grid.endswith("4.096]")
