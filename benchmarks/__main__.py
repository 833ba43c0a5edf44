"""python -m benchmarks run SCENARIO [--repeats N]   |   python -m benchmarks list"""

from __future__ import annotations

import argparse
import importlib
import json

SCENARIOS = {
    "memory": "daemon RSS for 1k vs 100k requests; validate on 1M lines",
    "overhead": "the same prompts through vllm.LLM.chat and through a warm batchd daemon",
    "claim": "rename into the inbox of an idle daemon -> claim, inotify and poll modes",
    "small_files": "20 files x 10 requests: one daemon against run_batch once per file",
    "chunked": "streaming window against fixed chunks of 100 on a mixed-length workload",
    "prefix": "shared-prefix workloads: batchd's prefix order vs LLM.chat in input order",
    "gpu": "raw vLLM vs batchd at GPU speed, memory over six swaps, the fit table vs vLLM",
    "concurrency": "a small file dropped during a bulk job: its wait, and the bulk's cost",
    "rerun": "the result cache: a file, then the same file with 1 % of its lines changed",
    "window": "a bulk job's time on the auto window against fixed ones",
    "scaleout": "a bulk as whole files on one daemon and on two sharing one spool",
    "replicas": "one engine against two replicas of one daemon, dealt by family and without",
    "images": "daemon RSS for a 50-image job vs a 5,000-image one (media folder, tiny-vision)",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    run = sub.add_parser("run")
    run.add_argument("scenario", choices=sorted(SCENARIOS))
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--model", help="overhead: tiny-llama (default) or smollm2-135m")
    run.add_argument("--n", type=int, help="overhead, gpu, rerun: requests per run")
    run.add_argument("--max-tokens", type=int, help="overhead: output tokens per request")
    run.add_argument("--budget-s", type=float, help="gpu: seconds for all three parts")
    run.add_argument("--swaps", type=int, help="gpu: profile swaps in part 2 (0: no part 2)")
    run.add_argument("--fits", type=int, help="gpu: shipped profiles the fit part loads (0-3)")
    run.add_argument("--window", type=int,
                     help="concurrency: [engine] window (default 0: the shipped auto)")
    run.add_argument("--quick", action="store_true",
                     help="small sizes: checks that the scenario runs, measures nothing useful")
    args = parser.parse_args()
    if args.command == "list":
        for name, what in SCENARIOS.items():
            print(f"{name:10} {what}")
        return
    module = importlib.import_module(f"benchmarks.{args.scenario}")
    kwargs = {"repeats": args.repeats}
    for key in ("model", "n", "max_tokens", "budget_s", "swaps", "fits", "window"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.quick:
        kwargs.update(module.QUICK, quick=True)
    path = module.run(**kwargs)
    record = json.loads(path.read_text())
    print(f"record: {path}")
    for key in ("peak_ratio_large_over_small", "ratios", "modes"):
        if key in record:
            print(f"{key}: {record[key]}")


if __name__ == "__main__":
    main()
