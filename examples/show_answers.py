"""Print a job's answers and its bench summary: python show_answers.py OUTBOX/JOB"""

import json
import sys
from pathlib import Path

base = Path(sys.argv[1])
for line in base.with_name(base.name + ".results.jsonl").read_text().splitlines():
    out = json.loads(line)
    choice = out["response"]["body"]["choices"][0]
    text = choice.get("message", {}).get("content") if "message" in choice else choice["text"]
    print(f"{out['custom_id']:>10}: {text.strip()}")
for line in base.with_name(base.name + ".errors.jsonl").read_text().splitlines():
    out = json.loads(line)
    print(f"{out['custom_id']:>10}: ERROR {out['response']['body']['error']['message']}")
bench = json.loads(base.with_name(base.name + ".bench.json").read_text())
t = bench["timing_s"]
print(f"\n{bench['requests']['succeeded']}/{bench['requests']['total']} answered by "
      f"{bench['profile']}: load {t['model_load']:.1f}s, generation {t['generation']:.1f}s, "
      f"{bench['throughput']['output_tokens_per_s']:.1f} output tok/s")
