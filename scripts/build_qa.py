"""Build fedlm's bundled question-answer silos (fedlm/corpus/qa/<silo>.jsonl) from the corpus.

A maintainer's script, never run at test time. Every question and answer is cut from the
bundled corpus archives (fedlm/corpus/<silo>.tar.xz, themselves built from pinned registry
packages by scripts/build_corpus.py), plus, for the legal silo, each licence's SPDX
identifier from the front matter of the same pinned ScanCode package. No other text enters.
Answers are short and checkable: each is a string of the source (a code, an identifier, a
name, a title) that the question's context determines.

Each output line is one OpenAI-style conversation,
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`; the held-out questions
are the val split that `fedlm data shard` makes (a hash of each conversation), so there is no
second split here. Selection is deterministic (candidates ordered by a hash of the question),
so two runs on the same archives and package write identical files.

    python scripts/build_qa.py                      # download licensedcode-data, build
    python scripts/build_qa.py --downloads /tmp/dl  # reuse (or fill) a download cache

See fedlm/corpus/qa/SOURCES.md for what each silo asks and how its answers are checked.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus  # noqa: E402  (the corpus's own pins, download and unpack)

ROOT = Path(__file__).resolve().parents[1]
SILOS = build_corpus.SILOS
PER_SILO = 300
"""Conversations per silo (fewer where the source has fewer distinct, unambiguous ones)."""

QA = tuple[str, str]  # (question, answer)
Files = dict[str, bytes]


# ---------------------------------------------------------------- shared helpers


def read_archive(silo: str, corpus: Path) -> Files:
    """The raw files of one bundled corpus silo, by name inside its folder."""
    out: Files = {}
    with tarfile.open(corpus / f"{silo}.tar.xz", mode="r:xz") as tf:
        for member in tf.getmembers():
            if member.isfile():
                fh = tf.extractfile(member)
                assert fh is not None
                out[member.name.removeprefix(f"{silo}/")] = fh.read()
    return out


def order_key(question: str) -> bytes:
    return hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()


def select(pairs: Iterable[QA], n: int) -> list[QA]:
    """Up to `n` pairs in a fixed pseudo-random order; questions asked twice with different
    answers are dropped (ambiguous), repeats with the same answer kept once."""
    answers: dict[str, set[str]] = {}
    for q, a in pairs:
        answers.setdefault(q, set()).add(a)
    unique = [(q, next(iter(a))) for q, a in answers.items() if len(a) == 1]
    return sorted(unique, key=lambda qa: order_key(qa[0]))[:n]


def sentences(text: str) -> list[str]:
    """Sentences of running prose: paragraphs reflowed, split after . ! ? before a capital."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        out.extend(s.strip() for s in re.split(r'(?:(?<=[.!?])|(?<=[.!?]["\u201d\']))\s+(?=["\u201c]?[A-Z])', flat))
    return [s for s in out if s]


# ---------------------------------------------------------------- legal: SPDX id of a licence


def spdx_keys(downloads: Path) -> dict[str, str]:
    """ScanCode licence key -> its SPDX identifier, from the pinned licensedcode-data package."""
    spec = build_corpus.PYPI["legal"]
    name, version = spec.split("==")
    hits = sorted(downloads.glob(f"{name.replace('-', '_')}-{version}*.whl"))
    if not hits:
        import subprocess

        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(downloads)]
        subprocess.run(cmd, check=True)
        hits = sorted(downloads.glob(f"{name.replace('-', '_')}-{version}*.whl"))
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = build_corpus.unpack(hits[0], Path(tmp))
        for path in sorted((root / "licensedcode/data/licenses").glob("*.LICENSE")):
            meta = path.read_text(encoding="utf-8").split("---\n", 2)
            fields = dict(re.findall(r"^(\w+): *(.*)$", meta[1] if len(meta) > 1 else "", re.M))
            spdx = fields.get("spdx_license_key", "").strip()
            if spdx and not spdx.startswith("LicenseRef-"):
                out[path.stem] = spdx
    return out


LEGAL_EXCERPTS = 10
"""Excerpts asked per licence (fewer where a licence has fewer distinctive ones)."""
LEGAL_MIN_EXCERPTS = 6
"""A licence is asked about only when it has this many distinctive excerpts, so that nearly
every held-out question's answer is also an answer of the training split."""


def excerpts(text: str, lo: int = 120, hi: int = 280) -> list[str]:
    """Consecutive non-blank lines of a licence, whitespace collapsed, joined into excerpts of
    `lo` to `hi` characters that do not overlap (a line longer than `hi` is skipped)."""
    out, cur = [], ""
    for line in (" ".join(x.split()) for x in text.splitlines() if x.strip()):
        joined = f"{cur} {line}" if cur else line
        if len(joined) <= hi:
            cur = joined
            continue
        if len(cur) >= lo:
            out.append(cur)
        cur = line if len(line) <= hi else ""
    if len(cur) >= lo:
        out.append(cur)
    return out


