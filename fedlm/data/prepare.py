"""`fedlm data prepare`: turn a silo's raw files into clean documents and a data card.

    card = prepare_silo([Path("raw/")], silo="legal", workspace=Path("ws"))

Each file is read (readers.py), each document normalised (NFKC, whitespace; clean.py),
scrubbed of personal data (pii.py), filtered for quality (clean.py) and checked for exact
and near duplicates (dedup.py). The survivors go to `WS/silos/SILO/docs.jsonl`, one
`{"text", "source"}` object per line, and the card to `WS/silos/SILO/card.json`. The silo
directory is written as a whole (`atomic_dir`): an interrupted prepare leaves the old silo or
none, and a re-run replaces it (shards from an earlier run go with it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlm.data.clean import normalize, quality_reason, script_of
from fedlm.data.dedup import Deduper
from fedlm.data.pii import scrub
from fedlm.data.readers import (
    MAX_DOC_CHARS,
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
                 timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Prepare one silo from `sources`; return its card. Raise UserError if nothing survived.

    `on_progress(bytes_done, bytes_total)` is called as files are read (input bytes).
    `timings`, if given, receives the seconds spent per stage (for the benchmark).
    """
    _check_silo_name(silo)
    if not 0.0 < near_dup_threshold <= 1.0:
        raise UserError(f"near-duplicate threshold {near_dup_threshold} must be in (0, 1]")
    files, found_errors = discover([Path(s) for s in sources])
    errors: list[dict[str, str]] = [{"path": e.path, "reason": e.reason} for e in found_errors]
    total = sum(f.size for f in files)
    stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    pii: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    dups = {"exact": 0, "near": 0}
    encodings: Counter[str] = Counter()
    scripts: dict[str, Counter[str]] = {}
    deduper = Deduper(near_dup_threshold)
    docs_in = docs_out = bytes_in = bytes_out = 0
    done = 0
    digest = hashlib.sha256()
    silo_dir = Path(workspace) / "silos" / silo

    with atomic_dir(silo_dir) as tmp:
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as out:
            for src in files:
                report = FileReport()
                docs = read_documents(src, report, text_field=text_field,
                                      text_column=text_column, max_doc_chars=max_doc_chars)
                n_docs = file_bytes = 0
                try:
                    while True:
                        t0 = time.perf_counter()
                        try:
                            raw = next(docs)
                        except StopIteration:
                            stage_s["read"] += time.perf_counter() - t0
                            break
                        stage_s["read"] += time.perf_counter() - t0
                        n_docs += 1
                        docs_in += 1
                        raw_bytes = len(raw.encode("utf-8", "surrogatepass"))
                        bytes_in += raw_bytes
                        file_bytes += raw_bytes
                        kept = _process(raw, src, deduper, pii, filtered, dups, scripts, stage_s)
                        if kept is not None:
                            line, text_bytes = kept
                            t0 = time.perf_counter()
                            data = line.encode("utf-8")
                            out.write(line)
                            digest.update(data)
                            docs_out += 1
                            bytes_out += text_bytes
                            stage_s["write"] += time.perf_counter() - t0
                        if on_progress is not None and n_docs % 64 == 0 and src.size:
                            # progress within a big file: by decoded bytes read so far
                            on_progress(done + min(src.size, file_bytes), total)
                except (OSError, ValueError) as e:
                    reason = str(e) if isinstance(e, ValueError) else os_reason(e)
                    if n_docs:
                        reason += f" (after {n_docs} documents, which were kept)"
                    errors.append({"path": str(src.path), "reason": reason})
                for problem in report.errors:
                    errors.append({"path": str(src.path), "reason": problem})
                if report.encoding is not None and n_docs:
                    encodings[report.encoding] += 1
                done += src.size
                if on_progress is not None:
                    on_progress(done, total)
        card = _card(silo=silo, sources=sources, files=files, docs_in=docs_in, docs_out=docs_out,
                     bytes_in=bytes_in, bytes_out=bytes_out, errors=errors, pii=pii, dups=dups,
                     filtered=filtered, scripts=scripts, encodings=encodings,
                     threshold=near_dup_threshold, sha256=digest.hexdigest())
        if docs_out == 0:
            raise UserError(_nothing_prepared(silo, card))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    if timings is not None:
        timings.update(stage_s)
    return card


def _process(raw: str, src: SourceFile, deduper: Deduper, pii: Counter[str],
             filtered: Counter[str], dups: dict[str, int],
             scripts: dict[str, Counter[str]], stage_s: dict[str, float]) -> tuple[str, int] | None:
    """Normalise, scrub, filter and dedup one document: (its JSON line, its text's UTF-8
    bytes), or None if dropped."""
    t0 = time.perf_counter()
    text = normalize(raw)
    t1 = time.perf_counter()
    text, counts = scrub(text)
    pii.update(counts)
    t2 = time.perf_counter()
    reason = quality_reason(text)
    t3 = time.perf_counter()
    stage_s["normalize"] += t1 - t0
    stage_s["pii"] += t2 - t1
    stage_s["filter"] += t3 - t2
    if reason is not None:
        filtered[reason] += 1
        return None
    script = script_of(text)
    dup = deduper.check(text, script)
    stage_s["dedup"] += time.perf_counter() - t3
    if dup is not None:
        dups[dup] += 1
        return None
    mix = scripts.setdefault(script, Counter())
    mix["documents"] += 1
    n_bytes = len(text.encode("utf-8"))
    mix["bytes"] += n_bytes
    return json.dumps({"text": text, "source": src.rel}, ensure_ascii=False) + "\n", n_bytes


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
