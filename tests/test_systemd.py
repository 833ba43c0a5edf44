"""The systemd units verify, and the daemon speaks sd_notify as they expect."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import BATCHD, ROOT, drop, final_state, read_jsonl, wait_for


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit,name", [("batchd.service", "batchd.service"),
                                       ("batchd@.service", "batchd@0.service"),
                                       ("batchd-api.service", "batchd-api.service")])
def test_units_verify(tmp_path, unit, name):
    # Point ExecStart at this checkout's batchd, as an install to /opt/batchd would.
    text = (ROOT / "systemd" / unit).read_text().replace("/opt/batchd/.venv/bin/batchd", BATCHD)
    (tmp_path / name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    for line in ("Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", "User=batchd"):
        assert line in text
    if unit == "batchd-api.service":  # no GPU: no devices at all
        assert "\nPrivateDevices=yes" in text and "\nCapabilityBoundingSet=\n" in text
        assert "RestartPreventExitStatus=2" in text
        return
    for line in ("Type=notify", "WatchdogSec=", "ExecReload="):
        assert line in text
    assert "\nPrivateDevices=" not in text and "\nMemoryDenyWriteExecute=" not in text
    if unit == "batchd@.service":
        assert "CUDA_VISIBLE_DEVICES=%i" in text


class NotifySocket:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict]] = []

    def pump(self) -> list[dict]:
        """Read what has arrived (for at most 0.2 s) and return all messages so far."""
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                return [m for _, m in self.messages]
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
        return [m for _, m in self.messages]

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in self.pump())


def test_notify_on_an_abstract_socket(spool_config, daemons):
    """NOTIFY_SOCKET=@name (an abstract socket, as systemd may hand it): READY
    when ready, STOPPING on SIGTERM."""
    name = f"batchd-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifySocket("\0" + name)
    daemon = daemons(spool_config(), env={"NOTIFY_SOCKET": "@" + name}, fake=True)
    wait_for(lambda: listener.has("READY", "1"), 30, what="READY=1")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert listener.has("STOPPING", "1")


@pytest.mark.slow  # a daemon process for seconds: make test, not make check
def test_notify_protocol(spool_config, tmp_path, daemons):
    config = spool_config("[engine]\nidle_unload_seconds = 1\n")
    address = str(tmp_path / "notify.sock")
    listener = NotifySocket(address)
    daemon = daemons(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
                                  "BATCHD_FAKE_STEP_SECONDS": "0.05"}, fake=True)
    wait_for(lambda: listener.has("READY", "1"), 30, what="READY=1")
    assert (tmp_path / "spool" / "inbox").is_dir()  # the spool exists before READY
    assert any(m.get("STATUS", "").startswith("idle, watching") for m in listener.pump())
    lines = [{"custom_id": f"c{i}", "prompt": "x"} for i in range(200)]
    drop(tmp_path / "spool" / "inbox", "work.jsonl", lines)
    wait_for(lambda: listener.pump() is not None and final_state(tmp_path / "spool" / "outbox",
                                                                 "work"), 60, what="job end")
    messages = listener.pump()
    assert any("EXTEND_TIMEOUT_USEC" in m for m in messages)  # sent as the model loads
    assert any(m.get("STATUS", "").startswith("work: ") and "req/s" in m["STATUS"]
               for m in messages)
    pings = [t for t, m in listener.messages if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 5
    # After idle_unload_seconds without work the model is freed, and STATUS says so.
    wait_for(lambda: any(m.get("STATUS", "").startswith("idle, tiny unloaded after 1s")
                         for m in listener.pump()), 30, what="the idle unload STATUS")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert listener.has("STOPPING", "1")
    stopping = next(m for m in listener.pump() if m.get("STOPPING") == "1")
    assert int(stopping["EXTEND_TIMEOUT_USEC"]) > 0  # the drain asks for time


@pytest.mark.slow  # a daemon process for seconds: make test, not make check
def test_hung_loop_stops_watchdog_pings(spool_config, tmp_path, daemons):
    """An engine step that never returns (here: a 60 s fake step) must let the
    watchdog fire: no WATCHDOG=1 while the loop is stuck."""
    config = spool_config()
    address = str(tmp_path / "notify.sock")
    listener = NotifySocket(address)
    daemon = daemons(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
                                  "BATCHD_FAKE_STEP_SECONDS": "60"}, fake=True)
    wait_for(lambda: listener.has("READY", "1"), 30, what="READY=1")
    drop(tmp_path / "spool" / "inbox", "stuck.jsonl", [{"prompt": "x"}])
    wait_for(lambda: (tmp_path / "spool" / "work" / "stuck.ckpt.jsonl").exists(), 30,
             what="the job to start")

    def pings():
        listener.pump()  # every message stamped as it is read, a pump every 50 ms
        return [t for t, m in listener.messages if m.get("WATCHDOG") == "1"]

    # once the loop is in the step (a turn or two after the job starts, however
    # slow the machine), the pings stop: 2 s of silence against a 0.4 s
    # watchdog, and systemd would restart it. A loop that pinged from anywhere
    # but its own turn would never fall silent.
    wait_for(lambda: pings() and time.monotonic() - pings()[-1] > 2.0, 30,
             what="two seconds without a watchdog ping")
    # Silence only counts from a daemon that is alive and had been pinging.
    assert daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
    assert len(pings()) >= 2
    daemon.kill_tree()


def test_an_unread_notify_socket_never_blocks_the_daemon(spool_config, tmp_path, daemons):
    config = spool_config()
    address = str(tmp_path / "notify.sock")
    listener = NotifySocket(address)  # bound, never read until the end
    daemon = daemons(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000",
                                  "BATCHD_FAKE_STEP_SECONDS": "0.02"}, fake=True)
    daemon.wait_ready()
    drop(tmp_path / "spool" / "inbox", "busy.jsonl", [{"prompt": "x"}] * 300)
    assert wait_for(lambda: final_state(tmp_path / "spool" / "outbox", "busy"), 60,
                    what="job end") == "completed"
    assert listener.has("READY", "1")


@pytest.mark.slow  # a daemon process for seconds: make test, not make check
def test_sighup_reloads_profiles_without_dropping_work(spool_config, tmp_path, daemons):
    config = spool_config()
    daemon = daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.05"}, fake=True)
    daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    drop(inbox, "running.jsonl", [{"custom_id": f"r{i}", "prompt": "x"} for i in range(400)])
    wait_for(lambda: (tmp_path / "spool" / "work" / "running.ckpt.jsonl").exists(), 30)
    (tmp_path / "profiles" / "fresh.toml").write_text('model = "org/fresh"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    drop(inbox, "fresh__new.jsonl", [{"prompt": "y"}])
    assert wait_for(lambda: final_state(outbox, "running"), 60) == "completed"
    assert len(read_jsonl(outbox / "running.results.jsonl")) == 400
    assert wait_for(lambda: final_state(outbox, "fresh__new"), 60) == "completed"
    assert 'profile = "fresh"' in (outbox / "fresh__new.job.toml").read_text()
    assert any(e.get("event") == "profiles_reloaded" for e in daemon.logs())
    assert daemon.proc.poll() is None
