"""How sure the model is of its answer, read from its own token probabilities.

Closed answers (an option letter, yes/no/maybe, yes/no): one probe request replays the answer
prompt and the model's reply up to the place where it wrote its short answer (a vLLM prefill),
asks for one token, and reads the log-probability of the first token of every allowed answer
(" A", "A", "yes", " Yes", ...). The confidence is the chosen answer's share of the probability
mass on the allowed answers; the probe costs one request of one completion token whose prompt
the server's prefix cache already holds.

Open and free answers: a self-check (P(True), Kadavath et al. 2022): the model sees the question
and its own answer and is asked whether the answer is correct; the confidence is p(yes) /
(p(yes) + p(no)) at the first token of its reply. Also one request of one completion token.

A candidate whose first token is shared with another answer's (the lone space of " A" in a
tokenizer that splits it, say) says nothing about which answer is meant and is left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from PIL import Image

from suwen.agent import prompts
from suwen.errors import ModelError
from suwen.llm.base import LogprobRequest, Message, TokenLogprobs, VisionLanguageModel
from suwen.sanitize import for_prompt
from suwen.types import AnswerFormat, Confidence, ConfidenceSource

YES_NO = ("yes", "no")
YES_NO_MAYBE = ("yes", "no", "maybe")
_LABEL_LINE = re.compile(r"short[ -]answer[\s*_]*[:：][ \t*_]*", re.IGNORECASE)
SHORT_REPLY_WORDS = 8
PROBE_PURPOSE = "confidence"
# Texts whose first token starts no answer in particular: a candidate sharing it is left out.
NOT_AN_ANSWER = (" ",)


def word_variants(word: str) -> list[str]:
    return [word, " " + word, word.capitalize(), " " + word.capitalize()]


def answer_labels(answer_format: AnswerFormat, short: str | None) -> dict[str, list[str]] | None:
    """Allowed answers and the texts that start them, or None for an open answer."""
    kind = answer_format.kind
    if kind == "choice" and answer_format.options:
        return {key: [key, " " + key] for key in answer_format.options}
    if kind == "yes_no":
        return {word: word_variants(word) for word in YES_NO_MAYBE}
    if kind == "closed" and short in YES_NO:
        return {word: word_variants(word) for word in YES_NO}
    return None


def label_distribution(
    position: TokenLogprobs, labels: dict[str, list[str]]
) -> tuple[dict[str, float], float]:
    """``(answer -> share of the mass, total mass on the answers)`` at one position. A first
    token counts once, and only when it starts exactly one answer."""
    label_of = {variant: label for label, variants in labels.items() for variant in variants}
    owners: dict[int, set[str]] = {}
    for candidate in position.candidates:
        # A text that is no answer's (a lone space) marks its token as starting none.
        owners.setdefault(candidate.token_id, set()).add(label_of.get(candidate.text, ""))
    probs = dict.fromkeys(labels, 0.0)
    counted: set[int] = set()
    for candidate in position.candidates:
        token = candidate.token_id
        if token in counted or len(owners[token]) != 1 or candidate.text not in label_of:
            continue
        counted.add(token)
        probs[next(iter(owners[token]))] += math.exp(candidate.logprob)
    mass = sum(probs.values())
    if mass <= 0:
        return {}, 0.0
    return {label: p / mass for label, p in probs.items()}, min(1.0, mass)


def answer_prefix(reply: str, short: str, answer_format: AnswerFormat) -> str | None:
    """The reply up to where its short answer starts (what the probe replays), or None when the
    short answer is not written in the reply (it was asked for separately)."""
    labelled = list(_LABEL_LINE.finditer(reply))
    if labelled:
        return reply[: labelled[-1].end()].rstrip(" \t")
    if len(reply.split()) > SHORT_REPLY_WORDS:
        return None
    if answer_format.kind == "choice":
        pattern = rf"(?<![A-Za-z]){re.escape(short)}(?![A-Za-z])"
        match = re.search(pattern, reply)
    else:
        match = re.search(rf"\b{re.escape(short)}\b", reply, re.IGNORECASE)
    return reply[: match.start()].rstrip(" \t") if match else None


async def _probe(
    model: VisionLanguageModel,
    messages: list[Message],
    prefill: str | None,
    labels: dict[str, list[str]],
) -> tuple[dict[str, float], float] | None:
    variants = [v for texts in labels.values() for v in texts]
    candidates = list(dict.fromkeys([*variants, *NOT_AN_ANSWER]))
    reply = await model.chat(
        messages,
        max_tokens=1,
        temperature=0.0,
        purpose=PROBE_PURPOSE,
        # The model's own reply goes back into the prompt: sanitised like any untrusted text.
        prefill=for_prompt(prefill) if prefill else None,  # empty: the plain start of a reply
        logprobs=LogprobRequest(candidates=candidates),
    )
    if not reply.logprobs:
        return None
    distribution, mass = label_distribution(reply.logprobs[0], labels)
    return (distribution, mass) if distribution else None


async def closed_confidence(
    model: VisionLanguageModel,
    messages: list[Message],
    reply: str,
    short: str,
    answer_format: AnswerFormat,
) -> Confidence:
    """The short answer's probability among the allowed answers, at the position where the
    model wrote it (after ``messages``, the prompt that produced ``reply``)."""
    labels = answer_labels(answer_format, short)
    if labels is None or short not in labels:
        return Confidence(note=f"{short!r} is not one of the allowed answers")
    prefix = answer_prefix(reply, short, answer_format)
    if prefix is None:
        # The short answer was asked for separately: probe the end of the explanation.
        prefix = f"{reply.rstrip()}\n\n{prompts.SHORT_ANSWER_LABEL}"
    try:
        probed = await _probe(model, messages, prefix, labels)
    except ModelError as exc:
        return Confidence(note=f"probe failed: {exc}")
    if probed is None:
        return Confidence(note="the model returned no probability for any allowed answer")
    distribution, mass = probed
    source: ConfidenceSource = (
        "option-probability" if answer_format.kind == "choice" else ("yes-no-probability")
    )
    return Confidence(
        value=distribution[short], source=source, distribution=distribution, mass=mass
    )


async def self_check_confidence(
    model: VisionLanguageModel,
    question: str,
    images: Sequence[Image.Image],
    answer: str,
    history: list[Message] | None = None,
) -> Confidence:
    """P(True): the model's probability that its own answer is correct (``history``: the
    conversation so far, which a follow-up question needs to be understood)."""
    if not answer.strip():
        return Confidence(note="no answer to check")
    labels = {word: word_variants(word) for word in YES_NO}
    messages = prompts.self_check_messages(question, images, answer, history or [])
    try:
        probed = await _probe(model, messages, None, labels)
    except ModelError as exc:
        return Confidence(note=f"self-check failed: {exc}")
    if probed is None:
        return Confidence(note="the model returned no probability for yes or no")
    distribution, mass = probed
    return Confidence(
        value=distribution["yes"], source="self-check", distribution=distribution, mass=mass
    )


async def answer_confidence(
    model: VisionLanguageModel,
    *,
    messages: list[Message],
    reply: str,
    short: str | None,
    answer_format: AnswerFormat,
    question: str,
    images: Sequence[Image.Image],
    answer: str,
    history: list[Message] | None = None,
) -> Confidence:
    """Token probabilities for a closed short answer, else the self-check."""
    if short is not None and answer_labels(answer_format, short) is not None:
        return await closed_confidence(model, messages, reply, short, answer_format)
    return await self_check_confidence(model, question, images, answer, history)
