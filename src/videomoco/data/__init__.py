"""Video data: decode (PyAV), index + quarantine, layouts, transcode, synthetic data,
clip sampling, datasets and augmentation.

    index.open_index -> datasets.PretrainDataset / LabeledDataset -> datasets.build_loader
    -> uint8 (B, 3, T, H, W) -> augment.GpuAugment / augment.normalize on the model's device

Import the submodules directly (`from videomoco.data.datasets import PretrainDataset`);
this package imports nothing so that `videomoco --help` stays fast.
"""
