"""A tiny, randomly initialised Qwen2.5-VL checkpoint (Lingshu's architecture), built offline.

The real vLLM engine runs on it on a CPU, so the managed server, the client and the agent can be
tested end to end without a GPU or downloaded weights. Everything Lingshu's checkpoint has is
here at toy scale: a byte-level BPE tokenizer trained locally with Qwen's pre-tokenizer and all
of Qwen's special tokens, Qwen2.5-VL's chat template, its image and video processors with Qwen's
patch, merge and pixel settings, and a config whose token ids match the tokenizer.

Sizes are chosen for vLLM's CPU backend: its attention kernels reject head_dim 16, so the text
model has hidden size 256 and 4 heads (head_dim 64, ``mrope_section`` [8, 12, 12] halves of
it). The checkpoint is about 8 MB. Building is deterministic: the same bytes every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suwen.sanitize import QWEN2_5_VL_PLAIN_ADDED_TOKENS, QWEN2_5_VL_SPECIAL_TOKENS

# The tokens the real tokenizer adds, the same ones the sanitiser defuses.
SPECIAL_TOKENS = QWEN2_5_VL_SPECIAL_TOKENS
PLAIN_ADDED_TOKENS = QWEN2_5_VL_PLAIN_ADDED_TOKENS

# Qwen2's pre-tokenizer split (the GPT-4-style regex Qwen ships in tokenizer.json).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL-Instruct's chat template (image and video placeholders included).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's image settings (its preprocessor_config.json).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384

BPE_VOCAB_SIZE = 2048
SEED = 20250101

# Text the tokenizer learns its merges from: medical and radiology English, digits and JSON
# punctuation, so prompts and structured replies tokenize into a realistic number of tokens.
_CORPUS = """\
The chest radiograph shows a right lower lobe consolidation consistent with pneumonia.
No pleural effusion or pneumothorax is seen. The cardiac silhouette is within normal limits.
Axial CT of the abdomen demonstrates a hypodense lesion in the left lobe of the liver.
MRI of the brain reveals a ring-enhancing mass with surrounding vasogenic edema.
Is there evidence of a fracture? Yes. Is the aorta enlarged? No. Which organ is abnormal?
Findings: the kidneys are normal in size; there is no hydronephrosis; the bowel is unremarkable.
Impression: small bowel obstruction; free air under the diaphragm; cardiomegaly; atelectasis.
Patients with diabetes mellitus and hypertension were randomized to treatment or placebo.
Results: the odds ratio was 1.45 (95% CI 1.12-1.88, p < 0.001) in 2,345 participants.
Methods: a retrospective cohort study of adults admitted to the intensive care unit.
Conclusion: early antibiotic therapy reduced mortality in patients with sepsis.
{"answer": "yes", "confidence": 0.9, "findings": ["opacity", "effusion"], "organ": "lung"}
{"question": "What imaging modality was used?", "answer": "computed tomography"}
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000
Question, answer, evidence, citation, reference, image, abstract, title, PubMed, PMID.
Describe the image. Which abnormality is present? Where is the lesion located?
"""


def _corpus() -> list[str]:
    lines = _CORPUS.splitlines()
    # Repetition gives the trainer stable pair counts; order is fixed, so merges are too.
    return [line for _ in range(8) for line in lines]


def _train_tokenizer() -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        + [AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS]
    )
    return tokenizer


def _hf_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _padded(size: int, multiple: int = 64) -> int:
    return -(-size // multiple) * multiple


def _config(token_id: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """Lingshu-7B's config (Qwen2.5-VL-7B's), shrunk; the keys and layout are the real ones."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": token_id["<|endoftext|>"],
        "eos_token_id": token_id["<|im_end|>"],
        "pad_token_id": token_id["<|endoftext|>"],
        "vision_start_token_id": token_id["<|vision_start|>"],
        "vision_end_token_id": token_id["<|vision_end|>"],
        "vision_token_id": token_id["<|vision_pad|>"],
        "image_token_id": token_id["<|image_pad|>"],
        "video_token_id": token_id["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 256,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "spatial_patch_size": PATCH_SIZE,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        },
    }


def _processor(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = {
        "size": pixels,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }
    return Qwen2_5_VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        # Without an explicit video processor transformers tries to build one and fails.
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=CHAT_TEMPLATE,
    )


def _random_weights(config: dict[str, Any], directory: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    torch.manual_seed(SEED)
    model: Any = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))  # type: ignore[no-untyped-call]
    # Library code does not print: keep transformers' "Writing model shards" bar quiet.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def write_tiny_model(directory: Path) -> None:
    """Write the tiny checkpoint (config, safetensors, tokenizer, processors) into ``directory``.

    Loadable with transformers' Auto classes and servable by vLLM like Lingshu itself."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _hf_tokenizer()
    all_tokens = (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS)
    token_id = {token: tokenizer.convert_tokens_to_ids(token) for token in all_tokens}
    config = _config(token_id, _padded(len(tokenizer)))
    _random_weights(config, directory)
    _processor(tokenizer).save_pretrained(directory)
