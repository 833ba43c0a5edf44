"""Scenario `replicas`: one daemon, one engine against two engine replicas (CONTRACT 18).

Side by side on one machine, each a warm daemon on a spool of its own, the
same file run on each in turn (the order rotating between repeats): drop
(rename into the inbox) to the final status line. The file is shared-prefix
work: FAMILIES long system prompts, each asked LINES_PER_FAMILY questions.

- ``one``: ``replicas = 1`` (every core to one engine);
- ``two``: ``replicas = 2``, each replica on its own half of the cores (or GPU
  memory), requests dealt by prefix family;
- ``two_least_loaded``: the same, each request dealt to the least busy
  replica (``replica_dealing = "least_loaded"``): what dealing without
  families loses in vLLM's prefix cache.

The record keeps the seconds, their ratio to ``one``, and each mode's prefix
cache hit rate (the bench record's ``prefix_cache.hit_rate``) and how the
requests were shared between the replicas.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .common import FAKE_BATCHD, TINY_PROFILE, batchd_command, ensure_tiny, make_spool, \
    summary, wait_final, write_record

MODES = ("one", "two", "two_least_loaded")
QUICK = {"families": 8, "per_family": 10, "tokens": 4, "fake": True}


def lines(job: str, families: int, per_family: int, tokens: int) -> str:
    """Shared-prefix work in input order: family f's questions together."""
    out = []
    for f in range(families):
        system = f"Rubric {f}: " + "grade the answer fairly and briefly. " * 12
        for q in range(per_family):
            out.append(json.dumps({
                "custom_id": f"{job}-{f}-{q}", "max_tokens": tokens, "ignore_eos": True,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Question {q} of family {f}?"}]}))
    return "\n".join(out) + "\n"


class Daemon:
    """A daemon on a spool of its own under BASE with EXTRA config."""

    def __init__(self, base: Path, extra: str, fake: bool, gpu: bool):
        profile = TINY_PROFILE
        if gpu:  # two engines share the one GPU's memory
            profile = profile.replace("[engine]\n", "[engine]\ngpu_memory_utilization = 0.4\n")
        config = make_spool(base, "[status]\ninterval = 0.5\n" + extra)
        (base / "profiles" / "tiny.toml").write_text(profile)
        self.inbox, self.outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        self.inbox.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if fake:
            env["BATCHD_FAKE_STEP_SECONDS"] = "0.05"
        command = FAKE_BATCHD if fake else batchd_command()
        self.proc = subprocess.Popen([*command, "run", "--config", str(config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(base / "daemon.log", "wb"), env=env)
        self.count = 0

    def run(self, text: str, timeout: float = 1800) -> tuple[float, dict]:
        self.count += 1
        job = f"shared{self.count}"
        part = self.inbox / f".{job}.part"
        part.write_text(text)
        began = time.perf_counter()
        os.rename(part, self.inbox / f"{job}.jsonl")
        state = wait_final(self.outbox / f"{job}.status.jsonl", self.proc, timeout)
        seconds = time.perf_counter() - began
        if state != "completed":
            raise RuntimeError(f"{job}: {state}")
        return seconds, json.loads((self.outbox / f"{job}.bench.json").read_text())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _gpu() -> bool:
    return subprocess.run(["sh", "-c", "nvidia-smi >/dev/null 2>&1"]).returncode == 0


def run(repeats: int = 3, families: int = 48, per_family: int = 40, tokens: int = 32,
        fake: bool = False, quick: bool = False, modes: tuple[str, ...] = MODES) -> Path:
    if not fake:
        ensure_tiny()
    gpu = _gpu()
    text = lines("shared", families, per_family, tokens)
    warmup = lines("warm", 4, 8, 2)
    extra = {"one": "[engine]\nreplicas = 1\n",
             "two": "[engine]\nreplicas = 2\n",
             "two_least_loaded": '[engine]\nreplicas = 2\nreplica_dealing = "least_loaded"\n'}
    times: dict[str, list[float]] = {m: [] for m in modes}
    hits: dict[str, list[float]] = {m: [] for m in modes}
    shares: dict[str, list[list[int]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        daemons = {}
        try:
            for mode in modes:
                daemons[mode] = Daemon(Path(tmp) / mode, extra[mode], fake, gpu)
            for daemon in daemons.values():
                daemon.run(warmup)  # loads its engines
            for i in range(repeats):
                rotated = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in rotated:
                    seconds, bench = daemons[mode].run(text)
                    times[mode].append(round(seconds, 3))
                    hits[mode].append(bench["prefix_cache"]["hit_rate"])
                    shares[mode].append([r["requests"] for r in bench.get("replicas", [])])
                    print(mode, round(seconds, 2), "hit rate", hits[mode][-1],
                          "shares", shares[mode][-1], flush=True)
        finally:
            for daemon in daemons.values():
                daemon.close()
    base = statistics.median(times["one"]) if "one" in times else None
    ratios = {f"{m}_over_one": round(statistics.median(times[m]) / base, 3)
              for m in modes if base and m != "one"}
    print(json.dumps(ratios), flush=True)
    return write_record("replicas", {
        "settings": {"repeats": repeats, "families": families, "per_family": per_family,
                     "max_tokens": tokens, "fake": fake, "quick": quick, "modes": list(modes),
                     "model": "tiny-llama", "cores": len(os.sched_getaffinity(0)), "gpu": gpu},
        "seconds": {m: summary(v) for m, v in times.items()},
        "prefix_cache_hit_rate": {m: summary(v) for m, v in hits.items()},
        "replica_requests": shares, "ratios": ratios,
        "goals": {"two_over_one": "<= 0.80 on 2 cores (a core each), <= 0.55 on 2 GPUs",
                  "hit rate": "two near one; two_least_loaded shows what families save"}})
