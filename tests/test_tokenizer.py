"""The agreed tokenizer: training from counts equals training on text; any text round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.data.tokenizer import (
    EOS,
    agree_tokenizer,
    count_pretokens,
    load_tokenizer,
    release_silo_counts,
    token_byte_lengths,
    tokenizer_hash,
    train_from_counts,
    train_from_texts,
)
from fedlm.errors import UserError

EN = [
    "The court held that the licence was void. The licensee appealed, and the appeal was dismissed.",
    "Patients with type 2 diabetes mellitus were given 500 mg of metformin twice daily.",
    "def main(argv):\n    for i in range(10):\n        print(i, argv[i])\n\treturn 0\n",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
    "ROMEO. But, soft! what light through yonder window breaks?\n\n  It is the east, and Juliet is the sun.",
    "Emails like <EMAIL> and phones <PHONE> were scrubbed;   multiple   spaces\tand tabs\r\n stay.",
]
ZH = [
    "中华人民共和国刑法第一条：为了惩罚犯罪，保护人民，根据宪法，结合我国同犯罪作斗争的具体经验及实际情况，制定本法。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
]
EMOJI = ["Great job 👍🏽🎉! 家族👨‍👩‍👧‍👦 naïve café — “quotes” ½ ™ \u200b zero-width."]
CORPUS = (EN * 7 + ZH * 5 + EMOJI * 3) + [f"Document number {i}: item {i * 7} of {i + 3}." for i in range(40)]


def make_workspace(root: Path, silos: dict[str, list[str]]) -> Path:
    for name, texts in silos.items():
        d = root / "silos" / name
        d.mkdir(parents=True)
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t, "source": "test"}, ensure_ascii=False) + "\n")
    return root


def test_training_from_exact_counts_equals_training_on_text() -> None:
    """The counts trick gives exactly the tokenizer `tokenizers` trains on the raw text."""
    reference = train_from_texts(CORPUS, vocab_size=600)
    ours = train_from_counts(dict(count_pretokens(CORPUS)), vocab_size=600)
    assert json.loads(ours.to_str()) == json.loads(reference.to_str())
    assert reference.get_vocab_size() > 300  # merges were learned, not just the alphabet


def test_agree_exact_equals_pooled_training(tmp_path: Path) -> None:
    """Exact counts from two silos, summed, train the same tokenizer as their pooled text."""
    ws = make_workspace(tmp_path, {"en": EN * 7 + CORPUS[60:], "zh": ZH * 5 + EMOJI * 3})
    record = agree_tokenizer(ws, vocab_size=500)
    pooled = train_from_texts(EN * 7 + CORPUS[60:] + ZH * 5 + EMOJI * 3, vocab_size=500)
    assert json.loads((ws / "tokenizer.json").read_text()) == json.loads(pooled.to_str())
    assert record["mode"] == "exact" and record["note"] == "exact counts, no privacy"
    assert set(record["silos"]) == {"en", "zh"}
    assert all(s["epsilon"] is None for s in record["silos"].values())
    assert json.loads((ws / "tokenizer_privacy.json").read_text()) == record
    assert record["tokenizer_sha256"] == tokenizer_hash(ws / "tokenizer.json")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return train_from_texts(CORPUS, vocab_size=600)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_any_text_round_trips(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    """Every Unicode string (Chinese, emoji, controls, odd spaces) decodes back to itself."""
    tok.encode_special_tokens = True
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert 0 not in ids or EOS in text


@pytest.mark.parametrize("text", ZH + EMOJI + ["\x00\x01\x7f\n\n\t  ", "a" * 5000])
def test_fixed_texts_round_trip(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_token_byte_lengths_sum_to_the_utf8_length(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    """Bits per byte needs bytes per token: they add up to the text's UTF-8 length."""
    tok.encode_special_tokens = True
    lengths = token_byte_lengths(tok)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_token_byte_lengths_reference(tok) -> None:  # type: ignore[no-untyped-def]
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),) and lengths[0] == 0 and tok.id_to_token(0) == EOS
    for i in range(1, tok.get_vocab_size()):
        raw = tok.decode([i]).encode("utf-8")
        if "\ufffd" not in tok.decode([i]):  # whole characters: decode gives the bytes back
            assert lengths[i] == len(raw)
    assert (lengths[1:] >= 1).all()


