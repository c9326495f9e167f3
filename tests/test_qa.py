"""The bundled question-answer silos: well-formed conversations with short answers from a closed
set (each asked several times, so held-out answers are learnable), every answer checked against
the corpus text it was cut from (no text from elsewhere), and five of the six files rebuilt byte
for byte from the archives by scripts/build_qa.py (the sixth needs a package download for its
SPDX ids)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

import fedlm.corpus as corpus
from fedlm.corpus import SILOS, extract_qa

CORPUS_DIR = Path(corpus.__file__).parent
QA_DIR = CORPUS_DIR / "qa"


def conversations(silo: str) -> list[tuple[str, str]]:
    out = []
    for line in (QA_DIR / f"{silo}.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"], msgs
        out.append((msgs[0]["content"], msgs[1]["content"]))
    return out


def archive_texts(silo: str) -> dict[str, str]:
    with tarfile.open(CORPUS_DIR / f"{silo}.tar.xz", mode="r:xz") as tf:
        return {m.name.removeprefix(f"{silo}/"): tf.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
                for m in tf.getmembers() if m.isfile()}


def flat(text: str) -> str:
    return " ".join(text.split())


def excerpt(question: str) -> str:
    """The source excerpt of an English question: what follows the instruction's blank line."""
    return question.split("\n\n", 1)[1]


@pytest.mark.parametrize("silo", SILOS)
def test_files_hold_a_few_hundred_short_unique_pairs(silo: str) -> None:
    pairs = conversations(silo)
    assert 150 <= len(pairs) <= 300
    assert len({q for q, _ in pairs}) == len(pairs)
    for q, a in pairs:
        assert q.strip() and a.strip() and a == a.strip(), (q, a)
        assert len(a) <= 40 and "\n" not in a, a  # short, checkable answers
        if silo == "technical":  # the blank hides the answer (play and novel titles can be names)
            assert a not in q, (q, a)


def test_legal_excerpts_are_from_one_licence_each_and_answers_spdx_ids() -> None:
    texts = {name: flat(t) for name, t in archive_texts("legal").items()}
    licence_of: dict[str, str] = {}  # SPDX id -> the one licence file its excerpts come from
    for q, a in conversations("legal"):
        ex = flat(excerpt(q))
        where = [name for name, t in texts.items() if ex in t]
        assert len(where) == 1, (ex, where)
        assert licence_of.setdefault(a, where[0]) == where[0], (a, where[0], licence_of[a])
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", a) and not a.startswith("LicenseRef"), a


@pytest.mark.parametrize("silo", [s for s in SILOS if s != "medical"])
def test_answers_come_from_a_closed_set(silo: str) -> None:
    """Every answer (but medical's codes, which the question lists) is asked at least 3 times, so
    a held-out question's answer is nearly always an answer of the training split too."""
    counts = Counter(a for _, a in conversations(silo))
    assert min(counts.values()) >= 3, [a for a, n in counts.items() if n < 3]
    assert len(counts) <= 60, len(counts)


def test_medical_answer_is_the_code_the_term_belongs_to() -> None:
    (text,) = archive_texts("medical").values()
    names: dict[str, list[str]] = {}  # code -> [title, inclusion terms...]
    code = ""
    for row in text.splitlines():
        for line in json.loads(row)["text"].split("\n"):
            if line.startswith("    "):
                names[code].append(line.strip())
            else:
                code, _, title = line.partition(" ")
                names[code] = [title]
    for q, a in conversations("medical"):
        term = re.search(r'Which code covers "(.*)"\?', q).group(1)  # type: ignore[union-attr]
        assert term in names[a], (a, term)
        for listed in re.findall(r"^([A-Z]\d\S*) (.+)$", q, re.M):
            assert names[listed[0]][0] == listed[1]
        assert re.search(rf"^{re.escape(a)} ", q, re.M)  # the answer is among the listed codes


def test_technical_answer_is_the_blanked_name_in_the_docs() -> None:
    docs = "\n".join(archive_texts("technical").values())
    roles = {"function": "func", "exception": "exc", "keyword": "keyword"}
    for q, a in conversations("technical"):
        kind = re.match(r"Which Python (\w+) fills the blank\?", q).group(1)  # type: ignore[union-attr]
        assert "____" in q and a not in q
        assert re.search(rf":{roles[kind]}:`(?:[^`<]*<)?[~!]?{re.escape(a)}(?:\(\))?>?`", docs), (kind, a)


