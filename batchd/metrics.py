"""Prometheus metrics as a text file, for node_exporter's textfile collector.

Written atomically (temp name, rename) to ``[metrics] textfile`` after every
progress update and job end; unset means off. Counters are this daemon's own
since it started, as Prometheus expects of a process's counters.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, path: Path | None):
        self.path = path
        self.jobs: Counter[str] = Counter()  # final state -> count
        self.requests: Counter[tuple[str, str]] = Counter()  # (profile, outcome)
        self.tokens: Counter[tuple[str, str]] = Counter()  # (profile, kind)
        self.running = 0
        self.throughput = 0.0
        self.requests_per_s = 0.0
        self.loaded: tuple[str, str | None] | None = None
        self.load_seconds: dict[str, float] = {}
        self.last_claim = 0.0

    def claimed(self) -> None:
        self.running = 1
        self.last_claim = time.time()
        self.write()

    def progress(self, record: dict[str, Any]) -> None:
        throughput = record.get("throughput") or {}
        self.throughput = throughput.get("output_tokens_per_s") or 0.0
        self.requests_per_s = throughput.get("requests_per_s") or 0.0
        self.write()

    def finished(self, bench: dict[str, Any] | None, state: str) -> None:
        self.jobs[state] += 1
        self.running = 0
        self.throughput = self.requests_per_s = 0.0
        if bench:
            profile = bench.get("profile") or "-"
            self.requests[(profile, "succeeded")] += bench["requests"]["succeeded"]
            self.requests[(profile, "failed")] += bench["requests"]["failed"]
            self.tokens[(profile, "prompt")] += bench["tokens"]["prompt"]
            self.tokens[(profile, "completion")] += bench["tokens"]["completion"]
            if bench["timing_s"]["model_load"]:
                self.load_seconds[profile] = bench["timing_s"]["model_load"]
        self.write()

    def model(self, profile: str | None, model: str | None) -> None:
        self.loaded = (profile, model) if profile else None
        self.write()

    def render(self) -> str:
        out = []

        def family(name: str, kind: str, help: str, samples: list[tuple[dict, float]]):
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(**labels)} {value:g}")

        family("batchd_jobs_total", "counter", "Jobs ended, by final state.",
               [({"state": s}, self.jobs[s]) for s in ("completed", "failed", "cancelled")])
        family("batchd_jobs_running", "gauge", "Jobs this daemon is running.",
               [({}, self.running)])
        family("batchd_requests_total", "counter", "Requests answered, by profile and outcome.",
               [({"profile": p, "outcome": o}, v) for (p, o), v in sorted(self.requests.items())])
        family("batchd_tokens_total", "counter", "Tokens processed, by profile and kind.",
               [({"profile": p, "kind": k}, v) for (p, k), v in sorted(self.tokens.items())])
        family("batchd_output_tokens_per_second", "gauge",
               "Output tokens per second of the running job.", [({}, self.throughput)])
        family("batchd_requests_per_second", "gauge",
               "Requests per second of the running job.", [({}, self.requests_per_s)])
        family("batchd_model_loaded", "gauge", "1 for the model held in memory.",
               [({"profile": self.loaded[0], "model": self.loaded[1]}, 1)] if self.loaded else [])
        family("batchd_model_load_seconds", "gauge", "Seconds the last load of a profile took.",
               [({"profile": p}, v) for p, v in sorted(self.load_seconds.items())])
        family("batchd_last_claim_timestamp_seconds", "gauge",
               "Unix time of the last claim.", [({}, self.last_claim)])
        return "\n".join(out) + "\n"

    def write(self) -> None:
        if self.path is None:
            return
        from .outbox import write_atomic

        try:
            write_atomic(self.path, [self.render().encode()])
        except OSError:
            pass  # metrics must never stop the daemon
