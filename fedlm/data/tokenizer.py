"""One byte-level BPE tokenizer that the silos agree on without showing each other their text.

    agree_tokenizer(WS, vocab_size=8192, epsilon=1.0)   # -> WS/tokenizer.json, WS/tokenizer_privacy.json

Each silo pre-tokenises its own `docs.jsonl` (GPT-2 style: the ByteLevel regex, then bytes mapped
to 256 printable characters) and releases only pre-token counts:

- `epsilon=None`: the exact occurrence counts (no privacy; the record says so). Training on the
  sum of these gives exactly the tokenizer that training on the pooled raw text gives.
- `epsilon=E`: document-level (E, delta)-DP counts. Each document counts once for each distinct
  pre-token it contains, and for at most `max_pretokens_per_doc` (k) of them (its k most
  frequent; ties broken by the pre-token), so adding or removing one document changes the
  count vector by at most sqrt(k) in L2. The silo adds Gaussian noise calibrated for
  (E, delta/2) and drops every pre-token whose noisy count is below a threshold that a
  pre-token seen in a single document passes with probability <= delta/2 in total:
  `fedlm.privacy.mechanisms.release_sparse_histogram` (Gopi et al. 2020, "Differentially
  Private Set Union"; Korolova et al. 2009). The counts are then document frequencies, not
  occurrence counts; BPE only needs their relative sizes. Each silo's data is disjoint, so each
  silo spends (E, delta) on its own documents (parallel composition), once.

The released counts are summed and BPE is trained on the sum with HF `tokenizers`. `tokenizers`
has no API to train from counts, so each pre-token (already in the byte-level alphabet, which
holds no whitespace) is fed `count` times, space-separated, to a trainer whose pre-tokenizer
splits on whitespace: the trainer's word counts are then exactly the released counts. The
trained model gets the ByteLevel pre-tokenizer and decoder back; the initial alphabet is all
256 bytes, so any text encodes. `EOS` is the only special token, id 0.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fedlm.errors import UserError
from fedlm.fileio import write_json, write_text
from fedlm.privacy.mechanisms import release_sparse_histogram
from fedlm.privacy.randomness import NoiseKey

EOS = "<|endoftext|>"
"""End of text: id 0 and the only special token of fedlm's own tokenizers; separates documents in shards."""

END_TOKENS = (EOS, "<|end_of_text|>")
"""What ends a document in shards, by name: fedlm's, SmolLM2's and Qwen2's `EOS` (at id 0 only in
fedlm's and SmolLM2's), or Llama 3's "<|end_of_text|>"."""

