"""Model swaps free everything: each loaded model lives in an engine process of
its own, which exits on a profile switch and after engine.idle_unload_seconds.

Two different real models (the tiny random Llama and SmolLM2-135M) alternate
for six swaps on one daemon. Memory is compared like for like: the resident
memory of the whole batchd process tree with a model loaded after its last swap
against the same model after its first swap, and the daemon process alone
(which never holds a model) after the last swap against after the first.
"""

import psutil
import pytest

from conftest import DaemonProcess, TINY_PROFILE, drop, final_state, read_jsonl, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The same engine settings with the other model.
SMOL_PROFILE = TINY_PROFILE.replace('aliases = ["tiny"]', 'aliases = ["smol"]').replace(
    'model = "batchd/tiny-llama"\nrecipe = "tiny-llama"',
    'model = "HuggingFaceTB/SmolLM2-135M-Instruct"\nrecipe = "smollm2-135m"')

IDLE_UNLOAD = 6  # seconds; well above the gap between one job's end and the next drop


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


def test_six_swaps_free_memory_and_idle_unload_ends_the_engine(
        tiny_model, smollm2, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "tiny.toml").write_text(TINY_PROFILE)
    (profiles / "smol.toml").write_text(SMOL_PROFILE)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
        f'default_profile = "tiny"\nmodels_dir = "{tiny_model.parent}"\n'
        f'[watch]\nsettle_seconds = 0.2\n[engine]\nidle_unload_seconds = {IDLE_UNLOAD}\n')
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        order = ["tiny", "smol"] * 3 + ["tiny"]  # 7 loads: 6 swaps
        seen = []  # (profile, daemon rss, tree rss, engine processes)
        for i, profile in enumerate(order):
            job = f"{profile}__swap{i}"
            drop(inbox, f"{job}.jsonl", [
                {"custom_id": f"a{i}", "messages": [{"role": "user", "content": "Hi"}],
                 "max_tokens": 4},
                {"custom_id": f"b{i}", "prompt": "The sky is", "max_tokens": 4}])
            assert wait_for(lambda job=job: final_state(outbox, job), 600,
                            what=f"{job}") == "completed", daemon.log.read_text()[-3000:]
            assert len(read_jsonl(outbox / f"{job}.results.jsonl")) == 2
            me, children = tree(daemon.proc.pid)
            seen.append((profile, me.memory_info().rss, rss([me, *children]), children))
            if i:
                # The model before this one is gone, with every process it had.
                _, alive = psutil.wait_procs(seen[i - 1][3], timeout=60)
                assert alive == [], [p.cmdline() for p in alive]
                assert not {p.pid for p in seen[i - 1][3]} & {p.pid for p in children}
        for profile, own, total, children in seen:
            print(f"{profile}: daemon {own / 2**20:.1f} MiB, all batchd processes "
                  f"{total / 2**20:.1f} MiB in {1 + len(children)} processes")
        assert seen[6][1] <= 1.10 * seen[1][1], "the daemon itself grew across swaps"
        for first, last in ((1, 5), (2, 6)):  # each model after its first and last swap
            assert seen[first][0] == seen[last][0]
            assert abs(seen[last][2] - seen[first][2]) <= 0.10 * seen[first][2], \
                (seen[first][0], seen[first][2], seen[last][2])

        # Idle: the engine process exits, the daemon stays and says why.
        wait_for(lambda: any(e.get("event") == "engine_idle_unloaded" for e in daemon.logs()),
                 IDLE_UNLOAD + 60, what="idle unload")
        _, alive = psutil.wait_procs(seen[-1][3], timeout=60)
        assert alive == []
        assert tree(daemon.proc.pid)[1] == []
        drop(inbox, "again.jsonl", [{"prompt": "Hello", "max_tokens": 2}])
        assert wait_for(lambda: final_state(outbox, "again"), 600, what="reload") == "completed"
        last = tree(daemon.proc.pid)[1]
        assert last  # loaded again for the new job
        assert daemon.stop() == 0
        _, alive = psutil.wait_procs(last, timeout=60)
        assert alive == []  # nothing outlives the daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.kill_tree()
    loads = [e for e in daemon.logs() if e.get("event") == "engine_loaded"]
    assert [e["profile"] for e in loads] == order + ["tiny"]
