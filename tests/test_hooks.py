"""Signals when a job ends, in-process on the fake engine: the hook command, the
signed webhook with retries, and what a hanging hook or a failing receiver does.
Real daemon processes, restarts and real vLLM: test_vllm_rerun.py."""

import base64
import json
import sys

import psutil
import pytest
from standardwebhooks import Webhook

from batchd.config import load_settings
from batchd.testing import FakeEngine
from batchd.hooks import Hooks
from batchd.spool import events

from conftest import Receiver, drain, drop, final_state, in_process, wait_for

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes!!!!").decode()
HOOK = "import json, os, sys; open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in " \
       "os.environ.items() if k.startswith('BATCHD_')}) + '\\n')"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make(spool_config, tmp_path, hooks: str):
    (tmp_path / "secret").write_text(SECRET + "\n")
    settings = load_settings(spool_config("[hooks]\n" + hooks))
    d = in_process(settings, factory=FakeEngine, clock=lambda: 1000.0)
    return settings, d


def test_the_hook_runs_once_per_job_with_its_environment(spool_config, tmp_path):
    log = tmp_path / "hook.log"
    settings, d = make(spool_config, tmp_path,
                       f"on_final = {json.dumps([sys.executable, '-c', HOOK, str(log)])}\n")
    drop(settings.inbox, "a.jsonl", [{"prompt": "x"}, "not json"])
    (settings.inbox / "b.cancel").write_text("")
    drop(settings.inbox, "b.jsonl", [{"prompt": "y"}])
    drain(d)
    hooks = Hooks(settings)
    hooks.run_due(0.0)
    hooks.run_due(0.0)  # a second pass repeats nothing
    ran = [json.loads(l) for l in log.read_text().splitlines()]
    assert sorted((r["BATCHD_JOB"], r["BATCHD_STATE"]) for r in ran) == [
        ("a", "completed"), ("b", "cancelled")]
    a = next(r for r in ran if r["BATCHD_JOB"] == "a")
    assert (a["BATCHD_TOTAL"], a["BATCHD_COMPLETED"], a["BATCHD_FAILED"]) == ("2", "1", "1")
    assert a["BATCHD_EVENT"] == "batch.completed"
    assert json.loads(open(a["BATCHD_RESULTS_FILE"]).readline())["custom_id"] == "line-1"
    assert a["BATCHD_ERRORS_FILE"].endswith("a.errors.jsonl")
    assert events.pending(settings) == []


def test_a_record_waits_for_the_final_status_line(spool_config, tmp_path):
    """A crash between the record and the final line: the job is republished, so
    the record is not acted on until its line is there."""
    from batchd.layout import JobState
    log = tmp_path / "hook.log"
    settings, d = make(spool_config, tmp_path,
                       f"on_final = {json.dumps([sys.executable, '-c', HOOK, str(log)])}\n")
    events.record(settings, "ghost", JobState.COMPLETED, {"total": 1})
    Hooks(settings).run_due(0.0)
    assert not log.exists() and len(events.pending(settings)) == 1


def test_a_hook_that_hangs_is_killed_and_the_daemon_goes_on(spool_config, tmp_path):
    """Killed after on_final_timeout, however far it got in that time (a busy
    machine may not have started its interpreter yet): no process of it is left."""
    token = f"batchd-hanging-hook-{tmp_path.name}"
    script = f"import signal; signal.pause()  # {token}"  # hangs until killed
    argv = json.dumps([sys.executable, "-c", script])
    settings, d = make(spool_config, tmp_path, f"on_final = {argv}\non_final_timeout = 0.5\n")
    drop(settings.inbox, "a.jsonl", [{"prompt": "x"}])
    drain(d)
    Hooks(settings).run_due(0.0)

    def alive(proc):
        try:
            return token in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    assert not [proc for proc in psutil.process_iter() if alive(proc)]
    assert events.pending(settings) == []  # ran (and was killed): not run again
    drop(settings.inbox, "b.jsonl", [{"prompt": "y"}])
    drain(d)
    assert final_state(settings.outbox, "b") == "completed"


