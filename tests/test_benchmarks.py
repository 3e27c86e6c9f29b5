"""Smoke tests for benchmarks/: the shared helpers, `videomoco bench`, and one tiny run of each benchmark."""

import json

import numpy as np
import pytest
import torch

from benchmarks import common
from videomoco import bench
from videomoco.cli import main as cli_main


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_machine_info_describes_this_machine():
    info = common.machine_info()
    assert info["torch"] == torch.__version__
    assert 1 <= info["usable_cores"] <= info["logical_cores"]
    assert info["ram_gib"] is None or info["ram_gib"] > 0
    assert ("gpu" in info) == torch.cuda.is_available()
    assert info["torch"] in common.machine_summary(info)


def test_timeit_runs_warmup_then_timed_calls():
    calls = []
    stats = common.timeit(lambda: calls.append(1), warmup=2, iters=3, sync="cpu")
    assert len(calls) == 5
    assert stats["iters"] == 3
    assert 0 <= stats["min_s"] <= stats["median_s"]
    with pytest.raises(ValueError, match="iters"):
        common.timeit(lambda: None, warmup=0, iters=0)


def test_matmul_peak_is_a_positive_rate():
    assert common.matmul_peak("cpu", size=64, iters=2) > 0


def test_cpu_peak_memory_sees_a_large_allocation():
    start = common.peak_memory_reset("cpu")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert common.peak_memory_bytes("cpu", start) >= 48 * 2**20
    del x


def test_emit_prints_one_json_line_with_machine_and_command(capsys):
    common.emit({"x": 1.5}, command="python -m benchmarks.x --quick")
    (line,) = json_lines(capsys.readouterr().out)
    assert line["x"] == 1.5
    assert line["command"] == "python -m benchmarks.x --quick"
    assert line["machine"]["torch"] == torch.__version__


def test_record_appends_a_markdown_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    rows = [{"name": "a", "value": 0.123456}, {"name": "b", "value": 2.0}]
    common.record("first", rows, "python -m benchmarks.x --record", path=path)
    common.record("second", rows[:1], "python -m benchmarks.y", path=path, note="shared machine")
    text = path.read_text()
    assert text.index("### first") < text.index("### second")
    assert "`python -m benchmarks.x --record`" in text
    assert "| name | value |" in text and "| a | 0.1235 |" in text
    assert "shared machine" in text
    with pytest.raises(ValueError, match="no rows"):
        common.record("empty", [], "cmd", path=path)


def test_command_line_reproduces_argv():
    assert common.command_line("benchmarks.t", ["--arch", "r3d_18", "--x", "a b"]) == (
        "python -m benchmarks.t --arch r3d_18 --x 'a b'"
    )


def test_bench_lists_and_rejects_unknown_names(capsys):
    assert "train_step" in bench.list_benchmarks()
    assert "common" not in bench.list_benchmarks()
    assert cli_main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no_such_benchmark'" in err and "train_step" in err


def test_bench_says_when_there_is_no_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "videomoco" / "bench.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bench.BenchmarkNotFound, match="source checkout"):
        bench.find_benchmarks_root()


def test_train_step_quick_reports_both_modes(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "train_step", "--quick", "--device", "cpu", "--profile", "3", "--record", "--results", str(results)]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    rows = {row["mode"]: row for row in json_lines(out)}
    assert "profile: moco" in err and "profile: videomoco" in err
    assert set(rows) == {"moco", "videomoco"}
    moco, vmoco = rows["moco"], rows["videomoco"]
    for row in rows.values():
        assert row["steps_per_s"] > 0 and row["gflop_per_step"] > 0 and 0 < row["mfu"]
        assert row["clips_per_s"] == pytest.approx(2 * row["steps_per_s"])
    # The adversarial step encodes the dropped clip and steps the generator too: strictly more work.
    assert vmoco["gflop_per_step"] > moco["gflop_per_step"]
    assert vmoco["videomoco_over_moco"] == pytest.approx(vmoco["step_ms"] / moco["step_ms"])
    text = results.read_text()
    assert "### train_step" in text and "--quick" in text and "VideoMoCo / MoCo" in text
    # Counting on fake tensors (no compute) gives exactly the FLOPs of the real step.
    assert cli_main(["bench", "train_step", "--quick", "--flops-only"]) == 0
    fake = {row["mode"]: row for row in json_lines(capsys.readouterr().out)}
    for mode in ("moco", "videomoco"):
        assert fake[mode]["gflop_per_step"] == pytest.approx(rows[mode]["gflop_per_step"], rel=1e-9)


