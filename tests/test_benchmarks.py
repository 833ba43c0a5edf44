"""Benchmarks run and write their records (their timings are never asserted here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.bench]


def test_memory_scenario_runs_and_records(tiny_model, tmp_path):
    env = {**os.environ, "BATCHD_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "memory", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (record_path,) = tmp_path.glob("memory-*.json")
    record = json.loads(record_path.read_text())
    assert record["settings"]["quick"] is True
    assert {r["engine"] for r in record["runs"]} == {"fake", "vllm"}
    assert all(r["peak_rss_bytes"] > 0 for r in record["runs"])
    assert record["validate"]["exit_code"] == 0 and record["validate"]["lines"] == 1000
    assert set(record["peak_ratio_large_over_small"]) == {"fake", "vllm",
                                                          "vllm_engine_processes"}
    for run in record["runs"]:  # the model lives in batchd's engine process
        assert ("batchd.engine.host" in run["engine_processes"]) == (run["engine"] == "vllm")
    assert record["machine"]["hardware"]["cpu_count"] >= 1


def test_gpu_scenario_runs_on_the_cpu_build(smollm2, tmp_path):
    """The GPU script's CPU mode: the same three parts at tiny sizes, so the
    script a device session runs is known to work before the device time is spent."""
    env = {**os.environ, "BATCHD_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "gpu", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    (record_path,) = tmp_path.glob("gpu-*.json")
    record = json.loads(record_path.read_text())
    assert record["errors"] == {}
    overhead = record["overhead"]
    assert overhead["repeats"] == 1 and overhead["raw"][0]["completion_tokens"] > 0
    # both sides ran the same requests: same prompt and output token counts
    assert overhead["batchd"][0]["prompt_tokens"] == overhead["raw"][0]["prompt_tokens"]
    assert overhead["batchd"][0]["completion_tokens"] == overhead["raw"][0]["completion_tokens"]
    swaps = record["swaps"]
    assert [s["profile"] for s in swaps] == ["swap-a", "swap-b", "swap-a"]
    assert all(s["after_load_mib"] > 0 for s in swaps)
    # the old engine was gone before the new one loaded (a new engine process
    # holds tens of MiB before vLLM is imported; a loaded one gigabytes)
    loaded = min(s["after_load_mib"] for s in swaps)
    assert all(s["lowest_before_mib"] < loaded / 4 for s in swaps[1:])
    assert "swap-a" in record["swap_growth"]
    (fit,) = record["fit"]
    assert fit["profile"] == "llama3.2-1b" and fit["vllm"]["exit_code"] == 0
    assert fit["vllm"]["kv_tokens"] > 0 and fit["estimate"]["weights_gb"] > 2
    assert (tmp_path / f"{record_path.stem}.daemon.log").exists()


def test_rerun_scenario_runs_and_records(tmp_path):
    """The harness on the fake engine (--quick): both runs, the cache's counts."""
    env = {**os.environ, "BATCHD_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "rerun", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (record_path,) = tmp_path.glob("rerun-*.json")
    record = json.loads(record_path.read_text())
    assert record["settings"]["quick"] is True
    (run,) = record["runs"]
    assert run["first_cache"] == {"hits": 0, "misses": 200}
    assert run["rerun_cache"] == {"hits": 198, "misses": 2}
    assert record["ratios"]["rerun_over_first"] > 0
