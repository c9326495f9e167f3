"""The bundled corpus: every silo extracts safely, holds real text in its language, in its size
band, in moderate documents, and the archives are exactly what the build script makes."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import lzma
import re
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

import fedlm.corpus as corpus
from fedlm.corpus import SILOS, extract
from fedlm.errors import UserError

CORPUS_DIR = Path(corpus.__file__).parent
ENGLISH = ("legal", "medical", "technical", "literature", "drama")
# The commonest English function words: a quarter to a third of running English text.
FUNCTION_WORDS = frozenset(
    "the of and to a in is or that for be with by as it this not on any you i he she his her my".split()
)


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return extract(tmp_path_factory.mktemp("corpus"))


def documents(folder: Path) -> dict[str, str]:
    """Each document's text, read the way the data readers define a document."""
    docs: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        text = path.read_text(encoding="utf-8")  # raises if not UTF-8
        if path.suffix == ".csv":
            for i, row in enumerate(csv.DictReader(io.StringIO(text))):
                docs[f"{path.name}:{i}"] = row["text"]
        elif path.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines()):
                docs[f"{path.name}:{i}"] = json.loads(line)["text"]
        else:
            assert path.suffix in (".txt", ".rst"), path
            docs[path.name] = text
    return docs


def shares(text: str) -> tuple[float, float, float]:
    """(CJK share, ASCII-letter share) of non-space characters, function-word share of words."""
    chars = [c for c in text if not c.isspace()]
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in chars) / len(chars)
    latin = sum(c.isascii() and c.isalpha() for c in chars) / len(chars)
    words = re.findall(r"[a-z]+", text.lower())
    func = sum(w in FUNCTION_WORDS for w in words) / max(len(words), 1)
    return cjk, latin, func


def load_build_script() -> ModuleType:
    path = CORPUS_DIR.parents[1] / "scripts" / "build_corpus.py"
    if not path.exists():
        pytest.skip("scripts/build_corpus.py is not shipped with an installed package")
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_silo_extracts_into_its_own_folder(silos: dict[str, Path], tmp_path: Path) -> None:
    assert (
        tuple(silos) == SILOS == ("legal", "medical", "technical", "literature", "drama", "chinese")
    )
    for silo, folder in silos.items():
        assert folder.name == silo and folder.is_dir()
        assert all(p.is_file() for p in folder.iterdir()), "silo folders are flat"
    assert extract(tmp_path, ["drama"]) == {"drama": tmp_path / "drama"}
    assert [p.name for p in tmp_path.iterdir()] == ["drama"]


@pytest.mark.slow
def test_english_silos_are_english_and_chinese_silo_is_chinese(silos: dict[str, Path]) -> None:
    for silo in ENGLISH:
        cjk, latin, func = shares("\n".join(documents(silos[silo]).values()))
        assert cjk < 0.01 and latin > 0.75, (silo, cjk, latin)
        assert func > 0.08, (silo, func)  # code lists are terse; prose is 0.25-0.35
    cjk, latin, _ = shares("\n".join(documents(silos["chinese"]).values()))
    assert cjk > 0.6 and latin < 0.05, (cjk, latin)


def test_known_passages_are_where_the_sources_put_them(silos: dict[str, Path]) -> None:
    """Spot checks against the published texts, not against the build script."""
    legal = (silos["legal"] / "apache-2.0.txt").read_text(encoding="utf-8")
    assert "Apache License" in legal and "Version 2.0, January 2004" in legal
    medical = documents(silos["medical"])
    assert medical["icd10cm-tabular.jsonl:0"].splitlines()[0] == "A00 Cholera"
    assert "A01.0 Typhoid fever" in medical["icd10cm-tabular.jsonl:1"]
    classes = (silos["technical"] / "tutorial-classes.rst").read_text(encoding="utf-8")
    assert "*******\nClasses\n*******" in classes
    emma = (silos["literature"] / "emma-ch001.txt").read_text(encoding="utf-8")
    assert emma.startswith("EMMA") and "Emma Woodhouse, handsome, clever, and rich" in emma
    hamlet = "".join(p.read_text(encoding="utf-8") for p in sorted(silos["drama"].glob("hamlet*")))
    assert "To be, or not to be,--that is the question:--" in hamlet
    chinese = documents(silos["chinese"])
    assert "为了惩罚犯罪，保护人民" in chinese["criminal-law.csv:0"]
    assert sum(1 for k in chinese if k.startswith("criminal-law.csv:")) == 495
    assert any("床前明月光" in t for k, t in chinese.items() if k.startswith("tang300"))


