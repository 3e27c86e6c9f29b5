import json
import math

import numpy as np
import pytest

from videomoco.eval.knn import knn_accuracy, knn_scores, retrieval_recall


def random_features(seed=0, n_train=40, n_test=15, dim=6, classes=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_train, dim)).astype(np.float32), rng.integers(0, classes, n_train),
            rng.normal(size=(n_test, dim)).astype(np.float32), rng.integers(0, classes, n_test))


def brute_force(train_x, train_y, test_x, test_y, k, temperature=0.07):
    """Loops in float64: weighted kNN prediction and retrieval hit per test row."""
    preds, hits = [], []
    for x in test_x.astype(np.float64):
        sims = []
        for j, t in enumerate(train_x.astype(np.float64)):
            sims.append((float(x @ t / (np.linalg.norm(x) * np.linalg.norm(t))), j))
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for sim, j in sims[:k]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + math.exp(sim / temperature)
        preds.append(max(sorted(votes), key=lambda c: votes[c]))
        hits.append([int(train_y[j]) for _, j in sims[:k]])
    return np.array(preds), hits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_matches_brute_force(seed):
    train_x, train_y, test_x, test_y = random_features(seed)
    got = knn_accuracy(train_x, train_y, test_x, test_y, ks=(1, 20))
    for k in (1, 20):
        preds, _ = brute_force(train_x, train_y, test_x, test_y, k)
        assert got[f"knn_top1_k{k}"] == pytest.approx(100.0 * np.mean(preds == test_y))
        scores = knn_scores(train_x, train_y, test_x, k, num_classes=4)
        assert np.array_equal(scores.argmax(1), preds)


@pytest.mark.parametrize("seed", [0, 3])
def test_retrieval_recall_matches_brute_force(seed):
    train_x, train_y, test_x, test_y = random_features(seed, n_train=60)
    ks = (1, 5, 10, 20, 50)
    got = retrieval_recall(train_x, train_y, test_x, test_y, ks)
    _, neighbours = brute_force(train_x, train_y, test_x, test_y, max(ks))
    for k in ks:
        expected = np.mean([y in labels[:k] for y, labels in zip(test_y, neighbours)])
        assert got[f"R@{k}"] == pytest.approx(100.0 * expected)
    recalls = [got[f"R@{k}"] for k in ks]
    assert recalls == sorted(recalls)  # recall never falls as k grows


def test_scale_invariance_and_perfect_clusters():
    train_x, train_y, test_x, test_y = random_features(4)
    a = knn_accuracy(train_x, train_y, test_x, test_y)
    b = knn_accuracy(train_x * 7.0, train_y, test_x * 0.1, test_y)  # cosine: norms must not matter
    assert a == b
    centres = np.eye(4, dtype=np.float32) * 10
    labels = np.arange(4).repeat(5)
    rng = np.random.default_rng(0)
    train = centres[labels] + rng.normal(scale=0.1, size=(20, 4)).astype(np.float32)
    test = centres[labels] + rng.normal(scale=0.1, size=(20, 4)).astype(np.float32)
    assert knn_accuracy(train, labels, test, labels)["knn_top1_k1"] == 100.0
    assert retrieval_recall(train, labels, test, labels)["R@1"] == 100.0


def test_knn_command_end_to_end(tmp_path, make_video):
    from eval_data import pretrain_checkpoint, tiny_args, ucf101_root
    from videomoco.cli import main as cli

    root = ucf101_root(tmp_path, make_video)
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "knn"
    assert cli(["knn", str(root), "--dataset", "ucf101", "--pretrained", str(tmp_path / "ckpt.pth"), *tiny_args(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["num_train_videos"] == 6 and m["num_test_videos"] == 6
    for key in ("knn_top1_k1", "knn_top1_k20", "R@1", "R@5", "R@50"):
        assert 0.0 <= m[key] <= 100.0
    assert m["R@1"] <= m["R@5"] <= m["R@50"] == 100.0  # 6 train videos cover every class
    assert "R@10" in (out / "summary.md").read_text()


def test_knn_on_a_folder_dataset_with_train_and_val(tmp_path, make_video):
    from eval_data import tiny_args
    from videomoco.cli import main as cli

    for subset, count in (("train", 2), ("val", 1)):
        for c, cls in enumerate(("left", "right")):
            for i in range(count):
                make_video(f"synth/{subset}/{cls}/{i}.mp4", num_frames=12, size=40, seed=10 * c + i)
    out = tmp_path / "knn"
    assert cli(["knn", str(tmp_path / "synth"), "--dataset", "folder", *tiny_args(out)]) == 0  # random init
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert (m["num_train_videos"], m["num_test_videos"]) == (4, 2)
