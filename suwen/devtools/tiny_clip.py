"""A tiny, randomly initialised open_clip model with BiomedCLIP's kinds of towers, built offline.

BiomedCLIP is a timm ViT image tower (``vit_base_patch16_224``, class-token pooling, linear
projection) plus a Hugging Face BERT text tower (PubMedBERT, CLS pooling, MLP projection) with a
WordPiece tokenizer. The tiny model keeps every one of those choices at toy sizes: timm's
``test_vit`` (a 6-layer, 64-wide ViT with patch 16) and a 2-layer BERT whose WordPiece vocabulary
is built here, with the ``tokenizers`` library, from a few radiology sentences. The directory has
the layout of a downloaded BiomedCLIP snapshot (``open_clip_config.json``, weights, tokenizer
files) and loads through the same code as the real model: ``SUWEN_IMAGE_ENCODER=DIR``.

Weights are seeded, so the same directory is written every time; they are safetensors, never a
pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from suwen.errors import InputError
from suwen.files import publish_dir

TEXT_TOWER_DIR = "text_tower"  # the BERT config; resolved against the model directory
CONTEXT_LENGTH = 64
EMBED_DIM = 32
SEED = 0

# BiomedCLIP's preprocessing (CLIP mean/std), from its open_clip_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0, as BERT expects

# Training text for the toy WordPiece vocabulary: enough radiology words that captions and
# queries split into sub-words rather than single characters.
_CORPUS = """
Axial CT of the head without contrast shows an acute infarct in the left middle cerebral artery
territory. Chest radiograph demonstrates a right lower lobe pneumonia with a small pleural
effusion. MRI of the brain with gadolinium shows a ring enhancing lesion in the right frontal
lobe. Abdominal CT shows free air under the diaphragm consistent with bowel perforation.
Coronal T2 weighted image of the knee shows a tear of the medial meniscus. Ultrasound of the
liver demonstrates multiple hypoechoic masses suggestive of metastases. Frontal chest x-ray with
cardiomegaly and pulmonary edema. Sagittal MRI of the lumbar spine shows disc herniation at L4-L5
compressing the nerve root. Is there a fracture? Yes. Is the heart enlarged? No. Where is the
lesion located? Kidney, spleen, pancreas, gallbladder, aorta, trachea, lung, nodule, mass, cyst,
hemorrhage, hematoma, edema, atelectasis, pneumothorax, consolidation, opacity, calcification.
"""


def write_tiny_clip(directory: Path) -> None:
    """Write the tiny model to ``directory`` (created; must be empty if it exists)."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"{directory}: exists and is not an empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so a crash never leaves half a model behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write_into(staging)
        _make_readable(staging)
        if directory.exists():
            directory.rmdir()
        publish_dir(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the model the usual ones."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_into(directory: Path) -> None:
    _write_tokenizer(directory)
    _write_text_tower_config(directory / TEXT_TOWER_DIR)
    (directory / "open_clip_config.json").write_text(
        json.dumps(open_clip_config(), indent=2), encoding="utf-8"
    )
    write_weights(directory)


def open_clip_config() -> dict[str, Any]:
    """BiomedCLIP's open_clip config with toy sizes (see the real one in shared/data/configs)."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 160,
            },
            "text_cfg": {
                "hf_model_name": TEXT_TOWER_DIR,
                "hf_tokenizer_name": TEXT_TOWER_DIR,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def _write_tokenizer(directory: Path) -> None:
    """A lower-casing BERT WordPiece tokenizer, saved as a Hugging Face tokenizer.

    The vocabulary is built deterministically (trainers break ties by hash order): the special
    tokens, every printable ASCII character alone and as a ``##`` continuation (so any text
    tokenizes), then the corpus's words, most frequent first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # transformers 5 exports it lazily (as an alias of BertTokenizer); 4.x defines it outright.
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    tokenizer = Tokenizer(models.WordPiece(vocab=_vocabulary(), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[
            ("[CLS]", SPECIAL_TOKENS.index("[CLS]")),
            ("[SEP]", SPECIAL_TOKENS.index("[SEP]")),
        ],
    )
    wrapped = BertTokenizerFast(
        tokenizer_object=tokenizer,
        do_lower_case=True,
        model_max_length=CONTEXT_LENGTH,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    wrapped.save_pretrained(str(directory))


def _vocabulary() -> dict[str, int]:
    from tokenizers import normalizers, pre_tokenizers

    characters = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    normalised = normalizers.BertNormalizer(lowercase=True).normalize_str(_CORPUS)
    pieces = pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalised)
    counts = Counter(word for word, _ in pieces if len(word) > 1)
    words = sorted(counts, key=lambda word: (-counts[word], word))
    tokens = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters), *words]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _write_text_tower_config(directory: Path) -> None:
    from transformers import BertConfig

    vocab_size = len(_vocabulary())
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT_LENGTH,
        pad_token_id=0,
    )
    config.save_pretrained(str(directory))


def write_weights(directory: Path) -> None:
    """Instantiate the model from the config just written (the loader's own path), seeded."""
    import torch
    from safetensors.torch import save_file

    from suwen.indexes.image_encoder import create_open_clip_model

    # open_clip logs (to the root logger) that the directory has no weights yet: expected here.
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model, _ = create_open_clip_model(f"local-dir:{directory}", load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
