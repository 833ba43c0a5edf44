"""The command line, as a user runs it (subprocesses of the installed `batchd`)."""

import json
import subprocess

import pytest

from conftest import BATCHD, FAKE_BATCHD, read_jsonl


def batchd(*args, config=None, env=None, fake=False):
    cmd = [*(FAKE_BATCHD if fake else [BATCHD]), *args]
    cmd += ["--config", str(config)] if config else []
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_submit_is_atomic_and_never_overwrites(spool_config, tmp_path):
    config = spool_config()
    src = tmp_path / "mine.jsonl"
    src.write_text('{"prompt": "x"}\n')
    first = batchd("submit", str(src), "--profile", "other", config=config)
    assert first.returncode == 0 and first.stdout.strip() == "mine"
    second = batchd("submit", str(src), config=config)
    assert second.stdout.strip() == "mine-2"
    inbox = tmp_path / "spool" / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == ["mine-2.jsonl", "mine.jsonl", "mine.toml"]
    assert 'profile = "other"' in (inbox / "mine.toml").read_text()
    bad = batchd("submit", str(src), "--profile", "nope", config=config)
    assert bad.returncode == 2 and "unknown profile 'nope'" in bad.stderr


def test_validate_reports_file_line_and_field(spool_config, tmp_path):
    config = spool_config()
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "x"}\n\n{"messages": [{"role": "user", "content": "y"}]}\n')
    out = batchd("validate", str(good), config=config)
    assert out.returncode == 0 and "2 requests, 2 valid, 0 invalid; profile tiny" in out.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "max_tokens": "many"}\n{oops\n')
    out = batchd("validate", str(bad), config=config)
    assert out.returncode == 1
    assert "bad.jsonl line 1: invalid_request: max_tokens:" in out.stdout
    assert "bad.jsonl line 2: invalid_json_line" in out.stdout


def test_bad_config_and_usage_exit_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[watch]\nmode = \"sometimes\"\n")
    out = batchd("status", config=config)
    assert out.returncode == 2 and "watch.mode" in out.stderr and len(out.stderr.splitlines()) == 1
    config.write_text("[spool]\nroot = ")
    assert batchd("status", config=config).returncode == 2
    assert batchd("status", config=tmp_path / "missing.toml").returncode == 2
    assert batchd("frobnicate").returncode == 2


def test_a_config_naming_a_retired_key_starts_with_a_warning(spool_config, tmp_path,
                                                             monkeypatch):
    """[scheduling] part_lines (jobs cut in parts over the spool) is retired: an
    old config naming it, in the file or the environment, still runs, and the
    daemon says at start what replaced it (CONTRACT 18: [engine] replicas)."""
    import os
    config = spool_config("[scheduling]\npart_lines = 10000\n")
    src = tmp_path / "r.jsonl"
    src.write_text('{"prompt": "x"}\n' * 3)
    assert batchd("submit", str(src), config=config).returncode == 0
    out = batchd("run", "--once", config=config, env={**os.environ}, fake=True)
    assert out.returncode == 0, out.stderr
    (warning,) = [json.loads(line) for line in out.stderr.splitlines()
                  if '"config_key_retired"' in line]
    assert warning["level"] == "warning" and warning["key"] == "scheduling.part_lines"
    assert "[engine] replicas" in warning["instead"]
    assert read_jsonl(tmp_path / "spool" / "outbox" / "r.status.jsonl")[-1]["state"] == \
        "completed"

    from batchd.config import load_settings
    assert load_settings(spool_config()).retired() == {}  # a config without it: no warning
    monkeypatch.setenv("BATCHD_SCHEDULING__PART_LINES", "0")
    assert list(load_settings(spool_config()).retired()) == ["scheduling.part_lines"]


def test_env_overrides_config(spool_config, tmp_path):
    import os
    config = spool_config()
    env = {**os.environ, "BATCHD_SPOOL__ROOT": str(tmp_path / "elsewhere")}
    src = tmp_path / "e.jsonl"
    src.write_text('{"prompt": "x"}\n')
    assert batchd("submit", str(src), config=config, env=env).returncode == 0
    assert (tmp_path / "elsewhere" / "inbox" / "e.jsonl").exists()


