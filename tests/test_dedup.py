"""Dedup: exact copies and near copies (>= 90% shingle overlap, English and Chinese) are
removed; distinct documents, even on the same topic, are kept. MinHash matches datasketch
fed the same shingles one by one (the reference)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.data.dedup import NUM_PERM, Deduper, _word_units, minhash, shingle_hashes, signatures

WORDS = ("court contract party agreement licence software patient dose treatment fracture "
         "river castle letter marriage fortune sister brother evening morning garden window "
         "ship storm sword crown king queen servant master money house village city").split()
HAN = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈"


def _doc(rng: random.Random, n: int = 300) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _edit(words: list[str], rng: random.Random, n_edits: int) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), n_edits):
        out[i] = "edited"
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb)


def test_minhash_matches_datasketch_reference() -> None:
    hashes = shingle_hashes("one two three four five six seven eight nine ten", "latin")
    ref = MinHash(num_perm=128, hashfunc=lambda x: x)
    for h in hashes.tolist():
        ref.update(h)
    ours = minhash(hashes, MinHash(num_perm=128, hashfunc=lambda x: x))
    assert np.array_equal(ours.hashvalues, ref.hashvalues)


def test_near_duplicates_removed_distinct_kept() -> None:
    rng = random.Random(0)
    d = Deduper(threshold=0.8)
    kept = removed = 0
    for _ in range(20):
        base = _doc(rng)
        near = _edit(base, rng, 2)  # 2 edits in 300 words: >= 90% of 5-gram shingles shared
        j = _jaccard(shingle_hashes(" ".join(base), "latin"), shingle_hashes(" ".join(near), "latin"))
        assert j >= 0.9 * 0.9
        kept += d.check(" ".join(base)) is None
        removed += d.check(" ".join(near)) == "near"
    assert kept == 20 and removed == 20


def test_exact_duplicates_ignore_case_and_spacing() -> None:
    d = Deduper()
    assert d.check("Hello   World, this is a document.") is None
    assert d.check("hello world,\nthis is a   document.") == "exact"


def test_chinese_near_duplicates_use_characters() -> None:
    rng = random.Random(1)
    d = Deduper(threshold=0.8)
    for _ in range(10):
        base = "".join(rng.choice(HAN) for _ in range(400))
        near = list(base)
        near[rng.randrange(400)] = "改"  # one character edited
        assert d.check(base, "cjk") is None
        assert d.check("".join(near), "cjk") == "near"


def test_distinct_documents_on_one_topic_are_kept() -> None:
    rng = random.Random(2)
    d = Deduper(threshold=0.8)
    docs = [" ".join(_doc(rng, 200)) for _ in range(100)]
    poems = ["".join(rng.choice(HAN) for _ in range(28)) for _ in range(100)]
    assert all(d.check(t) is None for t in docs)
    assert all(d.check(p, "cjk") is None for p in poems)


def _set_pair(rng: random.Random, n: int, j: float) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of random 64-bit keys with Jaccard similarity exactly ~j (shared / union)."""
    union = np.array(list({rng.getrandbits(64) for _ in range(2 * n)})[:n], dtype=np.uint64)
    shared = round(j * n)
    rest = n - shared
    a = np.concatenate([union[:shared], union[shared: shared + rest // 2]])
    b = np.concatenate([union[:shared], union[shared + rest // 2:]])
    return a, b


def test_signature_jaccard_within_minhash_error_bound() -> None:
    """The sketch's share of equal values estimates the exact Jaccard similarity of the key
    sets as well as num_perm MinHash permutations: within 4 standard errors sqrt(J(1-J)/k),
    for large sets and for sets smaller than num_perm (where plain one-permutation hashing
    would be far noisier); and on average it is unbiased."""
    rng = random.Random(3)
    errors = []
    for n in (5, 20, 60, 200, 3000):
        for j in (0.3, 0.6, 0.8, 0.9, 0.95):
            a, b = _set_pair(rng, n, j)
            exact = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
            keys = np.concatenate([a, b])
            docs = np.repeat([0, 1], [len(a), len(b)])
            sig = signatures(keys, docs, 2, NUM_PERM)
            est = np.mean(sig[0] == sig[1])
            assert abs(est - exact) <= 4 * np.sqrt(exact * (1 - exact) / NUM_PERM) + 1e-9, (n, j)
            errors.append(est - exact)
    assert abs(np.mean(errors)) < 0.02


def test_signature_of_a_document_ignores_the_batch() -> None:
    """A document's signature is the same alone or batched with others, and whatever the
    order or repetition of its keys (it sketches a set)."""
    rng = random.Random(4)
    a = np.array([rng.getrandbits(64) for _ in range(40)], dtype=np.uint64)
    b = np.array([rng.getrandbits(64) for _ in range(3)], dtype=np.uint64)
    alone = signatures(a, np.zeros(len(a), dtype=np.int64), 1)[0]
    keys = np.concatenate([b, a[::-1], a[:10]])
    docs = np.repeat([0, 1, 1], [len(b), len(a), 10])
    batched = signatures(keys, docs, 2)
    assert np.array_equal(batched[1], alone)


def test_word_units_match_re_words() -> None:
    """Batched word hashing finds exactly `re`'s \\w+ words of each lower-cased text (Unicode
    included), equal words hash equal and distinct ones differ."""
    rng = random.Random(5)
    alphabet = "abc XYZ_ 1é É ß İ 中文 ١٢ \n\t.,-ǅ" + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(60))
    for _ in range(200):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
                 for _ in range(rng.randrange(1, 5))]
        hashes, counts = _word_units(texts)
        words = [re.findall(r"\w+", t.lower()) for t in texts]
        assert counts.tolist() == [len(w) for w in words]
        seen: dict[str, int] = {}
        for word, h in zip([w for ws in words for w in ws], hashes.tolist(), strict=True):
            assert seen.setdefault(word, h) == h
        assert len(set(seen.values())) == len(seen)


def test_check_batch_equals_one_by_one_and_datasketch_index_agrees() -> None:
    """Checking a batch gives the verdicts of checking its documents one at a time (a document
    may duplicate an earlier one of the same batch), and the index holds each kept document
    where datasketch's own MinHashLSH.query finds it."""
    rng = random.Random(6)
    texts, scripts = [], []
    for _ in range(30):
        base = _doc(rng, rng.choice([3, 40, 300]))
        texts += [" ".join(base), " ".join(_edit(base, rng, 1)), " ".join(base).upper()]
        scripts += ["latin"] * 3
        poem = "".join(rng.choice(HAN) for _ in range(rng.choice([5, 30, 300])))
        texts.append(poem)
        scripts.append("cjk")
    one, batch = Deduper(0.8), Deduper(0.8)
    expected = [one.check(t, s) for t, s in zip(texts, scripts, strict=True)]
    assert batch.check_batch(texts, scripts) == expected
    assert expected.count("exact") == 30 and expected.count("near") >= 8
    for idx, sig in batch._sigs.items():
        found = batch._lsh.query(LeanMinHash(seed=0, hashvalues=sig, scheme="affine32"))
        assert idx in found


def test_word_units_in_groups_equal_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing a batch in groups of texts gives the hashes and counts of hashing it at once."""
    from fedlm.data import dedup

    rng = random.Random(7)
    texts = [" ".join(_doc(rng, rng.randrange(0, 60))) + " ünï 中文" * rng.randrange(2)
             for _ in range(40)]
    whole = _word_units(texts)
    monkeypatch.setattr(dedup, "_GROUP_CHARS", 200)
    grouped = _word_units(texts)
    assert np.array_equal(whole[0], grouped[0]) and np.array_equal(whole[1], grouped[1])
    assert whole[1].tolist() == [len(re.findall(r"\w+", t.lower())) for t in texts]


def test_batch_index_without_dict_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk look-up and insert through datasketch's storage API (for storage other than
    its in-memory dict) gives the verdicts of the dict fast path, and the same index."""
    from fedlm.data import dedup

    rng = random.Random(8)
    texts = []
    for _ in range(20):
        base = _doc(rng, rng.choice([4, 50, 200]))
        texts += [" ".join(base), " ".join(_edit(base, rng, 1)), " ".join(base)]
    scripts = ["latin"] * len(texts)
    fast = Deduper(0.8).check_batch(texts, scripts)
    monkeypatch.setattr(dedup, "_table_dict", lambda table: None)
    slow = Deduper(0.8)
    assert slow.check_batch(texts, scripts) == fast
    assert fast.count("exact") == 20 and fast.count("near") >= 5
    for idx, sig in slow._sigs.items():
        found = slow._lsh.query(LeanMinHash(seed=0, hashvalues=sig, scheme="affine32"))
        assert idx in found


def _sketch_reference(keys: list[int], num_perm: int) -> list[int]:
    """The sketch as its docstring defines it, one document, plain Python integers."""
    m64 = (1 << 64) - 1

    def fmix(h: int) -> int:
        h ^= h >> 33
        h = h * 0xFF51AFD7ED558CCD & m64
        h ^= h >> 33
        h = h * 0xC4CEB9FE1A85EC53 & m64
        return h ^ (h >> 33)

    bins: list[int | None] = [None] * num_perm
    sweep = [((fmix(k ^ 0x7A3C5E1F0B9D2468) >> 32) * num_perm) >> 32 for k in keys]
    for r in range(2 * num_perm):
        salt = (r + 1) * 0x2545F4914F6CDD1D % (1 << 64)
        best: dict[int, int] = {}
        for k, sw in zip(keys, sweep, strict=True):
            h = fmix(k ^ salt)
            b = ((h >> 32) * num_perm) >> 32 if r < num_perm else (sw + r - num_perm) % num_perm
            if bins[b] is None:
                v = (h & 0xFFFFFFFF) | (r << 32)
                best[b] = min(best.get(b, v), v)
        for b, v in best.items():
            bins[b] = v
        if all(v is not None for v in bins):
            break
    return [fmix(v) & 0xFFFFFFFF for v in bins if v is not None]


def test_signatures_equal_reference_sketch() -> None:
    """The batched numpy sketch equals the round-by-round definition, document by document
    (1 to 300 shingles, so the random rounds and the sweeps both fill bins)."""
    rng = random.Random(9)
    sizes = [1, 2, 3, 7, 40, 300]
    docs_keys = [[rng.getrandbits(64) for _ in range(n)] for n in sizes]
    keys = np.array([k for ks in docs_keys for k in ks], dtype=np.uint64)
    docs = np.repeat(np.arange(len(sizes)), sizes)
    sig = signatures(keys, docs, len(sizes), num_perm=16)
    for row, ks in zip(sig, docs_keys, strict=True):
        assert row.tolist() == _sketch_reference(ks, 16)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aB \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2028\u3000É中İ.")),
                    max_size=40))
def test_exact_key_is_hash_of_collapsed_lowercase(text: str) -> None:
    """Property: the replace-based key equals blake2b of `" ".join(text.lower().split())`."""
    import hashlib

    from fedlm.data.dedup import exact_key

    want = hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()
    assert exact_key(text) == want


def test_known_lsh_params_are_datasketch_choices() -> None:
    """The bands and rows kept for common thresholds are what MinHashLSH itself picks."""
    from datasketch import MinHashLSH

    from fedlm.data.dedup import KNOWN_LSH_PARAMS, LSH_WEIGHTS

    for (threshold, num_perm), params in KNOWN_LSH_PARAMS.items():
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        assert (lsh.b, lsh.r) == params


def test_power_tables_are_powers() -> None:
    """The hashing's power tables by doubling equal Python's pow(base, i, 2**64) and the
    running product."""
    from fedlm.data.dedup import _MIX, _MIX_INV, _geometric

    for base in (int(_MIX), int(_MIX_INV), 3):
        for n in (1, 2, 3, 5, 1000, 70_001):
            g = _geometric(base, n)
            assert len(g) == n
            assert all(int(g[i]) == pow(base, i, 1 << 64) for i in {0, 1 % n, n // 2, n - 1})
            ones = np.ones(n, dtype=np.uint64)
            ones[1:] = base
            assert np.array_equal(np.cumprod(ones, dtype=np.uint64), g)
