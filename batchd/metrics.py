"""Prometheus metrics as a text file, for node_exporter's textfile collector.

Rendered by prometheus_client (its exposition format, escaping and types) from
a registry of this daemon's own, and written with ``outbox.write_atomic``
(fsync, then rename) to ``[metrics] textfile`` after every progress update and
job end; unset means off. Counters are this daemon's own since it started, as
Prometheus expects of a process's counters.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from .layout import FINAL_STATES


class Metrics:
    def __init__(self, path: Path | None):
        self._running = -1
        self._replicas: list[tuple] = []
        self.path = path
        self._writing = threading.Lock()
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("batchd_jobs", "Jobs ended, by final state.", ["state"],
                            registry=r)
        for state in sorted(FINAL_STATES):
            self.jobs.labels(state.value)  # present at 0 from the start
        self.running = Gauge("batchd_jobs_running", "Jobs this daemon is running.", registry=r)
        self.requests = Counter("batchd_requests", "Requests answered, by profile and outcome.",
                                ["profile", "outcome"], registry=r)
        self.tokens = Counter("batchd_tokens", "Tokens processed, by profile and kind.",
                              ["profile", "kind"], registry=r)
        self.throughput = Gauge("batchd_output_tokens_per_second",
                                "Output tokens per second of the running job.", registry=r)
        self.requests_per_s = Gauge("batchd_requests_per_second",
                                    "Requests per second of the running job.", registry=r)
        self.loaded = Gauge("batchd_model_loaded", "1 for the model held in memory.",
                            ["profile", "model"], registry=r)
        self.load_seconds = Gauge("batchd_model_load_seconds",
                                  "Seconds the last load of a profile took.", ["profile"],
                                  registry=r)
        self.cache = Counter("batchd_cache_lookups", "Result cache lookups of "
                             "deterministic lines, by outcome.", ["outcome"], registry=r)
        self.webhooks = Counter("batchd_webhooks", "Webhook events, by outcome (delivered; "
                                "failed: the deadline passed).", ["outcome"], registry=r)
        self.inbox = Gauge("batchd_jobs_waiting", "Files waiting in the inbox, not claimed "
                           "yet (state waiting: phase settling or in_inbox).", registry=r)
        self.settling = Gauge("batchd_jobs_settling", "Of the files waiting in the inbox, "
                              "those still being written (phase settling).", registry=r)
        self._waiting: tuple[int, int | None] | None = None
        self.last_claim = Gauge("batchd_last_claim_timestamp_seconds",
                                "Unix time of the last claim.", registry=r)
        # each engine replica: labels replica (its number) and where (host and GPUs or
        # cores, or its Ray node); answered counts are since the daemon started
        replica = ["replica", "where"]
        self.replica_up = Gauge("batchd_replica_up", "1 for an engine replica that is "
                                "loaded and serving, 0 for one loading, dead or given up.",
                                replica, registry=r)
        self.replica_requests = Gauge("batchd_replica_requests", "Requests the replica "
                                      "answered.", replica, registry=r)
        self.replica_tokens = Gauge("batchd_replica_output_tokens", "Output tokens of the "
                                    "replica's answers.", replica, registry=r)
        self.replica_deaths = Gauge("batchd_replica_deaths", "The replica's deaths not yet "
                                    "cleared by answers after a reload.", replica, registry=r)

    def replicas(self, lines: list[dict[str, Any]]) -> None:
        """Each engine replica (engine/replicas.py; none with one engine): up or
        not, and what it answered since it was first loaded. Asked once a second;
        the file is rewritten on a change."""
        seen = [(line["replica"], line["where"], line["state"], line["requests"],
                 line["output_tokens"], line["deaths"]) for line in lines]
        if seen == self._replicas:
            return
        self._replicas = seen
        for gauge in (self.replica_up, self.replica_requests, self.replica_tokens,
                      self.replica_deaths):
            gauge.clear()
        for replica, where, state, requests, tokens, deaths in seen:
            labels = (str(replica), where)
            self.replica_up.labels(*labels).set(1 if state == "ready" else 0)
            self.replica_requests.labels(*labels).set(requests)
            self.replica_tokens.labels(*labels).set(tokens)
            self.replica_deaths.labels(*labels).set(deaths)
        self.write()

    def claimed(self) -> None:
        self.last_claim.set(time.time())
        self.write()

    def waiting(self, files: int, settling: int | None = None) -> None:
        """FILES waiting in the inbox (every phase) as the loop's last look saw them;
        SETTLING: how many of them are still being written, when the caller knows.
        Cheap on every pass of the loop: the file is rewritten only on a change."""
        if self._waiting == (files, settling):
            return
        self._waiting = (files, settling)
        self.inbox.set(files)
        if settling is not None:
            self.settling.set(settling)
        self.write()

    def running_jobs(self, count: int) -> None:
        if count == self._running and count:
            return  # asked on every turn of the loop: rewritten on a change
        self._running = count
        self.running.set(count)
        if not count:
            self.throughput.set(0)
            self.requests_per_s.set(0)
        self.write()

    def progress(self, record: dict[str, Any]) -> None:
        throughput = record.get("throughput") or {}
        self.throughput.set(throughput.get("output_tokens_per_s") or 0.0)
        self.requests_per_s.set(throughput.get("requests_per_s") or 0.0)
        self.write()

    def finished(self, bench: dict[str, Any] | None, state: str) -> None:
        self.jobs.labels(state).inc()
        if bench:
            profile = bench.get("profile") or "-"
            self.requests.labels(profile, "succeeded").inc(bench["requests"]["succeeded"])
            self.requests.labels(profile, "failed").inc(bench["requests"]["failed"])
            self.tokens.labels(profile, "prompt").inc(bench["tokens"]["prompt"])
            self.tokens.labels(profile, "completion").inc(bench["tokens"]["completion"])
            cached = (bench.get("prefix_cache") or {}).get("cached_tokens") or 0
            self.tokens.labels(profile, "cached").inc(cached)
            for field, outcome in (("hits", "hit"), ("misses", "miss")):
                self.cache.labels(outcome).inc((bench.get("cache") or {}).get(field) or 0)
            if bench["timing_s"]["model_load"]:
                self.load_seconds.labels(profile).set(bench["timing_s"]["model_load"])
        self.write()

    def webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()
        self.write()

    def model(self, profile: str | None, model: str | None) -> None:
        self.loaded.clear()
        if profile:
            self.loaded.labels(profile, model or "").set(1)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        from .spool.outbox import write_atomic

        try:
            with self._writing:  # the hooks thread counts webhooks too; one temp name
                write_atomic(self.path, [generate_latest(self.registry)])
        except OSError:
            pass  # metrics must never stop the daemon
