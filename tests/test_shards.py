"""Token shards: decode back to the documents, split by document, read windows like numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlm.data.shards import (
    dtype_for_vocab,
    iter_eval_windows,
    list_silos,
    open_split,
    read_meta,
    sample_batch,
    shard_silo,
)
from fedlm.data.tokenizer import EOS, load_tokenizer, tokenizer_hash, train_from_texts
from fedlm.errors import UserError

DOCS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog {i * 13}. 床前明月光 👍🏽\n\tline two."
    for i in range(120)
] + ["short", "中文只有一行", "literal <|endoftext|> inside a text", "emoji 🎉🎉🎉"]


def write_docs(silo_dir: Path, texts: list[str]) -> None:
    silo_dir.mkdir(parents=True, exist_ok=True)
    with open(silo_dir / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "source": "test"}, ensure_ascii=False) + "\n")


@pytest.fixture()
def ws(tmp_path: Path) -> Path:
    write_docs(tmp_path / "silos" / "b", DOCS)
    write_docs(tmp_path / "silos" / "a", DOCS[:3])
    (tmp_path / "silos" / "empty_dir").mkdir()
    tok = train_from_texts(DOCS, vocab_size=400)
    (tmp_path / "tokenizer.json").write_text(tok.to_str(pretty=True))
    return tmp_path


def decode_split(ws: Path, silo: str, split: str) -> str:
    tok = load_tokenizer(ws / "tokenizer.json")
    ids = np.asarray(open_split(ws / "silos" / silo, split))  # type: ignore[arg-type]
    return tok.decode(ids.tolist(), skip_special_tokens=False)


def split_docs(ws: Path, silo: str) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "val"):
        ids = np.asarray(open_split(ws / "silos" / silo, split))  # type: ignore[arg-type]
        tok = load_tokenizer(ws / "tokenizer.json")
        pieces = np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]  # each ends with EOS
        out[split] = [tok.decode(p[:-1].tolist()) for p in pieces]
    return out


def test_list_silos(ws: Path) -> None:
    assert list_silos(ws) == ["a", "b"]


def test_shards_decode_back_to_documents_joined_by_eos(ws: Path) -> None:
    meta = shard_silo(ws, "b", val_fraction=0.2, seed=1)
    docs = split_docs(ws, "b")
    # Every document lands on exactly one side, in file order, intact (the literal EOS too).
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCS)
    assert [d for d in DOCS if d in set(docs["val"])] == docs["val"]
    assert decode_split(ws, "b", "train") == "".join(d + EOS for d in docs["train"])
    assert meta["documents"] == {"train": len(docs["train"]), "val": len(docs["val"])}
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == sum(len(d.encode()) for d in DOCS)
    assert meta["tokens"]["val"] == len(open_split(ws / "silos" / "b", "val"))
    assert meta["tokenizer_sha256"] == tokenizer_hash(ws / "tokenizer.json")
    assert meta["dtype"] == "uint16" and meta["split_seed"] == 1 and meta["val_fraction"] == 0.2
    assert read_meta(ws / "silos" / "b") == {k: v for k, v in meta.items() if k != "seconds"}
    # EOS appears only as a document boundary.
    train = np.asarray(open_split(ws / "silos" / "b", "train"))
    assert int((train == 0).sum()) == len(docs["train"])


def test_tokens_equal_tokenizers_encoding(ws: Path) -> None:
    """Whatever engine wrote them, the ids are `tokenizers`' own encoding of each document."""
    meta = shard_silo(ws, "b", val_fraction=0.0)
    tok = load_tokenizer(ws / "tokenizer.json")
    tok.encode_special_tokens = True
    expected = [i for d in DOCS for i in tok.encode(d, add_special_tokens=False).ids + [0]]
    assert np.asarray(open_split(ws / "silos" / "b", "train")).tolist() == expected
    assert meta["tokens"] == {"train": len(expected), "val": 0}
    slow = shard_silo(ws, "b", val_fraction=0.0, engine="tokenizers")
    assert slow["encoder"] == "tokenizers"
    assert np.asarray(open_split(ws / "silos" / "b", "train")).tolist() == expected


def test_split_is_deterministic_and_by_document(ws: Path) -> None:
    shard_silo(ws, "b", val_fraction=0.3, seed=7)
    first = split_docs(ws, "b")
    shard_silo(ws, "b", val_fraction=0.3, seed=7)
    assert split_docs(ws, "b") == first
    # Removing other documents moves none of the remaining ones.
    write_docs(ws / "silos" / "b", DOCS[::2])
    shard_silo(ws, "b", val_fraction=0.3, seed=7)
    again = split_docs(ws, "b")
    assert set(again["val"]) == set(first["val"]) & set(DOCS[::2])
    assert 0.1 < len(first["val"]) / len(DOCS) < 0.5
    shard_silo(ws, "b", val_fraction=0.3, seed=8)
    assert split_docs(ws, "b")["val"] != first["val"]


