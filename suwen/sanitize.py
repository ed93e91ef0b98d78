"""Untrusted text made safe: for a prompt (``for_prompt``) and for a terminal (``for_terminal``).

Untrusted means anything Suwen did not write itself: PubMed passages and titles, case captions,
ids, modality and body-part fields, file names, questions read from files, the model's own
earlier replies replayed as history.

In a prompt, text must not be able to forge the conversation. The served model's tokenizer
turns the *text* ``<|im_start|>`` into the role token, so a passage holding it could open a
system turn, and ``<|image_pad|>`` would claim an image the request does not carry. So every
untrusted string goes through ``for_prompt``, which
- normalises Unicode (NFKC): fullwidth ``＜｜im_end｜＞`` becomes ``<|im_end|>`` and is caught;
- drops invisible characters (zero-width, soft hyphen, BOM, bidi controls: Unicode category
  Cf) and control characters (Cc) except newline and tab, so ``<|im_\u200bstart|>`` is caught;
- neutralises every special and added token of the served tokenizer (``register_model``
  reads them from its files; Qwen2.5-VL's are known without it), any ``<|`` ... ``|>`` pair,
  and anything that looks like an evidence tag, by swapping their angle brackets for the
  harmless look-alikes ``‹ ›`` (no tokenizer turns those into a special token).
The result is stable: cleaning cleaned text changes nothing.

In a terminal, text must not be able to drive the terminal: ``for_terminal`` removes escape
sequences (ANSI CSI and OSC, including OSC 8 hyperlinks) and every other control character,
and bidi overrides that make text read differently than it is. Markup safety is the renderer's
job (``suwen.commands.common.literal``).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import unicodedata
from collections.abc import Iterable
from pathlib import Path

# Qwen2.5-VL's (Lingshu's) special tokens, in Qwen's order (their ids follow the vocabulary).
QWEN2_5_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added but not special (they survive decoding with skip_special_tokens); the tokenizer still
# matches each as a single token, so data must not carry them either.
QWEN2_5_VL_PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN2_5_VL_TOKENS = QWEN2_5_VL_SPECIAL_TOKENS + QWEN2_5_VL_PLAIN_ADDED_TOKENS
OPEN_LOOKALIKE = "‹"  # U+2039: NFKC leaves it alone, and it is never part of a special token
CLOSE_LOOKALIKE = "›"  # U+203A

# Tokenizer files that list special and added tokens (Hugging Face layout).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_TOKENIZER_FILE_BYTES = 64 << 20  # a tokenizer.json is a few MB; refuse to parse more
# Sanitised texts kept for the next prompt that shows them: an evidence chunk is a few thousand
# characters at most, so the cache holds at most 2048 x 4096 characters, twice (text and result).
PROMPT_CACHE_SIZE = 2048
CACHED_TEXT_CHARS = 4096  # longer texts (a whole page or document) are sanitised each time

_KEPT_CONTROLS = frozenset("\n\t")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
# Any <| ... |> whatever its name, and the opening half of an evidence tag (with or without
# its '>', a '/', or spaces inside: '</ evidence', '<evidence-1234>' ...).
_PIPE_OPEN = re.compile(r"<(?=\|)")
_PIPE_CLOSE = re.compile(r"(?<=\|)>")
_EVIDENCE_TAG = re.compile(r"<(?=\s*/?\s*evidence)", re.IGNORECASE)
# ESC-introduced sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other 2-byte
# escapes; and the 8-bit CSI/OSC introducers.
_TERMINAL_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|\x9d[^\x07\x9c]*[\x07\x9c]?"
)


class _TokenRegistry:
    """The tokens to neutralise: Qwen2.5-VL's, plus those of every served model registered.
    It only grows: neutralising a token another model does not have costs nothing."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._tokens: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(tokens)

    def add(self, tokens: Iterable[str]) -> None:
        wanted = {token for token in tokens if token.strip()}
        with self._lock:
            if wanted <= self._tokens:
                return
            tokens = self._tokens | wanted
            longest_first = sorted(tokens, key=len, reverse=True)
            # The pattern first: whoever sees the new tokens (the cache key of sanitised
            # texts) also sees the pattern that neutralises them.
            self._pattern = re.compile("|".join(map(re.escape, longest_first)))
            self._tokens = tokens

    @property
    def tokens(self) -> frozenset[str]:
        return self._tokens

    def neutralise(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(lambda match: _defused_token(match.group(0)), text)


def _defused_token(token: str) -> str:
    """``<|im_start|>`` -> ``‹|im_start|›``; a token without angle brackets (``[INST]``) gets a
    space after its first character, which no tokenizer maps back to the token."""
    if token.startswith("<") or token.endswith(">"):
        return token.replace("<", OPEN_LOOKALIKE).replace(">", CLOSE_LOOKALIKE)
    return token[0] + " " + token[1:]


_registry = _TokenRegistry(QWEN2_5_VL_TOKENS)


def neutralised_tokens() -> frozenset[str]:
    """Every token ``for_prompt`` neutralises by name (besides any ``<|...|>``)."""
    return _registry.tokens


# ASCII's invisible characters are its controls (Cc); ``str.translate`` drops them in C.
_ASCII_INVISIBLE = {code: None for code in (*range(0x20), 0x7F) if chr(code) not in _KEPT_CONTROLS}


def drop_invisible(text: str) -> str:
    """Without control characters (newline and tab kept) and invisible format characters."""
    if text.isascii():  # most text: one pass in C instead of a category lookup per character
        return text.translate(_ASCII_INVISIBLE)
    return _invisible().sub("", text)


@functools.cache
def _invisible() -> re.Pattern[str]:
    """One character class of every invisible code point (the categories above, newline and
    tab left out) from this Python's Unicode database: the regex engine finds them in C.
    Built once per process, on the first text that is not ASCII."""
    runs: list[list[int]] = []
    for code in range(0x110000):
        char = chr(code)
        if char in _KEPT_CONTROLS or unicodedata.category(char) not in _INVISIBLE_CATEGORIES:
            continue
        if runs and runs[-1][1] == code - 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in runs) + "]")


