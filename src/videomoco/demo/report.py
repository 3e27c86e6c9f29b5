"""The demo's pictures and `report.md`: training curves, accuracy bars, robustness curves, dropped frames."""

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from videomoco.data.augment import normalize
from videomoco import markdown
from videomoco.demo.ablation import GROUPS as ABLATION_GROUPS
from videomoco.demo.stats import paired_test, resolvable
from videomoco.engine.logger import drop_strip
from videomoco.engine.monitor import MONITOR_K
from videomoco.eval.robustness import load_generator
from videomoco.method.generator import drop_frames

COLOURS = {"random init": "tab:gray", "MoCo": "tab:blue", "VideoMoCo": "tab:red", "supervised": "tab:green"}


def read_metrics(log_dir):
    """The rows of a pretraining run's `metrics.jsonl` (one dict per logging step)."""
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def monitor_curve(log_dirs):
    """{epoch: kNN top-1} of the `--monitor` checks in the runs' logs, in order (a resume repeats its first)."""
    return {int(r["epoch"]): r["knn_top1"] for log_dir in log_dirs for r in read_metrics(log_dir) if "knn_top1" in r}


def training_curves(log_dirs, path):
    """InfoNCE loss and instance-discrimination top-1 against the step, one line per pretraining.

    log_dirs: name -> the log directories of its runs in order (a shared start, then its own continuation)."""
    fig = Figure(figsize=(13, 3.2))
    ax_loss, ax_acc, ax_knn = fig.subplots(1, 3)
    for name, dirs in log_dirs.items():
        rows = [row for log_dir in dirs for row in read_metrics(log_dir)]
        train = [r for r in rows if "loss_d" in r]
        checks = monitor_curve(dirs)
        ax_loss.plot([r["step"] for r in train], [r["loss_d"] for r in train], label=name, color=COLOURS.get(name))
        ax_acc.plot([r["step"] for r in train], [r["acc1"] for r in train], label=name, color=COLOURS.get(name))
        ax_knn.plot(list(checks), list(checks.values()), marker="o", label=name, color=COLOURS.get(name))
    ax_loss.set(xlabel="step", ylabel="InfoNCE loss", title="pretraining loss")
    ax_acc.set(xlabel="step", ylabel="top-1 (%)", title="positive key ranked first")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="--monitor: kNN on the test videos")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def accuracy_bars(results, path, chance):
    """kNN and linear-probe top-1 per model, with the chance level."""
    names = list(results)
    x = np.arange(len(names))
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    ax.bar(x - 0.2, [results[n]["knn_top1_k20"] for n in names], 0.4, label="kNN (k=20)")
    ax.bar(x + 0.2, [results[n]["linear_top1"] for n in names], 0.4, label="linear probe")
    ax.axhline(chance, color="k", linestyle=":", label="chance")
    ax.set_xticks(x, names)
    ax.set(ylabel="test top-1 (%)", title="synthetic motion classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def robustness_curves(results, path):
    """kNN top-1 against the fraction of frames dropped (solid: random drops, dashed: the generator's)."""
    fig = Figure(figsize=(9, 3.2))
    ax_knn, ax_cos = fig.subplots(1, 2)
    for name, metrics in results.items():
        for dropper, style in (("random", "-"), ("generator", "--")):
            rows = sorted((r for r in metrics["robustness"] if r["dropper"] == dropper), key=lambda r: r["ratio"])
            if not rows:
                continue
            label = name if dropper == "random" else f"{name}, generator drops"
            ratios = [r["ratio"] for r in rows]
            ax_knn.plot(ratios, [r["knn_top1_k20"] for r in rows], style, marker="o", label=label,
                        color=COLOURS.get(name))
            ax_cos.plot(ratios, [r["cosine"] for r in rows], style, marker="o", label=label, color=COLOURS.get(name))
    ax_knn.set(xlabel="fraction of frames dropped", ylabel="kNN top-1 (%)", title="kNN on dropped test clips")
    ax_cos.set(xlabel="fraction of frames dropped", ylabel="cosine(clean, dropped)", title="feature stability")
    ax_knn.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@torch.no_grad()
def dropped_frames_strip(checkpoint, dataset, path, num_clips=4, drop_ratio=0.25):
    """A PNG of a few test clips, one per row, with the frames the trained generator drops framed in red."""
    generator = load_generator(checkpoint).cpu()
    per_video = dataset.items_per_video
    videos = np.linspace(0, dataset.num_videos - 1, num_clips).astype(int)
    rows = []
    for video in videos:
        clip, _, _ = dataset[int(video) * per_video]  # uint8 (3, T, S, S)
        x = normalize(clip[None])
        _, keep = drop_frames(x, generator.scores(x), drop_ratio, generator.fill)
        rows.append(drop_strip(clip, keep[0]))  # (3, H', T * W')
    image = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()  # (rows * H', T * W', 3)
    fig = Figure(figsize=(image.shape[1] / 40, image.shape[0] / 40 + 0.4))
    ax = fig.subplots()
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"frames the VideoMoCo generator ({generator.kind}) drops (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def robustness_lines(results, a="MoCo", b="VideoMoCo"):
    """Whether `b`'s features are more stable under random frame drops than `a`'s, ratio by ratio (one run)."""
    rows = {name: {r["ratio"]: r for r in m["robustness"] if r["dropper"] == "random"} for name, m in results.items()}
    lines = [f"{b} against {a}, one run each (`videomoco demo --ablation` gives the spread over seeds):", ""]
    cells = []
    for ratio in sorted(rows[a]):
        if ratio == 0.0:
            continue
        ra, rb = rows[a][ratio], rows[b][ratio]
        cos, knn = rb["cosine"] - ra["cosine"], rb["knn_top1_k20"] - ra["knn_top1_k20"]
        cells.append([f"{ratio:.0%}", f"{ra['cosine']:.3f} / {rb['cosine']:.3f} ({cos:+.3f})",
                      f"{ra['knn_top1_k20']:.1f} / {rb['knn_top1_k20']:.1f} ({knn:+.1f})",
                      "more stable" if cos > 0 and knn > 0 else "less stable" if cos < 0 and knn < 0 else "mixed"])
    return lines + markdown.table(["frames dropped", f"cosine {a} / {b}", f"kNN {a} / {b}", b], cells)


def _digits(metric):
    return 3 if "cosine" in metric else 1


def ablation_lines(ablation, groups=None):
    """The ablation's tables (`demo.ablation.run`'s result): per group of metrics, mean ± std over seeds and each
    variant minus the first (MoCo) seed by seed with its p; then what the seeds resolve, and which variants are
    resolved as better or worse than MoCo."""
    names, metrics, seeds = list(ablation["runs"]), ablation["metrics"], ablation["seeds"]
    runs = {name: np.asarray(values, dtype=float) for name, values in ablation["runs"].items()}  # (seeds, metrics)
    base, n = names[0], len(seeds)
    tests = {name: [paired_test(runs[name][:, j], runs[base][:, j]) for j in range(len(metrics))]
             for name in names[1:]}
    lines = ["## Ablation", "",
             f"Seeds {', '.join(map(str, seeds))} for every variant. Each table: mean ± std over seeds, then each "
             f"variant minus {base} seed by seed, mean ± std of the difference (p of a paired t-test, {n - 1} degrees "
             f"of freedom). The last variant is the best decay with the best generator, chosen after the others ran.",
             ""]
    for title, group in (groups or {"metrics": metrics}).items():
        cols = [metrics.index(m) for m in group]
        lines += [f"### {title}", ""]
        lines += markdown.table(["variant", *group], [
            [name, *(f"{r[:, j].mean():.{_digits(metrics[j])}f} ± "
                     f"{r[:, j].std(ddof=1) if n > 1 else 0:.{_digits(metrics[j])}f}" for j in cols)]
            for name, r in runs.items()])
        lines += [""] + markdown.table([f"minus {base}", *group], [
            [name, *(f"{tests[name][j]['diff']:+.{_digits(metrics[j])}f} ± {tests[name][j]['std']:.{_digits(metrics[j])}f}"
                     f" (p {tests[name][j]['p']:.2f})" for j in cols)] for name in names[1:]]) + [""]
    return lines + resolution_lines(tests, metrics, n)


def resolution_lines(tests, metrics, n, p=0.05):
    """What the seeds resolve: the paired std of kNN (pooled over variants), the smallest difference it
    resolves at `p`, and every difference with p < `p`."""
    stds = [t[0]["std"] for t in tests.values() if np.isfinite(t[0]["std"])]
    pooled = float(np.sqrt(np.mean(np.square(stds)))) if stds else float("nan")
    lines = [f"Resolution: the paired std of {metrics[0]} is {pooled:.1f} points (root mean square over the "
             f"variants; per variant {', '.join(f'{s:.1f}' for s in stds)}), so {n} seeds resolve a mean difference "
             f"of {resolvable(pooled, n, p):.1f} points at p < {p}.", ""]
    found = [f"{name}: {m} {t['diff']:+.{_digits(m)}f} (p {t['p']:.3f})"
             for name, ts in tests.items() for m, t in zip(metrics, ts) if t["p"] < p]
    lines += ["Differences to the baseline with p < 0.05 (before any correction for the "
              f"{len(tests) * len(metrics)} comparisons): " + ("; ".join(found) if found else "none") + ".", ""]
    return lines


def header_lines(summary, title):
    """The report's title and what was run: classes, videos, encoder, clips, device, chance."""
    budget = summary["budget"]
    return [
        f"# {title}", "",
        f"{summary['num_classes']} motion classes ({', '.join(summary['classes'])}, scene `{budget.get('scene', 'object')}`), "
        f"{summary['num_train']} train and {summary['num_test']} test videos rendered under `{summary['data']}`; "
        f"encoder `{summary['arch']}` width {summary['width']}, clips of {budget['clip_frames']} frames "
        f"(stride {budget['frame_stride']}) at {budget['crop']} px, device `{summary['device']}`. "
        f"Chance is {100 / summary['num_classes']:.1f}%.", "",
    ]


def time_lines(seconds):
    return ["## Time", "", *markdown.table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in seconds.items()]),
            "", f"Total: {sum(seconds.values()):.0f} s.", ""]


