"""benchmarks/gpu_suite.py --dry-run: the whole GPU suite at tiny sizes on the CPU, so that it is known to
work before a GPU is spent on it (it runs on the CPU with dynamo tracing only, no code generation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_json_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "suite.json").read_text())
    assert not (tmp_path / "suite.partial.json").exists()  # written after each section, removed at the end
    assert result["mode"].startswith("dry run") and result["device"] == "cpu"

    train = {(r["compile"], r["mask_ratio"]): r for r in result["train"]}
    assert set(train) == {(m, r) for m in ("off", "model", "step") for r in (0.5, 0.0)}
    for row in train.values():
        assert row["s_per_step"] > 0 and row["s_per_step_synced"] > 0 and row["gflop_per_step"] > 0
        assert 0 < row["mfu"] < 1
    assert [r["batch"] for r in result["sweep"]] == [2, 8] and all(r["s_per_step"] > 0 for r in result["sweep"])
    profile = result["profile"]
    assert profile["kernels_per_step"] > 0 and profile["busy_fraction"] > 0 and profile["top"]
    assert abs(sum(profile["time_share_by_class"].values()) - 1) < 0.01  # shares of one total, rounded to 0.001
    assert train["off", 0.5]["gflop_per_step"] < train["off", 0.0]["gflop_per_step"]  # masking saves FLOPs
    assert 0 < train["off", 0.5]["masked_vs_unmasked_time"]
    assert result["trainer"]["trainer_s_per_step"] > 0 and "overhead_pct" in result["trainer"]
    assert [r["variant"] for r in result["sample"]] == ["fp32", "bf16", "bf16+compile"]
    assert all(r["img_per_s_40_steps"] > 0 for r in result["sample"])
    assert result["encode"]["vae_encode_img_s"] > 0
    fid = result["fid"]
    assert fid["decode_img_s"] > 0 and fid["inception_img_s"] > 0 and fid["fid50k_8gpu_s"] > 0

    table = (tmp_path / "suite.md").read_text()
    for heading in ("## Training step", "## Trainer overhead", "## Sampling", "## Encoding and FID-50K"):
        assert heading in table
    assert table.count("| tiny | 4 | bf16 |") == 7  # six training rows and the trainer's
    assert "## Batch sweep" in table and "## Profile of the masked step" in table
    assert f"{fid['fid50k_8gpu_s']} s" in table


@pytest.mark.slow
def test_checkpoint_write_dry_run_measures_both_formats_to_both_stores(tmp_path):
    """benchmarks/checkpoint_write.py --dry-run: the tiny model, old and new format, disk and SeaweedFS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "ckpt.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_write.py"), "--dry-run", "--out",
                          str(out), "--work", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"].startswith("dry run") and result["skipped"] == {}
    rows = {(r["store"], r["format"]): r for r in result["rows"]}
    assert set(rows) == {("disk", "file"), ("disk", "sharded"), ("s3", "file"), ("s3", "sharded")}
    for row in rows.values():
        assert 0 < row["stall_s"] <= row["total_s"] and row["peak_extra_rss_gb"] >= 0
    for store in ("disk", "s3"):
        file = rows[store, "file"]  # the old write blocks the loop for all of it (two clock reads, ms rounding)
        assert file["total_s"] - file["stall_s"] <= 0.001 + 1e-9
        assert rows[store, "sharded"]["stall_vs_file"] > 0


def test_node_projection_arithmetic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from node_projection import project_encode, project_fid

    # 50,000 images over 8 GPUs at 10 / 250 / 200 img/s a GPU: 6,250 * (0.1 + 0.004 + 0.005) s, plus the rest
    assert project_fid(10.0, 250.0, 200.0, gather_s=2.0, stats_s=1.0, first_call_s=40.0) == pytest.approx(
        6250 * 0.109 + 43.0, rel=1e-12)
    assert project_fid(10.0, 250.0, 200.0, 0.0, 0.0, gpus=1) == pytest.approx(50000 * 0.109, rel=1e-12)
    gpu_bound = project_encode(500.0, 100.0, gpus=8, cpus=80, workers=8, images=1_000_000)
    assert gpu_bound == {"seconds": 250.0, "gpu_img_s": 4000.0, "jpeg_decode_img_s": 6400.0, "bound_by": "gpu"}
    starved = project_encode(500.0, 100.0, gpus=8, cpus=16, workers=8, images=1_000_000)  # 16 threads' worth of CPU
    assert starved["bound_by"] == "jpeg decoding (cpu)" and starved["seconds"] == 1_000_000 / 1600


@pytest.mark.slow
def test_node_projection_dry_run_writes_json(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "node.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "node_projection.py"), "--dry-run", "--out",
                          str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["kind"].startswith("dry run") and result["device"] == "cpu" and result["gpus"] == 8
    measured = result["measured"]
    assert measured["sample"]["tf32"] is None and measured["sample"]["bf16+compile"] is None  # CUDA only
    for name in ("fp32", "bf16"):
        rates = measured["sample"][name]
        assert rates["img_per_s_40_steps"] > 0 and rates["first_call_s"] > 0
        assert result["fid50k_s"][name] == pytest.approx(round(
            50000 / 8 * (1 / rates["img_per_s_40_steps"] + 1 / measured["decode_img_s"]
                         + 1 / measured["inception_img_s"])
            + rates["first_call_s"] + measured["gather_s"] + measured["stats_s"], 1), abs=0.051)
    assert measured["gather_s"] > 0 and measured["gather_world"] == 2 and measured["jpeg_img_s_per_thread"] > 0
    assert result["encode_imagenet"]["bound_by"] in ("gpu", "jpeg decoding (cpu)")
