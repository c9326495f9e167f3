"""Chat silos' shards: conversations in the model's chat template, a loss mask and document starts.

    counts, chat = write_chat_splits(docs_path, silo_dir, template=t, hf=encode, dtype=..., seed=0,
                                     val_fraction=0.05, on_bytes=advance)      # from `shard_silo`
    x, y = sample_chat_batch(tokens, open_chat(silo_dir, "train"), batch_size=8, seq_len=256,
                             generator=g)   # y is -100 off the answers

Beside SPLIT.bin go SPLIT.mask (uint8, one per token: 1 where it is the assistant's, the only
targets training learns) and SPLIT.idx (int64, the first token of every document, then the
split's length). See shards.py for the layout they share with raw-text silos.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlm.data.chat import ChatTemplate, conversation
from fedlm.data.splits import forced_sides, split_hash
from fedlm.errors import UserError
from fedlm.fileio import atomic_path, write_json

Encoder = Callable[[list[str]], list[np.ndarray]]


LENGTH_MARKS = (128, 256, 512, 1024, 2048, 4096)
"""Conversation lengths (tokens) the card counts the conversations above."""


def holds_conversations(silo_dir: Path) -> bool:
    """Does the silo's docs.jsonl hold conversations? (its card says; without one, a scan)"""
    try:
        return int(json.loads((silo_dir / "card.json").read_text(encoding="utf-8"))["conversations"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with open(silo_dir / "docs.jsonl", "rb") as f:
        return any(b'"messages"' in line for line in f)


def _read_records(docs_path: Path, on_bytes: Callable[[int], None]) -> Iterator[tuple[int, str, list | None]]:
    """(line number, text, messages or None) of each docs.jsonl line (UserError if corrupt)."""
    fix = "re-run `fedlm data prepare` for this silo"
    with open(docs_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            on_bytes(len(line))
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
                messages = conversation({"messages": rec["messages"]}) if "messages" in rec else None
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{docs_path}:{lineno}: not a document or conversation ({e}); {fix}") from e
            yield lineno, text, messages


def write_chat_splits(docs_path: Path, silo_dir: Path, *, template: ChatTemplate, hf: Encoder,
                       dtype: np.dtype, eos: int, seed: int, val_fraction: float,
                       on_bytes: Callable[[int], None]) -> tuple[dict, dict]:
    """Encode a chat silo into SPLIT.bin / .mask / .idx; returns (counts, meta's "chat" entry).

    Each document goes to a side by its split hash as in `_write_splits` (held in memory: chat
    silos are question-answer sets). A conversation the template or tokenizer cannot take
    (a special token written as text) is skipped and reported by line."""
    docs: list[tuple[float, np.ndarray, np.ndarray, int, bool]] = []  # hash, ids, mask, bytes, chat
    skipped: dict[str, list[int]] = {}
    end = np.full(1, eos, dtype=np.int64)  # after each document, as in `shards._assign_sides`
    for lineno, text, messages in _read_records(docs_path, on_bytes):
        if messages is None:
            ids = hf([text])[0]
            mask = np.ones(ids.size + 1, dtype=np.uint8)
        else:
            try:
                ids, mask = template.encode(messages)
            except ValueError as e:
                skipped.setdefault(str(e), []).append(lineno)
                continue
            mask = np.append(mask, np.uint8(0))  # the EOS after a conversation is not its answer
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
        docs.append((split_hash(text, seed), np.concatenate([ids, end]), mask, n_bytes, messages is not None))
    if not docs:
        raise UserError(f"{docs_path} has no usable conversation or document "
                        f"({_skip_summary(skipped) or 'empty'}): re-run `fedlm data prepare` with more data")
    hashes = np.array([d[0] for d in docs])
    to_val = forced_sides(hashes, val_fraction)
    if to_val is None:
        to_val = hashes < val_fraction
    counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
    chat: dict = {"template_sha256": template.sha256, "conversations": {}, "answer_tokens": {},
                  "skipped": [{"reason": r, "lines": len(v), "first_lines": v[:10]} for r, v in skipped.items()]}
    for split in ("train", "val"):
        side = [d for d, v in zip(docs, to_val.tolist(), strict=True) if v == (split == "val")]
        ids = np.concatenate([d[1] for d in side]) if side else np.zeros(0, dtype=np.int64)
        mask = np.concatenate([d[2] for d in side]) if side else np.zeros(0, dtype=np.uint8)
        starts = np.cumsum([0] + [d[1].size for d in side]).astype(np.int64)
        for suffix, arr in ((".bin", ids.astype(dtype)), (".mask", mask), (".idx", starts)):
            with atomic_path(silo_dir / f"{split}{suffix}") as tmp:
                arr.tofile(tmp)
        counts[split] = {"tokens": int(ids.size), "documents": len(side), "bytes": sum(d[3] for d in side)}
        chat["conversations"][split] = sum(d[4] for d in side)
        chat["answer_tokens"][split] = int(sum(int(d[2].sum()) for d in side if d[4]))
    lengths = np.array([d[1].size for d in docs if d[4]], dtype=np.int64)
    chat["conversation_tokens"] = {"max": int(lengths.max(initial=0)),
                                   "longer_than": {str(m): int((lengths > m).sum()) for m in LENGTH_MARKS}}
    _card_lengths(silo_dir, chat["conversation_tokens"])
    return counts, chat


def _skip_summary(skipped: dict[str, list[int]]) -> str:
    return "; ".join(f"{len(v)} skipped ({r}; line {v[0]}{', ...' if len(v) > 1 else ''})"
                     for r, v in skipped.items())


def _card_lengths(silo_dir: Path, lengths: dict) -> None:
    """Record the conversations' token lengths in the silo's card: how many a window of a given
    train.seq_len will cut (training counts them again for its own seq_len)."""
    path = silo_dir / "card.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no card (a hand-made docs.jsonl): meta.json holds the lengths too
    card["conversation_tokens"] = lengths
    write_json(path, card)


@dataclass(frozen=True)
class ChatIndex:
    """A chat silo split's sidecars: the loss mask per token and the documents' first tokens."""

    mask: np.ndarray  # (N,) uint8: 1 where the token is a training target
    starts: np.ndarray  # (D + 1,) int64: first token of each document, then N

    def truncated(self, seq_len: int) -> int:
        """Documents longer than a window of `seq_len` targets (cut at the window's end)."""
        return int((np.diff(self.starts) > seq_len + 1).sum())


IGNORE = -100
"""Target id of a token not trained on (PyTorch's and Hugging Face's ignore_index)."""


def sample_chat_batch(tokens: np.ndarray, chat: ChatIndex, *, batch_size: int, seq_len: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B windows of a chat split, each from a random document's first token: x (B, T) int64 and
    y, x shifted by one with IGNORE where the target is not an assistant's token. A window runs
    on into the next documents (packing); past the split's end it is EOS with IGNORE targets."""
    docs = chat.starts.size - 1
    if docs < 1 or len(tokens) < 2:
        raise UserError(f"{getattr(tokens, 'filename', 'the split')}: no conversation to train on; add data")
    pick = torch.randint(0, docs, (batch_size,), generator=generator).numpy()
    return _chat_windows(tokens, chat, chat.starts[pick], None, seq_len)


def chat_spans(chat: ChatIndex, seq_len: int) -> list[tuple[int, int]]:
    """Windows over every conversation once: (first token, end of its targets), each from a
    conversation's first token over the whole conversations that fit a window of `seq_len`
    targets (one longer than that alone, cut at the window's end as training cuts it)."""
    starts, docs = chat.starts, chat.starts.size - 1
    spans, i = [], 0
    while i < docs:
        j = i + 1
        while j < docs and starts[j + 1] - starts[i] <= seq_len + 1:
            j += 1
        spans.append((int(starts[i]), int(starts[j])))
        i = j
    return spans


def iter_chat_windows(tokens: np.ndarray, chat: ChatIndex, *, seq_len: int, batch_size: int,
                      spans: list[tuple[int, int]] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `chat_spans`' windows (`spans`, when the caller has them): every answer token of the
    split a target exactly once."""
    rows = np.asarray(chat_spans(chat, seq_len) if spans is None else spans, dtype=np.int64).reshape(-1, 2)
    for k in range(0, len(rows), batch_size):
        part = rows[k:k + batch_size]
        yield _chat_windows(tokens, chat, part[:, 0], part[:, 1], seq_len)


def _chat_windows(tokens: np.ndarray, chat: ChatIndex, first: np.ndarray, end: np.ndarray | None,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens from each of `first`; targets only an assistant's tokens, and
    (`end`) only those before each window's end."""
    n = len(tokens)
    idx = first[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    inside = idx < n
    idx = np.minimum(idx, n - 1)
    chunk = np.where(inside, np.asarray(tokens[idx], dtype=np.int64), 0)
    trained = inside & (np.asarray(chat.mask[idx]) == 1)
    if end is not None:
        trained &= idx < end[:, None]
    y = np.where(trained[:, 1:], chunk[:, 1:], IGNORE)
    return torch.from_numpy(np.ascontiguousarray(chunk[:, :-1])), torch.from_numpy(np.ascontiguousarray(y))