def test_profiles_list_and_show(spool_config):
    config = spool_config()
    out = batchd("profiles", config=config)
    assert out.returncode == 0
    assert "tiny" in out.stdout and "trust_remote_code=false" in out.stdout
    show = batchd("profiles", "show", "tiny", config=config)
    assert 'model = "batchd/tiny-llama"' in show.stdout and "max_model_len = 512" in show.stdout
    assert batchd("profiles", "show", "zzz", config=config).returncode == 2


def test_init_and_status_table(tmp_path):
    out = batchd("init", str(tmp_path / "site"))
    assert out.returncode == 0
    for folder in ("inbox", "work", "outbox", "failed"):
        assert (tmp_path / "site" / "spool" / folder).is_dir()
    config = tmp_path / "site" / "config.toml"
    outbox = tmp_path / "site" / "spool" / "outbox"
    (outbox / "j.status.jsonl").write_text(json.dumps(
        {"ts": "2026-01-01T00:00:00.000Z", "job": "j", "state": "completed",
         "profile": "p", "request_counts": {"total": 3, "completed": 2, "failed": 1}}) + "\n")
    table = batchd("status", config=config)
    assert "completed" in table.stdout and "3/3" in table.stdout
    rows = json.loads(batchd("status", "--json", config=config).stdout)
    assert rows[0]["job"] == "j" and rows[0]["total"] == 3
    one = json.loads(batchd("status", "j", "--json", config=config).stdout)
    assert one["state"] == "completed"
    assert batchd("status", "nope", config=config).returncode == 2


def test_run_once_with_fake_engine(spool_config, tmp_path):
    """`batchd run --once` as a process drains the spool and exits 0."""
    import os
    config = spool_config()
    src = tmp_path / "f.jsonl"
    src.write_text('{"prompt": "x"}\n' * 3)
    assert batchd("submit", str(src), config=config).returncode == 0
    out = batchd("run", "--once", config=config, env={**os.environ}, fake=True)
    assert out.returncode == 0, out.stderr
    status = read_jsonl(tmp_path / "spool" / "outbox" / "f.status.jsonl")
    assert status[-1]["state"] == "completed"
    assert status[-1]["request_counts"]["completed"] == 3
    # a file whose lines name a model no profile serves: its status says what routing did
    src = tmp_path / "g.jsonl"
    src.write_text('{"model": "gpt-4o-mini", "prompt": "x"}\n' * 2)
    assert batchd("submit", str(src), config=config).returncode == 0
    assert batchd("run", "--once", config=config, fake=True).returncode == 0
    said = [s.get("message") for s in read_jsonl(tmp_path / "spool" / "outbox" / "g.status.jsonl")]
    assert "routed: gpt-4o-mini \N{RIGHTWARDS ARROW} tiny (default: no profile serves " \
        "gpt-4o-mini)" in said, said


@pytest.mark.slow  # a few seconds of subprocesses: make test, not make check
def test_bench_report_table_and_plot(spool_config, tmp_path):
    import os
    config = spool_config()
    src = tmp_path / "b.jsonl"
    src.write_text('{"prompt": "x"}\n' * 4)
    assert batchd("submit", str(src), config=config).returncode == 0
    assert batchd("run", "--once", config=config, env={**os.environ}, fake=True).returncode == 0
    png = tmp_path / "report.png"
    out = batchd("bench", "report", "--plot", str(png), config=config)
    assert out.returncode == 0, out.stderr
    assert "tiny" in out.stdout and "OUT TOK/S" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_check_fit_table():
    from conftest import ROOT
    out = batchd("profiles", "check", "--fit-only", config=ROOT / "config.toml")
    assert out.returncode == 0, out.stdout
    assert "SERVER OPTIONS" not in out.stdout  # vLLM not asked (tests/test_vllm_contract.py)
    for name in ("gemma3-4b", "gemma3-12b", "llama3.2-1b", "llama3.2-3b", "qwen3-4b",
                 "qwen3-8b", "olmo2-1b", "smollm2-135m"):
        line = next(l for l in out.stdout.splitlines() if l.startswith(name + " "))
        assert line.endswith("yes"), line
    small = batchd("profiles", "check", "qwen3-8b", "--vram", "8GiB", "--fit-only",
                   config=ROOT / "config.toml")
    assert small.returncode == 1 and small.stdout.strip().endswith("NO")
    lots = batchd("profiles", "check", "--vram", "lots", "--fit-only",
                  config=ROOT / "config.toml")
    assert lots.returncode == 2