DEFAULT_MAX_PRETOKENS_PER_DOC = 256
"""Contribution bound k for DP counts: a document counts towards at most k distinct pre-tokens."""

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The pre-tokenisation regex of `tokenizers`' ByteLevel (GPT-2's)."""

_FEED_CHUNK_CHARS = 1 << 22  # strings handed to the trainer at a time (memory bound)


def _byte_pre_tokenizer() -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


# ---------------------------------------------------------------------------------------------
# Reading a silo's documents


def silo_docs_paths(workspace: Path) -> list[Path]:
    """WS/silos/<silo>/docs.jsonl for every silo that has one, sorted by silo name."""
    root = Path(workspace) / "silos"
    if not root.is_dir():
        return []
    return sorted(p / "docs.jsonl" for p in root.iterdir() if (p / "docs.jsonl").is_file())


def read_texts(docs_path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield the `text` of each line of a docs.jsonl; `on_bytes(n)` after each line of n bytes."""
    fix = "re-run `fedlm data prepare` for this silo"
    with open(docs_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if on_bytes is not None:
                on_bytes(len(line))
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{docs_path}:{lineno}: not a JSON object with a 'text' field ({e}); {fix}") from e
            if not isinstance(text, str):
                raise UserError(f"{docs_path}:{lineno}: 'text' is not a string; {fix}")
            yield text


# ---------------------------------------------------------------------------------------------
# Local counting (inside a silo)


def count_pretokens(texts: Iterable[str], *, max_per_doc: int | None = None) -> Counter[str]:
    """Pre-token counts of `texts`, pre-tokens in the ByteLevel alphabet (e.g. 'Ġthe').

    max_per_doc None: occurrence counts. An int k: document counts, each document counting once
    for each of its k most frequent distinct pre-tokens (ties broken by the pre-token itself,
    so the choice depends on that document alone: the contribution bound DP needs).
    """
    split = _byte_pre_tokenizer().pre_tokenize_str
    counts: Counter[str] = Counter()
    for text in texts:
        pieces = [p for p, _ in split(text)]
        if max_per_doc is None:
            counts.update(pieces)
            continue
        in_doc = Counter(pieces)
        if len(in_doc) > max_per_doc:
            kept = heapq.nsmallest(max_per_doc, in_doc.items(), key=lambda kv: (-kv[1], kv[0]))
            counts.update(p for p, _ in kept)
        else:
            counts.update(in_doc.keys())
    return counts


# ---------------------------------------------------------------------------------------------
# Training from (released) counts


def _new_bpe_trainer(vocab_size: int) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def _finish(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tok.pre_tokenizer = _byte_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return tok


def train_from_texts(texts: Iterable[str], *, vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on raw text (the pooled reference; not private)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = _byte_pre_tokenizer()
    tok.train_from_iterator(texts, _new_bpe_trainer(vocab_size))
    return _finish(tok)


def _feed(counts: dict[str, int]) -> Iterator[str]:
    """Each pre-token `count` times, space separated, in strings of about 4 M characters."""
    buf: list[str] = []
    size = 0
    for piece, count in counts.items():
        unit = piece + " "
        per_chunk = max(1, _FEED_CHUNK_CHARS // len(unit))
        while count > 0:
            n = min(count, per_chunk)
            buf.append(unit * n)
            size += n * len(unit)
            count -= n
            if size >= _FEED_CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def train_from_counts(counts: dict[str, int], *, vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on pre-token counts (pre-tokens in the ByteLevel alphabet)."""
    tok = tokenizers.Tokenizer(models.BPE())
    # The ByteLevel alphabet has no whitespace, so splitting on whitespace recovers each piece.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(_feed(counts), _new_bpe_trainer(vocab_size))
    return _finish(tok)


# ---------------------------------------------------------------------------------------------
# The agreement


def _check_agree_args(vocab_size: int, epsilon: float | None, delta: float, max_pretokens_per_doc: int) -> None:
    """Refuse `agree_tokenizer`'s arguments that cannot work (UserError saying what to use)."""
    if vocab_size < 257:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least "
            f"257 (256 bytes + {EOS}); use e.g. 4096"
        )
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise UserError(f"--epsilon {epsilon} must be a number > 0 (or leave it off for exact counts)")
    if not 0.0 < delta < 1.0:
        raise UserError(f"delta {delta} must be in (0, 1), e.g. 1e-6")
    if max_pretokens_per_doc < 1:
        raise UserError(f"max_pretokens_per_doc {max_pretokens_per_doc} must be >= 1")


def _release_all(
    paths: list[Path],
    *,
    epsilon: float | None,
    delta: float,
    seed: int | None,
    on_progress: Callable[[int, int], None] | None,
    max_pretokens_per_doc: int,
) -> tuple[Counter[str], dict[str, dict]]:
    """Each silo's `release_counts`, in `paths` order: the summed counts and each silo's record.

    on_progress(bytes read, bytes in all) after each line read."""
    total_bytes = sum(p.stat().st_size for p in paths)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total_bytes)

    summed: Counter[str] = Counter()
    silos: dict[str, dict] = {}
    for path in paths:
        silo = path.parent.name
        counts, silos[silo] = release_counts(path, read_texts(path, on_bytes=advance), epsilon=epsilon,
                                             delta=delta, seed=seed, max_pretokens_per_doc=max_pretokens_per_doc)
        summed.update(counts)
    return summed, silos


def agree_tokenizer(
    workspace: Path,
    *,
    vocab_size: int,
    epsilon: float | None = None,
    delta: float = 1e-6,
    seed: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    max_pretokens_per_doc: int = DEFAULT_MAX_PRETOKENS_PER_DOC,
) -> dict:
    """Train WS/tokenizer.json on the sum of each silo's released counts; return the privacy record.

    epsilon None releases exact counts (no privacy). Each silo's release is `release_counts`;
    `seed` makes its noise public and reproducible (tests only, warned: see there).
    """
    workspace = Path(workspace)
    _check_agree_args(vocab_size, epsilon, delta, max_pretokens_per_doc)
    paths = silo_docs_paths(workspace)
    if not paths:
        raise UserError(
            f"no silos with docs.jsonl under {workspace / 'silos'}: run "
            f"`fedlm data prepare SRC --silo NAME --workspace {workspace}` first"
        )
    start = time.perf_counter()
    summed, silos = _release_all(paths, epsilon=epsilon, delta=delta, seed=seed, on_progress=on_progress,
                                 max_pretokens_per_doc=max_pretokens_per_doc)
    tok = train_from_counts(dict(summed), vocab_size=vocab_size)
    tok_path = workspace / "tokenizer.json"
    write_text(tok_path, tok.to_str(pretty=True))
    record = {
        "mode": "exact" if epsilon is None else "dp",
        "note": "exact counts, no privacy"
        if epsilon is None
        else f"each silo released document-level ({epsilon}, {delta})-DP pre-token counts",
        "vocab_size_requested": vocab_size,
        "vocab_size": tok.get_vocab_size(),
        "pretokens_summed": len(summed),
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "seconds": round(time.perf_counter() - start, 3),
        "silos": silos,
    }
    write_json(workspace / "tokenizer_privacy.json", record)
    return record


# ---------------------------------------------------------------------------------------------
# Using the agreed tokenizer


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """Load a workspace's tokenizer.json (UserError if missing, corrupt, or without an end-of-text token)."""
    path = Path(path)
    fix = "run `fedlm data tokenizer --workspace WS --vocab-size N`"
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}: {fix}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"{path} is not a valid tokenizer.json ({e}); {fix} again") from e
    if end_token_id(tok) is None:
        raise UserError(f"{path} has no end-of-text token ({' or '.join(END_TOKENS)}) to end documents with; {fix}")
    return tok


def end_token_id(tok: tokenizers.Tokenizer) -> int | None:
    """The id of the first of `END_TOKENS` this tokenizer has (None without one)."""
    return next((int(i) for name in END_TOKENS if (i := tok.token_to_id(name)) is not None), None)


def eos_id(tok: tokenizers.Tokenizer) -> int:
    """The id that ends a document in this tokenizer's shards (`end_token_id`; UserError without one)."""
    if (idx := end_token_id(tok)) is None:
        raise UserError(f"the tokenizer has no end-of-text token ({' or '.join(END_TOKENS)}) to end documents with")
    return idx


def tokenizer_hash(path: Path) -> str:
    """sha256 of the canonical JSON (sorted keys, compact) of a tokenizer.json: formatting-proof.

    Remembered per file version (inode, size, mtime): a 49k-token tokenizer takes ~0.3 CPU s to
    canonicalise, and every split opened against it asks again."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise UserError(f"cannot read tokenizer {path} ({e}); run `fedlm data tokenizer` again") from e
    return _canonical_hash(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _canonical_hash(path: str, inode: int, size: int, mtime_ns: int) -> str:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer {path} ({e}); run `fedlm data tokenizer` again") from e
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def token_byte_lengths(tok: tokenizers.Tokenizer) -> np.ndarray:
    """UTF-8 byte length of each token id, shape (vocab_size,), int64; special tokens (EOS) are 0.

    For bits per byte: sum over targets of these lengths is the byte length of the text.
    """
    special = set(tok.get_added_tokens_decoder())
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, idx in tok.get_vocab().items():
        if idx in special:
            continue
        if any(c not in CHAR_TO_BYTE for c in token):
            raise UserError(f"token {token!r} (id {idx}) is not byte-level; not a fedlm tokenizer")
        out[idx] = len(token)  # one ByteLevel character per byte
    return out


def bpe_ranks(tok: tokenizers.Tokenizer) -> tuple[dict[bytes, int], np.ndarray]:
    """The tokenizer as tiktoken-style ranks: (bytes -> rank, rank -> token id).

    Bytes rank 0..255; the result of merge m ranks 256 + m (the first merge that makes a
    string wins, as in `tokenizers`' vocabulary). Used by shards' fast encoder.
    """
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list[list[str]] = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    ranks: dict[bytes, int] = {}
    rank_to_id = np.zeros(256 + len(merges), dtype=np.int64)
    for b in range(256):
        ranks[bytes([b])] = b
        rank_to_id[b] = vocab[BYTE_TO_CHAR[b]]
    for m, (left, right) in enumerate(merges):
        key = bytes(CHAR_TO_BYTE[c] for c in left + right)
        if key not in ranks:
            ranks[key] = 256 + m
            rank_to_id[256 + m] = vocab[left + right]
    return ranks, rank_to_id


# ---------------------------------------------------------------------------------------------
# The agreement across machines: each silo releases a counts file, the coordinator sums them

def release_counts(docs: Path, texts: Iterable[str], *, epsilon: float | None, delta: float, seed: int | None,
                   max_pretokens_per_doc: int) -> tuple[dict[str, int], dict]:
    """What one silo releases for the tokenizer: its pre-token counts and their privacy record.

    epsilon None: exact counts (no privacy). Otherwise the document-level (epsilon, delta)-DP
    sparse histogram (`fedlm.privacy.mechanisms`), with noise from the silo's own secret key
    (`fedlm.privacy.randomness`, kept beside `docs`) in a stream named by the documents' hash
    and the parameters: asking again for the same release gets the same counts, never a
    second independent draw. `seed` derives the noise from a public number instead (tests
    only: anyone can subtract it; warned, and never written to the record).
    """
    if epsilon is None:
        counts = dict(count_pretokens(texts))
        return counts, {"mechanism": "exact counts, no privacy", "epsilon": None, "delta": None,
                        "released_pretokens": len(counts)}
    silo_dir = docs.parent
    key = (NoiseKey.local(silo_dir) if seed is None else
           NoiseKey.insecure_from_seed(seed, f"tokenizer counts of {silo_dir.name}"))
    digest = hashlib.sha256(docs.read_bytes()).hexdigest()
    rng = key.numpy_generator("tokenizer-counts", digest, epsilon, delta, max_pretokens_per_doc)
    doc_counts = count_pretokens(texts, max_per_doc=max_pretokens_per_doc)
    rel = release_sparse_histogram(doc_counts, epsilon=epsilon, delta=delta, max_keys=max_pretokens_per_doc, rng=rng)
    del doc_counts  # never leaves the silo
    counts = {k: max(1, round(v)) for k, v in rel.counts.items()}  # post-processing; each is > threshold >= 1
    return counts, {
        "mechanism": "Gaussian sparse histogram with threshold (document-level DP)",
        "noise": "secret: the silo's own key" if seed is None else "INSECURE: reproducible from a public number (tests only)",
        "epsilon": rel.epsilon, "epsilon_requested": epsilon, "delta": rel.delta,
        "delta_noise": rel.delta_noise, "delta_threshold": rel.delta_threshold,
        "contribution_bound": {"max_pretokens_per_doc": rel.max_keys, "max_count_per_pretoken": rel.max_count,
                               "l2_sensitivity": rel.l2_sensitivity},
        "noise_sigma": rel.sigma, "threshold": rel.threshold, "released_pretokens": len(counts),
    }


COUNTS_FORMAT = "fedlm-pretoken-counts/1"
"""The `format` field of a released counts file (`fedlm data counts`)."""


def release_silo_counts(
    workspace: Path,
    silo: str,
    *,
    epsilon: float | None = None,
    delta: float = 1e-6,
    seed: int | None = None,
    max_pretokens_per_doc: int = DEFAULT_MAX_PRETOKENS_PER_DOC,
) -> dict:
    """What one silo releases for the tokenizer, run on the silo's own machine.

    Returns `{"format", "silo", "privacy", "counts"}`, the content of the file the silo sends
    to the coordinator: the same counts and per-silo privacy record `agree_tokenizer` uses
    (exact counts when `epsilon` is None, else document-level (epsilon, delta)-DP counts).
    """
    docs = Path(workspace) / "silos" / silo / "docs.jsonl"
    if not docs.is_file():
        raise UserError(f"silo {silo!r}: no {docs}; run `fedlm data prepare SRC --silo {silo} --workspace {workspace}` first")
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise UserError(f"--epsilon {epsilon} must be a number > 0 (or leave it off for exact counts)")
    if not 0.0 < delta < 1.0:
        raise UserError(f"delta {delta} must be in (0, 1), e.g. 1e-6")
    counts, record = release_counts(docs, read_texts(docs), epsilon=epsilon, delta=delta, seed=seed,
                                    max_pretokens_per_doc=max_pretokens_per_doc)
    return {"format": COUNTS_FORMAT, "silo": silo, "privacy": record, "counts": counts}


def _read_counts_file(path: Path) -> dict:
    fix = "make it again with `fedlm data counts --workspace WS --silo NAME --out FILE` on that silo"
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--counts {path}: cannot read it as JSON ({e}); {fix}") from None
    if not isinstance(obj, dict) or obj.get("format") != COUNTS_FORMAT:
        raise UserError(f"--counts {path}: not a fedlm counts file (format {COUNTS_FORMAT!r}); {fix}")
    counts = obj.get("counts")
    if not isinstance(obj.get("silo"), str) or not isinstance(counts, dict) or not isinstance(obj.get("privacy"), dict):
        raise UserError(f"--counts {path}: needs 'silo', 'privacy' and 'counts'; {fix}")
    for piece, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or any(c not in CHAR_TO_BYTE for c in piece):
            raise UserError(f"--counts {path}: pre-token {piece!r} has count {n!r}; counts must be integers >= 1 "
                            f"of byte-level pre-tokens; {fix}")
    return obj


def agree_tokenizer_from_counts(workspace: Path, count_files: list[Path], *, vocab_size: int) -> dict:
    """Train WS/tokenizer.json on the sum of released counts files; write and return the privacy record.

    The counts are summed in silo-name order, as `agree_tokenizer` does, so exact counts from
    every silo give exactly the tokenizer `agree_tokenizer` trains on one machine.
    """
    workspace = Path(workspace)
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least "
                        f"257 (256 bytes + {EOS}); use e.g. 4096")
    if not count_files:
        raise UserError("no --counts files: make one per silo with `fedlm data counts` and pass each")
    start = time.perf_counter()
    released: dict[str, dict] = {}
    for path in count_files:
        obj = _read_counts_file(path)
        if obj["silo"] in released:
            raise UserError(f"--counts {path}: silo {obj['silo']!r} is given twice; pass one file per silo")
        released[obj["silo"]] = obj
    summed: Counter[str] = Counter()
    for silo in sorted(released):
        summed.update(released[silo]["counts"])
    modes = {r["privacy"].get("epsilon") is None for r in released.values()}
    tok = train_from_counts(dict(summed), vocab_size=vocab_size)
    tok_path = workspace / "tokenizer.json"
    workspace.mkdir(parents=True, exist_ok=True)
    write_text(tok_path, tok.to_str(pretty=True))
    record = {
        "mode": "exact" if modes == {True} else "dp" if modes == {False} else "mixed",
        "note": "counts released per silo with `fedlm data counts`; see each silo's record",
        "vocab_size_requested": vocab_size,
        "vocab_size": tok.get_vocab_size(),
        "pretokens_summed": len(summed),
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "seconds": round(time.perf_counter() - start, 3),
        "silos": {silo: released[silo]["privacy"] for silo in sorted(released)},
    }
    write_json(workspace / "tokenizer_privacy.json", record)
    return record
