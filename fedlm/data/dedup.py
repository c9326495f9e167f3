"""Exact and near-duplicate detection for a stream of documents.

`Deduper.check(text, script)` returns None for a document seen for the first time, or
"exact" / "near" for a duplicate of an earlier one (which is kept). Exact: a hash of the
text lower-cased with whitespace collapsed. Near: MinHash (datasketch, `num_perm`
permutations) of the document's shingles, indexed with MinHash LSH at `threshold`; an LSH
candidate counts only if its estimated Jaccard similarity also reaches the threshold.

Shingles: word 5-grams for Latin and other space-separated scripts, character 3-grams
(spaces removed) for CJK text, which has no spaces between words. Shingles are hashed with
CRC-32 (deterministic across runs, unlike Python's `hash`), so the same input always
gives the same documents out.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

WORD_SHINGLE = 5
CHAR_SHINGLE = 3
NUM_PERM = 128
_BATCH = 8192
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _identity(x: int) -> int:
    return x


def shingle_hashes(text: str, script: str) -> np.ndarray:
    """32-bit hashes of the distinct shingles of `text` (word 5-grams, or char 3-grams for CJK)."""
    if script == "cjk":
        units = np.frombuffer("".join(text.lower().split()).encode("utf-32-le"), dtype=np.uint32)
        k = CHAR_SHINGLE
    else:
        words = _WORD.findall(text.lower())
        units = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint32,
                            count=len(words))
        k = WORD_SHINGLE
    if len(units) == 0:
        return np.zeros(1, dtype=np.uint32)
    k = min(k, len(units))
    h = np.zeros(len(units) - k + 1, dtype=np.uint64)
    for i in range(k):  # polynomial hash of k consecutive units, wrapping mod 2**64
        h = h * _MIX + units[i: len(units) - k + 1 + i].astype(np.uint64)
    h ^= h >> np.uint64(29)
    return np.unique((h ^ (h >> np.uint64(32))).astype(np.uint32))


def minhash(hashes: np.ndarray, template: MinHash) -> MinHash:
    """A datasketch MinHash of pre-hashed 32-bit shingles, fed in batches to bound memory.

    `template` is an empty MinHash whose permutations are reused (building them is costly).
    """
    m = template.copy()
    for i in range(0, len(hashes), _BATCH):
        m.update_batch(hashes[i: i + _BATCH].tolist())
    return m


def exact_key(text: str) -> bytes:
    """Hash of the text lower-cased with whitespace collapsed."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


class Deduper:
    """Remembers documents seen so far and says whether a new one duplicates one of them."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self._exact: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._sigs: dict[int, np.ndarray] = {}
        self._template = MinHash(num_perm=num_perm, hashfunc=_identity)

    def check(self, text: str, script: str = "latin") -> str | None:
        """None if `text` is new (and remember it), else 'exact' or 'near'."""
        key = exact_key(text)
        if key in self._exact:
            return "exact"
        self._exact.add(key)
        m = minhash(shingle_hashes(text, script), self._template)
        for cand in self._lsh.query(m):
            if np.count_nonzero(self._sigs[cand] == m.hashvalues) >= self.threshold * self.num_perm:
                return "near"
        idx = len(self._sigs)
        self._sigs[idx] = m.hashvalues
        self._lsh.insert(idx, m)
        return None