def test_status_follow_until_the_job_ends(spool_config, tmp_path, daemons):
    """Two jobs held running by the fake engine until the spool's follower has
    shown both at once; then it follows them until none is left, and the job's
    follower ends with its final line. At any speed of the machine."""
    import os
    from conftest import drop, wait_for
    from batchd.spool.outbox import read_status
    config = spool_config()
    hold = tmp_path / "hold"
    hold.touch()
    daemon = daemons(config, env={"BATCHD_FAKE_HOLD": str(hold)}, fake=True)
    daemon.wait_ready()
    outbox = tmp_path / "spool" / "outbox"
    drop(tmp_path / "spool" / "inbox", "watched.jsonl", [{"prompt": "x"}] * 200)
    drop(tmp_path / "spool" / "inbox", "beside.jsonl", [{"prompt": "y"}] * 100)

    def running(job):
        return any(r.get("phase") == "generating" for r in read_status(
            outbox / f"{job}.status.jsonl"))

    wait_for(lambda: running("watched") and running("beside"), 30, what="both jobs running")
    spool = subprocess.Popen([BATCHD, "status", "--follow", "--json", "--config", str(config)],
                             stdout=subprocess.PIPE, text=True)
    follow = subprocess.Popen([BATCHD, "status", "watched", "--follow", "--json", "--config",
                               str(config)], stdout=subprocess.PIPE, text=True)
    first = json.loads(spool.stdout.readline())  # the spool as it is: both held running
    assert {j["job"] for j in first["jobs"] if j["state"] == "in_progress"} == \
        {"watched", "beside"}
    hold.unlink()
    # the whole spool, followed until no job is left
    frames = [first] + [json.loads(l) for l in spool.communicate(timeout=60)[0].splitlines()]
    assert spool.returncode == 0 and frames[-1]["jobs"] == []
    records = [json.loads(l) for l in follow.communicate(timeout=60)[0].splitlines()]
    assert follow.returncode == 0
    assert records[-1]["state"] == "completed"
    assert any(r["state"] == "in_progress" for r in records)
    live = subprocess.run([BATCHD, "status", "watched", "--follow", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert live.returncode == 0 and "watched: completed" in live.stdout
    assert any(e.get("event") == "job_state" and e.get("state") == "in_progress"
               for e in daemon.logs())


@pytest.mark.slow  # a few seconds of subprocesses: make test, not make check
def test_failed_lines_show_wherever_progress_does(spool_config, tmp_path):
    """A job whose every line failed never reads as a plain success: the table's
    DONE/TOTAL and state, one job's line and `--follow`'s last line count the
    failed lines apart from the answered ones and say where they are."""
    import os
    config = spool_config()
    (tmp_path / "allbad.jsonl").write_text('{oops\n{"prompt": "x", "max_tokens": "many"}\n')
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    (tmp_path / "fine.jsonl").write_text('{"prompt": "x"}\n')
    for name in ("allbad", "mixed", "fine"):
        assert batchd("submit", str(tmp_path / f"{name}.jsonl"), config=config).returncode == 0
    assert batchd("run", "--once", config=config, env={**os.environ}, fake=True).returncode == 0
    table = {line.split()[0]: line for line in batchd("status", config=config).stdout.splitlines()
             if line.strip()}
    assert "completed (all failed)" in table["allbad"] and "2/2, 2 failed" in table["allbad"]
    assert "2/2, 1 failed" in table["mixed"] and "(all failed)" not in table["mixed"]
    assert "1/1" in table["fine"] and "failed" not in table["fine"]
    one = batchd("status", "allbad", config=config).stdout
    assert "completed (all failed)" in one and "0 answered, 2 failed" in one
    end = batchd("status", "allbad", "--follow", config=config)
    assert end.stdout.splitlines()[-1] == \
        "allbad: completed: 0 answered, 2 failed \N{EM DASH} see allbad.errors.jsonl"
    assert "0/None" not in end.stdout
    end = batchd("status", "fine", "--follow", config=config)
    assert end.returncode == 0 and end.stdout.splitlines()[-1] == \
        "fine: completed: 1 answered, 0 failed"


def test_submit_brings_the_media_folder_beside_the_file(spool_config, tmp_path):
    """`batchd submit photos.jsonl` copies photos.media/ in first, as users are told
    to drop it, so the lines' pictures are there when the file is claimed."""
    import io
    import os
    from PIL import Image
    config = spool_config()
    (tmp_path / "photos.media").mkdir()
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(picture, format="PNG")
    (tmp_path / "photos.media" / "red.png").write_bytes(picture.getvalue())
    line = {"custom_id": "red", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "colour?"},
        {"type": "image_url", "image_url": {"url": "red.png"}}]}]}
    (tmp_path / "photos.jsonl").write_text(json.dumps(line) + "\n")
    assert batchd("validate", str(tmp_path / "photos.jsonl"), config=config).returncode == 0
    out = batchd("submit", str(tmp_path / "photos.jsonl"), config=config)
    assert out.returncode == 0 and out.stdout == "photos\n"
    assert "photos.media/: 1 files copied" in out.stderr
    inbox = tmp_path / "spool" / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == ["photos.jsonl", "photos.media"]
    assert (inbox / "photos.media" / "red.png").read_bytes() == picture.getvalue()
    assert batchd("run", "--once", config=config, env={**os.environ}, fake=True).returncode == 0
    outbox = tmp_path / "spool" / "outbox"
    assert [r["custom_id"] for r in read_jsonl(outbox / "photos.results.jsonl")] == ["red"]
    assert read_jsonl(outbox / "photos.errors.jsonl") == []
    assert (outbox / "photos.media" / "red.png").exists()
    assert "media folder" in batchd("submit", "--help").stdout