def test_small_silo_gets_one_val_document(ws: Path) -> None:
    meta = shard_silo(ws, "a", val_fraction=0.01)
    assert meta["documents"] == {"train": 2, "val": 1}
    write_docs(ws / "silos" / "a", ["only one"])
    assert shard_silo(ws, "a")["documents"] == {"train": 1, "val": 0}


def test_dtype_choice() -> None:
    assert dtype_for_vocab(4096) == np.uint16 and dtype_for_vocab(65535) == np.uint16
    assert dtype_for_vocab(65536) == np.uint32 and dtype_for_vocab(200_000) == np.uint32


def test_open_split_uint32_and_validation(tmp_path: Path) -> None:
    silo = tmp_path / "silos" / "s"
    silo.mkdir(parents=True)
    data = np.array([70_000, 5, 0, 99_999, 0], dtype=np.uint32)
    data.tofile(silo / "train.bin")
    np.zeros(0, np.uint32).tofile(silo / "val.bin")
    meta = {"tokens": {"train": 5, "val": 0}, "dtype": "uint32", "tokenizer_sha256": "abc"}
    (silo / "meta.json").write_text(json.dumps(meta))
    got = open_split(silo, "train", expect_tokenizer_sha256="abc")
    assert got.dtype == np.uint32 and got.tolist() == data.tolist()
    assert len(open_split(silo, "val")) == 0
    with pytest.raises(UserError, match="another tokenizer.*fedlm data shard --workspace .* --silo s"):
        open_split(silo, "train", expect_tokenizer_sha256="def")
    (silo / "train.bin").write_bytes(data.tobytes()[:-2])
    with pytest.raises(UserError, match=r"train.bin has 18 bytes.*fedlm data shard"):
        open_split(silo, "train")
    (silo / "meta.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        open_split(silo, "train")
    (silo / "meta.json").unlink()
    with pytest.raises(UserError, match="no shards"):
        open_split(silo, "train")


def test_shard_errors(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fedlm data prepare"):
        shard_silo(ws, "empty_dir")
    (ws / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="fedlm data tokenizer"):
        shard_silo(ws, "b")


def test_sample_batch_matches_numpy_slicing() -> None:
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 65521
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    x, y = sample_batch(tokens, batch_size=6, seq_len=17, generator=g)
    offsets = torch.randint(0, 1000 - 17, (6,), generator=torch.Generator().set_state(state)).tolist()
    ref = np.stack([tokens[o : o + 18].astype(np.int64) for o in offsets])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (6, 17)
    assert np.array_equal(x.numpy(), ref[:, :-1]) and np.array_equal(y.numpy(), ref[:, 1:])
    # The generator state is the data position: the same state gives the same batch.
    x2, _ = sample_batch(tokens, batch_size=6, seq_len=17, generator=torch.Generator().set_state(state))
    assert torch.equal(x, x2)
    # The last possible window is reachable and nothing reads past the end.
    xs, _ = sample_batch(np.arange(5, dtype=np.uint16), batch_size=50, seq_len=4, generator=g)
    assert (xs == torch.arange(4)).all()
    with pytest.raises(UserError, match="fewer than seq_len"):
        sample_batch(tokens[:17], batch_size=1, seq_len=17, generator=g)


def test_sample_batch_on_memmap(ws: Path) -> None:
    shard_silo(ws, "b")
    tokens = open_split(ws / "silos" / "b", "train")
    assert isinstance(tokens, np.memmap)
    x, y = sample_batch(tokens, batch_size=4, seq_len=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("n,seq_len,batch_size", [(1, 4, 2), (2, 4, 2), (5, 4, 2), (41, 4, 3), (100, 7, 4)])
def test_eval_windows_cover_every_target_once(n: int, seq_len: int, batch_size: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)
    xs, ys = [], []
    for x, y in iter_eval_windows(tokens, seq_len=seq_len, batch_size=batch_size):
        assert x.shape == y.shape and x.shape[0] <= batch_size and x.shape[1] <= seq_len
        assert x.dtype == torch.int64
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    got_x = torch.cat(xs).tolist() if xs else []
    got_y = torch.cat(ys).tolist() if ys else []
    assert got_y == list(range(1, n)) and got_x == list(range(0, n - 1))


def test_engine_disagreement_falls_back_to_tokenizers(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the fast engine differs from `tokenizers` on the checked heads of the first
    documents, the silo is written with `tokenizers` (ids equal its own encoding)."""
    import fedlm.data.shards as shards_mod

    real = shards_mod._tiktoken_encoder

    def off_by_one(tok):  # type: ignore[no-untyped-def]
        enc = real(tok)
        return lambda texts: [ids + 1 for ids in enc(texts)]

    monkeypatch.setattr(shards_mod, "_tiktoken_encoder", off_by_one)
    monkeypatch.setattr(shards_mod, "_LOADED", {})
    meta = shard_silo(ws, "b", val_fraction=0.0)
    assert meta["encoder"] == "tokenizers"
    tok = load_tokenizer(ws / "tokenizer.json")
    tok.encode_special_tokens = True
    expected = [i for d in DOCS for i in tok.encode(d, add_special_tokens=False).ids + [0]]
    assert np.asarray(open_split(ws / "silos" / "b", "train")).tolist() == expected


def test_tokenizer_change_is_seen_between_silos(ws: Path) -> None:
    """Sharding reuses a loaded tokenizer only while its file is unchanged."""
    first = shard_silo(ws, "b", val_fraction=0.0)
    tok = train_from_texts(DOCS[:40], vocab_size=300)
    (ws / "tokenizer.json").write_text(tok.to_str(pretty=True))
    second = shard_silo(ws, "b", val_fraction=0.0)
    assert second["tokenizer_sha256"] == tokenizer_hash(ws / "tokenizer.json") != first["tokenizer_sha256"]
    assert second["vocab_size"] == tok.get_vocab_size()


def test_one_pass_sides_follow_the_keyed_hash(ws: Path) -> None:
    """Each document's side is blake2b(text, key=seed) / 2**64 < val_fraction, computed here
    by hand, in document order on each side (the one-pass writer decides it as it goes)."""
    import hashlib

    def side(text: str, seed: int) -> bool:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
        return int.from_bytes(h.digest(), "little") / 2.0**64 < 0.3

    meta = shard_silo(ws, "b", val_fraction=0.3, seed=7)
    got = split_docs(ws, "b")
    want_val = [d for d in DOCS if side(d, 7)]
    assert 0 < len(want_val) < len(DOCS)  # no side was forced
    assert got == {"train": [d for d in DOCS if not side(d, 7)], "val": want_val}
    assert meta["documents"] == {"train": len(DOCS) - len(want_val), "val": len(want_val)}


def _side_hash(text: str, seed: int) -> float:
    import hashlib

    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


@pytest.mark.parametrize(("docs", "val_fraction"), [
    (DOCS[:3] + [DOCS[1]], 0.01),  # none below: the lowest hash (both copies) moves to val
    ([d for d in DOCS if _side_hash(d, 0) < 0.99][:3], 0.99),  # all below: the highest moves to train
])
def test_moved_documents_equal_tokenizers_encoding(ws: Path, docs: list[str],
                                                   val_fraction: float) -> None:
    """A tiny silo with a side left empty: the nearest document(s) move over (copied from the
    file, not re-encoded), and each side holds exactly `tokenizers`' encoding of its
    documents in document order, with counts to match."""
    write_docs(ws / "silos" / "t", docs)
    hashes = [_side_hash(d, 0) for d in docs]
    below = [h < val_fraction for h in hashes]
    assert not any(below) or all(below)  # the case under test: one side empty by hash
    pick = min(hashes) if not any(below) else max(hashes)
    to_val = [(h == pick) != any(below) for h in hashes]
    meta = shard_silo(ws, "t", val_fraction=val_fraction)
    tok = load_tokenizer(ws / "tokenizer.json")
    tok.encode_special_tokens = True
    for split, want in (("val", True), ("train", False)):
        mine = [d for d, v in zip(docs, to_val, strict=True) if v == want]
        expected = [i for d in mine for i in tok.encode(d, add_special_tokens=False).ids + [0]]
        assert np.asarray(open_split(ws / "silos" / "t", split)).tolist() == expected
        assert meta["tokens"][split] == len(expected)
        assert meta["documents"][split] == len(mine)
        assert meta["bytes"][split] == sum(len(d.encode("utf-8")) for d in mine)
    assert not list((ws / "silos" / "t").glob("*.tmp")) and not list((ws / "silos" / "t").glob("*.rest"))


def test_tiktoken_encoder_equals_tokenizers_on_special_looking_text(ws: Path) -> None:
    """The tiktoken engine (numpy output, one never-allowed special token) encodes like
    `tokenizers`, also text holding that token's string, EOS's string, or nothing at all."""
    from fedlm.data.shards import UNUSED_SPECIAL, _hf_encoder, _tiktoken_encoder

    tok = load_tokenizer(ws / "tokenizer.json")
    fast = _tiktoken_encoder(tok)
    if fast is None:
        pytest.skip("tiktoken not installed")
    texts = [f"a {UNUSED_SPECIAL} b", UNUSED_SPECIAL, f"<|endoftext|>{UNUSED_SPECIAL}中文", "", " ",
             *DOCS[:5]]
    hf = _hf_encoder(load_tokenizer(ws / "tokenizer.json"))
    for a, b in zip(fast(texts), hf(texts), strict=True):
        assert a.tolist() == b.tolist()
