"""What each ``batchd`` command does (the parser is in cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import tomli_w

from .cli import UsageError
from .config import ConfigError, Settings, load_settings
from .jobs.router import JobRejected, Sidecar, explain, route, routes
from .jobs.validate import validate
from .layout import INPUT, is_final
from .lines import LineError, Request
from .profiles import ProfileSet, shipped_profiles
from .spool import inbox, media


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
    from .overview import print_daemons
    from .views import (follow, follow_spool, follow_waiting, print_job, print_table,
                        print_waiting)

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
    from .overview import print_capabilities, print_fit

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
    from .overview import bench_report

    settings = _settings(args)
    outbox = Path(args.outbox) if args.outbox else settings.outbox
    return bench_report(outbox, args.plot)
