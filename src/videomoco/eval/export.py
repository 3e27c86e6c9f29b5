"""Export the query encoder of any checkpoint `load_encoder` reads as torchvision-compatible weights.

    videomoco export CKPT --out encoder.pth [--format pth|safetensors]
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from videomoco.engine.checkpoint import load_encoder

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
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "export", "arch": model.arch, "width": model.width, "feature_dim": model.feature_dim}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out), metadata={k: str(v) for k, v in meta.items()})
    else:
        torch.save(sd, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({**meta, "source": str(cfg.checkpoint), "num_tensors": len(sd)}, indent=2) + "\n")
    log.info("exported %s (%s, width %d, %d tensors) to %s", model.arch, fmt, model.width, len(sd), out)
    print(f"wrote {out} and {sidecar} ({model.arch}, width {model.width}, feature_dim {model.feature_dim})")
    return {"weights": str(out), "sidecar": str(sidecar), **meta}


def main(args):
    from videomoco.eval.common import cli_main

    return cli_main("export", run, ExportConfig, args)
