"""MedEvalKit's prompt templates, word for word, so plain-mode numbers stand beside published ones.

Re-implemented from MedEvalKit's ``utils/question_formats.py`` (non-reasoning, English variants)
and ``utils/MMMU/data_utils.py::construct_prompt``; see docs/evaluation.md. Every string below is
part of the benchmark contract: changing a space changes what the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Lang = Literal["en", "zh"]

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please output 'yes' or 'no'(no extra output)."
CLOSED_INSTRUCTION = "Answer the question using a single word or phrase."
OPEN_INSTRUCTION = "Please answer the question concisely."
# MedEvalKit's Chinese instructions (``lang == "zh"``), used for SLAKE's Chinese questions.
CLOSED_INSTRUCTION_ZH = "请用一个单词或者短语回答该问题。"
OPEN_INSTRUCTION_ZH = "请简要回答该问题。"
# MedEvalKit's multi-image layout: "<image_i>: " before each image (1-based).
IMAGE_LABEL = "<image_{index}>: "
REPORT_PROMPT = (
    "You are a helpful assistant. Please generate a report for the given images, including both "
    "findings and impressions. Return the report in the following format: Findings: {} "
    "Impression: {}."
)


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """``get_multiple_choice_prompt``: note the leading newline and the space after 'Options:'."""
    options = "\n".join(str(choice) for choice in choices)
    return f"\nQuestion: {question}\nOptions: \n{options}" + "\n" + CHOICE_INSTRUCTION


def yes_no_prompt(question: str) -> str:
    """``get_judgement_prompt``."""
    return question + "\n" + YES_NO_INSTRUCTION


def closed_prompt(question: str, lang: Lang = "en") -> str:
    """``get_close_ended_prompt`` (its ``zh`` variant for Chinese questions)."""
    return question + "\n" + (CLOSED_INSTRUCTION_ZH if lang == "zh" else CLOSED_INSTRUCTION)


def open_prompt(question: str, lang: Lang = "en") -> str:
    """``get_open_ended_prompt`` (its ``zh`` variant for Chinese questions)."""
    return question + "\n" + (OPEN_INSTRUCTION_ZH if lang == "zh" else OPEN_INSTRUCTION)


def image_labels(count: int) -> list[str]:
    """The text MedEvalKit puts before each image of a multi-image prompt."""
    return [IMAGE_LABEL.format(index=index) for index in range(1, count + 1)]


def pubmedqa_prompt(context: str, question: str, choices: Sequence[str]) -> str:
    """PubMedQA: the abstract's sections joined by newlines, then the multiple-choice prompt."""
    return f"Context: {context}" + "\n" + multiple_choice_prompt(question, choices)


def report_prompt() -> str:
    """``get_report_generation_prompt`` (IU-Xray): the literal braces are part of the prompt."""
    return REPORT_PROMPT


# MedEvalKit's MIMIC_CXR loader writes the same words inline as an indented triple-quoted
# string: the line breaks and the eight spaces before the text and the closing quotes are part
# of what the model is sent.
MIMIC_REPORT_PROMPT = "\n        " + REPORT_PROMPT + "\n        "


def mimic_report_prompt() -> str:
    """``MIMIC_CXR.construct_messages``'s prompt, whitespace included."""
    return MIMIC_REPORT_PROMPT


def mmmu_choice_prompt(question: str, options: Sequence[str]) -> str:
    """MMMU's own multiple-choice layout as MedEvalKit builds it: '(A) option' lines between
    blank lines, then eight spaces of indentation before the instruction."""
    example = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(options))
    return f"\n{question}\n\n{example}\n\n        " + CHOICE_INSTRUCTION


def mmmu_open_prompt(question: str) -> str:
    """MMMU's open questions as MedEvalKit builds them."""
    return f"\n{question}\n\n        " + CLOSED_INSTRUCTION


def judge_prompt(question: str, response: str, answer: str) -> str:
    """MedEvalKit's judge prompt (``utils/utils.py::get_compare_messages``); '0' = correct."""
    return f"""
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers (for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, so it is correct.</think>
<judge>0</judge>
    """  # noqa: E501
