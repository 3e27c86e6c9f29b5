"""Each preset against its source: the source's rule transcribed as numbers (file and line cited), for a fixture
set of video lengths, frame rates and sizes; random draws by their ranges. docs/eval.md tables the same choices."""

import numpy as np
import pytest

from videomoco.data.augment import (IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box, resized_size,
                                    view_boxes)
from videomoco.data.sampling import view_clip_indices
from videomoco.eval import protocols
from videomoco.eval.features import video_scores
from videomoco.eval.finetune import FinetuneConfig
from videomoco.eval.knn import KnnConfig
from videomoco.eval.linear import LinearConfig

SIZES = [(240, 320), (256, 340), (241, 321), (320, 240)]  # (h, w): UCF101's, HMDB51's, odd, portrait


def clips(name, num_frames, fps=25.0):
    p = protocols.get(name)
    return view_clip_indices(p.view.clips, num_frames, fps, p.frames, p.frame_stride, p.num_clips)


def starts(name, num_frames, fps=25.0):
    return [c[0] for c in clips(name, num_frames, fps)]


def boxes(name, h, w, crop=None):
    """(resized size, boxes) of preset `name` for an h x w frame."""
    p = protocols.get(name)
    crop = crop or p.crop
    resize = crop if p.view.resize == "crop" else p.view.resize
    side = crop if p.view.side == "crop" else p.view.side
    rh, rw = resized_size(h, w, resize)
    return (rh, rw), view_boxes(rh, rw, side, p.num_crops, p.view.rounding)


def logit_rows():
    # three clips of one video whose softmax mean (class 0) and logit mean (class 1) disagree
    logits = np.array([[0.0, 10.0], [2.0, 0.0], [2.0, 0.0]])
    return logits, np.array([0, 0, 0]), np.array([1, 1, 1])


def check_aggregation(kind):
    logits, ids, labels = logit_rows()
    _, scores, _ = video_scores(logits, ids, labels, kind)
    expected = logits.mean(0) if kind == "logits" else (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).mean(0)
    np.testing.assert_allclose(scores[0], expected)
    return scores[0].argmax()


def test_authors_is_their_eval_py():
    """tinapan-pt/VideoMoCo eval.py @ aba3795 (= 42e069a)."""
    p = protocols.get("authors")
    # L267-268: NormalizeVideo(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert p.input_norm == "imagenet" and (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # L51 -cs 224, L53 -fpc 32, L55 -sbc 1 (windows every frame), L57 -cpv 10
    assert (p.frames, p.frame_stride, p.crop, p.num_clips, p.num_crops) == (32, 1, 224, 10, 1)
    # L320 UniformClipSampler: floor(linspace(0, W - 1, 10)) over the W = N - 32 + 1 windows (VideoClips, L66-77
    # of dataset/ucf101_eval.py, frame_rate None: every frame); a clip is 32 consecutive frames
    assert starts("authors", 100) == [0, 7, 15, 22, 30, 37, 45, 52, 60, 68]  # W - 1 = 68
    assert starts("authors", 175) == [0, 15, 31, 47, 63, 79, 95, 111, 127, 143]  # W - 1 = 143
    assert starts("authors", 40) == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # W - 1 = 8
    assert clips("authors", 100)[1] == list(range(7, 39))
    assert starts("authors", 20) == [0] * 10  # shorter than a clip: no window there (skipped); looped here
    # L280 CenterCropVideo(224) of the raw frames, no resize: offsets int(round((h - 224) / 2.0)) (torchvision's
    # _functional_video.center_crop), half to even
    assert boxes("authors", 240, 320) == ((240, 320), [(8, 48, 224, 224)])
    assert boxes("authors", 256, 340) == ((256, 340), [(16, 58, 224, 224)])
    assert boxes("authors", 241, 321) == ((241, 321), [(8, 48, 224, 224)])  # 8.5 -> 8, 48.5 -> 48
    assert boxes("authors", 320, 240) == ((320, 240), [(48, 8, 224, 224)])
    # L452-454: output.view(-1, cpv, C).mean(1): logits averaged
    assert p.finetune.aggregation == "logits" and check_aggregation("logits") == 1
    ft = p.finetune
    # L42 epochs 10, L46 -b 256, L59 lr 0.005, L61 lr_decay 0.1, L67 schedule [6, 8], L69 momentum 0.9, L71 wd 1e-4
    assert (ft.epochs, ft.batch_size, ft.lr, ft.lr_decay, ft.schedule, ft.momentum, ft.weight_decay) == (
        10, 256, 0.005, 0.1, (6, 8), 0.9, 1e-4)
    # L300 RandomClipSampler(video_clips, 10); L272 RandomResizedCropVideo(224): scale (0.08, 1), ratio (3/4, 4/3);
    # L273 RandomHorizontalFlipVideo; L387 model.eval() while training; L349-351 best_acc1 on the test split
    assert (ft.clips_per_video, ft.train_scale, ft.train_ratio, ft.bn, ft.train_layers, ft.report) == (
        10, (0.08, 1.0), (3 / 4, 4 / 3), "eval", "all", "last+best")
    rng = np.random.default_rng(0)
    for h, w in SIZES:  # the random crop's ranges: area share [0.08, 1], aspect [3/4, 4/3] (or the fallback)
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_box(h, w, ft.train_scale, ft.train_ratio, rng=rng)
            assert 0 <= top <= h - ch and 0 <= left <= w - cw
            assert 0.08 * h * w * 0.9 <= ch * cw <= h * w and 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05


