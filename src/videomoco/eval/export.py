"""Load a query encoder from any checkpoint we know, and export it as torchvision-compatible weights.

Accepted files (always read with `torch.load(weights_only=True)` or safetensors):

    ours, pretraining     {"format": "videomoco", "arch", "config": {"width", ...}, "state_dict": {"encoder_q.*", ...}}
    ours, exported        torchvision-key state_dict (.pth or .safetensors) + optional JSON sidecar FILE.json
    authors', pretraining {"epoch", "arch", "state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}
    authors', eval.py     {"epoch", "arch", "state_dict": {"module.<torchvision key>", ...}, "best_acc1", "optimizer"}
    torchvision           the raw state_dict, e.g. r2plus1d_18-91a641e6.pth

The rule is the authors' eval.py one: strip `module.`, keep `encoder_q.*` when present and strip that too.
The arch comes from the file, or else from the key/shape signature; the width from the shapes.

    videomoco export CKPT --out encoder.pth [--format pth|safetensors]
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from videomoco.engine.checkpoint import CheckpointError, safe_load
from videomoco.flags import config_from
from videomoco.method.moco import mlp_head
from videomoco.models import build_encoder, list_encoders

log = logging.getLogger(__name__)


def read_checkpoint(path):
    """The raw object of a `.pth`/`.pth.tar`/`.safetensors` file (a dict), read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, **(f.metadata() or {})}
    try:
        return safe_load(path)  # weights_only=True, deflate bombs refused
    except CheckpointError as err:  # truncated zip, a pickle of custom classes, not a checkpoint at all
        raise ValueError(str(err)) from None


def encoder_state(path):
    """`(state_dict with torchvision keys incl. fc.* when stored, info dict)` of the query encoder in `path`.

    `info` holds what the file says: `arch`, `width`, `format` (videomoco / export / authors / torchvision).
    """
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint dict (got {type(obj).__name__})")
    info = {}
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        info.update({k: config[k] for k in ("width", "dim", "mlp") if k in config})
        for key in ("arch", "width", "format", "feature_dim"):
            if isinstance(obj.get(key), (str, int)):
                info[key] = obj[key]
        info.setdefault("format", "authors")
    else:  # a bare state_dict: ours (exported, with its sidecar) or torchvision's
        sidecar = Path(path).with_suffix(".json")
        if sidecar.is_file():
            info.update(json.loads(sidecar.read_text()))
        sd, info["format"] = obj, info.get("format", "torchvision")
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith("encoder_q.") for k in sd):
        sd = {k[len("encoder_q.") :]: v for k, v in sd.items() if k.startswith("encoder_q.")}
    if not sd:
        raise ValueError(f"{path}: no encoder weights found")
    for key in ("width", "feature_dim"):
        if key in info:
            info[key] = int(info[key])
    return sd, info


def _reference(arch, width):
    """Shapes of the backbone (no fc) of `arch` at `width`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_encoder(arch, num_classes=1, width=width)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _infer_width(arch, sd):
    """The width whose stage-1 channel count the checkpoint has (the first tensor with 64 rows at width 64)."""
    for key, shape in _reference(arch, 64).items():
        if len(shape) >= 1 and shape[0] == 64 and key in sd:
            return int(sd[key].shape[0])
    return None


def _mismatch(arch, width, sd):
    """None if the backbone keys and shapes of `sd` are those of `arch` at `width`, else a one-line reason."""
    ref = _reference(arch, width)
    backbone = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    missing = [k for k in ref if k not in backbone]
    unexpected = [k for k in backbone if k not in ref]
    if missing or unexpected:
        return f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
    for k, shape in ref.items():
        if backbone[k] != shape:
            return f"{k} has shape {list(backbone[k])}, {arch} width {width} expects {list(shape)}"
    return None


def _infer_arch(sd):
    """The registered encoder whose backbone signature matches `sd`, with its width."""
    matches = []
    for arch in list_encoders():
        width = _infer_width(arch, sd)
        if width and _mismatch(arch, width, sd) is None:
            matches.append((arch, width))
    if len(matches) != 1:
        found = "no" if not matches else "several"
        raise ValueError(f"cannot tell the architecture from the weights ({found} registered encoder matches); pass arch=")
    return matches[0]


def _head(sd):
    """The pretraining / fine-tuning head stored under `fc.*`: Linear, MLP (fc.0, fc.2), MLP with
    BatchNorm (fc.0, fc.1, fc.3, fc.4; `mlp_head(bn=True)`) or None."""
    if "fc.weight" in sd:
        out_dim, in_dim = sd["fc.weight"].shape
        return nn.Linear(in_dim, out_dim), {k[len("fc.") :]: sd[k] for k in ("fc.weight", "fc.bias")}
    if "fc.0.weight" in sd and "fc.3.weight" in sd:
        hidden, in_dim = sd["fc.0.weight"].shape
        head = mlp_head(nn.Linear(hidden, sd["fc.3.weight"].shape[0]), bn=True)
        return head, {k[len("fc.") :]: v for k, v in sd.items() if k.startswith("fc.")}
    if "fc.0.weight" in sd and "fc.2.weight" in sd:
        hidden, in_dim = sd["fc.0.weight"].shape
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, sd["fc.2.weight"].shape[0]))
        return head, {k[len("fc.") :]: v for k, v in sd.items() if k.startswith("fc.")}
    return None, None


def load_encoder(path, arch=None, width=None, num_classes=None):
    """The query encoder stored in `path`, ready for `forward_features(x (B, 3, T, H, W)) -> (B, feature_dim)`.

    `fc` is the head stored in the file (the pretraining projection, Linear or MLP; a fine-tuned classifier),
    or `nn.Identity()` when the file has none. `num_classes=N` replaces it by a fresh `nn.Linear(feature_dim, N)`
    (N(0, 0.01) weights, zero bias, as the authors' eval.py). Raises `ValueError` on any arch/width/key mismatch.
    """
    sd, info = encoder_state(path)
    stored_arch, stored_width = info.get("arch"), info.get("width")
    if arch and stored_arch and arch != stored_arch:
        raise ValueError(f"{path} holds a {stored_arch} encoder, not {arch}")
    if width and stored_width and width != stored_width:
        raise ValueError(f"{path} holds a width-{stored_width} encoder, not width {width}")
    arch = arch or stored_arch
    if arch is None:
        arch, inferred = _infer_arch(sd)
        width = width or stored_width or inferred
    elif arch not in list_encoders():
        raise ValueError(f"{path}: unknown architecture {arch!r}; known: {', '.join(list_encoders())}")
    width = width or stored_width or _infer_width(arch, sd) or 64
    reason = _mismatch(arch, width, sd)
    if reason:
        raise ValueError(f"{path} does not match {arch} (width {width}): {reason}")

    model = build_encoder(arch, num_classes=1, width=width)
    model.fc = nn.Identity()
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    if num_classes is not None:
        model.fc = nn.Linear(model.feature_dim, num_classes)
        nn.init.normal_(model.fc.weight, 0.0, 0.01)
        nn.init.zeros_(model.fc.bias)
    else:
        head, head_sd = _head(sd)
        if head is not None:
            head.load_state_dict(head_sd)
            model.fc = head
    model.arch, model.width = arch, width
    return model


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
    from videomoco.eval.common import cli_main  # common imports this module

    return cli_main("export", run, config_from(ExportConfig, args))
