"""Soak: 500 hostile and good files, in random order, into one running daemon
process (fake engine: this is about the spool and the parser). At the end the
daemon is alive, every good file is answered, every bad one reported with its
code, each exactly once, and the daemon's memory did not grow with the files."""

import json
import os
import random

import psutil
import pytest

from batchd.spool.inbox import safe_stem

from conftest import final_state, read_jsonl, wait_for

pytestmark = pytest.mark.slow

N_FILES = 500
LIMITS = "[limits]\nmax_line_bytes = 65536\nmax_file_bytes = 1048576\nmax_requests = 1000\n"
GOOD = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def lines(*items: bytes) -> bytes:
    return b"".join(item + b"\n" for item in items)


# kind -> (file bytes, sidecar bytes or None, expected final state, whole-file error
# code or None, result lines, error lines)
KINDS = {
    "good": (lines(GOOD, CHAT, GOOD), None, "completed", None, 3, 0),
    "some_bad": (lines(GOOD, b"{nope", b'{"prompt": 5}', b"[" * 50_000, CHAT), None,
                 "completed", None, 2, 3),
    "crlf_bom": (b"\xef\xbb\xbf" + GOOD + b"\r\n" + CHAT + b"\r\n", None, "completed", None,
                 2, 0),
    "huge_line": (lines(GOOD, b'{"prompt": "' + b"a" * 70_000 + b'"}'), None, "completed",
                  None, 1, 1),
    "not_utf8": (lines(b"\xff\xfe\xfa", GOOD), None, "completed", None, 1, 1),
    "empty": (b"", None, "completed", None, 0, 0),
    "blank": (b"\n \n\t\n", None, "completed", None, 0, 0),
    "too_many": (lines(*[GOOD] * 1001), None, "failed", "too_many_requests", 0, 1001),
    "too_big": (lines(*[b'{"prompt": "' + b"b" * 60_000 + b'"}'] * 20), None, "failed",
                "file_too_large", 0, 0),
    "two_models": (lines(json.dumps({"model": "tiny", "prompt": "a"}).encode(),
                         json.dumps({"model": "other", "prompt": "b"}).encode(),
                         json.dumps({"model": "gpt-9", "prompt": "c"}).encode()), None,
                   "completed", None, 2, 1),
    "bad_sidecar": (lines(GOOD), b"profile = [[[", "failed", "invalid_sidecar", 0, 1),
    "escape_sidecar": (lines(GOOD), b'profile = "../../etc/x"\n', "failed",
                       "unknown_profile", 0, 1),
    "engine_sidecar": (lines(GOOD), b'[engine]\ntrust_remote_code = true\n', "failed",
                       "invalid_sidecar", 0, 1),
    "symlink": (None, None, "failed", "not_a_regular_file", 0, 0),
    "fifo": (None, None, "failed", "not_a_regular_file", 0, 0),
    "folder": (None, None, "failed", "not_a_regular_file", 0, 0),
    "hardlink": (lines(GOOD), None, "failed", "not_a_regular_file", 0, 0),
}


def place(inbox, outside, i, kind, how):
    """Drop file I of KIND; return its job name."""
    data, sidecar, *_ = KINDS[kind]
    name = f"{i:03d}-{kind}" + ("-caf\udce9" if i % 7 == 0 else "")  # some non-UTF-8 names
    path = os.fsencode(inbox / f"{name}.jsonl")
    if sidecar is not None:
        (inbox / f"{name}.toml").write_bytes(sidecar)
    if kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "hardlink":
        (outside / name).write_bytes(data)
        os.link(outside / name, path)
    elif how == "rename":
        temp = os.fsencode(inbox / f".{name}.part")
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, path)
    else:
        with open(path, "wb") as f:  # in place, as cp and SMB clients do
            f.write(data[: len(data) // 2])
            f.flush()
            f.write(data[len(data) // 2:])
    return safe_stem(f"{name}.jsonl")


def test_500_mixed_files_into_a_running_daemon(spool_config, tmp_path, daemons):
    config = spool_config(LIMITS)
    daemon = daemons(config, fake=True)
    daemon.wait_ready()
    me = psutil.Process(daemon.proc.pid)
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    outside = tmp_path / "outside"
    outside.mkdir()
    rng = random.Random(20261127)
    plan = [(i, rng.choice(list(KINDS)), rng.choice(["rename", "inplace"]))
            for i in range(N_FILES)]
    expected = {}
    rss = []
    for i, kind, how in plan:
        expected[place(inbox, outside, i, kind, how)] = kind
        if i == 99:  # the first hundred answered: the baseline
            wait_for(lambda: all(final_state(outbox, job) for job in expected), 300,
                     interval=0.2, what="the first 100 files")
            rss.append(me.memory_info().rss)
    wait_for(lambda: all(final_state(outbox, job) for job in expected), 600, interval=0.2,
             what="all 500 files")
    rss.append(me.memory_info().rss)

    assert daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
    for job, kind in expected.items():
        _, _, state, code, n_results, n_errors = KINDS[kind]
        status = read_jsonl(outbox / f"{job}.status.jsonl")
        assert status[-1]["state"] == state, (job, status[-1])
        if code:
            assert status[-1]["errors"][0]["code"] == code, (job, status[-1])
        assert len({s["daemon"] for s in status}) == 1
        assert len(read_jsonl(outbox / f"{job}.results.jsonl")) == n_results, job
        assert len(read_jsonl(outbox / f"{job}.errors.jsonl")) == n_errors, job
    assert len(list(outbox.glob("*.status.jsonl"))) == N_FILES  # nothing ran twice
    assert [p for p in inbox.iterdir()] == []
    assert list((tmp_path / "spool" / "work").iterdir()) == []
    print(f"daemon RSS after 100 files {rss[0] / 2**20:.1f} MiB, after {N_FILES}: "
          f"{rss[1] / 2**20:.1f} MiB")
    assert rss[1] <= 1.25 * rss[0]
    assert daemon.stop() == 0
