"""Find a silo's files and read them into raw documents, reporting every bad file.

`discover(sources)` walks files and folders (recursively, following symlinks once, never
looping) and returns the files to read plus a `FileError` for every path that can't be read.
`read_documents(file, ...)` yields the raw documents of one file, in its format:

- `.txt .md .rst` (and any file named explicitly with another suffix): the whole file is one
  document, split at line boundaries into pieces of at most `max_doc_chars` characters;
- `.jsonl .ndjson` one JSON object per line with a string field (`text` by default); `.json`
  a list of such objects (or of strings), or JSON lines;
- `.csv` a text column (`text` by default), `.tsv` likewise;
- `.parquet` a text column, when pyarrow imports.

A JSON record or parquet row holding instruction data (OpenAI `messages`, `prompt`/`response`,
Alpaca `instruction`/`input`/`output`; see chat.py) is read as a conversation: a list of
messages instead of a string. A malformed one (missing role, empty answer, wrong types) is
skipped and reported with its line (row) number and why; its good neighbours are kept.

Bytes are decoded as UTF-8 (with or without BOM) or UTF-16/32 with a BOM; anything else is
detected with charset-normalizer (GBK, Latin-1, ...) or reported. Problems that lose part of
a file (malformed JSON lines, oversized lines split up) are reported beside the good part.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlm.data.chat import Message, conversation, is_chat_record

Document = str | list[Message]
"""What a reader yields: a text, or a conversation (its messages)."""

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text", ".markdown"})
JSON_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
CSV_SUFFIXES = frozenset({".csv", ".tsv"})
PARQUET_SUFFIXES = frozenset({".parquet"})
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES

MAX_DOC_CHARS = 1_000_000
"""Longer documents are split into pieces of at most this many characters (at line or space
boundaries where there are any), so one huge line can't blow up memory or time downstream."""
MAX_FILE_BYTES = 1 << 30
"""Files larger than this (1 GiB) are reported, not read."""

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass(frozen=True)
class FileError:
    """A file, or part of one, that was not prepared, and why (for the card and the console)."""

    path: str
    reason: str


@dataclass(frozen=True)
class SourceFile:
    """A file to read: its path, its path relative to the SRC root it was found under, size."""

    path: Path
    rel: str
    size: int
    explicit: bool = False
    """Named directly on the command line (read as text whatever its suffix)."""


@dataclass
class FileReport:
    """What reading one file found beside its documents: encoding used, problems."""

    encoding: str | None = None
    errors: list[str] = field(default_factory=list)


