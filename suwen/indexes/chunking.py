"""Cut documents into the pieces that get embedded and searched.

An abstract that fits the encoder (title included) stays whole: splitting it would only blur
what it is about. Longer text is cut on section and sentence boundaries into pieces that fit,
each repeating the tail of the previous piece (the overlap) so a statement that straddles a cut
is still found whole in one of them. PDF pages are chunked one page at a time, so every chunk
names the page it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from suwen.sentences import split_sentences
from suwen.types import Chunk, Document

TokenCounter = Callable[[str], int]


def embedding_text(title: str, text: str) -> str:
    """What a chunk is encoded and BM25-indexed as: the article title gives every chunk its
    context."""
    return f"{title}\n{text}" if title and text else title or text


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 1.3 word-piece tokens per word) for callers without one."""
    return int(len(text.split()) * 1.3) + 2


def chunk_document(
    doc: Document,
    count_tokens: TokenCounter,
    max_tokens: int,
    *,
    overlap_tokens: int = 48,
) -> list[Chunk]:
    """The chunks of one document, numbered from 0 (``<pmid>#<n>``)."""
    # The title goes with every chunk when it is embedded, so it takes from each chunk's budget.
    title_cost = count_tokens(doc.title) if doc.title else 0
    budget = max(16, max_tokens - title_cost)
    overlap = min(overlap_tokens, budget // 4)
    pieces: list[tuple[int | None, str]]
    if doc.pages is not None:
        pieces = [
            (number, piece)
            for number, page in enumerate(doc.pages, start=1)
            for piece in split_text(page, count_tokens, budget, overlap)
        ]
    else:
        pieces = [(None, piece) for piece in split_text(doc.text, count_tokens, budget, overlap)]
    if not pieces and doc.title:
        pieces = [(None, "")]  # a title-only record is still findable by its title
    return [
        Chunk(id=f"{doc.pmid}#{number}", pmid=doc.pmid, text=text, page=page)
        for number, (page, text) in enumerate(pieces)
    ]


def split_text(text: str, count_tokens: TokenCounter, budget: int, overlap: int) -> list[str]:
    """``text`` whole if it fits ``budget`` tokens, else sentence-packed pieces with overlap."""
    text = text.strip()
    if not text:
        return []
    if count_tokens(text) <= budget:
        return [text]
    units = [(s, count_tokens(s)) for s in _fitting_units(text, count_tokens, budget)]
    return list(_pack(units, budget, overlap))


def _fitting_units(text: str, count_tokens: TokenCounter, budget: int) -> Iterator[str]:
    """Sentences, with any sentence longer than the budget cut on word boundaries."""
    for sentence in split_sentences(text):
        if count_tokens(sentence) <= budget:
            yield sentence
            continue
        words: list[str] = []
        for word in sentence.split():
            if words and count_tokens(" ".join([*words, word])) > budget:
                yield " ".join(words)
                words = []
            words.append(word)
        if words:
            yield " ".join(words)


def _pack(units: list[tuple[str, int]], budget: int, overlap: int) -> Iterator[str]:
    """Greedy packing of sentences into pieces; each new piece starts with the last sentences
    of the previous one, up to ``overlap`` tokens."""
    current: list[tuple[str, int]] = []
    used = 0
    for unit in units:
        # +1 token per joint is a safe margin for the space the join adds.
        if current and used + unit[1] + 1 > budget:
            yield " ".join(s for s, _ in current)
            current = _tail(current, overlap, budget - unit[1] - 1)
            used = sum(n + 1 for _, n in current)
        current.append(unit)
        used += unit[1] + 1
    if current:  # never empty of new text here: every emit is followed by an append
        yield " ".join(s for s, _ in current)


def _tail(units: list[tuple[str, int]], overlap: int, room: int) -> list[tuple[str, int]]:
    tail: list[tuple[str, int]] = []
    used = 0
    for unit in reversed(units):
        if used + unit[1] + 1 > min(overlap, room):
            break
        tail.insert(0, unit)
        used += unit[1] + 1
    return tail