def test_the_webhook_is_signed_and_redelivered_with_the_same_id(spool_config, tmp_path,
                                                                  receiver):
    receiver.codes = [500, 503]
    settings, d = make(spool_config, tmp_path,
                       f'webhook_url = "{receiver.url}"\nwebhook_secret_file = "secret"\n'
                       "webhook_backoff_seconds = 0.05\n")
    drop(settings.inbox, "a.jsonl", [{"prompt": "x"}])
    drain(d)
    hooks = Hooks(settings)
    hooks.start()
    try:
        wait_for(lambda: hooks.delivered == 1, 30, what="the webhook delivered")
    finally:
        hooks.stop()
    assert len(receiver.got) == 3
    ids = {headers["webhook-id"] for headers, _ in receiver.got}
    assert len(ids) == 1 and next(iter(ids)).startswith("msg_")
    headers, body = receiver.got[-1]
    event = Webhook(SECRET).verify(body, headers)  # the receiver's own library
    assert event["type"] == "batch.completed" and event["object"] == "event"
    assert event["data"] == {"id": "a"} and event["id"].startswith("evt_")
    assert isinstance(event["created_at"], int)
    assert events.pending(settings) == []


def test_a_receiver_that_fails_forever_is_given_up_after_the_deadline(spool_config, tmp_path,
                                                                     receiver):
    receiver.codes = [500] * 1000
    settings, d = make(spool_config, tmp_path,
                       f'webhook_url = "{receiver.url}"\nwebhook_secret_file = "secret"\n'
                       "webhook_backoff_seconds = 0.05\nwebhook_deadline_seconds = 0.5\n")
    drop(settings.inbox, "a.jsonl", [{"prompt": "x"}])
    (settings.inbox / "b.cancel").write_text("")
    drop(settings.inbox, "b.jsonl", [{"prompt": "x"}])
    drain(d)
    hooks = Hooks(settings)
    hooks.start()
    try:
        wait_for(lambda: hooks.failed == 2, 30, what="both webhooks given up")
    finally:
        hooks.stop()
    types = {json.loads(body)["type"] for _, body in receiver.got}
    assert types == {"batch.completed", "batch.cancelled"}
    assert events.pending(settings) == []


def test_webhook_urls_come_from_config_only(spool_config, tmp_path):
    from batchd.config import ConfigError
    with pytest.raises(ConfigError, match="webhook_url"):
        load_settings(spool_config('[hooks]\nwebhook_url = "file:///etc/passwd"\n'
                                   'webhook_secret_file = "s"\n'))
    with pytest.raises(ConfigError, match="secret"):
        load_settings(spool_config('[hooks]\nwebhook_url = "https://example.com/h"\n'))
    (tmp_path / "x.toml").write_text('webhook_url = "http://example.com"\n')
    from batchd.jobs.router import JobRejected, read_sidecar
    with pytest.raises(JobRejected):
        read_sidecar(tmp_path / "x.toml")  # a sidecar cannot name a URL


def test_a_hook_a_dead_daemon_left_running_is_not_started_again(spool_config, tmp_path):
    import subprocess
    log = tmp_path / "hook.log"
    settings, d = make(spool_config, tmp_path,
                       f"on_final = {json.dumps([sys.executable, '-c', HOOK, str(log)])}\n")
    drop(settings.inbox, "a.jsonl", [{"prompt": "x"}])
    drain(d)
    [path] = events.pending(settings)
    left = subprocess.Popen(["sleep", "60"])  # the hook the killed daemon had started
    doc = events.load(path)
    events.save(path, {**doc, "hook": "running", "hook_pid": left.pid,
                       "hook_started": psutil.Process(left.pid).create_time()})
    try:
        Hooks(settings).run_due(0.0)
        assert events.load(path)["hook"] == "running" and not log.exists()
    finally:
        left.kill()
        left.wait()
    Hooks(settings).run_due(0.0)
    assert not log.exists() and events.pending(settings) == []  # it ran once: done