def os_reason(e: OSError) -> str:
    """A short reason for an OS error on a path, for the card."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "does not exist (or is a broken symlink)"
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: cannot read it"
    return f"cannot read: {e.strerror or e}"


def discover(sources: list[Path]) -> tuple[list[SourceFile], list[FileError]]:
    """List the readable files under `sources` (sorted, each once) and an error per bad path.

    Folders are walked recursively; hidden entries (names starting with '.') inside them are
    skipped, as are files with suffixes we don't read (each reported). Symlinks are followed,
    but a folder already visited (a symlink loop) is reported and not entered again.
    """
    found = _Discovery()
    for src in sources:
        src = Path(src)
        try:
            src.stat()
        except OSError as e:
            if e.errno == errno.ENOENT and not src.is_symlink():
                found.errors.append(FileError(str(src), "does not exist"))
            else:
                found.errors.append(FileError(str(src), os_reason(e)))
            continue
        if src.is_dir():
            found.walk(src, src)
        else:
            found.add_file(src, src.name, explicit=True)
    return found.files, found.errors


@dataclass
class _Discovery:
    """What `discover` has found so far, and the files and folders already seen (by inode)."""

    files: list[SourceFile] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    seen_files: set[tuple[int, int]] = field(default_factory=set)
    seen_dirs: set[tuple[int, int]] = field(default_factory=set)

    def add_file(self, path: Path, rel: str, explicit: bool) -> None:
        try:
            st = path.stat()
        except OSError as e:
            self.errors.append(FileError(str(path), os_reason(e)))
            return
        key = (st.st_dev, st.st_ino)
        if key in self.seen_files:
            return  # the same file reached twice (symlink or repeated SRC): read it once
        self.seen_files.add(key)
        if not explicit and path.suffix.lower() not in SUFFIXES:
            self.errors.append(FileError(
                str(path), f"unsupported file type {path.suffix or '(none)'!r}: "
                f"skipped (read: {' '.join(sorted(SUFFIXES))})"))
            return
        self.files.append(SourceFile(path, rel, st.st_size, explicit))

    def walk(self, root: Path, folder: Path) -> None:
        entries = self._entries(folder)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as e:
                self.errors.append(FileError(str(path), os_reason(e)))
                continue
            if is_dir:
                self.walk(root, path)
            else:
                self.add_file(path, path.relative_to(root).as_posix(), explicit=False)

    def _entries(self, folder: Path) -> list[os.DirEntry[str]]:
        """The entries of `folder` sorted by name; none (and an error) if it can't be listed
        or was already visited (a symlink loop)."""
        try:
            st = folder.stat()
        except OSError as e:
            self.errors.append(FileError(str(folder), os_reason(e)))
            return []
        key = (st.st_dev, st.st_ino)
        if key in self.seen_dirs:
            self.errors.append(FileError(str(folder),
                                         "symlink loop: folder already visited, skipped"))
            return []
        self.seen_dirs.add(key)
        try:
            return sorted(os.scandir(folder), key=lambda d: d.name)
        except OSError as e:
            self.errors.append(FileError(str(folder), os_reason(e)))
            return []


def decode(data: bytes) -> tuple[str, str]:
    """Decode file bytes to text; return (text, encoding). Raise ValueError with a reason."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc), enc.replace("-sig", "")
            except UnicodeDecodeError as e:
                raise ValueError(f"starts with a {enc} byte-order mark but is not valid {enc} "
                                 f"(byte {e.start})") from None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        utf8_error = e
    if b"\x00" in data[:8192]:
        raise ValueError("binary file (NUL bytes, no UTF-16/32 byte-order mark)")
    from charset_normalizer import from_bytes

    results = from_bytes(data[: 1 << 20])
    best = results.best()
    for match in results:
        # charset-normalizer often ranks DOS/Baltic code pages first on Western text; when
        # Windows-1252 (a superset of Latin-1's letters) is about as clean, it is the one
        if best is not None and "cp1252" in match.could_be_from_charset \
                and match.chaos <= best.chaos + 0.05:
            return data.decode("cp1252", errors="replace"), "cp1252"
    if best is None or best.encoding in ("utf_8", "ascii"):
        raise ValueError(f"not valid UTF-8 (byte {utf8_error.start}) and no other text "
                         f"encoding detected: binary or corrupt; convert it to UTF-8")
    try:
        return data.decode(best.encoding), best.encoding
    except (UnicodeDecodeError, LookupError):
        raise ValueError(f"not valid UTF-8 and not valid {best.encoding} either (detected); "
                         f"convert it to UTF-8") from None


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split `text` into pieces of at most `max_chars`, at a newline, else a space, if any."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + max_chars // 2, end)
        if cut < 0:
            cut = end
        else:
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def line_ranges(numbers: list[int], limit: int = 20) -> str:
    """Format sorted line numbers compactly: [3, 4, 5, 9] -> '3-5, 9' (first `limit` ranges)."""
    ranges: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        ranges.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    more = f", ... ({len(ranges) - limit} more ranges)" if len(ranges) > limit else ""
    return ", ".join(ranges[:limit]) + more


def _lines(numbers: list[int], unit: str = "line") -> str:
    return f"{unit}{'s' if len(numbers) > 1 else ''} {line_ranges(numbers)}"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_text(src: SourceFile, report: FileReport) -> str:
    if src.size > MAX_FILE_BYTES:
        raise ValueError(f"file of {src.size:,} bytes is larger than the "
                         f"{MAX_FILE_BYTES:,}-byte limit: split it")
    data = _read_bytes(src.path)
    if not data.strip():
        raise ValueError("empty file")
    text, report.encoding = decode(data)
    return text


def _long_pieces(text: str, where: str, report: FileReport, max_doc_chars: int) -> list[str]:
    pieces = split_long(text, max_doc_chars)
    if len(pieces) > 1:
        report.errors.append(f"{where}{len(text):,} characters, longer than the {max_doc_chars:,}-"
                             f"character document limit: split into {len(pieces)} documents")
    return pieces


def _iter_json(text: str, suffix: str, text_field: str, report: FileReport,
               max_doc_chars: int) -> Iterator[Document]:
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # not one JSON value: read it as JSON lines
        if obj is not None:
            items = obj if isinstance(obj, list) else [obj]
            yield from _iter_items(enumerate(items, 1), "item", text_field, report, max_doc_chars)
            return
    bad_json: list[int] = []

    def objects() -> Iterator[tuple[int, Any]]:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                bad_json.append(lineno)

    kept = _Kept()
    yield from _iter_items(objects(), "line", text_field, report, max_doc_chars, kept)
    if bad_json:
        report.errors.append(f"{_lines(bad_json)}: not valid JSON, skipped "
                             f"({kept.good} good lines kept)")


