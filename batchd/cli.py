"""The ``batchd`` command line. Bad usage or a bad config exits 2 with one line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

from .config import ConfigError

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
    from . import commands
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

    p = command("run", commands.cmd_run, "run the daemon")
    p.add_argument("--once", action="store_true", help="drain inbox and work/, then exit")
    p.add_argument("--verbose", action="store_true",
                   help="in a terminal, show the engines' own log lines (vLLM, torch) here "
                   "too; without it they go to SPOOL/logs/engine-HOST.log (outside a "
                   "terminal, e.g. under systemd, they always go to stdout)")
    p = command("submit", commands.cmd_submit, "copy a file (and its media folder) into the inbox",
                description="Copy FILE into the inbox atomically (hidden name, fsync, "
                "rename) and print the job name it will run under. A media folder beside "
                "it (photos.media/ beside photos.jsonl: the pictures its lines name) is "
                "copied in first, the same way, so it is there when the file is claimed.")
    p.add_argument("file", help="a JSONL job file; its NAME.media/ folder comes with it")
    p.add_argument("--profile", help="the profile to run it on (written as a sidecar "
                   "NAME.toml); default: routed by the lines' model, else the default profile")
    p = command("status", commands.cmd_status, "table of jobs, or one job")
    p.add_argument("job", nargs="?", help="a job's name (its file's name without .jsonl, "
                   "as `submit` prints it); without it, the table of every job")
    p.add_argument("--follow", action="store_true",
                   help="live: the job until it ends, or every running job until none is")
    p.add_argument("--json", action="store_true",
                   help="machine-readable: the job's last status line, or the table's rows, "
                   "as JSON (with --follow: one JSON line per update)")
    p = command("validate", commands.cmd_validate, "check every line without loading a model")
    p.add_argument("file", help="a JSONL job file; its NAME.media/ folder is checked too")
    p.add_argument("--profile", help="check as `submit --profile` would run it")
    p = command("profiles", commands.cmd_profiles, "list, show or check profiles")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "check"],
                   help="list (default): every profile; show: one as resolved TOML; check: "
                   "whether it fits the GPU memory, and what vLLM does with its options")
    p.add_argument("name", nargs="?", help="a profile's name or alias (check: default all)")
    p.add_argument("--vram", default="16GiB", help="GPU memory for `check` (default 16GiB)")
    p.add_argument("--fit-only", action="store_true",
                   help="`check` without asking the installed vLLM about the server options")
    recipes = "; ".join(f"{name}: {about}" for name, (about, _) in sorted(RECIPES.items()))
    p = command("models", commands.cmd_models, "build a local model from a shipped recipe",
                description="Build a local model from a recipe batchd ships, into "
                "[routing] models_dir. Recipes: " + recipes + ".")
    p.add_argument("action", choices=["prepare", "list"],
                   help="prepare: build NAME; list: every recipe, and whether it is built")
    p.add_argument("name", nargs="?", help=f"the recipe to prepare: {', '.join(sorted(RECIPES))}")
    p.add_argument("--force", action="store_true",
                   help="build it again even when the folder is already there")
    p = command("cancel", commands.cmd_cancel, "ask the daemon to cancel a job")
    p.add_argument("job", help="the job's name")
    p = command("retry", commands.cmd_retry, "drop a job's retryable failed lines as a new job")
    p.add_argument("job", help="the job whose failed lines to run again")
    p.add_argument("--codes", help="error codes to retry, comma-separated (default: "
                   "engine_error,cancelled,batch_cancelled,batch_expired)")
    p = command("init", commands.cmd_init, "create a spool and a config.toml")
    p.add_argument("dir", nargs="?", default=".",
                   help="where (default: here); an existing config.toml is kept")
    p = command("api", commands.cmd_api, "serve OpenAI's Files and Batches API and a dashboard")
    p.add_argument("--listen", help="HOST:PORT (default: [api] listen, 127.0.0.1:8080)")
    p = command("bench", commands.cmd_bench, "bench records: report")
    p.add_argument("action", choices=["report"], help="report: throughput by profile")
    p.add_argument("--outbox", help="the folder of bench records (default: the spool's outbox)")
    p.add_argument("--plot", help="also write a bar chart to this PNG file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
