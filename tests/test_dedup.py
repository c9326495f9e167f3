"""Dedup: exact copies and near copies (>= 90% shingle overlap, English and Chinese) are
removed; distinct documents, even on the same topic, are kept. MinHash matches datasketch
fed the same shingles one by one (the reference)."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash

from fedlm.data.dedup import Deduper, minhash, shingle_hashes

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
