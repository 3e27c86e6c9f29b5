"""VideoMoCo: contrastive video representation learning with temporally adversarial examples."""

import importlib

__version__ = "0.1.0"


def load_encoder(path, **kwargs):
    """Load a query encoder, in eval mode, from any supported checkpoint format (see `videomoco.engine.checkpoint`);
    its `.preprocessing` says what input it takes (`videomoco.transforms.preprocess` makes it)."""
    from videomoco.engine.checkpoint import load_encoder as _load

    return _load(path, **kwargs)


def __getattr__(name):
    """`videomoco.transforms` (and its `preprocess`, `read_clips`) without importing torch at `import videomoco`."""
    if name == "transforms":
        return importlib.import_module("videomoco.transforms")
    if name in ("preprocess", "read_clips"):
        return getattr(importlib.import_module("videomoco.transforms"), name)
    raise AttributeError(f"module 'videomoco' has no attribute {name!r}")
