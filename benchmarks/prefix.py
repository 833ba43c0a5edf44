"""Scenario `prefix`: batchd's prefix order against raw vLLM in input order.

Three workloads, shuffled the way real files arrive:
  a. system prompts + few-shot blocks, several short questions each;
  b. documents with several questions each;
  c. no shared prefix (the control: ordering must cost nothing here).
Each runs three ways, all warm, the order of the three rotating by repeat:
raw `vllm.LLM.chat` on the list in input order (prefix caching on, vLLM's
default); a batchd daemon in its default prefix order; the same daemon told
`order = "input"` by a sidecar (batchd's own cost, without the ordering).
Every repeat draws fresh text (and the input-order run its own), so no run
finds another's prefixes still cached. The KV cache (128 MiB: ~2,900 SmolLM2
tokens in float32) is smaller than one workload's shared prefixes together, as
a real file's are on a real card. Outputs are 16 tokens (ignore_eos, greedy):
these workloads are prefill-bound, as grading and document QA are. Reported
per workload: batchd / raw time (medians), both orders' prefix-cache hit rates
(cached / prompt tokens, vLLM's own per-request counts), and a PNG of
throughput by workload and order beside the record.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import MODELS, ROOT, summary, write_record
from .gpu import Daemon
from .overhead import Raw

QUICK = {"repeats": 1, "scale": 0.1}
# (groups, questions per group, shared words, question words) per workload, sized
# for a 2-core CPU where SmolLM2 prefills a few hundred tokens a second (a GPU
# run would use 20 x 100 with ~1,000-token prompts, 40 x 25 with ~1,500).
WORKLOADS = {"a_system_prompts": (8, 6, 500, 12), "b_documents": (6, 4, 750, 12),
             "c_no_sharing": (48, 1, 0, 150)}
OUTPUT_TOKENS = 16
# 128 MiB of KV cache: ~2,900 SmolLM2 tokens (45 KiB a token in float32), fewer
# than one workload's shared prefixes together (a: 8 x ~500, b: 6 x ~760).
KV_BYTES = 128 * 1024**2
ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
          "kv_cache_memory_bytes": KV_BYTES}
WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money "
         "story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city name "
         "team minute idea kid body information back parent face others level office door "
         "health person art war history party result change morning reason research girl "
         "guy moment air teacher force education").split()


def workload(name: str, seed: int, scale: float = 1.0) -> list[dict]:
    """The lines of one workload, shuffled; text drawn afresh for each seed."""
    groups, per_group, shared, asked = WORKLOADS[name]
    groups = max(2, int(groups * scale))
    rng = random.Random(f"{name}-{seed}")

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    lines = []
    for g in range(groups):
        head = words(shared)
        for q in range(per_group):
            if name == "a_system_prompts":
                messages = [{"role": "system", "content": head},
                            {"role": "user", "content": words(asked) + "?"}]
            elif name == "b_documents":
                messages = [{"role": "user", "content": f"Document:\n{head}\n\n"
                             f"Question: {words(asked)}?"}]
            else:
                messages = [{"role": "user", "content": words(asked)}]
            lines.append({"custom_id": f"g{g}-q{q}", "max_tokens": OUTPUT_TOKENS,
                          "temperature": 0.0, "ignore_eos": True, "messages": messages})
    rng.shuffle(lines)
    return lines


def smollm2_profile() -> str:
    return ('model = "HuggingFaceTB/SmolLM2-135M-Instruct"\n'
            f'path = "{MODELS / "smollm2-135m"}"\n'
            '[engine]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ENGINE.items()))


def run(repeats: int = 3, scale: float = 1.0, quick: bool = False) -> Path:
    subprocess.run([sys.executable, "-m", "batchd", "models", "prepare", "smollm2-135m",
                    "--config", str(ROOT / "config.toml")], check=True, capture_output=True)
    sides = ("raw", "batchd", "batchd_input")
    runs: dict[str, dict[str, list]] = {name: {side: [] for side in sides} for name in WORKLOADS}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        warm = base / "warm.jsonl"
        warm.write_text("".join(json.dumps(line) + "\n"
                                for line in workload("c_no_sharing", -1, 0.05)))
        # VLLM_CPU_KVCACHE_SPACE (which Raw sets by default) would override
        # kv_cache_memory_bytes on the CPU build: unset it
        raw = Raw(["--model", str(MODELS / "smollm2-135m"), "--requests", str(warm),
                   "--engine", json.dumps(ENGINE)], env={"VLLM_CPU_KVCACHE_SPACE": None})
        daemon = Daemon(base / "daemon", {"smollm2": smollm2_profile()}, {"HF_HUB_OFFLINE": "1"})
        try:
            daemon.job("smollm2", workload("c_no_sharing", -2, 0.05))
            raw.ready()
            for r in range(repeats):
                for name in WORKLOADS:
                    lines = workload(name, r, scale)
                    path = base / f"{name}-{r}.jsonl"
                    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
                    for side in sides[r % 3:] + sides[:r % 3]:  # each side first in turn
                        if side == "raw":
                            result = raw.once(path)
                        elif side == "batchd":
                            result = daemon.job("smollm2", lines)
                        else:  # the same structure, its own text: the daemon's engine
                            # must not find the prefix-order run's prefixes cached
                            result = daemon.job("smollm2", workload(name, r + 1000, scale),
                                                sidecar='order = "input"\n')
                        if side != "raw":
                            bench = json.loads(
                                (daemon.outbox / f"smollm2__job{daemon.count}.bench.json")
                                .read_text())
                            result["cached_tokens"] = bench["prefix_cache"]["cached_tokens"]
                            result["order"] = bench["order"]
                            result["seconds"] = result["generation_s"]
                        result["requests"] = len(lines)
                        runs[name][side].append(result)
                    print(name, r, json.dumps({s: {k: runs[name][s][-1][k] for k in (
                        "seconds", "prompt_tokens", "cached_tokens")} for s in runs[name]}),
                        flush=True)
        finally:
            raw.close()
            daemon.close()
    table = {}
    for name, by_side in runs.items():
        med = {s: summary([x["seconds"] for x in by_side[s]]) for s in by_side}
        hit = {s: round(sum(x["cached_tokens"] for x in by_side[s])
                        / max(1, sum(x["prompt_tokens"] for x in by_side[s])), 4)
               for s in by_side}
        table[name] = {
            "requests": by_side["raw"][0]["requests"],
            "prompt_tokens": by_side["raw"][0]["prompt_tokens"],
            "seconds": med,
            "ratio": round(med["batchd"]["median"] / med["raw"]["median"], 4),
            "input_order_ratio": round(med["batchd_input"]["median"] / med["raw"]["median"], 4),
            "paired_ratios": [round(b["seconds"] / a["seconds"], 4)
                              for a, b in zip(by_side["raw"], by_side["batchd"])],
            "hit_rate": hit,
            "requests_per_s": {s: round(by_side[s][0]["requests"] / med[s]["median"], 2)
                               for s in by_side}}
    record = {"settings": {"repeats": repeats, "scale": scale, "quick": quick,
                           "workloads": {k: dict(zip(("groups", "per_group", "shared_words",
                                                      "question_words"), v))
                                         for k, v in WORKLOADS.items()},
                           "output_tokens": OUTPUT_TOKENS, "engine": ENGINE,
                           "kv_cache": f"{KV_BYTES} bytes (~2,900 tokens), smaller than a "
                                       "workload's shared prefixes together",
                           "batchd": "generation time of the bench record (warm daemon, "
                                     "default [engine] order = prefix)",
                           "raw": "vllm.LLM.chat on the list in input order, prefix "
                                  "caching on"},
              "runs": runs, "table": table,
              "ratios": {name: row["ratio"] for name, row in table.items()},
              "input_order_ratios": {name: row["input_order_ratio"]
                                     for name, row in table.items()},
              "goal": "batchd/raw <= 0.70 on a and b, <= 1.03 on c"}
    path = write_record("prefix", record)
    plot(table, path.with_suffix(".png"))
    return path


def plot(table: dict, path: Path) -> None:
    """Requests/s by workload, raw input order beside batchd prefix order."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(table)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.27
    for k, (side, label) in enumerate((("raw", "vLLM LLM.chat, input order"),
                                       ("batchd_input", "batchd, input order"),
                                       ("batchd", "batchd, prefix order"))):
        values = [table[n]["requests_per_s"][side] for n in names]
        ax.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), [n.split("_", 1)[1].replace("_", " ") for n in names])
    ax.set_ylabel("requests/s")
    ax.set_title("Shared-prefix workloads, SmolLM2-135M on CPU (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
