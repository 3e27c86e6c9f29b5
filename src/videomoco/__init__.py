"""VideoMoCo: contrastive video representation learning with temporally adversarial examples."""

__version__ = "0.1.0"


def load_encoder(path, **kwargs):
    """Load a query encoder from any supported checkpoint format (see `videomoco.engine.checkpoint`)."""
    from videomoco.engine.checkpoint import load_encoder as _load

    return _load(path, **kwargs)
