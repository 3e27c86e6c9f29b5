"""Pretraining engine: config (`config`), processes (`distributed`), checkpoints (`checkpoint`),
LR schedule (`schedule`), logging (`logger`), the epoch loop (`loop`) and the command (`pretrain`).

    from videomoco.engine.pretrain import run, PretrainConfig
    run(PretrainConfig(data="path/to/videos", epochs=1, width=8))
"""
