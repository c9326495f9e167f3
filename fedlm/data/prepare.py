"""`fedlm data prepare`: turn a silo's raw files into clean documents and a data card.

    card = prepare_silo([Path("raw/")], silo="legal", workspace=Path("ws"))

Each file is read (readers.py), each document normalised (NFKC, whitespace; clean.py),
scrubbed of personal data (pii.py), filtered for quality (clean.py) and checked for exact
and near duplicates (dedup.py). The survivors go to `WS/silos/SILO/docs.jsonl`, one
`{"text", "source"}` object per line, and the card to `WS/silos/SILO/card.json`.

Instruction records (chat.py) go through the same stages as conversations: each turn is
normalised and scrubbed, the filter and dedup judge the conversation's words (`flat_text`),
and a survivor is written as `{"text", "messages", "source"}`; the card counts them
(`conversations`, `conversations_in`). The quality filter's thresholds are arguments (and
`fedlm data prepare` flags), and the card records the values used. The silo
directory is written as a whole (`atomic_dir`): an interrupted prepare leaves the old silo or
none, and a re-run replaces it (shards from an earlier run go with it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fedlm.data.chat import Message, check_conversation, flat_text
from fedlm.data.clean import (
    MAX_REPEATED_LINES_RATIO,
    MAX_SYMBOL_RATIO,
    MIN_CHARS,
    normalize,
    quality_reason,
    script_of,
)
from fedlm.data.dedup import Deduper
from fedlm.data.pii import scrub
from fedlm.data.readers import (
    MAX_DOC_CHARS,
    Document,
    FileReport,
    SourceFile,
    discover,
    os_reason,
    read_documents,
)
from fedlm.errors import UserError
from fedlm.fileio import atomic_dir

STAGES = ("read", "normalize", "pii", "filter", "dedup", "write")


def _check_silo_name(silo: str) -> None:
    if not silo or silo.startswith(".") or "/" in silo or "\\" in silo or silo.strip() != silo:
        raise UserError(f"silo name {silo!r} is not a plain directory name: use letters, "
                        f"digits, '-' or '_' (e.g. --silo legal)")


def prepare_silo(sources: list[Path], *, silo: str, workspace: Path,
                 text_field: str = "text", text_column: str = "text",
                 near_dup_threshold: float = 0.8,
                 on_progress: Callable[[int, int], None] | None = None,
                 max_doc_chars: int = MAX_DOC_CHARS,
                 timings: dict[str, float] | None = None,
                 cpu_timings: dict[str, float] | None = None,
                 replace: bool = False, min_chars: int = MIN_CHARS,
                 max_symbol_ratio: float = MAX_SYMBOL_RATIO,
                 max_repeated_lines_ratio: float = MAX_REPEATED_LINES_RATIO) -> dict[str, Any]:
    """Prepare one silo from `sources`; return its card. Raise UserError if nothing survived.

    A silo is prepared from all its sources at once (dedup spans them), so an existing silo is
    replaced as a whole, shards included; without `replace` that is refused (UserError).

    `on_progress(bytes_done, bytes_total)` is called as files are read (input bytes).
    `timings` / `cpu_timings`, if given, receive the wall / CPU seconds spent per stage (for
    the benchmark). Documents go through the stages in batches of up to `_BATCH_DOCS`
    documents or `_BATCH_CHARS` characters, across file boundaries (numpy work in dedup is per
    batch, and timing each batch rather than each document costs nothing); the output is the
    same as one document at a time. `min_chars`, `max_symbol_ratio` and
    `max_repeated_lines_ratio` are the quality filter's thresholds (clean.py).
    """
    _check_silo_name(silo)
    if not 0.0 < near_dup_threshold <= 1.0:
        raise UserError(f"near-duplicate threshold {near_dup_threshold} must be in (0, 1]")
    thresholds = _check_thresholds(min_chars, max_symbol_ratio, max_repeated_lines_ratio)
    files, found_errors = discover([Path(s) for s in sources])
    clock = _StageClock()
    st = _Stats(deduper=Deduper(near_dup_threshold), thresholds=thresholds)
    st.errors = [{"path": e.path, "reason": e.reason} for e in found_errors]
    silo_dir = Path(workspace) / "silos" / silo
    if not replace:
        _refuse_existing(silo_dir, silo)

    with atomic_dir(silo_dir) as tmp:
        with open(tmp / "docs.jsonl", "wb") as out:
            reader = _Reader(st, clock, out, text_field=text_field, text_column=text_column,
                             max_doc_chars=max_doc_chars, on_progress=on_progress,
                             total=sum(f.size for f in files))
            reader.read_all(files)
        card = _card(silo=silo, sources=sources, files=files, docs_in=st.docs_in,
                     docs_out=st.docs_out, bytes_in=st.bytes_in, bytes_out=st.bytes_out,
                     errors=st.errors, pii=st.pii, dups=st.dups, filtered=st.filtered,
                     scripts=st.scripts, encodings=st.encodings, threshold=near_dup_threshold,
                     sha256=st.digest.hexdigest())
        card.update(conversations=st.convs_out, conversations_in=st.convs_in,
                    filter_thresholds=thresholds)
        if st.docs_out == 0:
            raise UserError(_nothing_prepared(silo, card))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    if timings is not None:
        timings.update(clock.wall)
    if cpu_timings is not None:
        cpu_timings.update(clock.cpu)
    return card


def _check_thresholds(min_chars: int, max_symbol_ratio: float,
                      max_repeated_lines_ratio: float) -> dict[str, Any]:
    """The filter's thresholds as the card records them; UserError naming a flag out of range."""
    if min_chars < 0:
        raise UserError(f"--min-chars {min_chars} must be >= 0")
    for flag, value in (("--max-symbol-ratio", max_symbol_ratio),
                        ("--max-repeated-lines-ratio", max_repeated_lines_ratio)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} {value} must be in [0, 1] (1 keeps every document)")
    return {"min_chars": min_chars, "max_symbol_ratio": max_symbol_ratio,
            "max_repeated_lines_ratio": max_repeated_lines_ratio}


