"""A randomly initialised BERT-base with MedCPT's query-encoder configuration, built offline.

MedCPT-Query-Encoder (NCBI) is a plain Hugging Face ``BertModel`` published without a
sentence-transformers configuration, used with its [CLS] vector: 12 layers, hidden size 768, 12
heads, intermediate size 3072, a 30,522-token PubMedBERT vocabulary, 512 positions, queries
truncated to 64 tokens by its authors. The weights cannot be downloaded here, so benchmarks time
this shape with random weights; the tokenizer is BERT's uncased WordPiece vocabulary of the same
size, taken from the all-MiniLM-L6-v2 package (its vocab.txt is bert-base-uncased's 30,522
tokens), so token counts per question are those of a BERT vocabulary, not PubMedBERT's own.
Suwen loads the folder as it would load MedCPT: no modules.json, so Transformer + CLS pooling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MEDCPT_QUERY_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}
QUERY_MAX_TOKENS = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
)


def build(folder: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """Write the model into ``folder`` (once: an existing complete folder is reused)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = BertModel(BertConfig(**MEDCPT_QUERY_CONFIG), add_pooling_layer=True).eval()
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source / name, staging / name)
    vocab = (staging / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == MEDCPT_QUERY_CONFIG["vocab_size"], len(vocab)
    config = json.loads((staging / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = MEDCPT_QUERY_CONFIG["max_position_embeddings"]
    (staging / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    staging.rename(folder)
    return folder
