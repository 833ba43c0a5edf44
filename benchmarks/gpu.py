"""Scenario `gpu`: batchd at GPU speed, GPU memory across profile swaps, and the
16 GB fit table against what vLLM really takes.

Made for one short device session: every part has its own time limit and the
record is rewritten after each part, so a run cut short keeps what it measured.

1. overhead: raw `vllm.LLM.chat` against a warm batchd daemon on the same chat
   requests (5,000; prompts ~64-448 tokens, outputs 16-256 with ignore_eos, greedy),
   Llama-3.2-1B shape with random weights (vLLM's `load_format = "dummy"`) and
   SmolLM2's tokenizer (vocab set to match), `gpu_memory_utilization` giving
   15 GiB (a 16 GB card's budget); both warm at once, repeats alternating.
2. swaps: the same daemon alternates two shapes six times; GPU memory
   (nvidia-smi) right after each load and its lowest point before it.
3. fit: `batchd profiles check --vram 16GiB` (batchd.fit.check) for the
   shipped llama3.2-1b, llama3.2-3b and qwen3-4b profiles against the weight
   memory and KV cache vLLM reports when it loads that shape at the profile's
   settings, its utilization scaled to a 16 GiB card.

Without a GPU the same steps run on the CPU build with tiny shapes (`--quick`
for the smallest), so CI keeps the script working; memory is then the RSS of
the daemon's engine processes, and the fit part shows only what vLLM reports;
every engine then runs vLLM's worker inside its engine core process (one
spawned process a load, not two).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from .common import MODELS, ROOT, summary, wait_final, write_record
from .overhead import Raw

QUICK = {"n": 24, "repeats": 1, "swaps": 2, "fits": 1}
GIB = 1024**3
BUDGET_GIB = 15  # a 16 GB card less what its driver and display keep
VRAM = "16GiB"
# SmolLM2's tokenizer files (the device gets a carried copy: benchmarks/gpu_device.sh).
TOKENIZER = Path(os.environ.get("BATCHD_BENCH_TOKENIZER", MODELS / "smollm2-135m"))

# The daemon's [engine] table. File order, as the raw peer runs it: the ratio is
# batchd's own cost, not prefix order's longest-first reordering of output
# lengths. A window above the 1,024 sequences vLLM schedules at once on a card
# with 70 GiB or more, so the engine is never short of requests.
DAEMON_ENGINE = 'order = "input"\nwindow = 4096\n'

COMMON = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_cache": True,
          "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "max_position_embeddings": 131072}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 40960}
# The real models' shapes (their config.json), with their own vocabularies.
SHAPES = {
    "llama3.2-1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_hidden_layers": 16, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                    "tie_word_embeddings": True},
    "llama3.2-3b": {**LLAMA, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_hidden_layers": 28, "num_attention_heads": 24,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                    "tie_word_embeddings": True},
    "qwen3-4b": {**QWEN3, "hidden_size": 2560, "intermediate_size": 9728,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True},
    # the second shape of the swap part: a smaller Llama
    "llama-0.3b": {**LLAMA, "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 16, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                   "tie_word_embeddings": True},
}
# CPU stand-ins: the same model types, tiny.
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64}
TINY_B = {**TINY, "hidden_size": 256, "num_hidden_layers": 4}


class Gpu:
    """Where the run is: the GPU's total memory, or None on the CPU build."""

    def __init__(self) -> None:
        self.total_mib = None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20, check=True)
            self.total_mib = int(out.stdout.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass

    def utilization(self, budget_bytes: float) -> float:
        """gpu_memory_utilization that gives BUDGET_BYTES on this card."""
        return round(budget_bytes / (self.total_mib * 1024**2), 4) if self.total_mib else 0.9


def used_mib(root_pid: int | None = None) -> float:
    """GPU memory in use (nvidia-smi), or on the CPU build the RSS of ROOT_PID's
    descendants (the engine processes), in MiB."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True)
        return float(sum(int(x) for x in out.stdout.split()))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True) if root_pid else []
    except psutil.Error:
        return 0.0
    total = 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 1024**2


class Sampler(threading.Thread):
    """Memory every 0.2 s, so the lowest point between two loads is seen."""

    def __init__(self, root_pid: int | None):
        super().__init__(daemon=True)
        self.root_pid, self.samples, self.stopped = root_pid, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), used_mib(self.root_pid)))
            self.stopped.wait(0.2)

    def low(self, since: float, until: float) -> float | None:
        values = [v for t, v in self.samples if since <= t <= until]
        return min(values) if values else None


def write_model(folder: Path, shape: dict, dtype: str) -> Path:
    """A model folder vLLM loads with random weights: config.json + a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    theta = shape.get("rope_theta", 10000.0)
    config = {**COMMON, **shape, "torch_dtype": dtype, "dtype": dtype,
              "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TOKENIZER / name).exists():
            shutil.copy(TOKENIZER / name, folder / name)
    return folder


def workload(n: int, small: bool, seed: int = 0) -> list[dict]:
    """Chat lines like the seed workload: ~64-448 prompt tokens (common words are
    one token each; the chat template adds ~8), 16-256 output tokens."""
    rng = random.Random(seed)
    words = ("time people year way day thing man world life hand part child eye woman place "
             "work week case point number group problem fact water money story night").split()
    lo, hi, out_lo, out_hi = (4, 24, 2, 8) if small else (56, 440, 16, 256)
    return [{"custom_id": f"r{i}", "temperature": 0.0, "ignore_eos": True,
             "max_tokens": rng.randint(out_lo, out_hi),
             "messages": [{"role": "user", "content": " ".join(
                 rng.choice(words) for _ in range(rng.randint(lo, hi)))}]}
            for i in range(n)]


class Daemon:
    """A warm `python -m batchd run`; one job is one file renamed into its inbox."""

    def __init__(self, base: Path, profiles: dict[str, str], env: dict[str, str]):
        (base / "profiles").mkdir(parents=True)
        for name, text in profiles.items():
            (base / "profiles" / f"{name}.toml").write_text(text)
        config = base / "config.toml"
        config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
                          f'default_profile = "{next(iter(profiles))}"\n'
                          f'models_dir = "{base / "models"}"\n[watch]\nsettle_seconds = 0.2\n'
                          f'[log]\nformat = "json"\n[engine]\n{DAEMON_ENGINE}')
        self.inbox, self.outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        self.inbox.mkdir(parents=True)
        self.log = open(base / "daemon.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "batchd", "run", "--config",
                                      str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, cwd=ROOT)
        self.count = 0

    def job(self, profile: str, lines: list[dict], timeout: float = 900, sidecar: str = ""
            ) -> dict:
        self.count += 1
        name = f"{profile}__job{self.count}"
        if sidecar:  # before the JSONL, so it is claimed with it
            (self.inbox / f"{name}.toml").write_text(sidecar)
        part = self.inbox / f".{name}.part"
        part.write_text("".join(json.dumps(line) + "\n" for line in lines))
        started = time.perf_counter()
        os.rename(part, self.inbox / f"{name}.jsonl")
        status = self.outbox / f"{name}.status.jsonl"
        wait_final(status, self.proc, timeout)
        seconds = time.perf_counter() - started
        bench = json.loads((self.outbox / f"{name}.bench.json").read_text())
        if bench["requests"]["failed"]:
            raise RuntimeError(f"{name}: {bench['requests']['failed']} lines failed")
        return {"end_to_end_s": seconds, "generation_s": bench["timing_s"]["generation"],
                "model_load_s": bench["timing_s"]["model_load"],
                "prompt_tokens": bench["tokens"]["prompt"],
                "completion_tokens": bench["tokens"]["completion"]}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def profile(folder: Path, engine: dict, aliases: tuple[str, ...] = ()) -> str:
    lines = [f'model = "bench/{folder.name}"', f'path = "{folder}"',
             f"aliases = {json.dumps(list(aliases))}",
             '[environment]', 'VLLM_CPU_KVCACHE_SPACE = "1"', "[engine]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in engine.items()]
    return "\n".join(lines) + "\n"


def setup(base: Path, gpu: Gpu, n: int) -> tuple[Daemon, dict]:
    """Model folders, profiles and a started daemon; returns it and part 1's plan."""
    small = gpu.total_mib is None
    shape = {**SHAPES["llama3.2-1b"], "vocab_size": 49152, **(TINY if small else {})}
    dtype = "float32" if small else "bfloat16"
    folder = write_model(base / "models" / "l1b", shape, dtype)
    engine = {"dtype": dtype, "max_model_len": 2048 if not small else 512,
              "load_format": "dummy", "seed": 0}
    if small:
        engine["enforce_eager"] = True
    else:
        engine["gpu_memory_utilization"] = gpu.utilization(BUDGET_GIB * GIB)
    lines = workload(n, small)
    requests = base / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    swap_a = {**engine, "enforce_eager": True}
    swap_b_shape = {**SHAPES["llama-0.3b"], "vocab_size": 49152, **(TINY_B if small else {})}
    folder_b = write_model(base / "models" / "l03b", swap_b_shape, dtype)
    profiles = {"gpu": profile(folder, engine), "swap-a": profile(folder, swap_a),
                "swap-b": profile(folder_b, swap_a)}
    if small:  # the two are the same settings here: swap-a's first job runs warm
        del profiles["swap-a"]
        profiles["gpu"] = profile(folder, engine, aliases=("swap-a",))
    daemon = Daemon(base, profiles, {"HF_HUB_OFFLINE": "1"})
    return daemon, {"folder": folder, "engine": engine, "lines": lines, "requests": requests}


def part_overhead(state: dict, base: Path, daemon: Daemon, plan: dict, repeats: int,
                  deadline: float, save: Callable[[], object]) -> None:
    """Raw vLLM and the warm daemon on one file, repeats alternating."""
    n, lines, engine = len(plan["lines"]), plan["lines"], plan["engine"]
    started = time.monotonic()
    warm = daemon.job("gpu", lines[:8], timeout=max(60.0, deadline - started))
    loaded = time.monotonic()
    # The peer loads only now: vLLM sizes its KV cache by profiling the GPU's free
    # memory, and refuses to start when free memory grew meanwhile (another
    # engine freeing its profiling buffers), so two engines must not load at once.
    raw = Raw(["--model", str(plan["folder"]), "--requests", str(plan["requests"]),
               "--engine", json.dumps(engine)], log=base / "raw.log").ready()
    state["overhead"] = result = {"n": n, "engine": engine, "load_s": {
        "batchd_first_job": round(loaded - started, 1),
        "batchd_model_load": warm["model_load_s"],
        "raw": round(time.monotonic() - loaded, 1)}, "raw": [], "batchd": []}
    looping = time.monotonic()
    try:
        for r in range(repeats):
            order = ("raw", "batchd") if r % 2 == 0 else ("batchd", "raw")
            for side in order:
                result[side].append(raw.once() if side == "raw" else daemon.job(
                    "gpu", lines, timeout=max(120.0, deadline - time.monotonic() + 120)))
            print("overhead", r, json.dumps({s: result[s][-1] for s in ("raw", "batchd")}),
                  flush=True)
            save()  # a run cut short keeps every finished repeat
            per_repeat = (time.monotonic() - looping) / (r + 1)
            if time.monotonic() + per_repeat > deadline:
                break  # another repeat would pass this part's deadline
    finally:
        raw.close()  # its GPU memory must be free before the swaps are measured
    raw_s = summary([x["seconds"] for x in result["raw"]])
    gen = summary([x["generation_s"] for x in result["batchd"]])
    e2e = summary([x["end_to_end_s"] for x in result["batchd"]])
    tokens = result["raw"][0]["prompt_tokens"] + result["raw"][0]["completion_tokens"]
    result.update({
        "repeats": len(result["raw"]),
        "raw_s": raw_s, "batchd_generation_s": gen, "batchd_end_to_end_s": e2e,
        "generation_ratio": round(gen["median"] / raw_s["median"], 4),
        "end_to_end_ratio": round(e2e["median"] / raw_s["median"], 4),
        "raw_total_tok_s": round(tokens / raw_s["median"]),
        "raw_req_s": round(n / raw_s["median"], 1),
        "batchd_total_tok_s": round(tokens / gen["median"]),
        "batchd_req_s": round(n / gen["median"], 1)})


def part_swaps(state: dict, daemon: Daemon, swaps: int, deadline: float) -> None:
    """swap-a, then swaps alternating b, a, ...: memory right after each load and
    the lowest reading between the previous job's end and this job's end. (On
    the CPU build swap-a is the overhead part's profile, so its first job finds
    it loaded.)"""
    sampler = Sampler(daemon.proc.pid)
    sampler.start()
    started = time.monotonic()
    loads = state["swaps"] = []
    try:
        previous_end = time.monotonic()
        for i in range(swaps + 1):
            name = "swap-a" if i % 2 == 0 else "swap-b"
            job = daemon.job(name, workload(4, True, seed=i))
            end = time.monotonic()
            loads.append({"load": i, "profile": name, "model_load_s": job["model_load_s"],
                          "after_load_mib": used_mib(daemon.proc.pid),
                          "lowest_before_mib": sampler.low(previous_end, end)})
            previous_end = end
            print("swap", json.dumps(loads[-1]), flush=True)
            if time.monotonic() + (time.monotonic() - started) / (i + 1) > deadline:
                break  # another load would pass this part's deadline
    finally:
        sampler.stopped.set()
    for name in ("swap-a", "swap-b"):
        mine = [x["after_load_mib"] for x in loads if x["profile"] == name]
        if len(mine) >= 2:
            state.setdefault("swap_growth", {})[name] = round(mine[-1] / mine[0], 4)


def part_fit(state: dict, base: Path, gpu: Gpu, fits: int, deadline: float) -> None:
    """Each shipped profile's shape loaded by vLLM at the profile's settings."""
    from batchd.engine.fit import check, parse_size
    from batchd.profiles import load_profile

    small = gpu.total_mib is None
    vram = parse_size(VRAM)
    started = time.monotonic()
    rows = state["fit"] = []
    for name in ("llama3.2-1b", "llama3.2-3b", "qwen3-4b")[:fits]:
        prof = load_profile(ROOT / "profiles" / f"{name}.toml")
        estimate = check(prof, base / "models", vram)
        dtype = "float32" if small else prof.engine.get("dtype", "bfloat16")
        shape = {**SHAPES[name], **(TINY if small else {})}
        folder = write_model(base / "models" / f"fit-{name}", shape, dtype)
        engine = {"dtype": dtype, "load_format": "dummy", "enforce_eager": True,
                  "max_model_len": 512 if small else prof.engine.get("max_model_len", 4096)}
        if not small:  # the profile's share of a 16 GiB card, on this card
            engine["gpu_memory_utilization"] = gpu.utilization(
                float(prof.engine.get("gpu_memory_utilization", 0.9)) * vram)
        row = {"profile": name, "engine": engine, "estimate": estimate,
               "vllm": probe(folder, engine, base / f"fit-{name}.log")}
        per_token = (2 * shape["num_hidden_layers"] * shape["num_key_value_heads"]
                     * shape["head_dim"] * (4 if dtype == "float32" else 2))
        measured = row["vllm"]
        if measured.get("kv_tokens"):
            measured["kv_cache_gb"] = measured["kv_tokens"] * per_token / 1e9
            row["kv_ratio_estimate_over_vllm"] = round(
                estimate["kv_cache_gb"] / measured["kv_cache_gb"], 4)
        if measured.get("weights_gib"):
            row["weights_ratio_estimate_over_vllm"] = round(
                estimate["weights_gb"] / (measured["weights_gib"] * GIB / 1e9), 4)
        rows.append(row)
        print("fit", json.dumps({k: v for k, v in row.items() if k != "engine"}), flush=True)
        if time.monotonic() + (time.monotonic() - started) / len(rows) > deadline:
            break  # another load would pass the deadline


def probe(folder: Path, engine: dict, log: Path) -> dict:
    """Load FOLDER in `vllm.LLM` in a child; return what vLLM reported."""
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", str(folder),
                                  json.dumps(engine)], stdin=subprocess.PIPE, stdout=out,
                                 stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                 env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        while child.poll() is None and "probe ready" not in log.read_text():
            time.sleep(0.2)
        used = used_mib(child.pid)
        child.communicate("", timeout=120)
    text = log.read_text()
    found: dict = {"exit_code": child.returncode, "used_mib_while_loaded": used}
    for key, pattern, cast in (
            ("kv_tokens", r"KV cache size: ([\d,]+) tokens", lambda s: int(s.replace(",", ""))),
            ("weights_gib", r"Model loading took ([\d.]+) ?GiB", float),
            ("available_kv_gib", r"Available KV cache memory: ([\d.]+) ?GiB", float)):
        if match := re.search(pattern, text):
            found[key] = cast(match.group(1))
    return found


def run(repeats: int = 3, n: int = 5000, swaps: int = 6, fits: int = 3,
        budget_s: float = 480, quick: bool = False) -> Path:
    """All three parts within about BUDGET_S seconds, shared 55/27/18 % among
    those that run (SWAPS or FITS 0 leaves a part out and gives its time to the
    others; time one part leaves goes to the next). A part that fails is
    recorded under "errors" and the others still run; the run then ends with
    an error, after the record is written."""
    began = time.monotonic()
    gpu = Gpu()
    if gpu.total_mib is None and not quick:
        n = min(n, 200)  # the CPU build: the same steps at a size it runs in minutes
    if gpu.total_mib is None:
        # the CPU build: vLLM's worker inside its engine core process, as the
        # shipped CPU profile runs it (docs/MODELS.md); every engine here inherits it
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    state: dict = {"settings": {"n": n, "repeats": repeats, "swaps": swaps, "fits": fits,
                                "quick": quick, "budget_s": budget_s, "vram": VRAM,
                                "budget_gib": BUDGET_GIB,
                                "gpu_total_mib": gpu.total_mib,
                                "weights": "random (load_format dummy)",
                                "tokenizer": "SmolLM2-135M-Instruct",
                                "daemon_engine": DAEMON_ENGINE},
                   "idle_mib": used_mib() if gpu.total_mib else None,
                   "goals": {"overhead": "batchd/raw <= 1.03",
                             "swaps": "after the last load within 2 % of the first, per shape",
                             "fit": "estimate within 10 % of what vLLM takes"},
                   "errors": {}}
    path = write_record("gpu", state)

    def save() -> Path:
        return write_record("gpu", state, path)

    def attempt(part: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:  # recorded; the next part still runs
            state["errors"][part] = traceback.format_exc()[-4000:]
            print(f"{part} failed:\n{state['errors'][part]}", file=sys.stderr, flush=True)
        save()

    shares = (0.55, 0.27 if swaps else 0.0, 0.18 if fits else 0.0)
    ends = (shares[0] / sum(shares), (shares[0] + shares[1]) / sum(shares))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        daemon, plan = setup(base, gpu, n)
        try:
            attempt("overhead", lambda: part_overhead(state, base, daemon, plan, repeats,
                                                      began + ends[0] * budget_s, save))
            if swaps and daemon.proc.poll() is None:
                attempt("swaps", lambda: part_swaps(state, daemon, swaps,
                                                    began + ends[1] * budget_s))
        finally:
            daemon.close()
            for log in (base / "daemon.log", base / "raw.log"):
                keep_log(log, path)
        if fits:
            attempt("fit", lambda: part_fit(state, base, gpu, fits, began + budget_s))
        for log in base.glob("fit-*.log"):
            keep_log(log, path)
    overhead = state.get("overhead", {})
    if "generation_ratio" in overhead:
        state["ratios"] = {"generation": overhead["generation_ratio"],
                           "end_to_end": overhead["end_to_end_ratio"]}
    save()
    if state["errors"]:
        raise RuntimeError(f"parts failed: {', '.join(state['errors'])} (see {path})")
    return path


def keep_log(log: Path, record: Path) -> None:
    """Logs go beside the record (on the device: $OUT), never into git."""
    if log.exists():
        shutil.copy(log, record.with_name(f"{record.stem}.{log.name}"))


def _probe_main() -> None:
    """python -m benchmarks.gpu FOLDER ENGINE_JSON: load, say so, wait for stdin."""
    from vllm import LLM

    llm = LLM(model=sys.argv[1], **json.loads(sys.argv[2]))
    print("probe ready", flush=True)
    sys.stdin.read()
    del llm


if __name__ == "__main__":
    _probe_main()
