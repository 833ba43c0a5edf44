"""The ``batchd`` command line. Bad usage or a bad config exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import tomli_w

from .config import ConfigError, Settings, load_settings
from .jobs.router import JobRejected, Sidecar, explain, route, routes
from .jobs.validate import validate
from .layout import INPUT, is_final
from .lines import LineError, Request
from .profiles import ProfileSet, shipped_profiles
from .spool import inbox, media

if TYPE_CHECKING:
    from .engine import Engine
    from .profiles import Profile


class UsageError(Exception):
    pass


def main(argv: list[str] | None = None,
         factory: Callable[[Profile], Engine] | None = None) -> int:
    """The command line; FACTORY, if given, loads the daemon's engines (tests
    inject the fake one: batchd/testing.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.factory = factory
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


DESCRIPTION = """Run JSONL batch files through vLLM: drop a file into the spool's inbox
(or `batchd submit` it), the daemon (`batchd run`) answers every line, and the
outbox gets its results, errors, status and bench record. `batchd COMMAND --help`
explains each command. Bad usage or a bad config exits 2 with one line."""


class _Version(argparse.Action):
    """--version: batchd's and vLLM's versions (looked up only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from .bench import versions

        found = versions()
        print(f"batchd {found['batchd'] or 'unknown'}, vLLM {found['vllm'] or 'not installed'}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .engine.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="batchd", description=DESCRIPTION)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print batchd's and vLLM's versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, **more: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=more.pop("description", help),
                           **more)
        p.add_argument("--config", help="config file (default: $BATCHD_CONFIG, "
                       "./config.toml, /etc/batchd/config.toml)")
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "run the daemon")
    p.add_argument("--once", action="store_true", help="drain inbox and work/, then exit")
    p.add_argument("--verbose", action="store_true",
                   help="in a terminal, show the engines' own log lines (vLLM, torch) here "
                   "too; without it they go to SPOOL/logs/engine-HOST.log (outside a "
                   "terminal, e.g. under systemd, they always go to stdout)")
    p = command("submit", cmd_submit, "copy a file (and its media folder) into the inbox",
                description="Copy FILE into the inbox atomically (hidden name, fsync, "
                "rename) and print the job name it will run under. A media folder beside "
                "it (photos.media/ beside photos.jsonl: the pictures its lines name) is "
                "copied in first, the same way, so it is there when the file is claimed.")
    p.add_argument("file", help="a JSONL job file; its NAME.media/ folder comes with it")
    p.add_argument("--profile", help="the profile to run it on (written as a sidecar "
                   "NAME.toml); default: routed by the lines' model, else the default profile")
    p = command("status", cmd_status, "table of jobs, or one job")
    p.add_argument("job", nargs="?", help="a job's name (its file's name without .jsonl, "
                   "as `submit` prints it); without it, the table of every job")
    p.add_argument("--follow", action="store_true",
                   help="live: the job until it ends, or every running job until none is")
    p.add_argument("--json", action="store_true",
                   help="machine-readable: the job's last status line, or the table's rows, "
                   "as JSON (with --follow: one JSON line per update)")
    p = command("validate", cmd_validate, "check every line without loading a model")
    p.add_argument("file", help="a JSONL job file; its NAME.media/ folder is checked too")
    p.add_argument("--profile", help="check as `submit --profile` would run it")
    p = command("profiles", cmd_profiles, "list, show or check profiles")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "check"],
                   help="list (default): every profile; show: one as resolved TOML; check: "
                   "whether it fits the GPU memory, and what vLLM does with its options")
    p.add_argument("name", nargs="?", help="a profile's name or alias (check: default all)")
    p.add_argument("--vram", default="16GiB", help="GPU memory for `check` (default 16GiB)")
    p.add_argument("--fit-only", action="store_true",
                   help="`check` without asking the installed vLLM about the server options")
    recipes = "; ".join(f"{name}: {about}" for name, (about, _) in sorted(RECIPES.items()))
    p = command("models", cmd_models, "build a local model from a shipped recipe",
                description="Build a local model from a recipe batchd ships, into "
                "[routing] models_dir. Recipes: " + recipes + ".")
    p.add_argument("action", choices=["prepare", "list"],
                   help="prepare: build NAME; list: every recipe, and whether it is built")
    p.add_argument("name", nargs="?", help=f"the recipe to prepare: {', '.join(sorted(RECIPES))}")
    p.add_argument("--force", action="store_true",
                   help="build it again even when the folder is already there")
    p = command("cancel", cmd_cancel, "ask the daemon to cancel a job")
    p.add_argument("job", help="the job's name")
    p = command("retry", cmd_retry, "drop a job's retryable failed lines as a new job")
    p.add_argument("job", help="the job whose failed lines to run again")
    p.add_argument("--codes", help="error codes to retry, comma-separated (default: "
                   "engine_error,cancelled,batch_cancelled,batch_expired)")
    p = command("init", cmd_init, "create a spool and a config.toml")
    p.add_argument("dir", nargs="?", default=".",
                   help="where (default: here); an existing config.toml is kept")
    p = command("api", cmd_api, "serve OpenAI's Files and Batches API and a dashboard")
    p.add_argument("--listen", help="HOST:PORT (default: [api] listen, 127.0.0.1:8080)")
    p = command("bench", cmd_bench, "bench records: report")
    p.add_argument("action", choices=["report"], help="report: throughput by profile")
    p.add_argument("--outbox", help="the folder of bench records (default: the spool's outbox)")
    p.add_argument("--plot", help="also write a bar chart to this PNG file")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    from .logs import configure

    configure(settings.log.format, settings.log.level)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    settings = _settings(args)
    try:
        inbox.ensure_dirs(settings)
        inbox.check_writable(settings)
        _engine_output(settings, args.verbose)
    except OSError as exc:
        raise ConfigError(f"cannot use the spool at {settings.spool.root}: "
                          f"{exc.strerror or exc}") from None
    code = Daemon(settings, factory=args.factory).run(once=args.once)
    # Everything is published and fsynced and the engine is shut down. Skip the
    # interpreter's teardown: native threads of torch and vLLM can abort it
    # ("terminate called without an active exception", seen with an embedding
    # model), which would turn a clean stop into a crash for systemd.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _engine_output(settings: Settings, verbose: bool) -> None:
    """A person at a terminal sees batchd's own lines and the --follow bars, not
    the engines' warnings: those go to a log file unless --verbose. Outside a
    terminal (systemd, a pipe) they stay on stdout, where the journal keeps them."""
    import socket

    import structlog

    from .logs import engine_output_to

    if verbose or not sys.stdout.isatty():
        return
    path = settings.layout.engine_log(socket.gethostname())
    engine_output_to(path)
    structlog.get_logger().info("engine_output", to=str(path), hint="--verbose shows it here")


def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    source = Path(args.file)
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    inbox.ensure_dirs(settings)
    layout = settings.layout
    stem = inbox.safe_stem(source.stem + INPUT)
    name, n = stem, 1
    while any(path.exists() for path in (
            layout.inbox / f"{name}{INPUT}", layout.inbox_sidecar(f"{name}{INPUT}"),
            layout.inbox_media(f"{name}{INPUT}"), layout.status(name), layout.input(name))):
        n += 1
        name = f"{stem}-{n}"
    if args.profile:
        profiles = ProfileSet.load(settings.routing.profiles_dir)
        if profiles.lookup(args.profile) is None:
            raise UsageError(f"unknown profile {args.profile!r}; known: {profiles.known()}")
        _copy_in(tomli_w.dumps({"profile": args.profile}).encode(),
                 layout.inbox_sidecar(f"{name}{INPUT}"))
    folder = media.beside(source)
    if folder is not None:  # the folder first, as users drop it (docs/FORMATS.md, "Images")
        count = media.copy_in(folder, layout.inbox_media(f"{name}{INPUT}"))
        print(f"{folder.name}/: {count} files copied with {source.name}", file=sys.stderr)
    with open(source, "rb") as stream:
        _copy_in(stream, layout.inbox / f"{name}{INPUT}")
    print(name)
    return 0


def _copy_in(data, target: Path) -> None:
    """Write under a hidden name (never eligible), fsync, rename into place."""
    from functools import partial

    from .spool.outbox import write_atomic

    chunks = [data] if isinstance(data, bytes) else iter(partial(data.read, 1 << 20), b"")
    write_atomic(target, chunks)


def cmd_status(args: argparse.Namespace) -> int:
    from .spool.listing import claim_in_flight, job_rows, waiting_file
    from .spool.daemons import Registry
    from .views import (follow, follow_spool, follow_waiting, print_daemons, print_job,
                        print_table, print_waiting)

    settings = _settings(args)
    if args.job:
        path = settings.layout.status(args.job)
        # A file still in the inbox is a job waiting to be claimed. Looked for in
        # the claim's order (inbox, claim in flight, status file): one answers.
        waiting = None if path.exists() else waiting_file(settings, args.job)
        if waiting is not None:
            if args.follow:
                return follow_waiting(settings, waiting, as_json=args.json)
            return print_waiting(waiting, as_json=args.json)
        if not claim_in_flight(settings, args.job) and not path.exists():
            raise UsageError(f"no such job: {args.job}")
        if args.follow:
            return follow(path, as_json=args.json)
        return print_job(path, as_json=args.json)
    if args.follow:
        return follow_spool(lambda: job_rows(settings), as_json=args.json)
    rows = job_rows(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
        print_daemons(Registry(settings.layout, settings.scheduling.lease_seconds).all())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    profiles = ProfileSet.load(settings.routing.profiles_dir)
    if args.profile and profiles.lookup(args.profile) is None:
        raise UsageError(f"--profile: unknown profile {args.profile!r}; "
                         f"known: {profiles.known()}")
    bad = 0
    named: dict[str, list[int]] = {}  # model -> the valid lines naming it

    def on_error(item: LineError) -> None:
        nonlocal bad
        bad += 1
        if bad <= 100:
            print(f"{path.name} line {item.line}: {item.code}: {item.message}")

    # its pictures, in the media folder beside it (NAME.media/), as the daemon checks them
    from .jobs import images

    folder = media.beside(path)

    def on_request(item: Request, _offset: int) -> None:
        if images.count(item.body):
            problem = images.check(item, folder)
            if problem is not None:
                on_error(problem)
                return
        if item.model:
            named.setdefault(item.model, []).append(item.line)

    total = 0
    try:
        total, votes = validate(path, settings.limits, on_error, on_request)
        job = path.name.removesuffix(INPUT) if path.name.endswith(INPUT) else path.stem
        profile, reason = route(job, Sidecar(profile=args.profile), votes, profiles,
                                settings.routing.default_profile)
        found = routes(reason, votes, profiles)
        for model, lines in named.items():  # the run's model_not_found lines
            if found is not None and found.models.get(model) is None:
                for line in lines:
                    on_error(LineError(line, "", "model_not_found",
                                       f"no profile serves model {model!r}"))
        where = f"profile {profile.name} ({reason})"
    except JobRejected as exc:
        print(f"{path.name}: {exc.code}: {exc.message}")
        bad = bad or 1
        where = "no profile"
    if bad > 100:
        print(f"... and {bad - 100} more")
    if named and where != "no profile":
        for said in explain(list(named), profile, reason, found):
            print(f"{path.name}: model {said}")
    print(f"{path.name}: {total} requests, {total - bad} valid, {bad} invalid; {where}")
    return 0 if bad == 0 else 1


def cmd_profiles(args: argparse.Namespace) -> int:
    settings = _settings(args)
    profiles = ProfileSet.load(settings.routing.profiles_dir)
    if args.action == "check":
        return _check_profiles(settings, profiles, args.name, args.vram, args.fit_only)
    if args.action == "show":
        if not args.name:
            raise UsageError("profiles show needs a NAME")
        profile = profiles.lookup(args.name)
        if profile is None:
            raise UsageError(f"unknown profile {args.name!r}; known: {profiles.known()}")
        data = profile.model_dump(exclude={"source", "name"}, exclude_none=True)
        data["engine"] = profile.engine_args(settings.routing.models_dir)
        print(f"# {profile.name} ({profile.source})")
        print(tomli_w.dumps(data), end="")
        return 0
    for name, profile in sorted(profiles.profiles.items()):
        trust = profile.engine.get("trust_remote_code", False)
        default = " (default)" if name == settings.routing.default_profile else ""
        print(f"{name:16} {profile.model:44} trust_remote_code={str(trust).lower()}{default}")
    for error in profiles.errors:
        print(f"invalid: {error}")
    return 1 if profiles.errors else 0


def _check_profiles(settings: Settings, profiles: ProfileSet, name: str | None,
                    vram_text: str, fit_only: bool) -> int:
    from .engine.fit import FitError, parse_size
    from .views import print_capabilities, print_fit

    try:
        vram = parse_size(vram_text)
    except FitError as exc:
        raise UsageError(str(exc)) from None
    found = [profiles.lookup(name)] if name else list(profiles.profiles.values())
    chosen = [p for p in found if p is not None]
    if len(chosen) < len(found):
        raise UsageError(f"unknown profile {name!r}; known: {profiles.known()}")
    fits = print_fit(chosen, settings.routing.models_dir, vram)
    return fits if fit_only else print_capabilities(chosen) or fits


def cmd_models(args: argparse.Namespace) -> int:
    from .engine.recipes import RECIPES, RecipeError, prepare

    settings = _settings(args)
    if args.action == "list":
        for name, (description, _) in sorted(RECIPES.items()):
            present = (settings.routing.models_dir / name / "config.json").exists()
            print(f"{name:16} {'ready' if present else 'not built':10} {description}")
        return 0
    if not args.name:
        raise UsageError("models prepare needs a NAME")
    try:
        print(prepare(args.name, settings.routing.models_dir, force=args.force))
    except RecipeError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .spool.outbox import read_status

    layout = _settings(args).layout
    job = args.job
    history = read_status(layout.status(job))
    if history and is_final(history[-1]["state"]):
        print(f"{job} already ended: {history[-1]['state']}")
        return 0
    known = layout.input(job).exists() or (layout.inbox / f"{job}{INPUT}").exists() \
        or bool(history)
    if not known:
        print(f"no such job: {job}", file=sys.stderr)
        return 1
    _copy_in(b"", layout.cancel(job))
    print(f"cancel requested for {job}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Prints the new job's name on stdout; NEW.merged.jsonl follows when it ends."""
    from .jobs.retry import RETRYABLE, RetryError, drop_retry

    settings = _settings(args)
    if inbox.safe_stem(args.job) != args.job:
        raise UsageError(f"not a job name: {args.job!r}")
    codes = tuple(c.strip() for c in args.codes.split(",") if c.strip()) if args.codes \
        else RETRYABLE
    try:
        name, count = drop_retry(settings, args.job, codes)
    except RetryError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 1
    print(name)
    print(f"{count} lines of {args.job} to retry; {name}.merged.jsonl follows when it ends",
          file=sys.stderr)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    config = folder / "config.toml"
    folder.mkdir(parents=True, exist_ok=True)
    if not config.exists():
        profiles = shipped_profiles() or Path("profiles")
        config.write_text(tomli_w.dumps({
            "spool": {"root": "spool"},
            "routing": {"profiles_dir": str(profiles), "default_profile": "smollm2-135m",
                        "models_dir": "models"},
        }))
    settings = load_settings(config)
    inbox.ensure_dirs(settings)
    print(f"spool ready at {settings.spool.root}; config {config}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import Keys, create_app, is_local, parse_listen

    settings = _settings(args)
    listen = args.listen or settings.api.listen
    host, port = parse_listen(listen)
    keys = Keys(settings.api.keys_file) if settings.api.keys_file else None
    if keys is None and not is_local(host):
        raise ConfigError(f"refusing to listen on {listen} without API keys: set [api] "
                          "keys_file, or listen on 127.0.0.1")
    try:
        app = create_app(settings, keys)
    except OSError as exc:
        raise ConfigError(f"cannot use the spool at {settings.spool.root}: "
                          f"{exc.strerror or exc}") from None
    uvicorn.run(app, host=host, port=port, log_level=settings.log.level,
                timeout_graceful_shutdown=5)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .views import bench_report

    settings = _settings(args)
    outbox = Path(args.outbox) if args.outbox else settings.outbox
    return bench_report(outbox, args.plot)


if __name__ == "__main__":
    sys.exit(main())
