"""simclr-path: self-supervised SimCLR pipeline for histopathology.

Public API (heavy modules are imported lazily so ``import simclr_path`` stays cheap)::

    from simclr_path import load_encoder, PatchStore
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
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'simclr_path' has no attribute {name!r}")
