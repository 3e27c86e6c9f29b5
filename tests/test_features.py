import numpy as np
import pytest
import torch

from videomoco.eval.features import (confusion_matrix, extract_features, per_class_accuracy, topk_accuracy,
                                     video_average, video_scores)


def test_video_average_groups_shuffled_rows_by_video():
    rng = np.random.default_rng(0)
    ids = np.array([7, 7, 7, 2, 2, 9])
    labels = np.array([1, 1, 1, 0, 0, 2])
    values = rng.normal(size=(6, 4)).astype(np.float32)
    perm = rng.permutation(6)
    got_ids, mean, got_labels = video_average(values[perm], ids[perm], labels[perm])
    for vid, row, lab in zip(got_ids, mean, got_labels):
        assert np.allclose(row, values[ids == vid].mean(axis=0), atol=1e-6)
        assert lab == labels[ids == vid][0]
    assert got_ids[0] == ids[perm][0]  # first-appearance order, not sorted
    with pytest.raises(ValueError, match="different labels"):
        video_average(values, ids, np.array([1, 0, 1, 0, 0, 2]))


def test_video_scores_average_softmax_not_logits():
    # one confident wrong clip against two mildly right ones: logit averaging and softmax averaging disagree
    logits = np.array([[0.0, 30.0], [1.0, 0.0], [1.0, 0.0]])
    _, probs, labels = video_scores(logits, np.zeros(3, dtype=int), np.zeros(3, dtype=int))
    expected = torch.softmax(torch.tensor(logits), 1).mean(0).numpy()
    assert np.allclose(probs[0], expected) and labels[0] == 0
    assert probs[0].argmax() == 1 and logits.mean(0).argmax() == 1


def test_topk_and_confusion():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.2, 0.4, 0.3]])
    labels = np.array([2, 0, 2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(50.0) and acc["top2"] == pytest.approx(75.0)
    cm = confusion_matrix(scores.argmax(1), labels, 3)
    assert cm.sum() == 4 and cm[2, 1] == 1 and cm[0, 0] == 1
    per_class = per_class_accuracy(cm)
    assert per_class[0] == pytest.approx(50.0) and np.isnan(per_class[1])


class Linear3d(torch.nn.Module):
    feature_dim = 3

    def forward_features(self, x):
        return x.mean(dim=(2, 3, 4))  # (B, 3)

    def forward(self, x):
        return 2 * self.forward_features(x)


def test_extract_features_keeps_rows_and_ids_together():
    clips = torch.randint(0, 256, (5, 3, 2, 4, 4), dtype=torch.uint8)
    loader = [(clips[:3], torch.tensor([0, 0, 1]), torch.tensor([4, 4, 5])), (clips[3:], torch.tensor([1, 2]), torch.tensor([5, 6]))]
    rows = extract_features(Linear3d(), loader)
    assert rows["features"].shape == (5, 3) and rows["video_ids"].tolist() == [4, 4, 5, 5, 6]
    logits = extract_features(Linear3d(), loader, head=True)["features"]
    assert np.allclose(logits, 2 * rows["features"])
    dropped = extract_features(Linear3d(), loader, clip_fn=lambda x: x * 0)["features"]
    assert np.all(dropped == 0)


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_extract_features_in_micro_batches_gives_the_same_features(micro_batch):
    from videomoco.models import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("r3d_18", num_classes=3, width=8)
    clips = torch.randint(0, 256, (5, 3, 4, 32, 32), dtype=torch.uint8)
    loader = [(clips[:3], torch.tensor([0, 0, 1]), torch.tensor([4, 4, 5])), (clips[3:], torch.tensor([1, 2]), torch.tensor([5, 6]))]
    for head in (False, True):
        whole = extract_features(encoder, loader, head=head)
        split = extract_features(encoder, loader, head=head, micro_batch=micro_batch)
        assert split["features"].shape == whole["features"].shape == (5, 64 if not head else 3)
        np.testing.assert_allclose(split["features"], whole["features"], rtol=1e-5, atol=1e-6)
        assert split["video_ids"].tolist() == whole["video_ids"].tolist() == [4, 4, 5, 5, 6]


def test_bf16_features_match_fp32_within_tolerance():
    """What `--precision bf16` (auto on a CUDA GPU with native bf16) does to the features, measured on the CPU:
    every feature within 5% of the fp32 one's norm (relative L2) and at cosine >= 0.995 to it."""
    from torch.utils.data import DataLoader, TensorDataset

    from videomoco.models import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("r3d_18", num_classes=1, width=8)
    encoder.fc = torch.nn.Identity()
    clips = torch.randint(0, 256, (6, 3, 4, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(clips, torch.zeros(6, dtype=torch.long), torch.arange(6)), batch_size=3)
    fp32 = extract_features(encoder, loader)["features"]
    bf16 = extract_features(encoder, loader, amp_dtype=torch.bfloat16)["features"]
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)  # autocast did run in bf16
    rel = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert rel.max() < 0.05 and cos.min() > 0.995
