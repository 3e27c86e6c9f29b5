"""Evaluation: fine-tuning, linear probe, kNN/retrieval, robustness to dropped frames, feature extraction,
export, and the suite that runs them all. Each command module has `add_arguments`, `main` and `run(cfg)`."""

from videomoco.engine.checkpoint import load_encoder

__all__ = ["load_encoder"]
