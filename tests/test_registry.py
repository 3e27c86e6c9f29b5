"""The encoder registry, parameter / FLOP counting and the `videomoco models` command."""

import json

import pytest
import torch
import torch.nn as nn

import videomoco.models as models
from videomoco.cli import main as cli_main
from videomoco.models.registry import build_encoder, count_flops, count_parameters, list_encoders, register_encoder

# torchvision's published numbers for width 64, num_classes 400 (params; "GFLOPS" there are multiply-adds)
TORCHVISION = {
    "r3d_18": (33_371_472, 40.697),
    "mc3_18": (11_695_440, 43.343),
    "r2plus1d_18": (31_505_325, 40.519),
}


def test_list_and_reexports():
    assert set(list_encoders()) == {"r3d_18", "mc3_18", "r2plus1d_18", "c3d"}
    assert list_encoders() == sorted(list_encoders())
    assert models.build_encoder is build_encoder and models.list_encoders is list_encoders


def test_unknown_name_is_a_one_line_error_listing_the_known_names():
    with pytest.raises(ValueError) as info:
        build_encoder("resnet50")
    message = str(info.value)
    assert "\n" not in message and "resnet50" in message
    assert all(name in message for name in list_encoders())


def test_bad_width_and_duplicate_registration_are_rejected():
    with pytest.raises(ValueError, match="width"):
        build_encoder("r3d_18", width=0)

    def r3d_18(num_classes=400, width=64):
        return nn.Linear(1, 1)

    with pytest.raises(ValueError, match="already registered"):
        register_encoder(r3d_18)


def test_build_passes_num_classes_and_width():
    model = build_encoder("c3d", num_classes=7, width=4)
    assert model.feature_dim == 32
    assert model.fc.in_features == 32 and model.fc.out_features == 7


def test_count_parameters_trainable_only():
    model = build_encoder("mc3_18", num_classes=3, width=4)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc.weight.numel() - model.fc.bias.numel()


def test_count_flops_of_one_conv():
    conv = nn.Conv3d(3, 4, kernel_size=3, padding=1, bias=False)
    c, t, h, w = 3, 2, 5, 6
    # one multiply-add per (output element, kernel tap, input channel) counts 2 FLOPs
    assert count_flops(conv, (c, t, h, w)) == 2 * 4 * t * h * w * 27 * c
    assert conv.training  # counting leaves the train/eval mode as it was


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_flops_match_torchvision_published_ops(name):
    with torch.device("meta"):
        model = build_encoder(name)
    assert count_parameters(model) == TORCHVISION[name][0]
    assert count_flops(model) / 2e9 == pytest.approx(TORCHVISION[name][1], rel=1e-3)


def test_cli_models_table(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_encoders():
        assert name in out
    for params, _ in TORCHVISION.values():
        assert f"{params:,}" in out


def test_cli_models_json(capsys):
    assert cli_main(["models", "--json", "--width", "8", "--num-classes", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"] == {"width": 8, "num_classes": 10, "json": True}
    rows = {r["name"]: r for r in result["encoders"]}
    assert sorted(rows) == list_encoders()
    for name, row in rows.items():
        model = build_encoder(name, num_classes=10, width=8)
        assert row["params"] == count_parameters(model)
        assert row["feature_dim"] == model.feature_dim == 64
        assert row["gflops"] > 0