def test_run_in_a_terminal_keeps_the_engines_chatter_in_a_log_file(spool_config, tmp_path):
    """`batchd run` whose stdout is a terminal sends the engines' own output to
    SPOOL/logs/engine-HOST.log and says so once; --verbose, or no terminal
    (systemd's journal), keeps it on stdout."""
    import os
    import pty
    import socket
    config = spool_config()
    for args, sent in (((), True), (("--verbose",), False)):
        leader, follower = pty.openpty()
        log = tmp_path / "stderr.log"
        with open(log, "wb") as stderr:
            code = subprocess.run([*FAKE_BATCHD, "run", "--once", "--config", str(config),
                                   *args], stdout=follower, stderr=stderr, timeout=120,
                                  env={**os.environ}).returncode
        os.close(follower)
        os.close(leader)
        assert code == 0, log.read_text()
        events = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
        told = [e for e in events if e.get("event") == "engine_output"]
        expected = tmp_path / "spool" / "logs" / f"engine-{socket.gethostname()}.log"
        assert [e["to"] for e in told] == ([str(expected)] if sent else [])


def test_the_engines_output_goes_where_the_command_line_sent_it(tmp_path, capfdbinary):
    """The relay of an engine process's output (engine/processes.py's Output) writes
    to the log file once one is set, keeping the last lines for a failed load's cause."""
    import sys
    from batchd.engine.processes import Output
    from batchd.logs import engine_output_to
    target = tmp_path / "logs" / "engine.log"
    engine_output_to(target)
    try:
        proc = subprocess.Popen([sys.executable, "-c", "print('WARNING torch chatter')"],
                                stdout=subprocess.PIPE)
        relay = Output(proc.stdout)
        relay.thread.join(30)
        proc.wait(30)
    finally:
        engine_output_to(None)
    assert target.read_text() == "WARNING torch chatter\n"
    assert list(relay.lines) == ["WARNING torch chatter"]
    assert b"chatter" not in capfdbinary.readouterr().out