def write_ablation_report(out, summary):
    """`report.md` of `videomoco demo --ablation` (see `videomoco.demo.run_ablation`)."""
    text = "\n".join(header_lines(summary, "videomoco demo --ablation") + ablation_lines(summary["ablation"], ABLATION_GROUPS)
                     + [""] + time_lines(summary["seconds"]))
    (Path(out) / "report.md").write_text(text)
    return text


def write_report(out, summary):
    """`report.md` from the demo's summary dict (see `videomoco.demo.run`)."""
    results, ratio = summary["results"], summary["report_ratio"]
    lines = header_lines(summary, "videomoco demo") + ["## Results", ""]
    rows = []
    for name, m in results.items():
        drop = {(r["dropper"], r["ratio"]): r for r in m["robustness"]}
        dropped = drop.get(("random", ratio))
        rows.append([name, f"{m['knn_top1_k20']:.1f}", f"{m['knn_top1_k1']:.1f}", f"{m['linear_top1']:.1f}",
                     f"{dropped['knn_top1_k20']:.1f}" if dropped else "-",
                     f"{dropped['cosine']:.3f}" if dropped else "-"])
    lines += markdown.table(["model", "kNN top-1 (k=20)", "kNN top-1 (k=1)", "linear top-1",
                     f"kNN, {ratio:.0%} frames dropped", f"cosine at {ratio:.0%} dropped"], rows)
    lines += ["", "![accuracy](accuracy.png)", "",
              "## Do the classes need time?", "",
              f"The `{summary['baseline_model']}` encoder on the same test clips with their frames shuffled or "
              "reduced to one frame, and classifiers on the raw pixels of one frame:", ""]
    lines += markdown.table(["input", "top-1 (%)"], [[k, f"{v:.1f}"] for k, v in summary["baselines"].items()])
    lines += ["", "## Pretraining", "", "![training curves](training_curves.png)", ""]
    curves = {name: {int(e): v for e, v in curve.items()} for name, curve in (summary.get("monitor") or {}).items()}
    epochs = sorted({e for curve in curves.values() for e in curve})
    if epochs:
        lines += [f"kNN top-1 (k={MONITOR_K}, one centre clip per video, the test videos against the train videos) "
                  "of the query encoder during pretraining (`--monitor`):", ""]
        lines += markdown.table(["model", *(f"epoch {e}" for e in epochs)],
                                [[name, *(f"{curve[e]:.1f}" if e in curve else "-" for e in epochs)]
                                 for name, curve in curves.items()]) + [""]
    lines += ["![dropped frames](dropped_frames.png)", "",
              "## Robustness to dropped frames", "", "![robustness](robustness.png)", "",
              *robustness_lines(results), ""]
    lines += time_lines(summary["seconds"])
    text = "\n".join(lines)
    (Path(out) / "report.md").write_text(text)
    return text