def test_silo_sizes_and_documents_are_in_band(silos: dict[str, Path]) -> None:
    compressed = 0
    for silo, folder in silos.items():
        raw = sum(p.stat().st_size for p in folder.iterdir())
        assert 1_000_000 <= raw <= 3_000_000, (silo, raw)
        docs = documents(folder)
        assert len(docs) >= 30, (silo, len(docs))
        for name, text in docs.items():
            assert text.strip(), (silo, name)
            assert len(text.encode()) <= 100_000, (silo, name)
        compressed += (CORPUS_DIR / f"{silo}.tar.xz").stat().st_size
    assert compressed < 5_000_000


def test_archives_match_the_checksums_in_sources_md() -> None:
    text = (CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    recorded = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+\.tar\.xz)$", text, re.M)
    )
    assert sorted(recorded) == sorted(f"{s}.tar.xz" for s in SILOS)
    for name, digest in recorded.items():
        assert hashlib.sha256((CORPUS_DIR / name).read_bytes()).hexdigest() == digest, name


def test_archive_members_are_sorted_with_fixed_metadata() -> None:
    for silo in SILOS:
        with tarfile.open(CORPUS_DIR / f"{silo}.tar.xz", "r:xz") as tf:
            members = tf.getmembers()
        names = [m.name for m in members]
        assert names[0] == silo and names[1:] == sorted(names[1:])
        assert all(n.startswith(f"{silo}/") and n.count("/") == 1 for n in names[1:])
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
            (1_700_000_000, 0, 0, "", "")
        }
        assert all(m.isfile() and m.mode == 0o644 for m in members[1:])


def test_reextracting_gives_the_same_bytes(silos: dict[str, Path], tmp_path: Path) -> None:
    again = extract(tmp_path)
    for silo, folder in silos.items():
        first = {p.name: p.read_bytes() for p in folder.iterdir()}
        second = {p.name: p.read_bytes() for p in again[silo].iterdir()}
        assert first == second, silo


def test_build_script_rebuilds_the_same_tar_from_the_extracted_files(
    silos: dict[str, Path],
) -> None:
    """Deterministic archiving: the extracted files re-archived by the build script give the
    committed tar stream byte for byte (compared before xz, which depends on liblzma)."""
    build = load_build_script()
    for silo, folder in silos.items():
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        committed = lzma.decompress((CORPUS_DIR / f"{silo}.tar.xz").read_bytes())
        assert build.tar_bytes(silo, files) == committed, silo


def test_reextract_replaces_a_stale_folder(tmp_path: Path) -> None:
    stale = tmp_path / "legal" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("old")
    extract(tmp_path, ["legal"])
    assert not stale.exists()
    assert (tmp_path / "legal" / "apache-2.0.txt").exists()


def test_unknown_silo_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown corpus silo 'finance'.*legal"):
        extract(tmp_path, ["legal", "finance"])
    assert not any(tmp_path.iterdir()), "nothing is extracted when one name is bad"


def _evil_archive(path: Path, name: str) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    path.write_bytes(lzma.compress(raw.getvalue(), format=lzma.FORMAT_XZ))
    return path


@pytest.mark.parametrize("member", ["legal/../../evil.txt", "evil.txt", "/tmp/evil.txt"])
def test_unsafe_members_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str
) -> None:
    evil = _evil_archive(tmp_path / "evil.tar.xz", member)
    monkeypatch.setattr(corpus, "archive", lambda silo: evil)
    dest = tmp_path / "ws" / "raw"
    with pytest.raises(UserError, match="corpus archive legal.tar.xz"):
        extract(dest, ["legal"])
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "ws" / "evil.txt").exists()
    assert not (dest / "legal").exists(), "a refused archive leaves no half-filled silo"
