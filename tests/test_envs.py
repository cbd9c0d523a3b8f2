"""Every conda env file parses, is pinned, and covers the imports of the rules that use it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

ENVS = sorted((ROOT / "envs").glob("*.yaml"))
RULES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))

# import name -> conda-forge package name
CONDA_NAME = {
    "torch": "pytorch",
    "cv2": "py-opencv",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "openslide": "openslide-python",
    "matplotlib": "matplotlib-base",
    "mpl_toolkits": "matplotlib-base",  # axes_grid1 ships with matplotlib
    "tensorboard": "tensorboard",
}
# optional extras, imported only inside try/except ImportError or for optional features
OPTIONAL = {"umap", "mlflow", "wandb", "lightly", "openTSNE", "snakemake", "conftest"}
STDLIB = set(sys.stdlib_module_names)


def _env(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _packages(env: dict) -> set[str]:
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            names.add(re.split(r"[ =<>!]", dep.strip(), maxsplit=1)[0])
    return names


def _guarded(node: ast.AST, parents: dict) -> bool:
    """True when the import sits in a ``try`` whose handlers catch ImportError."""
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.Try):
            for h in p.handlers:
                names = ast.unparse(h.type) if h.type is not None else "Exception"
                if "ImportError" in names or "ModuleNotFoundError" in names:
                    return True
        p = parents.get(p)
    return False


def imports_of(path: Path, seen: set[Path] | None = None) -> set[str]:
    """Top-level third-party modules imported by a file and, transitively, the package modules
    it imports (function-level imports included: rules run them)."""
    seen = set() if seen is None else seen
    if path in seen or not path.is_file():
        return set()
    seen.add(path)
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if _guarded(node, parents):
            continue
        for mod in mods:
            top = mod.split(".")[0]
            if top == "simclr_path":
                found |= imports_of(_package_file(mod, mods), seen)
            elif top not in STDLIB and top not in OPTIONAL:
                found.add(top)
    return found


def _package_file(mod: str, siblings: list[str]) -> Path:
    """The file of package module ``mod``; for ``from simclr_path[.x] import NAME`` (a function,
    or a lazy name of the package) the file of the module that defines NAME. A module path that
    names no file fails: a silent skip would hide that module's imports."""
    import simclr_path

    rel = Path(*mod.split("."))
    for cand in (ROOT / f"{rel}.py", ROOT / rel / "__init__.py"):
        if cand.is_file():
            return cand
    parent, name = mod.rsplit(".", 1)
    if parent == "simclr_path" and name in simclr_path._LAZY:  # e.g. load_encoder
        return _package_file(simclr_path._LAZY[name], [])
    if parent in siblings:  # NAME is an attribute of the module imported from: scanned as it
        return ROOT / "nonexistent"
    raise AssertionError(f"import of {mod}: no such file in the package")


def rule_blocks():
    """(rule name, env file, CLI subcommands, scripts) for every rule with ``conda:``."""
    out = []
    for smk in RULES:
        text = smk.read_text()
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.DOTALL | re.MULTILINE):
            name, body = m.groups()
            env = re.search(r'conda:\s*\n\s*"([^"]+)"', body)
            if not env:
                continue
            # `simclr-path CMD`, and `{params.command} CMD` where the rule builds the launcher
            # (pretrain: python -m simclr_path or torchrun ... -m simclr_path)
            cmds = set(re.findall(r"(?:simclr-path|\{params\.command\}) ([a-z][a-z-]*)", body))
            scripts = re.findall(r'script:\s*\n\s*"([^"]+)"', body)
            out.append((name, (smk.parent / env.group(1)).resolve(), cmds, scripts, smk.parent))
    return out


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_parses_and_is_pinned(path):
    env = _env(path)
    assert env["channels"][0] == "conda-forge"
    deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python") for d in deps)
    for dep in deps:
        if dep.split()[0] in ("pip", "setuptools"):
            continue
        assert re.search(r"[=<>]", dep), f"{path.name}: {dep!r} is not pinned"
    deploy = path.with_suffix(".post-deploy.sh")
    assert deploy.is_file(), f"{deploy.name} installs the package into the env"
    assert "pip install" in deploy.read_text()


def test_every_rule_that_runs_code_has_an_env():
    for smk in RULES:
        for m in re.finditer(
            r"^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text(), re.DOTALL | re.MULTILINE
        ):
            name, body = m.groups()
            if "shell:" in body or "script:" in body:
                assert "conda:" in body, f"rule {name} in {smk.name} has no conda env"


def test_envs_cover_rule_imports():
    blocks = rule_blocks()
    assert {b[0] for b in blocks} >= {"tile", "pretrain", "embed", "classify", "plot_tsne"}
    from simclr_path.cli import COMMANDS

    assert "pretrain" in next(b[2] for b in blocks if b[0] == "pretrain")
    for name, env_path, cmds, scripts, base in blocks:
        assert env_path.is_file(), f"rule {name}: {env_path} missing"
        have = _packages(_env(env_path))
        needed = imports_of(ROOT / "simclr_path" / "cli" / "__init__.py") if cmds else set()
        for cmd in cmds:
            mod = ROOT / "simclr_path" / "cli" / f"{COMMANDS[cmd]}.py"
            assert mod.is_file(), f"rule {name} calls simclr-path {cmd}, which does not exist"
            needed |= imports_of(mod)
        for script in scripts:
            needed |= imports_of((base / script).resolve())
        missing = {CONDA_NAME.get(m, m) for m in needed} - have
        assert not missing, f"rule {name}: {env_path.name} lacks {sorted(missing)}"


def test_import_scan_sees_function_level_imports():
    found = imports_of(ROOT / "simclr_path" / "cli" / "embed.py")
    assert "torch" in found and "h5py" in found
