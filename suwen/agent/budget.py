"""The answer prompt fitted to the served model's length, with room for the answer.

Worked examples cost an image's tokens each and evidence passages hundreds of tokens, so a
prompt built for a large model length can overflow a small one (the offline demo's 4,096
tokens), and vLLM then refuses the request outright. Before the answer is asked for, the prompt
is measured as the server counts it (``PromptMeasure``: its text through the server's tokenizer,
its images at the size they are sent); while it and the answer's ``max_tokens`` do not fit the
model length, case examples go first (least relevant first: the most relevant example helps
most), then evidence items (least relevant first, so the numbers of those kept do not change).
What was left out is said in the answer step's trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from suwen.agent.examples import CaseExample
from suwen.errors import ModelError
from suwen.llm.base import Message, PromptMeasure, PromptSize, VisionLanguageModel
from suwen.types import Evidence

BuildPrompt = Callable[[list[CaseExample], list[Evidence]], list[Message]]


@dataclass(frozen=True)
class FittedPrompt:
    messages: list[Message]
    examples: list[CaseExample]  # the examples shown, least relevant first
    numbered: list[Evidence]  # the evidence shown, most relevant first
    note: str = ""  # what was left out, or why nothing was measured; "" when all fit


async def fit_answer_prompt(
    model: VisionLanguageModel,
    build: BuildPrompt,
    examples: list[CaseExample],
    numbered: list[Evidence],
    max_tokens: int,
) -> FittedPrompt:
    """The answer prompt with as many ``examples`` and ``numbered`` evidence items as fit the
    model length beside ``max_tokens`` of answer."""
    messages = build(examples, numbered)
    if not (examples or numbered) or not isinstance(model, PromptMeasure):
        return FittedPrompt(messages, examples, numbered)
    shown_examples, shown_evidence = list(examples), list(numbered)
    while True:
        try:
            size = await model.prompt_size(messages)
        except ModelError as exc:
            note = f"prompt length not measured ({exc})"
            return FittedPrompt(messages, shown_examples, shown_evidence, note)
        if _fits(size, max_tokens) or not (shown_examples or shown_evidence):
            break
        if shown_examples:
            shown_examples = shown_examples[1:]
        else:
            shown_evidence = shown_evidence[:-1]
        messages = build(shown_examples, shown_evidence)
    dropped = (len(examples) - len(shown_examples), len(numbered) - len(shown_evidence))
    note = _note(size, max_tokens, *dropped)
    return FittedPrompt(messages, shown_examples, shown_evidence, note)


def _fits(size: PromptSize, max_tokens: int) -> bool:
    return size.limit is None or size.tokens + max_tokens <= size.limit


def _note(size: PromptSize, max_tokens: int, examples: int, evidence: int) -> str:
    room = f"the model length ({size.limit} tokens, {max_tokens} kept for the answer)"
    if not _fits(size, max_tokens):
        bare = "even without examples and evidence"
        return f"prompt of {size.tokens} tokens does not fit {room} {bare}"
    left_out = [
        f"{count} {what}"
        for count, what in ((examples, "case example(s)"), (evidence, "evidence item(s)"))
        if count
    ]
    if not left_out:
        return ""
    return f"{' and '.join(left_out)} left out to fit {room}; prompt {size.tokens} tokens"