def test_count_pretokens_contribution_bound() -> None:
    """With k, a document counts once per distinct pre-token and for at most k (most frequent first)."""
    docs = ["a a a b b c d", "a"]
    assert count_pretokens(docs) == {"a": 2, "Ġa": 2, "Ġb": 2, "Ġc": 1, "Ġd": 1}
    assert count_pretokens(docs, max_per_doc=2) == {"a": 1, "Ġa": 1, "Ġb": 1}
    # Ties at count 1 are broken by the pre-token itself: "Ġa" < "Ġb".
    assert count_pretokens(["x a b"], max_per_doc=2) == {"x": 1, "Ġa": 1}


def test_agree_with_dp_states_the_cost(tmp_path: Path) -> None:
    """DP mode: each silo states eps <= asked, delta, sigma, tau, bound; the tokenizer still works."""
    ws = make_workspace(tmp_path, {"a": CORPUS * 20, "b": EN * 50})
    record = agree_tokenizer(ws, vocab_size=400, epsilon=2.0, delta=1e-6, seed=0, max_pretokens_per_doc=16)
    assert record["mode"] == "dp"
    for silo in ("a", "b"):
        s = record["silos"][silo]
        assert 0 < s["epsilon"] <= 2.0 and s["delta"] <= 1e-6
        assert s["contribution_bound"]["max_pretokens_per_doc"] == 16
        assert s["contribution_bound"]["l2_sensitivity"] == pytest.approx(4.0)
        assert s["threshold"] > 1 and s["noise_sigma"] > 0 and s["released_pretokens"] > 0
    assert "seed" not in json.dumps(record)
    t = load_tokenizer(ws / "tokenizer.json")
    text = "床前明月光 👍🏽 unseen wordsxyz"
    assert t.decode(t.encode(text).ids) == text


def test_dp_release_is_seeded_and_differs_from_exact(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, {"a": CORPUS * 20})
    r1 = agree_tokenizer(ws, vocab_size=400, epsilon=1.0, seed=3, max_pretokens_per_doc=16)
    r2 = agree_tokenizer(ws, vocab_size=400, epsilon=1.0, seed=3, max_pretokens_per_doc=16)
    assert r1["tokenizer_sha256"] == r2["tokenizer_sha256"]
    exact = agree_tokenizer(ws, vocab_size=400)
    assert exact["tokenizer_sha256"] != r1["tokenizer_sha256"]


def test_user_errors_name_the_numbers(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no silos with docs.jsonl"):
        agree_tokenizer(tmp_path, vocab_size=1000)
    ws = make_workspace(tmp_path, {"a": EN})
    with pytest.raises(UserError, match="256.*257|257"):
        agree_tokenizer(ws, vocab_size=256)
    with pytest.raises(UserError, match="epsilon"):
        agree_tokenizer(ws, vocab_size=300, epsilon=0.0)
    (ws / "silos" / "a" / "docs.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"docs.jsonl:2"):
        agree_tokenizer(ws, vocab_size=300)


def test_load_tokenizer_errors(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match="fedlm data tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        load_tokenizer(bad)


def test_hash_ignores_formatting(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(tok.to_str(pretty=True))
    b.write_text(tok.to_str(pretty=False))
    assert a.read_text() != b.read_text() and tokenizer_hash(a) == tokenizer_hash(b)
    assert np.array_equal(token_byte_lengths(load_tokenizer(a)), token_byte_lengths(tok))


def test_dp_counts_are_one_mechanism_with_the_silos_secret_noise(tmp_path: Path) -> None:
    """`fedlm data counts` (one silo) and `agree_tokenizer` (all) release the same counts: one
    mechanism, one stream from the silo's own key. Asked again, a silo releases the same counts
    (no second draw to average); the same documents in another workspace (another key) get
    other noise: nothing public seeds it."""
    ws = make_workspace(tmp_path / "one", {"a": CORPUS * 20, "b": EN * 50})
    other = make_workspace(tmp_path / "two", {"a": CORPUS * 20, "b": EN * 50})
    record = agree_tokenizer(ws, vocab_size=400, epsilon=1.0, max_pretokens_per_doc=16)
    first = release_silo_counts(ws, "a", epsilon=1.0, max_pretokens_per_doc=16)
    assert first["privacy"] == record["silos"]["a"] and first["privacy"]["noise"].startswith("secret")
    assert release_silo_counts(ws, "a", epsilon=1.0, max_pretokens_per_doc=16)["counts"] == first["counts"]
    assert release_silo_counts(other, "a", epsilon=1.0, max_pretokens_per_doc=16)["counts"] != first["counts"]
    key = ws / "silos" / "a" / ".secrets" / "noise.key"
    assert key.stat().st_mode & 0o077 == 0 and key.read_bytes().hex() not in json.dumps(record)
