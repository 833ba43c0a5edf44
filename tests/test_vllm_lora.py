"""LoRA adapters per line on real vLLM (CPU build): two random adapters for the
tiny Llama, written here as PEFT folders, served beside the base model by one
profile. Each line runs with the adapter its ``model`` names; the answers equal
vLLM's own server started with the same --lora-modules, at temperature 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import (BATCHD, BENCH_TINY, DaemonProcess, drop, final_state, free_port,
                      outputs, served_spool, wait_for)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "batchd/tiny-llama"


def adapter(folder: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter of the tiny Llama's q_proj and v_proj, random (both
    A and B, so it changes the answers), as safetensors."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((folder.parent / "base-config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    out = {"q_proj": config["num_attention_heads"] * config["head_dim"],
           "v_proj": config["num_key_value_heads"] * config["head_dim"]}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(layers):
        for module, size in out.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            weights[f"{name}.lora_B.weight"] = torch.randn(size, rank, generator=generator)
    folder.mkdir()
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(out),
        "fan_in_fan_out": False, "base_model_name_or_path": MODEL}))
    return folder


def lines() -> list[dict]:
    out = []
    for model in (MODEL, "ad-a", "ad-b"):
        for i in range(3):
            out.append({"custom_id": f"{model.split('/')[-1]}-{i}", "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": model, "prompt": f"Story number {i}:",
                                 "max_tokens": 8, "temperature": 0}})
    return out


def test_lines_run_with_their_adapters_as_vllm_serves_them(tiny_model, tmp_path):
    (tmp_path / "base-config.json").write_text((tiny_model / "config.json").read_text())
    a, b = adapter(tmp_path / "ad-a", 1), adapter(tmp_path / "ad-b", 2)
    profile = BENCH_TINY + (f'[lora]\nadapters = {{ "ad-a" = "{a}", "ad-b" = "{b}" }}\n'
                            "max_lora_rank = 8\nmax_loras = 2\n")
    bad = BENCH_TINY.replace('model = "batchd/tiny-llama"', 'model = "org/broken"') + \
        f'[lora]\nadapters = {{ "ad-gone" = "{tmp_path / "missing"}" }}\n'
    # window = 1: one request in vLLM at a time, on both sides. A batch that mixes
    # adapters and the base model is vLLM's to get right, and on this noise model
    # (near-uniform logits) its CPU kernels answer the same request differently
    # in different batches, so equality is checked one request at a time.
    config = served_spool(tmp_path, tiny_model.parent, {"tiny": profile, "broken": bad},
                          "[engine]\nwindow = 1\n")
    shown = subprocess.run([BATCHD, "profiles", "show", "tiny", "--config", str(config)],
                           capture_output=True, text=True, check=True).stdout
    assert "[lora.adapters]" in shown and "ad-a" in shown
    checked = subprocess.run([BATCHD, "profiles", "check", "tiny", "--fit-only", "--config",
                              str(config)], capture_output=True, text=True).stdout
    assert "LoRA slots" in checked

    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        spool = tmp_path / "spool"
        drop(spool / "inbox", "adapters.jsonl", lines())
        assert wait_for(lambda: final_state(spool / "outbox", "adapters"), 600,
                        what="the adapters job") == "completed"
        drop(spool / "inbox", "gone.jsonl", [{"model": "ad-gone", "prompt": "x"}])
        assert wait_for(lambda: final_state(spool / "outbox", "gone"), 600,
                        what="the broken profile's job") == "failed"
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
    results, errors = outputs(spool / "outbox", "adapters")
    assert not errors and len(results) == 9
    ours = {r["custom_id"]: r["response"]["body"] for r in results}
    assert {ours[f"{m}-0"]["model"] for m in ("tiny-llama", "ad-a", "ad-b")} == {
        MODEL, "ad-a", "ad-b"}
    text = {cid: body["choices"][0]["text"] for cid, body in ours.items()}
    assert text["ad-a-0"] != text["tiny-llama-0"] and text["ad-b-0"] != text["ad-a-0"]
    bench = json.loads((spool / "outbox" / "adapters.bench.json").read_text())
    assert bench["requests_by_model"] == {MODEL: 3, "ad-a": 3, "ad-b": 3}
    _, gone = outputs(spool / "outbox", "gone")
    message = gone[0]["response"]["body"]["error"]["message"]
    assert "ad-gone" in message and "adapter_config.json" in message

    # vLLM's own server with the same adapters
    port = free_port()
    # vLLM's engine core inside the server's process, as batchd's tiny profile
    # runs it (a load of seconds, not half a minute; the answers are the same)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1",
         "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--enable-prompt-tokens-details", "--enable-lora", "--max-lora-rank", "8",
         "--max-num-seqs", "256", "--max-num-batched-tokens", "4096",  # batchd's scheduler
         "--max-loras", "2", "--lora-modules", f"ad-a={a}", f"ad-b={b}"],
        stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT, env=env)
    try:
        def ready():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return True
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                return False

        wait_for(ready, 600, interval=1.0, what="vLLM's API server")

        def ask(line: dict) -> dict:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", json.dumps(line["body"]).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as reply:
                return json.loads(reply.read())

        for line in lines():  # one at a time, as batchd ran them (window = 1)
            served = ask(line)
            body = ours[line["custom_id"]]
            assert body["model"] == served["model"]
            assert body["choices"][0]["text"] == served["choices"][0]["text"], line
    finally:
        server.terminate()
        server.wait(120)
