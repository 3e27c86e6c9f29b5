"""Video encoders by name: `build_encoder("r2plus1d_18", num_classes=400, width=64)`."""

from videomoco.models.registry import (
    build_encoder,
    count_parameters,
    list_encoders,
    register_encoder,
    set_grad_checkpointing,
)

# importing the architecture modules registers them
from videomoco.models import c3d, resnet3d  # noqa: E402,F401  isort: skip

__all__ = ["build_encoder", "count_parameters", "list_encoders", "register_encoder", "set_grad_checkpointing"]
