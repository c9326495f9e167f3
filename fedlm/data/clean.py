"""Normalise text (NFKC, control characters, whitespace), tell its script, and filter by quality.

`normalize(text)` is what every document goes through first; `quality_reason(text)` says why
a document should be dropped (or None to keep it); `script_of(text)` says whether it is
mostly Latin, CJK or another script, for the card's language mix and dedup's shingling.

The filter defaults are deliberately conservative: they keep ordinary prose, code-heavy
reStructuredText, one-line ICD-10 entries ("A00.0 Cholera due to Vibrio cholerae 01") and
short Chinese poems, and drop what is clearly not text: nearly empty documents, runs of
symbols, and documents that are mostly the same line repeated.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Literal

import numpy as np

Script = Literal["latin", "cjk", "other"]

MIN_CHARS = 8
"""Drop documents with fewer non-space characters than this."""
MAX_SYMBOL_RATIO = 0.5
"""Drop documents where more than this share of non-space characters are neither letters,
digits nor marks (punctuation and symbols); prose is ~3-5%, code-heavy docs 15-35%."""
MAX_REPEATED_LINES_RATIO = 0.6
"""Drop documents (of >= 6 lines) where more than this share of the characters is in lines
that repeat an earlier line of the same document."""

# C0/C1 controls except tab and newline, plus zero-width space, BOM, soft hyphen.
_CONTROL = re.compile("[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")
_ASCII_NOT_CONTROL = bytes(c for c in range(128) if not _CONTROL.match(chr(c)))
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_TRAILING_SPACE_REVERSED = re.compile(r"\n[ \t]+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]|_")
_ASCII_WORD_OR_SPACE = bytes(
    c for c in range(128) if chr(c).isalnum() or chr(c).isspace())


def normalize(text: str) -> str:
    """NFKC, drop control characters, unify newlines, strip trailing spaces and blank runs."""
    if not text.isascii() and not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # each substitution only when a cheap test says it has work to do
    if (text.encode("ascii").translate(None, _ASCII_NOT_CONTROL) if text.isascii()
            else _CONTROL.search(text)):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:
        # reversed, each run ends up after its newline: the pattern then starts with a
        # literal, which `re` finds far faster than a class as common as the space
        text = _TRAILING_SPACE_REVERSED.sub("\n", text[::-1])[::-1]
    while "\n\n\n" in text:  # str.replace passes: faster than a regex over every newline
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def script_of(text: str, sample: int = 20_000) -> Script:
    """The main script of `text` (from its first `sample` characters): latin, cjk or other."""
    head = text[:sample]
    if head.isascii():
        return "latin"
    if len(head) >= _NUMPY_MIN:  # counted over code points: a regex match list costs more
        cp = _code_points(head)
        cjk = int(np.count_nonzero(
            ((cp >= 0x3040) & (cp <= 0x30FF)) | ((cp >= 0x3400) & (cp <= 0x4DBF))
            | ((cp >= 0x4E00) & (cp <= 0x9FFF)) | ((cp >= 0xAC00) & (cp <= 0xD7AF))
            | ((cp >= 0xF900) & (cp <= 0xFAFF))))
        latin = int(np.count_nonzero(((cp >= 65) & (cp <= 90)) | ((cp >= 97) & (cp <= 122))
                                     | ((cp >= 0xC0) & (cp <= 0x24F))))
    else:
        cjk = len(_CJK.findall(head))
        latin = len(_LATIN.findall(head))
    letters = sum(1 for c in head if c.isalpha()) if cjk + latin < len(head) // 4 else cjk + latin
    if cjk >= 0.3 * max(letters, 1) and cjk > 0:
        return "cjk"
    if latin >= 0.5 * max(letters, 1):
        return "latin"
    return "other"


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are neither letters, digits nor marks."""
    if text.isascii():
        raw = text.encode("ascii")
        nonspace = len(raw) - raw.count(b" ") - raw.count(b"\t") - raw.count(b"\n")
        symbols = len(raw.translate(None, _ASCII_WORD_OR_SPACE))
    else:
        nonspace = len(text) - text.count(" ") - text.count("\t") - text.count("\n")
        symbols = (_count_symbols(text) if len(text) >= _NUMPY_MIN
                   else len(text) - len(_NOT_WORD_OR_SPACE.sub("", text)))
    return symbols / max(nonspace, 1)


_NUMPY_MIN = 2048  # shorter texts: regex (numpy's fixed cost per call is larger)
_LOW = 0x3000  # code points below this are classified by a table


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@functools.cache
def _low_word_or_space() -> np.ndarray:
    """Per code point below _LOW: `\\w` or `\\s` as `re` means them (isalnum, '_' aside, or isspace)."""
    return np.array([chr(c).isalnum() or chr(c).isspace() for c in range(_LOW)], dtype=bool)


def _count_symbols(text: str) -> int:
    """Characters of `text` that `_NOT_WORD_OR_SPACE` matches: neither alphanumeric nor space."""
    cp = _code_points(text)
    low = cp < _LOW
    n = int(np.count_nonzero(~_low_word_or_space()[cp[low]]))
    high, counts = np.unique(cp[~low], return_counts=True)
    return n + sum(k for c, k in zip(high.tolist(), counts.tolist(), strict=True)
                   if not (chr(c).isalnum() or chr(c).isspace()))


def repeated_lines_ratio(text: str) -> tuple[float, int]:
    """(share of characters in lines repeating an earlier line, number of non-empty lines)."""
    lines = list(map(str.strip, text.split("\n")))
    total = sum(map(len, lines))
    # the first occurrence of each distinct line is not a repeat (empty lines weigh nothing)
    repeated = total - sum(map(len, dict.fromkeys(lines)))
    return repeated / max(total, 1), len(lines) - lines.count("")


def quality_reason(text: str, *, min_chars: int = MIN_CHARS,
                   max_symbol_ratio: float = MAX_SYMBOL_RATIO,
                   max_repeated_lines_ratio: float = MAX_REPEATED_LINES_RATIO) -> str | None:
    """Why this normalised document should be dropped ('too_short', 'symbols',
    'repeated_lines'), or None to keep it."""
    if len(text) < min_chars or (
            len(text) < 64 * min_chars and len("".join(text.split())) < min_chars):
        return "too_short"
    if symbol_ratio(text) > max_symbol_ratio:
        return "symbols"
    if text.count("\n") >= 5:  # six non-empty lines need five newlines
        ratio, lines = repeated_lines_ratio(text)
        if lines >= 6 and ratio > max_repeated_lines_ratio:
            return "repeated_lines"
    return None
