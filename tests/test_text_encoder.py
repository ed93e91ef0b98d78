"""Text encoders: a sentence-transformers model as shipped, and a plain HF encoder with CLS
pooling (the MedCPT case), from local directories only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from suwen.config import Settings
from suwen.errors import ModelError
from suwen.indexes.text_encoder import load_text_encoder, query_encoder

PLAIN_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="session")
def plain_encoder_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """MiniLM's weights without its sentence-transformers config: how MedCPT is published."""
    folder = tmp_path_factory.mktemp("plain_bert")
    for name in PLAIN_FILES:
        if (minilm_path / name).exists():
            shutil.copy(minilm_path / name, folder / name)
    assert not (folder / "modules.json").exists()
    return folder


def test_sentence_transformers_model_keeps_its_own_pooling(minilm_path: Path) -> None:
    encoder = load_text_encoder(str(minilm_path), device="cpu")
    assert encoder.dim == 384
    assert encoder.max_tokens == 256
    assert encoder.pooling == "model's own"
    vectors = encoder.encode(["heart attack", "myocardial infarction", "banana bread recipe"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # a real encoder, not noise


def test_order_and_progress_survive_length_sorting(minilm_path: Path) -> None:
    encoder = load_text_encoder(str(minilm_path), device="cpu")
    texts = ["short", "a much longer text " * 20, "medium length text here"]
    calls: list[tuple[int, int]] = []
    batched = encoder.encode(texts, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    one_by_one = np.vstack([encoder.encode([t]) for t in texts])
    assert np.allclose(batched, one_by_one, atol=1e-5)
    assert calls == [(2, 3), (3, 3)]


def test_plain_encoder_uses_cls_pooling_by_default(plain_encoder_dir: Path) -> None:
    cls = load_text_encoder(str(plain_encoder_dir), pooling="auto", device="cpu")
    mean = load_text_encoder(str(plain_encoder_dir), pooling="mean", device="cpu")
    assert cls.pooling == "cls" and mean.pooling == "mean"
    assert cls.dim == mean.dim == 384
    text = ["pulmonary embolism after surgery"]
    assert not np.allclose(cls.encode(text), mean.encode(text), atol=1e-3)


def test_asymmetric_query_encoder_from_settings(
    tmp_path: Path, minilm_path: Path, plain_encoder_dir: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        text_encoder=str(minilm_path),
        text_query_encoder=str(plain_encoder_dir),
        device="cpu",
    )
    assert query_encoder(settings).name == str(plain_encoder_dir)
    symmetric = Settings(home=tmp_path, text_encoder=str(minilm_path), device="cpu")
    assert query_encoder(symmetric).name == str(minilm_path)


def test_unavailable_model_is_a_one_line_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="could not be loaded") as caught:
        load_text_encoder(str(tmp_path / "no-such-model"), device="cpu")
    assert "no-such-model" in str(caught.value)
    assert "\n" not in str(caught.value)


QUERIES = [
    "What is the first-line treatment of mild asthma?",
    "BRCA1",
    "Ist die Ösophagusvarizenblutung häufig? 食道静脈瘤",
    "tumour " * 400,  # past max_tokens: truncated the same way
]


@pytest.mark.parametrize("pooling", ["st", "cls"])
def test_query_vectors_equal_the_batch_encoders(
    minilm_path: Path, plain_encoder_dir: Path, pooling: str
) -> None:
    """One query takes a frozen TorchScript path on the CPU; its vectors must be the ones the
    articles were compared with (sentence-transformers pipeline and the MedCPT-style stack)."""
    source = minilm_path if pooling == "st" else plain_encoder_dir
    encoder = load_text_encoder(str(source), device="cpu")
    for text in QUERIES:
        np.testing.assert_allclose(encoder.encode_query(text), encoder.encode([text]), atol=1e-5)


def test_a_model_that_cannot_be_traced_stays_eager(
    minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from suwen.indexes import text_encoder

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("not traceable")

    monkeypatch.setattr(torch.jit, "trace", fail)
    monkeypatch.setattr(text_encoder, "_cache", {})
    encoder = load_text_encoder(str(minilm_path), device="cpu")
    np.testing.assert_allclose(encoder.encode_query(QUERIES[0]), encoder.encode(QUERIES[:1]))
