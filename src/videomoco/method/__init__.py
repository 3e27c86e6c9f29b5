"""VideoMoCo: the MoCo discriminator with a decayed queue, the frame-dropping generator, the losses
and the adversarial training step."""

from videomoco.method.adversarial import AdversarialConfig, AdversarialTrainer, compile_encoders
from videomoco.method.generator import (GENERATORS, DropGenerator, FrameDropGenerator, MotionDropGenerator,
                                        build_generator, drop_frames, num_dropped, random_drop)
from videomoco.method.losses import contrastive_loss, decayed_logits, feature_l1, positive_rank_accuracy
from videomoco.method.moco import VideoMoCo, concat_all_gather

__all__ = [
    "AdversarialConfig",
    "AdversarialTrainer",
    "DropGenerator",
    "FrameDropGenerator",
    "GENERATORS",
    "MotionDropGenerator",
    "VideoMoCo",
    "build_generator",
    "compile_encoders",
    "concat_all_gather",
    "contrastive_loss",
    "decayed_logits",
    "drop_frames",
    "feature_l1",
    "num_dropped",
    "positive_rank_accuracy",
    "random_drop",
]
