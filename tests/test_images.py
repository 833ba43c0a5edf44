"""Images in batch lines, the plumbing (fast: the fake engine): a job's media
folder is claimed with its file, its paths are checked (nothing outside the
folder is read), sent to the engine as file:// URLs under work/media/, counted
in the bench record, keyed by their bytes in the result cache, kept in outbox/
(or removed), and retried with the job. tests/test_vllm_images.py runs real vLLM."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from batchd.config import load_settings
from batchd.jobs import images
from batchd.jobs.retry import drop_retry
from batchd.lines import Request
from batchd.profiles import MediaOptions
from batchd.spool import media
from batchd.testing import FakeEngine

from conftest import drain, drop, final_state, in_process, outputs, read_jsonl

# the daemons' wall clock, a minute ahead: a media folder written just now has
# settled already (its mtimes are compared with it), without sleeping for it
def LATER():
    return time.time() + 60.0


def png(color=(255, 0, 0), size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def chat(custom_id: str, *urls: str, text: str = "what is it?") -> dict:
    content = [{"type": "text", "text": text},
               *({"type": "image_url", "image_url": {"url": u}} for u in urls)]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], "temperature": 0}}


def request(line: dict, number: int = 1) -> Request:
    return Request(number, line["custom_id"], line["url"], line["body"])


@pytest.fixture
def folder(tmp_path) -> Path:
    """A media folder with pictures, a subfolder, a non-image and ways out."""
    root = tmp_path / "pics.media"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(png())
    (root / "sub" / "dog.png").write_bytes(png((0, 255, 0)))
    (root / "notes.png").write_text("not a picture")
    (tmp_path / "secret.png").write_bytes(png((0, 0, 255)))
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "in.png").symlink_to(root / "cat.png")
    return root


def test_paths_stay_in_the_media_folder_and_name_the_line(folder):
    assert images.resolve(folder, "cat.png") == folder / "cat.png"
    assert images.resolve(folder, "sub/dog.png") == folder / "sub" / "dog.png"
    assert images.resolve(folder, "in.png") == folder / "cat.png"  # a link inside: fine
    refused = {
        "../secret.png": "leaves the media folder (..)",
        "sub/../../secret.png": "leaves the media folder (..)",
        str(folder / "cat.png"): "is an absolute path",
        "out.png": "symbolic link out of the media folder",
        "gone.png": "is not in the media folder",
        "notes.png": "is not an image",
        "sub": "is not a regular file",
    }
    for path, why in refused.items():
        found = images.resolve(folder, path)
        assert isinstance(found, str) and why in found, (path, found)
        error = images.check(request(chat("x", path), 7), folder)
        assert error is not None and error.code == "invalid_image"
        assert error.message.startswith("line 7: ") and repr(path) in error.message
        assert error.param == "messages.0.content.1.image_url.url"
    assert images.check(request(chat("x", "cat.png", "sub/dog.png")), folder) is None
    no_folder = images.check(request(chat("x", "cat.png")), None)
    assert no_folder is not None and "no media folder" in no_folder.message


def test_what_goes_to_the_engine(folder):
    none = MediaOptions()
    data = "data:image/png;base64," + base64.b64encode(png()).decode()
    sent = images.for_engine(request(chat("x", "cat.png", data, "sub/dog.png")), folder,
                             none, [])
    assert isinstance(sent, Request)
    urls = [ref.url for ref in images.refs(sent.body)]
    assert urls == [(folder / "cat.png").as_uri(), data, (folder / "sub/dog.png").as_uri()]
    for url, words in (("http://example.com/a.png", "allowed_domains"),
                       ("file:///etc/passwd", "file:// URLs are not read"),
                       ("ftp://example.com/a.png", "not a data:")):
        error = images.for_engine(request(chat("x", url)), folder, none, [])
        assert not isinstance(error, Request) and error.code == "invalid_image", url
        assert words in error.message
    allowed = images.for_engine(request(chat("x", "https://images.example/a.png")), folder,
                                none, ["images.example"])
    assert isinstance(allowed, Request)
    # a profile with its own local_folder: file:// URLs are vLLM's to check there,
    # media-folder paths are not read
    own = MediaOptions(local_folder="/srv/pictures")
    assert isinstance(images.for_engine(request(chat("x", "file:///srv/pictures/a.png")),
                                        folder, own, []), Request)
    assert not isinstance(images.for_engine(request(chat("x", "cat.png")), folder, own, []),
                          Request)
    # Anthropic's blocks: base64 is counted and passes, a URL source is checked
    block = {"custom_id": "a", "params": {"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}},
            {"type": "image", "source": {"type": "url", "url": "sub/dog.png"}}]}]}}
    item = Request(1, "a", "/v1/messages", block["params"], anthropic=True)
    assert images.count(item.body) == 2
    sent = images.for_engine(item, folder, none, [])
    assert isinstance(sent, Request)
    assert sent.body["messages"][0]["content"][1]["source"]["url"] == \
        (folder / "sub/dog.png").as_uri()
    assert item.body["messages"][0]["content"][1]["source"]["url"] == "sub/dog.png"


def test_pictures_vllm_would_find_anywhere_in_a_line_are_checked(folder):
    """Parts without a type, Anthropic tool results, audio by file://, a uuid
    (vLLM's cache key, shared across jobs), a NUL byte: refused or checked, never
    passed through."""
    none = MediaOptions()
    other = (folder.parent / "OTHER.png")
    other.write_bytes(png())
    typeless = {"custom_id": "t", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "content": [{"image_url": "sub/dog.png"}]}]}}
    sent = images.for_engine(request(typeless), folder, none, [])
    assert isinstance(sent, Request)
    assert sent.body["messages"][0]["content"][0]["image_url"] == \
        (folder / "sub/dog.png").as_uri()
    refused = {
        "typeless file": {"messages": [{"role": "user", "content": [
            {"image_url": other.as_uri()}]}]},
        "tool result": {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "url", "url": other.as_uri()}}]}]}]},
        "audio": {"messages": [{"role": "user", "content": [
            {"type": "audio_url", "audio_url": {"url": " FILE:///etc/passwd"}}]}]},
        "uuid": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "cat.png"}, "uuid": "shared"}]}]},
        "nul": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "a\x00.png"}}]}]},
        "surrogate": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "\ud800.png"}}]}]},
    }
    for what, body in refused.items():
        item = Request(3, what, "/v1/chat/completions", body)
        error = images.for_engine(item, folder, none, [])
        assert not isinstance(error, Request) and error.code == "invalid_image", what
        assert error.message.startswith("line 3: "), (what, error.message)
    at_validation = images.check(Request(3, "n", "/v1/chat/completions", refused["nul"]),
                                 folder)
    assert at_validation is not None and "not a valid file name" in at_validation.message


def test_the_cache_keys_a_picture_by_its_bytes(folder):
    (folder / "copy.png").write_bytes((folder / "cat.png").read_bytes())
    key = {name: images.cache_body(images.for_engine(request(chat("x", name)), folder,
                                                     MediaOptions(), []).body, folder)
           for name in ("cat.png", "copy.png", "sub/dog.png")}
    assert key["cat.png"] == key["copy.png"] != key["sub/dog.png"]
    assert "sha256:" in json.dumps(key["cat.png"]) and "cat.png" not in json.dumps(key["cat.png"])


def test_a_media_folder_still_being_written_holds_its_file(tmp_path):
    root = tmp_path / "x.media"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.png").write_bytes(png())
    now = time.time()
    assert media.pending(root, now, 1.0) is not None  # just written
    assert media.pending(root, now + 5, 1.0) is None
    (root / "a" / ".two.png.Xy12Ab").write_bytes(b"half")  # rsync's temp file
    assert media.pending(root, now + 5, 1.0) is not None
    assert media.pending(tmp_path / "none.media", now, 1.0) is None
    os.unlink(root / "a" / ".two.png.Xy12Ab")
    for name in (".DS_Store", "._one.png", ".gitkeep"):  # what desktops leave: no transfer
        (root / name).write_bytes(b"x")
    assert media.pending(root, time.time() + 5, 1.0) is None
    (root / "a" / ".three.png.Qw34Er").write_bytes(b"half")
    assert media.pending(root, time.time() + 5, 1.0) is not None
    assert media.pending(root, time.time() + media.ABANDONED_SECONDS + 5, 1.0) is None
    (root / "a").chmod(0o600)  # listed but not entered: validation's to report
    try:
        assert media.pending(root, time.time() + media.ABANDONED_SECONDS + 5, 1.0) is None
    finally:
        (root / "a").chmod(0o755)


def test_a_job_with_its_media_folder_through_the_daemon(spool_config, tmp_path):
    settings = load_settings(spool_config("[cache]\nenabled = true\n"))
    sent: list[Request] = []  # what reached the engine
    d = in_process(settings, factory=lambda profile: FakeEngine(profile, per_step=64, fed=sent),
               clock=lambda: 1000.0, wall=LATER)
    inbox = settings.inbox
    pics = inbox / "pics.media"
    (pics / "sub").mkdir(parents=True)
    (pics / "cat.png").write_bytes(png())
    (pics / "sub" / "dog.png").write_bytes(png((0, 255, 0)))
    (pics / "notes.png").write_text("not a picture")
    (tmp_path / "secret.png").write_bytes(png((0, 0, 255)))
    (pics / "out.png").symlink_to(tmp_path / "secret.png")
    data = "data:image/png;base64," + base64.b64encode(png()).decode()
    lines = [chat("rel", "cat.png"), chat("two", "cat.png", "sub/dog.png"),
             chat("data", data), {"custom_id": "text", "messages": [
                 {"role": "user", "content": "no picture"}]},
             chat("dotdot", "../secret.png"), chat("abs", str(tmp_path / "secret.png")),
             chat("link", "out.png"), chat("missing", "gone.png"),
             chat("notimage", "notes.png"), chat("http", "http://example.com/x.png"),
             chat("file", (tmp_path / "secret.png").as_uri())]
    drop(inbox, "pics.jsonl", lines)
    drain(d)
    assert final_state(settings.outbox, "pics") == "completed"
    results, errors = outputs(settings.outbox, "pics")
    assert sorted(r["custom_id"] for r in results) == ["data", "rel", "text", "two"]
    by_id = {e["custom_id"]: e["response"]["body"]["error"] for e in errors}
    assert set(by_id) == {"dotdot", "abs", "link", "missing", "notimage", "http", "file"}
    for custom_id, error in by_id.items():
        assert error["code"] == "invalid_image", (custom_id, error)
        assert error["message"].startswith("line "), error
    # what reached the engine: files of work/media/pics/ as file:// URLs, nothing else local
    root = os.path.realpath(settings.layout.media("pics"))
    local = [ref.url for item in sent for ref in images.refs(item.body)
             if ref.kind == "file"]
    assert local and all(u.startswith(Path(root).as_uri() + "/") for u in local)
    assert sorted(item.custom_id for item in sent) == ["data", "rel", "text", "two"]
    # kept in outbox/, gone from the inbox and work/, counted
    kept = settings.layout.out_media("pics")
    assert (kept / "sub" / "dog.png").is_file() and not pics.exists()
    assert not settings.layout.media("pics").exists()
    bench = json.loads(settings.layout.out("pics", "bench.json").read_text())
    assert bench["images"] == 4
    # the same pictures under other names in another job: answered from the cache
    sent.clear()
    again = inbox / "again.media"
    again.mkdir()
    (again / "kitten.png").write_bytes(png())
    drop(inbox, "again.jsonl", [chat("rel", "kitten.png")])
    drain(d)
    results, _ = outputs(settings.outbox, "again")
    assert [r["custom_id"] for r in results] == ["rel"] and sent == []
    # a retry gets the job's pictures again
    name, count = drop_retry(settings, "pics", codes=("invalid_image",))
    assert count == 7 and (inbox / f"{name}.media" / "cat.png").is_file()
    assert os.stat(inbox / f"{name}.media" / "cat.png").st_ino == os.stat(kept / "cat.png").st_ino


def test_a_media_folder_can_be_removed_at_the_end(spool_config):
    settings = load_settings(spool_config("[media]\nkeep = false\n"))
    d = in_process(settings, factory=lambda profile: FakeEngine(profile, per_step=64),
               clock=lambda: 1000.0, wall=LATER)
    pics = settings.inbox / "gone.media"
    pics.mkdir()
    (pics / "a.png").write_bytes(png())
    drop(settings.inbox, "gone.jsonl", [chat("a", "a.png")])
    drain(d)
    assert [r["custom_id"] for r in read_jsonl(settings.layout.out("gone", "results.jsonl"))] \
        == ["a"]
    assert not settings.layout.out_media("gone").exists() and not pics.exists()
    assert not settings.layout.media("gone").exists()


def test_batchd_validate_checks_the_pictures_beside_the_file(tmp_path, spool_config):
    import subprocess

    from conftest import BATCHD

    folder = tmp_path / "snap.media"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    path = tmp_path / "snap.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in (chat("a", "a.png"),
                                                      chat("b", "b.png"))) + "\n")
    done = subprocess.run([BATCHD, "validate", str(path), "--config", str(spool_config())],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "snap.jsonl line 2: invalid_image: line 2: image 'b.png' is not in the media " \
        "folder" in done.stdout
    assert "2 requests, 1 valid, 1 invalid" in done.stdout


def test_a_crash_between_the_claims_renames_and_a_reused_name(spool_config, monkeypatch):
    """The daemon dies after the input reached work/ but before its media
    folder did (the job is p-2: the inbox name is p): whoever takes the job up
    moves the folder. A job name whose outbox still holds a media folder (its
    other files deleted by hand) is not given again."""
    settings = load_settings(spool_config())
    d = in_process(settings, factory=lambda profile: FakeEngine(profile, per_step=64),
               clock=lambda: 1000.0, wall=LATER)
    inbox = settings.inbox
    drop(inbox, "p.jsonl", [{"custom_id": "a", "messages": [{"role": "user", "content": "hi"}]}])
    drain(d)
    pics = inbox / "p.media"
    pics.mkdir()
    (pics / "a.png").write_bytes(png())
    drop(inbox, "p.jsonl", [chat("img", "a.png")])

    def dies(layout, job):
        raise SystemExit("killed between the renames")

    monkeypatch.setattr(media, "move", dies)
    with pytest.raises(SystemExit):
        drain(d)
    monkeypatch.undo()
    assert settings.layout.input("p-2").exists() and pics.is_dir()
    again = in_process(settings, factory=lambda profile: FakeEngine(profile, per_step=64),
                   clock=lambda: 2000.0, wall=LATER)
    drain(again)
    assert final_state(settings.outbox, "p-2") == "completed"
    results, errors = outputs(settings.outbox, "p-2")
    assert [r["custom_id"] for r in results] == ["img"] and errors == []
    assert (settings.layout.out_media("p-2") / "a.png").is_file() and not pics.exists()
    assert not settings.layout.media_pointer("p-2").exists()
    # outbox/q.media left behind by hand: the next q is q-2, its folder its own
    (settings.outbox / "q.media").mkdir()
    qpics = inbox / "q.media"
    qpics.mkdir()
    (qpics / "b.png").write_bytes(png())
    drop(inbox, "q.jsonl", [chat("b", "b.png")])
    drain(again)
    assert final_state(settings.outbox, "q-2") == "completed"
    assert (settings.layout.out_media("q-2") / "b.png").is_file()
