"""Files arrive the way users send them: rsync (plain, --delay-updates, --partial),
slow in-place writers, files that start empty, preallocated files. Each is
claimed exactly once, complete. The engine is the fake one: this is about the
spool; the pipeline runs on real vLLM in test_vllm_*.py."""

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from conftest import drop, final_state, read_jsonl, wait_for

SETTLE = 1.5
POLL = 0.2  # a writer stalls SETTLE / 3: over a poll, a second short of the settle time


@pytest.fixture(params=["inotify", "poll"])
def running(request, spool_config, tmp_path, daemons):
    config = spool_config()
    text = config.read_text().replace("settle_seconds = 0.3", f"settle_seconds = {SETTLE}")
    config.write_text(text.replace("[watch]\n", f'[watch]\nmode = "{request.param}"\n'))
    daemon = daemons(config, fake=True)
    daemon.wait_ready()
    daemon.spool = tmp_path / "spool"
    return daemon


def make_source(path, n=4000):
    lines = [json.dumps({"custom_id": f"{path.stem}-{i}", "prompt": "x" * 200})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def claimed_once_complete(spool, job, digest, n):
    outbox = spool / "outbox"
    assert wait_for(lambda: final_state(outbox, job), 60, what=f"{job} to end") == "completed"
    assert hashlib.sha256((outbox / f"{job}.input.jsonl").read_bytes()).hexdigest() == digest
    assert len(read_jsonl(outbox / f"{job}.results.jsonl")) == n
    assert not (outbox / f"{job}-2.status.jsonl").exists()  # claimed once


@pytest.mark.slow  # rsync is held to a slow writer on purpose: kept out of the fast tier
@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (make test installs it)")
@pytest.mark.parametrize("flags", [[], ["--delay-updates"], ["--partial"]])
def test_rsync_into_a_running_daemon(running, tmp_path, flags):
    src = tmp_path / "src"
    src.mkdir()
    digest = make_source(src / "synced.jsonl")
    # --bwlimit keeps rsync writing for a while, so the daemon sees its temp files.
    subprocess.run(["rsync", "--bwlimit=2000", *flags, str(src / "synced.jsonl"),
                    str(running.spool / "inbox") + "/"], check=True)
    claimed_once_complete(running.spool, "synced", digest, 4000)
    assert not any(e.get("event") == "job_claimed" and e.get("file", "").startswith(".")
                   for e in running.logs())


@pytest.mark.slow  # a writer that takes seconds, on purpose
def test_slow_in_place_writer(running, tmp_path):
    """Pauses longer than a poll interval, shorter than the settle time."""
    src = tmp_path / "slow.jsonl"
    digest = make_source(src, 3000)
    data = src.read_bytes()
    with open(running.spool / "inbox" / "slow.jsonl", "wb") as out:
        for i in range(0, len(data), len(data) // 4 + 1):
            out.write(data[i:i + len(data) // 4 + 1])
            out.flush()
            time.sleep(SETTLE / 3)  # a writer that stalls, as SMB copies do
    claimed_once_complete(running.spool, "slow", digest, 3000)


@pytest.mark.slow  # waits out the settle time, on purpose
def test_zero_byte_file_that_grows(running, tmp_path):
    target = running.spool / "inbox" / "grows.jsonl"
    target.touch()
    time.sleep(SETTLE / 3)
    src = tmp_path / "grows.jsonl"
    digest = make_source(src, 500)
    target.write_bytes(src.read_bytes())
    claimed_once_complete(running.spool, "grows", digest, 500)


@pytest.mark.slow  # a writer that takes seconds, on purpose
def test_preallocated_file_written_in_place(running, tmp_path):
    """Windows Explorer sets the final size first, then fills the bytes in."""
    src = tmp_path / "prealloc.jsonl"
    digest = make_source(src, 2000)
    data = src.read_bytes()
    target = running.spool / "inbox" / "prealloc.jsonl"
    with open(target, "wb") as out:
        out.truncate(len(data))
        out.flush()
        step = len(data) // 3 + 1
        for i in range(0, len(data), step):
            time.sleep(SETTLE / 3)
            out.seek(i)
            out.write(data[i:i + step])
            out.flush()
    claimed_once_complete(running.spool, "prealloc", digest, 2000)


def test_ready_marker_mode(spool_config, tmp_path, daemons):
    config = spool_config()
    config.write_text(config.read_text().replace("[watch]\n",
                                                 "[watch]\nrequire_ready_marker = true\n"))
    daemon = daemons(config, fake=True)
    daemon.wait_ready()
    inbox = tmp_path / "spool" / "inbox"
    drop(inbox, "marked.jsonl", [{"prompt": "x"}])
    time.sleep(SETTLE)  # no marker: nothing may happen, however long it waits
    assert (inbox / "marked.jsonl").exists()
    (inbox / "marked.jsonl.ready").touch()
    assert wait_for(lambda: final_state(tmp_path / "spool" / "outbox", "marked"), 30) \
        == "completed"
    assert not (inbox / "marked.jsonl.ready").exists()


def test_vanished_inbox_does_not_crash_the_daemon(running, tmp_path):
    """A share that disappears and comes back (here: the inbox folder removed and
    made again) is survived; files dropped afterwards are answered."""
    inbox = running.spool / "inbox"
    shutil.rmtree(inbox)
    wait_for(lambda: running.proc.poll() is None and not inbox.exists(), 5)
    inbox.mkdir()
    drop(inbox, "back.jsonl", [{"prompt": "x"}])
    assert wait_for(lambda: final_state(running.spool / "outbox", "back"), 30) == "completed"
    assert running.proc.poll() is None


@pytest.mark.slow  # rsync is held to a slow writer on purpose
@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (make test installs it)")
def test_one_rsync_of_a_file_and_its_media_folder(running, tmp_path):
    """`rsync -a --delay-updates src/ inbox/` sends photos.jsonl before photos.media/
    (name order), but creates the folder first and renames every file at the end:
    the file waits for the folder, and every picture is found."""
    import io

    from PIL import Image

    src = tmp_path / "src"
    (src / "photos.media").mkdir(parents=True)
    lines = []
    for i in range(30):
        out = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 8, 0, 0)).save(out, format="PNG")
        (src / "photos.media" / f"{i}.png").write_bytes(out.getvalue() + b"\0" * 20_000)
        lines.append(json.dumps({"custom_id": f"p{i}", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": f"{i}.png"}}]}]}))
    (src / "photos.jsonl").write_text("\n".join(lines) + "\n")
    subprocess.run(["rsync", "-a", "--delay-updates", "--bwlimit=300", f"{src}/",
                    str(running.spool / "inbox") + "/"], check=True)
    outbox = running.spool / "outbox"
    assert wait_for(lambda: final_state(outbox, "photos"), 60, what="photos") == "completed"
    assert len(read_jsonl(outbox / "photos.results.jsonl")) == 30
    assert read_jsonl(outbox / "photos.errors.jsonl") == []
    assert len(list((outbox / "photos.media").iterdir())) == 30
