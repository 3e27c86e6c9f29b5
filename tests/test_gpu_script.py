"""benchmarks/gpu.py, the device check: its dry run on CPU writes every part's JSON and prints the table last."""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu

KEYS = {"part", "status", "seconds", "budget_s", "dry_run", "device", "command", "machine", "results"}
STATUSES = {"ok", "failed", "skipped", "timed out", "error", "running"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if os.environ.get("VIDEOMOCO_GPU_CHECK"):
        pytest.skip("inside benchmarks.gpu's own pytest run")
    out = tmp_path_factory.mktemp("gpu")
    env = gpu.subprocess_env(dry_run=True)
    env.pop("VIDEOMOCO_GPU_CHECK")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out)], cwd=gpu.REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, time.monotonic() - start


def part(out, n, name):
    doc = json.loads((out / f"{n}_{name}.json").read_text())
    assert KEYS <= set(doc), f"{name}: missing {KEYS - set(doc)}"
    assert doc["part"] == name and doc["dry_run"] and doc["device"] == "cpu"
    assert doc["status"] in STATUSES and doc["status"] != "running", doc.get("error")
    return doc


def test_dry_run_writes_every_part(dry_run):
    out, _, _ = dry_run
    correctness = part(out, 1, "correctness")["results"]
    assert correctness["pytest"]["status"] == "ok" and correctness["pytest"]["exit_code"] in (0, 5)
    amp = correctness["amp"]
    assert [r["precision"] for r in amp["rows"]] == ["bf16", "fp16"] and amp["tolerance"] == gpu.AMP_TOLERANCE
    assert all({"max_loss_rel_diff", "grad_cosine_d", "grad_cosine_g"} <= set(r) for r in amp["rows"])
    resume = correctness["pretrain_resume"]
    assert [r["exit_code"] for r in resume["runs"].values()] == [0, 0, 0], resume
    assert resume["steps"] == [gpu.DRY.cli_steps] * 2 and resume["max_abs_diff"] >= 0

    encoders = part(out, 2, "encoders")
    assert encoders["status"] in ("ok", "skipped")  # skipped where torchvision is not installed

    speed = part(out, 3, "speed")
    rows = speed["results"]["rows"]
    assert {r["config"] for r in rows} == {"fp32", "bf16", "bf16+cl"}
    assert any(r.get("largest") for r in rows)
    assert speed["results"]["bf16_matmul_tflops"] > 0 and speed["results"]["profile"]["table"]
    assert all(r["clips_per_s"] > 0 and r["mfu_bf16"] > 0 for r in rows if r["status"] == "ok")

    data = part(out, 4, "data")
    assert data["status"] == "ok"
    assert [r["workers"] for r in data["results"]["rows"]] == list(gpu.DRY.workers)
    assert all(r["loader_clips_per_s"] > 0 and isinstance(r["starved"], bool) for r in data["results"]["rows"])

    compile_ = part(out, 5, "compile")
    assert compile_["status"] == "ok" and compile_["results"]["rows"][0]["clips_per_s"] > 0
    assert compile_["results"]["rows"][0]["config"] == "bf16+cl+compile"  # the dry run compiles (aot_eager)
    assert "| part | check | result | status |" in (out / "summary.md").read_text()


def test_dry_run_prints_the_table_last_and_fits_a_minute(dry_run):
    _, stdout, seconds = dry_run
    lines = stdout.strip().splitlines()
    header = lines.index("| part | check | result | status |")
    assert all(line.startswith("|") for line in lines[header:])
    assert {"correctness", "speed", "data"} <= {line.split("|")[1].strip() for line in lines[header + 2:]}
    assert seconds < 120  # ~30 s alone on 2 cores; the suite's load can double it


def test_a_subprocess_past_its_time_box_is_killed(tmp_path):
    start = time.monotonic()
    code, _ = gpu.run_logged([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                             tmp_path / "log", timeout=1, env=dict(os.environ))
    assert code is None and time.monotonic() - start < 30


def test_parts_and_shares_agree():
    assert set(gpu.SHARES) == set(gpu.PARTS) and abs(sum(gpu.SHARES.values()) - 1) < 1e-9
    assert set(gpu.CONFIGS) == {"fp32", "bf16", "bf16+cl", "bf16+cl+compile"}
    with pytest.raises(SystemExit):
        gpu.parse_args(["--parts", "speed,nope"])


def test_the_check_exits_1_when_a_part_fails(tmp_path, monkeypatch):
    def failing(ctx, doc):
        doc["status"] = "failed"

    monkeypatch.setitem(gpu.PART_FUNCTIONS, "encoders", failing)
    monkeypatch.setattr(gpu, "prepare", lambda root, sizes=gpu.FULL: 0)  # no videos needed by this part
    assert gpu.main(["--dry-run", "--parts", "encoders", "--out", str(tmp_path / "out")]) == 1
    monkeypatch.setitem(gpu.PART_FUNCTIONS, "encoders", lambda ctx, doc: doc.update(status="skipped"))
    assert gpu.main(["--dry-run", "--parts", "encoders", "--out", str(tmp_path / "out2")]) == 0
