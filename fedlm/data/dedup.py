"""Exact and near-duplicate detection for a stream of documents.

`Deduper.check_batch(texts, scripts)` returns, per document, None for one seen for the first
time, or "exact" / "near" for a duplicate of an earlier one (which is kept); `check(text,
script)` does one. Exact: a hash of the text lower-cased with whitespace collapsed. Near: a
`num_perm`-value MinHash-style signature of the document's shingles, indexed with datasketch's
`MinHashLSH` at `threshold` (bands chosen to favour recall); an LSH candidate counts only if its estimated Jaccard similarity
(the share of equal signature values) also reaches the threshold.

Shingles: word 5-grams for Latin and other space-separated scripts (words as `\\w+` of the
lower-cased text), character 3-grams (spaces removed) for CJK text, which has no spaces
between words. A document with fewer units than that is one shingle. Shingles are hashed with
a fixed 64-bit polynomial hash and MurmurHash3's finaliser (deterministic across runs, unlike
Python's `hash`), so the same input always gives the same documents out.

The signature is a fast similarity sketch (Dahlgaard, Knudsen and Thorup, "Fast similarity
sketching", FOCS 2017): `num_perm` bins, filled round by round, each shingle giving one bin
a value per round (details in `signatures`). For two documents each value is equal with
probability exactly their Jaccard similarity, and estimates are as tight as with `num_perm`
MinHash permutations, small documents included, but it costs about O(shingles + num_perm log
num_perm) instead of O(shingles * num_perm): datasketch's permutations `(a*h + b) % p` cost
more CPU than the whole rest of `prepare`. All documents of a batch are hashed at once in
numpy (no Python loop per word or per shingle).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.storage import DictSetStorage

WORD_SHINGLE = 5
CHAR_SHINGLE = 3
NUM_PERM = 128
_BATCH = 8192
LSH_WEIGHTS = (0.1, 0.9)
"""datasketch MinHashLSH (false positive, false negative) weights when choosing bands."""
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
_U32 = np.uint64(0xFFFFFFFF)
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # an empty bin (values are < 2**32)
_EMPTY_DOC_KEY = np.uint64(0x5BD1E9955BD1E995)  # the one "shingle" of a document without units
_SWEEP_SALT = np.uint64(0x7A3C5E1F0B9D2468)
_PROPOSALS = 1 << 14  # (shingle, round) proposals per step of `signatures`
_ASCII_WORD = np.array([chr(c).isalnum() or c == 95 for c in range(128)], dtype=bool)
_ASCII_WORD_BYTES = _ASCII_WORD.astype(np.uint8).tobytes() + bytes(128)  # a bytes.translate table
_word_table: np.ndarray | None = None
_powers: tuple[np.ndarray, np.ndarray] = (np.ones(1, np.uint64), np.ones(1, np.uint64))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit), uint64."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _unicode_word_table(top: int) -> np.ndarray:
    """A bool per code point below at least `top`: is it a `\\w` character (`str.isalnum()`
    or '_'), as `re` says. Grown by doubling as higher code points turn up."""
    global _word_table
    if _word_table is None or len(_word_table) < top:
        size = min(0x110000, max(1 << 12, 1 << int(top - 1).bit_length()))
        chars = "".join(map(chr, range(size)))
        marks = np.zeros(size + 1, dtype=np.int8)
        spans = np.array([m.span() for m in _WORD.finditer(chars)], dtype=np.int64)
        np.add.at(marks, spans[:, 0], 1)
        np.add.at(marks, spans[:, 1], -1)
        _word_table = np.cumsum(marks[:-1], dtype=np.int8).astype(bool)
    return _word_table


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(_MIX**i, _MIX**-i) mod 2**64 for i < n (cached, grown in steps of 256 Ki)."""
    global _powers
    if len(_powers[0]) < n:
        size = -(-n // (1 << 18)) * (1 << 18)
        _powers = (_geometric(int(_MIX), size), _geometric(int(_MIX_INV), size))
    return _powers[0][:n], _powers[1][:n]


def _geometric(base: int, n: int) -> np.ndarray:
    """base**i mod 2**64 for i < n (uint64), by doubling: p[m:2m] = p[:m] * base**m (an
    integer cumprod is ~10x slower)."""
    out = np.empty(max(n, 1), dtype=np.uint64)
    out[0] = 1
    m, step = 1, base % (1 << 64)  # step = base**m mod 2**64
    while m < n:
        k = min(m, n - m)
        np.multiply(out[:k], np.uint64(step), out=out[m: m + k])
        m += k
        step = step * step % (1 << 64)
    return out[:n]


def _codepoints(text: str) -> np.ndarray:
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _word_units(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the `\\w+` words of each lower-cased text, concatenated, and words per text.

    Texts are hashed in groups of about `_GROUP_CHARS` characters: the power tables the
    hashing needs grow to the longest group, not to the whole batch (tens of MB otherwise,
    and their one-off cost was most of a silo's dedup time)."""
    groups: list[Sequence[str]] = []
    first = chars = 0
    for i, t in enumerate(texts):
        if chars and chars + len(t) > _GROUP_CHARS:
            groups.append(texts[first:i])
            first, chars = i, 0
        chars += len(t) + 1
    groups.append(texts[first:])
    if len(groups) == 1:
        return _word_units_group(texts)
    parts = [_word_units_group(g) for g in groups]
    return np.concatenate([w for w, _ in parts]), np.concatenate([c for _, c in parts])


_GROUP_CHARS = 1 << 20


def _word_units_group(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    lowered = [t.lower() for t in texts]
    joined = "\n".join(lowered)  # "\n" is not a word character: words never span two texts
    padded = np.zeros(len(joined) + 2, dtype=bool)  # is_word, with False at both ends
    if joined.isascii():
        raw = joined.encode("ascii")
        cp = np.frombuffer(raw, dtype=np.uint8)
        padded[1:-1] = np.frombuffer(raw.translate(_ASCII_WORD_BYTES), dtype=bool)
    else:
        cp = _codepoints(joined)
        padded[1:-1] = _unicode_word_table(int(cp.max()) + 1)[cp]
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]  # word i is cp[starts[i]:ends[i]]
    up, down = _power_tables(len(cp))
    prefix = np.zeros(len(cp) + 1, dtype=np.uint64)
    np.cumsum(cp.astype(np.uint64) * up, out=prefix[1:])
    # polynomial hash sum_j cp[s + j] * _MIX**j of each word, mod 2**64
    words = (prefix[ends] - prefix[starts]) * down[starts]
    words = _fmix64(words ^ (ends - starts).astype(np.uint64))
    text_starts = np.cumsum([0] + [len(t) + 1 for t in lowered[:-1]], dtype=np.int64)
    counts = np.diff(np.searchsorted(starts, text_starts), append=len(starts))
    return words, counts


def _char_units(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code points of each lower-cased text with whitespace removed, concatenated, and counts."""
    squeezed = ["".join(t.lower().split()) for t in texts]
    cp = np.frombuffer("".join(squeezed).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return cp.astype(np.uint64), np.array([len(s) for s in squeezed], dtype=np.int64)


def _shingles(units: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every k-gram of units within each document, and each one's document.

    A document of 0 < u < k units is one u-gram; one of no units is one fixed key.
    """
    n = len(units)
    ends = np.cumsum(counts)
    starts = ends - counts
    padded = np.concatenate([units, np.zeros(k, dtype=np.uint64)])
    h = np.zeros(n, dtype=np.uint64)
    short_keys: list[np.ndarray] = []
    short_docs: list[np.ndarray] = []
    for t in range(k):
        h = h * _MIX + padded[t: t + n]
        if t + 1 < k:
            docs = np.flatnonzero(counts == t + 1)
            short_keys.append(h[starts[docs]])
            short_docs.append(docs)
    doc_of_unit = np.repeat(np.arange(len(counts)), counts)
    valid = np.arange(n) - starts[doc_of_unit] <= counts[doc_of_unit] - k
    empty = np.flatnonzero(counts == 0)
    keys = np.concatenate([h[valid], *short_keys, np.full(len(empty), _EMPTY_DOC_KEY)])
    docs = np.concatenate([doc_of_unit[valid], *short_docs, empty])
    return _fmix64(keys), docs


def signatures(keys: np.ndarray, docs: np.ndarray, n_docs: int,
               num_perm: int = NUM_PERM) -> np.ndarray:
    """Fast similarity sketch of each document's shingle keys: (n_docs, num_perm) uint32.

    `keys` are well-mixed 64-bit shingle hashes, `docs` the document (0..n_docs-1) of each;
    every document needs at least one key. Repeated keys don't matter (a set is sketched).
    Round r gives every shingle of a document with empty bins one (bin, value); a bin keeps
    the smallest value of the first round that reaches it. Rounds < num_perm pick bins at
    random, later ones sweep each shingle over every bin, so a document is full after at most
    2 * num_perm rounds (one round, for a document of thousands of shingles).

    A bin's value carries its round in its high bits, so "the first round, then the smallest
    value" is the minimum over every (shingle, round) proposal: rounds are independent and
    are done in growing groups (one `np.minimum.at` each), only for documents not yet full
    (after round 0, those with few shingles).
    """
    k = np.uint64(num_perm)
    flat = np.full(n_docs * num_perm, _EMPTY, dtype=np.uint64)
    base = docs.astype(np.int64) * num_perm  # the document's first slot, per shingle
    sweep = (((_fmix64(keys ^ _SWEEP_SALT) >> np.uint64(32)) * k) >> np.uint64(32)).astype(np.int64)
    r = 0
    while r < 2 * num_perm:
        # rounds r .. r_end - 1 at once: one round while many shingles are active (a round
        # fills most bins), many when few are (the documents with few shingles)
        r_end = min(2 * num_perm, r + max(1, _PROPOSALS // len(keys)))
        rounds = np.arange(r, r_end, dtype=np.uint64)
        salts = (rounds + np.uint64(1)) * np.uint64(0x2545F4914F6CDD1D)  # mod 2**64
        h = _fmix64(keys[:, None] ^ salts[None, :])  # (shingles, rounds)
        random_bins = (((h >> np.uint64(32)) * k) >> np.uint64(32)).astype(np.int64)
        sweep_bins = (sweep[:, None] + (rounds.astype(np.int64) - num_perm)[None, :]) % num_perm
        bins = np.where((rounds < k)[None, :], random_bins, sweep_bins)
        np.minimum.at(flat, (base[:, None] + bins).ravel(),
                      ((h & _U32) | (rounds << np.uint64(32))[None, :]).ravel())
        r = r_end
        open_docs = (flat.reshape(n_docs, num_perm) == _EMPTY).any(axis=1)
        if not open_docs.any():
            break
        active = open_docs[docs]
        if not active.all():
            keys, docs, base, sweep = keys[active], docs[active], base[active], sweep[active]
    return _fmix64(flat).astype(np.uint32).reshape(n_docs, num_perm)


def _keys(texts: Sequence[str], scripts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Shingle keys of all `texts` and the index of the text of each."""
    cjk = [i for i, s in enumerate(scripts) if s == "cjk"]
    words = [i for i, s in enumerate(scripts) if s != "cjk"]
    parts_k: list[np.ndarray] = []
    parts_d: list[np.ndarray] = []
    for idx, unit_fn, k in ((words, _word_units, WORD_SHINGLE), (cjk, _char_units, CHAR_SHINGLE)):
        if idx:
            units, counts = unit_fn([texts[i] for i in idx])
            keys, docs = _shingles(units, counts, k)
            parts_k.append(keys)
            parts_d.append(np.asarray(idx, dtype=np.int64)[docs])
    return np.concatenate(parts_k), np.concatenate(parts_d)


def shingle_hashes(text: str, script: str) -> np.ndarray:
    """32-bit hashes of the distinct shingles of `text` (word 5-grams, or char 3-grams for CJK)."""
    keys, _ = _keys([text], [script])
    return np.unique((keys >> np.uint64(32)).astype(np.uint32))


def minhash(hashes: np.ndarray, template: MinHash) -> MinHash:
    """A datasketch MinHash of pre-hashed 32-bit shingles, fed in batches to bound memory.

    `template` is an empty MinHash whose permutations are reused (building them is costly).
    The classic k-permutation sketch: a reference for `signatures`, not used by `Deduper`.
    """
    m = template.copy()
    for i in range(0, len(hashes), _BATCH):
        m.update_batch(hashes[i: i + _BATCH].tolist())
    return m


def exact_key(text: str) -> bytes:
    """Hash of the text lower-cased with whitespace collapsed."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for `threshold` with `LSH_WEIGHTS`.

    Cached, and known for the defaults: MinHashLSH finds them by numerical integration
    (~30 ms of CPU, a few % of preparing a 2 MB silo)."""
    if (threshold, num_perm) in KNOWN_LSH_PARAMS:
        return KNOWN_LSH_PARAMS[(threshold, num_perm)]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


KNOWN_LSH_PARAMS = {(0.7, 128): (20, 6), (0.8, 128): (14, 9), (0.9, 128): (8, 16)}
"""lsh_params for common settings, as MinHashLSH picks them (checked by test_dedup)."""


def _table_dict(table: object) -> dict[bytes, set[int]] | None:
    """The `defaultdict(set)` behind an in-memory datasketch table, or None for other storage.

    Looked up and filled directly: a Python method call per band and document costs more
    than the rest of the near-duplicate check on a silo of thousands of small documents."""
    if isinstance(table, DictSetStorage):
        d = getattr(table, "_dict", None)
        if isinstance(d, defaultdict) and d.default_factory is set:
            return d
    return None


class Deduper:
    """Remembers documents seen so far and says whether a new one duplicates one of them."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self._exact: set[bytes] = set()
        # Favour recall (false negative weight 0.9: 14 bands of 9 rows at 0.8, which makes a
        # pair at Jaccard 0.9 a candidate with p 0.999, the default 9 x 13 with p 0.93); a
        # false candidate only costs the signature comparison below.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm,
                               params=lsh_params(threshold, num_perm))
        self._sigs: dict[int, np.ndarray] = {}
        self._next_id = 0

    def check(self, text: str, script: str = "latin") -> str | None:
        """None if `text` is new (and remember it), else 'exact' or 'near'."""
        return self.check_batch([text], [script])[0]

    def check_batch(self, texts: Sequence[str], scripts: Sequence[str]) -> list[str | None]:
        """`check` for each text in order (a text may duplicate an earlier one of the batch)."""
        out: list[str | None] = [None] * len(texts)
        fresh = self._drop_exact(texts, out)
        if not fresh:
            return out
        keys, docs = _keys([texts[i] for i in fresh], [scripts[i] for i in fresh])
        sigs = signatures(keys, docs, len(fresh), self.num_perm)
        swapped, bands = self._band_keys(sigs)
        ids = range(self._next_id, self._next_id + len(fresh))
        self._next_id += len(fresh)
        dicts = [_table_dict(t) for t in self._lsh.hashtables]
        # A row can have a candidate only if one of its band keys is in the index or shared
        # with another row of the batch. The others (nearly all) are new: stored in bulk.
        maybe = _shares_a_band(swapped, self._lsh.hashranges)
        for table, d, band in zip(self._lsh.hashtables, dicts, bands, strict=True):
            if d is not None:
                maybe |= np.fromiter(map(d.__contains__, band), dtype=bool, count=len(band))
            else:
                maybe |= np.fromiter((bool(table.get(k)) for k in band), dtype=bool,
                                     count=len(band))
        self._store_clean(np.flatnonzero(~maybe), ids, sigs, bands, dicts)
        for row in np.flatnonzero(maybe).tolist():
            if self._is_near(sigs[row], ids[row], [band[row] for band in bands]):
                out[fresh[row]] = "near"
        return out

    def _drop_exact(self, texts: Sequence[str], out: list[str | None]) -> list[int]:
        """Mark exact duplicates 'exact' in `out`, remember the others' keys; return the
        indices of the others."""
        fresh: list[int] = []
        for i, text in enumerate(texts):
            key = exact_key(text)
            if key in self._exact:
                out[i] = "exact"
            else:
                self._exact.add(key)
                fresh.append(i)
        return fresh

    def _band_keys(self, sigs: np.ndarray) -> tuple[np.ndarray, list[list[bytes]]]:
        """The signatures byte-swapped, and per band the key of each row.

        The band keys MinHashLSH.insert/query would make (its `_H`: the band's values
        byte-swapped), made here for the whole batch at once, then looked up and inserted
        in the index's own tables."""
        swapped = sigs.byteswap()
        bands: list[list[bytes]] = []
        for start, end in self._lsh.hashranges:
            blob = np.ascontiguousarray(swapped[:, start:end]).tobytes()
            width = (end - start) * swapped.itemsize
            bands.append([blob[j: j + width] for j in range(0, len(blob), width)])
        return swapped, bands

    def _store_clean(self, clean_rows: np.ndarray, ids: range, sigs: np.ndarray,
                     bands: list[list[bytes]], dicts: list[dict[bytes, set[int]] | None]) -> None:
        """Index the rows that can have no candidate, in bulk."""
        clean_ids: list[int] = (clean_rows + ids.start).tolist()
        clean: list[int] = clean_rows.tolist()
        for table, d, band in zip(self._lsh.hashtables, dicts, bands, strict=True):
            band_keys = [band[row] for row in clean]
            if d is not None:  # keys of clean rows are in no table yet: a new set each
                d.update(zip(band_keys, map(set, zip(clean_ids, strict=True)), strict=True))
            else:
                for key, idx in zip(band_keys, clean_ids, strict=True):
                    table.insert(key, idx)
        self._sigs.update(zip(clean_ids, sigs[clean], strict=True))

    def _is_near(self, sig: np.ndarray, idx: int, row_bands: list[bytes]) -> bool:
        """True if a candidate sharing a band agrees on enough of `sig`; else index it."""
        tables = self._lsh.hashtables
        cands: set[int] = set()
        for table, key in zip(tables, row_bands, strict=True):
            cands.update(table.get(key))
        need = self.threshold * self.num_perm
        if any(np.count_nonzero(self._sigs[c] == sig) >= need for c in cands):
            return True
        self._sigs[idx] = sig
        for table, key in zip(tables, row_bands, strict=True):
            table.insert(key, idx)
        return False


def _shares_a_band(sigs: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per row of `sigs` (n, num_perm): may one of its bands equal the same band of another
    row? (A 64-bit hash per band: a collision only sends a row down the careful path.)"""
    n = len(sigs)
    if n < 2:
        return np.zeros(n, dtype=bool)
    width = ranges[0][1] - ranges[0][0]
    if any(end - start != width for start, end in ranges):
        raise ValueError("bands of unequal width")
    starts = np.array([start for start, _ in ranges])
    # (n, bands): every band hashed at once, column by column; a band's index salts its hash
    h = np.broadcast_to(np.arange(len(ranges), dtype=np.uint64), (n, len(ranges)))
    wide = sigs.astype(np.uint64)
    for c in range(width):
        h = _fmix64(h * _MIX + wide[:, starts + c])
    _, inverse, counts = np.unique(h.T.ravel(), return_inverse=True, return_counts=True)
    shared = np.asarray((counts[inverse] > 1).reshape(len(ranges), n).any(axis=0))
    return shared
