"""Engine replicas placed by Ray, really: a local Ray cluster of two nodes on
this machine (Ray's own test utilities; a core each, all on 127.0.0.1), one
daemon driving a replica on each node. A file is dealt to both; one node is
removed mid-job (its raylet and workers killed, as when a host dies) and the
job completes on the other, every line exactly once in input order. Without
Ray installed, a daemon with `ray_address` refuses to start, naming the extra."""

import json
import os
import signal

import psutil
import pytest

from conftest import (FAKE_BATCHD, TINY_PROFILE, drop, family_chats, final_state, outputs,
                      served_spool, wait_for)

# Ray on the loopback address only (../ENVIRONMENT: else it dials the host's address)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DISABLE_USAGE_STATS": "1"}



@pytest.fixture
def cluster(monkeypatch):
    """Ray's head (no CPUs: nothing runs there) and two nodes of one core each,
    each told its core (BATCHD_ENGINE_CPUS reaches the engine process it starts)."""
    ray_cluster_utils = pytest.importorskip("ray.cluster_utils")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    cores = sorted(os.sched_getaffinity(0))[:2]
    made = ray_cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    try:
        nodes = [made.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                               env_vars={"BATCHD_ENGINE_CPUS": str(core)}) for core in cores]
        yield made, nodes, cores
    finally:
        made.shutdown()


def engine_on(core):
    """The engine process a node started (its core tells the node)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "--connect" in (proc.info["cmdline"] or []) and proc.cpu_affinity() == [core]:
                return proc
        except psutil.Error:
            continue
    return None


@pytest.mark.vllm
@pytest.mark.slow
def test_replicas_on_two_ray_nodes_survive_a_node_lost(cluster, tiny_model, tmp_path, daemons):
    # (cluster first: the daemon is stopped before the cluster is shut down)
    made, nodes, cores = cluster
    config = served_spool(
        tmp_path, tiny_model.parent, {"tiny": TINY_PROFILE},
        f'[engine]\nreplicas = "auto"\nwindow = 32\nrestart_backoff_seconds = 1\n'
        f'[cluster]\nray_address = "{made.address}"\nplace_timeout_seconds = 5\n')
    daemon = daemons(config, env=RAY_ENV)
    daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    drop(inbox, "spread.jsonl", family_chats("spread", 600))

    def replicas():
        records = [json.loads(p.read_text())
                   for p in (tmp_path / "spool" / "daemons").glob("*.json")]
        return [r for rec in records for r in rec.get("replicas", [])]

    # "auto" = what the cluster has: a replica per node, each named by its Ray node
    wait_for(lambda: len(replicas()) == 2 and min(r["requests"] for r in replicas()) > 0,
             300, what="answers from both Ray nodes")
    wheres = [r["where"] for r in replicas()]
    assert all(" ray:" in w for w in wheres) and len(set(wheres)) == 2, wheres
    victim, other = engine_on(cores[1]), engine_on(cores[0])
    assert victim is not None and other is not None
    # the other node's engine stopped meanwhile: the job cannot end before the loss is seen
    os.killpg(other.pid, signal.SIGSTOP)
    try:
        made.remove_node(nodes[1], allow_graceful=False)  # its raylet and workers killed
        wait_for(lambda: any(e.get("event") == "replica_died" for e in daemon.logs()), 120,
                 what="the lost node seen")
        wait_for(lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE,
                 60, what="the lost node's engine process ended with its actor")
    finally:
        os.killpg(other.pid, signal.SIGCONT)
    assert wait_for(lambda: final_state(outbox, "spread"), 600, what="spread") == "completed"
    results, errors = outputs(outbox, "spread")
    assert errors == []  # nothing lost, nothing twice, in input order
    assert [r["custom_id"] for r in results] == [f"spread{i}" for i in range(600)]
    bench = json.loads((outbox / "spread.bench.json").read_text())
    assert sum(r["requests"] for r in bench["replicas"]) == 600
    assert len(bench["replicas"]) == 2  # both nodes answered some of it


def test_ray_address_without_ray_installed_is_refused(tmp_path):
    """`pip install 'batchd[ray]'` named, the daemon not started."""
    import subprocess

    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    config = tmp_path / "config.toml"
    config.write_text('[spool]\nroot = "spool"\n[cluster]\nray_address = "127.0.0.1:6379"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*FAKE_BATCHD, "run", "--config", str(config), "--once"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "pip install 'batchd[ray]'" in done.stderr and "ray_address" in done.stderr