def test_authors_lincls_is_their_first_eval_py():
    """tinapan-pt/VideoMoCo eval.py @ 0ed0a13: L172-174 freeze every parameter but fc.weight / fc.bias (active),
    L42 epochs 100, L51 -cs 112, L53 -fpc 16, L59 lr 30, L67 schedule [60, 80], L71 wd 0."""
    p = protocols.get("authors-lincls")
    ft = p.finetune
    assert (p.frames, p.crop, ft.epochs, ft.lr, ft.schedule, ft.weight_decay, ft.train_layers, ft.bn) == (
        16, 112, 100, 30.0, (60, 80), 0.0, "fc", "eval")
    assert starts("authors-lincls", 101) == [0, 9, 18, 28, 37, 47, 56, 66, 75, 85]  # W - 1 = 85


def test_vcop_is_their_retrieve_clips_py():
    """xudejing/video-clip-order-prediction retrieve_clips.py and datasets/ucf101.py."""
    p = protocols.get("vcop")
    # retrieve_clips.py L68/L100: UCF101ClipRetrievalDataset(root, 16, 10, ...): 16 frames, 10 clips
    assert (p.frames, p.frame_stride, p.num_clips, p.num_crops, p.crop) == (16, 1, 10, 1, 112)
    # datasets/ucf101.py L168-170: for c in linspace(16/2, N - 16/2, 10): start = int(c - 16/2)
    assert starts("vcop", 99) == [0, 9, 18, 27, 36, 46, 55, 64, 73, 83]
    assert starts("vcop", 52) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert clips("vcop", 99)[5] == list(range(46, 62))
    # retrieve_clips.py L63-64 / L95-96: Resize((128, 171)) whatever the size, CenterCrop(112): offsets
    # int(round((128 - 112) / 2)) = 8 and int(round((171 - 112) / 2)) = round(29.5) = 30
    for h, w in SIZES:
        assert boxes("vcop", h, w) == ((128, 171), [(8, 30, 112, 112)])
    # L65 ToTensor only: their encoders were trained on [0, 1] inputs; ours get their own statistics
    assert p.input_norm == "checkpoint"
    # L128/L135: np.mean over the 10 clips' features; L143 cosine_distances(test, train); L140 ks
    assert p.retrieval == protocols.RetrievalRecipe(center=False, recall_ks=(1, 5, 10, 20, 50))