def test_literature_sentence_or_character_is_from_the_answered_novel() -> None:
    slugs = {"Emma": "emma", "Mansfield Park": "mansfield-park", "Northanger Abbey": "northanger-abbey",
             "Persuasion": "persuasion"}
    novels: dict[str, str] = {}
    for name, text in archive_texts("literature").items():
        novels[name.rsplit("-ch", 1)[0]] = novels.get(name.rsplit("-ch", 1)[0], "") + " " + flat(text)
    for q, a in conversations("literature"):
        m = re.search(r"the character (.+) appear\?", q)
        if m:
            assert m.group(1) in novels[slugs[a]]
            assert all(m.group(1) not in t for s, t in novels.items() if s != slugs[a]), m.group(1)
        else:
            assert flat(excerpt(q)) in novels[slugs[a]], q


def test_drama_speech_is_from_the_answered_play() -> None:
    plays: dict[str, str] = {}
    for name, text in archive_texts("drama").items():
        stem = re.sub(r"-part\d+$", "", name.removesuffix(".txt"))
        plays[stem] = plays.get(stem, "") + " " + flat(text)
    titles = {p: " ".join(w.capitalize() for w in p.split("_")) for p in plays}
    for q, a in conversations("drama"):
        speech = flat(excerpt(q))
        where = [p for p, t in plays.items() if speech in t]
        assert len(where) == 1, (speech, where)
        # the title names the play's file: "Henry IV, Part 1" -> henry_iv_part_1, "King Lear" -> lear
        key = re.sub(r"[^a-z0-9]+", "_", a.lower().replace("'", "")).strip("_")
        assert key.endswith(where[0]) or key.removeprefix("the_") == where[0], (a, where[0], titles[where[0]])


def test_chinese_chapter_and_poet_are_those_of_the_source() -> None:
    texts = archive_texts("chinese")
    articles = {r["article"]: r for r in csv.DictReader(io.StringIO(texts["criminal-law.csv"]))}
    poems = [json.loads(line)["text"] for name in ("tang300.jsonl", "song100.jsonl")
             for line in texts[name].splitlines()]
    for q, a in conversations("chinese"):
        m = re.match(r"《刑法》第(\d+)条(?:之(.))?：(.*?)(?:……)?\n这一条属于《刑法》的哪一章？$", q, re.S)
        if m:
            number = m.group(1) + (f".{'一二三四五六七八九'.index(m.group(2)) + 1}" if m.group(2) else "")
            assert flat(articles[number]["text"]).startswith(m.group(3)), number
            assert articles[number]["chapter"] == a, (number, a)
        else:
            title, *verses, ask = q.split("\n")
            assert ask == "这首诗的作者是谁？"
            hits = [p for p in poems if title in p and all(v in p for v in verses)]
            assert len(hits) == 1 and re.search(rf"作者[:：]{re.escape(a)}", hits[0]), (title, a)


def load_build_script() -> ModuleType:
    path = CORPUS_DIR.parents[1] / "scripts" / "build_qa.py"
    if not path.is_file():
        pytest.skip("scripts/build_qa.py is not shipped with an installed package")
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("build_qa", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.parametrize("silo", [s for s in SILOS if s != "legal"])
def test_build_script_rebuilds_the_shipped_file(silo: str) -> None:
    build = load_build_script()
    builder = getattr(build, f"qa_{silo}")
    pairs = build.select(builder(build.read_archive(silo, CORPUS_DIR)), build.PER_SILO)
    body = "".join(json.dumps(build.conversation(q, a), ensure_ascii=False) + "\n" for q, a in pairs)
    assert body == (QA_DIR / f"{silo}.jsonl").read_text(encoding="utf-8")


def test_extract_qa_copies_the_chosen_files(tmp_path: Path) -> None:
    out = extract_qa(tmp_path / "qa", ["drama", "chinese"])
    assert set(out) == {"drama", "chinese"}
    assert out["drama"].read_bytes() == (QA_DIR / "drama.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "qa").iterdir()) == ["chinese.jsonl", "drama.jsonl"]
