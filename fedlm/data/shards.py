"""Token shards: a silo's documents as flat token-id files, and the reads training needs.

    shard_silo(WS, "legal")          # WS/silos/legal/{train,val}.bin + meta.json
    tokens = open_split(WS / "silos" / "legal", "train")
    x, y = sample_batch(tokens, batch_size=8, seq_len=256, generator=g)   # (B, T) int64 each

Layout: `train.bin` / `val.bin` are raw little-endian uint16 (vocab <= 65535) or uint32 ids,
each document followed by the tokenizer's end-of-text token (`eos_id`: id 0 in fedlm's own
tokenizers and SmolLM2's; meta.json's "eos_id"), so decoding a split gives its documents joined
and ended by it. A literal "<|endoftext|>" inside a text is encoded as ordinary bytes, so that id
only ever marks a document boundary.

The validation split is by document: a document goes to val when a hash of (seed, text) falls
below `val_fraction`, so its side never changes when other documents are added or removed, and
duplicates land on the same side. With >= 2 documents and val_fraction > 0, at least one
document is in val (the lowest hash, if none fell below) and one in train.

Chat silos (docs.jsonl holds conversations, `messages`) are written by chatshards.py: each
conversation rendered with the workspace's chat template (chat.py; WS/chat_template.jinja, the
model's own) and tokenised as the model reads it, special tokens included, with `SPLIT.mask`
(1 where the token is the assistant's, the only targets training learns) and `SPLIT.idx`
(each document's first token) beside each split (`open_chat` reads them). Text documents in a
chat silo are all trained on (mask 1). Training windows of a chat silo start at a document's
first token (`sample_chat_batch`), so an answer is always seen after its question; a
conversation longer than the window is cut at its end (counted, never dropped).

meta.json is removed first and written last, so a stopped run leaves either a complete set of
shards or no meta.json (and `open_split` says to re-run). Encoding uses tiktoken with the
tokenizer's own ranks when it is installed (about 3x faster than `tokenizers`); the first batch
of each silo is checked against `tokenizers` and any difference falls back to it.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import tokenizers
import torch

from fedlm.data.chat import ChatTemplate
from fedlm.data.chatshards import (
    ChatIndex,
    holds_conversations,
    write_chat_splits,
)
from fedlm.data.splits import Split, forced_sides, split_hash
from fedlm.data.tokenizer import (
    GPT2_PATTERN,
    bpe_ranks,
    eos_id,
    load_tokenizer,
    read_texts,
    silo_docs_paths,
    tokenizer_hash,
)
from fedlm.errors import UserError
from fedlm.fileio import atomic_path, write_json

_BATCH_DOCS = 512
_BATCH_CHARS = 1 << 22
_CHECK_DOCS = 32  # documents of each silo encoded by both engines to confirm they agree
_CHECK_CHARS = 1024  # ... their first this many characters (both engines get the same text)

Encoder = Callable[[list[str]], list[np.ndarray]]
UNUSED_SPECIAL = "<|fedlm-unused-special|>"


def list_silos(workspace: Path) -> list[str]:
    """Names of the silos under WS/silos that have a docs.jsonl, sorted."""
    return [p.parent.name for p in silo_docs_paths(Path(workspace))]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits comfortably (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _hf_encoder(tok: tokenizers.Tokenizer) -> Encoder:
    tok.encode_special_tokens = True  # a literal EOS in text is text, not a boundary
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def run(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    return run


def _tiktoken_encoder(tok: tokenizers.Tokenizer) -> Encoder | None:
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        ranks, rank_to_id = bpe_ranks(tok)
    except (KeyError, ValueError):  # not a plain byte-level BPE (e.g. SmolLM2's): use tokenizers
        return None
    # One special token, never allowed: `encode_to_numpy` then encodes exactly as
    # `encode_ordinary` (an occurrence of it is encoded as text), straight into a numpy buffer
    # instead of a Python list of ints (~20% less CPU). With no special token at all, tiktoken
    # looks for the empty pattern at every character, several times slower.
    enc = tiktoken.Encoding("fedlm", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={UNUSED_SPECIAL: max(ranks.values()) + 1})

    def run(texts: list[str]) -> list[np.ndarray]:
        # Per document, not a batch call: its thread pool costs more than short documents.
        return [rank_to_id[enc.encode_to_numpy(t, disallowed_special=())] for t in texts]

    def run_lists(texts: list[str]) -> list[np.ndarray]:  # a tiktoken without encode_to_numpy
        return [rank_to_id[np.asarray(enc.encode_ordinary(t), dtype=np.int64)] for t in texts]

    return run if hasattr(enc, "encode_to_numpy") else run_lists


def _engines_agree(fast: Encoder, hf: Encoder, texts: list[str]) -> bool:
    """Do both engines give the same ids for `texts`? (Short heads of documents suffice to
    catch a differing pre-tokeniser or merge order, at a fraction of encoding them whole.)"""
    return all(np.array_equal(a, r) for a, r in zip(fast(texts), hf(texts), strict=True))


_LOADED: dict[tuple, tuple[tokenizers.Tokenizer, str, Encoder, Encoder | None]] = {}


def _loaded(tok_path: Path, want_fast: bool) -> tuple[tokenizers.Tokenizer, str, Encoder, Encoder | None]:
    """(tokenizer, its sha256, tokenizers encoder, tiktoken encoder or None) for a file,
    remembered while the file is unchanged: sharding every silo of a workspace loads once."""
    st = tok_path.stat()
    key = (str(tok_path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, want_fast)
    if key not in _LOADED:
        tok = load_tokenizer(tok_path)
        sha = tokenizer_hash(tok_path)
        hf = _hf_encoder(tok)
        _LOADED.clear()
        _LOADED[key] = (tok, sha, hf, _tiktoken_encoder(tok) if want_fast else None)
    return _LOADED[key]


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _check_unicode(texts: Iterator[str], docs_path: Path) -> Iterator[str]:
    for i, t in enumerate(texts, 1):
        try:
            if not t.isascii():
                t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{docs_path}: document {i} is not valid Unicode ({e.reason}); "
                            "re-run `fedlm data prepare` for this silo") from e
        yield t


def _write_splits(
    docs_path: Path,
    silo_dir: Path,
    *,
    dtype: np.dtype,
    seed: int,
    val_fraction: float,
    fast: Encoder | None,
    hf: Encoder,
    eos: int,
    on_bytes: Callable[[int], None],
) -> tuple[dict, str]:
    """One pass: encode every document into train.bin / val.bin, a document to val when its
    split hash < val_fraction. If that left a side empty (a tiny silo), the document nearest
    to it moves over afterwards (`_forced_sides`), its tokens copied from the file, not
    encoded again. Returns (counts, encoder). Raises UserError, leaving the old shards, if
    docs.jsonl holds no document."""
    counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
    encode, encoder_name = (fast, "tiktoken") if fast is not None else (hf, "tokenizers")
    hashes = array("d")
    place = array("q")  # per document: first token in its side's file, tokens, bytes
    with atomic_path(silo_dir / "train.bin") as tmp_train, atomic_path(silo_dir / "val.bin") as tmp_val:
        with open(tmp_train, "wb") as f_train, open(tmp_val, "wb") as f_val:
            files = {"train": f_train, "val": f_val}
            texts = _check_unicode(read_texts(docs_path, on_bytes=on_bytes), docs_path)
            for b, batch in enumerate(_batches(texts)):
                ids = encode(batch)
                if b == 0 and encode is not hf:
                    heads = [t[:_CHECK_CHARS] for t in batch[:_CHECK_DOCS]]
                    if not _engines_agree(encode, hf, heads):
                        encode, encoder_name, ids = hf, "tokenizers", hf(batch)
                parts = _assign_sides(batch, ids, seed=seed, val_fraction=val_fraction, eos=eos,
                                      counts=counts, hashes=hashes, place=place)
                for split, arrays in parts.items():
                    if arrays:
                        np.concatenate(arrays).astype(dtype).tofile(files[split])
        if not hashes:
            raise UserError(f"{docs_path} has no documents: re-run `fedlm data prepare` with more text")
        _rebalance(hashes, place, counts, val_fraction=val_fraction, tmp_train=tmp_train,
                   tmp_val=tmp_val, dtype=dtype)
    return counts, encoder_name


def _assign_sides(batch: list[str], ids: list[np.ndarray], *, seed: int, val_fraction: float, eos: int,
                  counts: dict[str, dict[str, int]], hashes: array[float],
                  place: array[int]) -> dict[str, list[np.ndarray]]:
    """Send each document of a batch to val or train by its split hash; return each side's
    token arrays (a document's tokens then `eos`), in order. Counts each document on its side
    and records its hash and place (`hashes`, `place`) for `_rebalance`."""
    end = np.full(1, eos, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for text, doc_ids in zip(batch, ids, strict=True):
        h = split_hash(text, seed)
        split = "val" if h < val_fraction else "train"
        hashes.append(h)
        parts[split] += [doc_ids, end]
        c = counts[split]
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
        place.extend((c["tokens"], doc_ids.size + 1, n_bytes))
        c["tokens"] += doc_ids.size + 1
        c["documents"] += 1
        c["bytes"] += n_bytes
    return parts


def _rebalance(hashes: array[float], place: array[int], counts: dict[str, dict[str, int]], *,
               val_fraction: float, tmp_train: Path, tmp_val: Path, dtype: np.dtype) -> None:
    """If the hash split left a side empty (`_forced_sides`), move the chosen documents'
    tokens over between the files and their counts with them."""
    h_all = np.frombuffer(hashes, dtype=np.float64)
    forced = forced_sides(h_all, val_fraction)
    if forced is None:
        return
    was_val = h_all < val_fraction
    # one side is empty: the moved documents are all of it, in document order
    src, dst = (tmp_val, tmp_train) if was_val.any() else (tmp_train, tmp_val)
    side = "val" if was_val.any() else "train"
    other = "train" if side == "val" else "val"
    where = np.frombuffer(place, dtype=np.int64).reshape(-1, 3)
    moved = where[forced != was_val]
    _move_spans(src, dst, moved[:, 0], moved[:, 1], dtype)
    for key, col in (("tokens", 1), ("bytes", 2)):
        counts[side][key] -= int(moved[:, col].sum())
        counts[other][key] += int(moved[:, col].sum())
    counts[side]["documents"] -= len(moved)
    counts[other]["documents"] += len(moved)


def _move_spans(src: Path, dst: Path, starts: np.ndarray, lengths: np.ndarray,
                dtype: np.dtype) -> None:
    """Append the token spans [start, start + length) of `src` to the empty file `dst`, in
    order, and rewrite `src` without them (copied in bounded chunks)."""
    tokens = np.memmap(src, dtype=dtype, mode="r")
    with open(dst, "wb") as f:
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            _copy(tokens, s, s + n, f)
    rest = src.with_name(src.name + ".rest")
    try:
        with open(rest, "wb") as f:
            done = 0
            for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                _copy(tokens, done, s, f)
                done = s + n
            _copy(tokens, done, len(tokens), f)
        del tokens
        rest.replace(src)
    finally:
        rest.unlink(missing_ok=True)


def _copy(tokens: np.ndarray, start: int, end: int, f: BinaryIO, chunk: int = 1 << 24) -> None:
    for i in range(start, end, chunk):
        np.asarray(tokens[i: min(i + chunk, end)]).tofile(f)


def _shard_inputs(workspace: Path, silo: str, val_fraction: float) -> tuple[Path, Path, Path]:
    """The silo's folder, its docs.jsonl and the workspace's tokenizer, or a UserError saying what to run."""
    silo_dir = workspace / "silos" / silo
    docs_path = silo_dir / "docs.jsonl"
    if not docs_path.is_file():
        raise UserError(f"no {docs_path}: run `fedlm data prepare SRC --silo {silo} --workspace {workspace}`")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} must be in [0, 1)")
    tok_path = workspace / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"no tokenizer at {tok_path}: run `fedlm data tokenizer --workspace {workspace} --vocab-size N`")
    return silo_dir, docs_path, tok_path


def shard_silo(
    workspace: Path,
    silo: str,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    engine: Literal["auto", "tiktoken", "tokenizers"] = "auto",
) -> dict:
    """Tokenise WS/silos/<silo>/docs.jsonl into train.bin / val.bin + meta.json; return meta (+ seconds)."""
    workspace = Path(workspace)
    silo_dir, docs_path, tok_path = _shard_inputs(workspace, silo, val_fraction)
    start = time.perf_counter()
    tok, tok_sha256, hf, fast = _loaded(tok_path, engine != "tokenizers")
    vocab_size = tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab_size)
    eos = eos_id(tok)
    if engine == "tiktoken" and fast is None:
        raise UserError("engine 'tiktoken' asked but tiktoken is not installed: pip install tiktoken")
    (silo_dir / "meta.json").unlink(missing_ok=True)
    total_bytes = docs_path.stat().st_size
    done_bytes = 0

    def advance(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n
        if on_progress is not None:
            on_progress(done_bytes, total_bytes)

    for split in ("train", "val"):  # a chat silo's earlier sidecars, if it was one
        for suffix in (".mask", ".idx"):
            (silo_dir / f"{split}{suffix}").unlink(missing_ok=True)
    chat: dict | None = None
    if holds_conversations(silo_dir):
        template = ChatTemplate.load(workspace, what=f"silo {silo!r} (it holds conversations)")
        counts, chat = write_chat_splits(docs_path, silo_dir, template=template, hf=hf, dtype=dtype, eos=eos,
                                          seed=seed, val_fraction=val_fraction, on_bytes=advance)
        encoder_name = "tokenizers"
    else:
        counts, encoder_name = _write_splits(
            docs_path, silo_dir, dtype=dtype, seed=seed, val_fraction=val_fraction, fast=fast,
            hf=hf, eos=eos, on_bytes=advance)
    meta = {
        "silo": silo,
        "tokens": {s: counts[s]["tokens"] for s in counts},
        "documents": {s: counts[s]["documents"] for s in counts},
        "bytes": {s: counts[s]["bytes"] for s in counts},
        "dtype": dtype.name,
        "eos_id": eos,
        "layout": f"each document followed by {tok.id_to_token(eos)}",
        "tokenizer_sha256": tok_sha256,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "split_seed": seed,
        "encoder": encoder_name,
    }
    if chat is not None:
        meta["chat"] = chat
    write_json(silo_dir / "meta.json", meta)
    return dict(meta, seconds=round(time.perf_counter() - start, 3))


def open_chat(silo_dir: Path, split: Split) -> ChatIndex | None:
    """The split's mask and document starts if the silo holds conversations, else None."""
    silo_dir = Path(silo_dir)
    meta = read_meta(silo_dir)
    if "chat" not in meta:
        return None
    n = int(meta["tokens"][split])
    try:
        mask = np.memmap(silo_dir / f"{split}.mask", dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        starts = np.fromfile(silo_dir / f"{split}.idx", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise UserError(f"{silo_dir}: {split}.mask / {split}.idx unreadable ({e}): {_reshard_hint(silo_dir)}") from e
    if len(mask) != n or starts.size < 1 or int(starts[-1]) != n:
        raise UserError(f"{silo_dir}: {split}.mask / {split}.idx do not fit {split}.bin: {_reshard_hint(silo_dir)}")
    return ChatIndex(mask, starts)


def _reshard_hint(silo_dir: Path) -> str:
    return f"re-run `fedlm data shard --workspace {silo_dir.parent.parent} --silo {silo_dir.name}`"


def read_meta(silo_dir: Path) -> dict:
    """The silo's meta.json (UserError with the fix if missing or corrupt)."""
    silo_dir = Path(silo_dir)
    path = silo_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"no shards in {silo_dir} (no meta.json): {_reshard_hint(silo_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        int(meta["tokens"]["train"]) + int(meta["tokens"]["val"])
        np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}): {_reshard_hint(silo_dir)}") from e
    return meta


def open_split(silo_dir: Path, split: Split, *, expect_tokenizer_sha256: str | None = None) -> np.ndarray:
    """The split's tokens as a read-only memmap, checked against meta.json (UserError if not)."""
    silo_dir = Path(silo_dir)
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    meta = read_meta(silo_dir)
    path = silo_dir / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    n = int(meta["tokens"][split])
    if expect_tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != expect_tokenizer_sha256:
        raise UserError(
            f"{path} was made with another tokenizer (sha256 {str(meta.get('tokenizer_sha256'))[:12]}…, "
            f"expected {expect_tokenizer_sha256[:12]}…): {_reshard_hint(silo_dir)}"
        )
    if not path.is_file():
        raise UserError(f"{path} is missing: {_reshard_hint(silo_dir)}")
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise UserError(
            f"{path} has {size} bytes but meta.json says {n} {dtype.name} tokens "
            f"({n * dtype.itemsize} bytes): {_reshard_hint(silo_dir)}"
        )
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def sample_batch(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows: x (B, T) int64 and y = x shifted by one; reads only those windows.

    Offsets come from torch.randint with `generator`, so its state is the data position.
    """
    n = len(tokens)
    if n < seq_len + 1:
        where = getattr(tokens, "filename", None) or "the split"
        raise UserError(
            f"{where} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
            "lower train.seq_len or add data to this silo"
        )
    offsets = torch.randint(0, n - seq_len, (batch_size,), generator=generator).numpy()
    idx = offsets[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # fancy index: reads B windows
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def iter_eval_windows(
    tokens: np.ndarray, *, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows predicting every token after the first exactly once.

    Yields (x, y) int64 of shape (b, seq_len), b <= batch_size, then the last partial window
    alone as (1, t) with t < seq_len. Each window starts without context from the previous one.
    """
    n = len(tokens)
    last = n - 1  # number of targets
    full = last // seq_len
    for start in range(0, full, batch_size):
        rows = np.arange(start, min(start + batch_size, full)) * seq_len
        idx = rows[:, None] + np.arange(seq_len + 1)
        chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
    rest = last - full * seq_len
    if rest > 0:
        s = full * seq_len
        chunk = torch.from_numpy(np.asarray(tokens[s : s + rest + 1], dtype=np.int64))
        yield chunk[None, :-1].contiguous(), chunk[None, 1:].contiguous()