@dataclass
class _Kept:
    good: int = 0


def _iter_items(items: Iterator[tuple[int, Any]], unit: str, text_field: str, report: FileReport,
                max_doc_chars: int, kept: _Kept | None = None) -> Iterator[Document]:
    """The documents of numbered JSON values (lines, list items or parquet rows): a string field
    is a text, a chat record a conversation; each bad one is reported by number and reason."""
    kept = kept if kept is not None else _Kept()
    no_field: list[int] = []
    bad_chat: dict[str, list[int]] = {}
    for number, obj in items:
        if is_chat_record(obj):
            try:
                messages = conversation(obj)
            except ValueError as e:
                bad_chat.setdefault(str(e), []).append(number)
                continue
            kept.good += 1
            yield messages
            continue
        value = obj if isinstance(obj, str) and unit == "item" else (
            obj.get(text_field) if isinstance(obj, dict) else None)
        if not isinstance(value, str):
            no_field.append(number)
            continue
        kept.good += 1
        yield from _long_pieces(value, f"{unit} {number}: " if unit != "item" else "", report,
                                max_doc_chars)
    what = "lines" if unit == "line" else unit + "s"
    for reason, numbers in bad_chat.items():
        report.errors.append(f"{_lines(numbers, unit)}: malformed conversation ({reason}), skipped "
                             f"({kept.good} good {what} kept)")
    if no_field:
        report.errors.append(f"{_lines(no_field, unit)}: no string field {text_field!r} and no "
                             f"conversation, skipped ({kept.good} good {what} kept; set the text field)")


def _iter_csv(text: str, suffix: str, text_column: str, report: FileReport,
              max_doc_chars: int) -> Iterator[str]:
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise ValueError(f"no CSV header row ({e})") from None
    header = [h.strip() for h in header]
    if text_column not in header:
        shown = ", ".join(repr(h) for h in header[:10])
        raise ValueError(f"no column {text_column!r} (columns: {shown}); set the text column")
    col = header.index(text_column)
    bad: list[int] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            bad.append(reader.line_num)
            continue
        if not row:
            continue
        if col >= len(row):
            bad.append(reader.line_num)
            continue
        yield from _long_pieces(row[col], f"line {reader.line_num}: ", report, max_doc_chars)
    if bad:
        report.errors.append(f"{_lines(bad)}: malformed CSV rows or no "
                             f"{text_column!r} value, skipped")


def _iter_parquet(path: Path, text_column: str, report: FileReport,
                  max_doc_chars: int) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise ValueError(f"not a readable parquet file ({type(e).__name__}: {e})") from None
    report.encoding = "utf-8"
    if text_column not in names and is_chat_record(dict.fromkeys(names)):
        chat_columns = [n for n in names if n in ("messages", "prompt", "response", "instruction",
                                                  "input", "output")]

        def rows() -> Iterator[tuple[int, Any]]:
            number = 0
            for batch in pf.iter_batches(columns=chat_columns, batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield number, {k: v for k, v in row.items() if v is not None}

        yield from _iter_items(rows(), "row", text_column, report, max_doc_chars)
        return
    if text_column not in names:
        shown = ", ".join(repr(n) for n in names[:10])
        raise ValueError(f"no column {text_column!r} (columns: {shown}); set the text column, "
                         "or give instruction data (messages, prompt/response or instruction/output)")
    for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield from _long_pieces(value, "", report, max_doc_chars)


def read_documents(src: SourceFile, report: FileReport, *, text_field: str = "text",
                   text_column: str = "text",
                   max_doc_chars: int = MAX_DOC_CHARS) -> Iterator[Document]:
    """Yield the raw documents of one file; raise ValueError/OSError if none can be read.

    Partial problems (bad lines, split documents) go to `report.errors`; the encoding used
    to `report.encoding`.
    """
    suffix = src.path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(src.path, text_column, report, max_doc_chars)
        return
    text = _read_text(src, report)
    if suffix in JSON_SUFFIXES:
        yield from _iter_json(text, suffix, text_field, report, max_doc_chars)
    elif suffix in CSV_SUFFIXES:
        yield from _iter_csv(text, suffix, text_column, report, max_doc_chars)
    else:
        yield from _long_pieces(text, "", report, max_doc_chars)
