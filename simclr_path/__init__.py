"""simclr-path: self-supervised SimCLR pipeline for histopathology.

Public API (heavy modules are imported lazily so ``import simclr_path`` stays cheap)::

    from simclr_path import load_encoder, PatchStore

Every stage is a module with a function (``simclr_path.tiling.tile_slide``, ...; README.md,
"What it does", lists them); ``simclr_path.<module>`` imports it on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PatchStore", "SimclrPathError", "__version__", "load_encoder"]

_LAZY = {
    "SimclrPathError": "simclr_path.errors",
    "PatchStore": "simclr_path.store",
    "EmbeddingStore": "simclr_path.store",
    "load_encoder": "simclr_path.model",
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # the stages' modules as attributes too (simclr_path.config.load_config after a plain
    # ``import simclr_path``), imported on first use
    if name.isidentifier() and not name.startswith("_"):
        try:
            if importlib.util.find_spec(f"{__name__}.{name}") is not None:
                return importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # hasattr / getattr(..., default) expect AttributeError
            pass
    raise AttributeError(f"module 'simclr_path' has no attribute {name!r}")