@pytest.mark.parametrize("name, rate", [("data", "clips_per_s"), ("index", "videos_per_s")])
def test_pipeline_benchmarks_quick(name, rate, tmp_path, capsys):
    if name not in bench.list_benchmarks():
        pytest.skip(f"benchmarks/{name}.py not written yet")
    results = tmp_path / "RESULTS.md"
    assert cli_main(["bench", name, "--quick", "--record", "--results", str(results)]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert rows and all(row[rate] > 0 for row in rows)
    assert all(row["command"].startswith(f"python -m benchmarks.{name} --quick") for row in rows)
    assert f"`python -m benchmarks.{name} --quick --record" in results.read_text()


@pytest.mark.parametrize("bidirectional, layers, batch_first", [(True, 1, True), (False, 2, False)])
def test_gru_flops_match_what_the_cpu_matmuls_count(bidirectional, layers, batch_first):
    """On CPU FlopCounterMode sees the GRU's matmuls; `gru_flops` is the count for cuDNN's uncounted kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_step import count_flops, gru_flops

    gru = torch.nn.GRU(12, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(3, 5, 12)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gru(x)
    assert gru_flops(gru, x) == counter.get_total_flops()
    with torch.no_grad():  # forward only: once; with a backward: 3x (input and weight gradients)
        assert count_flops(lambda: gru(x), analytic_gru=True) == 2 * gru_flops(gru, x)
    train = lambda: gru(x)[0].sum().backward()  # noqa: E731
    assert count_flops(train, analytic_gru=True) - count_flops(train) == 3 * gru_flops(gru, x)


def test_mfu_peak_is_measured_in_the_steps_dtype():
    from benchmarks.train_step import matmul_peak_dtype

    assert matmul_peak_dtype("bf16", "cuda") == (torch.bfloat16, "bf16")
    assert matmul_peak_dtype("fp16", "cuda") == (torch.float16, "fp16")
    assert matmul_peak_dtype("fp32", "cpu") == (torch.float32, "fp32")
    assert matmul_peak_dtype("fp32", "cuda")[1] == ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")


def test_generator_study_quick_reports_sane_fractions(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "generator_study", "--quick", "--out", str(tmp_path / "study"), "--record", "--results", str(results)]
    assert cli_main(argv) == 0
    rows = json_lines(capsys.readouterr().out)
    (run,) = [row for row in rows if "variant" in row]
    assert run["variant"] == "baseline" and run["random_baseline"] == pytest.approx(0.25)  # 2 of 8 frames
    assert 0 <= run["in_window"] <= 1 and 0 <= run["init_in_window"] <= 1
    assert sum(run["positions"]) == pytest.approx(2) and all(0 <= p <= 1 for p in run["positions"])
    assert 0 <= run["same_drops_as_init"] <= 1 and run["score_change"] >= 0
    for row in rows:  # the objective: feature L1 of several drop sets, and the best pair per clip
        assert all(row[key] > 0 for key in ("l1_window", "l1_last", "l1_first", "l1_still"))
        assert 0 <= row["oracle_in_window"] <= 1 and sum(row["oracle_positions"]) == pytest.approx(2)
    text = results.read_text()
    assert "### generator_study: where G drops frames" in text and "what feature L1 rewards" in text


def test_generator_study_frame_scorer_ignores_position():
    from benchmarks.generator_study import FrameScorer

    torch.manual_seed(0)
    clip, order = torch.randn(2, 3, 8, 32, 32), torch.randperm(8)
    for diff in (False, True):
        scorer = FrameScorer(diff=diff).eval()
        with torch.no_grad():
            scores = scorer.scores(clip)
            if not diff:  # a frame's score is a function of that frame alone
                assert torch.allclose(scorer.scores(clip[:, :, order]), scores[:, order], atol=1e-6)
        assert "rnn" not in dict(scorer.named_children()) and scores.shape == (2, 8)
        dropped, keep = scorer(clip)
        assert keep.sum(1).tolist() == [6.0, 6.0]


def test_comm_counts_fewer_calls_and_clip_bytes_with_the_new_schemes(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert cli_main(["bench", "comm", "--quick", "--record", "--results", str(results)]) == 0
    rows = json_lines(capsys.readouterr().out)
    cases = {(r["scheme"], r["micro_batches"]): r for r in rows if "scheme" in r and "procs" in r}
    authors, new, new_micro = cases["authors", 1], cases["new", 1], cases["new", 2]
    assert authors["all_reduce calls/step"] == authors["gradient tensors"]  # one per tensor
    assert new["all_reduce calls/step"] == new_micro["all_reduce calls/step"] == 2  # a bucket per player, per step
    assert authors["clips received / own clips"] == 1  # (N - 1) x with N = 2
    assert 0 <= new["clips received / own clips"] <= 1 and new["MB received/step"] < authors["MB received/step"]
    scale = {(r["GPUs"], r["scheme"]): r for r in rows if "GPUs" in r}
    assert scale[1, "new"]["scaling efficiency"] == scale[1, "authors"]["scaling efficiency"] == 1
    assert scale[64, "new"]["scaling efficiency"] > scale[64, "authors"]["scaling efficiency"]
    assert "comm: the recipe's scaling" in results.read_text()


def test_decoders_quick_compares_read_clip_with_the_installed_readers(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert cli_main(["bench", "decoders", "--quick", "--record", "--results", str(results)]) == 0
    lines = json_lines(capsys.readouterr().out)
    rows = {row["reader"]: row for row in lines if "cpu_ms_per_clip" in row}
    assert {"read_clip", "read_clip_v0", "pyav_naive"} <= rows.keys()  # PyAV is always there
    assert rows["read_clip"]["vs_read_clip"] == 1.0
    assert all(row["identical"] == "4/4" and row["cpu_ms_per_clip"] > 0 for row in rows.values())
    assert all(row["unavailable"] for row in lines if "unavailable" in row)  # every peer: measured or why not
    assert "### decoders" in results.read_text()


def test_baseline_readers_agree_with_read_clip(make_video):
    from benchmarks import baselines
    from videomoco.data.decode import read_clip

    path = make_video("b.mp4", num_frames=24, codec="h264", gop=8)
    for start, stride in [(0, 1), (5, 2), (13, 1)]:
        np.testing.assert_array_equal(baselines.read_clip_v0(path, start, 5, stride), read_clip(path, start, 5, stride))
        np.testing.assert_array_equal(baselines.read_clip_pyav_naive(path, start, 5, stride), read_clip(path, start, 5, stride))
    clips = baselines.read_clips_v0(path, [2, 20], 6)  # the second loops past the end
    for start, clip in zip([2, 20], clips):
        np.testing.assert_array_equal(clip, read_clip(path, start, 6))
    assert baselines.peer_status("no_such_module_xyz")[0] is None and baselines.peer_status("av")[1] is None


def test_cv2_baselines_agree_with_read_clip(make_video):
    pytest.importorskip("cv2")
    from benchmarks.baselines import read_clip_cv2, read_video_cv2_whole
    from videomoco.data.decode import read_clip

    path = make_video("c.avi", num_frames=24, codec="mjpeg")
    np.testing.assert_array_equal(read_clip_cv2(path, 4, 6, threads=1), read_clip(path, 4, 6))  # same FFmpeg decode
    assert read_clip_cv2(path, 20, 8).shape == (8, 64, 64, 3)  # loops too
    whole = read_video_cv2_whole(path)
    assert whole.shape == (24, 64, 64, 3)
    np.testing.assert_array_equal(read_video_cv2_whole(path, threads=1), whole)