def qa_legal(files: Files, spdx: dict[str, str], edge: int = 50) -> list[QA]:
    """A licence's SPDX id from an excerpt anywhere in its text: excerpts of the licences that
    have at least LEGAL_MIN_EXCERPTS distinctive ones (mostly ASCII, and neither their first nor
    their last `edge` characters found in any other licence: the many shared or near-identical
    BSD, MIT, CC and CeCILL passages name no one licence), up to LEGAL_EXCERPTS each."""
    flat = {name: " ".join(data.decode("utf-8").split()) for name, data in files.items()}
    pairs = []
    for name, data in sorted(files.items()):
        key = name.removesuffix(".txt")
        if key not in spdx:
            continue
        found = []
        for ex in excerpts(data.decode("utf-8")):
            if sum(c.isascii() for c in ex) < 0.98 * len(ex):  # box drawings, non-English
                continue
            if any(ex[:edge] in t or ex[-edge:] in t for other, t in flat.items() if other != name):
                continue
            q = f"Which licence is this excerpt from? Answer with its SPDX identifier only.\n\n{ex}"
            found.append((q, spdx[key]))
        if len(found) >= LEGAL_MIN_EXCERPTS:
            pairs.extend(sorted(found, key=lambda qa: order_key(qa[0]))[:LEGAL_EXCERPTS])
    return pairs


# ---------------------------------------------------------------- medical: ICD-10-CM code


