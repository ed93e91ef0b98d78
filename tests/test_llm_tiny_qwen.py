"""The tiny Lingshu-architecture checkpoint is a real, consistent Qwen2.5-VL checkpoint:
tokenizer, chat template, processors and config agree, transformers runs it on an image, and
it is built the same way every time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from suwen.devtools.tiny_qwen import PLAIN_ADDED_TOKENS, SPECIAL_TOKENS, write_tiny_model

CONFIG_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def test_config_token_ids_match_the_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    for token in (*SPECIAL_TOKENS, *PLAIN_ADDED_TOKENS):
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    for field, token in CONFIG_IDS.items():
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token), field
    text = config.text_config
    assert text.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text.bos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert text.vocab_size >= len(tokenizer)
    # The CPU-attention-safe shape: head_dim 64, mrope halves [8, 12, 12] summing to 32.
    assert text.hidden_size // text.num_attention_heads == 64
    assert sum(text.rope_parameters["mrope_section"]) == 32
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_byte_level_tokenizer_round_trips_any_text(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = 'Pleural effusion? 肺炎 — {"confidence": 0.93} ✓\n'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_processor_expands_image_placeholders(tiny_model_dir: Path, shared_data: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Is there a fracture?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a fracture?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    image = Image.open(shared_data / "vqa_rad" / "images" / "synpic100132.jpg").convert("RGB")
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"][0].tolist()
    image_tokens = grid[0] * grid[1] * grid[2] // 4  # 2x2 merge
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"][0] == pad_id).sum()) == image_tokens
    # Qwen2.5-VL's own preprocessor limits: 1384x2321 fits below 12845056 pixels unchanged
    # up to the 28-pixel grid.
    assert (grid[1] * 14, grid[2] * 14) == (1372, 2324)


@pytest.mark.slow
def test_transformers_generates_from_an_image(tiny_model_dir: Path, shared_data: Path) -> None:
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(shared_data / "vqa_rad" / "images" / "synpic100132.jpg").convert("RGB")
    inputs = processor(text=[prompt], images=[image.resize((224, 224))], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5


@pytest.mark.slow
def test_build_is_deterministic_and_small(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "again")
    assert digests(tmp_path / "again") == digests(tiny_model_dir)
    size = sum(path.stat().st_size for path in tiny_model_dir.iterdir())
    assert size < 12_000_000