def test_coclr_is_their_retrieval_and_feature_probe():
    """TengdaHan/CoCLR eval/main_classifier.py, dataset/lmdb_dataset.py, eval/feature_linear_probe.py, README."""
    p = protocols.get("coclr")
    # main_classifier.py L43 --seq_len 32, L46 --ds 1, L57 --img_dim 128
    assert (p.frames, p.frame_stride, p.crop, p.num_crops) == (32, 1, 128, 1)
    # lmdb_dataset.py L112-122 (mode test): windows of 32 from 0 every 32 // 2 - 1 = 15 up to N - 32; a video no
    # longer than 32 gives one window, left-padded with frame 0
    assert starts("coclr", 100) == [0, 15, 30, 45, 60]
    assert starts("coclr", 40) == [0]
    assert clips("coclr", 20) == [[0] * 12 + list(range(20))]
    assert clips("coclr", 100)[2] == list(range(30, 62))
    # frames stored at short side 256 (their LMDBs), main_classifier.py L560 CenterCrop(224): offsets
    # int(round((h - 224) / 2.)) (utils/augmentation.py L56-57), L561 Scale(128)
    assert boxes("coclr", 240, 320) == ((256, 341), [(16, 58, 224, 224)])  # 58.5 -> 58
    assert boxes("coclr", 320, 240) == ((341, 256), [(58, 16, 224, 224)])
    assert boxes("coclr", 256, 340) == ((256, 340), [(16, 58, 224, 224)])
    # main_classifier.py L637/L673: a video's feature is the mean of its windows'; L690-695: each set centred,
    # then L2-normalised; L686 ks
    assert p.retrieval == protocols.RetrievalRecipe(center=True, recall_ks=(1, 5, 10, 20, 50))
    # feature_linear_probe.py L28 batch 1024, L29 lr 1.0 (README L124), L30 wd 1e-3, L31 100 epochs,
    # L34 schedule [60, 80] x 0.1 (L218-225), L121 SGD momentum 0.9, L36 --normalize off (and no standardisation: the BN does it), README L124 --final_bn,
    # L32 eval_freq 5 and L137-146 the best of those evaluations (>=)
    assert p.probe == protocols.ProbeRecipe(features="video", optimizer="sgd", epochs=100, lr=1.0, weight_decay=1e-3,
                                            schedule=(60, 80), classifier_batch_size=1024, l2_normalize=False,
                                            standardize=False, final_bn=True, eval_every=5, report="last+best")


def test_slowfast_is_pyslowfast_multi_view_test():
    """facebookresearch/SlowFast slowfast/config/defaults.py, datasets/decoder.py, datasets/transform.py."""
    p = protocols.get("slowfast")
    # defaults.py L666 NUM_FRAMES 8, L669 SAMPLING_RATE 8, L716 TEST_CROP_SIZE 256, L278 NUM_ENSEMBLE_VIEWS 10,
    # L282 NUM_SPATIAL_CROPS 3
    assert (p.frames, p.frame_stride, p.crop, p.num_clips, p.num_crops) == (8, 8, 256, 10, 3)
    # decoder.py L305-306 clip_size = 8 * 8 / 30 * fps (L720 TARGET_FPS 30); L59 delta = N - clip_size;
    # L73 start = delta * i / 10; L31-32 linspace(start, start + clip_size - 1, 8), clamped, truncated
    at30 = clips("slowfast", 300, fps=30.0)  # clip_size 64, delta 236
    assert at30[0] == [0, 9, 18, 27, 36, 45, 54, 63] and at30[1] == [23, 32, 41, 50, 59, 68, 77, 86]
    assert [c[0] for c in at30] == [0, 23, 47, 70, 94, 118, 141, 165, 188, 212]  # int(23.6 * i)
    at25 = clips("slowfast", 300, fps=25.0)  # clip_size 53.33
    assert at25[0] == [0, 7, 14, 22, 29, 37, 44, 52]
    assert clips("slowfast", 40, fps=30.0)[3] == [0, 9, 18, 27, 36, 39, 39, 39]  # delta 0; clamped to the video
    # transform.py L79-93 (kinetics.py L229-233: scale = crop = 256): short side to 256, the long one floored;
    # L226-238 uniform_crop: offsets 0, ceil((L - 256) / 2), L - 256 along the long side
    assert boxes("slowfast", 240, 320) == ((256, 341), [(0, 0, 256, 256), (0, 43, 256, 256), (0, 85, 256, 256)])
    assert boxes("slowfast", 320, 240) == ((341, 256), [(0, 0, 256, 256), (43, 0, 256, 256), (85, 0, 256, 256)])
    assert boxes("slowfast", 256, 340) == ((256, 340), [(0, 0, 256, 256), (0, 42, 256, 256), (0, 84, 256, 256)])
    # defaults.py L428 HEAD_ACT softmax, L743 ENSEMBLE_METHOD sum (meters.py L326-327): softmax summed = averaged
    assert p.finetune.aggregation == "softmax" and check_aggregation("softmax") == 0


