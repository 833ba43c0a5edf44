"""When a job ends: the ``[hooks] on_final`` command and the webhook.

A thread of the daemon works through ``events/`` (batchd/spool/events.py): for
each job whose final status line is written, it runs the hook command once
(argv, no shell, a timeout that kills its process group) and POSTs the webhook
until the receiver answers 2xx, backing off between tries, or the deadline
passes. Records are updated as each part is done and removed when both are,
so a restart neither loses an event nor repeats a finished one; records still
pending when a daemon starts are tried at once.

The webhook's body is OpenAI's event (``batch.completed``, ...), signed per
Standard Webhooks by its reference library: ``webhook-id`` (the same on every
redelivery, so receivers can drop duplicates), ``webhook-timestamp`` and
``webhook-signature`` (HMAC-SHA256 with the ``whsec_`` secret). Its URL comes
from config.toml only: nothing a user drops can make the daemon call a URL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import structlog

from .config import Settings
from .layout import BENCH, ERRORS, MERGED, RESULTS, STATUS
from .spool import events
from .spool.outbox import read_status

log = structlog.get_logger()

OUTPUT_LOGGED = 2000  # characters of a hook's output kept in the log


class Hooks:
    """The hooks thread; ``wake()`` after a job ends, ``stop()`` at the end."""

    def __init__(self, settings: Settings,
                 counted: Callable[[str], None] = lambda outcome: None):
        self.settings = settings
        self.counted = counted  # told "delivered" or "failed" for each webhook
        self.config = settings.hooks
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fresh = True  # first pass after start: pending webhooks are tried at once
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if not self.config.any:
            return
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batchd-hooks")
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Let a hook command in progress finish (up to its timeout), then return."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.config.on_final_timeout + self.config.webhook_timeout + 5)

    def _loop(self) -> None:
        while True:  # a last pass after stop(): jobs that ended just before it
            try:
                wait = self.run_due(time.time())
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one record
                log.error("hooks_failed", error=f"{type(exc).__name__}: {exc}")
                wait = 5.0
            if self._stop.is_set():
                return
            self._wake.wait(wait)
            self._wake.clear()

    def run_due(self, now: float) -> float:
        """Act on every record that is due; returns seconds until the next is."""
        next_in = 5.0  # look again now and then: another daemon may have ended a job
        with events.dispatching(self.settings) as mine:
            if not mine:
                return next_in
            for path in events.pending(self.settings):
                doc = events.load(path)
                if doc is None or not self._published(doc):
                    continue
                if doc["hook"] == "running" and not self._still_running(doc):
                    doc["hook"] = "done"  # its daemon died while it ran: it ran once
                    events.save(path, doc)
                if doc["hook"] == "pending":
                    self._run_hook(path, doc)
                    doc["hook"] = "done"
                    events.save(path, doc)
                if doc["webhook"] == "pending":
                    if self._fresh or doc["next_at"] <= now:
                        self._post(doc, time.time())
                        events.save(path, doc)
                    if doc["webhook"] == "pending":
                        next_in = min(next_in, max(0.05, doc["next_at"] - now))
                if doc["hook"] in ("done", "none") and doc["webhook"] != "pending":
                    path.unlink(missing_ok=True)
        self._fresh = False
        return next_in

    def _published(self, doc: dict[str, Any]) -> bool:
        """Whether the job's status file ends in the record's final state."""
        history = read_status(self.settings.layout.status(doc["job"]))
        return bool(history) and history[-1].get("state") == doc["state"]

    # -- the command -------------------------------------------------------------

    def environment(self, doc: dict[str, Any]) -> dict[str, str]:
        layout = self.settings.layout
        job = doc["job"]
        counts = doc.get("counts") or {}
        env = {**os.environ, "BATCHD_JOB": job, "BATCHD_STATE": doc["state"],
               "BATCHD_EVENT": doc["event"]["type"],
               "BATCHD_TOTAL": str(counts.get("total", 0)),
               "BATCHD_COMPLETED": str(counts.get("completed", 0)),
               "BATCHD_FAILED": str(counts.get("failed", 0)),
               "BATCHD_SPOOL": str(layout.root)}
        for var, kind in (("BATCHD_STATUS_FILE", STATUS), ("BATCHD_RESULTS_FILE", RESULTS),
                          ("BATCHD_ERRORS_FILE", ERRORS), ("BATCHD_BENCH_FILE", BENCH),
                          ("BATCHD_MERGED_FILE", MERGED)):
            path = layout.out(job, kind)
            if path.exists():
                env[var] = str(path.resolve())
        return env

    @staticmethod
    def _still_running(doc: dict[str, Any]) -> bool:
        """Whether the hook a dead daemon started is still running (same pid, same
        start time); once it is not, it counts as run."""
        import psutil

        try:
            return psutil.Process(doc["hook_pid"]).create_time() == doc["hook_started"]
        except (psutil.Error, KeyError, TypeError):
            return False

    def _run_hook(self, path: Path, doc: dict[str, Any]) -> None:
        """Run the command once: the record says "running" (with its pid) while it
        runs, so a daemon killed meanwhile does not start it again at its next start."""
        import psutil

        argv = self.config.on_final
        job = doc["job"]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, env=self.environment(doc), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=self.settings.layout.outbox, start_new_session=True)
        except OSError as exc:
            log.error("hook_failed", job=job, argv=argv, error=str(exc))
            return
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = None  # it already exited
        events.save(path, {**doc, "hook": "running", "hook_pid": proc.pid,
                           "hook_started": created})
        try:
            output, _ = proc.communicate(timeout=self.config.on_final_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # it and whatever it started
            except OSError:
                pass
            output, _ = proc.communicate()
            log.error("hook_timed_out", job=job, argv=argv,
                      timeout_s=self.config.on_final_timeout,
                      output=output.decode(errors="replace")[-OUTPUT_LOGGED:])
            return
        event = "hook_ran" if proc.returncode == 0 else "hook_failed"
        (log.info if proc.returncode == 0 else log.error)(
            event, job=job, state=doc["state"], exit_status=proc.returncode,
            seconds=round(time.monotonic() - started, 3),
            output=output.decode(errors="replace")[-OUTPUT_LOGGED:])

    # -- the webhook -------------------------------------------------------------

    def _post(self, doc: dict[str, Any], now: float) -> None:
        """One delivery attempt; DOC's webhook becomes "done" or "failed", or its
        next_at is set for the next try."""
        import httpx
        from standardwebhooks import Webhook

        job = doc["job"]
        doc["attempts"] += 1
        body = json.dumps(doc["event"], separators=(",", ":"))
        try:
            secret = Path(self.config.webhook_secret_file or "").read_text().strip()
            stamp = datetime.now(timezone.utc)
            signature = Webhook(secret).sign(doc["webhook_id"], stamp, body)
            headers = {"content-type": "application/json", "user-agent": "batchd",
                       "webhook-id": doc["webhook_id"],
                       "webhook-timestamp": str(int(stamp.timestamp())),
                       "webhook-signature": signature}
            response = httpx.post(str(self.config.webhook_url), content=body.encode(),
                                  headers=headers, timeout=self.config.webhook_timeout,
                                  follow_redirects=False)
            answer = f"HTTP {response.status_code}"
            ok = 200 <= response.status_code < 300
        except Exception as exc:  # noqa: BLE001 - network, secret, anything: try again later
            answer, ok = f"{type(exc).__name__}: {exc}", False
        if ok:
            doc["webhook"] = "done"
            self.delivered += 1
            self.counted("delivered")
            log.info("webhook_delivered", job=job, type=doc["event"]["type"],
                     attempts=doc["attempts"])
            return
        if now - doc["ended_at"] >= self.config.webhook_deadline_seconds:
            doc["webhook"] = "failed"
            self.failed += 1
            self.counted("failed")
            log.error("webhook_failed", job=job, attempts=doc["attempts"], last=answer,
                      deadline_s=self.config.webhook_deadline_seconds)
            return
        backoff = min(self.config.webhook_backoff_seconds * 2 ** (doc["attempts"] - 1), 3600.0)
        doc["next_at"] = now + backoff
        log.warning("webhook_retrying", job=job, attempts=doc["attempts"], answer=answer,
                    retry_in_s=round(backoff, 1))
