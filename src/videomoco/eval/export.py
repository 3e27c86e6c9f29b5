"""Export the query encoder of any checkpoint `load_encoder` reads as torchvision-compatible weights.

    videomoco export CKPT --out encoder.pth [--format pth|safetensors]
"""

import logging
from dataclasses import dataclass

from videomoco.engine.checkpoint import load_encoder, save_export

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    checkpoint: str = ""
    out: str = "encoder.pth"
    format: str = ""  # pth | safetensors; empty = from the --out suffix


def add_arguments(parser):
    parser.add_argument("checkpoint", help="pretraining checkpoint (ours or the authors'), or any file load_encoder reads")
    parser.add_argument("--out", required=True, help="output file (.pth or .safetensors); a .json sidecar goes next to it")
    parser.add_argument("--format", choices=["pth", "safetensors"], default=ExportConfig.format,
                        help="default: from the --out suffix")


def run(cfg):
    """Write the query encoder backbone (torchvision keys, no `fc.*`) and its JSON sidecar; returns the paths."""
    fmt = cfg.format or ("safetensors" if cfg.out.endswith(".safetensors") else "pth")
    model = load_encoder(cfg.checkpoint)
    result = save_export(model, cfg.out, fmt, source=cfg.checkpoint)
    log.info("exported %s (%s, width %d, %d tensors) to %s", model.arch, fmt, model.width, result["num_tensors"],
             cfg.out)
    print(f"wrote {result['weights']} and {result['sidecar']} ({model.arch}, width {model.width}, "
          f"feature_dim {model.feature_dim})")
    return result


def main(args):
    from videomoco.eval.common import cli_main

    return cli_main("export", run, ExportConfig, args)
