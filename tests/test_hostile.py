"""Hostile and broken input in a shared inbox: every file gets a clear answer,
the daemon keeps running, nothing is lost, nothing outside the spool is touched.

In-process on the fake engine (the plumbing is the same as with vLLM);
test_soak.py drops a mix of these into a real daemon process.
"""

import json
import os
import re
import socket
import stat
import tracemalloc

import pytest
import structlog.testing

from batchd.lines import iter_file

from conftest import drain, drop, final_state, in_process, read_jsonl

GOOD = {"prompt": "hello", "max_tokens": 3}
JOB_NAME = re.compile(r"^[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]*$")


def statuses(outbox):
    """job name -> last status record, for every job the outbox knows."""
    return {p.name[: -len(".status.jsonl")]: read_jsonl(p)[-1]
            for p in outbox.glob("*.status.jsonl")}


def code(status):
    return status["errors"][0]["code"] if status.get("errors") else None


# -- entries that are not plain files -------------------------------------------

def test_hard_link_socket_and_device_node_are_never_read(daemon, settings, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps(GOOD) + "\n")
    os.link(secret, settings.inbox / "hard.jsonl")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(settings.inbox / "sock.jsonl"))
    if os.geteuid() == 0:
        os.mknod(settings.inbox / "null.jsonl", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    drop(settings.inbox, "fine.jsonl", [GOOD])
    drain(daemon)
    listener.close()
    found = statuses(settings.outbox)
    assert found["fine"]["state"] == "completed"
    expected = {"hard", "sock"} | ({"null"} if os.geteuid() == 0 else set())
    for job in expected:
        assert found[job]["state"] == "failed"
        assert code(found[job]) == "not_a_regular_file", found[job]
    assert "hard link" in found["hard"]["message"]
    assert secret.read_text() == json.dumps(GOOD) + "\n"  # untouched, still one name
    assert os.stat(secret).st_nlink == 2  # the inbox name went to failed/, never read
    assert not (settings.outbox / "hard.results.jsonl").exists()


def test_a_hard_link_made_after_the_scan_is_refused_at_the_open(daemon, settings, tmp_path):
    """The file was plain when scanned, then got a second name: the runner's
    check on the opened descriptor refuses it."""
    drop(settings.inbox, "late.jsonl", [GOOD])
    scan = daemon.admission.candidates.settler.settled
    daemon.admission.candidates.settler.settled = lambda name, st, now: (
        os.link(settings.inbox / name, tmp_path / "other-name")
        if not (tmp_path / "other-name").exists() else None) or scan(name, st, now) or True
    drain(daemon)
    status = statuses(settings.outbox)["late"]
    assert status["state"] == "failed" and code(status) == "not_a_regular_file"


# -- names -----------------------------------------------------------------------

ODD_NAMES = [
    b"caf\xe9-latin1.jsonl",              # not UTF-8
    b"line\nbreak.jsonl",                 # a newline
    b"x" * 249 + b".jsonl",               # 255 bytes, the longest a name can be
    b"--rm -rf.jsonl",                    # leading dashes
    b"up..\\..\\windows.jsonl",           # backslashes from an SMB client
    b"a..b.jsonl",                        # dots
    "\uff52eport.jsonl".encode(),         # a fullwidth look-alike of "report"
    "r\u0435port.jsonl".encode(),         # a Cyrillic look-alike of "report"
    b"report.jsonl",
    b"a b.jsonl",                         # these two map to the same job name
    b"a_b.jsonl",
    b"$(touch pwned).jsonl",
    "\u202egnp.jsonl".encode(),           # right-to-left override
]


def test_odd_names_get_safe_distinct_job_names(daemon, settings, tmp_path):
    inbox = os.fsencode(settings.inbox)
    for name in ODD_NAMES:
        with open(os.path.join(inbox, name), "w") as f:
            f.write(json.dumps(GOOD) + "\n")
    before = sorted(os.listdir(tmp_path))
    with structlog.testing.capture_logs() as logs:
        drain(daemon)
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    found = statuses(settings.outbox)
    assert len(found) == len(ODD_NAMES)
    for job, status in found.items():
        assert status["state"] == "completed", (job, status)
        assert JOB_NAME.match(job) and len(job) <= 180, job
        assert len(read_jsonl(settings.outbox / f"{job}.results.jsonl")) == 1
    assert os.listdir(settings.inbox) == []
    assert sorted(os.listdir(tmp_path)) == before  # nothing written beside the spool
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_a_collision_never_overwrites(daemon, settings):
    drop(settings.inbox, "same.jsonl", [GOOD])
    drain(daemon)
    first = (settings.outbox / "same.results.jsonl").read_bytes()
    drop(settings.inbox, "same.jsonl", [GOOD, GOOD | {"custom_id": "second"}])
    drain(daemon)
    assert (settings.outbox / "same.results.jsonl").read_bytes() == first
    assert len(read_jsonl(settings.outbox / "same-2.results.jsonl")) == 2


# -- sidecars ----------------------------------------------------------------------

def test_sidecar_profile_path_is_a_name_never_a_path(daemon, settings):
    drop(settings.inbox, "escape.jsonl", [GOOD])
    (settings.inbox / "escape.toml").write_text('profile = "../../etc/x"\n')
    drain(daemon)
    status = statuses(settings.outbox)["escape"]
    assert status["state"] == "failed" and code(status) == "unknown_profile"


def test_a_sidecar_alone_is_never_read_and_waits_for_its_jsonl(daemon, settings):
    lone = settings.inbox / "later.toml"
    lone.write_bytes(b"\xff\x00 not toml [[[")
    assert drain(daemon) == 0
    assert lone.exists() and statuses(settings.outbox) == {}
    lone.write_text('profile = "tiny"\npriority = 1\n')  # the user fixes it, then drops
    drop(settings.inbox, "later.jsonl", [GOOD])
    drain(daemon)
    assert statuses(settings.outbox)["later"]["state"] == "completed"
    assert not lone.exists()


# -- content -----------------------------------------------------------------------

def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_broken_content_gets_one_error_per_line(daemon, settings):
    chat = {"custom_id": "ok", "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        json.dumps(chat).encode(),
        b"\xff\xfe not utf-8",
        b"[" * 100_000 + b"]" * 100_000,                       # deep nesting
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # a huge number
        b'{"prompt": "x", "max_tokens": 1e999}',                 # infinity
        b'{"prompt": "x", "temperature": NaN}',
        b'{"custom_id": 7, "prompt": "x"}',
        b'{"messages": "hi"}',
        b'{"messages": []}',
        b'{"messages": [{"role": "robot", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"prompt": ["a", 1, null]}',
        b'{"prompt": "x", "n": 100000}',
        b'{"prompt": "x", "stream": true}',
        b'{"url": "/v1/chat/completions", "body": []}',
        b'{"url": "/v1/files", "body": {}}',
        b'{"method": "DELETE", "url": "/v1/completions", "body": {"prompt": "x"}}',
        b'"just a string"',
        b"   ",                                                  # blank: skipped
        json.dumps(chat | {"custom_id": "crlf"}).encode() + b"\r",
    ]
    write_lines(settings.inbox / "broken.jsonl", lines)
    drain(daemon)
    results = read_jsonl(settings.outbox / "broken.results.jsonl")
    errors = read_jsonl(settings.outbox / "broken.errors.jsonl")
    assert sorted(r["custom_id"] for r in results) == ["crlf", "ok"]
    assert len(errors) == len(lines) - 1 - 2  # one blank, two good
    for error in errors:
        body = error["response"]["body"]["error"]
        assert body["code"] and body["message"], error
    assert final_state(settings.outbox, "broken") == "completed"


def test_a_first_line_nested_too_deeply_does_not_stop_the_loop(daemon, settings):
    """The scheduler peeks at first lines; a hostile one is the job's error."""
    write_lines(settings.inbox / "deep.jsonl", [b"[" * 70_000, json.dumps(GOOD).encode()])
    drain(daemon)
    assert final_state(settings.outbox, "deep") == "completed"
    errors = read_jsonl(settings.outbox / "deep.errors.jsonl")
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["invalid_json_line"]


def test_empty_and_blank_only_files_complete_with_nothing_to_do(daemon, settings):
    (settings.inbox / "empty.jsonl").write_bytes(b"")
    (settings.inbox / "blank.jsonl").write_bytes(b"\n  \n\r\n\t\n")
    drain(daemon)
    for job in ("empty", "blank"):
        status = statuses(settings.outbox)[job]
        assert status["state"] == "completed"
        assert status["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert read_jsonl(settings.outbox / f"{job}.results.jsonl") == []


def test_a_100_mb_line_is_one_error_in_bounded_memory(daemon, settings):
    path = settings.inbox / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        f.write(b'{"prompt": "' + b"a" * (100 * 2**20) + b'"}\n')
        f.write(json.dumps(GOOD | {"custom_id": "after"}).encode() + b"\n")
    tracemalloc.start()
    items = list(iter_file(path, settings.limits.max_line_bytes))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [type(i).__name__ for i in items] == ["Request", "LineError", "Request"]
    assert peak < 4 * settings.limits.max_line_bytes  # never the whole line
    drain(daemon)
    errors = read_jsonl(settings.outbox / "huge.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["line-2"]
    assert "over the limit" in errors[0]["response"]["body"]["error"]["message"]
    assert len(read_jsonl(settings.outbox / "huge.results.jsonl")) == 2


def test_a_file_over_max_requests_is_refused_whole(spool_config, tmp_path):
    """One line over the limit refuses the file whole (the default limit's own file,
    1,000,000 lines, runs in test_a_million_tiny_lines_run_to_the_end)."""
    from batchd.config import load_settings
    from batchd.testing import FakeEngine

    settings = load_settings(spool_config("[limits]\nmax_requests = 1000\n"))
    d = in_process(settings, factory=FakeEngine, clock=lambda: 1000.0)
    with open(settings.inbox / "over.jsonl", "wb") as f:
        f.write(b'{"prompt":"x"}\n' * 1_001)
    drain(d)
    status = statuses(settings.outbox)["over"]
    assert status["state"] == "failed" and code(status) == "too_many_requests"
    assert status["errors"][0]["line"] == 1_001
    assert (settings.failed / "over.jsonl").exists()


# -- the spool itself ------------------------------------------------------------------

def test_refuses_to_start_on_a_spool_it_cannot_write(spool_config, tmp_path):
    import subprocess

    from conftest import BATCHD

    config = spool_config()
    outbox = tmp_path / "spool" / "outbox"
    outbox.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(outbox)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        run = subprocess.run([BATCHD, "run", "--once", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(outbox)], check=True)
    assert run.returncode == 2, run.stderr
    assert "cannot write" in run.stderr and "outbox" in run.stderr


@pytest.mark.slow
def test_a_million_tiny_lines_run_to_the_end(daemon, settings):
    """The default max_requests is exactly 1,000,000: such a file runs, streamed."""
    assert settings.limits.max_requests == 1_000_000
    with open(settings.inbox / "million.jsonl", "wb") as f:
        f.write(b'{"prompt":"x","max_tokens":1}\n' * 1_000_000)
    drain(daemon)
    status = statuses(settings.outbox)["million"]
    assert status["state"] == "completed"
    assert status["request_counts"] == {"total": 1_000_000, "completed": 1_000_000,
                                        "failed": 0}
    with open(settings.outbox / "million.results.jsonl", "rb") as f:
        assert sum(1 for _ in f) == 1_000_000