def for_prompt(text: str) -> str:
    """``text`` safe to place in a prompt: nothing in it can become a special token, a role
    marker, an image placeholder or an evidence tag. Line breaks are kept (``\\r\\n`` and
    Unicode line separators become ``\\n``)."""
    if not text:
        return ""
    if len(text) > CACHED_TEXT_CHARS:
        return _for_prompt(text, _registry.tokens)
    # An evidence text goes into every prompt that shows it (rereads, decision, answer) and
    # a corpus's texts recur across questions: each is sanitised once. The tokens are part of
    # the key, so a token registered later is neutralised in texts seen before it.
    return _for_prompt_cached(text, _registry.tokens)


def _for_prompt(text: str, _tokens: frozenset[str]) -> str:
    text = re.sub(r"\r\n?|[\u2028\u2029\x85]", "\n", text)
    text = unicodedata.normalize("NFKC", drop_invisible(text))
    text = drop_invisible(text)  # NFKC may compose characters next to what was dropped
    text = _registry.neutralise(text)
    text = _PIPE_OPEN.sub(OPEN_LOOKALIKE, text)
    text = _PIPE_CLOSE.sub(CLOSE_LOOKALIKE, text)
    return _EVIDENCE_TAG.sub(OPEN_LOOKALIKE, text)


_for_prompt_cached = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(_for_prompt)


def line_for_prompt(text: str) -> str:
    """``for_prompt`` on one line: every run of whitespace (line breaks included) becomes one
    space, so a title or id cannot start a line that looks like a new evidence item."""
    return " ".join(for_prompt(text).split())


def for_terminal(text: str) -> str:
    """``text`` as literal characters for a terminal: escape sequences, control characters
    (newline and tab kept) and invisible format characters (bidi overrides) removed."""
    if not text:
        return ""
    text = _TERMINAL_ESCAPE.sub("", text.replace("\r\n", "\n"))
    return drop_invisible(text)


def line_for_terminal(text: str) -> str:
    """``for_terminal`` on one line (table cells, error messages)."""
    return " ".join(for_terminal(text).split())


# -- the served model's tokens ---------------------------------------------------------------


def tokenizer_tokens(model_dir: Path) -> frozenset[str]:
    """Every special and added token named in the tokenizer files of ``model_dir``: the
    ``added_tokens`` of tokenizer.json, the ``added_tokens_decoder`` and special-token fields of
    tokenizer_config.json, and special_tokens_map.json (what ``all_special_tokens`` plus the
    added vocabulary of a transformers tokenizer hold). Unreadable files add nothing."""
    found: set[str] = set()
    for name in TOKENIZER_FILES:
        data = _read_json(model_dir / name)
        if data is None:
            continue
        found.update(_token_strings(data.get("added_tokens")))
        decoder = data.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in decoder.values():
                found.update(_token_strings(entry))
        for key, value in data.items():
            if key.endswith("_token") or key == "additional_special_tokens":
                found.update(_token_strings(value))
    return frozenset(found)


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token_strings(value: object) -> list[str]:
    """Token strings from a tokenizer file's value: a string, an AddedToken dict, or a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return [value["content"]]
    if isinstance(value, list):
        return [token for item in value for token in _token_strings(item)]
    return []


def local_model_dir(model: str) -> Path | None:
    """The local folder holding ``model``'s tokenizer: ``model`` itself when it is a folder,
    else its snapshot in the Hugging Face cache (looked up on disk only, never online)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "tokenizer_config.json")
    except Exception:  # not a valid repo id, or no cache: nothing to read
        return None
    return Path(cached).parent if isinstance(cached, str) else None


@functools.lru_cache(maxsize=16)
def register_model(model: str) -> frozenset[str]:
    """Neutralise from now on every special and added token of the tokenizer of ``model`` (a
    folder or a hub id with a local snapshot); returns the tokens found there. A model
    without local tokenizer files adds nothing: Qwen2.5-VL's tokens and any ``<|...|>`` are
    neutralised whatever is served."""
    directory = local_model_dir(model)
    tokens = tokenizer_tokens(directory) if directory is not None else frozenset()
    _registry.add(tokens)
    return tokens