def qa_medical(files: Files, max_codes: int = 3) -> list[QA]:
    """The code a term belongs to, given the codes of its category (an inclusion term when the
    code has one, else its title): coding from a code list, as a coder does."""
    pairs = []
    for line in files["icd10cm-tabular.jsonl"].decode("utf-8").splitlines():
        row = json.loads(line)
        head, *rest = row["text"].split("\n")
        codes: list[tuple[str, str, list[str]]] = []  # (code, title, inclusion terms)
        for item in rest:
            if item.startswith("    "):
                if codes:
                    codes[-1][2].append(item.strip())
            else:
                code, _, title = item.partition(" ")
                codes.append((code, title, []))
        if len(codes) < 2:
            continue
        for i, (code, title, terms) in enumerate(codes):
            lo = max(0, min(i - max_codes // 2, len(codes) - max_codes))
            window = codes[lo : lo + max_codes]
            listing = "\n".join(f"{c} {t}" for c, t, _ in window)
            term = terms[0] if terms else title
            if len(term) > 120 or len(listing) > 240 or sum(term == t for _, t, _ in window) > 1:
                continue
            q = (f"ICD-10-CM category {head}. Its codes include:\n{listing}\n\n"
                 f"Which code covers \"{term}\"? Answer with the code only.")
            pairs.append((q, code))
    return pairs


# ---------------------------------------------------------------- technical: a Python name

_ROLE = re.compile(r":(\w+):`([^`]*)`")
BLANKS = {  # reST role -> what the question asks for (the C API's :c:func: etc. are not these roles)
    "func": "Which Python function fills the blank? Answer with its name only.",
    "exc": "Which Python exception fills the blank? Answer with its name only.",
    "keyword": "Which Python keyword fills the blank? Answer with the keyword only.",
}
TECH_MIN_ANSWER = 3
"""A name is asked for only when at least this many sentences blank it, so that nearly every
held-out question's answer is also an answer of the training split."""
TECH_MAX_ANSWER = 12
"""At most this many questions per name (TypeError alone fills 27 blanks)."""


def _role_text(target: str) -> str:
    """What a reST role shows: `title <target>` -> title, `~a.b` -> b, `!x` -> x."""
    m = re.match(r"(.*?)\s*<[^>]*>$", target)
    if m and m.group(1):
        return m.group(1)
    target = target.lstrip("!")
    return target.rsplit(".", 1)[-1] if target.startswith("~") else target


def _target_name(target: str) -> str:
    """The name a role points to: its target, not a display title (`title <target>`)."""
    m = re.search(r"<([^>]*)>$", target)
    return (m.group(1) if m else target).lstrip("~!").removesuffix("()")


def _plain(text: str) -> str:
    """reST inline markup rendered as plain text (roles, literals, emphasis)."""
    text = _ROLE.sub(lambda m: _role_text(m.group(2)), text)
    text = re.sub(r"\*\*?([^*\s][^*]*?)\*\*?", r"\1", text.replace("``", ""))  # *emphasis*, **strong**
    return text


def qa_technical(files: Files) -> list[QA]:
    """The function, exception or keyword blanked in a sentence of the docs (the sentence names
    no other of that kind, and the name appears nowhere else in the question), for names blanked
    in at least TECH_MIN_ANSWER sentences."""
    found: dict[str, list[QA]] = {}
    for role, ask in BLANKS.items():
        pattern = re.compile(rf"(?<!:c):{role}:`([^`]*)`")
        for _, data in sorted(files.items()):
            text = data.decode("utf-8")
            prose = "\n\n".join(p for p in re.split(r"\n\s*\n", text) if not p.lstrip().startswith(".."))
            for sent in sentences(prose):
                names = pattern.findall(sent)
                if len(names) != 1 or not 40 <= len(sent) <= 300 or "::" in sent:
                    continue
                answer = _target_name(names[0])
                q = f"{ask}\n\n{_plain(pattern.sub('____', sent))}"
                if re.fullmatch(r"[A-Za-z_][\w.]*", answer) and answer not in q:
                    found.setdefault(answer, []).append((q, answer))
    pairs = []
    for _, qas in sorted(found.items()):
        if len(qas) >= TECH_MIN_ANSWER:
            pairs.extend(sorted(qas, key=lambda qa: order_key(qa[0]))[:TECH_MAX_ANSWER])
    return pairs


# ---------------------------------------------------------------- literature: Austen novel

NOVELS = {"emma": "Emma", "mansfield-park": "Mansfield Park",
          "northanger-abbey": "Northanger Abbey", "persuasion": "Persuasion"}
_NAME = re.compile(r"\b(?:(?:Mr|Mrs|Miss|Lady|Sir|Captain|Admiral|Dr|Colonel)\.? )?[A-Z][a-z]{2,}\b")


def _distinctive_names(texts: dict[str, str], min_count: int = 8) -> dict[str, str]:
    """Capitalised names (with an optional title) used >= min_count times in one novel and never
    in another: characters (and places) of that novel alone."""
    counts = {novel: Counter(m.group(0) for m in _NAME.finditer(t)) for novel, t in texts.items()}
    out: dict[str, str] = {}
    for novel, counter in counts.items():
        for name, n in counter.items():
            if n >= min_count and all(name not in c for o, c in counts.items() if o != novel):
                out[name] = novel
    return out


def qa_literature(files: Files) -> list[QA]:
    """The novel a sentence comes from (it names a character of that novel alone), and the
    novel a character appears in."""
    texts: dict[str, str] = {}
    for name, data in sorted(files.items()):
        slug = re.sub(r"-ch\d+\.txt$", "", name)
        if slug in NOVELS:
            texts[slug] = texts.get(slug, "") + "\n\n" + data.decode("utf-8")
    names = _distinctive_names(texts)
    titled = {n: v for n, v in names.items() if " " in n}  # "Mr. Knightley": a character
    pairs = []
    for name, novel in titled.items():
        q = f"In which Jane Austen novel does the character {name} appear? Answer with the title only."
        pairs.append((q, NOVELS[novel]))
    per_novel = (PER_SILO - min(len(pairs), PER_SILO // 3)) // len(NOVELS) + 1
    for slug, text in texts.items():
        found = []
        for sent in sentences(text):
            words = len(sent.split())
            if 12 <= words <= 45 and any(m.group(0) in names for m in _NAME.finditer(sent)):
                q = f"Which Jane Austen novel is this sentence from? Answer with the title only.\n\n{sent}"
                found.append((q, NOVELS[slug]))
        pairs.extend(sorted(found, key=lambda qa: order_key(qa[0]))[:per_novel])
    return pairs


# ---------------------------------------------------------------- drama: Shakespeare play

PLAYS = {
    "alls_well_that_ends_well": "All's Well That Ends Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "The Comedy of Errors",
    "coriolanus": "Coriolanus", "cymbeline": "Cymbeline", "hamlet": "Hamlet",
    "henry_iv_part_1": "Henry IV, Part 1", "henry_iv_part_2": "Henry IV, Part 2", "henry_v": "Henry V",
    "henry_vi_part_1": "Henry VI, Part 1", "henry_vi_part_2": "Henry VI, Part 2",
    "henry_vi_part_3": "Henry VI, Part 3", "henry_viii": "Henry VIII", "john": "King John",
    "julius_caesar": "Julius Caesar", "lear": "King Lear", "loves_labours_lost": "Love's Labour's Lost",
}
_SPEECH = re.compile(r"^([A-Z][A-Za-z. ]{1,24}\.)\n((?:[^\n]+\n){2,4})\n", re.M)


def qa_drama(files: Files) -> list[QA]:
    """The play a speech of two to four lines comes from (its speaker's name as printed)."""
    per_play = PER_SILO // len(PLAYS) + 1
    pairs = []
    texts: dict[str, str] = {}
    for name, data in sorted(files.items()):
        stem = re.sub(r"-part\d+$", "", name.removesuffix(".txt"))
        if stem in PLAYS:
            texts[stem] = texts.get(stem, "") + data.decode("utf-8", "replace") + "\n\n"
    for stem, text in texts.items():
        found = []
        for m in _SPEECH.finditer(text):
            speech = m.group(2).strip()
            if 60 <= len(speech) <= 300 and "[" not in speech:
                q = ("Which Shakespeare play is this from? Answer with the title only.\n\n"
                     f"{m.group(1)}\n{speech}")
                found.append((q, PLAYS[stem]))
        pairs.extend(sorted(found, key=lambda qa: order_key(qa[0]))[:per_play])
    return pairs


# ---------------------------------------------------------------- chinese: 章 and poets

_DATES = re.compile(r"[（(][^）)]*[）)]")
CHAPTER_MAX = 12
"""Articles asked per chapter of the 《刑法》 (its chapters hold 12 to 108 articles)."""
POET_MIN_POEMS = 10
"""A poem is asked about only when its poet wrote this many poems of the two collections."""
POET_MAX_POEMS = 15
"""Poems asked per poet (杜甫 has 39)."""


def _law_chapters(files: Files) -> list[QA]:
    """The chapter (章) of a 《刑法》 article from its number and opening (its 【条旨】 included)."""
    by_chapter: dict[str, list[QA]] = {}
    for row in csv.DictReader(io.StringIO(files["criminal-law.csv"].decode("utf-8"))):
        text = " ".join(row["text"].split())
        body = text if len(text) <= 48 else text[:48] + "……"
        number, _, sub = row["article"].partition(".")
        article = f"第{number}条" + (f"之{'一二三四五六七八九'[int(sub) - 1]}" if sub else "")
        q = f"《刑法》{article}：{body}\n这一条属于《刑法》的哪一章？"
        by_chapter.setdefault(row["chapter"], []).append((q, row["chapter"]))
    return [qa for _, qas in sorted(by_chapter.items())
            for qa in sorted(qas, key=lambda qa: order_key(qa[0]))[:CHAPTER_MAX]]


def _poets(files: Files) -> list[QA]:
    """A poem's author from its title and first two lines, for poets with POET_MIN_POEMS poems."""
    by_poet: dict[str, list[QA]] = {}
    for name in ("tang300.jsonl", "song100.jsonl"):
        for line in files[name].decode("utf-8").splitlines():
            lines = json.loads(line)["text"].split("\n")
            title = re.sub(r"^题目[:：]", "", lines[0]).strip()
            author_line = next((x for x in lines[1:3] if re.match(r"作者[:：]", x)), None)
            if author_line is None:
                continue
            author = _DATES.sub("", re.sub(r"^作者[:：]", "", author_line)).strip()
            verses = [x.strip() for x in lines[lines.index(author_line) + 1 :] if len(x.strip()) >= 5]
            body = "\n".join(verses[:2])
            if author and body and len(author) <= 6:
                by_poet.setdefault(author, []).append((f"{title}\n{body}\n这首诗的作者是谁？", author))
    return [qa for _, qas in sorted(by_poet.items()) if len(qas) >= POET_MIN_POEMS
            for qa in sorted(qas, key=lambda qa: order_key(qa[0]))[:POET_MAX_POEMS]]


def qa_chinese(files: Files) -> list[QA]:
    """The chapter of a 《刑法》 article, and a poem's author: two closed sets of answers (15
    chapters, 10 poets), each answer asked about many times."""
    return _law_chapters(files) + _poets(files)


# ---------------------------------------------------------------- write


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(downloads: Path, corpus: Path, out: Path) -> None:
    spdx = spdx_keys(downloads)
    builders: dict[str, Callable[[Files], list[QA]]] = {
        "legal": lambda f: qa_legal(f, spdx), "medical": qa_medical, "technical": qa_technical,
        "literature": qa_literature, "drama": qa_drama, "chinese": qa_chinese,
    }
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'silo':<11} {'pairs':>5} {'candidates':>10} {'answers':>7} {'bytes':>8}")
    for silo in SILOS:
        candidates = builders[silo](read_archive(silo, corpus))
        pairs = select(candidates, PER_SILO)
        body = "".join(json.dumps(conversation(q, a), ensure_ascii=False) + "\n" for q, a in pairs)
        data = body.encode("utf-8")
        tmp = out / f".{silo}.jsonl.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / f"{silo}.jsonl")
        n_answers = len({a for _, a in pairs})
        print(f"{silo:<11} {len(pairs):>5} {len(candidates):>10} {n_answers:>7} {len(data):>8}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--downloads", type=Path, default=None,
                        help="cache folder for the downloaded package (default: a temp dir)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "fedlm/corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "fedlm/corpus/qa")
    args = parser.parse_args(argv)
    if args.downloads is None:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.corpus, args.out)
    else:
        build(args.downloads, args.corpus, args.out)


if __name__ == "__main__":
    main()