def test_videomoco_is_this_package_before_presets():
    p = protocols.get("videomoco")
    assert starts("videomoco", 100) == [0, 9, 19, 28, 37, 47, 56, 65, 75, 84]  # round(i * 84 / 9)
    assert boxes("videomoco", 240, 320) == ((240, 320), [(0, 40, 240, 240)])  # the short side, resized to the crop
    assert p.input_norm == "checkpoint" and p.finetune.aggregation == "softmax" and p.finetune.bn == "train"
    assert protocols.DEFAULT == "videomoco"


def test_configs_take_the_protocol_and_name_every_deviation():
    cfg = FinetuneConfig(protocol="authors", crop=112, device="cpu")
    assert (cfg.frames, cfg.crop, cfg.lr, cfg.schedule, cfg.bn, cfg.aggregation, cfg.input_norm) == (
        32, 112, 0.005, [6, 8], "eval", "logits", "imagenet")
    assert protocols.deviations(cfg) == {"crop": {"protocol": 224, "used": 112}}
    assert "crop 112 (protocol: 224)" in protocols.describe(cfg)
    assert protocols.deviations(FinetuneConfig(protocol="authors", device="cpu")) == {}
    linear = LinearConfig(protocol="coclr", device="cpu")
    assert (linear.features, linear.optimizer, linear.lr, linear.final_bn, linear.l2_normalize) == (
        "video", "sgd", 1.0, True, False)
    assert KnnConfig(protocol="coclr", device="cpu").center is True
    assert KnnConfig(device="cpu").center is False
    with pytest.raises(ValueError, match="--protocol: unknown protocol 'nope'"):
        FinetuneConfig(protocol="nope", device="cpu")


def test_cli_override_is_logged_as_a_deviation(tmp_path, make_video, caplog):
    from eval_data import pretrain_checkpoint, ucf101_root
    from videomoco.cli import main as cli

    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1, num_frames=12, size=32)
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    caplog.set_level("INFO")
    out = tmp_path / "knn"
    assert cli(["knn", str(root), "--protocol", "vcop", "--pretrained", str(tmp_path / "ckpt.pth"), "--frames", "4",
                "--crop", "24", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "protocol vcop, deviations: frames 4 (protocol: 16), crop 24 (protocol: 112)" in caplog.text
    import json

    record = json.loads((out / "metrics.json").read_text())
    assert record["protocol"] == "vcop" and set(record["deviations"]) == {"frames", "crop"}
    assert "protocol vcop, deviations" in (out / "summary.md").read_text()


def test_every_preset_is_a_frozen_record():
    for p in protocols.PROTOCOLS.values():
        with pytest.raises(Exception):
            p.crop = 1
    assert set(protocols.PROTOCOLS) >= {"videomoco", "authors", "vcop", "coclr", "slowfast"}


def test_flags_not_given_take_the_protocol():
    """Parsed from the command line: only the flags given are deviations (a regression: defaults taken from an
    instance made every `videomoco` value a deviation of `authors`)."""
    from videomoco.cli import build_parser
    from videomoco.eval import common

    args = build_parser("finetune").parse_args(["finetune", "DATA", "--protocol", "authors", "--crop", "112",
                                                "--device", "cpu"])
    cfg = common.config_from_args(FinetuneConfig, args)
    assert protocols.deviations(cfg) == {"crop": {"protocol": 224, "used": 112}}
    assert (cfg.bn, cfg.aggregation, cfg.lr, cfg.clips_per_video, cfg.input_norm) == ("eval", "logits", 0.005, 10,
                                                                                     "imagenet")