def test_messages_for_people_unknown_keys_and_bad_json(spool_config, tmp_path):
    """An unknown config key is called unknown, with the nearest valid key and
    where it came from (the file, or the environment variable); a bad JSON
    line's message has one line number and a plain reason."""
    import os
    config = spool_config("[scheduling]\nmax_wait_secnds = 5\n")
    out = batchd("status", config=config)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"batchd: {config}: unknown key scheduling.max_wait_secnds "
                                 "(did you mean scheduling.max_wait_seconds?); "
                                 "[scheduling] keys: ")
    assert "part_lines" not in out.stderr  # retired: never suggested
    config = spool_config()
    env = {**os.environ, "BATCHD_SCHEDULING__MAX_WAIT_SECNDS": "5"}
    out = batchd("status", config=config, env=env)
    assert out.returncode == 2 and out.stderr.startswith(
        "batchd: environment variable BATCHD_SCHEDULING__MAX_WAIT_SECNDS: unknown key "
        "scheduling.max_wait_secnds (did you mean scheduling.max_wait_seconds?)")
    out = batchd("status", config=spool_config("[schedulng]\nmax_wait_seconds = 5\n"))
    assert "unknown key schedulng (did you mean scheduling?); sections: spool, " in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n\n{oops\n')
    out = batchd("validate", str(bad), config=spool_config())
    assert "bad.jsonl line 3: invalid_json_line: not valid JSON: expecting property name " \
        "enclosed in double quotes at character 2\n" in out.stdout


def test_help_teaches(spool_config):
    """Every argument and option is explained, in words and without source markup;
    --version names batchd and vLLM; models --help names the recipes."""
    import argparse
    from batchd.cli import build_parser
    top = batchd("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    version = batchd("--version")
    assert version.returncode == 0 and version.stdout.startswith("batchd ") \
        and "vLLM" in version.stdout
    models = batchd("models", "--help").stdout
    for recipe in ("smollm2-135m", "tiny-llama", "tiny-vision"):
        assert recipe in models
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"batchd {name}: {action.dest} is not explained"


def test_small_leaks(spool_config, tmp_path):
    """The published input's mode is the other outbox files' (not the dropper's
    world-readable one); a waiting file's line names no profile it does not
    have; the dashboard has an icon."""
    import os
    import stat
    config = spool_config()
    src = tmp_path / "questions.jsonl"
    src.write_text('{"prompt": "x"}\n')
    assert batchd("submit", str(src), config=config).returncode == 0
    dropped = tmp_path / "spool" / "inbox" / "questions.jsonl"
    dropped.chmod(0o644)
    waiting = batchd("status", "questions", config=config).stdout
    assert "None" not in waiting and "profile=" not in waiting
    assert batchd("run", "--once", config=config, env={**os.environ}, fake=True).returncode == 0
    outbox = tmp_path / "spool" / "outbox"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in outbox.iterdir() if p.is_file()}
    assert modes["questions.input.jsonl"] == modes["questions.results.jsonl"] == 0o640, modes


def test_dashboard_icon(settings):
    from fastapi.testclient import TestClient
    from batchd.api.app import create_app
    icon = TestClient(create_app(settings)).get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


def test_validate_says_which_profile_answers_each_model(spool_config, tmp_path):
    """validate names each model the lines ask for and the profile that answers;
    a line naming an unknown model beside a known one is invalid, as the run
    gives it model_not_found; an unknown --profile names the flag."""
    config = spool_config()
    unknown = tmp_path / "gpt.jsonl"
    unknown.write_text('{"model": "gpt-4o-mini", "prompt": "x"}\n' * 2)
    out = batchd("validate", str(unknown), config=config)
    assert out.returncode == 0, out.stdout
    assert "gpt.jsonl: model gpt-4o-mini \N{RIGHTWARDS ARROW} tiny (default: no profile " \
        "serves gpt-4o-mini)" in out.stdout
    assert "2 requests, 2 valid, 0 invalid; profile tiny (default)" in out.stdout
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"model": "tiny", "prompt": "x"}\n{"model": "gpt-4o-mini", "prompt": "y"}\n')
    out = batchd("validate", str(mixed), config=config)
    assert out.returncode == 1
    assert "mixed.jsonl line 2: model_not_found: no profile serves model 'gpt-4o-mini'" \
        in out.stdout
    assert "mixed.jsonl: model tiny \N{RIGHTWARDS ARROW} tiny" in out.stdout
    assert "2 requests, 1 valid, 1 invalid" in out.stdout
    flag = batchd("validate", str(mixed), "--profile", "gpt-4o-mini", config=config)
    assert flag.returncode == 2 and flag.stderr.startswith("batchd: --profile: unknown profile")
    assert "sidecar" not in flag.stderr


@pytest.mark.vllm
def test_models_prepare_copies_what_the_checkout_built(tiny_model, tmp_path):
    """A new spool's `models prepare` copies the recipe's model the checkout
    already built (same recipe version) instead of building it again."""
    config = tmp_path / "config.toml"
    config.write_text(f'[routing]\nmodels_dir = "{tmp_path / "models"}"\n')
    done = subprocess.run([BATCHD, "models", "prepare", "tiny-llama", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model_copying" in done.stdout + done.stderr
    copied = tmp_path / "models" / "tiny-llama"
    assert done.stdout.strip().endswith(str(copied))
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
