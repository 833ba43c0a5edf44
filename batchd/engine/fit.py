"""Will a profile fit a GPU? An estimate from the model's shape, no hub needed.

Budget = ``gpu_memory_utilization`` x card memory. KV cache = budget - weights
(with the vision tower, ``vision_params_b``, when the profile takes images)
- runtime overhead. KV bytes per token = 2 (K and V) x layers x KV heads x
head size x bytes per cached value. Full-length sequences = KV cache /
(KV bytes per token x ``max_model_len``), counting every layer as full
attention (sliding-window layers make the real figure larger). A profile
that takes images spends ``image_tokens`` (256 for Gemma 3) of a sequence on
each: its images per prompt must leave room in ``max_model_len``.

The shape comes from the profile's ``[fit]`` table, or from ``config.json`` of a
local model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ByteSize, TypeAdapter, ValidationError

from ..profiles import Profile

GIB = 1024**3
OVERHEAD_BYTES = int(1.5 * 1e9)  # activations, CUDA graphs, the CUDA context
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2, "fp8": 1}


class FitError(ValueError):
    pass


def parse_size(text: str) -> int:
    """'16GiB', '16 GB', '24g' -> bytes (pydantic's ByteSize: KiB/MiB/GiB are
    binary, k/KB/g/GB decimal), as config sizes are read."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise FitError(f"not a size: {text!r} (try 16GiB)") from None


@dataclass
class Shape:
    weight_bytes: int
    layers: int
    kv_heads: int
    head_size: int


def shape(profile: Profile, models_dir: Path) -> Shape:
    fit = dict(profile.fit)
    if not fit:
        config = Path(profile.model_location(models_dir)) / "config.json"
        if not config.is_file():
            raise FitError(f"{profile.name}: no [fit] table and no local {config}")
        hf = json.loads(config.read_text())
        hf = hf.get("text_config", hf)
        heads = hf["num_attention_heads"]
        fit = {"layers": hf["num_hidden_layers"],
               "kv_heads": hf.get("num_key_value_heads", heads),
               "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
               "weight_bytes": sum(p.stat().st_size for p in config.parent.glob("*.safetensors"))}
    if "weight_bytes" not in fit:
        bits = fit.get("weight_bits", 8 * BYTES.get(profile.engine.get("dtype", "auto"), 2))
        params = fit["params_b"] + (fit.get("vision_params_b", 0) if profile.images else 0)
        fit["weight_bytes"] = int(params * 1e9 * bits / 8)
    return Shape(int(fit["weight_bytes"]), int(fit["layers"]), int(fit["kv_heads"]),
                 int(fit["head_size"]))


def lora_bytes(profile: Profile) -> int:
    """GPU memory for the profile's LoRA slots: vLLM keeps max_loras adapters in
    the GPU at once, each as large as the largest one (its weight files)."""
    sizes = []
    for path in profile.lora.paths(profile.source).values():
        try:
            sizes.append(sum(p.stat().st_size for p in Path(path).glob("*.safetensors")))
        except OSError:
            continue
    return profile.lora.max_loras * max(sizes, default=0)


def check(profile: Profile, models_dir: Path, vram: int) -> dict:
    s = shape(profile, models_dir)
    utilization = float(profile.engine.get("gpu_memory_utilization", 0.9))
    max_len = int(profile.engine.get("max_model_len", 4096))
    kv_dtype = profile.engine.get("kv_cache_dtype", "auto")
    dtype_bytes = BYTES.get(profile.engine.get("dtype", "auto"), 2)
    cache_bytes = dtype_bytes if kv_dtype == "auto" else BYTES.get(kv_dtype, dtype_bytes)
    per_token = 2 * s.layers * s.kv_heads * s.head_size * cache_bytes
    budget = utilization * vram
    lora = lora_bytes(profile)
    kv = budget - s.weight_bytes - lora - OVERHEAD_BYTES
    sequences = kv / (per_token * max_len) if kv > 0 else 0.0
    image_tokens = int(profile.fit.get("image_tokens", 0))
    images_fit = profile.images * image_tokens < max_len
    return {"profile": profile.name, "weights_gb": s.weight_bytes / 1e9, "lora_gb": lora / 1e9,
            "images": profile.images, "image_tokens": image_tokens,
            "budget_gb": budget / 1e9, "kv_cache_gb": max(kv, 0) / 1e9,
            "kv_kib_per_token": per_token / 1024, "max_model_len": max_len,
            "full_length_sequences": sequences, "fits": sequences >= 1.0 and images_fit}