def _refuse_existing(silo_dir: Path, silo: str) -> None:
    """UserError when `silo_dir` already holds a silo: preparing again would drop its documents."""
    if not silo_dir.is_dir() or not any(silo_dir.iterdir()):
        return
    try:
        held = f"{json.loads((silo_dir / 'card.json').read_text(encoding='utf-8'))['documents_out']:,} documents"
    except (OSError, ValueError, KeyError, TypeError):
        held = "files"
    raise UserError(
        f"{silo_dir} already holds silo {silo!r} ({held}); preparing it again replaces them and its shards "
        "with these sources alone: pass --replace to do that (list every source to keep), or choose another --silo"
    )


_BATCH_DOCS = 1024
_BATCH_CHARS = 1 << 22


class _Batch:
    """Raw documents waiting to be processed, and the source (relative path) of each."""

    def __init__(self) -> None:
        self.raws: list[Document] = []
        self.rels: list[str] = []
        self.chars = 0

    def add(self, raw: Document, rel: str, chars: int) -> bool:
        """Add a document; True when the batch is full (process it and start a new one)."""
        self.raws.append(raw)
        self.rels.append(rel)
        self.chars += chars
        return len(self.raws) >= _BATCH_DOCS or self.chars >= _BATCH_CHARS


class _StageClock:
    """Wall and CPU seconds per stage, added up lap by lap."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._t = (time.perf_counter(), time.process_time())

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def lap(self, stage: str) -> None:
        """Charge the time since the last start/lap to `stage`."""
        now = (time.perf_counter(), time.process_time())
        self.wall[stage] += now[0] - self._t[0]
        self.cpu[stage] += now[1] - self._t[1]
        self._t = now


@dataclass
class _Stats:
    """What the card counts, gathered batch by batch."""

    deduper: Deduper
    thresholds: dict[str, Any] = field(default_factory=dict)  # the quality filter's keyword arguments
    docs_in: int = 0
    convs_in: int = 0
    convs_out: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    pii: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    dups: dict[str, int] = field(default_factory=lambda: {"exact": 0, "near": 0})
    encodings: Counter[str] = field(default_factory=Counter)
    scripts: dict[str, Counter[str]] = field(default_factory=dict)
    digest: Any = field(default_factory=hashlib.sha256)


class _Reader:
    """Reads a silo's files document by document into batches, processing each full batch
    (`_process`) and reporting progress; the counts and problems go to `st`."""

    def __init__(self, st: _Stats, clock: _StageClock, out: BinaryIO, *, text_field: str,
                 text_column: str, max_doc_chars: int,
                 on_progress: Callable[[int, int], None] | None, total: int) -> None:
        self.st, self.clock, self.out = st, clock, out
        self.text_field, self.text_column = text_field, text_column
        self.max_doc_chars = max_doc_chars
        self.on_progress, self.total = on_progress, total
        self.batch = _Batch()
        self.done = 0  # input bytes of the files read so far
        self.n_docs = self.file_bytes = 0  # documents, decoded bytes read from the current file

    def read_all(self, files: list[SourceFile]) -> None:
        # One batch may span many files (a silo of 480 one-document files is a few
        # batches, not 480): the per-batch numpy work in dedup is then paid a few times.
        for src in files:
            self._read_file(src)
        self._flush()

    def _flush(self) -> None:
        _process(self.batch.raws, self.batch.rels, self.st, self.clock, self.out)
        self.batch = _Batch()

    def _read_file(self, src: SourceFile) -> None:
        """Read one file; a read error keeps the documents before it and is reported."""
        report = FileReport()
        docs = read_documents(src, report, text_field=self.text_field,
                              text_column=self.text_column, max_doc_chars=self.max_doc_chars)
        self.n_docs = self.file_bytes = 0
        try:
            self._read_docs(src, docs)
        except (OSError, ValueError) as e:
            reason = str(e) if isinstance(e, ValueError) else os_reason(e)
            if self.n_docs:
                reason += f" (after {self.n_docs} documents, which were kept)"
            self.st.errors.append({"path": str(src.path), "reason": reason})
        for problem in report.errors:
            self.st.errors.append({"path": str(src.path), "reason": problem})
        if report.encoding is not None and self.n_docs:
            self.st.encodings[report.encoding] += 1
        self.done += src.size
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def _read_docs(self, src: SourceFile, docs: Iterator[Document]) -> None:
        clock = self.clock
        while True:
            clock.start()
            raw = next(docs, None)
            if raw is not None:
                words = raw if isinstance(raw, str) else flat_text(raw)
                raw_bytes = (len(words) if words.isascii()
                             else len(words.encode("utf-8", "surrogatepass")))
                self.st.convs_in += not isinstance(raw, str)
            clock.lap("read")
            if raw is None:
                break
            self.n_docs += 1
            self.st.docs_in += 1
            self.st.bytes_in += raw_bytes
            self.file_bytes += raw_bytes
            if self.batch.add(raw, src.rel, len(words)):
                self._flush()
                if self.on_progress is not None and src.size:
                    # progress within a big file: by decoded bytes read so far
                    self.on_progress(self.done + min(src.size, self.file_bytes), self.total)


def _process(raws: list[Document], rels: list[str], st: _Stats, clock: _StageClock,
             out: BinaryIO) -> None:
    """Normalise, scrub, filter and dedup a batch of documents (in order; `rels[i]` is the
    source of `raws[i]`); write the survivors. A conversation is normalised and scrubbed turn
    by turn and judged by its words."""
    if not raws:
        return
    clock.start()
    docs: list[Document] = [normalize(raw) if isinstance(raw, str) else
                            [{"role": m["role"], "content": normalize(m["content"])} for m in raw]
                            for raw in raws]
    clock.lap("normalize")
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            docs[i] = _scrub(doc, st)
        else:
            docs[i] = [{"role": m["role"], "content": _scrub(m["content"], st)} for m in doc]
    clock.lap("pii")
    kept: list[str] = []
    kept_msgs: list[list[Message] | None] = []
    kept_rels: list[str] = []
    for doc, rel in zip(docs, rels, strict=True):
        text = doc if isinstance(doc, str) else flat_text(doc)
        reason = quality_reason(text, **st.thresholds)
        if reason is None and not isinstance(doc, str):
            try:
                check_conversation(doc)  # a turn normalised to nothing
            except ValueError:
                reason = "empty_turn"
        if reason is None:
            kept.append(text)
            kept_msgs.append(None if isinstance(doc, str) else doc)
            kept_rels.append(rel)
        else:
            st.filtered[reason] += 1
    clock.lap("filter")
    if not kept:
        return
    scripts = [script_of(text) for text in kept]
    verdicts = st.deduper.check_batch(kept, scripts)
    clock.lap("dedup")
    lines: list[str] = []
    for text, msgs, rel, script, dup in zip(kept, kept_msgs, kept_rels, scripts, verdicts, strict=True):
        if dup is not None:
            st.dups[dup] += 1
            continue
        mix = st.scripts.setdefault(script, Counter())
        mix["documents"] += 1
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
        mix["bytes"] += n_bytes
        st.bytes_out += n_bytes
        record: dict[str, Any] = {"text": text, "source": rel}
        if msgs is not None:
            record = {"text": text, "messages": msgs, "source": rel}
            st.convs_out += 1
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if lines:
        chunk = "".join(lines).encode("utf-8")  # encoded once, for the file and its hash
        out.write(chunk)
        st.digest.update(chunk)
        st.docs_out += len(lines)
    clock.lap("write")


def _scrub(text: str, st: _Stats) -> str:
    text, counts = scrub(text)
    if counts:
        st.pii.update(counts)
    return text


def _card(*, silo: str, sources: list[Path], files: list[SourceFile], docs_in: int,
          docs_out: int, bytes_in: int, bytes_out: int, errors: list[dict[str, str]],
          pii: Counter[str], dups: dict[str, int], filtered: Counter[str],
          scripts: dict[str, Counter[str]], encodings: Counter[str], threshold: float,
          sha256: str) -> dict[str, Any]:
    total_bytes = sum(c["bytes"] for c in scripts.values()) or 1
    languages = {
        s: {"documents": c["documents"], "bytes": c["bytes"],
            "share": round(c["bytes"] / total_bytes, 4)}
        for s, c in sorted(scripts.items())
    }
    return {
        "silo": silo,
        "sources": [str(s) for s in sources],
        "files": len(files),
        "documents_in": docs_in,
        "documents_out": docs_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "errors": errors,
        "pii": dict(sorted(pii.items())),
        "duplicates_removed": dups,
        "filtered": dict(sorted(filtered.items())),
        "languages": languages,
        "encodings": dict(sorted(encodings.items())),
        "near_dup_threshold": threshold,
        "sha256": sha256,
    }


def _nothing_prepared(silo: str, card: dict[str, Any]) -> str:
    why: list[str] = []
    if not card["files"] and not card["errors"]:
        why.append("no files found")
    if card["errors"]:
        shown = "; ".join(f"{e['path']}: {e['reason']}" for e in card["errors"][:3])
        more = f" (+{len(card['errors']) - 3} more)" if len(card["errors"]) > 3 else ""
        why.append(f"{len(card['errors'])} problems: {shown}{more}")
    if card["filtered"]:
        why.append("filtered out: " + ", ".join(f"{k} {v}" for k, v in card["filtered"].items()))
    dups = card["duplicates_removed"]
    if dups["exact"] or dups["near"]:
        why.append(f"duplicates: {dups['exact']} exact, {dups['near']} near")
    if card["documents_in"] == 0 and card["files"]:
        why.append(f"{card['files']} files held no documents")
    return (f"silo {silo!r}: no document was prepared ({'; '.join(why) or 'no input'}); "
            f"check the source paths and formats")
