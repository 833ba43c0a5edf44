"""Scenario `concurrency`: does a small file wait behind a long one?

One warm daemon per scheduling policy of the tiny profile (vLLM's "fcfs" and
"priority"), each measuring, in interleaved repeats:

- small alone: a small file dropped on the idle warm engine, drop to results;
- bulk alone: the bulk file, drop to results;
- bulk + small: the bulk again, and the small file dropped once the bulk is
  20 % done; both drop-to-results times;
- once, bulk + many: MANY small files dropped one every SPACING seconds from
  20 % of a bulk run; the median and p95 of their drop-to-results times.

Under "priority" the small files carry a sidecar ``priority = 100`` (what an
urgent user sets), so their requests run ahead of the bulk's in vLLM; under
"fcfs" they carry none and get the fair share of the window only.

Goals (docs/BENCHMARKING.md): small beside the bulk <= 3x small alone; bulk
beside the small <= 1.05x bulk alone plus the small's own time alone. Where a
CPU's step time makes 3x impossible, the floor: the small file's decode steps
at the bulk's step time (the bulk's generation time over its decode steps,
``max_tokens`` x ceil(bulk / SEQS)), plus its claim and publish (small alone
minus its own generation time, from its bench record); goal <= 1.5x the floor.
The daemons run the shipped ``[engine] window`` (0: auto) unless told.
``--fake`` runs the same timeline on the fake engine (a check of the harness).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .common import (BATCHD, FAKE_BATCHD, TINY_PROFILE, ensure_tiny, make_spool, summary,
                     write_record)

QUICK = {"bulk": 200, "small": 4, "many": 3, "fake": True}
POLICIES = ("fcfs", "priority")
SEQS = 256  # vLLM's max_num_seqs on the CPU build (vllm.LLM's offline default)


def lines(prefix: str, n: int, tokens: int) -> str:
    return "".join(json.dumps({
        "custom_id": f"{prefix}-{i}", "max_tokens": tokens, "temperature": 0.0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": f"{prefix} request {i}"}]}) + "\n"
        for i in range(n))


class Spool:
    """A running daemon and the files dropped into its inbox."""

    def __init__(self, base: Path, policy: str, fake: bool, window: int):
        profile = TINY_PROFILE.replace("[engine]\n",
                                       f'[engine]\nscheduling_policy = "{policy}"\n')
        config = make_spool(base, f"[status]\ninterval = 0.2\n[engine]\nwindow = {window}\n")
        (base / "profiles" / "tiny.toml").write_text(profile)
        self.inbox, self.outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        self.inbox.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if fake:
            env["BATCHD_FAKE_STEP_SECONDS"] = "0.05"
        command = FAKE_BATCHD if fake else [BATCHD]
        self.daemon = subprocess.Popen([*command, "run", "--config", str(config)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env=env)
        self.count = 0
        self.dropped: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    def drop(self, kind: str, text: str, priority: int = 0) -> str:
        self.count += 1
        job = f"{kind}{self.count}"
        if priority:
            (self.inbox / f"{job}.toml").write_text(f"priority = {priority}\n")
        part = self.inbox / f".{job}.part"
        part.write_text(text)
        self.dropped[job] = time.perf_counter()
        os.rename(part, self.inbox / f"{job}.jsonl")
        return job

    def generation(self, job: str) -> float:
        bench = json.loads((self.outbox / f"{job}.bench.json").read_text())
        return bench["timing_s"]["generation"]

    def last(self, job: str) -> dict:
        try:
            raw = (self.outbox / f"{job}.status.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return {}
        for line in reversed(raw):
            try:
                return json.loads(line)
            except ValueError:
                continue  # a line being written
        return {}

    def done(self, job: str) -> float | None:
        """Drop to results in seconds, once the final line is there."""
        record = self.last(job)
        if record.get("state") in ("completed", "failed", "cancelled", "expired"):
            if record["state"] != "completed":
                raise RuntimeError(f"{job}: {record['state']} {record.get('message')}")
            return self.finished.setdefault(job, time.perf_counter()) - self.dropped[job]
        if self.daemon.poll() is not None:
            raise RuntimeError("the daemon exited")
        return None

    def progress(self, job: str) -> float:
        counts = self.last(job).get("request_counts") or {}
        return (counts.get("completed", 0) + counts.get("failed", 0)) / (counts.get("total") or 1)

    def wait(self, *jobs: str, timeout: float = 1800) -> list[float]:
        deadline = time.monotonic() + timeout
        while True:
            times = [self.done(job) for job in jobs]
            if all(t is not None for t in times):
                return times  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {jobs}")
            time.sleep(0.01)

    def at_fifth(self, job: str) -> None:
        while self.progress(job) < 0.2:
            if self.done(job) is not None:
                raise RuntimeError(f"{job} ended before it was 20 % done")
            time.sleep(0.01)

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(120)


def one_policy(base: Path, policy: str, repeats: int, bulk: int, small: int, tokens: int,
               many: int, spacing: float, fake: bool, window: int) -> dict:
    spool = Spool(base, policy, fake, window)
    urgent = 100 if policy == "priority" else 0
    bulk_text, small_text = lines("bulk", bulk, tokens), lines("small", small, tokens)
    out: dict = {"small_alone_s": [], "bulk_alone_s": [], "small_shared_s": [],
                 "bulk_shared_s": [], "small_alone_generation_s": [],
                 "bulk_alone_generation_s": []}
    try:
        spool.wait(spool.drop("warmup", lines("warmup", 2, 4)), timeout=900)
        for _ in range(repeats):
            job = spool.drop("small", small_text, urgent)
            out["small_alone_s"] += spool.wait(job)
            out["small_alone_generation_s"].append(spool.generation(job))
            job = spool.drop("bulk", bulk_text)
            out["bulk_alone_s"] += spool.wait(job)
            out["bulk_alone_generation_s"].append(spool.generation(job))
            job = spool.drop("bulk", bulk_text)
            spool.at_fifth(job)
            small_job = spool.drop("small", small_text, urgent)
            small_s = spool.wait(small_job)[0]
            bulk_still_running = spool.done(job) is None
            out["small_shared_s"].append(small_s)
            out["bulk_shared_s"] += spool.wait(job)
            out.setdefault("small_ended_first", []).append(bulk_still_running)
        job = spool.drop("bulk", bulk_text)
        spool.at_fifth(job)
        smalls = []
        for _ in range(many):
            smalls.append(spool.drop("small", small_text, urgent))
            until = time.monotonic() + spacing
            while time.monotonic() < until:  # note each end as it comes
                for small_job in smalls:
                    spool.done(small_job)
                time.sleep(0.01)
        many_s = spool.wait(*smalls)
        out["bulk_with_many_s"] = spool.wait(job)[0]
    finally:
        spool.close()
    many_sorted = sorted(many_s)
    out["many_small_s"] = {"median": statistics.median(many_s),
                           "p95": many_sorted[min(len(many_s) - 1,
                                                  int(round(0.95 * (len(many_s) - 1))))],
                           "runs": many_s}
    small_alone = statistics.median(out["small_alone_s"])
    bulk_alone = statistics.median(out["bulk_alone_s"])
    steps = tokens * -(-bulk // SEQS)  # the bulk's decode steps, SEQS at a time
    step_s = statistics.median(out["bulk_alone_generation_s"]) / steps
    claim_publish = small_alone - statistics.median(out["small_alone_generation_s"])
    out["floor"] = {"bulk_step_s": round(step_s, 5), "claim_publish_s": round(claim_publish, 3),
                    "small_beside_bulk_s": round(tokens * step_s + claim_publish, 3)}
    out["ratios"] = {
        "small_shared_over_small_alone": round(
            statistics.median(out["small_shared_s"]) / small_alone, 3),
        "bulk_shared_over_bulk_alone_plus_small": round(
            statistics.median(out["bulk_shared_s"]) / (bulk_alone + small_alone), 3),
        "many_small_median_over_small_alone": round(out["many_small_s"]["median"]
                                                    / small_alone, 3),
        "small_shared_over_floor": round(statistics.median(out["small_shared_s"])
                                         / out["floor"]["small_beside_bulk_s"], 3),
    }
    for key in ("small_alone_s", "bulk_alone_s", "small_shared_s", "bulk_shared_s",
                "small_alone_generation_s", "bulk_alone_generation_s"):
        out[key] = summary(out[key])
    return out


def run(repeats: int = 3, bulk: int = 2000, small: int = 8, tokens: int = 64, many: int = 10,
        spacing: float = 0.5, fake: bool = False, quick: bool = False, window: int = 0
        ) -> Path:
    if not fake:
        ensure_tiny()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            results[policy] = one_policy(Path(tmp) / policy, policy, repeats, bulk, small,
                                         tokens, many, spacing, fake, window)
            print(policy, json.dumps(results[policy]["ratios"]), flush=True)
    fcfs, prio = results["fcfs"], results["priority"]
    return write_record("concurrency", {
        "settings": {"repeats": repeats, "bulk": bulk, "small": small, "max_tokens": tokens,
                     "many": many, "spacing_s": spacing, "fake": fake, "quick": quick,
                     "model": "tiny-llama", "window": window, "seqs": SEQS},
        "policies": results,
        "ratios": {f"{policy}.{k}": v for policy in POLICIES
                   for k, v in results[policy]["ratios"].items()}
        | {"priority_bulk_alone_over_fcfs": round(prio["bulk_alone_s"]["median"]
                                                  / fcfs["bulk_alone_s"]["median"], 3)},
        "goal": "small beside the bulk <= 3x alone (or <= 1.5x the floor); "
                "bulk <= 1.05x alone + the small alone"})
